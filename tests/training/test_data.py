"""ddim_plus.training.data: the bundled digits, image folders, column and channel detection, reproducible
augmentation."""

import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddim_plus.digits import load_digits
from ddim_plus.images import convert_image, preprocess_image
from ddim_plus.training.data import (
    TrainingImages,
    check_image_folder,
    check_images,
    find_image_column,
    load_digits_dataset,
    load_image_dataset,
)


@pytest.fixture(scope="module")
def digits16():
    return load_digits_dataset(16)


def test_bundled_digits_are_resized_grayscale_images(digits16):
    assert len(digits16) == 1797
    assert digits16.features["label"].names == [str(d) for d in range(10)]
    first = digits16[0]
    assert first["image"].mode == "L" and first["image"].size == (16, 16)
    # Area-averaging back to 8x8 recovers the original digit up to interpolation error.
    back = np.asarray(first["image"].resize((8, 8), Image.BOX), dtype=np.float64) / 255 * 16
    assert np.abs(back - load_digits().images[0]).mean() < 1.0
    assert first["label"] == load_digits().labels[0]
    assert load_image_dataset("digits", resolution=12)[5]["image"].size == (12, 12)


def test_image_column_and_channels_are_detected(digits16, tmp_path):
    assert find_image_column(digits16) == "image"
    assert find_image_column(digits16, "image") == "image"
    with pytest.raises(ValueError, match="`image_column`='img' is not a column"):
        find_image_column(digits16, "img")
    with pytest.raises(ValueError, match="No image column found among \\['label'\\]"):
        find_image_column(digits16.select_columns(["label"]))
    assert check_images(digits16, "image")["num_channels"] == 1

    folder = tmp_path / "rgb"
    (folder / "cats").mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (10, 6), (index * 40, 10, 200)).save(folder / "cats" / f"{index}.png")
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    column = find_image_column(dataset)
    assert len(dataset) == 3 and check_images(dataset, column)["num_channels"] == 3


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
    from ddim_plus.training.data import augmentation_rng

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


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_training_images_equal_pil_crops_and_flips_epoch_after_epoch(mode):
    # The expected pixels come from PIL's own resize, crop and transpose of the decoded image, drawn with the same
    # (seed, epoch, index) generator; the dataset keeps decoded, resized images between epochs.
    import datasets

    from ddim_plus.training.data import augmentation_rng

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (12, 21, 3), dtype=np.uint8)).convert(mode) for _ in range(3)]
    dataset = TrainingImages(
        datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()),
        "image",
        8,
        1 if mode == "L" else 3,
        random_flip=True,
        seed=5,
    )
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index, image in enumerate(images):
            draws = augmentation_rng(5, epoch, index)
            offsets, flip = draws.random(2), draws.random()
            resized = image.resize((14, 8), Image.BILINEAR)
            left, top = int(offsets[0] * (14 - 8 + 1)), int(offsets[1] * (8 - 8 + 1))
            expected = resized.crop((left, top, left + 8, top + 8))
            if flip < 0.5:
                expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
            expected = np.asarray(expected, dtype=np.float32) / 127.5 - 1.0
            expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
            np.testing.assert_array_equal(dataset[index]["pixel_values"].numpy(), expected)


def test_training_images_yield_tensors_and_indices(digits16):
    dataset = TrainingImages(digits16, "image", 16, 1, seed=3)
    item = dataset[7]
    assert item["index"] == 7 and item["pixel_values"].shape == (1, 16, 16)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    dataset.set_epoch(4)
    # No random flip and a crop equal to the image: the epoch changes nothing for digits.
    assert torch.equal(dataset[7]["pixel_values"], item["pixel_values"])


def load_folder(folder, tmp_path):
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    return dataset, find_image_column(dataset)


