"""Steps-vs-quality sweeps (the shape of the paper's Table 1) on any DDIM pipeline.

Every configuration decodes the same x_T (image i always starts from seed ``seed + i``), so differences between
cells come from the sampler, not from drawing different noise. Each cell records its sampling time too.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..ddim_math import SIGMA_HAT
from ..images import ImageBatch
from ..pipeline_ddim_plus import DDIMPlusPipeline
from ..scheduling_ddim_plus import DDIMSchedulerPlus
from .digits import digits_reference_images
from .fid import FrechetDistance
from .sampling import SHARD_SIZE, generate_images

STOCK_PREFIX = "stock:"
TUNED = "tuned"  # the schedules `ddim-plus tune-steps` stored in the model's scheduler config


class ReferenceSetTooSmallError(ValueError):
    """Raised when the reference set has too few images for a full-rank covariance of its features."""


@dataclass
class QualityResult:
    """One cell of a sweep.

    Args:
        spacing (`str`): timestep spacing; ``"stock:<spacing>"`` for diffusers' own `DDIMPipeline`/`DDIMScheduler`.
        steps (`int`): number of sampling steps S.
        eta (`float` or `str`): eta, or ``"sigma_hat"`` for the paper's DDPM-large variance.
        frechet_distance (`float`): Frechet distance to the reference set.
        features (`str`): name of the feature network the distance was computed in.
        num_images (`int`): number of images generated.
        seconds (`float`): wall time of the sampling (not of the feature extraction).
    """

    spacing: str
    steps: int
    eta: Union[float, str]
    frechet_distance: float
    features: str
    num_images: int
    seconds: float


def _sampler(pipe, spacing: Optional[str], eta: Union[float, str]):
    """A pipeline sharing `pipe`'s UNet with the scheduler the cell asks for, and the eta to call it with."""
    from diffusers import DDIMPipeline, DDIMScheduler

    config = pipe.scheduler.config
    if spacing is not None and spacing.startswith(STOCK_PREFIX):
        if eta == SIGMA_HAT:
            return None, None
        # Only the keys the stock scheduler knows, so it does not warn about ours (sigma_type, ddim_solver_order).
        stock_keys = inspect.signature(DDIMScheduler.__init__).parameters
        stock_config = {key: value for key, value in config.items() if key in stock_keys}
        scheduler = DDIMScheduler.from_config(stock_config, timestep_spacing=spacing[len(STOCK_PREFIX) :])
        sampler = DDIMPipeline(unet=pipe.unet, scheduler=scheduler)
    else:
        # A fixed spacing is measured as itself, not replaced by a tuned schedule stored for the same S.
        overrides = {} if spacing in (None, TUNED) else {"timestep_spacing": spacing, "tuned_timesteps": None}
        overrides["sigma_type"] = SIGMA_HAT if eta == SIGMA_HAT else "eta"
        sampler = DDIMPlusPipeline(unet=pipe.unet, scheduler=DDIMSchedulerPlus.from_config(config, **overrides))
    sampler.set_progress_bar_config(disable=True)
    # A sigma-hat scheduler ignores eta; 0.0 keeps the pipeline's eta check quiet.
    return sampler, 0.0 if eta == SIGMA_HAT else float(eta)


