"""Frechet distance between image sets, in a named feature space.

The distance itself is torchmetrics' `FrechetInceptionDistance` (float64 statistics, eigenvalue-based matrix square
root); this module only chooses the feature network and keeps its name next to every number, because a Frechet
distance in one feature space says nothing about another:

- ``"digits"``: a tiny CNN (about 10k parameters, `ddim_plus.evaluation.digits.DigitsFeatureNet`) trained on the
  bundled 8x8 digits by ``scripts/train_digits_features.py`` and shipped in ``ddim_plus/assets/``. Always available
  offline; the right yardstick for models trained on the bundled digits, meaningless for anything else.
- ``"inception"`` / ``"inception:PATH"``: the standard FID (Heusel et al. 2017) in Inception-v3 pool features, via
  torch-fidelity. With a PATH the weights are read from disk; without one torch-fidelity downloads them.
- ``"dinov2:PATH_OR_REPO_ID"``: the Frechet distance in DINOv2 CLS features (Stein et al. 2023 find it tracks human
  judgement better than Inception), loaded with `transformers` from a local folder or the local Hub cache.

Images are floats in [0, 1], a (B, C, H, W) tensor or a (B, H, W, C) array (see `ddim_plus.images.to_image_tensor`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..images import ImageBatch, to_image_tensor, to_rgb
from .digits import FeatureWeightsUnavailableError, load_digits_feature_net

FEATURE_KINDS = ("digits", "inception", "dinov2")
# What `choose_features` looks for on disk: DINOv2 checkpoints in the Hugging Face cache, smallest first, and the FID
# Inception weights where torch-fidelity's download puts them (torch hub's checkpoints folder).
DINOV2_REPO_IDS = ("facebook/dinov2-small", "facebook/dinov2-base", "facebook/dinov2-large", "facebook/dinov2-giant")
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
MIN_NUM_IMAGES = 256  # the smallest default set, well above the digits features' 32 dimensions


def full_rank_num_images(num_features: int) -> int:
    """The default number of generated images for features of dimension `num_features`: at least `MIN_NUM_IMAGES`
    and more than `num_features`, the fewest whose covariance can have full rank (Inception 2049, DINOv2-base 769).
    """
    return max(MIN_NUM_IMAGES, num_features + 1)


class Dinov2Features(nn.Module):
    """CLS-token features of a `transformers` DINOv2 model, at 224x224 with ImageNet normalisation.

    Args:
        model (`transformers.Dinov2Model`): the backbone.
        name (`str`): label reported beside every number.
    """

    _mean = (0.485, 0.456, 0.406)
    _std = (0.229, 0.224, 0.225)

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.num_features = model.config.hidden_size
        self.register_buffer("mean", torch.tensor(self._mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self._std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(to_rgb(images), size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.model(pixel_values=x).last_hidden_state[:, 0]


def load_dinov2_features(path_or_repo_id: str) -> Dinov2Features:
    """Load DINOv2 from a local folder or the local Hugging Face cache; never downloads.

    Args:
        path_or_repo_id (`str`): a folder saved by ``save_pretrained`` or a Hub id already in the cache
            (e.g. ``facebook/dinov2-base``).

    Returns:
        `Dinov2Features`
    """
    try:
        from transformers import Dinov2Model
    except ImportError as error:
        raise FeatureWeightsUnavailableError(
            "DINOv2 features need the `transformers` package, which the 'dinov2' extra installs: "
            "pip install 'ddim-plus[dinov2]'"
        ) from error
    from huggingface_hub import constants

    try:
        # huggingface_hub's cache folder as it is at call time: the one `choose_features` searched (some transformers
        # versions keep a copy of it from their own import time)
        model = Dinov2Model.from_pretrained(path_or_repo_id, local_files_only=True, cache_dir=constants.HF_HUB_CACHE)
    except (OSError, ValueError) as error:  # some transformers versions call a missing local folder an invalid id
        raise FeatureWeightsUnavailableError(
            f"DINOv2 weights {path_or_repo_id!r} are not available locally ({error.__class__.__name__}). Download "
            f"them once with `huggingface-cli download {path_or_repo_id}` or pass a folder saved by save_pretrained."
        ) from error
    label = os.path.basename(os.path.normpath(path_or_repo_id))
    return Dinov2Features(model, name=f"dinov2({label})")


def parse_features(spec: str) -> tuple:
    """Split a feature spec such as ``"inception:/w/pt_inception.pth"`` into ``(kind, argument or None)``."""
    kind, _, argument = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in FEATURE_KINDS:
        raise ValueError(
            f"`features` must be one of 'digits', 'inception[:PATH]' or 'dinov2:PATH_OR_REPO_ID', got {spec!r}."
        )
    if kind == "dinov2" and not argument:
        raise ValueError("`features='dinov2'` needs a location: 'dinov2:PATH_OR_REPO_ID' (e.g. a local folder).")
    return kind, argument or None


def _dinov2_in_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name), str)

    return cached("config.json") and (cached("model.safetensors") or cached("pytorch_model.bin"))


def choose_features(digits_data: bool) -> str:
    """The feature network that fits the data and is on this machine, without downloading anything.

    Digits features for digits data only; otherwise DINOv2 from the local Hugging Face cache (needs `transformers`),
    else Inception from torch hub's checkpoints folder (needs torch-fidelity).

    Args:
        digits_data (`bool`): the reference is the bundled digits (1 channel, upsampled from 8x8).

    Returns:
        `str`: a spec for `FrechetDistance`, e.g. ``"digits"`` or ``"dinov2:facebook/dinov2-small"``.

    Raises:
        `FeatureWeightsUnavailableError`: nothing fits; the message says why in one line.
    """
    if digits_data:
        return "digits"
    reasons = []
    try:
        import transformers  # noqa: F401
    except ImportError:
        reasons.append("DINOv2 needs `transformers` (pip install 'ddim-plus[dinov2]')")
    else:
        for repo_id in DINOV2_REPO_IDS:
            if _dinov2_in_cache(repo_id):
                return f"dinov2:{repo_id}"
        reasons.append(f"no DINOv2 weights in the Hugging Face cache ({', '.join(DINOV2_REPO_IDS)})")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    inception_path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_NAME)
    if not _TORCH_FIDELITY_AVAILABLE:
        reasons.append("Inception needs torch-fidelity (pip install 'ddim-plus[eval]')")
    elif not os.path.isfile(inception_path):
        reasons.append(f"no Inception weights at {inception_path}")
    else:
        return f"inception:{inception_path}"
    raise FeatureWeightsUnavailableError(
        "No quality metric is available: the digits features fit only digits data, "
        + "; ".join(reasons)
        + ". Download one (e.g. `hf download facebook/dinov2-small`) or pass --features dinov2:PATH / inception:PATH."
    )


def _inception_metric(weights_path: Optional[str]):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise FeatureWeightsUnavailableError(
            "Inception features need torch-fidelity: pip install 'ddim-plus[eval]' (and the FID Inception weights, "
            "`pt_inception-2015-12-05-6726825d.pth`, passed as 'inception:PATH' when offline)."
        )
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FeatureWeightsUnavailableError(f"Inception weights file {weights_path!r} does not exist.")
    try:
        return FrechetInceptionDistance(
            feature=2048,
            normalize=True,
            reset_real_features=False,
            feature_extractor_weights_path=weights_path,
            sync_on_compute=False,
        )
    except OSError as error:  # without a path torch-fidelity downloads the weights: URLError (an OSError) offline
        raise FeatureWeightsUnavailableError(
            f"Inception weights could not be downloaded ({error.__class__.__name__}: {error}); offline, pass "
            f"'inception:PATH' with a local {INCEPTION_WEIGHTS_NAME}."
        ) from error


@dataclass
class FrechetDistanceResult:
    """A Frechet distance and everything needed to read it.

    Args:
        value (`float`): the distance.
        features (`str`): name of the feature network it was computed in (e.g. ``"digits-cnn-v1"``).
        num_real (`int`): size of the reference set.
        num_generated (`int`): size of the generated set.
    """

    value: float
    features: str
    num_real: int
    num_generated: int

    def __str__(self) -> str:
        return f"FD[{self.features}] = {self.value:.4g} ({self.num_real} reference vs {self.num_generated} generated)"


class FrechetDistance:
    """Frechet distance in a chosen feature space, with the reference statistics kept across generated sets.

    Feed the reference images once with ``update(images, real=True)``, then for each generated set
    ``update(images, real=False)``, ``compute()`` and ``reset()`` (which keeps the reference).

    Args:
        features (`str` or `torch.nn.Module`, defaults to ``"digits"``): ``"digits"``, ``"inception"``,
            ``"inception:PATH"``, ``"dinov2:PATH_OR_REPO_ID"``, or a module mapping (B, C, H, W) images in [0, 1] to
            (B, D) features, with an int ``num_features = D`` attribute and optionally a ``name`` (reported).
        batch_size (`int`, defaults to 256): images per forward pass of the feature network.
        device (`str` or `torch.device`, *optional*): where the feature network runs; defaults to CPU.
    """

    def __init__(
        self,
        features: Union[str, nn.Module] = "digits",
        batch_size: int = 256,
        device: Optional[Union[str, torch.device]] = None,
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.batch_size = batch_size
        self.device = torch.device(device or "cpu")
        if isinstance(features, nn.Module):
            if not isinstance(getattr(features, "num_features", None), int):
                raise ValueError(
                    f"A custom `features` module must say its output size in an int `num_features` attribute; "
                    f"{type(features).__name__} has none (set `module.num_features = D`)."
                )
            network = features.eval()
            self.features_name = getattr(features, "name", type(features).__name__)
        else:
            kind, argument = parse_features(features)
            if kind == "inception":
                self._metric = _inception_metric(argument).to(self.device)
                self.features_name = "inception-v3-pool3" + ("" if argument is None else "(local)")
                return
            network = load_digits_feature_net(argument) if kind == "digits" else load_dinov2_features(argument)
            self.features_name = network.name
        # sync_on_compute=False: the distance is of the images given to this object. Under torch.distributed
        # torchmetrics would otherwise gather from every process, and hang or fail when only one (the trainer's
        # main process) computes it.
        self._metric = FrechetInceptionDistance(feature=network, reset_real_features=False, sync_on_compute=False).to(
            self.device
        )
        # torchmetrics keeps the float64 sums it accumulates; features may be computed in any dtype.
        self._metric.inception.requires_grad_(False)

    @torch.no_grad()
    def update(self, images: Union[ImageBatch, Iterable[ImageBatch]], real: bool) -> None:
        """Add images to the reference (`real=True`) or generated set.

        Args:
            images (`torch.Tensor`, `np.ndarray` or an iterable of them): floats in [0, 1], see `to_image_tensor`.
            real (`bool`): whether these are reference images.
        """
        batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images
        for batch in batches:
            batch = to_image_tensor(batch)
            if self.features_name.startswith("inception"):
                batch = to_rgb(batch)
            for chunk in batch.split(self.batch_size):
                self._metric.update(chunk.to(self.device), real=real)

    @property
    def num_real(self) -> int:
        return int(self._metric.real_features_num_samples)

    @property
    def num_generated(self) -> int:
        return int(self._metric.fake_features_num_samples)

    @property
    def num_features(self) -> int:
        """Dimension D of the feature space (a full-rank covariance needs more than D images per set)."""
        return int(self._metric.real_features_sum.numel())

    def generated_statistics(self) -> torch.Tensor:
        """The generated set's float64 sums as one vector: count, feature sum (D), cross-product sum (D * D).

        Sums of disjoint sets add up to the sums of their union, so sets scored apart (in shards, on several
        processes) combine by adding these vectors; `set_generated_statistics` loads the total back.
        """
        metric = self._metric
        return torch.cat(
            [
                metric.fake_features_num_samples.double().view(1).cpu(),
                metric.fake_features_sum.cpu(),
                metric.fake_features_cov_sum.flatten().cpu(),
            ]
        )

    def set_generated_statistics(self, statistics: torch.Tensor) -> None:
        """Replace the generated set's sums by a vector from `generated_statistics` (or a sum of such vectors)."""
        size = self.num_features
        if statistics.shape != (1 + size + size * size,):
            raise ValueError(
                f"`statistics` must have shape ({1 + size + size * size},), got {tuple(statistics.shape)}."
            )
        metric = self._metric
        statistics = statistics.to(device=metric.fake_features_sum.device, dtype=torch.float64)
        metric.fake_features_num_samples = statistics[0].round().long()
        metric.fake_features_sum = statistics[1 : 1 + size].clone()
        metric.fake_features_cov_sum = statistics[1 + size :].view(size, size).clone()

    def compute(self) -> FrechetDistanceResult:
        """The distance between the reference and the generated images seen since the last `reset`."""
        if self.num_real < 2 or self.num_generated < 2:
            raise ValueError(
                f"Need at least 2 reference and 2 generated images, got {self.num_real} and {self.num_generated}."
            )
        value = float(self._metric.compute().double().clamp_min(0).item())
        return FrechetDistanceResult(value, self.features_name, self.num_real, self.num_generated)

    def reset(self) -> None:
        """Forget the generated images; the reference statistics are kept."""
        self._metric.reset()


def frechet_distance(
    reference_images: ImageBatch,
    generated_images: ImageBatch,
    features: Union[str, nn.Module] = "digits",
    batch_size: int = 256,
) -> FrechetDistanceResult:
    """Frechet distance between two image sets in the named feature space (see `FrechetDistance`).

    Args:
        reference_images (`torch.Tensor` or `np.ndarray`): the reference set, floats in [0, 1].
        generated_images (`torch.Tensor` or `np.ndarray`): the generated set, floats in [0, 1].
        features (`str` or `torch.nn.Module`, defaults to ``"digits"``): see `FrechetDistance`.
        batch_size (`int`, defaults to 256): images per forward pass of the feature network.

    Returns:
        `FrechetDistanceResult`: the value with the feature network's name and both set sizes.
    """
    metric = FrechetDistance(features, batch_size=batch_size)
    metric.update(reference_images, real=True)
    metric.update(generated_images, real=False)
    return metric.compute()
