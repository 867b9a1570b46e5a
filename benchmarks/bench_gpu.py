"""GPU speed in one run: sampling and training against diffusers and against the chip's bf16 matrix throughput.

Sampling (S = 50, fp16 and bf16, batch 1 and 256, eager and with the UNet compiled as diffusers documents,
`torch.compile(unet, mode="reduce-overhead")`), with the 35.7M-parameter UNet of google/ddpm-cifar10-32 (random
weights): `DDIMPlusPipeline` order 1 (stock's config: leading spacing, clipping), `DDIMPlusPipeline` order 2 with
log-SNR spacing, stock `DDIMPipeline`, and a bare loop of UNet calls (the floor). Training step (bf16 autocast,
eager and compiled), with train_unconditional's UNet (`anchor_unet_config`, ~114M parameters) at 32 and 64 px:
ours (`benchmarks/bench_train.py`'s `make_ours_step`, the trainer's step) and a train_unconditional loop
(`make_train_unconditional_step`).

Every contender of a row group runs in the same process, interleaved over `--repeats` rounds; the median is
reported with its ratios to the peers. FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` (matrix
multiplications and convolutions), and the fraction of the chip is achieved FLOP/s over `--peak-tflops`, an
assumption printed with the results (default: H200's dense bf16 peak, also its fp16 peak).

Before timing, one eager sampling loop of each of ours runs under `torch.cuda.set_sync_debug_mode("error")` from
its second step to its last: any host synchronisation inside the loop stops the benchmark.

    python benchmarks/bench_gpu.py                     # on one GPU (under 8 minutes including compilation)
    python benchmarks/bench_gpu.py --tiny              # CPU smoke version: tiny UNets, batch 2, S = 3 (seconds)
"""

import argparse
import copy
import statistics
import time

import torch
from accelerate import Accelerator
from bench_pipeline import make_unet
from bench_train import make_ours_step, make_train_unconditional_step
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from diffusers.utils import logging
from torch.utils.flop_counter import FlopCounterMode

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.training.args import anchor_unet_config, default_unet_config

# google/ddpm-cifar10-32's UNet (35.7M parameters), the model of diffusers' DDIMPipeline examples.
CIFAR10_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(contenders: dict, repeats: int, device: torch.device) -> dict:
    """Median wall seconds of each callable, the contenders run in a rotating order in each round."""
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            contenders[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def compile_module(module, args, mode: str):
    # The tiny CPU run checks the code path, not the compiler: the "eager" backend traces the same graphs without a
    # C++ toolchain.
    if args.tiny:
        return torch.compile(module, backend="eager")
    return torch.compile(module, mode=mode)


def assert_loop_is_sync_free(pipe, steps: int, device: torch.device, **call) -> str:
    """Run one sampling loop with CUDA's sync debug mode set to "error" from the end of step 0 to the end of the
    last step (the set-up and post-processing outside it); returns what was checked."""
    if device.type != "cuda":
        return "not checked on the CPU (tests/test_compile_and_precision.py checks the loop for host reads)"

    def callback(pipe, i, t, callback_kwargs):
        torch.cuda.set_sync_debug_mode("error" if i < steps - 1 else "default")
        return callback_kwargs

    try:
        pipe(num_inference_steps=steps, callback_on_step_end=callback, output_type="latent", **call)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return f"no host synchronisation in steps 2-{steps}"


def print_rows(rows, peak_flops: float) -> None:
    for label, seconds, flops, ratios in rows:
        fraction = flops / seconds / peak_flops
        ratio_text = "  ".join(f"{peer} {value:.2f}x" for peer, value in ratios)
        achieved = flops / seconds / 1e12
        print(f"  {label:30s} {seconds * 1e3:9.2f} ms  {achieved:8.3g} TFLOP/s  {fraction:8.2%}  {ratio_text}")


def bench_sampling(args, device: torch.device, peak_flops: float) -> None:
    steps = args.steps
    if args.tiny:
        base = make_unet(8, (16, 32))
    else:
        torch.manual_seed(0)
        base = UNet2DModel(**CIFAR10_UNET_CONFIG).eval()
    params = sum(p.numel() for p in base.parameters())
    print(f"\n## Sampling: UNet {params / 1e6:.1f}M parameters, {base.config.sample_size} px, S = {steps}")
    print("  columns: median wall time, achieved TFLOP/s, fraction of the assumed peak, ratios to the peers")
    ddim_config = DDIMScheduler().config  # stock defaults: leading spacing, clip_sample=True
    for dtype in args.dtypes:
        unet = copy.deepcopy(base).to(device=device, dtype=dtype)
        side = unet.config.sample_size
        for batch in args.batch_sizes:
            noise = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
            t_mid = torch.tensor(500, device=device)
            with torch.no_grad():
                flops = steps * count_flops(lambda unet=unet, noise=noise, t=t_mid: unet(noise, t))
            results = {}
            for mode in ("eager", "compiled"):
                model = unet if mode == "eager" else compile_module(unet, args, args.compile_mode)
                results.update(time_sampling(args, model, mode, noise, ddim_config, device))
            print(f"### {str(dtype).replace('torch.', '')}, batch {batch}")
            rows = []
            for (name, mode), seconds in results.items():
                ratios = [("/bare same mode", seconds / results[("bare UNet loop", mode)])]
                if ("stock DDIMPipeline", mode) in results:
                    ratios.append(("/stock same mode", seconds / results[("stock DDIMPipeline", mode)]))
                if ("stock DDIMPipeline", "eager") in results:
                    ratios.append(("/stock eager", seconds / results[("stock DDIMPipeline", "eager")]))
                rows.append((f"{name}, {mode}", seconds, flops, ratios))
            print_rows(rows, peak_flops)


def time_sampling(args, model, mode: str, noise: torch.Tensor, ddim_config, device: torch.device) -> dict:
    """{(contender, mode): median seconds} of one sampling loop of S steps at `noise`'s batch size and dtype."""
    steps, batch = args.steps, noise.shape[0]
    ours_1 = DDIMPlusPipeline(unet=model, scheduler=DDIMSchedulerPlus.from_config(ddim_config))
    ours_2 = DDIMPlusPipeline(
        unet=model,
        scheduler=DDIMSchedulerPlus.from_config(ddim_config, ddim_solver_order=2, timestep_spacing="logsnr"),
    )
    stock = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(ddim_config))
    for pipe in (ours_1, ours_2, stock):
        pipe.set_progress_bar_config(disable=True)
    if mode == "eager":
        for name, pipe in (("order 1", ours_1), ("order 2 logsnr", ours_2)):
            checked = assert_loop_is_sync_free(pipe, steps, device, batch_size=batch)
            print(f"  sync check, ours {name}, {noise.dtype}, batch {batch}: {checked}")
    scheduler = DDIMSchedulerPlus.from_config(ddim_config)
    scheduler.set_timesteps(steps)
    bare_timesteps = scheduler.timesteps.to(device)

    def bare():
        with torch.no_grad():
            for t in bare_timesteps:
                model(noise, t)

    call = dict(batch_size=batch, num_inference_steps=steps, output_type="np")
    contenders = {
        "ours order 1": lambda: ours_1(generator=torch.manual_seed(0), **call),
        "ours order 2 logsnr": lambda: ours_2(generator=torch.manual_seed(0), **call),
        "stock DDIMPipeline": lambda: stock(generator=torch.manual_seed(0), **call),
        "bare UNet loop": bare,
    }
    for name, fn in list(contenders.items()):  # warm-up: compilation, CUDA graphs, allocator
        try:
            for _ in range(args.warmup):
                fn()
        except TypeError as error:  # numpy has no bfloat16, and DDIMPipeline always returns numpy images
            print(f"  {name} fails in {noise.dtype} ({error}); not timed")
            del contenders[name]
    return {(name, mode): s for name, s in median_seconds(contenders, args.repeats, device).items()}


