"""Wall time of `DDIMPlusPipeline` vs stock diffusers `DDIMPipeline`: same UNet, same scheduler config, same noise,
same run, same outputs (asserted), and a bare loop of UNet calls (the floor any pipeline pays).

    python benchmarks/bench_pipeline.py                 # 32x32 RGB UNet, batch 4, 20 steps
    python benchmarks/bench_pipeline.py --sample-size 8 --channels 16 32   # overhead-dominated tiny UNet

Each repeat runs the three contenders back to back in a rotating order, so machine load hits them alike; the median
of the repeats is reported. The progress bars are disabled in both pipelines.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from ddim_plus import DDIMPlusPipeline


def make_unet(sample_size: int, channels: tuple) -> UNet2DModel:
    """Random weights with the output layer scaled down by 10: a random UNet at full scale makes the sampler chaotic
    (a 1e-7 change of x_T moves the images by ~5e-3), which would hide real differences between the two pipelines
    behind float rounding. The scaling changes no cost."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=8,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample-size", type=int, default=32, help="image side")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="UNet block widths")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    unet = make_unet(args.sample_size, tuple(args.channels))
    scheduler = DDIMScheduler()  # stock defaults: leading spacing, clip_sample=True
    stock = DDIMPipeline(unet=unet, scheduler=scheduler)
    ours = DDIMPlusPipeline(unet=unet, scheduler=scheduler)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    call = dict(batch_size=args.batch_size, num_inference_steps=args.steps, output_type="np")

    bare_scheduler = DDIMScheduler()
    bare_scheduler.set_timesteps(args.steps)
    bare_timesteps = list(bare_scheduler.timesteps)
    noise = torch.randn(args.batch_size, 3, args.sample_size, args.sample_size)

    def run_bare():
        with torch.inference_mode():
            for t in bare_timesteps:
                unet(noise, t)

    contenders = {
        "stock DDIMPipeline": lambda: stock(generator=torch.Generator().manual_seed(0), **call).images,
        "DDIMPlusPipeline": lambda: ours(generator=torch.Generator().manual_seed(0), **call).images,
        "bare UNet loop": run_bare,
    }
    outputs = {name: fn() for name, fn in contenders.items()}  # warm-up, and the outputs to compare
    # Equal up to float rounding (our coefficients are float64, diffusers' float32; on the CPU our UNet calls take
    # channels-last inputs), which 50 steps can amplify to ~1e-4: well under one 8-bit level (1/255 = 3.9e-3).
    np.testing.assert_allclose(outputs["DDIMPlusPipeline"], outputs["stock DDIMPipeline"], atol=1e-3)

    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.repeats):
        for name in names[r % 3 :] + names[: r % 3]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}

    params = sum(p.numel() for p in unet.parameters())
    print(
        f"UNet2DModel {args.sample_size}x{args.sample_size}x3, widths {args.channels}, {params / 1e6:.2f} M params; "
        f"batch {args.batch_size}, {args.steps} steps, {args.threads} threads, median of {args.repeats}"
    )
    print(
        "max |ours - stock| over the images:",
        float(np.abs(outputs["DDIMPlusPipeline"] - outputs["stock DDIMPipeline"]).max()),
    )
    for name, seconds in median.items():
        print(f"{name:20s} {seconds * 1e3:9.1f} ms")
    print(f"DDIMPlusPipeline / stock DDIMPipeline: {median['DDIMPlusPipeline'] / median['stock DDIMPipeline']:.3f}x")
    print(f"DDIMPlusPipeline / bare UNet loop:     {median['DDIMPlusPipeline'] / median['bare UNet loop']:.3f}x")
    print(f"stock DDIMPipeline / bare UNet loop:   {median['stock DDIMPipeline'] / median['bare UNet loop']:.3f}x")


if __name__ == "__main__":
    main()
