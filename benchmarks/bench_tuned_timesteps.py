"""Samplers tuned to the model (`ddim_plus.tune_sampler`: timesteps and per-step coefficients;
`ddim_plus.optimize_timesteps`: timesteps only) against fixed spacings and diffusers' fast solvers, on the exact
Gaussian-mixture denoiser of `bench_sampler_gmm.py` (8 components over 1x8x8, DDPM's linear betas, epsilon
prediction, no clipping, final step to abar = 1).

For every seed s the tuner sees only the oracle, through its own latents (`num_samples` x_T drawn from seed s);
every sampler is then judged on other latents (2,000 x_T from seed 1000 + s) against a held-out reference (2,000
exact samples from seed 2000 + s). The measure is the sliced 1-Wasserstein distance
(`ddim_plus.evaluation.gmm.sliced_wasserstein_distance`, 512 directions); the table gives mean +- standard deviation
over the seeds, and for the tuned rows the difference to the quadratic spacing at the same order, paired by seed
(the seeds move all rows together). The first rows are the samplers of issue 15's table, measured in this run; the
tuned schedules are stored in and read back from the scheduler config (`tuned_timesteps`), as a saved pipeline
would use them. The tuned sampler (`tune_sampler`, order 2, its default budget) tunes on `--sampler-samples`
latents of seed s and checks itself on as many held-out ones of the same generator; its row is also given as a
ratio to the 1000-step limit, seed by seed.

    python benchmarks/bench_tuned_timesteps.py [--seeds 5] [--num-samples 256] [--steps 5,10,20] [--threads 2]
"""

import argparse
import statistics
import time

import torch
from bench_sampler_gmm import COMMON_CONFIG, run_sampler
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus, optimize_timesteps, tune_sampler
from ddim_plus.evaluation.gmm import GaussianMixture, GaussianMixtureOracle, sliced_wasserstein_distance
from ddim_plus.timestep_tuning import tuned_timesteps_entry

NUM_EVAL = 2000


