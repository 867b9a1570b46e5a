"""Reconstruction error of DDIM inversion vs steps: plain DDIM inversion vs `DDIMInversionPipeline`'s refinement.

A random-weight UNet has no meaningful ODE, so this script first trains a tiny UNet on the scikit-learn digits
(8x8, 1 channel, bundled with scikit-learn: nothing is downloaded) for a fixed number of steps, then inverts held-out
digits at 10 / 20 / 50 / 100 steps, decodes them with the same schedule and reports the per-pixel MSE on the [0, 1]
scale beside the paper's Table 2 (CIFAR-10): 0.014 / 0.0065 / 0.0023 / 0.0009.

    python benchmarks/bench_inversion.py                      # trains (~8 min on a busy 2-core CPU), then measures
    python benchmarks/bench_inversion.py --save-model /tmp/digits-unet  # keep the trained pipeline
    python benchmarks/bench_inversion.py --load-model /tmp/digits-unet  # skip training
    python benchmarks/bench_inversion.py --interpolation-png docs/images/interpolation.png
"""

import argparse
import os
import time

import numpy as np
import torch
from diffusers import UNet2DModel

from ddim_plus import DDIMInversionPipeline, DDIMPlusPipeline, DDIMSchedulerPlus

PAPER_TABLE_2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009}


def load_digits(num_test: int) -> tuple:
    """scikit-learn's 1797 digits as float32 (N, 1, 8, 8) in [0, 1]; the last `num_test` are held out."""
    from sklearn.datasets import load_digits as sk_load_digits

    images = sk_load_digits().images.astype(np.float32) / 16.0
    images = torch.from_numpy(images)[:, None]
    return images[:-num_test], images[-num_test:]


def make_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def train(train_images: torch.Tensor, steps: int, batch_size: int, seed: int) -> DDIMPlusPipeline:
    """Plain DDPM training (eps-prediction, MSE, linear betas, T = 1000) with an EMA of the weights."""
    torch.manual_seed(seed)
    unet = make_unet()
    ema = make_unet()
    ema.load_state_dict(unet.state_dict())
    scheduler = DDIMSchedulerPlus()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    data = train_images * 2 - 1
    start = time.perf_counter()
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch_size,))]
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            print(f"train step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    return DDIMPlusPipeline(unet=ema.eval(), scheduler=scheduler)


def reconstruction_mse(inverter: DDIMInversionPipeline, images: torch.Tensor, steps: int, refine: bool) -> tuple:
    """(per-pixel MSE of the reconstruction, UNet calls spent inverting, seconds for inversion + reconstruction)."""
    calls = []
    hook = inverter.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    start = time.perf_counter()
    out = inverter(images, num_inference_steps=steps, refine=refine, return_reconstruction=True, output_type="pt")
    seconds = time.perf_counter() - start
    hook.remove()
    inversion_calls = len(calls) - steps  # the reconstruction spends one call per step
    return float(((out.images - images) ** 2).mean()), inversion_calls, seconds


def save_interpolation_png(inverter: DDIMInversionPipeline, images: torch.Tensor, path: str, steps: int) -> None:
    """Invert two held-out digits, slerp their x_T and save the decoded path as one strip, upscaled 4x."""
    latents = inverter(images[:2], num_inference_steps=steps).latents
    frames = inverter.interpolate(latents[0], latents[1], num_frames=8, num_inference_steps=steps, output_type="np")
    strip = np.concatenate(list(frames.images[..., 0]), axis=1)  # (8, 8 * num_frames)
    strip = np.kron(strip, np.ones((4, 4)))
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray((strip * 255).round().astype(np.uint8), mode="L").save(path, optimize=True)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=2000, help="training steps of the digits UNet")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--num-test", type=int, default=128, help="held-out digits to invert")
    parser.add_argument(
        "--steps", type=int, nargs="*", default=[10, 20, 50, 100], help="inversion step counts (none: no table)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--load-model", help="a saved pipeline folder to use instead of training")
    parser.add_argument("--save-model", help="save the trained pipeline here")
    parser.add_argument("--interpolation-png", help="also save a picture of one interpolation here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_images, test_images = load_digits(args.num_test)
    if args.load_model:
        pipe = DDIMPlusPipeline.from_pretrained(args.load_model)
    else:
        pipe = train(train_images, args.train_steps, args.batch_size, args.seed)
        if args.save_model:
            pipe.save_pretrained(args.save_model)
    inverter = DDIMInversionPipeline.from_pipe(pipe)
    inverter.set_progress_bar_config(disable=True)

    print(f"\n{args.num_test} held-out sklearn digits (8x8, 1 channel), leading spacing, per-pixel MSE on [0, 1]")
    print("| steps | plain DDIM inversion | refined (ddim_plus) | plain / refined | paper Table 2 (CIFAR-10, plain) |")
    print("|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        plain, plain_calls, plain_s = reconstruction_mse(inverter, test_images, steps, refine=False)
        refined, refined_calls, refined_s = reconstruction_mse(inverter, test_images, steps, refine=True)
        paper = PAPER_TABLE_2.get(steps)
        print(
            f"| {steps} | {plain:.2e} ({plain_calls} UNet calls, {plain_s:.0f} s) "
            f"| {refined:.2e} ({refined_calls} UNet calls, {refined_s:.0f} s) | {plain / refined:.0f}x "
            f"| {paper if paper is not None else '-'} |",
            flush=True,
        )
    if args.interpolation_png:
        save_interpolation_png(inverter, test_images, args.interpolation_png, steps=50)


if __name__ == "__main__":
    main()
