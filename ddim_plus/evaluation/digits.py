"""The one network that judges images of the bundled digits (`ddim_plus.digits`), and the reference set it compares
generated digits with.

`DigitsFeatureNet` (a small CNN, weights shipped in ``ddim_plus/assets/``) does both jobs: its hidden layer supplies
the features of ``FrechetDistance(features="digits")``, and its ten digit logits classify samples. Whether a sample is
a digit at all takes an eleventh "not a digit" logit, which a ten-way classifier lacks (it calls much of uniform noise
a confident digit): `NotADigitHead`, a small MLP on the same hidden layer, fitted deterministically at first use on
the digits plus uniform noise, digits with their pixels shuffled and flat grey images, with the network's own weights
frozen. `DigitsClassifier` puts the two together (tests/evaluation/test_digits.py checks that it recognises real
digits and rejects noise, shuffled digits and blank images).

The network sees images through `to_digit_grey`: samples of any resolution and channel count are averaged to grey
and area-resized to 8x8, which undoes the upsampling of `ddim_plus.digits.digits_pixels`.
"""

import os
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..digits import ASSETS_DIR, DIGITS_RESOLUTION, digits_pixels, load_digits
from ..images import ImageBatch, to_image_tensor

DIGITS_FEATURES_FILE = os.path.join(ASSETS_DIR, "digits_features.safetensors")
DIGITS_FEATURES_NAME = "digits-cnn-v1"
NUM_CLASSES = 10
CONFIDENCE_THRESHOLD = 0.5


class FeatureWeightsUnavailableError(RuntimeError):
    """Raised when the weights of a requested feature network are not on this machine (and may not be fetched): the
    digits network here, DINOv2 and Inception in `ddim_plus.evaluation.fid`, which builds on this module."""


def digits_reference_images(resolution: int = DIGITS_RESOLUTION, channels: int = 1) -> torch.Tensor:
    """All 1,797 bundled digits as a (N, C, H, W) tensor in [0, 1]: `ddim_plus.digits.digits_pixels`, the pixels
    the trainer's digits data set holds.

    Args:
        resolution (`int`, defaults to 8): side of the images; 8 keeps the originals.
        channels (`int`, defaults to 1): 1 or 3 (grey repeated).

    Returns:
        `torch.Tensor`
    """
    images = torch.from_numpy(digits_pixels(resolution)).float().div(255.0).unsqueeze(1)
    return images.expand(-1, channels, -1, -1).contiguous()


def to_digit_grey(images: ImageBatch) -> torch.Tensor:
    """(B, C, H, W) tensor or (B, H, W, C) array in [0, 1] -> (B, 1, 8, 8) grey tensor: channel mean, area resize."""
    grey = to_image_tensor(images).mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        grey = F.interpolate(grey, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="area")
    return grey


