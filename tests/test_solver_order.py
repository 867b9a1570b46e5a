"""`DDIMSchedulerPlus(ddim_solver_order=2)`: DPM-Solver++(2M) written in DDIM form.

Checked against diffusers' own `DPMSolverMultistepScheduler` (same timesteps, same exact network), against an
independent float64 implementation of Lu et al. (2022), Algorithm 2, and for its order of convergence on a
Gaussian toy whose probability-flow ODE is solved in closed form. Order 1 must stay the paper's DDIM bit for bit.
"""

import math

import numpy as np
import pytest
import torch
from conftest import CUSTOM_TIMESTEPS
from diffusers import DPMSolverMultistepScheduler

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.ddim_math import PREDICTION_TYPES, TIMESTEP_SPACINGS
from ddim_plus.evaluation.gmm import GaussianMixture, GaussianMixtureOracle

MIXTURE = GaussianMixture.random(num_components=4, sample_shape=(1, 4, 4), seed=0)


def _noise(batch=8, seed=0):
    return torch.randn(
        batch, *MIXTURE.sample_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _sample(scheduler, model, x, **step_kwargs):
    """The loop every pipeline runs; returns the final sample and the list of predicted x_0."""
    x0s = []
    for t in scheduler.timesteps:
        out = scheduler.step(model(x, t), t, x, **step_kwargs)
        x, x0 = out.prev_sample, out.pred_original_sample
        x0s.append(x0)
    return x, x0s


def _reference_dpm_solver_pp_2m(model_x0, x, abars, first_order_steps=(), eta=0.0, noises=None, sigma_hat=False):
    """Lu et al. 2022, Algorithm 2, in float64: x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
    D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}, r_i = h_{i-1} / h_i, lambda = log(alpha / sigma).

    With noise (`eta` > 0 or `sigma_hat`), eq. 12 written with the same h and D: x_i = alpha_i D + sqrt(sigma_i^2 -
    s^2) / sigma_{i-1} (x_{i-1} - alpha_{i-1} D) + s z_i, s = eta sigma_i sqrt(1 - e^{-2h}) (= eq. 16), or
    sigma-hat with the direction term of s(eta = 1) and no noise into the last level.

    Args:
        model_x0: (x, step index) -> the (clipped) data prediction.
        abars: abar at each scheduled timestep, then the final level.
        first_order_steps: step indices that use D_i = x0_{i-1}.
        eta, noises, sigma_hat: the noise weight, the z_i, and whether s is sigma-hat.
    """
    alpha = [math.sqrt(a) for a in abars]
    sigma = [math.sqrt(1 - a) for a in abars]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    previous_x0 = None
    for i in range(len(abars) - 1):
        x0 = model_x0(x, i)
        h = lam[i + 1] - lam[i]
        if previous_x0 is None or i in first_order_steps or sigma[i + 1] == 0 or h == 0:
            d = x0  # h = 0: from t = 0 to abar_0 with set_alpha_to_one=False, a step that changes nothing
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous_x0
        if eta == 0 and not sigma_hat:
            x = d if sigma[i + 1] == 0 else sigma[i + 1] / sigma[i] * x - alpha[i + 1] * math.expm1(-h) * d
        else:
            ddpm_s = sigma[i + 1] * math.sqrt(-math.expm1(-2 * h)) if sigma[i + 1] > 0 else 0.0
            s = math.sqrt(1 - abars[i] / abars[i + 1]) if sigma_hat and i < len(abars) - 2 else eta * ddpm_s
            direction = math.sqrt(max(sigma[i + 1] ** 2 - (ddpm_s if sigma_hat else s) ** 2, 0.0))
            x = alpha[i + 1] * d + direction / sigma[i] * (x - alpha[i] * d) + s * noises[i]
        previous_x0 = x0
    return x


def _reference_for(scheduler, oracle, x, postprocess=lambda x0: x0):
    timesteps = scheduler.timesteps.tolist()
    abars = [float(scheduler.alphas_cumprod[t]) for t in timesteps] + [float(scheduler.final_alpha_cumprod)]
    steps = len(timesteps)
    first_order = {steps - 2, steps - 1} if steps < 15 else set()
    x0_oracle = GaussianMixtureOracle(oracle.mixture, oracle.alphas_cumprod, prediction_type="sample")
    return _reference_dpm_solver_pp_2m(
        lambda x, i: postprocess(x0_oracle(x, timesteps[i])), x, abars, first_order_steps=first_order
    )


# ----------------------------------------------------------------------------------------------------------------
# Order 1 is the paper's DDIM, unchanged
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_order_one_is_bit_for_bit_the_default(spacing, prediction_type, eta):
    results = []
    for extra in ({}, {"ddim_solver_order": 1}):
        scheduler = DDIMSchedulerPlus(timestep_spacing=spacing, prediction_type=prediction_type, **extra)
        scheduler.set_timesteps(10)
        oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod, prediction_type)
        results.append(
            _sample(scheduler, oracle, _noise().float(), eta=eta, generator=torch.Generator().manual_seed(1))
        )
    (x_default, x0s_default), (x_order_one, x0s_order_one) = results
    assert torch.equal(x_default, x_order_one)
    assert all(torch.equal(a, b) for a, b in zip(x0s_default, x0s_order_one))


