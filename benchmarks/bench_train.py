"""Optimiser steps per second of our trainer's step against a bare PyTorch loop and a train_unconditional-style
loop, in the same run.

All three train a copy of the same UNet (the trainer's default digits UNet, 16x16x1, ~0.27M parameters, or
`--resolution`/`--batch_size` to change the work) on the same fixed batch with AdamW:

- ours: the loop body of `ddim_plus.train` (which `training/train.py` runs):
  noise and timesteps from a per-step keyed generator, `DDIMSchedulerPlus.add_noise`, the loss, backward, gradient
  clipping, optimiser and LR-scheduler steps, then the EMA update (`EMAModel`, fused `foreach`);
- bare: forward, MSE against the noise, backward, `optimizer.step()`, `zero_grad()` (no clipping, no EMA);
- train_unconditional: the loop body of diffusers' example (global-RNG noise, `DDPMScheduler.add_noise`,
  `accelerator.accumulate`, clipping, LR scheduler, per-parameter `EMAModel.step`).

Rounds of `--steps` steps run interleaved (ours, bare, diffusers, ours, ...) so that load from other processes hits
all alike; the median seconds per step over `--rounds` rounds is reported with the ratios.

    python benchmarks/bench_train.py [--rounds 7] [--steps 10] [--threads 1] [--batch_size 64] [--resolution 16]
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ddim_plus import DDIMSchedulerPlus
from ddim_plus.training.args import default_unet_config
from ddim_plus.training.ema import create_ema_model
from ddim_plus.training.loss import diffusion_loss, sample_noise_and_timesteps, step_generator


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)


def make_ours_step(unet, clean_images: torch.Tensor, accelerator: Accelerator, total_steps: int = 10**6):
    """One optimiser step of ours, exactly as `ddim_plus.train` runs it, on `clean_images` (prepares `unet` with
    its optimiser and LR scheduler on `accelerator`). Returns the step function and the prepared UNet."""
    optimizer = make_optimizer(unet)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = create_ema_model(unet)
    noise_scheduler = DDIMSchedulerPlus()
    counter = iter(range(total_steps))

    def step():
        generator = step_generator(0, next(counter), 0, device=clean_images.device)
        with accelerator.accumulate(unet):
            noise, timesteps = sample_noise_and_timesteps(clean_images, 1000, generator)
            with accelerator.autocast():
                loss = diffusion_loss(unet, noise_scheduler, clean_images, noise, timesteps)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    return step, unet


def make_train_unconditional_step(unet, clean_images: torch.Tensor, accelerator: Accelerator, total_steps=10**6):
    """One optimiser step of diffusers' train_unconditional loop body on `clean_images` (global-RNG noise,
    `DDPMScheduler.add_noise`, clipping, LR scheduler, per-parameter `EMAModel.step`). Returns the step function
    and the prepared UNet."""
    config = unet.config
    optimizer = make_optimizer(unet)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMAModel(
        unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
        model_cls=UNet2DModel, model_config=config,
    )  # fmt: skip
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    batch_size = clean_images.shape[0]

    def step():
        noise = torch.randn(clean_images.shape, dtype=clean_images.dtype, device=clean_images.device)
        timesteps = torch.randint(0, 1000, (batch_size,), device=clean_images.device).long()
        noisy = ddpm.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(unet):
            loss = F.mse_loss(unet(noisy, timesteps).sample.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(unet.parameters())

    return step, unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per loop (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared box)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per step")
    parser.add_argument("--resolution", type=int, default=16, help="image side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    initial = UNet2DModel.from_config(default_unet_config(args.resolution, 1)).train()
    clean_images = torch.rand(args.batch_size, 1, args.resolution, args.resolution) * 2 - 1
    accelerator = Accelerator(cpu=True)
    ours_step, _ = make_ours_step(copy.deepcopy(initial), clean_images, accelerator)

    # Bare PyTorch.
    bare_unet = copy.deepcopy(initial)
    bare_optimizer = make_optimizer(bare_unet)
    bare_scheduler = DDIMSchedulerPlus()

    def bare_step():
        noise = torch.randn_like(clean_images)
        timesteps = torch.randint(0, 1000, (args.batch_size,))
        noisy = bare_scheduler.add_noise(clean_images, noise, timesteps)
        loss = F.mse_loss(bare_unet(noisy, timesteps).sample, noise)
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    diffusers_step, _ = make_train_unconditional_step(copy.deepcopy(initial), clean_images, accelerator)

    loops = {"ours": ours_step, "bare": bare_step, "train_unconditional": diffusers_step}
    for step in loops.values():  # warm-up: allocator, Adam state
        step()
        step()
    # Wall time is what users wait for; CPU time (this process) is what each loop costs, and is far less
    # disturbed by other processes on a shared machine.
    seconds = {name: [] for name in loops}
    cpu_seconds = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            seconds[name].append((time.perf_counter() - start) / args.steps)
            cpu_seconds[name].append((time.process_time() - cpu_start) / args.steps)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_seconds.items()}
    print(
        f"UNet {sum(p.numel() for p in initial.parameters()) / 1e6:.2f}M params, batch {args.batch_size}x1x"
        f"{args.resolution}x{args.resolution}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps"
    )
    for name, value in median.items():
        print(
            f"{name:>20}: {1 / value:6.2f} steps/s ({value * 1e3:7.1f} ms/step wall, "
            f"min {min(seconds[name]) * 1e3:.1f}; {cpu_median[name] * 1e3:7.1f} ms/step CPU)"
        )
    for peer in ("bare", "train_unconditional"):
        print(
            f"ours / {peer}: {median['ours'] / median[peer]:.3f} wall, {cpu_median['ours'] / cpu_median[peer]:.3f} CPU"
        )


if __name__ == "__main__":
    main()
