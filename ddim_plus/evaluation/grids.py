"""Image grids for sample sheets, consistency tables (rows = seeds, columns = S) and interpolation strips."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import PIL.Image

from .fid import ImageBatch, to_image_tensor


def make_grid(
    images: ImageBatch, num_columns: Optional[int] = None, padding: int = 1, scale: int = 1, background: float = 1.0
) -> PIL.Image.Image:
    """Tile images row-major into one PIL image.

    Args:
        images (`np.ndarray` or `torch.Tensor`): (B, H, W, C) array or (B, C, H, W) tensor, floats in [0, 1],
            C = 1 or 3.
        num_columns (`int`, *optional*): images per row; defaults to ceil(sqrt(B)).
        padding (`int`, defaults to 1): pixels between images (before scaling).
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
    grid = np.full(
        (num_rows * (height + padding) + padding, num_columns * (width + padding) + padding, channels),
        background,
        dtype=np.float32,
    )
    for index, image in enumerate(array):
        row, column = divmod(index, num_columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top : top + height, left : left + width] = image
    pixels = (grid * 255).round().astype(np.uint8)
    picture = PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), PIL.Image.NEAREST)
    return picture
