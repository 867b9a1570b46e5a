"""Quality reached per second of sampling: ddim_plus vs diffusers' stock `DDIMPipeline`, same model, same x_T.

For each sampler and each number of steps S, the script draws the same N images (image i from seed i), times the
sampling and scores it with the Frechet distance in the shipped digits features. It then reports, for a target
quality (by default the stock pipeline's distance at its default 50 steps), the fewest seconds each sampler needs to
reach it, and the ratio stock / ours: how many times faster ddim_plus gets to the same quality.

    python benchmarks/bench_quality_per_second.py --model runs/digits-unet-8x8

MODEL is any digits pipeline (8x8 or larger, 1 channel); `python benchmarks/bench_inversion.py --save-model DIR`
or `accelerate launch --cpu training/train.py --resolution 8` make one.
"""

import argparse

import torch
from diffusers import DDIMPipeline, DDIMScheduler

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.evaluation.fid import FrechetDistance, digits_reference_images
from ddim_plus.evaluation.sampling import generate_images


def samplers(pipe: DDIMPlusPipeline) -> dict:
    """The stock pipeline as diffusers ships it, and ddim_plus with the settings docs/scheduler.md recommends."""
    config = dict(pipe.scheduler.config)
    stock_config = {key: value for key, value in config.items() if key in DDIMScheduler().config}
    stock = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(stock_config))
    same = DDIMPlusPipeline(unet=pipe.unet, scheduler=DDIMSchedulerPlus.from_config(config))
    trailing = DDIMPlusPipeline(
        unet=pipe.unet, scheduler=DDIMSchedulerPlus.from_config(config, timestep_spacing="trailing")
    )
    second_order = DDIMPlusPipeline(
        unet=pipe.unet,
        scheduler=DDIMSchedulerPlus.from_config(config, timestep_spacing="trailing", ddim_solver_order=2),
    )
    spacing = config.get("timestep_spacing", "leading")
    found = {
        f"stock DDIMPipeline ({stock.scheduler.config.timestep_spacing})": stock,
        f"ddim_plus, same settings ({spacing})": same,
        "ddim_plus, trailing": trailing,
        "ddim_plus, trailing + ddim_solver_order=2": second_order,
    }
    for sampler in found.values():
        sampler.set_progress_bar_config(disable=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a digits pipeline folder (see above)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="values of S")
    parser.add_argument("--num-images", type=int, default=200, help="images per (sampler, S)")
    parser.add_argument("--batch-size", type=int, default=200, help="images per pipeline call")
    parser.add_argument("--target-steps", type=int, default=50, help="target = the stock pipeline's FD at this S")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = DDIMPlusPipeline.from_pretrained(args.model)
    metric = FrechetDistance("digits")
    metric.update(digits_reference_images(pipe.unet.config.sample_size, pipe.unet.config.in_channels), real=True)
    steps = sorted(set(args.steps) | {args.target_steps})

    table = {}
    for name, sampler in samplers(pipe).items():
        generate_images(sampler, 2, 2, 0.0)  # warm-up: first calls pay allocation costs
        for num_steps in steps:
            generated = generate_images(
                sampler,
                args.num_images,
                num_steps,
                0.0,
                batch_size=args.batch_size,
                metric=metric,
                return_images=False,
            )
            table[name, num_steps] = (generated.frechet_distance.value, generated.seconds)

    names = list(dict.fromkeys(name for name, _ in table))
    print(f"Frechet distance in {metric.features_name} features ({args.num_images} images, eta = 0) and seconds:\n")
    print("| S | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for num_steps in steps:
        cells = [f"{table[name, num_steps][0]:.2f} ({table[name, num_steps][1]:.1f} s)" for name in names]
        print(f"| {num_steps} | " + " | ".join(cells) + " |")

    stock_name = names[0]
    target = table[stock_name, args.target_steps][0]
    print(f"\nTarget: FD <= {target:.2f} (stock at {args.target_steps} steps). Fewest steps reaching it:\n")
    print("| sampler | S | seconds | stock seconds / these seconds |")
    print("|---|---|---|---|")
    # The fewest steps, not the fewest measured seconds: on a shared machine timings jitter, step counts do not.
    reached = {name: min((s for s in steps if table[name, s][0] <= target), default=None) for name in names}
    stock_seconds = table[stock_name, reached[stock_name]][1]
    for name in names:
        if reached[name] is None:
            print(f"| {name} | - | not reached at S <= {steps[-1]} | - |")
            continue
        seconds = table[name, reached[name]][1]
        print(f"| {name} | {reached[name]} | {seconds:.1f} | {stock_seconds / seconds:.1f}x |")


if __name__ == "__main__":
    main()
