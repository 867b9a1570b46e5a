"""Timestep schedules tuned to the model (`ddim_plus.optimize_timesteps`, `ddim-plus tune-steps`, the scheduler's
`tuned_timesteps`): the tuner on the exact Gaussian-mixture denoiser, its call budget, the round trip through a saved
pipeline folder, stock diffusers loading that folder, and the errors on bad input."""

import json
import logging
import shutil

import pytest
import torch
from conftest import count_unet_calls, make_tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus, optimize_timesteps
from ddim_plus.cli import main
from ddim_plus.evaluation.gmm import GaussianMixture, GaussianMixtureOracle
from ddim_plus.evaluation.quality import quality_sweep
from ddim_plus.sampler_tuning import sampler_tuning_cost
from ddim_plus.timestep_tuning import tuning_cost

CONFIG = dict(clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
MIXTURE = GaussianMixture.random(num_components=4, sample_shape=(1, 4, 4), seed=0)
TUNING = dict(num_samples=64, num_teacher_steps=40, max_trials=12, progress=False)


def oracle_pipeline():
    oracle = GaussianMixtureOracle(MIXTURE, DDIMSchedulerPlus(**CONFIG).alphas_cumprod)
    return DDIMPlusPipeline(unet=oracle.as_unet(), scheduler=DDIMSchedulerPlus(**CONFIG)).to(torch.float64)


def sample_with(oracle, timesteps, order, x_T):
    """Sampling loop written out here, on the oracle itself (not through the tuner's code)."""
    scheduler = DDIMSchedulerPlus(ddim_solver_order=order, **CONFIG)
    scheduler.set_timesteps(timesteps=timesteps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t), t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def ode_solution():
    """Held-out latents and their ODE solution, computed here (order 2 through every 4th timestep: 250 steps, six
    times as many as the tuner's 40-step teacher)."""
    oracle = oracle_pipeline().unet.oracle
    x_T = torch.randn(128, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x_T, sample_with(oracle, list(range(999, -1, -4)), 2, x_T)


@pytest.mark.parametrize("order", [1, 2])
def test_tuned_schedule_beats_fixed_spacings_against_the_exact_ode_solution(order, ode_solution):
    pipe = oracle_pipeline()
    result = optimize_timesteps(
        pipe, 4, solver_order=order, generator=torch.Generator().manual_seed(0), return_details=True, **TUNING
    )
    timesteps = result.timesteps
    assert len(timesteps) == 4 and all(isinstance(t, int) for t in timesteps)
    assert all(0 <= t < 1000 for t in timesteps) and all(a > b for a, b in zip(timesteps, timesteps[1:]))

    oracle, (x_T, exact) = pipe.unet.oracle, ode_solution

    def distance(schedule):
        return float((sample_with(oracle, schedule, order, x_T) - exact).flatten(1).pow(2).mean(1).sqrt().mean())

    for spacing in ("quadratic", "logsnr", "trailing", "leading"):
        scheduler = DDIMSchedulerPlus(timestep_spacing=spacing, **CONFIG)
        scheduler.set_timesteps(4)
        assert distance(timesteps) < 0.9 * distance(scheduler.timesteps.tolist()), spacing


def test_unet_calls_are_counted_and_within_the_stated_budget():
    pipe = oracle_pipeline()
    calls = count_unet_calls(pipe)
    result = optimize_timesteps(pipe, 5, generator=torch.Generator().manual_seed(0), return_details=True, **TUNING)
    assert len(calls) == result.num_unet_calls <= tuning_cost(5, TUNING["num_teacher_steps"], TUNING["max_trials"])
    # the teacher and the three fixed spacings run whole; at least one candidate reuses a prefix
    assert len(calls) < tuning_cost(5, TUNING["num_teacher_steps"], TUNING["max_trials"])
    assert tuning_cost(5) == 200 + 5 * (3 + 50) and tuning_cost(10) == 200 + 10 * (3 + 100)  # the docstring's


def test_same_generator_gives_the_same_schedule():
    runs = [optimize_timesteps(oracle_pipeline(), 3, generator=torch.Generator().manual_seed(7), **TUNING)]
    runs.append(optimize_timesteps(oracle_pipeline(), 3, generator=torch.Generator().manual_seed(7), **TUNING))
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=1001), "below `num_teacher_steps`"),
        (dict(num_inference_steps=40), "raise `num_teacher_steps`"),
        (dict(num_inference_steps=5, num_teacher_steps=1001), "`num_teacher_steps` must be between 2 and"),
        (dict(num_inference_steps=5, solver_order=3), "choose 1 (DDIM) or 2"),
        (dict(num_inference_steps=0), "at least 1"),
        (dict(num_inference_steps=5, num_samples=0), "`num_samples`"),
    ],
)
def test_bad_requests_raise_naming_the_fix(kwargs, message):
    pipe = oracle_pipeline()
    calls = count_unet_calls(pipe)
    with pytest.raises(ValueError) as error:
        optimize_timesteps(pipe, **{"num_teacher_steps": 40, "progress": False, **kwargs})
    assert message in str(error.value)
    assert not calls


