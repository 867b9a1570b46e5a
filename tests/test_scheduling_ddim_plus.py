"""`DDIMSchedulerPlus` against the paper's closed forms (computed here, independently, in float64), against stock
diffusers `DDIMScheduler` / `DDPMScheduler`, and through config round trips."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
from conftest import CUSTOM_TIMESTEPS
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)

from ddim_plus import DDIMSchedulerPlus
from ddim_plus.ddim_math import DIFFUSERS_TIMESTEP_SPACINGS, PREDICTION_TYPES, TIMESTEP_SPACINGS

# Tolerance of a float32 step against its float64 closed form: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
# amplifies the float32 rounding of the numerator by 1/sqrt(abar) (~10 at t ~ 900). One step to a wrong
# neighbouring timestep changes the result by orders of magnitude more.
F32 = dict(rtol=1e-5, atol=1e-5)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _abar64(T=1000, beta_start=1e-4, beta_end=0.02):
    """abar from the stock scheduler's float32 betas, accumulated here in float64 (independent of ddim_plus)."""
    betas = DDIMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end).betas.double().numpy()
    return np.cumprod(1.0 - betas)


def _expected_step(model_output, t, sample, prev_t, prediction_type, eta, noise, abar, final_abar=1.0):
    """Eq. 9 (and its v / sample analogues), eq. 16 and eq. 12 in float64, clipping off."""
    m, x = model_output.double(), sample.double()
    a_t = abar[t]
    a_prev = abar[prev_t] if prev_t >= 0 else final_abar
    if prediction_type == "epsilon":
        x0, eps = (x - math.sqrt(1 - a_t) * m) / math.sqrt(a_t), m
    elif prediction_type == "sample":
        x0, eps = m, (x - math.sqrt(a_t) * m) / math.sqrt(1 - a_t)
    else:
        x0, eps = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * m, math.sqrt(a_t) * m + math.sqrt(1 - a_t) * x
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise.double()
    return prev, x0


def _make_schedule(spacing, prediction_type="epsilon", **config):
    if spacing == "custom":
        scheduler = DDIMSchedulerPlus(prediction_type=prediction_type, clip_sample=False, **config)
        scheduler.set_timesteps(timesteps=CUSTOM_TIMESTEPS)
    else:
        scheduler = DDIMSchedulerPlus(
            prediction_type=prediction_type, clip_sample=False, timestep_spacing=spacing, **config
        )
        scheduler.set_timesteps(10)
    return scheduler


# --------------------------------------------------------------------------------------------------------------
# 1. Closed forms: every prediction type, eta, spacing; previous timestep = next element of `timesteps`
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [*TIMESTEP_SPACINGS, "custom"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_step_equals_closed_form(spacing, eta, prediction_type):
    scheduler = _make_schedule(spacing, prediction_type)
    abar = _abar64()
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == sorted(set(timesteps), reverse=True)
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        assert scheduler.previous_timestep(t) == prev_t
        sample, model_output, noise = (_randn(2, 3, 4, 4, seed=3 * i + k) for k in range(3))
        out = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise)
        expected_prev, expected_x0 = _expected_step(model_output, t, sample, prev_t, prediction_type, eta, noise, abar)
        assert out.prev_sample.dtype == torch.float32
        torch.testing.assert_close(out.pred_original_sample.double(), expected_x0, **F32)
        torch.testing.assert_close(out.prev_sample.double(), expected_prev, **F32)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_last_step_goes_to_final_alpha_cumprod(set_alpha_to_one):
    scheduler = _make_schedule("trailing", set_alpha_to_one=set_alpha_to_one)
    abar = _abar64()
    final_abar = 1.0 if set_alpha_to_one else abar[0]
    assert scheduler.final_alpha_cumprod.item() == pytest.approx(final_abar, rel=1e-12)
    t_last = int(scheduler.timesteps[-1])
    sample, model_output, noise = (_randn(1, 3, 4, 4, seed=k) for k in range(3))
    out = scheduler.step(model_output, t_last, sample, eta=1.0, variance_noise=noise)
    expected, _ = _expected_step(model_output, t_last, sample, -1, "epsilon", 1.0, noise, abar, final_abar)
    torch.testing.assert_close(out.prev_sample.double(), expected, **F32)


