"""Quality reached per second of sampling: ddim_plus vs diffusers' stock `DDIMPipeline`, same model, same x_T.

For each sampler and each number of steps S, the script draws the same `--blocks` x `--num-images` images (image i
from seed i), times the sampling and scores each block of `--num-images` with the Frechet distance in the shipped
digits features: a cell is the mean and the standard deviation over the blocks (the spread of one block's FD). It
then reports, for a target quality (the stock pipeline's mean distance at its default 50 steps), the fewest steps
and seconds each sampler needs to come within the target's spread of it, and the ratio stock / ours: how many times
faster ddim_plus gets to the same quality.

    make demo
    python benchmarks/bench_quality_per_second.py --model demo_output

MODEL is any digits pipeline (8x8 or larger, 1 channel), e.g. the one `make demo` trains.
"""

import argparse

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.evaluation.digits import digits_reference_images
from ddim_plus.evaluation.fid import frechet_distance
from ddim_plus.evaluation.sampling import generate_images
from ddim_plus.hub import STOCK_SPACINGS


def samplers(pipe: DDIMPlusPipeline) -> dict:
    """The stock pipeline with the model's scheduler config (and its spacing, or `trailing` where stock lacks the
    saved one), ddim_plus with the same settings (first order, as stock is), with the paper's quadratic spacing, with
    the second-order option, and with the saved config as it is."""
    config = dict(pipe.scheduler.config)
    saved_spacing = config.get("timestep_spacing", "leading")
    stock_spacing = saved_spacing if saved_spacing in STOCK_SPACINGS else "trailing"
    stock_config = {key: value for key, value in config.items() if key in DDIMScheduler().config}
    stock_scheduler = DDIMScheduler.from_config(stock_config, timestep_spacing=stock_spacing)
    found = {f"stock DDIMPipeline ({stock_spacing})": DDIMPipeline(unet=pipe.unet, scheduler=stock_scheduler)}
    variants = [
        (f"ddim_plus, same settings ({stock_spacing})", stock_spacing, 1),
        ("ddim_plus, quadratic", "quadratic", 1),
        (f"ddim_plus, {stock_spacing} + ddim_solver_order=2", stock_spacing, 2),
    ]
    saved = (saved_spacing, config.get("ddim_solver_order", 1))
    if saved not in [(spacing, order) for _, spacing, order in variants]:
        variants.append((f"ddim_plus, saved config ({saved[0]}, ddim_solver_order={saved[1]})", *saved))
    for name, spacing, order in variants:
        overrides = {"timestep_spacing": spacing, "ddim_solver_order": order}
        found[name] = DDIMPlusPipeline(unet=pipe.unet, scheduler=DDIMSchedulerPlus.from_config(config, **overrides))
    for sampler in found.values():
        sampler.set_progress_bar_config(disable=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a digits pipeline folder (see above)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50], help="values of S")
    parser.add_argument("--num-images", type=int, default=1000, help="images per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per (sampler, S); the spread is over blocks")
    parser.add_argument("--batch-size", type=int, default=500, help="images per pipeline call")
    parser.add_argument("--target-steps", type=int, default=50, help="target = the stock pipeline's FD at this S")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.blocks < 2:
        parser.error("`--blocks` must be at least 2: the spread is the standard deviation over blocks.")
    pipe = DDIMPlusPipeline.from_pretrained(args.model)
    reference = digits_reference_images(pipe.unet.config.sample_size, pipe.unet.config.in_channels)
    steps = sorted(set(args.steps) | {args.target_steps})

    table = {}  # (sampler, S) -> (mean FD, spread, seconds)
    for name, sampler in samplers(pipe).items():
        generate_images(sampler, 2, 2, 0.0)  # warm-up: first calls pay allocation costs
        for num_steps in steps:
            generated = generate_images(
                sampler, args.blocks * args.num_images, num_steps, 0.0, batch_size=args.batch_size
            )
            blocks = np.split(generated.images, args.blocks)
            values = [frechet_distance(reference, block).value for block in blocks]
            table[name, num_steps] = (float(np.mean(values)), float(np.std(values, ddof=1)), generated.seconds)

    names = list(dict.fromkeys(name for name, _ in table))
    print(
        f"Frechet distance in digits-cnn-v1 features, mean +- spread over {args.blocks} blocks of {args.num_images} "
        "images (eta = 0), and seconds for all blocks:\n"
    )
    print("| S | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for num_steps in steps:
        cells = [
            f"{mean:.1f} +- {spread:.1f} ({seconds:.0f} s)"
            for mean, spread, seconds in (table[n, num_steps] for n in names)
        ]
        print(f"| {num_steps} | " + " | ".join(cells) + " |")

    stock_name = names[0]
    target, target_spread, _ = table[stock_name, args.target_steps]
    print(
        f"\nTarget: FD <= {target:.1f} + {target_spread:.1f} (stock at {args.target_steps} steps, plus its spread). "
        "Fewest steps reaching it:\n"
    )
    print("| sampler | S | seconds | stock seconds / these seconds |")
    print("|---|---|---|---|")
    # The fewest steps, not the fewest measured seconds: on a shared machine timings jitter, step counts do not.
    reached = {
        name: min((s for s in steps if table[name, s][0] <= target + target_spread), default=None) for name in names
    }
    stock_seconds = table[stock_name, reached[stock_name]][2]
    for name in names:
        if reached[name] is None:
            print(f"| {name} | - | not reached at S <= {steps[-1]} | - |")
            continue
        seconds = table[name, reached[name]][2]
        print(f"| {name} | {reached[name]} | {seconds:.1f} | {stock_seconds / seconds:.1f}x |")


if __name__ == "__main__":
    main()