def bench_training(args, device: torch.device, peak_flops: float) -> None:
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    print(f"\n## Training step: bf16 autocast, batch {args.train_batch_size}, AdamW, EMA, gradient clipping")
    for resolution in args.resolutions:
        config = default_unet_config(resolution, 3) if args.tiny else anchor_unet_config(resolution, 3)
        torch.manual_seed(0)
        initial = UNet2DModel.from_config(config).train()
        params = sum(p.numel() for p in initial.parameters())
        clean_images = torch.rand(args.train_batch_size, 3, resolution, resolution, device=device) * 2 - 1
        results, flops = {}, None
        for mode in ("eager", "compiled"):
            contenders = {}
            for name, make_step in (("ours", make_ours_step), ("train_unconditional", make_train_unconditional_step)):
                unet = copy.deepcopy(initial).to(device)
                if mode == "compiled":
                    unet = compile_module(unet, args, args.train_compile_mode)
                contenders[name] = make_step(unet, clean_images, accelerator)[0]
            if flops is None:
                flops = count_flops(contenders["ours"])
            for fn in contenders.values():
                for _ in range(args.warmup):
                    fn()
            for name, seconds in median_seconds(contenders, args.repeats, device).items():
                results[(name, mode)] = seconds
        print(f"### {resolution} px, UNet {params / 1e6:.1f}M parameters")
        rows = []
        for (name, mode), seconds in results.items():
            ratios = [
                ("/train_unconditional same mode", seconds / results[("train_unconditional", mode)]),
                ("/train_unconditional eager", seconds / results[("train_unconditional", "eager")]),
            ]
            rows.append((f"{name}, {mode}", seconds, flops, ratios))
        print_rows(rows, peak_flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny UNets, batch 2, S = 3, 8 px")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="assumed dense bf16 peak of the chip")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per row group (median)")
    parser.add_argument("--sections", nargs="+", default=["sampling", "training"], choices=["sampling", "training"])
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the sampling UNet")
    parser.add_argument("--train-compile-mode", default="default", help="torch.compile mode of the training UNet")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.dtypes, args.warmup = [torch.float16, torch.bfloat16], 2
    args.steps, args.batch_sizes, args.resolutions, args.train_batch_size = 50, [1, 256], [32, 64], 64
    if args.tiny:  # every code path once, in seconds: one dtype (the training step runs bf16 autocast anyway)
        args.dtypes, args.warmup, args.repeats = [torch.float16], 1, 1
        args.steps, args.batch_sizes, args.resolutions, args.train_batch_size = 3, [2], [8], 2
    logging.set_verbosity_error()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bench_gpu: {name}, torch {torch.__version__}, median of {args.repeats} interleaved rounds")
    print(f"assumed peak: {args.peak_tflops:.0f} TFLOP/s dense bf16/fp16 matrix throughput (--peak-tflops)")
    started = time.perf_counter()
    if "sampling" in args.sections:
        bench_sampling(args, device, args.peak_tflops * 1e12)
    print(f"(sampling done at {time.perf_counter() - started:.0f} s)")
    if "training" in args.sections:
        bench_training(args, device, args.peak_tflops * 1e12)
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
