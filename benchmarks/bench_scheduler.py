"""Per-step overhead of `DDIMSchedulerPlus.step` against stock diffusers `DDIMScheduler.step`, in the same run.

Both schedulers get the same work: batch 1, 3x32x32 float32 on the CPU, S=50 leading-spaced timesteps, the same
fixed "model output" (the network is not part of what is measured), and for eta > 0 the noise drawn from a seeded
`torch.Generator` inside `step`, as a pipeline does. A run is one full 50-step sampling loop; the per-step time is
the loop time divided by 50, and the median (and minimum) over `--repeats` runs is reported. Runs of the two
schedulers are interleaved so that load from other processes affects both alike.

    python benchmarks/bench_scheduler.py [--repeats 30] [--steps 50] [--threads 1]
"""

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler

from ddim_plus import DDIMSchedulerPlus


def time_one_loop(scheduler, sample: torch.Tensor, model_output: torch.Tensor, eta: float) -> float:
    """Seconds per step of one sampling loop over `scheduler.timesteps` (model output held fixed)."""
    generator = torch.Generator().manual_seed(0)
    timesteps = scheduler.timesteps
    start = time.perf_counter()
    for t in timesteps:
        sample = scheduler.step(model_output, t, sample, eta=eta, generator=generator).prev_sample
    return (time.perf_counter() - start) / len(timesteps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="sampling loops per scheduler and eta (median)")
    parser.add_argument("--steps", type=int, default=50, help="number of inference steps S")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, stock = DDIMSchedulerPlus(), DDIMScheduler()
    ours.set_timesteps(args.steps)
    stock.set_timesteps(args.steps)
    sample = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model_output = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 1 x 3x32x32, S={args.steps}")
    print("per-step microseconds, median (min) over the runs; the min is the least disturbed by other load")
    print(f"{'eta':>4} {'stock':>16} {'ours':>16} {'ratio ours/stock':>18}")
    for eta in (0.0, 1.0):
        for scheduler in (stock, ours):  # warm-up (first-call allocations, lazy imports)
            time_one_loop(scheduler, sample, model_output, eta)
        stock_times, ours_times = [], []
        for _ in range(args.repeats):
            stock_times.append(time_one_loop(stock, sample, model_output, eta))
            ours_times.append(time_one_loop(ours, sample, model_output, eta))
        stock_us, ours_us = statistics.median(stock_times) * 1e6, statistics.median(ours_times) * 1e6
        stock_min, ours_min = min(stock_times) * 1e6, min(ours_times) * 1e6
        print(
            f"{eta:>4.1f} {stock_us:>8.1f} ({stock_min:>5.1f}) {ours_us:>8.1f} ({ours_min:>5.1f}) "
            f"{ours_us / stock_us:>10.2f} ({ours_min / stock_min:.2f})"
        )


if __name__ == "__main__":
    main()
