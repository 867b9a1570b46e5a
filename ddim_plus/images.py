"""Image I/O and conversion: the one path by which images enter and leave ddim_plus.

- In memory: `to_image_tensor` checks images in diffusers' convention (PIL images, float arrays or tensors in
  [0, 1]; one image or a batch) and returns a (B, C, H, W) tensor. `DDIMInversionPipeline.preprocess`, the metrics
  and `make_grid` take their inputs through it.
- Files and datasets: `load_image_file` decodes a file (diffusers' `load_image`, EXIF rotation applied);
  `convert_image` brings any PIL mode to the model's (16-bit and float grayscale scaled by their range, not
  clipped); `resize_image`, `crop_and_flip` and `preprocess_image` make the trainer's tensors in [-1, 1], and
  `load_images` reads files for evaluation the same way.
- Out: `make_grid` tiles images with diffusers' `make_image_grid`.

diffusers' `VaeImageProcessor` is not used: it passes 4-channel input through as latents and only warns on values
outside [0, 1], where a pixel model needs an error, and it has no 16-bit grayscale or seeded crop.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.utils import load_image, logging, make_image_grid

logger = logging.get_logger(__name__)

ImageBatch = Union[torch.Tensor, np.ndarray]
ImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]
]

# PIL's high-bit-depth grayscale modes, with the value that stands for white: 16-bit PNG and TIFF files load as
# `I;16*` (or `I` in older Pillow), and float images are taken to hold values in [0, 1].
HIGH_PRECISION_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
# Grayscale modes: everything else is converted to RGB.
GRAYSCALE_MODES = ("1", "L", "LA", *HIGH_PRECISION_MODES)
# PIL modes that `to_image_tensor` reads as they are: 8-bit channels, divided by 255.
_PIL_MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


def to_image_tensor(images: ImageInput, name: str = "images", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images in [0, 1], in any of diffusers' input forms, as one (B, C, H, W) tensor.

    Args:
        images: a float tensor `(C, H, W)` or `(B, C, H, W)`; a float numpy array `(H, W, C)` or `(B, H, W, C)` (the
            layout of ``output_type="np"``); a PIL image of mode "L", "RGB" or "RGBA"; or a list of one of these
            kinds, one image each, all of one shape. Nothing is resized or converted.
        name (`str`, defaults to `"images"`): the argument that error messages name.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of the result.

    Returns:
        `torch.Tensor`: `(B, C, H, W)` in `dtype`, on the input's device; B may be 0.

    Raises:
        `ValueError`: the input is of another kind or layout, not floating point, not finite or outside [0, 1].
    """
    if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)) and not (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    ):
        images = [images]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"`{name}` is an empty list; pass at least one image.")
        if all(isinstance(image, PIL.Image.Image) for image in images):
            other_modes = sorted({image.mode for image in images if image.mode not in _PIL_MODE_CHANNELS})
            if other_modes:
                raise ValueError(
                    f"`{name}` holds PIL images of mode {other_modes}; convert them with `.convert('L')` or "
                    "`.convert('RGB')`."
                )
            arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
            images = [array[..., None] if array.ndim == 2 else array for array in arrays]
        elif not (
            all(isinstance(image, np.ndarray) for image in images)
            or all(isinstance(image, torch.Tensor) for image in images)
        ):
            kinds = sorted({type(image).__name__ for image in images})
            raise ValueError(
                f"`{name}` mixes types {kinds}; pass PIL images, numpy arrays or tensors, one kind at a time."
            )
        shapes = sorted({tuple(image.shape) for image in images})
        if len(shapes) > 1:
            raise ValueError(f"`{name}` items must share one shape, got {shapes}.")
        images = np.stack(images) if isinstance(images[0], np.ndarray) else torch.stack(images)
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"`{name}` as numpy must be (H, W, C) or (B, H, W, C), got shape {images.shape}.")
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(
                f"`{name}` as numpy must be float in [0, 1], got dtype {images.dtype}; for uint8 pixels pass "
                f"`{name}.astype(np.float32) / 255`."
            )
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"`{name}` as a tensor must be (C, H, W) or (B, C, H, W), got {tuple(images.shape)}.")
        if not images.is_floating_point():
            raise ValueError(f"`{name}` as a tensor must be float in [0, 1], got dtype {images.dtype}.")
    else:
        raise ValueError(
            f"`{name}` must be PIL image(s), a numpy array or a torch tensor, got {type(images).__name__}."
        )
    images = images.to(dtype)
    if images.numel():
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"`{name}` holds NaN or infinite values; pass finite pixel values in [0, 1].")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"`{name}` values must lie in [0, 1] (diffusers' image convention), got min {low:g} and max "
                f"{high:g}; for [-1, 1] model outputs use `(x / 2 + 0.5).clamp(0, 1)`."
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


def image_num_channels(mode: str) -> int:
    """1 for a grayscale PIL mode, else 3 (RGB, as which every other mode is loaded)."""
    return 1 if mode in GRAYSCALE_MODES else 3


