"""Training data for `ddim_plus.train`: the bundled digits, Hub or local datasets, and image folders.

Only `datasets`, PIL and numpy are used (no torchvision). Augmentation draws its randomness from a generator keyed
by (seed, epoch, sample index), never from a global RNG, so the data a run sees does not depend on when the data
loader happens to fetch it; this is half of what makes resuming from a checkpoint bit-exact.
"""

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from ..digits import digits_pixels, load_digits
from ..images import convert_image, crop_and_flip, image_num_channels, resize_image

DIGITS_DATASET_NAME = "digits"
# Memory per process (and per data-loader worker) that `TrainingImages` spends on keeping decoded, resized images.
RESIZED_CACHE_BYTES = 1 << 30


def keyed_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy's `SeedSequence`, so nearby keys give unrelated streams)."""
    low, high = np.random.SeedSequence([int(key) for key in keys]).generate_state(2, dtype=np.uint32)
    return int(high & 0x7FFFFFFF) << 32 | int(low)


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch, the same whenever and wherever it is drawn."""
    return np.random.default_rng(keyed_seed(seed, epoch, index))


def load_digits_dataset(resolution: int = 8):
    """The 1,797 bundled 8x8 handwritten digits (`ddim_plus.digits.digits_pixels`) as a `datasets.Dataset`.

    Args:
        resolution (`int`, defaults to 8): side of the square images; other sizes resize the 8x8 originals
            bicubically (onto a 64-dimensional subspace of the pixels, which deterministic DDIM samples poorly).

    Returns:
        `datasets.Dataset`: columns `image` (grayscale PIL images, light digits on black) and `label` (0-9).
    """
    import datasets

    images = [Image.fromarray(pixels) for pixels in digits_pixels(resolution)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": load_digits().labels.tolist()}, features=features)


def _image_folder_extensions() -> set:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {extension.lower() for extension in ImageFolder.EXTENSIONS}


def check_image_folder(train_data_dir: str) -> List[str]:
    """Check that `train_data_dir` holds image files, before anything else happens (`check_images` decodes them).

    Args:
        train_data_dir (`str`): folder of images (subfolders allowed, as for `datasets`' imagefolder).

    Returns:
        `List[str]`: the image files found.

    Raises:
        `ValueError`: the folder is missing or empty, or holds no image files.
    """
    if not os.path.isdir(train_data_dir):
        raise ValueError(f"`train_data_dir`={train_data_dir!r} is not a folder; pass a folder of images.")
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
        raise ValueError(f"`train_data_dir`={train_data_dir!r} is empty; put training images in it.")
    if not image_files:
        examples = ", ".join(os.path.relpath(path, train_data_dir) for path in all_files[:5])
        raise ValueError(
            f"`train_data_dir`={train_data_dir!r} holds no image files (found {len(all_files)} other files, e.g. "
            f"{examples}); supported extensions include .png, .jpg, .bmp and .webp."
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
        dataset_name (`str`, *optional*, defaults to `"digits"`): `"digits"` for the bundled digits, a folder written
            by `save_to_disk` (loaded with `datasets.load_from_disk`, its `train` split for a `DatasetDict`), else a
            Hub dataset id or a local path, loaded with `datasets.load_dataset`. Ignored when `train_data_dir` is
            given.
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
    if is_saved_dataset(dataset_name):
        return load_saved_dataset(dataset_name)
    try:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        # a typo'd path, an unknown id or no network: `datasets` says which, the trainer names the flag
        raise ValueError(
            f"`dataset_name`={dataset_name!r} cannot be loaded with `datasets.load_dataset` ({type(error).__name__}: "
            f"{error}). Pass a Hub dataset id (cached, with HF_HUB_OFFLINE=1), a local folder of images or data "
            "files, or a `save_to_disk` folder; a plain folder of images also goes to `train_data_dir`."
        ) from error


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `datasets`' `save_to_disk` (a `Dataset` or a `DatasetDict`), which
    `datasets.load_dataset` refuses ("use `load_from_disk` instead")."""
    markers = ("dataset_dict.json", "state.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, marker)) for marker in markers)


def load_saved_dataset(path: str):
    """A `save_to_disk` folder loaded with `datasets.load_from_disk`: the dataset, or a `DatasetDict`'s `train` split.

    Raises:
        `ValueError`: a `DatasetDict` without a `train` split (naming its splits).
    """
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(
                f"`dataset_name`={path!r} is a saved DatasetDict without a 'train' split (its splits: "
                f"{', '.join(loaded)}); save the training images as its 'train' split."
            )
        return loaded["train"]
    return loaded


def find_image_column(dataset, image_column: Optional[str] = None) -> str:
    """The column holding the images: `image_column` if given, else the first column of `datasets.Image` type.

    Raises:
        `ValueError`: `image_column` is not a column, or no column holds images.
    """
    import datasets

    if image_column is not None:
        if image_column not in dataset.column_names:
            raise ValueError(
                f"`image_column`={image_column!r} is not a column of the dataset; its columns are "
                f"{dataset.column_names}."
            )
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(
        f"No image column found among {dataset.column_names}; name the one holding images with `image_column`."
    )


def _decode_row(row) -> Image.Image:
    """A `datasets.Image(decode=False)` value (or an already decoded image), fully decoded."""
    if isinstance(row, Image.Image):
        image = row
    else:
        image = Image.open(io.BytesIO(row["bytes"]) if row.get("bytes") else row["path"])
    image.load()
    return image


def _scan_one(index_and_row):
    index, row = index_and_row
    try:
        image = _decode_row(row)
        convert_image(image, image_num_channels(image.mode))
    # OSError: unreadable or truncated; SyntaxError: PIL's word for a corrupt PNG chunk; ValueError: out of range.
    except (OSError, SyntaxError, ValueError) as error:
        return index, None, None, f"{type(error).__name__}: {error}"
    return index, image.mode, image.size, None


def check_images(dataset, image_column: str, root: Optional[str] = None, num_workers: int = 4) -> Dict[str, object]:
    """Decode every image once before training, so that a broken file stops the run before its first step.

    Images are decoded in `num_workers` threads with a progress bar. The channel count is decided from all images:
    1 if every image is grayscale, else 3, with the grayscale images among colour ones named (they train as RGB).

    Args:
        dataset (`datasets.Dataset`): the training data.
        image_column (`str`): the column holding the images.
        root (`str`, *optional*): the image folder, to name files relative to it (rows are named by index and file
            name otherwise).
        num_workers (`int`, defaults to 4): decoding threads.

    Returns:
        `Dict[str, object]`: `num_channels` (1 if every image is grayscale, else 3), `min_side` (the shortest image
        side, in pixels), `sizes` (the (width, height) of each image, in dataset order) and `grayscale_in_colour`
        (the names of grayscale images among colour ones, which train converted to RGB).

    Raises:
        `ValueError`: the dataset has no rows, or some images cannot be decoded (naming them and why).
    """
    import datasets
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise ValueError("The dataset has no rows; pass a dataset with images.")
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        # Undecoded rows give the file path (or the bytes), so a broken image can be named.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    column = dataset.select_columns([image_column])

    def name(index: int) -> str:
        row = column[index][image_column]
        path = row.get("path") if isinstance(row, dict) else None
        if path and root is not None:
            return os.path.relpath(path, root)
        return f"row {index}" + (f" ({os.path.basename(path)})" if path else "")

    modes, sizes, broken = [None] * len(column), [None] * len(column), []
    with (
        ThreadPoolExecutor(max_workers=num_workers) as executor,
        tqdm(total=len(column), desc="Decoding images", unit="image", leave=False) as progress,
    ):
        for start in range(0, len(column), 256):
            rows = column[start : start + 256][image_column]
            for index, mode, size, error in executor.map(_scan_one, enumerate(rows, start=start)):
                modes[index], sizes[index] = mode, size
                if error is not None:
                    broken.append(f"{name(index)} ({error})")
            progress.update(len(rows))
    if broken:
        raise ValueError(
            f"{len(broken)} of {len(column)} images cannot be decoded: {'; '.join(broken[:5])}"
            f"{'; ...' if len(broken) > 5 else ''}. Remove or fix them before training."
        )
    channels = [image_num_channels(mode) for mode in modes]
    # As train_unconditional (which converts every image to RGB): one colour image makes a colour model, and the
    # grayscale images among colour ones train as gray RGB images (R = G = B) rather than stopping the run.
    num_channels = max(channels)
    grayscale = [name(index) for index, count in enumerate(channels) if count < num_channels]
    return {
        "num_channels": num_channels,
        "min_side": min(min(size) for size in sizes),
        "sizes": sizes,
        "grayscale_in_colour": grayscale,
    }


class TrainingImages(torch.utils.data.Dataset):
    """A `datasets.Dataset` as (C, H, W) tensors in [-1, 1], augmented reproducibly per (seed, epoch, index).

    Args:
        dataset (`datasets.Dataset`): the images.
        image_column (`str`): the column holding them.
        resolution (`int`): side of the square training images.
        num_channels (`int`): 1 or 3.
        center_crop (`bool`, defaults to `False`), random_flip (`bool`, defaults to `False`): as in
            `ddim_plus.images.preprocess_image`.
        seed (`int`, defaults to 0): the run's seed.
        preserve_input_precision (`bool`, defaults to `False`): see `ddim_plus.images.convert_image`.
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
        preserve_input_precision: bool = False,
    ):
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.resolution = resolution
        self.num_channels = num_channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.preserve_input_precision = preserve_input_precision
        self.epoch = 0
        # Decoding and resizing are the same every epoch: keep their results while they fit in RESIZED_CACHE_BYTES
        # (the bundled digits fit many times over), so that a small data set is decoded once per worker, not per step.
        self._resized: Dict[int, np.ndarray] = {}
        self._resized_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        """Key the augmentation of the coming epoch (call before iterating over it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _resized_image(self, index: int) -> np.ndarray:
        pixels = self._resized.get(index)
        if pixels is None:
            image = self.dataset[index][self.image_column]
            pixels = resize_image(image, self.resolution, self.num_channels, self.preserve_input_precision)
            if self._resized_bytes + pixels.nbytes <= RESIZED_CACHE_BYTES:
                self._resized[index] = pixels
                self._resized_bytes += pixels.nbytes
        return pixels

    def __getitem__(self, index: int) -> Dict[str, object]:
        index = int(index)
        pixel_values = crop_and_flip(
            self._resized_image(index),
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            rng=augmentation_rng(self.seed, self.epoch, index),
        )
        return {"pixel_values": pixel_values, "index": index}
