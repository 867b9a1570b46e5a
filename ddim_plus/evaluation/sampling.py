"""Seeded image generation: the one path by which the CLI, the trainer, the sweeps and the benchmarks draw images.

Image i always starts from x_T drawn by a CPU generator seeded ``seed + i``, so a set of N images does not depend on
how it is cut up. The N images are cut into shards of `shard_size` consecutive images; under ``accelerate launch``
each round of shards is split between the processes with accelerate's `PartialState.split_between_processes`.
Nothing holds more than one shard per process: the Frechet statistics (torchmetrics' float64 sums) of each shard
are gathered from every process and added up in shard order on each of them, so the sums, and the distance, are
bit-identical for any number of processes. Images are scored as the 8-bit PNGs they would be saved as, so a shard
read back from disk scores exactly like one just generated; that is what lets a killed run resume.

Within a shard the images are decoded `batch_size` at a time. Batched convolutions round differently from single
ones (up to ~1e-5 on [0, 1] on the CPU), so two batch sizes give the same 8-bit images except where a pixel lies that
close to a rounding boundary; the number of processes changes nothing, since every shard is decoded in the same
batches wherever it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import PIL.Image
import torch

from ..images import load_image_file
from .fid import FrechetDistance, FrechetDistanceResult

SHARD_SIZE = 1000
MANIFEST_NAME = "ddim_plus_samples.json"


class SampleFolderError(ValueError):
    """Raised when an image folder holds images generated with other settings than the ones asked for."""


@dataclass
class GeneratedImages:
    """What `generate_images` returns.

    Args:
        images (`np.ndarray` or `None`): (N, H, W, C) floats in [0, 1] holding the 8-bit values that were scored and
            saved; `None` when not asked for, and on every process but the main one.
        frechet_distance (`FrechetDistanceResult` or `None`): the distance, when a metric was given.
        seconds (`float`): wall time this process spent decoding (not reading shards back, not scoring).
        num_resumed (`int`): images read back from `image_dir` instead of generated (all processes together).
    """

    images: Optional[np.ndarray]
    frechet_distance: Optional[FrechetDistanceResult]
    seconds: float
    num_resumed: int


def process_state():
    """accelerate's `PartialState` for this process.

    Several processes launched on a machine without GPUs (``accelerate launch --multi_gpu`` on a CPU box) would each
    run alone; on the CPU they form one gloo group instead, as in the trainer.
    """
    from accelerate import PartialState

    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return PartialState(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_gpu)


def image_path(image_dir: str, index: int) -> str:
    """Where image `index` is saved: ``image_dir/000123.png``, the flat layout external FID tools read."""
    return os.path.join(image_dir, f"{index:06d}.png")


def generation_settings(sampler, num_inference_steps: int, eta: float, seed: int) -> dict:
    """Everything that decides the images (weights, sampler, scheduler config, S, eta, seed), for an image folder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sampler.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    config = {key: value for key, value in sampler.scheduler.config.items() if not key.startswith("_")}
    return json.loads(
        json.dumps(
            {
                "unet_sha256": digest.hexdigest(),
                "pipeline": type(sampler).__name__,
                "scheduler": type(sampler.scheduler).__name__,
                "scheduler_config": config,
                "num_inference_steps": int(num_inference_steps),
                "eta": float(eta),
                "seed": int(seed),
            },
            default=str,
        )
    )


def _prepare_image_dir(image_dir: str, settings: dict, state) -> None:
    """Check (all processes) and write (main process) the folder's manifest; refuse a folder of other images."""
    manifest = os.path.join(image_dir, MANIFEST_NAME)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as file:
            found = json.load(file)
        differing = sorted(key for key in set(found) | set(settings) if found.get(key) != settings.get(key))
        if differing:
            raise SampleFolderError(
                f"`image_dir` {image_dir!r} holds images generated with other settings (different "
                f"{', '.join(differing)}); choose an empty folder, or delete this one to start over."
            )
    elif os.path.isdir(image_dir) and any(name.endswith(".png") for name in os.listdir(image_dir)):
        raise SampleFolderError(
            f"`image_dir` {image_dir!r} holds PNG files but no {MANIFEST_NAME}, so they cannot be checked against "
            "these settings; choose an empty folder."
        )
    if state is not None:
        state.wait_for_everyone()  # every process has read the folder before the main process writes to it
    if state is None or state.is_main_process:
        os.makedirs(image_dir, exist_ok=True)
        if not os.path.isfile(manifest):
            with open(manifest + ".tmp", "w", encoding="utf-8") as file:
                json.dump(settings, file, indent=2)
            os.replace(manifest + ".tmp", manifest)
    if state is not None:
        state.wait_for_everyone()


def _save_png(pixels: np.ndarray, path: str) -> None:
    # Written under a temporary name and renamed, so a killed run leaves whole PNGs or none.
    PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def _load_png(path: str, channels: int) -> np.ndarray:
    pixels = np.asarray(load_image_file(path, "L" if channels == 1 else "RGB"))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _decode(sampler, start: int, count: int, num_inference_steps: int, eta: float, seed: int, batch_size: int):
    """Images start..start+count-1 as (count, H, W, C) uint8, rounded as `numpy_to_pil` rounds them."""
    batches = []
    for first in range(start, start + count, batch_size):
        size = min(batch_size, start + count - first)
        generators = [torch.Generator(device="cpu").manual_seed(seed + first + i) for i in range(size)]
        output = sampler(
            batch_size=size, generator=generators, eta=eta, num_inference_steps=num_inference_steps, output_type="np"
        )
        batches.append((output.images * 255).round().astype(np.uint8))
    return np.concatenate(batches)


