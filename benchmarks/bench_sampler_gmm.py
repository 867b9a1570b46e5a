"""Sampler accuracy per model call on data whose optimal network is known exactly (a Gaussian mixture).

The network is :class:`ddim_plus.evaluation.gmm.GaussianMixtureOracle`, the exact E[eps | x_t] of a mixture of 8
diagonal Gaussians over 1x8x8 "images" (per-pixel standard deviations 0.05 to 0.2, means in [-0.7, 0.7]), so every
difference below is the sampler's own discretisation error: no training error is in the way. DDPM's linear beta
schedule (T = 1000), epsilon prediction, eta = 0, no clipping, final step to abar = 1. All samplers start from the
same x_T (seed 0).

For S in {5, 10, 20, 50}, each spacing of `DDIMSchedulerPlus` at `ddim_solver_order` 1 (the paper's DDIM) and 2
(DPM-Solver++(2M) in DDIM form), and diffusers' stock `DDIMScheduler` (leading, trailing and linspace, its own
previous-step rule t - T // S), it reports:

- FD: squared Frechet distance on raw pixels between the samples and the exact mixture moments. Estimation noise
  puts a floor under it: the FD of the same number of exact samples is printed (mean over 5 draws);
- mass: total variation between the component shares (true Bayes classifier) and the mixing weights;
- RMSE: root mean squared distance to the probability-flow ODE solution from the same x_T, per pixel (the
  solver error with no estimation noise). The reference solution is order 2 through all 1000 training timesteps.

The 1000-step order-1 DDIM is the limit the FDs are compared with.

    python benchmarks/bench_sampler_gmm.py [--num-samples 4000] [--threads 2] [--plot docs/images/sampler_gmm.png]
"""

import argparse
import time

import torch
from diffusers import DDIMScheduler

from ddim_plus import DDIMSchedulerPlus
from ddim_plus.ddim_math import DIFFUSERS_TIMESTEP_SPACINGS, TIMESTEP_SPACINGS
from ddim_plus.evaluation.gmm import (
    GaussianMixture,
    GaussianMixtureOracle,
    component_mass_error,
    frechet_distance_to_mixture,
)

STEPS = (5, 10, 20, 50)
COMMON_CONFIG = dict(clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")


def run_sampler(scheduler, oracle: GaussianMixtureOracle, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The deterministic sampling loop of `DDIMPipeline` (eta = 0), on the oracle."""
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t), t, x).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=4000, help="samples per sampler (FD on 64 pixels)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--plot", default=None, help="write a PNG plot of FD against S here (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    mixture = GaussianMixture.random(num_components=8, sample_shape=(1, 8, 8), seed=0)
    oracle = GaussianMixtureOracle(mixture, DDIMSchedulerPlus(**COMMON_CONFIG).alphas_cumprod)
    x_T = torch.randn(args.num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    floor = (
        sum(
            frechet_distance_to_mixture(
                mixture.sample(args.num_samples, torch.Generator().manual_seed(100 + i))[0], mixture
            )
            for i in range(5)
        )
        / 5
    )

    ode_solution = run_sampler(DDIMSchedulerPlus(ddim_solver_order=2, **COMMON_CONFIG), oracle, x_T, 1000)
    limit = run_sampler(DDIMSchedulerPlus(**COMMON_CONFIG), oracle, x_T, 1000)
    limit_fd = frechet_distance_to_mixture(limit, mixture)

    def measure(samples: torch.Tensor) -> tuple:
        rmse = float((samples - ode_solution).pow(2).mean().sqrt())
        return frechet_distance_to_mixture(samples, mixture), component_mass_error(samples, mixture), rmse

    rows = {}  # label -> {S: (fd, mass, rmse)}
    for spacing in TIMESTEP_SPACINGS:
        for order in (1, 2):
            scheduler = DDIMSchedulerPlus(timestep_spacing=spacing, ddim_solver_order=order, **COMMON_CONFIG)
            rows[f"ours {spacing} order {order}"] = {s: measure(run_sampler(scheduler, oracle, x_T, s)) for s in STEPS}
    for spacing in DIFFUSERS_TIMESTEP_SPACINGS:
        stock = DDIMScheduler(timestep_spacing=spacing, **COMMON_CONFIG)
        rows[f"stock DDIMScheduler {spacing}"] = {s: measure(run_sampler(stock, oracle, x_T, s)) for s in STEPS}

    print(
        f"Gaussian mixture, K={mixture.num_components}, 1x8x8, {args.num_samples} samples, torch "
        f"{torch.__version__}, {args.threads} thread(s), {time.perf_counter() - start:.0f} s"
    )
    print(f"FD of {args.num_samples} exact samples (floor, mean of 5 draws): {floor:.4f}")
    _, limit_mass, limit_rmse = measure(limit)
    print(f"1000-step order-1 DDIM (the limit): FD {limit_fd:.4f}, mass {limit_mass:.4f}, RMSE {limit_rmse:.4f}")
    print()
    header = "| sampler | " + " | ".join(f"S={s}: FD / mass / RMSE" for s in STEPS) + " |"
    print(header)
    print("|" + "---|" * (len(STEPS) + 1))
    for label, by_steps in rows.items():
        cells = " | ".join(f"{fd:.4f} / {mass:.3f} / {rmse:.4f}" for fd, mass, rmse in by_steps.values())
        print(f"| {label} | {cells} |")

    best_label, best = min(
        ((label, by_steps[10][0]) for label, by_steps in rows.items() if "order 2" in label), key=lambda item: item[1]
    )
    leading_50 = rows["ours leading order 1"][50][0]
    print()
    print(
        f"At 10 steps: best order 2 ({best_label}) FD {best:.4f} vs order-1 leading at 50 steps {leading_50:.4f}; "
        f"ratio to the 1000-step limit {best / limit_fd:.2f}"
    )
    print(f"total {time.perf_counter() - start:.0f} s, {oracle.num_calls} oracle calls")

    if args.plot:
        plot(rows, limit_fd, floor, args.plot)


def plot(rows: dict, limit_fd: float, floor: float, path: str) -> None:
    """FD against S on log-log axes, one line per sampler; the 1000-step limit and the exact-sample floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = dict(zip(TIMESTEP_SPACINGS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for label, by_steps in rows.items():
        fds = [by_steps[s][0] for s in STEPS]
        if label.startswith("stock"):
            linestyle = {"leading": ":", "trailing": "-.", "linspace": (0, (1, 4))}[label.split()[-1]]
            style = dict(color="black", linestyle=linestyle, marker="x")
        else:
            spacing = label.split()[1]
            style = dict(color=colors[spacing], linestyle="-" if label.endswith("2") else "--", marker="o")
        ax.plot(STEPS, fds, label=label, **style)
    ax.axhline(limit_fd, color="gray", linestyle="--", linewidth=1, label="1000-step DDIM (limit)")
    ax.axhline(floor, color="gray", linestyle=":", linewidth=1, label="exact samples (estimation floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(STEPS, [str(s) for s in STEPS])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("model calls S")
    ax.set_ylabel("FD to the true mixture (raw pixels)")
    ax.set_title("Exact Gaussian-mixture oracle: DDIM (order 1, dashed) vs 2M (order 2, solid)")
    ax.legend(fontsize=7, ncol=2, handlelength=4)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
