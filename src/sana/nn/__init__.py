"""Small pure-torch building blocks shared by the Sana models."""
