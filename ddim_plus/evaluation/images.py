"""Image utilities: image batches as tensors, grids, and reading image files.

Images everywhere in ddim_plus are floats in [0, 1], either a `torch.Tensor` shaped (B, C, H, W) or a numpy array
shaped (B, H, W, C) as returned by ``pipe(..., output_type="np").images``. Grids and file reading go through
diffusers' own `make_image_grid` and `load_image`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.utils import load_image, logging, make_image_grid

logger = logging.get_logger(__name__)

ImageBatch = Union[torch.Tensor, np.ndarray]


def to_image_tensor(images: ImageBatch) -> torch.Tensor:
    """Return `images` as a float32 (B, C, H, W) tensor in [0, 1].

    Args:
        images (`torch.Tensor` or `np.ndarray`): a (B, C, H, W) tensor or a (B, H, W, C) array (the layout of
            ``output_type="np"``), floats in [0, 1]. A single image without the batch axis is not accepted.

    Returns:
        `torch.Tensor`: (B, C, H, W), float32.
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"`images` must be a (B, H, W, C) array, got shape {images.shape}.")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif not isinstance(images, torch.Tensor):
        raise TypeError(f"`images` must be a torch.Tensor or a numpy array, got {type(images).__name__}.")
    elif images.ndim != 4:
        raise ValueError(f"`images` must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}.")
    images = images.float()
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"`images` must hold values in [0, 1], got [{images.min().item():.3f}, {images.max().item():.3f}]; "
            "for [-1, 1] model outputs use `(x / 2 + 0.5).clamp(0, 1)`."
        )
    return images


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W): grey repeated, colour kept."""
    if images.shape[1] == 3:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"`images` must have 1 or 3 channels for this feature network, got {images.shape[1]}.")


def make_grid(
    images: ImageBatch, num_columns: Optional[int] = None, padding: int = 1, scale: int = 1, background: float = 1.0
) -> PIL.Image.Image:
    """Tile images row-major into one PIL image (sample sheets, rows of seeds by S, interpolation strips).

    Args:
        images (`np.ndarray` or `torch.Tensor`): (B, H, W, C) array or (B, C, H, W) tensor, floats in [0, 1],
            C = 1 or 3.
        num_columns (`int`, *optional*): images per row; defaults to ceil(sqrt(B)).
        padding (`int`, defaults to 1): pixels between images and around the grid (before scaling).
        scale (`int`, defaults to 1): nearest-neighbour upscaling factor (tiny digits are 8x8).
        background (`float`, defaults to 1.0): grey level of the padding and of empty cells.

    Returns:
        `PIL.Image.Image`: mode "L" for one channel, "RGB" for three.
    """
    array = to_image_tensor(images).permute(0, 2, 3, 1).numpy()
    count, height, width, channels = array.shape
    if count == 0:
        raise ValueError("`images` is empty; nothing to put in a grid.")
    if channels not in (1, 3):
        raise ValueError(f"`images` must have 1 or 3 channels, got {channels}.")
    if scale < 1 or padding < 0:
        raise ValueError(f"`scale` must be >= 1 and `padding` >= 0, got {scale} and {padding}.")
    num_columns = num_columns or math.ceil(math.sqrt(count))
    num_rows = math.ceil(count / num_columns)
    mode = "L" if channels == 1 else "RGB"
    fill = round(background * 255) if channels == 1 else (round(background * 255),) * 3
    pixels = (array * 255).round().astype(np.uint8)
    tiles = [PIL.Image.fromarray(tile[..., 0] if channels == 1 else tile) for tile in pixels]
    tiles += [PIL.Image.new(mode, (width, height), fill)] * (num_rows * num_columns - count)
    # Each tile carries the padding on its top and left; the grid gets the closing right and bottom edge.
    tiles = [PIL.ImageOps.expand(tile, border=(padding, padding, 0, 0), fill=fill) for tile in tiles]
    grid = make_image_grid(tiles, rows=num_rows, cols=num_columns).convert(mode)  # it always pastes onto RGB
    grid = PIL.ImageOps.expand(grid, border=(0, 0, padding, padding), fill=fill)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)
    return grid


def load_image_file(path: str, mode: Optional[str] = None) -> PIL.Image.Image:
    """Read one image file with diffusers' `load_image` (EXIF rotation applied), fully decoded.

    Args:
        path (`str`): the file.
        mode (`str`, *optional*): PIL mode to convert to (e.g. "L", "RGB"); by default the file's own mode is kept,
            so 16-bit and float grayscale keep their precision.

    Returns:
        `PIL.Image.Image`
    """
    return load_image(path, convert_method=lambda image: image if mode is None else image.convert(mode))


def load_images(paths: Sequence[str], channels: int, size: int) -> np.ndarray:
    """Read image files as the trainer prepares its data: shorter side resized to `size`, centre crop, scaled.

    Args:
        paths (`Sequence[str]`): image files.
        channels (`int`): 1 (grey) or 3 (RGB), the model's `in_channels`.
        size (`int`): the model's `sample_size`.

    Returns:
        `np.ndarray`: (B, size, size, channels) floats in [0, 1].

    Raises:
        `ValueError`: a file cannot be read; the message names it.
    """
    from ..training.data import preprocess_image

    arrays = []
    for path in paths:
        try:
            picture = load_image_file(path)
            if picture.size != (size, size):
                width, height = picture.size
                logger.warning(
                    f"{path} is {width}x{height}: shorter side resized to {size}, centre {size}x{size} kept (as the "
                    "trainer with --center_crop)"
                )
            # The trainer's own preprocessing: 16-bit and float grayscale scaled (not clipped) and kept in float, and
            # the centre crop, so a non-square photo is cropped, not squashed.
            pixels = preprocess_image(picture, size, channels, center_crop=True, preserve_input_precision=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not read image {path!r}: {error}") from error
        arrays.append(pixels.permute(1, 2, 0).numpy() / 2 + 0.5)
    return np.stack(arrays)