# ----------------------------------------------------------------------------------------------------------------
# Stored in a pipeline folder
# ----------------------------------------------------------------------------------------------------------------
TUNE_ARGS = ["--num-samples", "2", "--teacher-steps", "8", "--max-trials", "3", "--max-unet-calls", "60", "--quiet"]


@pytest.fixture(scope="module")
def tuned_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tuned") / "tiny"
    DDIMPlusPipeline(unet=make_tiny_unet(channels=1), scheduler=DDIMSchedulerPlus()).save_pretrained(folder)
    # Seed 0's tuned samplers pass the held-out check on this random tiny UNet, so both are stored; a tuned sampler
    # that fails it (nothing stored) is tested in tests/test_sampler_tuning.py.
    assert main(["tune-steps", str(folder), "--steps", "3", "--order", "1", *TUNE_ARGS, "--seed", "0"]) == 0
    assert main(["tune-steps", str(folder), "--steps", "2", "--order", "1", *TUNE_ARGS, "--seed", "0"]) == 0
    return folder


@pytest.fixture
def tuned_dir(tuned_once, tmp_path):
    """A fresh copy per test: some tests edit or retune it."""
    return shutil.copytree(tuned_once, tmp_path / "tiny")


def stored_entries(folder):
    with open(folder / "scheduler" / "scheduler_config.json") as handle:
        return json.load(handle)["tuned_timesteps"]


def test_tune_steps_stores_the_schedule_and_sampling_uses_it(tuned_dir, capsys):
    entries = stored_entries(tuned_dir)
    assert [(e["num_inference_steps"], e["solver_order"]) for e in entries] == [(2, 1), (3, 1)]
    three = entries[1]["timesteps"]
    assert len(three) == 3 and all(a > b for a, b in zip(three, three[1:]))
    assert entries[1]["alphas_cumprod"] == [float(DDIMSchedulerPlus().alphas_cumprod[t]) for t in three]

    pipe = DDIMPlusPipeline.from_pretrained(tuned_dir)
    seen = []
    pipe(num_inference_steps=3, callback_on_step_end=lambda p, i, t, kw: seen.append(t) or kw, output_type="np")
    assert seen == three
    pipe(num_inference_steps=4, callback_on_step_end=lambda p, i, t, kw: seen.append(t) or kw, output_type="np")
    assert seen[3:] == [750, 500, 250, 0]  # 4 steps were not tuned: the config's spacing ("leading")
    pipe.scheduler.set_timesteps(timesteps=[900, 10, 0])  # a custom schedule still wins
    assert pipe.scheduler.timesteps.tolist() == [900, 10, 0]
    order_2 = DDIMSchedulerPlus.from_config(pipe.scheduler.config, ddim_solver_order=2)
    order_2.set_timesteps(3)  # tuned for order 1 only
    assert order_2.timesteps.tolist() == [666, 333, 0]

    card = (tuned_dir / "README.md").read_text()
    assert card.count("## Tuned timestep schedules") == 1  # tuned twice, listed once
    assert f"| 3 | 1 | {', '.join(map(str, three))} |" in card and "| 2 | 1 |" in card

    # retuning the same (S, order) replaces the entry
    capsys.readouterr()
    assert main(["tune-steps", str(tuned_dir), "--steps", "3", "--order", "1", *TUNE_ARGS, "--seed", "1"]) == 0
    entries = stored_entries(tuned_dir)
    assert [(e["num_inference_steps"], e["solver_order"]) for e in entries] == [(2, 1), (3, 1)]
    printed = capsys.readouterr().out
    assert (
        f"at most {sampler_tuning_cost(3, 8, 60)[1]} UNet calls" in printed and str(entries[1]["timesteps"]) in printed
    )


def test_explicit_spacing_overrides_the_tuned_schedule(tuned_dir):
    from ddim_plus.cli import load_pipeline

    pipe = load_pipeline(str(tuned_dir), spacing="trailing", quiet=True)
    pipe.scheduler.set_timesteps(3)
    assert pipe.scheduler.timesteps.tolist() == [999, 666, 332]


