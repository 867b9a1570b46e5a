"""The bundled 8x8 handwritten digits: the data behind the digits demo, its metric and its tests.

The data are the 1,797 8x8 handwritten digits of the UCI ML hand-written digits data set (the copy scikit-learn
ships), stored in ``ddim_plus/assets/digits.npz`` under CC BY 4.0 (attribution in ``ddim_plus/assets/README.md``), so
they need neither a download nor scikit-learn. `digits_pixels` is the one preparation of them as 8-bit images, shared
by the training set (`ddim_plus.training.data.load_digits_dataset`) and the metric's reference
(`ddim_plus.evaluation.digits.digits_reference_images`), so a model that learnt its data perfectly scores near zero.
"""

import os
from typing import NamedTuple

import numpy as np
import PIL.Image

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
DIGITS_FILE = os.path.join(ASSETS_DIR, "digits.npz")
DIGITS_RESOLUTION = 8


class Digits(NamedTuple):
    """The bundled digits: `images` (1797, 8, 8) uint8 holding the data set's own values 0-16 (the number of set
    pixels in each 4x4 block of a 32x32 bitmap; divide by 16 for [0, 1]) and `labels` (1797,) int64, 0-9."""

    images: np.ndarray
    labels: np.ndarray


def load_digits() -> Digits:
    """The 1,797 bundled 8x8 digits, in the order of scikit-learn's `load_digits` (no download, no scikit-learn).

    Returns:
        `Digits`: `images` (1797, 8, 8) uint8 in 0-16 and `labels` (1797,) int64.
    """
    with np.load(DIGITS_FILE) as digits:
        return Digits(digits["images"], digits["labels"].astype(np.int64))


def digits_pixels(resolution: int = DIGITS_RESOLUTION) -> np.ndarray:
    """All 1,797 bundled digits as 8-bit grey images, light digits on black, resized bicubically by PIL.

    Args:
        resolution (`int`, defaults to 8): side of the images; 8 keeps the originals. Other sizes lie on a
            64-dimensional subspace of the pixels (the 8x8 originals, upsampled).

    Returns:
        `np.ndarray`: (1797, resolution, resolution) uint8.
    """
    pixels = np.round(load_digits().images / 16.0 * 255.0).astype(np.uint8)
    if resolution == DIGITS_RESOLUTION:
        return pixels
    return np.stack(
        [np.asarray(PIL.Image.fromarray(p).resize((resolution, resolution), PIL.Image.BICUBIC)) for p in pixels]
    )