def quality_sweep(
    pipe,
    steps: Sequence[int] = (10, 20, 50, 100),
    etas: Sequence[Union[float, str]] = (0.0,),
    spacings: Sequence[Optional[str]] = (None,),
    features: Union[str, torch.nn.Module, FrechetDistance] = "digits",
    reference_images: Optional[ImageBatch] = None,
    num_images: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    on_result: Optional[Callable[[QualityResult], None]] = None,
    image_dir: Optional[str] = None,
    split_across_processes: bool = False,
    shard_size: int = SHARD_SIZE,
) -> List[QualityResult]:
    """Frechet distance for every (spacing, S, eta), all from the same x_T.

    Args:
        pipe (`DDIMPlusPipeline`): its UNet and scheduler configuration are used.
        steps (`Sequence[int]`, defaults to (10, 20, 50, 100)): the values of S.
        etas (`Sequence`, defaults to (0.0,)): eta values; ``"sigma_hat"`` selects the paper's sigma-hat variance
            (skipped for stock spacings, which do not have it).
        spacings (`Sequence[str]`, defaults to (None,)): ``None`` keeps the pipeline's scheduler as it is (tuned
            schedules included; such cells are labelled ``"tuned"``); a name sets `timestep_spacing` of
            `DDIMSchedulerPlus` (and ignores tuned schedules); ``"tuned"`` runs the tuned schedules stored for every
            S in `steps` (see `ddim_plus.optimize_timesteps`); ``"stock:leading"`` etc. runs diffusers' `DDIMPipeline`.
        features (`str`, `torch.nn.Module` or `FrechetDistance`, defaults to ``"digits"``): see `FrechetDistance`;
            a `FrechetDistance` (without reference images yet) is used as it is.
        reference_images (`np.ndarray` or `torch.Tensor`, *optional*): the real set; defaults to the 1,797 bundled
            digits at the model's resolution and channels.
        num_images (`int`, defaults to 256): generated images per cell (>= 2; FD is biased upwards at small N, so
            compare cells of one sweep, not with numbers computed at another N).
        seed (`int`, defaults to 0): seed of the first x_T.
        batch_size (`int`, defaults to 64): images per pipeline call.
        on_result (`Callable`, *optional*): called with each `QualityResult` as soon as it is ready (progress).
        image_dir (`str`, *optional*): save each cell's images as PNGs in ``image_dir/<cell>/`` (see
            `cell_name`); cells already complete there are read back, not generated (see `generate_images`).
        split_across_processes (`bool`, defaults to False): split each cell's images between the processes of an
            ``accelerate launch`` (every process calls this function; all get the same results).
        shard_size (`int`, defaults to 1000): see `generate_images`.

    Returns:
        `List[QualityResult]`, in loop order spacing -> eta -> S.
    """
    if num_images < 2:
        raise ValueError(f"`num_images` must be at least 2 for a Frechet distance, got {num_images}.")
    for eta in etas:
        if eta != SIGMA_HAT and not (isinstance(eta, (int, float)) and 0.0 <= float(eta)):
            raise ValueError(f"`etas` must hold non-negative numbers or {SIGMA_HAT!r}, got {eta!r}.")
    if TUNED in spacings:
        untuned = [s for s in steps if pipe.scheduler.tuned_schedule(s) is None]
        if untuned:
            order = pipe.scheduler.config.ddim_solver_order
            raise ValueError(
                f"`spacings` asks for {TUNED!r} but the model has no tuned schedule for {untuned} steps at "
                f"order {order}; run `ddim-plus tune-steps MODEL --steps S --order {order}` for each first."
            )
    # Features are extracted where the sampler runs (each process's GPU under `accelerate launch`).
    metric = features if isinstance(features, FrechetDistance) else FrechetDistance(features, device=pipe.device)
    if reference_images is None:
        channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
        reference_images = digits_reference_images(resolution=size, channels=channels)
    metric.update(reference_images, real=True)
    if metric.num_real <= metric.num_features:
        raise ReferenceSetTooSmallError(
            f"`reference_images` holds {metric.num_real} images, but the {metric.features_name} features have "
            f"{metric.num_features} dimensions: their covariance needs more than {metric.num_features} images to have "
            "full rank. Pass a larger reference set, or features of lower dimension (e.g. 'digits' for digits)."
        )

    results = []
    for spacing in spacings:
        for eta in etas:
            sampler, call_eta = _sampler(pipe, spacing, eta)
            if sampler is None:
                continue
            for num_steps in steps:
                label = spacing or (
                    TUNED if sampler.scheduler.tuned_schedule(num_steps) else pipe.scheduler.config.timestep_spacing
                )
                generated = generate_images(
                    sampler,
                    num_images,
                    num_steps,
                    call_eta,
                    seed=seed,
                    batch_size=batch_size,
                    metric=metric,
                    image_dir=None if image_dir is None else os.path.join(image_dir, cell_name(label, num_steps, eta)),
                    return_images=False,
                    split_across_processes=split_across_processes,
                    shard_size=shard_size,
                )
                distance = generated.frechet_distance
                result = QualityResult(
                    label, num_steps, eta, distance.value, distance.features, num_images, generated.seconds
                )
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


def cell_name(spacing: str, num_steps: int, eta: Union[float, str]) -> str:
    """Folder name of a cell's images, e.g. ``trailing_S50_eta0`` or ``stock-leading_S10_sigma_hat``."""
    eta_part = eta if isinstance(eta, str) else f"eta{float(eta):g}"
    return f"{spacing.replace(':', '-')}_S{num_steps}_{eta_part}"


def _eta_label(eta: Union[float, str]) -> str:
    return eta if isinstance(eta, str) else f"eta={float(eta):g}"


def results_to_markdown(results: Sequence[QualityResult], title: Optional[str] = None) -> str:
    """Markdown tables, one per spacing: rows = S, columns = eta, cells = Frechet distance (seconds of sampling).

    Args:
        results (`Sequence[QualityResult]`): from `quality_sweep`.
        title (`str`, *optional*): a line printed above the tables.

    Returns:
        `str`: the tables, with the features and the number of images stated under the title.
    """
    if not results:
        raise ValueError("`results` is empty; run a sweep first.")
    features = sorted({r.features for r in results})
    sizes = sorted({r.num_images for r in results})
    lines = [title, ""] if title else []
    lines.append(
        f"Frechet distance in **{', '.join(features)}** features, {', '.join(map(str, sizes))} generated images per "
        "cell (lower is better); in brackets the seconds spent sampling."
    )
    by_spacing: Dict[str, List[QualityResult]] = {}
    for result in results:
        by_spacing.setdefault(result.spacing, []).append(result)
    for spacing, cells in by_spacing.items():
        etas = list(dict.fromkeys(_eta_label(r.eta) for r in cells))
        steps = list(dict.fromkeys(r.steps for r in cells))
        table = {(r.steps, _eta_label(r.eta)): r for r in cells}
        lines += ["", f"Spacing `{spacing}`:", "", "| S | " + " | ".join(etas) + " |", "|---" * (len(etas) + 1) + "|"]
        for num_steps in steps:
            row = [
                f"{table[num_steps, eta].frechet_distance:.3f} ({table[num_steps, eta].seconds:.1f}s)"
                if (num_steps, eta) in table
                else "-"
                for eta in etas
            ]
            lines.append(f"| {num_steps} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: Sequence[QualityResult], path: str, title: Optional[str] = None) -> None:
    """Frechet distance against S (log axes), one line per (spacing, eta); needs matplotlib.

    Args:
        results (`Sequence[QualityResult]`): from `quality_sweep`.
        path (`str`): image file to write (format from the extension).
        title (`str`, *optional*): the plot's title.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: `pip install matplotlib` (or `ddim-plus[eval]`).") from error
    lines: Dict[str, List[QualityResult]] = {}
    for result in results:
        lines.setdefault(f"{result.spacing}, {_eta_label(result.eta)}", []).append(result)
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, cells in lines.items():
        axis.plot([r.steps for r in cells], [r.frechet_distance for r in cells], marker="o", label=label)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("sampling steps S")
    axis.set_ylabel(f"Frechet distance ({', '.join(sorted({r.features for r in results}))})")
    axis.set_title(title or "Quality against number of steps")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