class DigitsFeatureNet(nn.Module):
    """A tiny CNN for the 8x8 digits whose 32-dimensional hidden layer serves as FID features.

    Any input resolution and channel count is accepted (see `to_digit_grey`). The weights shipped in
    ``ddim_plus/assets/digits_features.safetensors`` are written by ``scripts/train_digits_features.py`` and loaded by
    `load_digits_feature_net`.

    Args:
        hidden_features (`int`, defaults to 32): size of the feature layer.
        num_classes (`int`, defaults to 10): size of the classification head used for training.
    """

    name = DIGITS_FEATURES_NAME

    def __init__(self, hidden_features: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.hidden = nn.Linear(16 * 4 * 4, hidden_features)
        self.head = nn.Linear(hidden_features, num_classes)
        self.num_features = hidden_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The hidden layer before its nonlinearity (no dead units, so the covariance has full rank)."""
        x = F.relu(self.conv1(to_digit_grey(images) * 2 - 1))
        x = F.relu(self.conv2(x))
        return self.hidden(x.flatten(1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores for the ten digits."""
        return self.head(F.relu(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def load_digits_feature_net(path: Optional[str] = None) -> DigitsFeatureNet:
    """Load the digits network shipped with the package (no network access).

    Args:
        path (`str`, *optional*): a safetensors file written by ``scripts/train_digits_features.py``; defaults to
            the packaged ``ddim_plus/assets/digits_features.safetensors``.

    Returns:
        `DigitsFeatureNet`: in eval mode, gradients off.
    """
    from safetensors.torch import load_file

    path = path or DIGITS_FEATURES_FILE
    if not os.path.isfile(path):
        raise FeatureWeightsUnavailableError(
            f"Digits feature weights not found at {path!r}; make them with `python scripts/train_digits_features.py`."
        )
    state = load_file(path)
    net = DigitsFeatureNet(hidden_features=state["hidden.weight"].shape[0])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class NotADigitHead(nn.Module):
    """The eleventh logit, "not a digit", computed from `DigitsFeatureNet`'s hidden layer (after its ReLU, as the
    ten digit logits see it). Softmax over the network's ten digit logits and this one gives the digit probabilities
    that `classify_digits` thresholds."""

    def __init__(self, num_features: int = 32, hidden_features: int = 32):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(num_features, hidden_features), nn.ReLU(), nn.Linear(hidden_features, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


class DigitsClassifier(nn.Module):
    """`DigitsFeatureNet`'s ten digit logits plus a `NotADigitHead`: images -> eleven logits (10: not a digit)."""

    def __init__(self, net: DigitsFeatureNet, not_a_digit: NotADigitHead):
        super().__init__()
        self.net, self.not_a_digit = net, not_a_digit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.net.features(images))
        return torch.cat([self.net.head(hidden), self.not_a_digit(hidden)], dim=1)


def _not_a_digit_examples(rng: np.random.Generator, digits: np.ndarray, num: int) -> np.ndarray:
    noise = rng.random((num, digits.shape[1]))
    shuffled = np.stack([rng.permutation(digit) for digit in digits[rng.integers(0, len(digits), num)]])
    flat = np.repeat(rng.random((num // 4, 1)), digits.shape[1], axis=1)
    return np.concatenate([noise, shuffled, flat])


def fit_digits_classifier(
    net: DigitsFeatureNet, pixels: np.ndarray, labels: np.ndarray, seed: int = 0, num_steps: int = 600
) -> DigitsClassifier:
    """Fit the `NotADigitHead` of a `DigitsClassifier` on `net` (whose weights stay as they are) by full-batch Adam
    on digits plus generated "not a digit" examples (uniform noise, digits with shuffled pixels, flat grey images).

    Args:
        net (`DigitsFeatureNet`): the network whose ten digit logits and hidden layer the classifier uses.
        pixels (`np.ndarray`): (N, 64) grey values in [0, 1].
        labels (`np.ndarray`): (N,) digits 0-9.
        seed (`int`, defaults to 0): seed of the initialisation and of the "not a digit" examples.
        num_steps (`int`, defaults to 600): optimiser steps.

    Returns:
        `DigitsClassifier`: in eval mode.
    """
    rng = np.random.default_rng(seed)
    junk = _not_a_digit_examples(rng, pixels, len(pixels) // 2)
    inputs = torch.tensor(np.concatenate([pixels, junk]), dtype=torch.float32).reshape(
        -1, 1, DIGITS_RESOLUTION, DIGITS_RESOLUTION
    )
    targets = torch.tensor(np.concatenate([labels, np.full(len(junk), NUM_CLASSES)]), dtype=torch.long)
    # The matrices are tiny: extra threads only add synchronisation, which on a busy machine costs more than the
    # arithmetic.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Fork the global RNG so that fitting at first use never changes the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = DigitsClassifier(net, NotADigitHead(net.num_features))
            with torch.no_grad():
                hidden = F.relu(net.features(inputs))
                digit_logits = net.head(hidden)
            optimizer = torch.optim.Adam(classifier.not_a_digit.parameters(), lr=1e-2)
            for _ in range(num_steps):
                logits = torch.cat([digit_logits, classifier.not_a_digit(hidden)], dim=1)
                loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(num_threads)
    return classifier.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def get_digits_classifier() -> DigitsClassifier:
    """The shipped digits network with its "not a digit" head fitted on all 1,797 bundled digits (once per
    process)."""
    images, labels = load_digits()
    return fit_digits_classifier(load_digits_feature_net(), images.reshape(len(images), -1) / 16.0, labels)


def classify_digits(
    images: np.ndarray, classifier: Optional[DigitsClassifier] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """The most probable digit and its probability, per image.

    Args:
        images (`np.ndarray`): (B, H, W, C) or (B, H, W) images in [0, 1], light digits on a dark background like
            the data.
        classifier (`DigitsClassifier`, *optional*): defaults to `get_digits_classifier()`.

    Returns:
        `Tuple[np.ndarray, np.ndarray]`: digits (B,) and their probabilities (B,); the "not a digit" share of the
        probability is what keeps noise below any threshold.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"`images` must have shape (B, H, W, C) or (B, H, W), got {images.shape}.")
    classifier = classifier if classifier is not None else get_digits_classifier()
    with torch.no_grad():
        logits = classifier(to_digit_grey(images).clamp(0, 1))
    digit_probabilities = logits.softmax(dim=-1)[:, :NUM_CLASSES]
    confidences, labels = digit_probabilities.max(dim=-1)
    return labels.numpy(), confidences.numpy()


def recognisable_fraction(images: np.ndarray, threshold: float = CONFIDENCE_THRESHOLD) -> float:
    """Share of images classified as some digit with probability above `threshold`."""
    _, confidences = classify_digits(images)
    return float(np.mean(confidences > threshold))


def class_histogram(images: np.ndarray) -> List[int]:
    """How many images the classifier assigns to each digit 0-9 (whatever its confidence)."""
    labels, _ = classify_digits(images)
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def class_balance(histogram: List[int]) -> float:
    """Normalised entropy of a class histogram: 1.0 when all ten digits are equally frequent, 0.0 for one digit."""
    counts = np.asarray(histogram, dtype=np.float64)
    if counts.sum() == 0:
        return 0.0
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log(shares)).sum() / np.log(NUM_CLASSES))


def digits_report(images: np.ndarray, threshold: float = CONFIDENCE_THRESHOLD) -> Dict[str, object]:
    """Recognisable fraction, class histogram and class balance of a batch of generated digits.

    Args:
        images (`np.ndarray`): (B, H, W, C) or (B, H, W) images in [0, 1].
        threshold (`float`, defaults to 0.5): digit probability above which a sample counts as recognisable.

    Returns:
        `Dict[str, object]`: `num_samples`, `recognisable_fraction`, `class_histogram` (ten counts over all
        samples) and `class_balance` (normalised entropy of the histogram).
    """
    labels, confidences = classify_digits(images)
    histogram = np.bincount(labels, minlength=NUM_CLASSES).tolist()
    return {
        "num_samples": len(labels),
        "recognisable_fraction": float(np.mean(confidences > threshold)),
        "class_histogram": histogram,
        "class_balance": class_balance(histogram),
    }
