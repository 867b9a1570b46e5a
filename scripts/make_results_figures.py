"""Figures of docs/results.md that are not a steps-vs-quality sweep: sections 5.2, 5.3 and Table 2 of the paper.

    python scripts/make_results_figures.py --model demo_output --out-dir docs/images

writes `results_consistency.png` (rows = seeds, columns = S, same x_T, eta = 0; the last column is S = 1000),
`results_slerp.png` (one row per seed pair, spherical interpolation of x_T decoded with 50 steps) and prints the
consistency distances and the inversion reconstruction errors (plain vs refined) as markdown tables.
"""

import argparse
import os

import numpy as np
import torch

from ddim_plus import DDIMInversionPipeline, DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.evaluation.digits import digits_reference_images
from ddim_plus.evaluation.reconstruction import consistency, inversion_error_table
from ddim_plus.images import make_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a digits pipeline folder")
    parser.add_argument("--out-dir", default="docs/images", help="where the PNGs go")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="x_T seeds of the 5.2 grid")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100], help="S compared to --reference")
    parser.add_argument("--reference-steps", type=int, default=1000, help="S of the reference column")
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="seed pairs a b a b ...")
    parser.add_argument("--frames", type=int, default=8, help="frames per interpolation strip")
    parser.add_argument("--inversion-images", type=int, default=16, help="held-out digits inverted for Table 2")
    parser.add_argument("--spacing", default=None, help="timestep spacing (default: the model's scheduler config)")
    parser.add_argument("--no-clip", action="store_true", help="no x_0 clipping while sampling (the paper's code)")
    parser.add_argument("--skip-inversion", action="store_true", help="skip the Table 2 inversion errors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)

    pipe = DDIMPlusPipeline.from_pretrained(args.model)
    overrides = {} if args.spacing is None else {"timestep_spacing": args.spacing}
    if args.no_clip:
        overrides["clip_sample"] = False
    pipe.scheduler = DDIMSchedulerPlus.from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels

    # Section 5.2: same x_T, several S.
    result = consistency(pipe, seeds=args.seeds, steps=args.steps, reference_steps=args.reference_steps)
    columns = [*args.steps, args.reference_steps]
    rows = np.stack([result.images[s] for s in columns], axis=1)  # (seeds, S, H, W, C)
    make_grid(rows.reshape(-1, *rows.shape[2:]), num_columns=len(columns), scale=4).save(
        os.path.join(args.out_dir, "results_consistency.png")
    )
    config = pipe.scheduler.config
    print(
        f"Consistency (per-pixel MSE on [0, 1] to the S = {args.reference_steps} image, eta = 0, "
        f"{config.timestep_spacing} spacing, clip_sample={config.clip_sample}, "
        f"ddim_solver_order={config.ddim_solver_order}):\n"
    )
    print("| S | " + " | ".join(map(str, args.steps)) + " |")
    print("|---" * (len(args.steps) + 1) + "|")
    print("| MSE | " + " | ".join(f"{result.distances[s]:.2e}" for s in args.steps) + " |\n")

    # Section 5.3: slerp between pairs of x_T.
    inversion = DDIMInversionPipeline(**pipe.components)
    inversion.set_progress_bar_config(disable=True)
    strips = []
    for seed_a, seed_b in zip(args.pairs[::2], args.pairs[1::2]):
        latents = [pipe.prepare_latents(1, torch.Generator().manual_seed(s), None)[0] for s in (seed_a, seed_b)]
        frames = inversion.interpolate(*latents, num_frames=args.frames, num_inference_steps=50, output_type="np")
        strips.append(frames.images)
    make_grid(np.concatenate(strips), num_columns=args.frames, scale=4).save(
        os.path.join(args.out_dir, "results_slerp.png")
    )

    if args.skip_inversion:
        return
    # Table 2: reconstruction error of inversion, the last digits of the bundled set.
    images = digits_reference_images(resolution=size, channels=channels)[-args.inversion_images :]
    table = inversion_error_table(pipe, images, steps=args.steps)
    print(f"Inversion reconstruction error (per-pixel MSE on [0, 1], {len(images)} digits):\n")
    print("| S | plain DDIM inversion | refined (ddim_plus) |")
    print("|---|---|---|")
    for num_steps in args.steps:
        print(f"| {num_steps} | {table[False][num_steps]:.2e} | {table[True][num_steps]:.2e} |")


if __name__ == "__main__":
    main()