def convert_image(
    image: PIL.Image.Image, num_channels: int, preserve_input_precision: bool = False
) -> PIL.Image.Image:
    """The image in the mode the model takes: `"L"` (1 channel) or `"RGB"` (3), or `"F"` for high bit depths.

    16-bit (`I;16`, `I`) and float (`F`) grayscale images are scaled by their mode's range (65535, or 1 for float)
    to 0..255; PIL's own `convert("L")` clips them at 255 instead, which turns nearly every pixel of a 16-bit image
    white.

    Args:
        image (`PIL.Image.Image`): the image, any mode.
        num_channels (`int`): 1 (grayscale) or 3 (RGB).
        preserve_input_precision (`bool`, defaults to `False`): keep a high-bit-depth grayscale image as a float
            `"F"` image on the same 0..255 scale instead of rounding it to 8 bits (only for 1 channel: PIL has no
            float RGB mode).

    Returns:
        `PIL.Image.Image`: mode `"L"`, `"RGB"` or `"F"` (values in [0, 255] in every case).

    Raises:
        `ValueError`: a high-bit-depth image holds values outside its range (or non-finite values).
    """
    if image.mode in HIGH_PRECISION_MODES:
        full_scale = HIGH_PRECISION_MODES[image.mode]
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > full_scale:
            raise ValueError(
                f"a mode-{image.mode} image holds values in [{values.min():g}, {values.max():g}], outside [0, "
                f"{full_scale:g}], the range read as black to white; rescale it to that range."
            )
        scaled = values * (255.0 / full_scale)
        if preserve_input_precision and num_channels == 1:
            return PIL.Image.fromarray(scaled.astype(np.float32))
        image = PIL.Image.fromarray(np.round(scaled).astype(np.uint8))
    return image.convert("L" if num_channels == 1 else "RGB")


def resize_image(
    image: PIL.Image.Image, resolution: int, num_channels: int, preserve_input_precision: bool = False
) -> np.ndarray:
    """The image in the model's mode (`convert_image`), its shorter side resized to `resolution` (bilinear).

    Returns:
        `np.ndarray`: (H, W, C) values in [0, 255] (uint8, or float32 for a `"F"` image), min(H, W) = `resolution`.
    """
    image = convert_image(image, num_channels, preserve_input_precision)
    width, height = image.size
    scale = resolution / min(width, height)
    if scale != 1:
        image = image.resize(
            (max(resolution, round(width * scale)), max(resolution, round(height * scale))), PIL.Image.BILINEAR
        )
    pixels = np.asarray(image)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def crop_and_flip(
    pixels: np.ndarray,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    rng: Optional[np.random.Generator] = None,
) -> torch.Tensor:
    """Crop `resize_image`'s output to a square, maybe flip it, and scale it to [-1, 1].

    Args:
        pixels (`np.ndarray`): (H, W, C) in [0, 255], min(H, W) = `resolution`.
        resolution (`int`): side of the output.
        center_crop (`bool`, defaults to `False`): crop the centre; otherwise a random crop.
        random_flip (`bool`, defaults to `False`): flip left-right with probability 1/2.
        rng (`np.random.Generator`, *optional*): source of the crop offset and the flip; both are always drawn, in
            that order, so a sample's augmentation depends only on the generator's seed.

    Returns:
        `torch.Tensor`: (C, resolution, resolution) float32 in [-1, 1].
    """
    rng = rng if rng is not None else np.random.default_rng()
    height, width = pixels.shape[:2]
    offset_draws = rng.random(2)
    flip_draw = rng.random()
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(offset_draws[0] * (width - resolution + 1))
        top = int(offset_draws[1] * (height - resolution + 1))
    pixels = pixels[top : top + resolution, left : left + resolution]
    if random_flip and flip_draw < 0.5:
        pixels = pixels[:, ::-1]
    pixels = pixels.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def preprocess_image(
    image: PIL.Image.Image,
    resolution: int,
    num_channels: int,
    center_crop: bool = False,
    random_flip: bool = False,
    rng: Optional[np.random.Generator] = None,
    preserve_input_precision: bool = False,
) -> torch.Tensor:
    """Resize (shorter side to `resolution`), crop to a square, maybe flip, and scale to [-1, 1]: `resize_image`,
    then `crop_and_flip`.

    Args:
        image (`PIL.Image.Image`): the image, any mode.
        resolution (`int`): side of the output.
        num_channels (`int`): 1 (grayscale) or 3 (RGB).
        center_crop (`bool`, defaults to `False`), random_flip (`bool`, defaults to `False`), rng
            (`np.random.Generator`, *optional*): as in `crop_and_flip`.
        preserve_input_precision (`bool`, defaults to `False`): see `convert_image`.

    Returns:
        `torch.Tensor`: (num_channels, resolution, resolution) float32 in [-1, 1].
    """
    pixels = resize_image(image, resolution, num_channels, preserve_input_precision)
    return crop_and_flip(pixels, resolution, center_crop, random_flip, rng)


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