def test_stock_diffusers_loads_a_tuned_folder(tuned_dir):
    scheduler = DDIMScheduler.from_pretrained(tuned_dir, subfolder="scheduler")
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [666, 333, 0]  # stock leading spacing; the extra key is ignored
    pipe = DDIMPipeline.from_pretrained(tuned_dir)
    assert type(pipe.scheduler) is DDIMScheduler
    image = pipe(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 8, 8, 1)


@pytest.mark.parametrize(
    "change", [dict(num_train_timesteps=500), dict(beta_end=0.012), dict(beta_schedule="scaled_linear")]
)
def test_schedule_tuned_for_another_noise_schedule_warns_and_is_ignored(tuned_dir, change, caplog):
    path = tuned_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **change}))
    with caplog.at_level(logging.WARNING):
        pipe = DDIMPlusPipeline.from_pretrained(tuned_dir)
    warnings = [r.getMessage() for r in caplog.records if "tuned for another noise schedule" in r.getMessage()]
    assert len(warnings) == 2
    assert "ddim-plus tune-steps MODEL --steps 3 --order 1" in " ".join(warnings)
    pipe.scheduler.set_timesteps(3)
    assert pipe.scheduler.tuned_schedule(3) is None
    expected = DDIMSchedulerPlus(**change)
    expected.set_timesteps(3)
    assert pipe.scheduler.timesteps.tolist() == expected.timesteps.tolist()


def test_cli_bad_input_exits_2_before_writing(tuned_dir, tmp_path, capsys):
    before = (tuned_dir / "scheduler" / "scheduler_config.json").read_text()
    card = (tuned_dir / "README.md").read_text()
    assert main(["tune-steps", str(tuned_dir), "--steps", "3", "--order", "3", *TUNE_ARGS]) == 2
    assert "choose 1 (DDIM) or 2" in capsys.readouterr().err
    assert main(["tune-steps", str(tuned_dir), "--steps", "1001", *TUNE_ARGS]) == 2
    assert "num_teacher_steps" in capsys.readouterr().err
    assert (tuned_dir / "scheduler" / "scheduler_config.json").read_text() == before
    assert (tuned_dir / "README.md").read_text() == card
    assert main(["tune-steps", "some-user/some-hub-model", "--steps", "3", *TUNE_ARGS]) == 2
    assert "local pipeline folder" in capsys.readouterr().err


def test_evaluate_compares_tuned_with_fixed_spacings(tuned_dir):
    pytest.importorskip("torchmetrics")
    pipe = DDIMPlusPipeline.from_pretrained(tuned_dir)
    sweep = dict(steps=[2, 3], num_images=4, batch_size=4)
    results = quality_sweep(pipe, spacings=["tuned", "leading", None], **sweep)
    labels = [(r.spacing, r.steps) for r in results]
    assert labels == [("tuned", 2), ("tuned", 3), ("leading", 2), ("leading", 3), ("tuned", 2), ("tuned", 3)]
    by_label = {(r.spacing, r.steps, i // 2): r.frechet_distance for i, r in enumerate(results)}
    assert by_label[("tuned", 3, 0)] == by_label[("tuned", 3, 2)]  # None = the model's scheduler = tuned here
    assert by_label[("tuned", 3, 0)] != by_label[("leading", 3, 1)]  # "leading" really ran leading
    with pytest.raises(ValueError, match="ddim-plus tune-steps MODEL --steps S --order 1"):
        quality_sweep(pipe, spacings=["tuned"], steps=[4], num_images=4)


def test_sliced_wasserstein_distance_against_closed_forms():
    from math import gamma, pi, sqrt

    from ddim_plus.evaluation.gmm import sliced_wasserstein_distance

    reference = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # 1-D: a shift by c moves every quantile by c
    assert sliced_wasserstein_distance(reference + 0.3, reference) == pytest.approx(0.3, rel=1e-9)
    # unequal sizes: the same distribution listed twice is at distance 0
    assert sliced_wasserstein_distance(reference.repeat(2, 1), reference) == pytest.approx(0.0, abs=1e-12)
    # D dims, shift c e_1: E|c theta_1| over uniform unit theta = c Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2))
    points = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shifted = points.clone()
    shifted[:, 0, 0, 0] += 1.0
    expected = gamma(16 / 2) / (sqrt(pi) * gamma(17 / 2))
    assert sliced_wasserstein_distance(shifted, points, num_projections=4096) == pytest.approx(expected, rel=0.03)