def fixed_samplers():
    """The rows of issue 15's table, in its order: label -> a fresh scheduler."""
    return {
        "ddim_plus order 2, quadratic": lambda: DDIMSchedulerPlus(
            timestep_spacing="quadratic", ddim_solver_order=2, **COMMON_CONFIG
        ),
        "DPM-Solver++ 2M, Lu lambdas": lambda: DPMSolverMultistepScheduler(
            use_lu_lambdas=True, prediction_type="epsilon"
        ),
        "DPM-Solver++ 3M, Lu lambdas": lambda: DPMSolverMultistepScheduler(
            use_lu_lambdas=True, solver_order=3, prediction_type="epsilon"
        ),
        "UniPC (default)": lambda: UniPCMultistepScheduler(prediction_type="epsilon"),
        "ddim_plus order 2, logsnr (untuned)": lambda: DDIMSchedulerPlus(
            timestep_spacing="logsnr", ddim_solver_order=2, **COMMON_CONFIG
        ),
        "ddim_plus order 1, quadratic": lambda: DDIMSchedulerPlus(
            timestep_spacing="quadratic", ddim_solver_order=1, **COMMON_CONFIG
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="independent repeats (tuning, latents, reference)")
    parser.add_argument("--num-samples", type=int, default=256, help="latents the tuner scores schedules on")
    parser.add_argument("--sampler-samples", type=int, default=64, help="latents `tune_sampler` tunes on")
    parser.add_argument("--steps", default="5,10,20", help="comma-separated S")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    STEPS = [int(s) for s in args.steps.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    mixture = GaussianMixture.random(num_components=8, sample_shape=(1, 8, 8), seed=0)
    oracle = GaussianMixtureOracle(mixture, DDIMSchedulerPlus(**COMMON_CONFIG).alphas_cumprod)
    pipeline = DDIMPlusPipeline(unet=oracle.as_unet(), scheduler=DDIMSchedulerPlus(**COMMON_CONFIG)).to(torch.float64)

    tuned_labels = ["tuned sampler, order 2", "tuned, order 2", "tuned, order 1"]
    rows = {label: {s: [] for s in STEPS} for label in [*fixed_samplers(), *tuned_labels]}
    limits, floors, schedules, tuning_calls = [], [], {}, {}
    for seed in range(args.seeds):
        x_T = torch.randn(NUM_EVAL, 1, 8, 8, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
        reference = mixture.sample(NUM_EVAL, torch.Generator().manual_seed(2000 + seed), dtype=torch.float64)[0]
        exact = mixture.sample(NUM_EVAL, torch.Generator().manual_seed(3000 + seed), dtype=torch.float64)[0]
        floors.append(sliced_wasserstein_distance(exact, reference))
        limit = run_sampler(DDIMSchedulerPlus(**COMMON_CONFIG), oracle, x_T, 1000)
        limits.append(sliced_wasserstein_distance(limit, reference))
        for label, make in fixed_samplers().items():
            for steps in STEPS:
                samples = run_sampler(make(), oracle, x_T, steps)
                rows[label][steps].append(sliced_wasserstein_distance(samples, reference))
        for steps in STEPS:
            sampler_pipeline = DDIMPlusPipeline(unet=pipeline.unet, scheduler=DDIMSchedulerPlus(**COMMON_CONFIG))
            result = tune_sampler(
                sampler_pipeline,
                steps,
                num_samples=args.sampler_samples,
                generator=torch.Generator().manual_seed(seed),
                progress=False,
            )
            tuning_calls[("sampler", steps)] = result.num_unet_calls
            schedules.setdefault(("sampler", steps), []).append(result.entry)
            # not stored (worse on its own held-out latents): the pipeline keeps its untuned sampler
            samples = run_sampler(sampler_pipeline.scheduler, oracle, x_T, steps)
            rows["tuned sampler, order 2"][steps].append(sliced_wasserstein_distance(samples, reference))
        for order in (2, 1):
            for steps in STEPS:
                calls_before = oracle.num_calls
                timesteps = optimize_timesteps(
                    pipeline,
                    steps,
                    solver_order=order,
                    num_samples=args.num_samples,
                    generator=torch.Generator().manual_seed(seed),
                    progress=False,
                )
                tuning_calls[(order, steps)] = oracle.num_calls - calls_before
                schedules.setdefault((order, steps), []).append(timesteps)
                entry = tuned_timesteps_entry(pipeline.scheduler, timesteps, order)
                scheduler = DDIMSchedulerPlus(ddim_solver_order=order, tuned_timesteps=[entry], **COMMON_CONFIG)
                samples = run_sampler(scheduler, oracle, x_T, steps)
                rows[f"tuned, order {order}"][steps].append(sliced_wasserstein_distance(samples, reference))

    def cell(values):
        spread = f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.4f}{spread}"

    print(
        f"Gaussian mixture, K={mixture.num_components}, 1x8x8; sliced W1 (512 directions) of {NUM_EVAL} samples to "
        f"{NUM_EVAL} held-out exact samples; mean +- std over {args.seeds} seeds; tuner on {args.num_samples} other "
        f"latents; torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"exact samples (floor): {cell(floors)}; 1000-step order-1 DDIM (limit): {cell(limits)}")
    print()
    print("| sampler | " + " | ".join(f"S = {s}" for s in STEPS) + " |")
    print("|" + "---|" * (len(STEPS) + 1))
    for label, by_steps in rows.items():
        print(f"| {label} | " + " | ".join(cell(by_steps[s]) for s in STEPS) + " |")
    # The seeds move every row together (shared latents and reference): the paired difference is far less noisy.
    for order in (2, 1):
        tuned, fixed = rows[f"tuned, order {order}"], rows[f"ddim_plus order {order}, quadratic"]
        differences = [cell([a - b for a, b in zip(tuned[s], fixed[s])]) for s in STEPS]
        print(f"| tuned minus quadratic, order {order} (paired by seed) | " + " | ".join(differences) + " |")
    ratios = [cell([a / b for a, b in zip(rows["tuned sampler, order 2"][s], limits)]) for s in STEPS]
    print("| tuned sampler / 1000-step limit (ratio by seed) | " + " | ".join(ratios) + " |")
    print()
    for steps in STEPS:
        entry = schedules[("sampler", steps)][0]
        print(
            f"tuned sampler, S = {steps}: {tuning_calls[('sampler', steps)]} UNet calls for the last tuning; seed 0 "
            f"found timesteps {entry['timesteps']}, extrapolation "
            f"{[round(c, 3) for c in entry.get('extrapolation', [])]}, eps_scale "
            f"{[round(c, 3) for c in entry.get('eps_scale', [])]}"
        )
    schedules = {key: found for key, found in schedules.items() if key[0] != "sampler"}
    for (order, steps), found in sorted(schedules.items()):
        calls = tuning_calls[(order, steps)]
        print(f"order {order}, S = {steps}: {calls} oracle calls for the last tuning; seed 0 found {found[0]}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