def test_every_image_is_decoded_before_training_and_bad_ones_are_named(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        # Noise does not compress: the file is long enough to cut in the middle of its pixel data.
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    dataset, column = load_folder(folder, tmp_path)
    assert check_images(dataset, column, root=str(folder))["num_channels"] == 3

    # A PNG cut short: its header is intact, so opening it works; only decoding its pixels fails.
    data = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(data[: len(data) // 2])
    with Image.open(folder / "2.png") as header_only:
        assert header_only.size == (64, 64)
    (folder / "3.png").write_text("not an image")
    dataset, column = load_folder(folder, tmp_path)
    with pytest.raises(ValueError, match=r"2 of 4 images cannot be decoded: 2.png \(OSError: .*truncated.*; 3.png"):
        check_images(dataset, column, root=str(folder))


def test_grayscale_among_colour_trains_as_gray_rgb_as_in_train_unconditional(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index in range(5):
        Image.new("RGB", (8, 8), (index * 40, 10, 200)).save(folder / f"rgb_{index}.png")
    Image.new("L", (8, 8), 90).save(folder / "scan.png")
    ramp = np.linspace(0, 65535, 64).reshape(8, 8).round().astype(np.uint16)
    Image.fromarray(ramp).save(folder / "scan16.png")
    dataset, column = load_folder(folder, tmp_path)
    images = check_images(dataset, column, root=str(folder))
    assert images["num_channels"] == 3
    assert sorted(images["grayscale_in_colour"]) == ["scan.png", "scan16.png"]
    training = TrainingImages(dataset, column, 8, images["num_channels"], center_crop=True)
    for index in range(len(dataset)):
        name = os.path.basename(dataset.cast_column(column, datasets.Image(decode=False))[index][column]["path"])
        pixels = training[index]["pixel_values"].double().numpy()
        if name == "scan.png":  # PIL's own L -> RGB conversion, as train_unconditional's `convert("RGB")`
            expected = np.asarray(Image.new("L", (8, 8), 90).convert("RGB"), dtype=np.float64)
        elif name == "scan16.png":  # scaled by the 16-bit range, then gray RGB
            expected = np.repeat(np.round(ramp / 65535 * 255)[..., None], 3, axis=2)
        else:
            continue
        np.testing.assert_allclose(pixels, expected.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_all_grayscale_images_train_a_one_channel_model(tmp_path):
    folder = tmp_path / "gray"
    folder.mkdir()
    for index in range(3):
        Image.new("L", (8, 8), index * 60).save(folder / f"scan_{index}.png")
    dataset, column = load_folder(folder, tmp_path)
    images = check_images(dataset, column, root=str(folder))
    assert images["num_channels"] == 1 and images["grayscale_in_colour"] == []


def write_16bit_folder(folder, num_images=3, size=(12, 10)):
    """16-bit grayscale PNGs holding ramps over the whole 0..65535 range; returns the arrays written."""
    folder.mkdir()
    arrays = []
    for index in range(num_images):
        ramp = np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0])
        array = np.roll(ramp, index, axis=1).round().astype(np.uint16)
        Image.fromarray(array).save(folder / f"scan_{index}.png")
        arrays.append(array)
    return arrays


@pytest.mark.parametrize("preserve", [False, True])
def test_16bit_grayscale_is_scaled_by_its_range_in_the_training_data(tmp_path, preserve):
    arrays = write_16bit_folder(tmp_path / "scans")
    dataset, column = load_folder(tmp_path / "scans", tmp_path)
    assert dataset[0][column].mode == "I;16"
    assert check_images(dataset, column)["num_channels"] == 1
    # Same size as the images and a centre crop: the pixels reach the model unresampled.
    images = TrainingImages(dataset, column, 10, 1, center_crop=True, preserve_input_precision=preserve)
    for index, array in enumerate(arrays):
        crop = array[:, 1:11].astype(np.float64) / 65535  # centre crop of a 12-wide image to 10
        expected = crop if preserve else np.round(crop * 255) / 255
        actual = images[index]["pixel_values"][0].double().numpy()
        np.testing.assert_allclose((actual + 1) / 2, expected, atol=1e-6)
    # PIL's own conversion, which the trainer used, clips nearly everything to white.
    assert (np.asarray(dataset[0][column].convert("L")) == 255).mean() > 0.9


def test_high_bit_depth_modes_are_scaled_by_their_range():
    words = np.array([[0, 16384], [32768, 65535]])
    cases = {
        "I;16": (Image.fromarray(words.astype(np.uint16)), words / 65535),
        "I": (Image.fromarray(words.astype(np.int32)), words / 65535),
        "F": (Image.fromarray(np.float32([[0.0, 0.25], [0.5, 1.0]])), np.array([[0.0, 0.25], [0.5, 1.0]])),
    }
    for mode, (image, values) in cases.items():
        assert image.mode == mode
        converted = convert_image(image, 1)
        assert converted.mode == "L"
        np.testing.assert_array_equal(np.asarray(converted), np.round(values * 255))
        precise = convert_image(image, 1, preserve_input_precision=True)
        assert precise.mode == "F"
        np.testing.assert_allclose(np.asarray(precise), values * 255, rtol=1e-6)
        assert convert_image(image, 3).mode == "RGB"
    with pytest.raises(ValueError, match=r"mode-F image holds values in \[0, 2\], outside \[0, 1\]"):
        convert_image(Image.fromarray(np.float32([[0.0, 2.0]])), 1)


def test_cli_loads_16bit_images_as_the_trainer_does(tmp_path):
    from ddim_plus.cli import _load_images

    arrays = write_16bit_folder(tmp_path / "scans", size=(8, 8))
    loaded = _load_images(sorted(str(p) for p in (tmp_path / "scans").iterdir()), channels=1, size=8)
    assert loaded.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(loaded[..., 0], np.stack(arrays) / 65535, atol=1e-6)


def test_save_to_disk_folders_load_as_datasets_saves_them(tmp_path):
    # Expected: the rows `datasets.load_from_disk` reads back, for a Dataset and for a DatasetDict's train split.
    images = [Image.new("RGB", (6, 6), (index * 50, 0, 0)) for index in range(3)]
    saved = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    saved.save_to_disk(str(tmp_path / "dataset"))
    datasets.DatasetDict({"train": saved, "test": saved.select([0])}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"validation": saved}).save_to_disk(str(tmp_path / "no_train"))
    for name in ("dataset", "dict"):
        loaded = load_image_dataset(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
        assert len(loaded) == 3
        assert [np.asarray(row["image"]).tolist() for row in loaded] == [np.asarray(i).tolist() for i in images]
    with pytest.raises(ValueError, match=r"without a 'train' split \(its splits: validation\)"):
        load_image_dataset(str(tmp_path / "no_train"))


def test_a_dataset_name_that_does_not_load_is_one_error_naming_it(tmp_path):
    missing = str(tmp_path / "typo_folder")
    with pytest.raises(ValueError, match=r"`dataset_name`='.*typo_folder' cannot be loaded with `datasets"):
        load_image_dataset(missing, cache_dir=str(tmp_path / "cache"))
