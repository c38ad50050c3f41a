import pytest
import torch


def randomize_(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values so that every term of the forward pass matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """max |ours - ref| <= rel * max |ref| (the issue's parity criterion)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ours).all()
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x max|ref| {scale:.3g}"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
