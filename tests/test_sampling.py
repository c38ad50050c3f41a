"""sana.sampling against diffusers' schedulers (the oracle) and against closed-form answers."""

import ast
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler

from sana import sampling
from sana.sampling import (
    classifier_free_guidance,
    euler_sigmas,
    flow_dpm_solver,
    flow_euler,
    flow_sigmas,
    model_timestep,
    perturbed_attention_guidance,
    scm,
    scm_timesteps,
    shift_sigmas,
)

STEPS = [1, 2, 5, 20, 28]
SHIFTS = [1.0, 3.0, 4.0, 6.0]
SHAPE = (2, 4, 6, 6)


def dpm_scheduler(shift: float) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")


def field(x: torch.Tensor, timestep: float) -> torch.Tensor:
    """A synthetic velocity, nonlinear in x and in the model timestep (0..1000 scale)."""
    tau = timestep / 1000
    return torch.tanh(1.5 * x) * (0.5 + tau) + 0.3 * math.sin(3 * tau) * x**2 - 0.2 * x.roll(1, -1)


def noise_like(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_flow_sigmas_match_dpm_scheduler(steps, shift):
    sched = dpm_scheduler(shift)
    sched.set_timesteps(steps)
    ours = flow_sigmas(steps, shift)
    assert ours.dtype == torch.float64 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours.float(), sched.sigmas, atol=1e-6, rtol=0)
    # The transformer's truncated timestep, taken from the float64 sigmas, is diffusers' integer timestep.
    expected = sched.timesteps.tolist()
    assert [model_timestep(s, flow_dpm_solver) for s in ours[:-1].tolist()] == expected


def test_model_timestep_truncates_the_float64_sigma():
    # 3 steps, shift 1: the float64 sigma 0.333 is 0.33299999.. (timestep 332); in float32 it gives 333.
    sched = dpm_scheduler(1.0)
    sched.set_timesteps(3)
    sigmas = flow_sigmas(3, 1.0)
    from_float32 = [int(t) for t in (sigmas[:-1].float() * 1000).tolist()]
    assert from_float32 != sched.timesteps.tolist()  # the trap this API avoids
    assert [model_timestep(s, flow_dpm_solver) for s in sigmas[:-1].tolist()] == sched.timesteps.tolist()


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_sigmas_match_flow_match_scheduler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = euler_sigmas(steps, shift)
    assert ours.dtype == torch.float64 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours.float(), sched.sigmas, atol=1e-6, rtol=0)
    timesteps = [model_timestep(s, flow_euler) for s in ours[:-1].tolist()]
    assert timesteps == sched.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_scm_timesteps_match_scm_scheduler(steps):
    sched = SCMScheduler()
    sched.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    ours = scm_timesteps(steps)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, sched.timesteps)
    sched.set_timesteps(steps, intermediate_timesteps=None)
    assert torch.equal(scm_timesteps(steps, intermediate=None), sched.timesteps)


def test_schedules_closed_form():
    s = 3.0
    sigmas = flow_sigmas(20, s)
    assert sigmas[0].item() == pytest.approx(s * 0.999 / (1 + (s - 1) * 0.999), abs=1e-12)  # 0.999666...
    assert sigmas[0].item() == pytest.approx(0.9996664, abs=1e-7)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # Unshifted, the schedule is linspace(0.999, 0) exactly.
    torch.testing.assert_close(flow_sigmas(4, 1.0), torch.linspace(0.999, 0.0, 5, dtype=torch.float64))
    euler = euler_sigmas(20, s)
    assert euler[0].item() == 1.0 and euler[-1].item() == 0.0
    shifted_min = s * 1e-3 / (1 + (s - 1) * 1e-3)
    assert euler[-2].item() == pytest.approx(s * shifted_min / (1 + (s - 1) * shifted_min), rel=1e-6)  # 0.00893
    assert scm_timesteps(2).tolist() == pytest.approx([1.5708, 1.3, 0.0])
    assert scm_timesteps(4).tolist() == pytest.approx([1.5708 * k / 4 for k in (4, 3, 2, 1, 0)])


def test_shift_sigmas_closed_form():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(t, 1.0), t)
    for s in (0.5, 3.0, 6.0):
        shifted = shift_sigmas(t, s)
        assert shifted[0].item() == 0.0 and shifted[-1].item() == pytest.approx(1.0)
        assert shifted[5].item() == pytest.approx(s / (1 + s))  # sigma = 1/2
    assert shift_sigmas(t, 3.0).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------
# Solvers against the diffusers scheduler loops


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 20])
def test_flow_dpm_solver_matches_diffusers(steps, shift):
    noise = noise_like()
    sched = dpm_scheduler(shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(field(x, float(t)), t, x, return_dict=False)[0]

    def velocity(x, sigma):
        return field(x, model_timestep(sigma, flow_dpm_solver))

    ours = flow_dpm_solver(velocity, noise, flow_sigmas(steps, shift))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 2, 5, 28])
