"""Inversion reconstruction error (paper Table 2) and sample consistency across numbers of steps (section 5.2).

Both are per-pixel mean squared errors on images in [0, 1], the unit of the paper's Table 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..digits import load_digits
from ..images import ImageBatch, to_image_tensor
from ..pipeline_ddim_inversion import DDIMInversionPipeline
from .gmm import GaussianMixture


def mean_squared_error(images: ImageBatch, reference: ImageBatch) -> float:
    """Per-pixel mean squared error between two image batches in [0, 1].

    Args:
        images (`torch.Tensor` or `np.ndarray`): (B, C, H, W) tensor or (B, H, W, C) array.
        reference (`torch.Tensor` or `np.ndarray`): same shape as `images` once both are (B, C, H, W).

    Returns:
        `float`: the mean over every pixel and channel of every image.
    """
    images, reference = to_image_tensor(images).double(), to_image_tensor(reference).double()
    if images.shape != reference.shape:
        raise ValueError(
            f"`images` {tuple(images.shape)} and `reference` {tuple(reference.shape)} must have the same shape "
            "(as (B, C, H, W))."
        )
    return float((images - reference).pow(2).mean())


def digits_mixture(std: float = 0.1) -> GaussianMixture:
    """Ten isotropic Gaussians at the class means of the bundled 8x8 digits (in the model's [-1, 1] scale): data
    whose exact denoiser (`GaussianMixtureOracle`) measures inversion with no training error.

    Args:
        std (`float`, defaults to 0.1): standard deviation of every component, per pixel.

    Returns:
        `GaussianMixture`: samples of shape (1, 8, 8).
    """
    images, labels = load_digits()
    pixels = torch.from_numpy(images / 16.0 * 2 - 1)
    means = torch.stack([pixels[torch.from_numpy(labels == k)].mean(0) for k in range(10)])[:, None]
    return GaussianMixture(means, torch.full((10,), std))


def _check_steps(steps: Sequence[int], name: str = "steps") -> List[int]:
    steps = list(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in steps):
        raise ValueError(f"`{name}` must be a non-empty list of positive ints, got {steps!r}.")
    return [int(s) for s in steps]


def inversion_reconstruction_error(pipe, images: ImageBatch, num_inference_steps: int = 50, refine=False) -> float:
    """Invert `images` to x_T with S steps, decode them back with the same S steps, and return the MSE (Table 2).

    Args:
        pipe (`DDIMPlusPipeline` or `DDIMInversionPipeline`): its UNet and scheduler are used; the scheduler's
            `timestep_spacing` decides which S timesteps are visited.
        images (`torch.Tensor` or `np.ndarray`): images in [0, 1] of the UNet's size.
        num_inference_steps (`int`, defaults to 50): S.
        refine (`bool` or `ddim_plus.InversionRefinement`, defaults to `False`): `False` is the paper's plain DDIM
            inversion; `True` (or an `InversionRefinement`) refines each step (`ddim_plus.invert`).

    Returns:
        `float`: per-pixel MSE on [0, 1] between `images` and their reconstruction.
    """
    images = to_image_tensor(images)
    inversion = pipe if isinstance(pipe, DDIMInversionPipeline) else DDIMInversionPipeline(**pipe.components)
    inversion.set_progress_bar_config(disable=True)
    output = inversion(
        images,
        num_inference_steps=num_inference_steps,
        refine=refine,
        return_reconstruction=True,
        output_type="pt",
    )
    return mean_squared_error(output.images.cpu(), images)


def inversion_error_table(
    pipe, images: ImageBatch, steps: Sequence[int] = (10, 20, 50, 100), refine: Sequence[bool] = (False, True)
) -> Dict[bool, Dict[int, float]]:
    """Reconstruction MSE for every S in `steps`, for plain and refined inversion.

    Args:
        pipe: see `inversion_reconstruction_error`.
        images (`torch.Tensor` or `np.ndarray`): images in [0, 1].
        steps (`Sequence[int]`, defaults to (10, 20, 50, 100)): the values of S.
        refine (`Sequence[bool]`, defaults to (False, True)): which inversions to run.

    Returns:
        `Dict[bool, Dict[int, float]]`: ``table[refine][S]`` is the MSE.
    """
    steps = _check_steps(steps)
    return {
        flag: {s: inversion_reconstruction_error(pipe, images, num_inference_steps=s, refine=flag) for s in steps}
        for flag in refine
    }


@dataclass
class ConsistencyResult:
    """Images decoded from the same x_T with several numbers of steps, and their distance to the reference.

    Args:
        reference_steps (`int`): S of the reference decoding.
        distances (`Dict[int, float]`): per-pixel MSE on [0, 1] to the reference images, for each S.
        images (`Dict[int, np.ndarray]`): (B, H, W, C) images for each S, the reference included.
    """

    reference_steps: int
    distances: Dict[int, float] = field(default_factory=dict)
    images: Dict[int, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def consistency(
    pipe,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: Sequence[int] = (10, 20, 50, 100),
    reference_steps: int = 1000,
    eta: float = 0.0,
    latents: Optional[torch.Tensor] = None,
) -> ConsistencyResult:
    """Decode the same x_T with each S in `steps` and measure how far the images are from the `reference_steps` ones.

    With eta = 0 DDIM is a deterministic map from x_T, and the paper (section 5.2) finds that S mainly changes the
    details: a small distance at small S is what makes short schedules useful for previews.

    Args:
        pipe (`DDIMPlusPipeline`): the sampler, with its own scheduler configuration.
        seeds (`Sequence[int]`, defaults to (0, 1, 2, 3)): one x_T per seed, drawn exactly as ``pipe(generator=...)``
            draws it; ignored when `latents` is given.
        steps (`Sequence[int]`, defaults to (10, 20, 50, 100)): the values of S compared.
        reference_steps (`int`, defaults to 1000): S of the reference images.
        eta (`float`, defaults to 0.0): eta of every decoding (> 0 adds fresh noise, so images drift apart).
        latents (`torch.Tensor`, *optional*): x_T to decode instead of drawing from `seeds`.

    Returns:
        `ConsistencyResult`
    """
    steps = _check_steps(steps)
    reference_steps = _check_steps([reference_steps], "reference_steps")[0]
    if latents is None:
        if len(seeds) == 0:
            raise ValueError("`seeds` is empty; pass at least one seed or `latents`.")
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        latents = pipe.prepare_latents(len(seeds), generators, None)
    result = ConsistencyResult(reference_steps=reference_steps)
    for num_steps in dict.fromkeys([reference_steps, *steps]):
        generators = [torch.Generator(device="cpu").manual_seed(i) for i in range(len(latents))]
        result.images[num_steps] = pipe(
            batch_size=len(latents),
            generator=generators,
            eta=eta,
            num_inference_steps=num_steps,
            latents=latents.clone(),
            output_type="np",
        ).images
    for num_steps in steps:
        result.distances[num_steps] = mean_squared_error(result.images[num_steps], result.images[reference_steps])
    return result
