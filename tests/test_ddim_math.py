"""The paper's equations in `ddim_plus.ddim_math`, checked against independent float64 closed forms and against the
diffusers code they must agree with (beta schedules, spacings, thresholding)."""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr

from ddim_plus import ddim_math as dm


def _abar(T=1000):
    return dm.alphas_cumprod_from_betas(dm.make_betas("linear", T, 1e-4, 0.02))


# --------------------------------------------------------------------------------------------------------------
# Noise schedules
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [10, 1000])
def test_betas_equal_diffusers_ddim(schedule, T):
    ours = dm.make_betas(schedule, T, 0.00085, 0.012)
    stock = DDIMScheduler(num_train_timesteps=T, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).betas
    assert ours.dtype == torch.float32
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("schedule", ["sigmoid", "laplace"])
def test_ddpm_only_betas_equal_diffusers_ddpm(schedule):
    # DDIMScheduler has neither schedule; DDPM checkpoints may, so they must match DDPMScheduler's.
    ours = dm.make_betas(schedule, 1000, 1e-4, 0.02)
    assert torch.equal(ours, DDPMScheduler(beta_schedule=schedule).betas)


def test_trained_betas_are_used_as_given():
    betas = np.linspace(1e-3, 0.3, 7)
    ours = dm.make_betas("linear", 7, 1e-4, 0.02, trained_betas=betas)
    assert torch.equal(ours, torch.tensor(betas, dtype=torch.float32))


def test_trained_betas_of_wrong_length_raise():
    with pytest.raises(ValueError, match="trained_betas"):
        dm.make_betas("linear", 1000, 1e-4, 0.02, trained_betas=[0.1, 0.3])


def test_unknown_beta_schedule_raises():
    with pytest.raises(ValueError, match="beta_schedule"):
        dm.make_betas("cosine", 1000, 1e-4, 0.02)


def test_alphas_cumprod_is_float64_product():
    betas = dm.make_betas("linear", 1000, 1e-4, 0.02)
    expected = np.cumprod(1.0 - betas.numpy().astype(np.float64))
    abar = dm.alphas_cumprod_from_betas(betas)
    assert abar.dtype == torch.float64
    np.testing.assert_allclose(abar.numpy(), expected, rtol=1e-13)


def test_zero_terminal_snr_rescale():
    betas = dm.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = dm.rescale_zero_terminal_snr(betas)
    abar_before = dm.alphas_cumprod_from_betas(betas)
    abar_after = dm.alphas_cumprod_from_betas(rescaled)
    assert abar_after[-1].item() == pytest.approx(0.0, abs=1e-12)  # Lin et al.: SNR(T) = 0
    assert abar_after[0].item() == pytest.approx(abar_before[0].item(), rel=1e-6)  # abar_0 kept
    # the same betas as diffusers' implementation of Algorithm 1 run in float64 (diffusers runs it in float32, which
    # loses ~2e-4 relative on the smallest betas; ours computes in float64 and rounds once)
    expected = diffusers_rescale_zero_terminal_snr(betas.double()).float()
    torch.testing.assert_close(rescaled, expected, rtol=1e-6, atol=1e-9)


def test_log_snr():
    abar = torch.tensor([0.999, 0.5, 1e-3], dtype=torch.float64)
    expected = [math.log(a / (1 - a)) for a in abar.tolist()]
    np.testing.assert_allclose(dm.log_snr(abar), expected, rtol=1e-12)
    # the ends: abar = 0 (zero terminal SNR) is floored at 2**-24, abar = 1 (the clean level) is +inf, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ends = dm.log_snr([0.0, 1.0])
    assert ends[0] == pytest.approx(math.log(2.0**-24)) and ends[1] == math.inf


# --------------------------------------------------------------------------------------------------------------
# Forward process and parameterisations
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def clean_and_noise():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(
        2, 3, 4, 4, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("abar", [0.9999, 0.5, 1e-4])
def test_parameterisations_recover_x0_and_eps(clean_and_noise, abar):
    x0, eps = clean_and_noise
    roots = (math.sqrt(abar), math.sqrt(1 - abar))
    x_t = dm.add_noise(x0, eps, *roots)
    torch.testing.assert_close(x_t, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps)  # eq. 4
    outputs = {"epsilon": eps, "sample": x0, "v_prediction": dm.velocity(x0, eps, *roots)}
    for prediction_type, model_output in outputs.items():
        x0_hat, eps_hat = dm.model_output_to_x0_eps(model_output, x_t, *roots, prediction_type)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dm.x0_from_eps(x_t, eps, *roots), x0)  # eq. 9
    torch.testing.assert_close(dm.eps_from_x0(x_t, x0, *roots), eps)


