"""Frechet distance of a digits pipeline's samples for every sampler setting docs/results.md reports, with spreads.

Each cell draws `--blocks` x `--block-size` images in one batch from one generator seeded `--seed` on the device
(the same x_T in every cell; per-image generators, as `ddim_plus.evaluation.sampling.generate_images` uses for
results independent of batching, would cost a host call per image and step) and scores each block of `--block-size`
images against all 1,797 real digits in the shipped digits-CNN features. A cell reports the mean over blocks and
their standard deviation: the spread of one block's FD between draws of x_T, which a difference must exceed to
count. Sampler settings that are not in the saved config come as overrides of it.

    python scripts/measure_demo_sampling.py demo_output --out runs/demo_sampling.json           # CPU: hours
    python scripts/measure_demo_sampling.py demo_output --device cuda --out runs/demo_sampling.json  # GPU: minutes
"""

import argparse
import json
import os
import time

import diffusers
import numpy as np
import torch

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.ddim_math import SIGMA_HAT, TIMESTEP_SPACINGS
from ddim_plus.evaluation.digits import digits_reference_images
from ddim_plus.evaluation.fid import frechet_distance

ETAS = (0.0, 0.2, 0.5, 1.0, SIGMA_HAT)
TABLE1_STEPS = (10, 20, 50, 100, 200, 1000)


# The paper's sampler as Table 1 measured it: first order, trailing spacing.
FIRST_ORDER = {"ddim_solver_order": 1, "timestep_spacing": "trailing"}


def cells(saved_clip: bool):
    """(name, scheduler overrides, S, eta, use_clipped_model_output) for every cell of the report."""
    # The saved config as it is (second order for the demo), at every S, and at S = 1000 against eta = 1, with the
    # saved clipping and the other one.
    for steps in TABLE1_STEPS:
        yield "saved", {}, steps, 0.0, None
    yield "saved", {}, 1000, 1.0, None
    for eta in (0.0, 1.0):
        yield "saved_other_clip", {"clip_sample": not saved_clip}, 1000, eta, None
    # The paper's Table 1 and the clipping comparison: first-order DDIM, the paper's sampler.
    for eta in ETAS:
        for steps in TABLE1_STEPS if eta in (0.0, 1.0) else (10, 20, 50, 100, 1000):
            yield "table1", FIRST_ORDER, steps, eta, None
    for steps in TABLE1_STEPS:
        yield "other_clip", {**FIRST_ORDER, "clip_sample": not saved_clip}, steps, 0.0, None
    yield "other_clip", {**FIRST_ORDER, "clip_sample": not saved_clip}, 1000, 1.0, None
    for steps in TABLE1_STEPS:
        yield "stock_clipping", {**FIRST_ORDER, "clip_sample": True}, steps, 0.0, False
    for spacing in TIMESTEP_SPACINGS:
        for steps in (10, 20, 50):
            yield f"spacing:{spacing}", {**FIRST_ORDER, "timestep_spacing": spacing}, steps, 0.0, None
    # The saved second order with the other spacings (S = 1000 takes every timestep with any spacing).
    for spacing in ("trailing", "quadratic", "logsnr"):
        for steps in TABLE1_STEPS[:-1]:
            yield f"order2:{spacing}", {"timestep_spacing": spacing, "ddim_solver_order": 2}, steps, 0.0, None
    # S = 20 against S = 1000 (docs/results.md): first order with the folder's stored schedule (one tuned by
    # `ddim-plus tune-steps --order 1` included), fixed spacings at either order, and the first-order S = 1000.
    untuned = {"tuned_timesteps": None}
    yield "s20:order1-as-stored", FIRST_ORDER, 20, 0.0, None
    for spacing in ("trailing", "quadratic"):
        for order in (1, 2):
            overrides = {**untuned, "timestep_spacing": spacing, "ddim_solver_order": order}
            yield f"s20:{spacing}+order{order}", overrides, 20, 0.0, None
    yield "s20:trailing+order2", {**untuned, "timestep_spacing": "trailing", "ddim_solver_order": 2}, 10, 0.0, None
    yield "s20:trailing+order1", {**untuned, "timestep_spacing": "trailing", **FIRST_ORDER}, 1000, 0.0, None
    # Few steps (docs/sampler_quality.md): the folder's own sampler (a sampler or timesteps stored by
    # `ddim-plus tune-steps` included), the untuned saved config, and diffusers' multistep solvers from its config.
    for steps in (5, 10):
        yield "fewstep:as-stored", {}, steps, 0.0, None
        order2 = {**untuned, "timestep_spacing": "logsnr", "ddim_solver_order": 2}
        yield "fewstep:logsnr+order2", order2, steps, 0.0, None
        # diffusers' defaults (linspace, its own lower-order final steps), and DPM-Solver++ with Lu's lambdas
        for order in (2, 3):
            dpm = {"scheduler": "DPMSolverMultistepScheduler", "solver_order": order, "timestep_spacing": "linspace"}
            yield f"fewstep:dpmsolver++{order}m", dpm, steps, 0.0, None
            yield f"fewstep:dpmsolver++{order}m-lu", {**dpm, "use_lu_lambdas": True}, steps, 0.0, None
        unipc = {"scheduler": "UniPCMultistepScheduler", "timestep_spacing": "linspace"}
        yield "fewstep:unipc", unipc, steps, 0.0, None


