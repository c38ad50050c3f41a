"""CAME against a direct transcription of the paper's Algorithm 1, the learning-rate schedule in closed form,
AdamW construction and the EMA."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sana.train.config import LRSchedule, OptimConfig, OptimizerKind, ScheduleConfig
from sana.train.optim import CAME, EMA, build_optimizer, factored_shape, lr_at

BETAS, EPS, D = (0.9, 0.999, 0.9999), (1e-30, 1e-16), 1.0


def _rms(x):
    return math.sqrt(float((x**2).sum()) / x.numel())


def paper_came_factored(theta, grads, lr, betas=BETAS, eps=EPS, d=D):
    """Algorithm 1 of Luo et al. 2023 for an (n, m) matrix, written with sums as in the paper (float64)."""
    b1, b2, b3 = betas
    e1, e2 = eps
    n, m = theta.shape
    ones_n, ones_m = torch.ones(n, 1, dtype=theta.dtype), torch.ones(m, 1, dtype=theta.dtype)
    r, c = torch.zeros(n, 1, dtype=theta.dtype), torch.zeros(1, m, dtype=theta.dtype)
    R, C = torch.zeros(n, 1, dtype=theta.dtype), torch.zeros(1, m, dtype=theta.dtype)
    mom = torch.zeros_like(theta)
    theta = theta.clone()
    for G in grads:
        sq = G**2 + e1 * ones_n @ ones_m.T
        r = b2 * r + (1 - b2) * sq @ ones_m  # row sums
        c = b2 * c + (1 - b2) * ones_n.T @ sq  # column sums
        v = r @ c / (ones_n.T @ r)
        u = G / v.sqrt()
        u_hat = u / max(1.0, _rms(u) / d)
        mom = b1 * mom + (1 - b1) * u_hat
        U = (u_hat - mom) ** 2 + e2 * ones_n @ ones_m.T
        R = b3 * R + (1 - b3) * U @ ones_m
        C = b3 * C + (1 - b3) * ones_n.T @ U
        S = R @ C / (ones_n.T @ R)
        theta = theta - lr / S.sqrt() * mom
    return theta


def reference_came_vector(theta, grads, lr, betas=BETAS, eps=EPS, d=D):
    """The authors' implementation for unfactored parameters: full v, clipped update, momentum step."""
    b1, b2, _ = betas
    v, mom, theta = torch.zeros_like(theta), torch.zeros_like(theta), theta.clone()
    for G in grads:
        v = b2 * v + (1 - b2) * (G**2 + eps[0])
        u = G / v.sqrt()
        u = u / max(1.0, _rms(u) / d)
        mom = b1 * mom + (1 - b1) * u
        theta = theta - lr * mom
    return theta


def _run_ours(theta0, grads, lr, **kwargs):
    p = torch.nn.Parameter(theta0.clone())
    opt = CAME([p], lr=lr, **kwargs)
    for G in grads:
        p.grad = G.clone().reshape(p.shape)
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (8, 1)])
def test_came_matches_paper_algorithm_for_matrices(shape):
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(shape, generator=g, dtype=torch.float64)
    # Gradients of varying scale, so that both clipped and unclipped updates occur.
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) * s for s in (1.0, 0.01, 3.0, 0.5, 1e-3, 2.0)]
    ours, opt = _run_ours(theta0, grads, lr=0.05)
    expected = paper_came_factored(theta0, grads, lr=0.05)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert "exp_avg_sq_row" in opt.state[next(iter(opt.state))]


def test_came_factors_1x1_convolutions_like_matrices():
    g = torch.Generator().manual_seed(1)
    theta0 = torch.randn(6, 4, 1, 1, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, 4, 1, 1, generator=g, dtype=torch.float64) for _ in range(4)]
    ours, opt = _run_ours(theta0, grads, lr=0.02)
    expected = paper_came_factored(theta0.view(6, 4), [G.view(6, 4) for G in grads], lr=0.02)
    torch.testing.assert_close(ours.view(6, 4), expected, rtol=1e-10, atol=1e-12)
    state = next(iter(opt.state.values()))
    assert state["exp_avg_sq_row"].shape == (6,) and state["exp_avg_sq_col"].shape == (4,)


@pytest.mark.parametrize("shape", [(7,), (4, 1, 3, 3), (2, 3, 4)])
def test_came_keeps_full_moments_for_vectors_and_3x3_convs(shape):
    assert factored_shape(shape) is None
    g = torch.Generator().manual_seed(2)
    theta0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) * s for s in (1.0, 0.1, 2.0)]
    ours, opt = _run_ours(theta0, grads, lr=0.1)
    torch.testing.assert_close(ours, reference_came_vector(theta0, grads, lr=0.1), rtol=1e-10, atol=1e-12)
    assert next(iter(opt.state.values()))["exp_avg_sq"].shape == shape