def test_flow_euler_matches_diffusers(steps, shift):
    noise = noise_like(1)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(field(x, float(t)), t, x, return_dict=False)[0]

    def velocity(x, sigma):
        return field(x, model_timestep(sigma, flow_euler))

    ours = flow_euler(velocity, noise, euler_sigmas(steps, shift))
    torch.testing.assert_close(ours, x, atol=1e-6, rtol=0)


def test_second_order_steps_change_the_result():
    """The DPM solver is not Euler on the same schedule (its midpoint correction is live)."""
    noise = noise_like(2)

    def velocity(x, sigma):
        return field(x, 1000 * sigma)

    dpm = flow_dpm_solver(velocity, noise, flow_sigmas(5, 3.0))
    euler = flow_euler(velocity, noise, flow_sigmas(5, 3.0))
    assert (dpm - euler).abs().max() > 1e-3
    # With two steps both orders are first order, and the first-order DPM step is the Euler step.
    torch.testing.assert_close(
        flow_dpm_solver(velocity, noise, flow_sigmas(2, 3.0)),
        flow_euler(velocity, noise, flow_sigmas(2, 3.0)),
        atol=1e-5,
        rtol=0,
    )


def flow_velocity(x: torch.Tensor, t_flow: float) -> torch.Tensor:
    return field(x, 1000 * t_flow)


def diffusers_sprint_loop(steps: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """SanaSprintPipeline's denoising loop with SCMScheduler, on a synthetic flow model."""
    sched = SCMScheduler()
    sched.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    sched.set_begin_index(0)
    sigma_data = sched.config.sigma_data
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=generator) * sigma_data
    for t in sched.timesteps[:-1]:
        timestep = t.expand(SHAPE[0])
        scm_t = (torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))).view(-1, 1, 1, 1)
        x_in = latents / sigma_data * torch.sqrt(scm_t**2 + (1 - scm_t) ** 2)
        v = flow_velocity(x_in, scm_t[0].item())
        trig = ((1 - 2 * scm_t) * x_in + (1 - 2 * scm_t + 2 * scm_t**2) * v) / torch.sqrt(scm_t**2 + (1 - scm_t) ** 2)
        trig = trig.float() * sigma_data
        latents, denoised = sched.step(trig, timestep, latents, generator=generator, return_dict=False)
    return denoised / sigma_data, generator


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_matches_diffusers_sprint(steps):
    expected, their_generator = diffusers_sprint_loop(steps, seed=7)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(SHAPE, generator=generator)
    ours = scm(flow_velocity, noise, scm_timesteps(steps), generator=generator)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    # Fresh noise is drawn at every step, the last included: both generators are in the same state.
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=their_generator))


# ---------------------------------------------------------------------------------------------------------
# Closed form: all the data at one point x0*, whose exact velocity is v(x, t) = (x - x0*) / t