@pytest.mark.parametrize(
    "spacing, t, prev_t",
    [
        # diffusers' own tests step from t = 1, 10, 49 with 50 leading steps (schedule 980, 960, ..., 20, 0)
        ("leading", 1, 0),
        ("leading", 10, 0),
        ("leading", 49, 40),
        ("trailing", 150, 139),  # trailing S=50 visits 999, 979, ..., 159, 139, ..., 39, 19
        ("trailing", 10, -1),  # below the smallest scheduled timestep: the clean level
        ("linspace", 500, 489),
    ],
)
def test_timestep_not_in_schedule_steps_to_largest_scheduled_below(spacing, t, prev_t):
    scheduler = DDIMSchedulerPlus(clip_sample=False, timestep_spacing=spacing)
    scheduler.set_timesteps(50)
    assert t not in scheduler.timesteps.tolist()
    assert prev_t == -1 or prev_t in scheduler.timesteps.tolist()
    assert scheduler.previous_timestep(t) == prev_t
    assert scheduler.previous_timestep(torch.tensor(t)) == prev_t
    sample, model_output, noise = (_randn(1, 3, 4, 4, seed=k) for k in range(3))
    out = scheduler.step(model_output, t, sample, eta=0.5, variance_noise=noise)
    expected, _ = _expected_step(model_output, t, sample, prev_t, "epsilon", 0.5, noise, _abar64())
    torch.testing.assert_close(out.prev_sample.double(), expected, **F32)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing", ["linspace", "trailing", "custom"])
def test_sigma_hat_step_closed_form(spacing, set_alpha_to_one):
    scheduler = _make_schedule(spacing, sigma_type="sigma_hat", set_alpha_to_one=set_alpha_to_one)
    abar = _abar64()
    final_abar = 1.0 if set_alpha_to_one else abar[0]
    timesteps = scheduler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_prev = abar[t], abar[prev_t] if prev_t >= 0 else final_abar
        sample, model_output, noise = (_randn(1, 3, 4, 4, seed=3 * i + k) for k in range(3))
        out = scheduler.step(model_output, t, sample, eta=0.0, variance_noise=noise)  # eta is ignored
        x, m = sample.double(), model_output.double()
        x0 = (x - math.sqrt(1 - a_t) * m) / math.sqrt(a_t)
        sigma_one_sq = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # the direction term keeps sigma(eta=1)
        # section 5.1; the last step gets no noise, as in the paper's code (mask = 1 - (t == 0)) and DDPM
        sigma_hat = math.sqrt(1 - a_t / a_prev) if prev_t >= 0 else 0.0
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma_one_sq) * m + sigma_hat * noise.double()
        torch.testing.assert_close(out.prev_sample.double(), expected, **F32)


def _paper_ddpm_steps(x, seq, model, betas, noises):
    """The paper's released sigma-hat sampler (ermongroup/ddim, functions/denoising.py, `ddpm_steps`), transcribed
    in float64: the DDPM posterior mean from the clipped x_0, variance beta_t = 1 - abar_t / abar_next, and noise
    masked by `1 - (t == 0)`."""
    abar = torch.cat([torch.zeros(1, dtype=torch.float64), betas]).neg().add(1).cumprod(0)  # compute_alpha: t + 1
    seq_next = [-1] + list(seq[:-1])
    for (i, j), noise in zip(zip(reversed(seq), reversed(seq_next)), noises):
        at, atm1 = abar[i + 1], abar[j + 1]
        beta_t = 1 - at / atm1
        e = model(x, i)
        x0_from_e = ((1.0 / at).sqrt() * x - (1.0 / at - 1).sqrt() * e).clamp(-1, 1)
        mean = ((atm1.sqrt() * beta_t) * x0_from_e + ((1 - beta_t).sqrt() * (1 - atm1)) * x) / (1.0 - at)
        mask = 1 - float(i == 0)
        x = mean + mask * torch.exp(0.5 * beta_t.log()) * noise
    return x