# ----------------------------------------------------------------------------------------------------------------
# Order 2 is DPM-Solver++(2M)
# ----------------------------------------------------------------------------------------------------------------
def _step_noises(steps, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(_noise().shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


def _run_with_noises(scheduler, oracle, noises, **step_kwargs):
    x = _noise()
    for t, noise in zip(scheduler.timesteps, noises):
        x = scheduler.step(oracle(x, t), t, x, variance_noise=noise, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta, algorithm_type", [(0.0, "dpmsolver++"), (1.0, "sde-dpmsolver++")])
def test_order_two_matches_diffusers_dpm_solver_pp_2m(spacing, prediction_type, eta, algorithm_type):
    # From 15 steps on, diffusers' DPM-Solver++(2M) with a final step to sigma = 0 is first order at the first and
    # the last step only, exactly like ours; its own timestep list is replaced by ours. Its SDE variant puts the same
    # extrapolated x_0 into its first-order step, which is DDIM at eta = 1: with the same noise at every step, ours
    # at eta = 1 must agree with it.
    ours = DDIMSchedulerPlus(
        timestep_spacing=spacing, prediction_type=prediction_type, ddim_solver_order=2, clip_sample=False
    )
    ours.set_timesteps(20)
    theirs = DPMSolverMultistepScheduler(
        algorithm_type=algorithm_type,
        solver_order=2,
        solver_type="midpoint",
        prediction_type=prediction_type,
        final_sigmas_type="zero",
    )
    theirs.set_timesteps(timesteps=ours.timesteps.tolist())
    oracle = GaussianMixtureOracle(MIXTURE, ours.alphas_cumprod, prediction_type)
    noises = _step_noises(len(ours.timesteps))
    x_ours = _run_with_noises(ours, oracle, noises, eta=eta)
    # diffusers keeps abar in float32: relative differences of ~1e-6 in the coefficients
    torch.testing.assert_close(x_ours, _run_with_noises(theirs, oracle, noises), rtol=1e-4, atol=1e-4)
    # and order 2 really differs from DDIM (with the same eta and noise) at this tolerance
    ddim = DDIMSchedulerPlus(timestep_spacing=spacing, prediction_type=prediction_type, clip_sample=False)
    ddim.set_timesteps(20)
    assert (x_ours - _run_with_noises(ddim, oracle, noises, eta=eta)).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_order_two_at_zero_terminal_snr_matches_diffusers(prediction_type):
    # abar_T = 0: both floor it at 2**-24 for the log-SNR of the first step
    config = dict(rescale_betas_zero_snr=True, prediction_type=prediction_type)
    ours = DDIMSchedulerPlus(timestep_spacing="trailing", ddim_solver_order=2, clip_sample=False, **config)
    ours.set_timesteps(20)
    theirs = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **config
    )
    theirs.set_timesteps(timesteps=ours.timesteps.tolist())
    oracle = GaussianMixtureOracle(MIXTURE, ours.alphas_cumprod.clamp(min=2**-24), prediction_type)
    x_ours, _ = _sample(ours, oracle, _noise())
    x_theirs = _noise()
    for t in theirs.timesteps:
        x_theirs = theirs.step(oracle(x_theirs, t), t, x_theirs).prev_sample
    assert torch.isfinite(x_ours).all()
    torch.testing.assert_close(x_ours, x_theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0, "sigma_hat"])
@pytest.mark.parametrize("spacing", ["trailing", "quadratic", "logsnr"])
def test_order_two_at_every_eta_matches_the_log_snr_reference(eta, spacing):
    sigma_hat = eta == "sigma_hat"
    ours = DDIMSchedulerPlus(
        timestep_spacing=spacing,
        ddim_solver_order=2,
        clip_sample=False,
        sigma_type="sigma_hat" if sigma_hat else "eta",
    )
    ours.set_timesteps(20)
    oracle = GaussianMixtureOracle(MIXTURE, ours.alphas_cumprod)
    noises = _step_noises(len(ours.timesteps))
    x = _noise()
    for t, noise in zip(ours.timesteps, noises):
        x = ours.step(oracle(x, t), t, x, eta=0.0 if sigma_hat else eta, variance_noise=noise).prev_sample
    timesteps = ours.timesteps.tolist()
    abars = [float(ours.alphas_cumprod[t]) for t in timesteps] + [float(ours.final_alpha_cumprod)]
    x0_oracle = GaussianMixtureOracle(MIXTURE, ours.alphas_cumprod, prediction_type="sample")
    expected = _reference_dpm_solver_pp_2m(
        lambda x, i: x0_oracle(x, timesteps[i]),
        _noise(),
        abars,
        eta=0.0 if sigma_hat else eta,
        noises=noises,
        sigma_hat=sigma_hat,
    )
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", ["trailing", "logsnr"])
def test_order_two_with_cosine_betas_matches_reference_implementation(spacing):
    # squaredcos_cap_v2 has abar_999 = 2.4e-9 < 2**-24: its log-SNR must be used as it is (only abar = 0 is
    # floored); the step sizes h enter the 2M correction.
    scheduler = DDIMSchedulerPlus(
        beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing, ddim_solver_order=2, clip_sample=False
    )
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[0] == 999 and scheduler.alphas_cumprod[999] < 2**-24
    oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod)
    x, _ = _sample(scheduler, oracle, _noise())
    torch.testing.assert_close(x, _reference_for(scheduler, oracle, _noise()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [3, 5, 8, 14, 15])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing", ["trailing", "logsnr", "custom"])
def test_order_two_matches_reference_implementation(steps, set_alpha_to_one, spacing):
    scheduler = DDIMSchedulerPlus(
        ddim_solver_order=2,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing="trailing" if spacing == "custom" else spacing,
    )
    if spacing == "custom":
        # irregular steps: a power law in t, and for 8 steps a list with two neighbouring timesteps (601, 600)
        power_law = sorted({round(999 * (k / steps) ** 1.7) for k in range(1, steps + 1)}, reverse=True)
        scheduler.set_timesteps(timesteps=CUSTOM_TIMESTEPS if steps == 8 else power_law)
    else:
        scheduler.set_timesteps(steps)
    oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod)
    x, _ = _sample(scheduler, oracle, _noise())
    torch.testing.assert_close(x, _reference_for(scheduler, oracle, _noise()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("postprocess", ["clip_sample", "thresholding"])
def test_order_two_with_clipped_or_thresholded_x0(postprocess):
    # a mixture reaching beyond [-1, 1] so that clipping and thresholding act
    wide = GaussianMixture.random(num_components=4, sample_shape=(1, 4, 4), mean_range=1.6, seed=1)
    if postprocess == "clip_sample":
        config = dict(clip_sample=True, clip_sample_range=1.0)

        def expected(x0):
            return x0.clamp(-1.0, 1.0)
    else:
        config = dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3)

        def expected(x0):
            s = torch.quantile(x0.reshape(len(x0), -1).abs(), 0.9, dim=1).clamp(1.0, 1.3).reshape(-1, 1, 1, 1)
            return torch.maximum(torch.minimum(x0, s), -s) / s

    scheduler = DDIMSchedulerPlus(ddim_solver_order=2, timestep_spacing="logsnr", **config)
    scheduler.set_timesteps(20)
    oracle = GaussianMixtureOracle(wide, scheduler.alphas_cumprod)
    # DPM-Solver++ never uses the network's eps, only x_0: its first-order steps are DDIM with the clipped x_0
    x, x0s = _sample(scheduler, oracle, _noise(), use_clipped_model_output=True)
    assert max(float(x0.abs().max()) for x0 in x0s) <= 1.0
    unclipped = DDIMSchedulerPlus(ddim_solver_order=2, timestep_spacing="logsnr", clip_sample=False)
    unclipped.set_timesteps(20)
    assert (x - _sample(unclipped, oracle, _noise())[0]).abs().max() > 0.1  # the post-processing did act
    torch.testing.assert_close(x, _reference_for(scheduler, oracle, _noise(), expected), rtol=1e-10, atol=1e-10)


def test_order_two_prediction_types_follow_the_same_trajectory():
    finals = []
    for prediction_type in PREDICTION_TYPES:
        scheduler = DDIMSchedulerPlus(
            ddim_solver_order=2, prediction_type=prediction_type, clip_sample=False, timestep_spacing="quadratic"
        )
        scheduler.set_timesteps(12)
        finals.append(
            _sample(scheduler, GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod, prediction_type), _noise())[0]
        )
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(finals[2], finals[0], rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# Convergence order on a Gaussian toy
# ----------------------------------------------------------------------------------------------------------------
def _ode_error(order, steps, spacing="logsnr", mu=0.5, std=0.3):
    """Max error at abar_0 of the sampler against the exact probability-flow ODE solution for x_0 ~ N(mu, std^2 I):
    x_t = sqrt(abar_t) mu + sqrt(abar_t std^2 + 1 - abar_t) (x_T - sqrt(abar_T) mu) / sqrt(abar_T std^2 + 1 - abar_T).
    """
    gaussian = GaussianMixture(
        torch.full((1, 1, 4, 4), mu, dtype=torch.float64), torch.tensor([std], dtype=torch.float64)
    )
    scheduler = DDIMSchedulerPlus(
        ddim_solver_order=order, timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=False
    )
    scheduler.set_timesteps(steps)
    x_T = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, _ = _sample(scheduler, GaussianMixtureOracle(gaussian, scheduler.alphas_cumprod), x_T)
    abar_T, abar_0 = scheduler.alphas_cumprod[scheduler.timesteps[0]], scheduler.final_alpha_cumprod
    exact = (
        abar_0.sqrt() * mu
        + (abar_0 * std**2 + 1 - abar_0).sqrt() * (x_T - abar_T.sqrt() * mu) / (abar_T * std**2 + 1 - abar_T).sqrt()
    )
    return float((x - exact).abs().max())


@pytest.mark.parametrize("steps", [20, 40])
def test_convergence_order(steps):
    first_order_ratio = _ode_error(1, steps) / _ode_error(1, 2 * steps)
    second_order_ratio = _ode_error(2, steps) / _ode_error(2, 2 * steps)
    assert 1.7 < first_order_ratio < 2.3
    assert 3.4 < second_order_ratio < 4.8
    assert _ode_error(2, steps) < _ode_error(1, steps) / 5


# ----------------------------------------------------------------------------------------------------------------
# State: eta, history reset, order of calls
# ----------------------------------------------------------------------------------------------------------------
def test_order_must_be_one_or_two():
    with pytest.raises(ValueError, match="`ddim_solver_order`"):
        DDIMSchedulerPlus(ddim_solver_order=3)


def test_history_resets_when_a_loop_starts_again():
    scheduler = DDIMSchedulerPlus(ddim_solver_order=2, timestep_spacing="logsnr", clip_sample=False)
    scheduler.set_timesteps(20)
    oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod)
    first, _ = _sample(scheduler, oracle, _noise())
    # a second pipeline call: the same loop again, with and without set_timesteps in between
    again, _ = _sample(scheduler, oracle, _noise())
    scheduler.set_timesteps(20)
    after_reset, _ = _sample(scheduler, oracle, _noise())
    # a loop abandoned halfway, then restarted from the first timestep
    x = _noise(seed=5)
    for t in scheduler.timesteps[:7]:
        x = scheduler.step(oracle(x, t), t, x).prev_sample
    restarted, _ = _sample(scheduler, oracle, _noise())
    assert torch.equal(first, again) and torch.equal(first, after_reset) and torch.equal(first, restarted)


