"""`ddim_plus.tune_sampler`: timesteps and per-step coefficients tuned on the exact Gaussian-mixture denoiser, judged
on latents it never saw against the exact ODE solution; the held-out check that stores nothing; the budget; the step
with tuned coefficients against eq. 12 written out here; the round trip through a saved folder and stock diffusers
loading it."""

import logging
import math

import pytest
import torch
from conftest import count_unet_calls, make_tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus, tune_sampler
from ddim_plus.evaluation.gmm import GaussianMixture, GaussianMixtureOracle
from ddim_plus.sampler_tuning import sampler_tuning_cost

CONFIG = dict(clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
MIXTURE = GaussianMixture.random(num_components=4, sample_shape=(1, 4, 4), seed=0)
TUNING = dict(num_samples=64, num_teacher_steps=40, progress=False)
STEPS = 4


def oracle_pipeline(**scheduler_config):
    oracle = GaussianMixtureOracle(MIXTURE, DDIMSchedulerPlus(**CONFIG).alphas_cumprod)
    scheduler = DDIMSchedulerPlus(
        **{**CONFIG, "timestep_spacing": "logsnr", "ddim_solver_order": 2, **scheduler_config}
    )
    return DDIMPlusPipeline(unet=oracle.as_unet(), scheduler=scheduler).to(torch.float64)


def eq12_sampler(oracle, entry, x_T):
    """The tuned sampler written out from eq. 9 and 12 (not through the scheduler): D = x0 + c (x0 - x0_prev), eps
    re-derived from D, then x_prev = sqrt(abar_prev) D + s sqrt(1 - abar_prev) eps."""
    abar = DDIMSchedulerPlus(**CONFIG).alphas_cumprod.tolist()
    timesteps = entry["timesteps"]
    x, x0_prev = x_T, None
    for i, t in enumerate(timesteps):
        a, a_prev = abar[t], abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        eps = oracle(x, t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        d = x0 if i == 0 else x0 + entry["extrapolation"][i] * (x0 - x0_prev)
        eps_d = (x - math.sqrt(a) * d) / math.sqrt(1 - a)
        x, x0_prev = math.sqrt(a_prev) * d + entry["eps_scale"][i] * math.sqrt(1 - a_prev) * eps_d, x0
    return x


@pytest.fixture(scope="module")
def heldout():
    """Latents the tuner never sees (it draws its own from its generator) and their ODE solution, computed here:
    order 2 through every 4th timestep, 250 steps."""
    oracle = oracle_pipeline().unet.oracle
    x_T = torch.randn(128, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scheduler = DDIMSchedulerPlus(ddim_solver_order=2, **CONFIG)
    scheduler.set_timesteps(timesteps=list(range(999, -1, -4)))
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t), t, x).prev_sample
    return x_T, x


@pytest.fixture(scope="module")
def tuned():
    pipe = oracle_pipeline()
    result = tune_sampler(pipe, STEPS, generator=torch.Generator().manual_seed(0), max_unet_calls=400, **TUNING)
    return pipe, result


def distance(x, exact):
    return float((x - exact).flatten(1).pow(2).mean(1).sqrt().mean())


def test_tuned_sampler_beats_untuned_and_tuned_timesteps_on_heldout_latents(tuned, heldout):
    pipe, result = tuned
    assert result.stored and result.heldout_distance < result.heldout_untuned_distance
    assert len(pipe.scheduler.config.tuned_timesteps) == 1
    entry = pipe.scheduler.config.tuned_timesteps[0]
    assert entry == result.entry and len(entry["extrapolation"]) == len(entry["eps_scale"]) == STEPS
    x_T, exact = heldout
    oracle = pipe.unet.oracle
    tuned_distance = distance(eq12_sampler(oracle, entry, x_T), exact)
    assert tuned_distance < 0.7 * distance(eq12_sampler(oracle, _plain_order2_entry(STEPS), x_T), exact)

    timesteps_only = oracle_pipeline()
    tune_sampler(
        timesteps_only,
        STEPS,
        generator=torch.Generator().manual_seed(0),
        tune_coefficients=False,
        max_unet_calls=400,
        **TUNING,
    )
    timesteps_entry = timesteps_only.scheduler.config.tuned_timesteps[0]
    assert "extrapolation" not in timesteps_entry
    samples = timesteps_only(batch_size=len(x_T), num_inference_steps=STEPS, latents=x_T, output_type="latent").images
    assert tuned_distance < distance(samples, exact)


def _plain_order2_entry(steps):
    """Untuned order 2 on the logsnr spacing as eq12_sampler's entry: the 2M weight h / (2 h_prev) in half-log-SNR
    ratios (written out here), first order on the first and, below 15 steps, the last two steps."""
    scheduler = DDIMSchedulerPlus(timestep_spacing="logsnr", **CONFIG)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    abar = scheduler.alphas_cumprod.tolist()
    lam = [math.log(abar[t] / (1 - abar[t])) for t in timesteps]
    extrapolation = [0.0] * steps
    for i in range(1, steps - 2):
        extrapolation[i] = (lam[i + 1] - lam[i]) / (2 * (lam[i] - lam[i - 1]))
    return {"timesteps": timesteps, "extrapolation": extrapolation, "eps_scale": [1.0] * steps}


def test_pipeline_samples_with_the_tuned_coefficients_as_eq12_says(tuned, heldout):
    pipe, result = tuned
    x_T = heldout[0][:8]
    samples = pipe(batch_size=len(x_T), num_inference_steps=STEPS, latents=x_T, eta=0.0, output_type="latent").images
    torch.testing.assert_close(samples, eq12_sampler(pipe.unet.oracle, result.entry, x_T), rtol=1e-9, atol=1e-9)
    # another S, or eta > 0: the plain step of the config, the tuned coefficients unused
    assert pipe.scheduler.tuned_coefficients(STEPS + 1) is None
    timesteps_only = {k: v for k, v in result.entry.items() if k not in ("extrapolation", "eps_scale")}
    plain = DDIMPlusPipeline(
        unet=pipe.unet,
        scheduler=DDIMSchedulerPlus.from_config(pipe.scheduler.config, tuned_timesteps=[timesteps_only]),
    )
    stochastic = [
        sampler(
            batch_size=len(x_T),
            num_inference_steps=STEPS,
            latents=x_T,
            eta=0.5,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        ).images
        for sampler in (pipe, plain)
    ]
    torch.testing.assert_close(stochastic[0], stochastic[1], rtol=0, atol=0)


def test_coefficients_at_their_defaults_are_the_plain_second_order_step(heldout):
    x_T = heldout[0]
    oracle = oracle_pipeline().unet.oracle
    entry = _plain_order2_entry(5)
    plain = DDIMSchedulerPlus(timestep_spacing="logsnr", ddim_solver_order=2, **CONFIG)
    plain.set_timesteps(5)
    x = x_T
    for t in plain.timesteps:
        x = plain.step(oracle(x, t), t, x).prev_sample
    torch.testing.assert_close(eq12_sampler(oracle, entry, x_T), x, rtol=1e-9, atol=1e-9)


def test_worse_than_the_stored_sampler_stores_nothing(tuned, caplog):
    """A retune with no search left (the budget is the fixed part only) gives the best fixed spacing; the sampler
    already stored is better on the held-out latents, so it stays."""
    pipe, _ = tuned
    before = dict(pipe.scheduler.config)
    least, _ = sampler_tuning_cost(STEPS, TUNING["num_teacher_steps"])
    with caplog.at_level(logging.WARNING):
        result = tune_sampler(pipe, STEPS, generator=torch.Generator().manual_seed(5), max_unet_calls=least, **TUNING)
    assert not result.stored and result.heldout_distance >= result.heldout_untuned_distance
    assert "nothing is stored" in caplog.text
    assert dict(pipe.scheduler.config) == before


def test_budget_is_printed_kept_and_refused_below_the_fixed_part(capsys):
    pipe = oracle_pipeline()
    calls = count_unet_calls(pipe)
    least, budget = sampler_tuning_cost(3, 20, 150)
    assert least == 2 * 20 + 3 * 6 and budget == 150
    result = tune_sampler(pipe, 3, num_samples=8, num_teacher_steps=20, max_unet_calls=150)
    assert f"at most 150 UNet calls on batches of 8 ({least} fixed" in capsys.readouterr().out
    assert len(calls) == result.num_unet_calls <= 150
    assert sampler_tuning_cost(5) == (430, 1430)  # the docstring's default for S = 5
    calls.clear()
    with pytest.raises(ValueError, match="`max_unet_calls`=57 is below the 58 UNet calls"):
        tune_sampler(pipe, 3, num_samples=8, num_teacher_steps=20, max_unet_calls=57)
    with pytest.raises(ValueError, match="choose 1 \\(DDIM\\) or 2"):
        tune_sampler(pipe, 3, solver_order=3)
    assert not calls


def test_round_trip_and_stock_diffusers_load_the_folder(tuned, tmp_path):
    _, result = tuned
    pipe = DDIMPlusPipeline(
        unet=make_tiny_unet(channels=1, sample_size=8),
        scheduler=DDIMSchedulerPlus(**{**CONFIG, "ddim_solver_order": 2, "tuned_timesteps": [result.entry]}),
    )
    pipe.save_pretrained(tmp_path)
    loaded = DDIMPlusPipeline.from_pretrained(tmp_path)
    assert loaded.scheduler.tuned_coefficients(STEPS) == (result.entry["extrapolation"], result.entry["eps_scale"])
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = pipe(batch_size=len(x_T), num_inference_steps=STEPS, latents=x_T, output_type="latent").images
    torch.testing.assert_close(
        loaded(batch_size=len(x_T), num_inference_steps=STEPS, latents=x_T, output_type="latent").images, before
    )

    stock = DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")  # the extra key is ignored
    reference = DDIMScheduler(**CONFIG)
    for scheduler in (stock, reference):
        scheduler.set_timesteps(STEPS)
    assert stock.timesteps.tolist() == reference.timesteps.tolist()
    stock_pipe = DDIMPipeline.from_pretrained(tmp_path)
    assert type(stock_pipe.scheduler) is DDIMScheduler
    images = stock_pipe(num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (1, 8, 8, 1)


def test_bad_coefficients_in_a_config_raise_naming_the_key():
    entry = {**_plain_order2_entry(3), "num_inference_steps": 3, "solver_order": 2}
    entry["alphas_cumprod"] = [float(DDIMSchedulerPlus().alphas_cumprod[t]) for t in entry["timesteps"]]
    entry["eps_scale"] = [1.0, float("nan"), 1.0]
    with pytest.raises(ValueError, match="`eps_scale`"):
        DDIMSchedulerPlus(tuned_timesteps=[entry])
