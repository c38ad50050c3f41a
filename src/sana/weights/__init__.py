"""Reading and writing checkpoints: layouts (original NVlabs, diffusers, native), strict conversion."""