def test_unknown_prediction_type_raises(clean_and_noise):
    x0, eps = clean_and_noise
    with pytest.raises(ValueError, match="prediction_type"):
        dm.model_output_to_x0_eps(eps, x0, 0.5, 0.5, "x0")


@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.9, 2.0)])
def test_dynamic_threshold_equals_diffusers(ratio, max_value):
    x0 = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stock = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    torch.testing.assert_close(dm.dynamic_threshold(x0, ratio, max_value), stock._threshold_sample(x0.clone()))


def test_dynamic_threshold_keeps_half_precision():
    x0 = (3 * torch.randn(2, 3, 4, 4)).half()
    out = dm.dynamic_threshold(x0, 0.995, 1.0)
    assert out.dtype == torch.float16
    assert out.abs().max() <= 1.0


# --------------------------------------------------------------------------------------------------------------
# Eq. 16 and eq. 12
# --------------------------------------------------------------------------------------------------------------
def test_sigma_eta_one_is_ddpm_posterior_std():
    betas = dm.make_betas("linear", 1000, 1e-4, 0.02).double()
    abar = dm.alphas_cumprod_from_betas(betas)
    for t in (1, 10, 500, 999):
        posterior_var = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]  # DDPM's beta-tilde_t
        assert dm.ddim_sigma(abar[t].item(), abar[t - 1].item(), 1.0) ** 2 == pytest.approx(posterior_var.item())


def test_sigma_scales_linearly_with_eta_and_vanishes_at_clean_level():
    s1 = dm.ddim_sigma(0.3, 0.6, 1.0)
    assert dm.ddim_sigma(0.3, 0.6, 0.0) == 0.0
    assert dm.ddim_sigma(0.3, 0.6, 0.5) == pytest.approx(0.5 * s1)
    expected = math.sqrt((1 - 0.6) / (1 - 0.3)) * math.sqrt(1 - 0.3 / 0.6)
    assert s1 == pytest.approx(expected)
    assert dm.ddim_sigma(1.0, 1.0, 1.0) == 0.0


def test_sigmas_are_zero_when_stepping_to_a_level_without_signal():
    # only degenerate schedules (abar underflowing to 0 before T) get here; set_timesteps must not divide by zero
    assert dm.ddim_sigma(0.0, 0.0, 1.0) == 0.0
    assert dm.ddim_sigma_hat(0.0, 0.0) == 0.0


def test_sigma_hat_is_ddpm_large_variance():
    betas = dm.make_betas("linear", 1000, 1e-4, 0.02).double()
    abar = dm.alphas_cumprod_from_betas(betas)
    for t in (1, 500, 999):
        assert dm.ddim_sigma_hat(abar[t].item(), abar[t - 1].item()) ** 2 == pytest.approx(betas[t].item())
    # it exceeds sigma(eta=1): that is why the paper keeps sigma(1) in the direction term
    assert dm.ddim_sigma_hat(0.3, 0.6) > dm.ddim_sigma(0.3, 0.6, 1.0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_coefficients_preserve_the_marginal(eta):
    # With x0 and eps exact and z independent, x_prev must have mean sqrt(abar_prev) x0 and noise variance
    # 1 - abar_prev (the property that defines the non-Markovian family, eq. 7).
    abar_t, abar_prev = 0.2, 0.7
    sigma = dm.ddim_sigma(abar_t, abar_prev, eta)
    c_x0, c_eps, c_noise = dm.ddim_step_coefficients(abar_prev, sigma)
    assert c_x0 == pytest.approx(math.sqrt(abar_prev))
    assert c_eps**2 + c_noise**2 == pytest.approx(1 - abar_prev)


def test_ddim_step_is_eq_12(clean_and_noise):
    x0, eps = clean_and_noise
    z = torch.randn_like(x0)
    abar_prev, sigma = 0.7, 0.3
    expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(dm.ddim_step(x0, eps, abar_prev, sigma, z), expected)
    torch.testing.assert_close(dm.ddim_step(x0, eps, abar_prev), math.sqrt(abar_prev) * x0 + math.sqrt(0.3) * eps)
    with pytest.raises(ValueError, match="noise"):
        dm.ddim_step(x0, eps, abar_prev, sigma)


def test_ddim_step_sigma_hat_direction_uses_sigma_one(clean_and_noise):
    x0, eps = clean_and_noise
    z = torch.randn_like(x0)
    abar_t, abar_prev = 0.2, 0.7
    sigma_hat, sigma_one = dm.ddim_sigma_hat(abar_t, abar_prev), dm.ddim_sigma(abar_t, abar_prev, 1.0)
    out = dm.ddim_step(x0, eps, abar_prev, sigma_hat, z, direction_sigma=sigma_one)
    expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma_one**2) * eps + sigma_hat * z
    torch.testing.assert_close(out, expected)