def test_came_weight_decay_is_decoupled():
    theta0 = torch.ones(3, dtype=torch.float64)
    grads = [torch.zeros(3, dtype=torch.float64)]
    ours, _ = _run_ours(theta0, grads, lr=0.1, weight_decay=0.5)
    # Zero gradient: update 0, so only the decay acts: theta (1 - lr wd).
    torch.testing.assert_close(ours, theta0 * (1 - 0.05))


def test_came_minimises_a_quadratic():
    """Least squares with an exact solution: the loss goes to ~0 and the weights to the solution."""
    torch.manual_seed(0)
    A, W_true, b_true = torch.randn(32, 8), torch.randn(8, 4), torch.randn(4)
    target = A @ W_true + b_true
    W, b = torch.nn.Parameter(torch.zeros(8, 4)), torch.nn.Parameter(torch.zeros(4))
    opt = CAME([W, b], lr=0.02)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = ((A @ W + b - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-6 * losses[0]
    assert all(later <= 1.5 * earlier for earlier, later in zip(losses[::20], losses[20::20], strict=False))
    torch.testing.assert_close(W.detach(), W_true, atol=1e-3, rtol=0)


def test_came_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 5), (5,), (3, 2, 1, 1)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    opt = CAME(params, lr=0.01)
    for step in range(3):
        for p, G in zip(params, grads[step], strict=True):
            p.grad = G.clone()
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())  # state_dict() holds references to live tensors
    for step in range(3, 6):
        for p, G in zip(params, grads[step], strict=True):
            p.grad = G.clone()
        opt.step()
    final = [p.detach().clone() for p in params]

    params2 = [torch.nn.Parameter(v.clone()) for v in saved_params]
    opt2 = CAME(params2, lr=0.01)
    opt2.load_state_dict(saved_state)
    for step in range(3, 6):
        for p, G in zip(params2, grads[step], strict=True):
            p.grad = G.clone()
        opt2.step()
    for a, b in zip(final, params2, strict=True):
        assert torch.equal(a, b.detach())


def test_came_updates_bf16_parameters_through_fp32_statistics():
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    p.grad = torch.full((4, 4), 0.5, dtype=torch.bfloat16)
    opt = CAME([p], lr=0.1)
    opt.step()
    assert p.dtype == torch.bfloat16 and (p < 1).all()
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_came_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs in (dict(lr=0), dict(betas=(0.9, 0.999)), dict(eps=(1e-30,)), dict(clip_threshold=0)):
        with pytest.raises(ValueError):
            CAME(p, **kwargs)


def test_build_optimizer_defaults():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    came = build_optimizer(p, OptimConfig())
    assert isinstance(came, CAME)
    assert came.defaults["betas"] == (0.9, 0.999, 0.9999) and came.defaults["eps"] == (1e-30, 1e-16)
    assert came.defaults["clip_threshold"] == 1.0 and came.defaults["weight_decay"] == 0.0
    adamw = build_optimizer(p, OptimConfig(optimizer=OptimizerKind.ADAMW, weight_decay=0.03, lr=2e-4))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.9, 0.999) and adamw.defaults["eps"] == 1e-10
    assert adamw.defaults["weight_decay"] == 0.03 and adamw.defaults["lr"] == 2e-4
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([], OptimConfig())


def test_lr_schedule_closed_form():
    constant = ScheduleConfig(max_steps=100, warmup_steps=10, lr_schedule=LRSchedule.CONSTANT)
    assert [lr_at(s, 1e-4, constant) for s in (0, 1, 5, 10, 50, 99)] == pytest.approx(
        [0.0, 1e-5, 5e-5, 1e-4, 1e-4, 1e-4]
    )
    cosine = ScheduleConfig(max_steps=110, warmup_steps=10, lr_schedule=LRSchedule.COSINE, min_lr_ratio=0.1)
    # progress p = (step - 10) / 100; lr = 2 (0.1 + 0.9 (1 + cos(pi p)) / 2)
    assert lr_at(5, 2.0, cosine) == pytest.approx(1.0)
    assert lr_at(10, 2.0, cosine) == pytest.approx(2.0)
    assert lr_at(60, 2.0, cosine) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at(35, 2.0, cosine) == pytest.approx(2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2))
    assert lr_at(110, 2.0, cosine) == pytest.approx(0.2)
    assert lr_at(500, 2.0, cosine) == pytest.approx(0.2)  # held at the floor past max_steps
    no_warmup = ScheduleConfig(max_steps=10, warmup_steps=0)
    assert lr_at(0, 3e-4, no_warmup) == 3e-4


def test_ema_update_swap_and_state():
    p = {"w": torch.nn.Parameter(torch.zeros(3))}
    ema = EMA(p, decay=0.9)
    with torch.no_grad():
        p["w"].fill_(1.0)
    ema.update(p)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 0.1))
    ema.update(p)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 0.19))
    ema.swap(p)
    torch.testing.assert_close(p["w"].detach(), torch.full((3,), 0.19))
    ema.swap(p)
    torch.testing.assert_close(p["w"].detach(), torch.ones(3))
    other = EMA(p, decay=0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["w"], torch.full((3,), 0.19))
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({})
