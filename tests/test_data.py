"""ddim_plus.data: the bundled digits, image folders, column and channel detection, reproducible augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_plus.data import (
    TrainingImages,
    check_image_folder,
    dataset_num_channels,
    find_image_column,
    load_digits_dataset,
    load_image_dataset,
    preprocess_image,
)


@pytest.fixture(scope="module")
def digits16():
    return load_digits_dataset(16)


def test_bundled_digits_are_resized_grayscale_images(digits16):
    from sklearn.datasets import load_digits

    assert len(digits16) == 1797
    assert digits16.features["label"].names == [str(d) for d in range(10)]
    first = digits16[0]
    assert first["image"].mode == "L" and first["image"].size == (16, 16)
    # Area-averaging back to 8x8 recovers the original digit up to interpolation error.
    back = np.asarray(first["image"].resize((8, 8), Image.BOX), dtype=np.float64) / 255 * 16
    assert np.abs(back - load_digits().images[0]).mean() < 1.0
    assert first["label"] == load_digits().target[0]
    assert load_image_dataset("digits", resolution=12)[5]["image"].size == (12, 12)


def test_image_column_and_channels_are_detected(digits16, tmp_path):
    assert find_image_column(digits16) == "image"
    assert find_image_column(digits16, "image") == "image"
    with pytest.raises(ValueError, match="`--image_column`='img' is not a column"):
        find_image_column(digits16, "img")
    with pytest.raises(ValueError, match="No image column found among \\['label'\\]"):
        find_image_column(digits16.select_columns(["label"]))
    assert dataset_num_channels(digits16, "image") == 1

    folder = tmp_path / "rgb"
    (folder / "cats").mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (10, 6), (index * 40, 10, 200)).save(folder / "cats" / f"{index}.png")
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    column = find_image_column(dataset)
    assert len(dataset) == 3 and dataset_num_channels(dataset, column) == 3


def test_image_folder_checks(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        check_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match="is empty"):
        check_image_folder(str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("hello")
    with pytest.raises(ValueError, match="holds no image files .*readme.md"):
        check_image_folder(str(tmp_path / "docs"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("L", (4, 4)).save(mixed / "good.png")
    (mixed / "notes.txt").write_text("ignored, as by imagefolder")
    assert check_image_folder(str(mixed)) == [str(mixed / "good.png")]
    (mixed / "bad.jpg").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="1 files that are not readable images: bad.jpg"):
        check_image_folder(str(mixed))


def test_preprocess_resizes_crops_and_scales():
    # A 40x20 RGB image: left half black, right half white.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    image = Image.fromarray(pixels)
    out = preprocess_image(image, 8, 3, center_crop=True)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    # Shorter side to 8 gives 16x8; the centre crop straddles the edge: half -1, half +1.
    assert out[:, :, :3].max() == -1.0 and out[:, :, 5:].min() == 1.0
    gray = preprocess_image(image, 8, 1, center_crop=True)
    assert gray.shape == (1, 8, 8) and -1.0 <= gray.min() and gray.max() <= 1.0


def test_augmentation_is_keyed_by_seed_epoch_and_index():
    from ddim_plus.training_utils import augmentation_rng

    pixels = np.zeros((8, 16), dtype=np.uint8)
    pixels[:, :3] = 255  # a bar on the left: flips and crops both show
    image = Image.fromarray(pixels)

    def augment(seed, epoch, index):
        rng = augmentation_rng(seed, epoch, index)
        return preprocess_image(image, 8, 1, random_flip=True, rng=rng)

    assert torch.equal(augment(0, 1, 5), augment(0, 1, 5))
    variants = {augment(0, epoch, 5).numpy().tobytes() for epoch in range(12)}
    assert len(variants) > 2  # both crops and flips vary across epochs
    assert not all(torch.equal(augment(0, 0, i), augment(1, 0, i)) for i in range(6))


def test_training_images_yield_tensors_and_indices(digits16):
    dataset = TrainingImages(digits16, "image", 16, 1, seed=3)
    item = dataset[7]
    assert item["index"] == 7 and item["pixel_values"].shape == (1, 16, 16)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    dataset.set_epoch(4)
    # No random flip and a crop equal to the image: the epoch changes nothing for digits.
    assert torch.equal(dataset[7]["pixel_values"], item["pixel_values"])
