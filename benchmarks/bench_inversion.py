"""Reconstruction error of DDIM inversion (the paper's Table 2): plain inversion vs `ddim_plus.invert`'s refinement.

Each image is inverted with S steps, decoded with the same S steps (eta = 0, no clipping) and scored by its per-pixel
MSE on [0, 1]; tables give the mean over images with a 95% bootstrap interval, and the denoiser calls per step of the
inversion (the whole set is one batch, so a step costs as many calls as its slowest image needs).

    # the exact denoiser: a Gaussian mixture at the ten 8x8 digit class means, std 0.1 (no training error)
    python benchmarks/bench_inversion.py gmm --steps 10 20 50 100 200 500 1000          # Table 2
    python benchmarks/bench_inversion.py gmm --candidates --steps 10 20 50 100          # iteration methods compared
    # a trained pipeline folder (`make demo`'s demo_output), on the last bundled digits at its resolution
    python benchmarks/bench_inversion.py model demo_output --num-images 128 --steps 10 20 50 100 200 500 1000
    python benchmarks/bench_inversion.py model demo_output --steps 50 --interpolation-png docs/images/interpolation.png
"""

import argparse
import os

import numpy as np
import torch

import ddim_plus
from ddim_plus import DDIMInversionPipeline, DDIMPlusPipeline, DDIMSchedulerPlus, InversionRefinement
from ddim_plus.ddim_math import TIMESTEP_SPACINGS
from ddim_plus.evaluation.digits import digits_reference_images
from ddim_plus.evaluation.gmm import GaussianMixtureOracle
from ddim_plus.evaluation.reconstruction import digits_mixture
from ddim_plus.images import make_grid
from ddim_plus.pipeline_utils import sample_shape

PAPER_TABLE_2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}

# (name, keyword arguments of ddim_plus.invert). The first is plain inversion, the peer of every ratio.
CANDIDATES = [
    ("plain DDIM inversion", dict(refine=False)),
    ("fixed point, 10 iterations", dict(refine=InversionRefinement(iterations=10, anderson_memory=0))),
    ("fixed point, 20 iterations", dict(refine=InversionRefinement(iterations=20, anderson_memory=0))),
    ("Anderson m=1, 10 iterations", dict(refine=InversionRefinement(iterations=10, anderson_memory=1))),
    ("Anderson m=2, 5 iterations", dict(refine=InversionRefinement(iterations=5, anderson_memory=2))),
    ("Anderson m=2, 10 iterations (default)", dict(refine=InversionRefinement())),
    ("Anderson m=2, 20 iterations", dict(refine=InversionRefinement(iterations=20, anderson_memory=2))),
    ("Anderson m=3, 10 iterations", dict(refine=InversionRefinement(iterations=10, anderson_memory=3))),
]


def save_interpolation_png(inverter: DDIMInversionPipeline, images: torch.Tensor, path: str, steps: int) -> None:
    """Invert two held-out digits, slerp their x_T and save the decoded path as one strip, upscaled 4x."""
    latents = inverter(images[:2], num_inference_steps=steps).latents
    frames = inverter.interpolate(latents[0], latents[1], num_frames=8, num_inference_steps=steps, output_type="np")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    make_grid(frames.images, num_columns=len(frames.images), padding=0, scale=4).save(path, optimize=True)
    print(f"wrote {path}")


