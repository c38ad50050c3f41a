"""The flow-matching loss, its logit-normal shifted timestep density and caption dropout, against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sana.train.loss import drop_captions, flow_matching_loss, sample_sigmas, shift_sigmas


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def _closed_form_quantile(q: float, mean: float, std: float, shift: float) -> float:
    """sigma is a monotone function of z ~ N(0, 1), so its q-quantile is that function of z's q-quantile."""
    z = math.sqrt(2.0) * _erfinv(2 * q - 1)
    u = _expit(mean + std * z)
    return shift * u / (1 + (shift - 1) * u)


def _erfinv(y: float) -> float:
    return float(torch.special.erfinv(torch.tensor(y, dtype=torch.float64)))


def _closed_form_mean(mean: float, std: float, shift: float) -> float:
    """E[shift(sigmoid(mean + std z))] by 80-point Gauss-Hermite quadrature (probabilists' weight)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    u = _expit(mean + std * x)
    return float(np.sum(w * shift * u / (1 + (shift - 1) * u)) / np.sqrt(2 * np.pi))


@pytest.mark.parametrize("mean, std, shift", [(0.0, 1.0, 1.0), (0.0, 1.0, 3.0), (0.5, 0.8, 4.0), (-1.0, 1.5, 6.0)])
def test_sigma_distribution_matches_closed_form(mean, std, shift):
    n = 200_000
    g = torch.Generator().manual_seed(0)
    sigma = sample_sigmas(n, mean, std, shift, generator=g).double().numpy()
    assert sigma.shape == (n,) and (sigma > 0).all() and (sigma < 1).all()
    # Mean within 5 standard errors.
    expected_mean = _closed_form_mean(mean, std, shift)
    assert abs(sigma.mean() - expected_mean) < 5 * sigma.std() / math.sqrt(n)
    # Quantiles: the empirical q-quantile's standard error is sqrt(q(1-q)/n) / density; use a tolerance in
    # probability instead: the closed-form quantile's empirical CDF is within 5 sqrt(q(1-q)/n) of q.
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        x = _closed_form_quantile(q, mean, std, shift)
        assert abs((sigma <= x).mean() - q) < 5 * math.sqrt(q * (1 - q) / n), q


def test_shift_is_the_sd3_formula_and_fixes_the_ends():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)


def test_sample_sigmas_is_reproducible_from_the_generator():
    a = sample_sigmas(8, shift=3.0, generator=torch.Generator().manual_seed(1))
    b = sample_sigmas(8, shift=3.0, generator=torch.Generator().manual_seed(1))
    c = sample_sigmas(8, shift=3.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_caption_dropout_rate_and_replacement():
    B, L, D, p = 20_000, 3, 4, 0.1
    text = torch.randn(B, L, D)
    null = torch.randn(1, L, D)
    out, dropped = drop_captions(text, null, p, torch.Generator().manual_seed(0))
    rate = dropped.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / B)
    assert torch.equal(out[dropped], null.expand(int(dropped.sum()), L, D))
    assert torch.equal(out[~dropped], text[~dropped])
    assert not drop_captions(text, null, 0.0)[1].any() and drop_captions(text, null, 1.0)[1].all()


class _Recorder(torch.nn.Module):
    """A 'model' that remembers its inputs and returns a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t, text, mask):
        self.calls.append((x.detach().clone(), t.detach().clone(), text.detach().clone(), mask.clone()))
        return self.scale * x + t.view(-1, 1, 1, 1)


def test_loss_is_mse_of_velocity_on_the_interpolant():
    B, C, H, W, L, D = 6, 4, 3, 5, 7, 8
    g0 = torch.Generator().manual_seed(0)
    x0, text, null = torch.randn(B, C, H, W, generator=g0), torch.randn(B, L, D, generator=g0), torch.randn(1, L, D)
    mask = torch.ones(B, L, dtype=torch.long)
    model = _Recorder()
    kwargs = dict(flow_shift=3.0, logit_mean=0.2, logit_std=0.9, caption_dropout=0.5)
    loss = flow_matching_loss(model, x0, text, mask, null, torch.Generator().manual_seed(5), **kwargs)

    # The same draws, in the documented order: sigma, noise, dropout.
    g = torch.Generator().manual_seed(5)
    sigma = sample_sigmas(B, 0.2, 0.9, 3.0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    expected_text, dropped = drop_captions(text, null, 0.5, g)
    x_t = (1 - sigma.view(B, 1, 1, 1)) * x0 + sigma.view(B, 1, 1, 1) * noise
    (seen_x, seen_t, seen_text, seen_mask) = model.calls[0]
    torch.testing.assert_close(seen_t, sigma)
    torch.testing.assert_close(seen_x, x_t)
    assert torch.equal(seen_text, expected_text) and torch.equal(seen_mask, mask)
    assert 0 < dropped.sum() < B  # with p = 0.5 and this seed, both kinds occur
    v_pred = 0.5 * x_t + sigma.view(B, 1, 1, 1)
    expected = ((v_pred - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.scale.grad is not None and model.scale.grad.abs() > 0


def test_loss_is_zero_for_the_oracle_velocity():
    """A model that knows x0 recovers v = noise - x0 from x_t exactly: (x_t - x0) / sigma = noise - x0."""
    B = 4
    x0 = torch.randn(B, 2, 3, 3)

    def oracle(x_t, sigma, text, mask):
        s = sigma.view(-1, 1, 1, 1)
        return (x_t - x0) / s

    null = torch.zeros(1, 2, 5)
    loss = flow_matching_loss(oracle, x0, torch.randn(B, 2, 5), torch.ones(B, 2), null, torch.Generator())
    assert loss.item() < 1e-10