def test_inverse_step_with_exact_predictions_lands_on_the_forward_marginal(clean_and_noise):
    x0, eps = clean_and_noise
    torch.testing.assert_close(dm.ddim_inverse_step(x0, eps, 0.3), math.sqrt(0.3) * x0 + math.sqrt(0.7) * eps)


def test_dpm_solver_2m_correction():
    x0, x0_prev = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0])
    # equal steps (r = 1): D = 1.5 x0 - 0.5 x0_prev; a constant x0 is left unchanged
    assert dm.dpm_solver_2m_weight(0.4, 0.4) == 0.5
    torch.testing.assert_close(dm.dpm_solver_2m_x0(x0, x0_prev, 0.5), torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(dm.dpm_solver_2m_x0(x0, x0, dm.dpm_solver_2m_weight(0.1, 0.7)), x0)


# --------------------------------------------------------------------------------------------------------------
# Timestep subsequences
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", dm.DIFFUSERS_TIMESTEP_SPACINGS)
@pytest.mark.parametrize("S, T, offset", [(10, 1000, 0), (10, 1000, 1), (50, 1000, 0), (7, 100, 0), (1000, 1000, 0)])
def test_diffusers_spacings_equal_diffusers(spacing, S, T, offset):
    stock = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    stock.set_timesteps(S)
    ours = dm.timesteps_for_spacing(spacing, S, T, offset)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, stock.timesteps.numpy())


@pytest.mark.parametrize("T", [37, 1000])
def test_trailing_is_diffusers_first_S_values_for_every_S(T):
    # diffusers' float arange(T, 0, -T / S) returns S + 1 values for some S; its extra last value is -1 (stock
    # DDIMScheduler then schedules timestep -1). Everywhere else ours equals it.
    extra = []
    for S in range(1, T + 1):
        stock = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        stock.set_timesteps(S)
        ours = dm.timesteps_for_spacing("trailing", S, T)
        np.testing.assert_array_equal(ours, stock.timesteps.numpy()[:S])
        if len(stock.timesteps) != S:
            assert stock.timesteps.tolist()[S:] == [-1]
            extra.append(S)
    if T == 1000:  # the count and the first cases quoted in docs/scheduler.md
        assert len(extra) == 62 and extra[:5] == [61, 103, 121, 122, 201]


@pytest.mark.parametrize("T", [10, 37, 1000])
@pytest.mark.parametrize("spacing", dm.TIMESTEP_SPACINGS)
def test_every_spacing_gives_S_distinct_descending_timesteps_for_every_S(spacing, T):
    abar = _abar(T)
    for S in range(1, T + 1):
        ts = dm.timesteps_for_spacing(spacing, S, T, alphas_cumprod=abar)
        assert ts.dtype == np.int64 and len(ts) == S, (spacing, S)
        assert np.all(np.diff(ts) < 0), (spacing, S)
        assert 0 <= ts.min() and ts.max() < T, (spacing, S)


