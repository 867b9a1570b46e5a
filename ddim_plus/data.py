"""Training data for `training/train.py`: the bundled digits, Hub or local datasets, and image folders.

Only `datasets`, PIL and numpy are used (no torchvision). Augmentation draws its randomness from a generator keyed
by (seed, epoch, sample index), never from a global RNG, so the data a run sees does not depend on when the data
loader happens to fetch it; this is half of what makes resuming from a checkpoint bit-exact.
"""

import os
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .training_utils import augmentation_rng

DIGITS_DATASET_NAME = "digits"
# Grayscale modes: everything else is converted to RGB.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def load_digits_dataset(resolution: int = 8):
    """scikit-learn's 1,797 8x8 handwritten digits as a `datasets.Dataset`, shipped with scikit-learn (offline).

    Args:
        resolution (`int`, defaults to 8): side of the square images; other sizes resize the 8x8 originals
            bicubically (onto a 64-dimensional subspace of the pixels, which deterministic DDIM samples poorly).

    Returns:
        `datasets.Dataset`: columns `image` (grayscale PIL images, light digits on black) and `label` (0-9).
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    images = [Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC) for image in pixels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def _image_folder_extensions() -> set:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {extension.lower() for extension in ImageFolder.EXTENSIONS}


def check_image_folder(train_data_dir: str) -> List[str]:
    """Check that `train_data_dir` holds readable images, before anything else happens.

    Args:
        train_data_dir (`str`): folder of images (subfolders allowed, as for `datasets`' imagefolder).

    Returns:
        `List[str]`: the image files found.

    Raises:
        `ValueError`: the folder is missing or empty, holds no image files, or holds files with an image extension
        that are not images.
    """
    if not os.path.isdir(train_data_dir):
        raise ValueError(f"`--train_data_dir`={train_data_dir!r} is not a folder; pass a folder of images.")
    extensions = _image_folder_extensions()
    all_files, image_files = [], []
    for root, dirs, files in os.walk(train_data_dir):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            all_files.append(path)
            if os.path.splitext(name)[1].lower() in extensions:
                image_files.append(path)
    if not all_files:
        raise ValueError(f"`--train_data_dir`={train_data_dir!r} is empty; put training images in it.")
    if not image_files:
        examples = ", ".join(os.path.relpath(path, train_data_dir) for path in all_files[:5])
        raise ValueError(
            f"`--train_data_dir`={train_data_dir!r} holds no image files (found {len(all_files)} other files, e.g. "
            f"{examples}); supported extensions include .png, .jpg, .bmp and .webp."
        )
    unreadable = []
    for path in image_files:
        try:
            # Opening reads only the header: cheap even for large folders, and catches non-images by extension.
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError):
            unreadable.append(os.path.relpath(path, train_data_dir))
    if unreadable:
        raise ValueError(
            f"`--train_data_dir`={train_data_dir!r} holds {len(unreadable)} files that are not readable images: "
            f"{', '.join(unreadable[:5])}; remove them or fix them."
        )
    return image_files


def load_image_dataset(
    dataset_name: Optional[str] = DIGITS_DATASET_NAME,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    resolution: int = 8,
):
    """The training split of the bundled digits, a Hub or local dataset, or an image folder.

    Args:
        dataset_name (`str`, *optional*, defaults to `"digits"`): `"digits"` for the bundled digits, else a Hub
            dataset id or a local path, loaded with `datasets.load_dataset`. Ignored when `train_data_dir` is given.
        dataset_config_name (`str`, *optional*): the dataset's configuration.
        train_data_dir (`str`, *optional*): a folder of images loaded as `datasets`' imagefolder.
        cache_dir (`str`, *optional*): where `datasets` caches downloads.
        resolution (`int`, defaults to 8): resolution of the bundled digits.

    Returns:
        `datasets.Dataset`
    """
    import datasets

    if train_data_dir is not None:
        check_image_folder(train_data_dir)
        return datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
    if dataset_name == DIGITS_DATASET_NAME:
        return load_digits_dataset(resolution)
    return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")


def find_image_column(dataset, image_column: Optional[str] = None) -> str:
    """The column holding the images: `image_column` if given, else the first column of `datasets.Image` type.

    Raises:
        `ValueError`: `image_column` is not a column, or no column holds images.
    """
    import datasets

    if image_column is not None:
        if image_column not in dataset.column_names:
            raise ValueError(
                f"`--image_column`={image_column!r} is not a column of the dataset; its columns are "
                f"{dataset.column_names}."
            )
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(
        f"No image column found among {dataset.column_names}; name the one holding images with `--image_column`."
    )


def dataset_num_channels(dataset, image_column: str) -> int:
    """1 when the dataset's first image is grayscale, else 3 (RGB, as which every other mode is loaded)."""
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows; pass a dataset with images.")
    return 1 if dataset[0][image_column].mode in GRAYSCALE_MODES else 3


def preprocess_image(
    image: Image.Image,
    resolution: int,
    num_channels: int,
    center_crop: bool = False,
    random_flip: bool = False,
    rng: Optional[np.random.Generator] = None,
) -> torch.Tensor:
    """Resize (shorter side to `resolution`), crop to a square, maybe flip, and scale to [-1, 1].

    Args:
        image (`PIL.Image.Image`): the image, any mode.
        resolution (`int`): side of the output.
        num_channels (`int`): 1 (grayscale) or 3 (RGB).
        center_crop (`bool`, defaults to `False`): crop the centre; otherwise a random crop.
        random_flip (`bool`, defaults to `False`): flip left-right with probability 1/2.
        rng (`np.random.Generator`, *optional*): source of the crop offset and the flip; both are always drawn, in
            that order, so a sample's augmentation depends only on the generator's seed.

    Returns:
        `torch.Tensor`: (num_channels, resolution, resolution) float32 in [-1, 1].
    """
    rng = rng if rng is not None else np.random.default_rng()
    image = image.convert("L" if num_channels == 1 else "RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    if scale != 1:
        image = image.resize(
            (max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BILINEAR
        )
    width, height = image.size
    offset_draws = rng.random(2)
    flip_draw = rng.random()
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(offset_draws[0] * (width - resolution + 1))
        top = int(offset_draws[1] * (height - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and flip_draw < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


class TrainingImages(torch.utils.data.Dataset):
    """A `datasets.Dataset` as (C, H, W) tensors in [-1, 1], augmented reproducibly per (seed, epoch, index).

    Args:
        dataset (`datasets.Dataset`): the images.
        image_column (`str`): the column holding them.
        resolution (`int`): side of the square training images.
        num_channels (`int`): 1 or 3.
        center_crop (`bool`, defaults to `False`), random_flip (`bool`, defaults to `False`): as in
            `preprocess_image`.
        seed (`int`, defaults to 0): the run's seed.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        resolution: int,
        num_channels: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.resolution = resolution
        self.num_channels = num_channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Key the augmentation of the coming epoch (call before iterating over it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, object]:
        image = self.dataset[int(index)][self.image_column]
        pixel_values = preprocess_image(
            image,
            self.resolution,
            self.num_channels,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            rng=augmentation_rng(self.seed, self.epoch, int(index)),
        )
        return {"pixel_values": pixel_values, "index": int(index)}