def bootstrap_interval(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple:
    """95% percentile bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return tuple(np.percentile(means, [2.5, 97.5]))


def fmt(values: np.ndarray) -> str:
    low, high = bootstrap_interval(values)
    return f"{values.mean():.2e} [{low:.1e}, {high:.1e}]"


@torch.no_grad()
def reconstruction_errors(denoiser, scheduler, images: torch.Tensor, steps: int, **invert_kwargs) -> tuple:
    """(per-image MSE on [0, 1], denoiser calls per step of the inversion)."""
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return denoiser(x, t)

    latents = ddim_plus.invert(counted, images * 2 - 1, scheduler, steps, **invert_kwargs)
    decoder = ddim_plus.inversion_scheduler(scheduler)
    decoder.set_timesteps(steps)
    x = latents
    for t in decoder.timesteps:
        x = decoder.step(denoiser(x, t), int(t), x).prev_sample
    reconstruction = (x / 2 + 0.5).clamp(0, 1)
    per_image = (reconstruction - images).double().pow(2).flatten(1).mean(1).cpu().numpy()
    return per_image, calls[0] / steps


def table(denoiser, scheduler, images, steps_list, candidates, show_paper: bool) -> None:
    names = [name for name, _ in candidates]
    header = "| S | " + " | ".join(names) + (" | paper, CIFAR-10 (plain) |" if show_paper else " |")
    print(header)
    print("|---:" * (len(names) + 1 + show_paper) + "|")
    for steps in steps_list:
        cells, plain = [], None
        for _, kwargs in candidates:
            per_image, calls = reconstruction_errors(denoiser, scheduler, images, steps, **kwargs)
            if plain is None:
                plain = per_image
                cells.append(f"{fmt(per_image)} (1 call/step)")
                continue
            worse = int((per_image > plain).sum())
            cells.append(
                f"{fmt(per_image)}, {plain.mean() / per_image.mean():.3g}x, {calls:.2f} calls/step, "
                f"{worse} worse than plain"
            )
        paper = f" | {PAPER_TABLE_2.get(steps, '-')}" if show_paper else ""
        print(f"| {steps} | " + " | ".join(cells) + paper + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "denoiser", choices=["gmm", "model"], help="the exact Gaussian mixture, or a pipeline folder (`model DIR`)"
    )
    parser.add_argument("model", nargs="?", help="pipeline folder (with `model`)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 200, 500, 1000])
    parser.add_argument("--num-images", type=int, default=500, help="images inverted, one batch")
    parser.add_argument("--candidates", action="store_true", help="compare the iteration methods, not just defaults")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--spacing", choices=TIMESTEP_SPACINGS, help="`model`: timestep spacing (default: the pipeline's own)"
    )
    parser.add_argument("--interpolation-png", help="`model`: also save a picture of one interpolation here")
    args = parser.parse_args()
    if (args.interpolation_png or args.spacing) and args.denoiser != "model":
        parser.error("`--interpolation-png` and `--spacing` need `model DIR`")
    torch.set_num_threads(args.threads)
    candidates = CANDIDATES if args.candidates else [CANDIDATES[0], CANDIDATES[5]]

    if args.denoiser == "gmm":
        if args.model is not None:
            parser.error("`gmm` takes no pipeline folder")
        scheduler = DDIMSchedulerPlus(clip_sample=False)  # linear betas, T = 1000, leading spacing
        mixture = digits_mixture()
        denoiser = GaussianMixtureOracle(mixture, scheduler.alphas_cumprod)
        samples, _ = mixture.sample(args.num_images, generator=torch.Generator().manual_seed(args.seed))
        images = (samples / 2 + 0.5).clamp(0, 1)
        print(
            f"exact denoiser: Gaussian mixture at the 10 digit class means (8x8), std 0.1; {len(images)} exact "
            f"samples (clamped to [0, 1]); {scheduler.config.timestep_spacing} spacing, linear betas, T = 1000"
        )
    else:
        if args.model is None:
            parser.error("`model` needs a pipeline folder")
        pipe = DDIMPlusPipeline.from_pretrained(args.model)
        channels, size, _ = sample_shape(pipe.unet)
        images = digits_reference_images(size, channels)[-args.num_images :]
        source = f"{args.model}: the last {len(images)} bundled digits at {size}x{size}"
        if args.spacing is not None:
            pipe.scheduler = DDIMSchedulerPlus.from_config(pipe.scheduler.config, timestep_spacing=args.spacing)
        scheduler = pipe.scheduler
        denoiser = ddim_plus.make_denoiser(pipe.unet.eval())
        origin = "the pipeline's" if args.spacing is None else "--spacing"
        print(f"{source}, {scheduler.config.timestep_spacing} spacing ({origin})")
    print("per-pixel MSE on [0, 1], mean over images [95% bootstrap interval]; ratio = plain / refined\n")
    table(denoiser, scheduler, images, args.steps, candidates, show_paper=not args.candidates)
    if args.interpolation_png:
        inverter = DDIMInversionPipeline.from_pipe(pipe)
        inverter.set_progress_bar_config(disable=True)
        save_interpolation_png(inverter, images, args.interpolation_png, steps=50)


if __name__ == "__main__":
    main()