@pytest.mark.parametrize("S, T", [(10, 1000), (61, 1000), (7, 37), (1, 10)])
def test_leading_steps_offset_range(S, T):
    largest = T - 1 - (S - 1) * (T // S)  # the largest leading timestep (S - 1) * (T // S) + offset stays below T
    assert dm.timesteps_for_spacing("leading", S, T, largest)[0] == T - 1
    for bad in (largest + 1, -1):
        with pytest.raises(ValueError, match=rf"`steps_offset`={bad}.*`num_inference_steps`={S}.*= {largest}\."):
            dm.timesteps_for_spacing("leading", S, T, bad)


def test_quadratic_is_the_papers_formula_when_it_has_no_repeats():
    T, S = 1000, 10
    expected = np.floor(np.linspace(0, math.sqrt(0.8 * T), S) ** 2).astype(np.int64)[::-1]
    np.testing.assert_array_equal(dm.timesteps_for_spacing("quadratic", S, T), expected)


@pytest.mark.parametrize("S", [1, 2, 30, 100, 500, 1000])
def test_quadratic_and_logsnr_give_S_distinct_descending_steps(S):
    T = 1000
    raw = np.floor(np.linspace(0, math.sqrt(0.8 * T), S) ** 2)
    for spacing in ("quadratic", "logsnr"):
        ts = dm.timesteps_for_spacing(spacing, S, T, alphas_cumprod=_abar(T))
        assert len(ts) == S
        assert np.all(np.diff(ts) < 0), spacing
        assert ts.min() >= 0 and ts.max() < T
    if S >= 30:  # the paper's formula repeats small timesteps here; ours moves each repeat just above its predecessor
        assert len(np.unique(raw)) < S
        quad = dm.timesteps_for_spacing("quadratic", S, T)[::-1]
        assert np.all(quad >= raw)
        kept_or_bumped = (quad[1:] == raw[1:]) | (quad[1:] == quad[:-1] + 1)
        assert quad[0] == 0 and np.all(kept_or_bumped)


def test_logsnr_is_uniform_in_log_snr():
    T, S = 1000, 10
    abar = _abar(T)
    lam = dm.log_snr(abar)
    ts = dm.timesteps_for_spacing("logsnr", S, T, alphas_cumprod=abar)
    assert ts[0] == T - 1 and ts[-1] == 0
    gaps = np.diff(lam[ts])
    largest_one_step_change = np.abs(np.diff(lam)).max()
    target_gap = (lam[0] - lam[-1]) / (S - 1)
    # each chosen timestep is the nearest to its uniform target, so each gap is off by at most one step's change
    np.testing.assert_allclose(gaps, target_gap, atol=largest_one_step_change)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_logsnr_picks_the_nearest_timestep_to_each_uniform_target(schedule, rescale):
    # The definition, by brute force: for each target, the timestep whose lambda is nearest (the smallest on ties),
    # then repeats moved up. At zero terminal SNR only abar_T = 0 is floored, so lambda is not monotone at the end.
    T = 1000
    betas = dm.make_betas(schedule, T, 1e-4, 0.02)
    abar = dm.alphas_cumprod_from_betas(dm.rescale_zero_terminal_snr(betas) if rescale else betas)
    lam = np.log(np.where(abar > 0, abar, 2.0**-24)) - np.log1p(-abar.numpy())
    for S in (1, 2, 10, 37, 500, 999, 1000):
        nearest = np.abs(lam[None, :] - np.linspace(lam[0], lam[-1], S)[:, None]).argmin(axis=1)
        expected = dm._strictly_descending(np.sort(nearest), T)
        np.testing.assert_array_equal(dm.timesteps_for_spacing("logsnr", S, T, alphas_cumprod=abar), expected)


def test_logsnr_needs_alphas_cumprod_and_unknown_spacing_raises():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        dm.timesteps_for_spacing("logsnr", 10, 1000)
    with pytest.raises(ValueError, match="timestep_spacing"):
        dm.timesteps_for_spacing("uniform", 10, 1000)


# --------------------------------------------------------------------------------------------------------------
# Slerp (sec. 5.3)
# --------------------------------------------------------------------------------------------------------------
def test_slerp():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(dm.slerp(a, b, 0.0), a)
    torch.testing.assert_close(dm.slerp(a, b, 1.0), b)
    half = dm.slerp(a, b, 0.5)
    torch.testing.assert_close(half, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))  # stays on the circle
    torch.testing.assert_close(dm.slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear interpolation
    with pytest.raises(ValueError, match="same shape"):
        dm.slerp(a, torch.zeros(1, 3), 0.5)