def point_mass(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_solvers_recover_a_point_mass(steps):
    target, noise = point_mass()

    def velocity(x, sigma):
        return (x - target) / sigma

    seen = []
    for solver, sigmas in (
        (flow_dpm_solver, flow_sigmas(steps, 3.0)),
        (flow_euler, euler_sigmas(steps, 3.0)),
    ):
        out = solver(velocity, noise, sigmas, callback=lambda i, x, x0: seen.append(x0))
        torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    assert len(seen) == 2 * steps
    for x0 in seen:
        torch.testing.assert_close(x0, target, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_recovers_a_point_mass(steps):
    target, noise = point_mass(4)

    def velocity(x_flow, t_flow):
        return (x_flow - target) / t_flow

    out = scm(velocity, noise, scm_timesteps(steps), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Callbacks, dtypes, guidance


@pytest.mark.parametrize("solver", [flow_dpm_solver, flow_euler])
def test_callback_once_per_step(solver):
    noise = noise_like()
    calls = []

    def callback(step, x, x0):
        calls.append((step, x.clone(), x0.clone()))

    out = solver(lambda x, sigma: field(x, 1000 * sigma), noise, flow_sigmas(6, 3.0), callback=callback)
    assert [c[0] for c in calls] == list(range(6))
    assert torch.equal(calls[-1][1], out)
    assert all(c[1].shape == SHAPE and c[2].shape == SHAPE for c in calls)


def test_scm_callback_once_per_step():
    calls = []
    out = scm(
        flow_velocity,
        noise_like(),
        scm_timesteps(4),
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, x, x0: calls.append((i, x0)),
    )
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert torch.equal(calls[-1][1], out)


def test_solvers_run_in_float32_for_a_bf16_model():
    noise = noise_like().to(torch.bfloat16)
    dtypes = []

    def velocity(x, sigma):
        dtypes.append(x.dtype)
        return field(x, 1000 * sigma).to(torch.bfloat16)

    assert flow_dpm_solver(velocity, noise, flow_sigmas(3, 3.0)).dtype == torch.float32
    assert flow_euler(velocity, noise, euler_sigmas(3, 3.0)).dtype == torch.float32
    assert scm(velocity, noise, scm_timesteps(2)).dtype == torch.float32
    assert set(dtypes) == {torch.float32}


def test_classifier_free_guidance_formula():
    x = noise_like()
    seen = []

    def batched(x2, sigma):
        seen.append((x2.clone(), sigma))
        uncond, cond = x2.chunk(2)
        return torch.cat([field(uncond, 300.0), field(cond, 700.0) + sigma]).to(torch.bfloat16)

    v = classifier_free_guidance(batched, 4.5)(x, 0.25)
    assert torch.equal(seen[0][0], torch.cat([x, x])) and seen[0][1] == 0.25
    v_u = field(x, 300.0).to(torch.bfloat16).float()
    v_c = (field(x, 700.0) + 0.25).to(torch.bfloat16).float()
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), atol=0, rtol=0)


def test_perturbed_attention_guidance_formulas():
    x = noise_like()
    v_u, v_c, v_p = field(x, 100.0), field(x, 500.0), field(x, 900.0)
    sizes = []

    def batched(xk, sigma):
        sizes.append(xk.shape[0] // x.shape[0])
        parts = {3: [v_u, v_c, v_p], 2: [v_c, v_p]}[sizes[-1]]
        assert torch.equal(xk, torch.cat([x] * sizes[-1]))
        return torch.cat(parts)

    with_cfg = perturbed_attention_guidance(batched, pag_scale=3.0, cfg_scale=4.5)(x, 0.5)
    torch.testing.assert_close(with_cfg, v_u + 4.5 * (v_c - v_u) + 3.0 * (v_c - v_p), atol=0, rtol=0)
    without_cfg = perturbed_attention_guidance(batched, pag_scale=2.0)(x, 0.5)
    torch.testing.assert_close(without_cfg, v_c + 2.0 * (v_c - v_p), atol=0, rtol=0)
    assert sizes == [3, 2]


# ---------------------------------------------------------------------------------------------------------
# Invalid arguments


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: flow_sigmas(0, 3.0), "steps .* 0"),
        (lambda: flow_sigmas(2.5, 3.0), "steps .* 2.5"),
        (lambda: flow_sigmas(10, 0.0), "flow_shift .* 0.0"),
        (lambda: flow_sigmas(10, -1.0), "flow_shift .* -1.0"),
        (lambda: flow_sigmas(10, math.nan), "flow_shift .* nan"),
        (lambda: euler_sigmas(0, 3.0), "steps .* 0"),
        (lambda: euler_sigmas(4, 0.0), "flow_shift .* 0.0"),
        (lambda: scm_timesteps(0), "steps .* 0"),
        (lambda: scm_timesteps(2, intermediate=2.0), "intermediate .* 2.0"),
        (lambda: scm_timesteps(2, max_t=-1.0), "max_t .* -1.0"),
        (lambda: shift_sigmas(torch.zeros(3), 0.0), "flow_shift .* 0.0"),
        (lambda: model_timestep(0.5, scm), "model_timestep"),
    ],
)
def test_invalid_schedule_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("solver", [flow_dpm_solver, flow_euler])
@pytest.mark.parametrize(
    "sigmas, match",
    [
        ([1.0], "at least 2"),
        ([[1.0, 0.0]], "1-D"),
        ([0.5, 0.7, 0.0], "strictly decreasing"),
        ([0.5, 0.5, 0.0], "strictly decreasing"),
        ([1.5, 0.0], "first sigma 1.5"),
        ([0.5, -0.1], "-0.1"),
    ],
)
def test_invalid_sigmas(solver, sigmas, match):
    with pytest.raises(ValueError, match=match):
        solver(lambda x, s: x, noise_like(), torch.tensor(sigmas, dtype=torch.float64))


def test_invalid_scm_arguments():
    with pytest.raises(ValueError, match="sigma_data .* 0.0"):
        scm(flow_velocity, noise_like(), scm_timesteps(2), sigma_data=0.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        scm(flow_velocity, noise_like(), [0.0, 1.0])
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        scm(flow_velocity, noise_like(), scm_timesteps(1), generator=[torch.Generator() for _ in range(3)])


def test_library_does_not_import_diffusers():
    tree = ast.parse(open(sampling.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not any(name.split(".")[0] == "diffusers" for name in names)