def sample_cell(pipe, overrides, steps, eta, use_clipped, seed, size, device):
    sigma_type = SIGMA_HAT if eta == SIGMA_HAT else "eta"
    overrides = dict(overrides)
    stock = overrides.pop("scheduler", None)  # a diffusers scheduler class, made from the folder's config
    if stock is not None:
        scheduler = getattr(diffusers, stock).from_config(pipe.scheduler.config, **overrides)
    else:
        scheduler = DDIMSchedulerPlus.from_config(pipe.scheduler.config, sigma_type=sigma_type, **overrides)
    sampler = DDIMPlusPipeline(unet=pipe.unet, scheduler=scheduler)
    sampler.set_progress_bar_config(disable=True)
    return sampler(
        batch_size=size,
        generator=torch.Generator(device=device).manual_seed(seed),
        eta=0.0 if eta == SIGMA_HAT else eta,
        num_inference_steps=steps,
        use_clipped_model_output=use_clipped,
        output_type="np",
    ).images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a DDIMPlusPipeline folder trained on the digits")
    parser.add_argument("--out", required=True, help="JSON lines file, one record per cell")
    parser.add_argument("--blocks", type=int, default=5, help="independent blocks of x_T per cell")
    parser.add_argument("--block-size", type=int, default=1000, help="images per block")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first block")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--cells",
        default=None,
        help="only these cells, comma-separated: a name (saved, table1, ...) or the family before a colon (s20)",
    )
    parser.add_argument(
        "--steps", default=None, help="only the cells with these S, comma-separated, e.g. 20,1000 (default: all)"
    )
    parser.add_argument("--eta", type=float, default=None, help="only the cells with this eta (default: all)")
    args = parser.parse_args()
    if args.blocks < 2 or args.block_size < 2:
        parser.error("`--blocks` and `--block-size` must be >= 2 (a spread needs two blocks).")

    pipe = DDIMPlusPipeline.from_pretrained(args.model).to(args.device)
    reference = digits_reference_images(pipe.unet.config.sample_size, pipe.unet.config.in_channels)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rng = np.random.default_rng(args.seed)
    real_floor = [
        frechet_distance(reference, reference[rng.choice(len(reference), args.block_size, replace=False)]).value
        for _ in range(args.blocks)
    ]
    floor = {"cell": "real digits", "fd_mean": float(np.mean(real_floor)), "fd_std": float(np.std(real_floor, ddof=1))}
    out = open(args.out, "w", encoding="utf-8")  # one line per cell as it finishes, so a stopped run keeps its cells
    out.write(json.dumps(floor) + "\n")
    for name, overrides, steps, eta, use_clipped in cells(bool(pipe.scheduler.config.clip_sample)):
        if args.cells is not None and not {name, name.split(":")[0]} & set(args.cells.split(",")):
            continue
        if args.steps is not None and steps not in {int(part) for part in args.steps.split(",")}:
            continue
        if args.eta is not None and eta != args.eta:
            continue
        started = time.perf_counter()
        images = sample_cell(
            pipe, overrides, steps, eta, use_clipped, args.seed, args.blocks * args.block_size, args.device
        )
        values = [
            frechet_distance(reference, images[b * args.block_size : (b + 1) * args.block_size]).value
            for b in range(args.blocks)
        ]
        record = {
            "cell": name,
            "overrides": overrides,
            "S": steps,
            "eta": eta,
            "use_clipped_model_output": use_clipped,
            "fd_mean": float(np.mean(values)),
            "fd_std": float(np.std(values, ddof=1)),
            "fd_blocks": values,
            "seconds": time.perf_counter() - started,
        }
        out.write(json.dumps(record) + "\n")
        out.flush()
        print(json.dumps(record), flush=True)
    out.close()
    print(f"real digits, {args.block_size} of 1,797 against all: FD {floor['fd_mean']:.2f} +- {floor['fd_std']:.2f}")


if __name__ == "__main__":
    main()