@pytest.mark.parametrize("spacing", ["leading", "quadratic"])
def test_sigma_hat_loop_equals_the_papers_code(spacing):
    # The paper's two skip types: "uniform" is range(0, T, T // S) (= leading), "quad" is int(linspace(0,
    # sqrt(0.8 T), S) ** 2). Both end at t = 0, where the paper's code adds no noise.
    T, S = 1000, 10
    seq = (
        list(range(0, T, T // S))
        if spacing == "leading"
        else [int(s) for s in np.linspace(0, np.sqrt(0.8 * T), S) ** 2]
    )
    scheduler = DDIMSchedulerPlus(timestep_spacing=spacing, sigma_type="sigma_hat", clip_sample=True)
    scheduler.set_timesteps(S)
    assert scheduler.timesteps.tolist() == seq[::-1]

    def model(x, t):  # any fixed network will do
        return torch.tanh(x) * (0.5 + t / T)

    x_T = _randn(2, 3, 4, 4, seed=0, dtype=torch.float64)
    noises = [_randn(2, 3, 4, 4, seed=1 + k, dtype=torch.float64) for k in range(S)]
    betas = DDIMScheduler().betas.double()
    expected = _paper_ddpm_steps(x_T, seq, model, betas, noises)
    x = x_T
    for t, noise in zip(scheduler.timesteps.tolist(), noises):
        x = scheduler.step(model(x, t), t, x, variance_noise=noise, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing", [*TIMESTEP_SPACINGS, "custom"])
def test_sigma_hat_last_step_adds_no_noise(spacing, set_alpha_to_one):
    # With trailing spacing the last step starts at t = 99 (S = 10): noise added there, of std
    # sqrt(1 - abar_99) = 0.32, would stay in the output.
    scheduler = _make_schedule(spacing, sigma_type="sigma_hat", set_alpha_to_one=set_alpha_to_one)
    t_last = int(scheduler.timesteps[-1])
    sample, model_output = _randn(1, 3, 4, 4, seed=0), _randn(1, 3, 4, 4, seed=1)
    outs = [
        scheduler.step(model_output, t_last, sample, variance_noise=_randn(1, 3, 4, 4, seed=2 + k)) for k in range(2)
    ]
    assert torch.equal(outs[0].prev_sample, outs[1].prev_sample)
    if set_alpha_to_one:
        torch.testing.assert_close(outs[0].prev_sample, outs[0].pred_original_sample, rtol=0, atol=1e-6)


def test_clipping_and_use_clipped_model_output_closed_form():
    scheduler = DDIMSchedulerPlus(clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    abar = _abar64()
    t, prev_t = int(scheduler.timesteps[3]), int(scheduler.timesteps[4])
    a_t, a_prev = abar[t], abar[prev_t]
    sample, model_output = 2 * _randn(1, 3, 8, 8, seed=0), _randn(1, 3, 8, 8, seed=1)
    x0 = ((sample.double() - math.sqrt(1 - a_t) * model_output.double()) / math.sqrt(a_t)).clamp(-0.5, 0.5)
    for use_clipped in (False, True):
        out = scheduler.step(model_output, t, sample, use_clipped_model_output=use_clipped)
        eps = (sample.double() - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t) if use_clipped else model_output.double()
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        torch.testing.assert_close(out.pred_original_sample.double(), x0, **F32)
        torch.testing.assert_close(out.prev_sample.double(), expected, **F32)


# --------------------------------------------------------------------------------------------------------------
# 2. Parity with stock DDIMScheduler where its previous step is right (leading spacing)
# --------------------------------------------------------------------------------------------------------------
PARITY_FLAGS = [
    dict(clip_sample=False, thresholding=False),
    dict(clip_sample=True, thresholding=False),
    dict(clip_sample=False, thresholding=True),
]


def _parity_pairs(prediction_type, flags, eta, stock_abar_in_float64, use_clipped_model_output=None):
    """(stock, ours) outputs at every leading timestep of S=50, fed the same inputs and the same variance_noise.

    `use_clipped_model_output` goes to ours as given; stock gets what our default (`None`) means: re-derive eps
    from the clipped x_0 whenever x_0 is clipped or thresholded (stock's own default is `False`).
    """
    stock_clipped = use_clipped_model_output
    if stock_clipped is None:
        stock_clipped = flags["clip_sample"] or flags["thresholding"]
    stock = DDIMScheduler(prediction_type=prediction_type, **flags)
    ours = DDIMSchedulerPlus(prediction_type=prediction_type, **flags)
    if stock_abar_in_float64:
        stock.alphas_cumprod = torch.cumprod(1.0 - stock.betas.double(), dim=0)
    stock.set_timesteps(50)
    ours.set_timesteps(50)
    assert torch.equal(stock.timesteps, ours.timesteps)
    for i, t in enumerate(stock.timesteps):
        sample, model_output, noise = (_randn(2, 3, 8, 8, seed=3 * i + k) for k in range(3))
        a = stock.step(model_output, t, sample, eta=eta, variance_noise=noise, use_clipped_model_output=stock_clipped)
        b = ours.step(
            model_output, t, sample, eta=eta, variance_noise=noise, use_clipped_model_output=use_clipped_model_output
        )
        yield (a.prev_sample, b.prev_sample), (a.pred_original_sample, b.pred_original_sample)


@pytest.mark.parametrize("use_clipped_model_output", [None, False, True])
@pytest.mark.parametrize("flags", PARITY_FLAGS, ids=["plain", "clip", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_parity_with_stock_given_the_same_alphas_cumprod(prediction_type, eta, flags, use_clipped_model_output):
    # Give the stock scheduler float64 abar (as ours has) and the two agree to float32 rounding for every prediction
    # type: the only difference left is the precision of abar.
    pairs = _parity_pairs(prediction_type, flags, eta, True, use_clipped_model_output)
    for stock_out, ours_out in (pair for step_pairs in pairs for pair in step_pairs):
        torch.testing.assert_close(ours_out, stock_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flags", PARITY_FLAGS, ids=["plain", "clip", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_parity_with_stock_as_shipped(prediction_type, eta, flags):
    # Stock diffusers accumulates abar in float32 (relative error up to 4e-7 in abar, 1.7e-4 in 1 - abar near
    # t = 0 with these betas; up to ~4e-4 for schedules with smaller beta_0, as float32 rounds 1 - beta_0 to 6e-8).
    # - epsilon and v: x_0 and eps are O(1) combinations of the inputs, or x_0 = (x - ...)/sqrt(abar) which only
    #   scales abar's small relative error, so 1e-5 relative + absolute holds with margin (the largest absolute
    #   gaps are where |x_0| is large, at t ~ 999).
    # - sample: eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar) divides by sqrt(1 - abar) ~ 0.01 near t = 0, so the
    #   float32 error of 1 - abar (and the float32 cancellation in the numerator) reaches the output amplified;
    #   the test asserts the 4e-4 bound of 1 - abar's float32 relative error.
    tol = 4e-4 if prediction_type == "sample" else 1e-5
    for stock_out, ours_out in (pair for pairs in _parity_pairs(prediction_type, flags, eta, False) for pair in pairs):
        torch.testing.assert_close(ours_out, stock_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_generator_draws_the_same_noise_as_stock(eta):
    stock, ours = DDIMScheduler(), DDIMSchedulerPlus()
    stock.set_timesteps(10)
    ours.set_timesteps(10)
    results = []
    for scheduler in (stock, ours):
        generator = torch.Generator().manual_seed(0)
        sample = _randn(1, 3, 8, 8, seed=1)
        for t in scheduler.timesteps:
            # both clip x_0 (the default config); eps re-derived from it, as our default does when clipping
            step = scheduler.step(0.5 * sample, t, sample, eta=eta, generator=generator, use_clipped_model_output=True)
            sample = step.prev_sample
        results.append(sample)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")


def _stock_ddim(beta_schedule, **config):
    """Stock DDIMScheduler with float64 abar (as ours has). It has no sigmoid or laplace schedule: those get
    DDPMScheduler's betas (the ones a DDPM checkpoint trained with) as `trained_betas`."""
    if beta_schedule in ("sigmoid", "laplace"):
        config["trained_betas"] = DDPMScheduler(beta_schedule=beta_schedule).betas.numpy()
    stock = DDIMScheduler(beta_schedule=beta_schedule, **config)
    stock.alphas_cumprod = torch.cumprod(1.0 - stock.betas.double(), dim=0)
    return stock


def _stock_step_to(stock, prev_t, model_output, t, sample, **kwargs):
    """Stock `DDIMScheduler.step` from `t` to `prev_t`. It steps to t - T // num_inference_steps, so
    num_inference_steps is set to an n with T // n = t - prev_t (n = 1 steps to the final level). Returns None where
    no such n exists."""
    T = stock.config.num_train_timesteps
    n = 1 if prev_t < 0 else T // (t - prev_t)
    if n == 0 or (prev_t >= 0 and T // n != t - prev_t):
        return None
    stock.num_inference_steps = n
    return stock.step(model_output, t, sample, **kwargs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", DIFFUSERS_TIMESTEP_SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_step_equals_stock_for_every_beta_schedule_and_spacing(beta_schedule, spacing, prediction_type, eta):
    # Every transition of our schedule, stock stepping between the same two timesteps. squaredcos_cap_v2 has
    # abar_999 = 2.4e-9 < 2**-24: eq. 9 is defined there and must be used as it is (trailing and linspace start at
    # t = 999, where flooring abar would move x_0 far).
    config = dict(prediction_type=prediction_type, clip_sample=False, timestep_spacing=spacing)
    stock, ours = _stock_ddim(beta_schedule, **config), DDIMSchedulerPlus(beta_schedule=beta_schedule, **config)
    compared = set()
    for S in (10, 50):
        ours.set_timesteps(S)
        timesteps = ours.timesteps.tolist()
        for i, t in enumerate(timesteps):
            prev_t = timesteps[i + 1] if i + 1 < S else -1
            sample, model_output, noise = (_randn(2, 3, 4, 4, seed=3 * i + k) for k in range(3))
            expected = _stock_step_to(stock, prev_t, model_output, t, sample, eta=eta, variance_noise=noise)
            if expected is None:
                continue
            out = ours.step(model_output, t, sample, eta=eta, variance_noise=noise)
            torch.testing.assert_close(out.pred_original_sample, expected.pred_original_sample, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
            compared.add((S, t))
    assert len(compared) >= 55  # of 60 transitions; with trailing and linspace these include t = 999
    assert spacing == "leading" or {(10, 999), (50, 999)} <= compared


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_step_at_zero_terminal_snr_equals_stock_except_the_epsilon_floor(prediction_type):
    # The same betas for both (ours rescaled to zero terminal SNR, given to stock as trained_betas): abar_999 = 0.
    # Only epsilon prediction at t = 999 is undefined (stock returns inf/NaN there); everywhere else, equal.
    betas = DDIMSchedulerPlus(rescale_betas_zero_snr=True).betas.numpy()
    config = dict(prediction_type=prediction_type, clip_sample=False, timestep_spacing="trailing", trained_betas=betas)
    stock, ours = _stock_ddim("linear", **config), DDIMSchedulerPlus(**config)
    assert ours.alphas_cumprod[-1].item() == 0.0
    ours.set_timesteps(10)
    timesteps = ours.timesteps.tolist()
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        sample, model_output = _randn(2, 3, 4, 4, seed=2 * i), _randn(2, 3, 4, 4, seed=2 * i + 1)
        expected = _stock_step_to(stock, prev_t, model_output, t, sample).prev_sample
        out = ours.step(model_output, t, sample).prev_sample
        if prediction_type == "epsilon" and t == 999:
            assert not torch.isfinite(expected).all() and torch.isfinite(out).all()
        else:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_trailing_differs_from_stock_exactly_by_the_previous_timestep():
    # Stock uses prev = t - T // S. Trailing S=30 visits 999, 966, 932, 899, ...: stock steps 999 -> 966 (right),
    # then 966 -> 933, a level the schedule never visits, and the next step starts from 932 as if it had got there.
    # Ours steps 966 -> 932. Both are eq. 12; they differ only in the level stepped to.
    stock, ours = DDIMScheduler(timestep_spacing="trailing"), DDIMSchedulerPlus(timestep_spacing="trailing")
    stock.set_timesteps(30)
    ours.set_timesteps(30)
    assert ours.timesteps[:4].tolist() == [999, 966, 932, 899]
    t = 966
    assert ours.previous_timestep(t) == 932 and t - 1000 // 30 == 933
    sample, model_output = _randn(1, 3, 4, 4, seed=0), _randn(1, 3, 4, 4, seed=1)
    # stock's default step: eps kept while x_0 is clipped (ours does the same when asked explicitly)
    ours_out = ours.step(model_output, t, sample, use_clipped_model_output=False).prev_sample
    stock_out = stock.step(model_output, t, sample).prev_sample
    abar = _abar64()
    x0 = ((sample.double() - math.sqrt(1 - abar[t]) * model_output.double()) / math.sqrt(abar[t])).clamp(-1, 1)
    for prev, out in ((932, ours_out), (933, stock_out)):
        expected = math.sqrt(abar[prev]) * x0 + math.sqrt(1 - abar[prev]) * model_output.double()
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 3. eta = 1 over the full T-step schedule is the DDPM posterior
# --------------------------------------------------------------------------------------------------------------
def _ddpm_posterior(x0, x_t, t, abar, betas):
    a_t, a_prev = abar[t], abar[t - 1] if t > 0 else 1.0
    mean = math.sqrt(a_prev) * betas[t] / (1 - a_t) * x0 + math.sqrt(1 - betas[t]) * (1 - a_prev) / (1 - a_t) * x_t
    return mean, (1 - a_prev) / (1 - a_t) * betas[t]


@pytest.mark.parametrize(
    "T, checked",
    [(50, range(50)), (1000, (999, 500, 100, 1, 0))],
    ids=["T=50 every step", "T=1000 spot checks"],
)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_eta_one_full_schedule_is_ddpm_posterior(T, checked, prediction_type):
    ours = DDIMSchedulerPlus(num_train_timesteps=T, clip_sample=False, prediction_type=prediction_type)
    ours.set_timesteps(T)
    assert ours.timesteps.tolist() == list(range(T - 1, -1, -1))
    betas = DDPMScheduler(num_train_timesteps=T).betas.double().numpy()
    abar = np.cumprod(1 - betas)
    for t in checked:
        sample, model_output, noise = (_randn(2, 3, 4, 4, seed=3 * t + k) for k in range(3))
        mean_out = ours.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros_like(noise))
        noisy_out = ours.step(model_output, t, sample, eta=1.0, variance_noise=noise)
        _, x0 = _expected_step(model_output, t, sample, t - 1, prediction_type, 0.0, noise, abar)  # eq. 9, float64
        mean, var = _ddpm_posterior(x0, sample.double(), t, abar, betas)
        torch.testing.assert_close(mean_out.prev_sample.double(), mean, **F32)
        # the noise enters with standard deviation sqrt(beta-tilde_t)
        torch.testing.assert_close(
            (noisy_out.prev_sample - mean_out.prev_sample).double(), math.sqrt(var) * noise.double(), rtol=0, atol=2e-6
        )


@pytest.mark.parametrize(
    "sigma_type, eta, variance_type", [("eta", 1.0, "fixed_small"), ("sigma_hat", 0.0, "fixed_large")]
)
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_full_schedule_matches_stock_ddpm_step(prediction_type, clip_sample, sigma_type, eta, variance_type):
    # DDPM's mean uses the clipped x_0 with x_t: that is DDIM at eta = 1 with eps re-derived from the clipped x_0.
    # Its noise: "fixed_small" is beta-tilde = sigma_t(1)^2; "fixed_large" is beta_t = sigma-hat^2, none at t = 0.
    # Stock DDPM computes 1 - abar_t and beta_t = 1 - abar_t / abar_prev in float32 (relative errors up to ~1e-4
    # near t = 0); given float64 abar, as ours has, it agrees to float32 rounding.
    T = 50
    ddpm = DDPMScheduler(
        num_train_timesteps=T, prediction_type=prediction_type, clip_sample=clip_sample, variance_type=variance_type
    )
    ddpm.alphas_cumprod = torch.cumprod(1.0 - ddpm.betas.double(), dim=0)
    ours = DDIMSchedulerPlus(
        num_train_timesteps=T, prediction_type=prediction_type, clip_sample=clip_sample, sigma_type=sigma_type
    )
    ours.set_timesteps(T)
    for t in ours.timesteps:
        sample, model_output = 2 * _randn(1, 3, 4, 4, seed=2 * int(t)), _randn(1, 3, 4, 4, seed=2 * int(t) + 1)
        expected = ddpm.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t))).prev_sample
        out = ours.step(
            model_output,
            t,
            sample,
            eta=eta,  # ignored by sigma_hat
            use_clipped_model_output=clip_sample,
            generator=torch.Generator().manual_seed(int(t)),
        )
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 4. Config round trips
# --------------------------------------------------------------------------------------------------------------
STOCK_CONFIG = dict(
    num_train_timesteps=500,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
    thresholding=True,
    dynamic_thresholding_ratio=0.9,
    clip_sample_range=2.0,
    sample_max_value=3.0,
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
)


def _public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
def test_stock_ddim_to_ours_to_stock_round_trip(rescale_betas_zero_snr):
    stock = DDIMScheduler(**{**STOCK_CONFIG, "rescale_betas_zero_snr": rescale_betas_zero_snr})
    ours = DDIMSchedulerPlus.from_config(stock.config)
    assert isinstance(ours, DDIMSchedulerPlus)
    for key, value in _public(stock.config).items():
        assert ours.config[key] == value, key
    if rescale_betas_zero_snr:
        # Lin et al.'s rescale is run in float64 here and rounded once; stock runs it in float32, which moves the
        # smallest betas by up to ~1e-3 relative (beta_0 should stay beta_start: ours does). abar agrees to 1e-6.
        torch.testing.assert_close(ours.betas, stock.betas, rtol=2e-3, atol=0)
        torch.testing.assert_close(ours.alphas_cumprod, stock.alphas_cumprod.double(), rtol=0, atol=2e-6)
        assert ours.betas[0].item() == pytest.approx(STOCK_CONFIG["beta_start"], rel=1e-6)
    else:
        assert torch.equal(ours.betas, stock.betas)
    back = DDIMScheduler.from_config(ours.config)
    assert type(back) is DDIMScheduler
    assert {k: back.config[k] for k in _public(stock.config)} == _public(stock.config)
    assert torch.equal(back.betas, stock.betas)


def test_every_stock_ddim_parameter_has_our_name_and_default():
    stock, ours = DDIMScheduler(), DDIMSchedulerPlus()
    for key, value in _public(stock.config).items():
        assert ours.config[key] == value, key


def test_stock_ddpm_config_loads(tmp_path):
    ddpm = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="fixed_large",
        clip_sample=False,
        prediction_type="v_prediction",
    )
    ddpm.save_pretrained(tmp_path)  # what a DDPM checkpoint's scheduler/ folder holds
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["variance_type"] == "fixed_large"
    ours = DDIMSchedulerPlus.from_pretrained(tmp_path)
    assert torch.equal(ours.betas, ddpm.betas)
    assert ours.config.prediction_type == "v_prediction" and ours.config.clip_sample is False
    # DDPM's `variance_type` must not collide with anything of ours: it is kept only as an unused (hidden) config
    # entry, which diffusers carries along so that converting back to DDPMScheduler restores it.
    assert "variance_type" not in inspect.signature(DDIMSchedulerPlus.__init__).parameters
    assert "variance_type" not in vars(ours)
    assert DDPMScheduler.from_config(ours.config).config.variance_type == "fixed_large"
    assert ours.config.sigma_type == "eta"
    ours.set_timesteps(10)
    out = ours.step(_randn(1, 3, 4, 4, seed=0), int(ours.timesteps[0]), _randn(1, 3, 4, 4, seed=1))
    assert torch.isfinite(out.prev_sample).all()


def test_save_pretrained_from_pretrained(tmp_path):
    ours = DDIMSchedulerPlus(
        beta_schedule="squaredcos_cap_v2", timestep_spacing="quadratic", sigma_type="sigma_hat", clip_sample=False
    )
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMSchedulerPlus"
    assert saved["sigma_type"] == "sigma_hat" and saved["timestep_spacing"] == "quadratic"
    loaded = DDIMSchedulerPlus.from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(ours.config)
    assert torch.equal(loaded.betas, ours.betas)
    for scheduler in (ours, loaded):
        scheduler.set_timesteps(20)
    assert torch.equal(loaded.timesteps, ours.timesteps)
    args = (_randn(1, 3, 4, 4, seed=0), int(ours.timesteps[5]), _randn(1, 3, 4, 4, seed=1))
    noise = _randn(1, 3, 4, 4, seed=2)
    assert torch.equal(
        loaded.step(*args, variance_noise=noise).prev_sample, ours.step(*args, variance_noise=noise).prev_sample
    )


def test_from_config_builds_the_configured_betas():
    # A subclass taking **kwargs would report beta_schedule="scaled_linear" but build linear betas; ours must not.
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    expected = DDIMScheduler(**config).betas
    assert torch.equal(DDIMSchedulerPlus.from_config(config).betas, expected)
    assert torch.equal(DDIMSchedulerPlus.from_config(DDIMScheduler().config, **config).betas, expected)
    assert not torch.equal(DDIMSchedulerPlus().betas, expected)


# --------------------------------------------------------------------------------------------------------------
# 7. Inversion
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["leading", "trailing", "custom"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_inverse_step_undoes_step_given_the_same_model_output(prediction_type, spacing):
    # step(x_next at t_next) -> x_cur; inverse_step(x_cur up to t_next) with model_input=x_next and the same output
    # solves eq. 12 (eta = 0) for x_next. In float64 that is exact to rounding; in float32 to float32 rounding.
    scheduler = _make_schedule(spacing, prediction_type)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        for i, t_next in enumerate(scheduler.timesteps.tolist()):
            x_next, model_output = _randn(2, 3, 4, 4, seed=2 * i, dtype=dtype), _randn(2, 3, 4, 4, seed=2 * i + 1)
            model_output = model_output.to(dtype)
            x_cur = scheduler.step(model_output, t_next, x_next).prev_sample
            back = scheduler.inverse_step(model_output, t_next, x_cur, model_input=x_next)
            assert back.prev_sample.dtype == dtype
            torch.testing.assert_close(back.prev_sample, x_next, rtol=tol, atol=tol)


def test_plain_inversion_is_exact_when_the_prediction_does_not_depend_on_the_input():
    # model_input defaults to `sample`: with a constant eps the ODE is linear in x and Euler is exact both ways.
    scheduler = _make_schedule("trailing")
    eps = _randn(1, 3, 4, 4, seed=0, dtype=torch.float64)
    x = _randn(1, 3, 4, 4, seed=1, dtype=torch.float64)
    path = [x]
    for t in scheduler.timesteps:
        path.append(scheduler.step(eps, t, path[-1]).prev_sample)
    latent = path[-1]
    for t in reversed(scheduler.timesteps.tolist()):
        latent = scheduler.inverse_step(eps, t, latent).prev_sample
    torch.testing.assert_close(latent, x, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# Training helpers, dtype and device, interchangeability attributes
# --------------------------------------------------------------------------------------------------------------
def test_add_noise_and_velocity_closed_form():
    ours, abar = DDIMSchedulerPlus(), _abar64()
    x0, noise = _randn(3, 3, 4, 4, seed=0), _randn(3, 3, 4, 4, seed=1)
    timesteps = torch.tensor([0, 500, 999])
    a = torch.tensor(np.sqrt(abar[[0, 500, 999]])).reshape(-1, 1, 1, 1)
    s = torch.tensor(np.sqrt(1 - abar[[0, 500, 999]])).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps).double(), a * x0.double() + s * noise.double())
    torch.testing.assert_close(ours.get_velocity(x0, noise, timesteps).double(), a * noise.double() - s * x0.double())
    stock = DDIMScheduler()
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), stock.add_noise(x0, noise, timesteps))


def test_half_precision_in_half_precision_out():
    ours = DDIMSchedulerPlus(thresholding=True)
    ours.set_timesteps(10)
    sample, model_output = _randn(1, 3, 8, 8, seed=0).half(), _randn(1, 3, 8, 8, seed=1).half()
    out = ours.step(model_output, ours.timesteps[0], sample, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.float16 and out.pred_original_sample.dtype == torch.float16
    assert torch.isfinite(out.prev_sample).all()
    assert ours.add_noise(sample, model_output, torch.tensor([10])).dtype == torch.float16


def test_interchangeability_attributes():
    ours = DDIMSchedulerPlus(num_train_timesteps=100)
    assert ours.init_noise_sigma == 1.0 and ours.order == 1 and len(ours) == 100
    sample = _randn(1, 3, 4, 4, seed=0)
    assert ours.scale_model_input(sample, 5) is sample
    ours.set_timesteps(10, device="cpu")
    assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == 10
    assert "DDIMScheduler" in [cls.__name__ for cls in ours.compatibles]
    out = ours.step(sample, ours.timesteps[0], sample, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


MULTISTEP_SOLVERS = (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler)


@pytest.mark.parametrize("ddim_solver_order", [1, 2])
@pytest.mark.parametrize("solver", MULTISTEP_SOLVERS, ids=lambda cls: cls.__name__)
def test_switching_a_saved_config_to_a_multistep_solver_keeps_its_default_order(solver, ddim_solver_order, tmp_path):
    DDIMSchedulerPlus(ddim_solver_order=ddim_solver_order).save_pretrained(tmp_path)
    reloaded = DDIMSchedulerPlus.from_pretrained(tmp_path)
    assert reloaded.config.ddim_solver_order == ddim_solver_order
    # the usual diffusers idiom for trying another solver on a saved pipeline
    assert solver.from_config(reloaded.config).config.solver_order == solver().config.solver_order == 2
    assert solver.from_config(reloaded.config, solver_order=3).config.solver_order == 3


def _solver_order_config(solver_order):
    """A scheduler_config.json of DDIMSchedulerPlus that holds the order as `solver_order` (written out by hand)."""
    return {
        "_class_name": "DDIMSchedulerPlus",
        "_diffusers_version": "0.42.1",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "sigma_type": "eta",
        "solver_order": solver_order,
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": "logsnr",
        "trained_betas": None,
    }


def _final_sample(scheduler):
    scheduler.set_timesteps(8)
    x = _randn(1, 3, 4, 4, seed=0)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(x) * (0.5 + int(t) / 1000), t, x).prev_sample
    return x


@pytest.mark.parametrize("solver_order", [1, 2])
def test_a_saved_solver_order_key_loads_as_ddim_solver_order(solver_order, tmp_path):
    by_hand = _solver_order_config(solver_order)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(by_hand))
    for loaded in (DDIMSchedulerPlus.from_pretrained(tmp_path), DDIMSchedulerPlus.from_config(by_hand)):
        assert loaded.config.ddim_solver_order == solver_order
        assert "solver_order" not in loaded.config  # not carried on as a hidden entry
        assert torch.equal(_final_sample(loaded), _final_sample(DDIMSchedulerPlus(**_with_ddim_solver_order(by_hand))))
    # saved again, it holds `ddim_solver_order` only, so the multistep solvers keep their own order
    DDIMSchedulerPlus.from_pretrained(tmp_path).save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "scheduler_config.json").read_text())
    assert "solver_order" not in saved and saved["ddim_solver_order"] == solver_order
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path / "again").config.solver_order == 2
    # an explicit keyword wins over the saved value; a `solver_order` keyword is read as the order too
    assert DDIMSchedulerPlus.from_config(by_hand, ddim_solver_order=3 - solver_order).config.ddim_solver_order == (
        3 - solver_order
    )
    assert DDIMSchedulerPlus.from_config(by_hand, solver_order=3 - solver_order).config.ddim_solver_order == (
        3 - solver_order
    )


def _with_ddim_solver_order(saved):
    config = {k: v for k, v in saved.items() if not k.startswith("_")}
    config["ddim_solver_order"] = config.pop("solver_order")
    return config


def test_another_schedulers_solver_order_is_not_taken_as_ours():
    dpm = DPMSolverMultistepScheduler(solver_order=3)
    ours = DDIMSchedulerPlus.from_config(dpm.config)
    assert ours.config.ddim_solver_order == 1
    # kept as a hidden entry, as diffusers does for keys of compatible schedulers, so converting back restores it
    assert DPMSolverMultistepScheduler.from_config(ours.config).config.solver_order == 3
