"""How recognisable generated digits are, judged by a classifier trained on the bundled digits.

The classifier is a one-hidden-layer network on scikit-learn's 1,797 8x8 digits plus an eleventh "not a digit"
class (uniform noise, digits with their pixels shuffled, flat grey images), fitted deterministically at first use in
about a second, so it needs no download and no shipped weights. The extra class matters: a plain 10-way classifier
calls half of all uniform-noise images a confident digit. About 92% accurate on the harder last 397 digits when
fitted on the first 1,400; no noise image gets a digit probability above 0.5.

Samples of any resolution and channel count are averaged to grey and area-resized to 8x8 first, which undoes the
upsampling of `ddim_plus.training.data.load_digits_dataset`.
"""

from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

NUM_CLASSES = 10
DIGITS_RESOLUTION = 8
CONFIDENCE_THRESHOLD = 0.5


class DigitsClassifier(torch.nn.Module):
    """64 grey values in [0, 1] -> logits of the ten digits and of "not a digit" (index 10)."""

    def __init__(self, hidden_features: int = 64):
        super().__init__()
        self.hidden = torch.nn.Linear(DIGITS_RESOLUTION**2, hidden_features)
        self.head = torch.nn.Linear(hidden_features, NUM_CLASSES + 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(pixels)))


def _not_a_digit_examples(rng: np.random.Generator, digits: np.ndarray, num: int) -> np.ndarray:
    noise = rng.random((num, digits.shape[1]))
    shuffled = np.stack([rng.permutation(digit) for digit in digits[rng.integers(0, len(digits), num)]])
    flat = np.repeat(rng.random((num // 4, 1)), digits.shape[1], axis=1)
    return np.concatenate([noise, shuffled, flat])


def fit_digits_classifier(
    pixels: np.ndarray, labels: np.ndarray, seed: int = 0, num_steps: int = 300
) -> DigitsClassifier:
    """Fit a `DigitsClassifier` by full-batch Adam on digits plus generated "not a digit" examples.

    Args:
        pixels (`np.ndarray`): (N, 64) grey values in [0, 1].
        labels (`np.ndarray`): (N,) digits 0-9.
        seed (`int`, defaults to 0): seed of the initialisation and of the "not a digit" examples.
        num_steps (`int`, defaults to 300): optimiser steps.

    Returns:
        `DigitsClassifier`: in eval mode.
    """
    rng = np.random.default_rng(seed)
    junk = _not_a_digit_examples(rng, pixels, len(pixels) // 2)
    inputs = torch.tensor(np.concatenate([pixels, junk]), dtype=torch.float32)
    targets = torch.tensor(np.concatenate([labels, np.full(len(junk), NUM_CLASSES)]), dtype=torch.long)
    # The matrices are tiny: extra threads only add synchronisation, which on a busy machine costs 50x.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Fork the global RNG so that fitting at first use never changes the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsClassifier()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
            for _ in range(num_steps):
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(num_threads)
    return model.eval()


@lru_cache(maxsize=1)
def get_digits_classifier() -> DigitsClassifier:
    """The classifier fitted on all 1,797 bundled digits (once per process)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return fit_digits_classifier(digits.data / 16.0, digits.target)


def to_digit_pixels(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) or (B, H, W) images in [0, 1] -> (B, 64) grey 8x8 images in [0, 1]."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        images = images.mean(axis=-1)
    if images.ndim != 3:
        raise ValueError(f"`images` must have shape (B, H, W, C) or (B, H, W), got {images.shape}.")
    if images.shape[1:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        size = (DIGITS_RESOLUTION, DIGITS_RESOLUTION)
        # BOX resampling is an area average, the inverse of the dataset's upsampling up to interpolation error.
        images = np.stack([np.asarray(Image.fromarray(image, mode="F").resize(size, Image.BOX)) for image in images])
    return np.clip(images, 0.0, 1.0).reshape(len(images), -1)


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
    classifier = classifier if classifier is not None else get_digits_classifier()
    with torch.no_grad():
        logits = classifier(torch.from_numpy(to_digit_pixels(images)))
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