def test_pipeline_called_twice_gives_identical_results():
    scheduler = DDIMSchedulerPlus(ddim_solver_order=2, timestep_spacing="logsnr", clip_sample=False)
    oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod)
    pipe = DDIMPlusPipeline(unet=oracle.as_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def generate(steps):
        generator = torch.Generator().manual_seed(0)
        return pipe(batch_size=3, num_inference_steps=steps, generator=generator, output_type="np").images

    first = generate(10)
    generate(4)  # another schedule in between
    assert np.array_equal(first, generate(10))
    # and the pipeline runs the same loop as `_sample`
    scheduler.set_timesteps(10)
    x, _ = _sample(scheduler, oracle, torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(first, (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


def test_history_resets_on_set_timesteps_with_another_schedule():
    scheduler = DDIMSchedulerPlus(ddim_solver_order=2, clip_sample=False)
    oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod)
    scheduler.set_timesteps(30)
    _sample(scheduler, oracle, _noise(seed=3))
    scheduler.set_timesteps(timesteps=CUSTOM_TIMESTEPS)
    after_other_run, _ = _sample(scheduler, oracle, _noise())
    fresh = DDIMSchedulerPlus(ddim_solver_order=2, clip_sample=False)
    fresh.set_timesteps(timesteps=CUSTOM_TIMESTEPS)
    assert torch.equal(after_other_run, _sample(fresh, oracle, _noise())[0])


def test_out_of_order_steps_raise():
    scheduler = DDIMSchedulerPlus(ddim_solver_order=2)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps.tolist()
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=f"got timestep {timesteps[1]} but the next one is {timesteps[0]}"):
        scheduler.step(x, timesteps[1], x)  # starting after the first timestep
    scheduler.step(x, timesteps[0], x)
    with pytest.raises(ValueError, match=f"got timestep {timesteps[2]} but the next one is {timesteps[1]}"):
        scheduler.step(x, timesteps[2], x)  # skipping one
    scheduler.step(x, timesteps[1], x)
    with pytest.raises(ValueError, match="in order"):
        scheduler.step(x, timesteps[1], x)  # repeating one
    with pytest.raises(ValueError, match="not in `self.timesteps`"):
        scheduler.step(x, timesteps[2] + 1, x)  # off the schedule
    scheduler.step(x, timesteps[2], x)  # the errors left the history as it was


@pytest.mark.parametrize("steps, begin", [(20, 7), (8, 3)])
def test_order_two_starts_mid_schedule_at_begin_index(steps, begin):
    # What diffusers' img2img and inpainting pipelines do: set_timesteps, set_begin_index(t_start), then step from
    # timesteps[t_start]. The step there is first order; the rest is Algorithm 2 from that level on.
    scheduler = DDIMSchedulerPlus(ddim_solver_order=2, clip_sample=False, timestep_spacing="logsnr")
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(begin)
    assert scheduler.begin_index == begin and scheduler.step_index is None
    oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod)
    timesteps = scheduler.timesteps.tolist()[begin:]
    x = _noise()
    for i, t in enumerate(timesteps):
        x = scheduler.step(oracle(x, t), t, x).prev_sample
        assert scheduler.step_index == begin + i + 1
    abars = [float(scheduler.alphas_cumprod[t]) for t in timesteps] + [1.0]
    last_two = {len(timesteps) - 2, len(timesteps) - 1} if steps < 15 else set()
    x0_oracle = GaussianMixtureOracle(MIXTURE, scheduler.alphas_cumprod, prediction_type="sample")
    expected = _reference_dpm_solver_pp_2m(lambda x, i: x0_oracle(x, timesteps[i]), _noise(), abars, last_two)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)
    # the same loop again restarts at begin_index; starting anywhere else is refused
    again = _noise()
    for t in timesteps:
        again = scheduler.step(oracle(again, t), t, again).prev_sample
    assert torch.equal(again, x)
    with pytest.raises(ValueError, match=f"`begin_index`={begin}: got timestep {timesteps[1]} but the next one is"):
        scheduler.step(x, timesteps[1], x)
    # set_timesteps resets both
    scheduler.set_timesteps(steps)
    assert scheduler.begin_index is None and scheduler.step_index is None
