"""Schedules, solvers and guidance for Sana's flow-matching models.

Flow parameterisation (rectified flow, as Sana is trained): x_t = (1 - sigma) x0 + sigma noise, the model
predicts the velocity v = noise - x0, so the data prediction is x0 = x_t - sigma v. sigma = 1 is pure noise,
0 is data.

The solvers see the model only as ``velocity(x, sigma) -> v`` with x a float32 (B, C, H, W) tensor and sigma a
Python float taken from the schedule; they never know the model, and the model never knows its solver.
The velocity must not modify x in place. Solver state arithmetic is float32 whatever the model dtype (the
velocity's output is cast with ``.float()``), as diffusers does. A solver calls ``callback(step, x, x0)``
after each step, with step = 0, 1, ..., the new state x and the step's data prediction x0. The numbers equal
diffusers 0.42.1 (``DPMSolverMultistepScheduler``, ``FlowMatchEulerDiscreteScheduler``, ``SCMScheduler`` as
the Sana pipelines drive them); the tests check it.

Guidance wraps the model function: ``classifier_free_guidance(batched_velocity, scale)`` returns a velocity.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

Velocity = Callable[[Tensor, float], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]
RNG = torch.Generator | list[torch.Generator] | None

NUM_TRAIN_TIMESTEPS = 1000  # the training schedule's length; the transformer's timestep is 1000 sigma
SCM_MAX_T = 1.57080  # sCM/TrigFlow start angle used by SANA-Sprint (just above pi/2, as released)
SCM_INTERMEDIATE_T = 1.3  # the middle angle of the released 2-step Sprint schedule
SIGMA_DATA = 0.5  # TrigFlow data standard deviation of SANA-Sprint


# --------------------------------------------------------------------------------------------------------
# Schedules: pure functions, (steps + 1,) from noise down to 0.


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_shift(flow_shift: float) -> None:
    if not (math.isfinite(flow_shift) and flow_shift > 0):
        raise ValueError(f"flow_shift must be a finite number > 0, got {flow_shift!r}")


def shift_sigmas(sigmas: Tensor, flow_shift: float) -> Tensor:
    """SD3 time shift (Esser et al. 2024, §5.3.2): sigma' = s sigma / (1 + (s - 1) sigma), sigmas' dtype."""
    _check_shift(flow_shift)
    return flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas)


def flow_sigmas(steps: int, flow_shift: float) -> Tensor:
    """Flow-DPM-Solver schedule (Sana, Alg. 1): shifted time-uniform linspace(0.999, 0), float64 (steps+1,).

    Equals diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=flow_shift).sigmas``
    (which rounds them to float32, as the solver does): the first entry is shift(0.999), 0.99967 for shift 3,
    never 1; the last is exactly 0. Keep the float64 values: the transformer's timestep is truncated from
    them (see :func:`model_timestep`), and truncating the float32 values differs for some (steps, shift).
    """
    _check_steps(steps)
    t = 1.0 - np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)  # 0, ..., 0.999
    sigmas = shift_sigmas(torch.from_numpy(t), flow_shift).flip(0)  # shift(0.999), ..., 0
    return torch.cat([sigmas[:-1], sigmas.new_zeros(1)])  # the final sigma is exactly 0


def euler_sigmas(steps: int, flow_shift: float) -> Tensor:
    """Flow-Euler schedule of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=...)``, float64 (steps+1,).

    As there: the end points are the shifted training sigmas 1 and 1/1000 (computed in float32), the N sigmas
    are spaced linearly between them and shifted a second time (the last nonzero sigma is
    shift(shift(1/1000)), 0.0089 for shift 3), and 0 is appended. The first entry is 1. diffusers rounds them
    to float32, as the solver does.
    """
    _check_steps(steps)
    ends = shift_sigmas(torch.tensor([NUM_TRAIN_TIMESTEPS, 1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS, flow_shift)
    sigma_max, sigma_min = ends.tolist()
    t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    sigmas = shift_sigmas(torch.from_numpy(t / NUM_TRAIN_TIMESTEPS), flow_shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def scm_timesteps(steps: int, max_t: float = SCM_MAX_T, intermediate: float | None = SCM_INTERMEDIATE_T) -> Tensor:
    """TrigFlow angles of SANA-Sprint's ``SCMScheduler``, float32 (steps + 1,) from max_t down to 0.

    Two steps give [max_t, intermediate, 0] (the released schedule); otherwise, or with intermediate=None,
    linspace(max_t, 0, steps + 1). ``intermediate`` is only used for 2 steps (diffusers raises for other step
    counts unless it is None; here it is ignored, since no single middle angle defines a longer schedule).
    """
    _check_steps(steps)
    if not (math.isfinite(max_t) and max_t > 0):
        raise ValueError(f"max_t must be a finite angle > 0, got {max_t!r}")
    if steps == 2 and intermediate is not None:
        if not 0 < intermediate < max_t:
            raise ValueError(f"intermediate must lie in (0, max_t={max_t}), got {intermediate!r}")
        return torch.tensor([max_t, intermediate, 0.0], dtype=torch.float32)
    return torch.linspace(max_t, 0.0, steps + 1, dtype=torch.float32)


def model_timestep(sigma: float, solver: Callable) -> float:
    """The timestep (0..1000 scale) diffusers' SanaPipeline feeds the transformer at sigma, for ``solver``.

    flow_dpm_solver: the integer floor(1000 sigma) of the float64 sigma (DPMSolverMultistepScheduler's int64
    timesteps). flow_euler: 1000 sigma in float32, not truncated (FlowMatchEulerDiscreteScheduler). scm has no
    such timestep: its velocity receives the flow time t_f itself, which SanaSprintPipeline feeds unscaled.
    """
    if solver is flow_dpm_solver:
        return float(math.floor(sigma * NUM_TRAIN_TIMESTEPS))
    if solver is flow_euler:
        return (torch.tensor(sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS).item()
    raise ValueError(f"model_timestep knows flow_dpm_solver and flow_euler, got {solver!r}")


# --------------------------------------------------------------------------------------------------------
# Solvers.


def _check_schedule(values: Tensor | Sequence[float], name: str) -> tuple[Tensor, list[float]]:
    """Validate a decreasing 1-D schedule; return it as float32 (solver arithmetic) and as Python floats."""
    values = torch.as_tensor(values)
    if not values.is_floating_point():
        values = values.to(torch.float64)
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"{name} must be finite and strictly decreasing, got {values.tolist()}")
    if values[-1] < 0:
        raise ValueError(f"{name} must end >= 0, got {values[-1].item()}")
    return values.detach().to("cpu", torch.float32), values.tolist()


def _check_sigmas(sigmas: Tensor | Sequence[float]) -> tuple[Tensor, list[float]]:
    sig, floats = _check_schedule(sigmas, "sigmas")
    if sig[0] > 1:
        raise ValueError(f"sigmas must lie in [0, 1], got first sigma {floats[0]}")
    return sig, floats


def _log_snr(sigma: Tensor) -> Tensor:
    """Half log-SNR of the flow schedule: lambda = log(alpha / sigma), alpha = 1 - sigma (+inf at sigma 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def flow_dpm_solver(
    velocity: Velocity,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    callback: Callback | None = None,
) -> Tensor:
    """Flow-DPM-Solver (Sana, Alg. 1): DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on x0 = x - sigma v.

    First order at the first step and at the last step (diffusers' ``lower_order_final`` with final sigma 0),
    second order (midpoint form) in between; one velocity evaluation per step, never at sigma = 0. Returns
    the state at sigmas[-1]: the last data prediction when the schedule ends at 0 (that step gives x = x0).
    Equals diffusers' scheduler loop, except that a step counter replaces its timestep lookup: when the first
    two truncated timesteps are equal (from 201 steps at shift 6, 335 at shift 4, 501 at shift 3) diffusers
    starts at the second sigma and fails with an IndexError at the last step; this solver runs them all.
    """
    sig, sigma_floats = _check_sigmas(sigmas)
    steps = len(sig) - 1
    x = noise.to(torch.float32)
    x0_prev = None
    for i in range(steps):
        sigma_cur, sigma_next = sig[i], sig[i + 1]
        x0 = x - sigma_cur * velocity(x, sigma_floats[i]).float()
        h = _log_snr(sigma_next) - _log_snr(sigma_cur)
        phi = (1 - sigma_next) * (torch.exp(-h) - 1.0)  # alpha_next (e^-h - 1)
        # First-order (DDIM-like) step; at sigma_next = 0, h = inf and this is exactly x0.
        x_next = (sigma_next / sigma_cur) * x - phi * x0
        if x0_prev is not None and i < steps - 1:
            # Second-order midpoint correction from the previous data prediction: D1 = (x0 - x0_prev) / r.
            r = (_log_snr(sigma_cur) - _log_snr(sig[i - 1])) / h
            x_next = x_next - 0.5 * phi * ((1.0 / r) * (x0 - x0_prev))
        x, x0_prev = x_next, x0
        if callback is not None:
            callback(i, x, x0)
    return x


def flow_euler(
    velocity: Velocity,
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    callback: Callback | None = None,
) -> Tensor:
    """Flow-Euler: explicit Euler on the probability-flow ODE dx/dsigma = v (Lipman et al. 2023).

    x <- x + (sigma_next - sigma) v; returns the state at sigmas[-1]. Equals diffusers'
    ``FlowMatchEulerDiscreteScheduler`` loop.
    """
    sig, sigma_floats = _check_sigmas(sigmas)
    x = noise.to(torch.float32)
    for i in range(len(sig) - 1):
        sigma_cur, sigma_next = sig[i], sig[i + 1]
        v = velocity(x, sigma_floats[i]).float()
        x0 = x - sigma_cur * v if callback is not None else None
        x = x + (sigma_next - sigma_cur) * v
        if callback is not None:
            callback(i, x, x0)
    return x


def randn(shape: torch.Size, generator: RNG, device: torch.device) -> Tensor:
    """Standard normal float32 noise, drawn as diffusers' ``randn_tensor`` draws it (same generator use)."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    first = generator[0] if isinstance(generator, list) else generator
    # A CPU generator draws on the CPU and the noise is moved; any other draws on the target device.
    draw_device = "cpu" if first is not None and first.device.type == "cpu" else device
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(shape, generator=generator, device=draw_device).to(device)


def scm(
    velocity: Velocity,
    noise: Tensor,
    timesteps: Tensor | Sequence[float],
    sigma_data: float = SIGMA_DATA,
    generator: RNG = None,
    callback: Callback | None = None,
) -> Tensor:
    """sCM multistep sampler of SANA-Sprint (TrigFlow consistency model, Lu & Song 2024) on a flow model.

    ``velocity(x_flow, t_flow)`` is the ordinary flow model (the model never knows its solver). At each angle
    s: t_flow = sin s / (sin s + cos s), norm = sqrt(t_flow^2 + (1 - t_flow)^2), x_flow = (x / sigma_d) norm,
    and the velocity v becomes the TrigFlow output
    F = sigma_d ((1 - 2 t_flow) x_flow + (1 - 2 t_flow + 2 t_flow^2) v) / norm. Then x0 = cos(s) x - sin(s) F
    and the next state x = cos(t) x0 + sin(t) sigma_d z, with fresh z ~ N(0, I) drawn from ``generator`` at
    every step, the last included (diffusers consumes the RNG likewise). ``noise`` is standard normal; the
    start state is noise * sigma_d.

    Returns the last x0 divided by sigma_d: the latent in the flow model's scale, which SanaSprintPipeline
    decodes. The callback gets (step, TrigFlow state x, x0 / sigma_d). Equals diffusers' SanaSprintPipeline
    loop with SCMScheduler for the same generator state (scalars computed on x's device, as there).
    """
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
    angles, _ = _check_schedule(timesteps, "timesteps")
    angles = angles.to(noise.device)
    x = noise.to(torch.float32) * sigma_data
    x0 = x
    for i in range(len(angles) - 1):
        s, t = angles[i], angles[i + 1]
        t_flow = torch.sin(s) / (torch.cos(s) + torch.sin(s))
        norm = torch.sqrt(t_flow**2 + (1 - t_flow) ** 2)
        x_flow = (x / sigma_data) * norm
        v = velocity(x_flow, t_flow.item()).float()
        trig = ((1 - 2 * t_flow) * x_flow + (1 - 2 * t_flow + 2 * t_flow**2) * v) / norm * sigma_data
        x0 = torch.cos(s) * x - torch.sin(s) * trig
        z = randn(x.shape, generator, x.device) * sigma_data
        x = torch.cos(t) * x0 + torch.sin(t) * z
        if callback is not None:
            callback(i, x, x0 / sigma_data)
    return x0 / sigma_data


# --------------------------------------------------------------------------------------------------------
# Guidance: wrappers that turn a batched model function into a velocity.


def classifier_free_guidance(batched_velocity: Velocity, scale: float) -> Velocity:
    """Classifier-free guidance (Ho & Salimans 2022): v = v_u + scale (v_c - v_u), in float32.

    ``batched_velocity(x2, sigma)`` evaluates the doubled batch [x, x] with the conditions [uncond, cond]
    (negative prompt first, as diffusers) and returns their velocities in that order. The wrapper always
    doubles the batch: skipping guidance when scale <= 1 (as diffusers does) is the caller's choice.
    """

    def guided(x: Tensor, sigma: float) -> Tensor:
        v_uncond, v_cond = batched_velocity(torch.cat([x, x]), sigma).float().chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def perturbed_attention_guidance(
    batched_velocity: Velocity, pag_scale: float, cfg_scale: float | None = None
) -> Velocity:
    """Perturbed-attention guidance (Ahn et al. 2024) combined with CFG as in diffusers' SanaPAGPipeline.

    With cfg_scale: the tripled batch [uncond, cond, perturbed], v = v_u + cfg (v_c - v_u) + pag (v_c - v_p).
    With cfg_scale None: the 2-way batch [cond, perturbed] and v = v_c + pag (v_c - v_p). diffusers turns CFG
    on when its guidance scale is > 1; the caller passes None otherwise. Only the combination lives here: the
    model function must perturb the attention of the last chunk itself (pag_adaptive_scale 0).
    """

    def guided(x: Tensor, sigma: float) -> Tensor:
        if cfg_scale is None:
            v_cond, v_perturbed = batched_velocity(torch.cat([x, x]), sigma).float().chunk(2)
            return v_cond + pag_scale * (v_cond - v_perturbed)
        v_uncond, v_cond, v_perturbed = batched_velocity(torch.cat([x, x, x]), sigma).float().chunk(3)
        return v_uncond + cfg_scale * (v_cond - v_uncond) + pag_scale * (v_cond - v_perturbed)

    return guided