def generate_images(
    sampler,
    num_images: int,
    num_inference_steps: int,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    metric: Optional[FrechetDistance] = None,
    image_dir: Optional[str] = None,
    return_images: bool = True,
    split_across_processes: bool = False,
    shard_size: int = SHARD_SIZE,
) -> GeneratedImages:
    """Generate `num_images` images, image i from the generator seeded `seed + i`; optionally score and save them.

    Args:
        sampler (`DDIMPlusPipeline` or `diffusers.DDIMPipeline`): the pipeline to call (progress bar as configured).
        num_images (`int`): N.
        num_inference_steps (`int`): S.
        eta (`float`, defaults to 0.0): eta.
        seed (`int`, defaults to 0): seed of image 0.
        batch_size (`int`, defaults to 64): images per pipeline call (capped at `shard_size`).
        metric (`FrechetDistance`, *optional*): holds the reference statistics; the generated images' distance to
            them is returned, and the metric is left holding the generated set's statistics.
        image_dir (`str`, *optional*): save image i as ``image_dir/{i:06d}.png`` (with a manifest of the settings).
            Shards whose PNGs are all there already are read back instead of generated, so rerunning a killed run
            finishes it with the same result; a folder of images made with other settings is refused.
        return_images (`bool`, defaults to True): also return all N images (on the main process); False keeps the
            memory to one shard per process, whatever N.
        split_across_processes (`bool`, defaults to False): split the shards between the processes of an
            ``accelerate launch``; every process must then call this function with the same arguments.
        shard_size (`int`, defaults to 1000): images per unit of work, of resumption and of summation.

    Returns:
        `GeneratedImages`
    """
    if num_images < 1 or num_inference_steps < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(
            "`num_images`, `num_inference_steps`, `batch_size` and `shard_size` must be at least 1, got "
            f"{num_images}, {num_inference_steps}, {batch_size} and {shard_size}."
        )
    state = process_state() if split_across_processes else None
    num_processes = 1 if state is None else state.num_processes
    is_main = state is None or state.is_main_process
    channels = sampler.unet.config.in_channels
    if image_dir is not None:
        _prepare_image_dir(image_dir, generation_settings(sampler, num_inference_steps, eta, seed), state)
    shards = [(start, min(shard_size, num_images - start)) for start in range(0, num_images, shard_size)]
    batch_size = min(batch_size, shard_size)

    total, kept, seconds, resumed = None, [], 0.0, 0
    for first in range(0, len(shards), num_processes):
        round_shards = shards[first : first + num_processes]
        if state is None:
            mine = round_shards
        else:
            with state.split_between_processes(round_shards) as split:
                mine = list(split)
        images = statistics = None
        if mine:
            ((start, count),) = mine
            paths = [image_path(image_dir, i) for i in range(start, start + count)] if image_dir else []
            if paths and all(os.path.isfile(path) for path in paths):
                images = np.stack([_load_png(path, channels) for path in paths])
                resumed += count
            else:
                started = time.perf_counter()
                images = _decode(sampler, start, count, num_inference_steps, eta, seed, batch_size)
                seconds += time.perf_counter() - started
                for pixels, path in zip(images, paths):
                    _save_png(pixels, path)
            if metric is not None:
                metric.reset()
                metric.update(images.astype(np.float32) / 255.0, real=False)
                statistics = metric.generated_statistics()
        if metric is not None:
            if statistics is None:
                size = metric.num_features
                statistics = torch.zeros(1 + size + size * size, dtype=torch.float64)
            per_process = _gather_in_process_order(statistics, state)
            # Added shard by shard in index order on every process: the same float sums for any process count.
            for shard_statistics in per_process[: len(round_shards)]:
                total = shard_statistics if total is None else total + shard_statistics
        if return_images:
            gathered = [images] if num_processes == 1 else _gather_objects(images)
            if is_main:
                kept.extend(gathered[: len(round_shards)])
    if state is not None and num_processes > 1:
        resumed = int(sum(_gather_in_process_order(torch.tensor([float(resumed)], dtype=torch.float64), state)))
    distance = None
    if metric is not None:
        metric.set_generated_statistics(total)
        distance = metric.compute()
    images = np.concatenate(kept).astype(np.float32) / 255.0 if return_images and is_main else None
    return GeneratedImages(images, distance, seconds, resumed)


def _gather_in_process_order(tensor: torch.Tensor, state) -> List[torch.Tensor]:
    if state is None or state.num_processes == 1:
        return [tensor]
    from accelerate.utils import gather

    return list(gather(tensor[None].to(state.device)).cpu())


def _gather_objects(item) -> list:
    from accelerate.utils import gather_object

    return gather_object([item])  # an all-gather: meant for the few images of a grid, not for N = 50,000
