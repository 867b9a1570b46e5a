"""ddim_plus.images: input forms against numpy-built tensors, grids against numpy-built expectations, and reading
image files."""

import numpy as np
import PIL.Image
import pytest
import torch

from ddim_plus.images import load_image_file, make_grid, to_image_tensor


def test_every_input_form_gives_the_same_tensor():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    arrays = pixels.astype(np.float32) / 255  # (B, H, W, C) in [0, 1], as output_type="np"
    expected = torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy())
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    for form in (arrays, list(arrays), tensors, list(tensors), [PIL.Image.fromarray(p) for p in pixels]):
        assert torch.equal(to_image_tensor(form), expected)
    assert torch.equal(to_image_tensor(arrays[0]), expected[:1])  # one image, no batch axis
    assert torch.equal(to_image_tensor(PIL.Image.fromarray(pixels[1, ..., 0])), expected[1:, :1])
    assert to_image_tensor(arrays.astype(np.float64), dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((1, 4, 4, 3), dtype=np.uint8), r"float in \[0, 1\]"),
        (torch.full((1, 3, 4, 4), 1.001), r"\[0, 1\]"),
        (torch.full((1, 3, 4, 4), float("nan")), "NaN"),
        (PIL.Image.new("P", (4, 4)), r"mode \['P'\]"),
        ([np.zeros((4, 4, 3)), np.zeros((4, 5, 3))], "share one shape"),
        ([np.zeros((4, 4, 3)), torch.zeros(3, 4, 4)], "mixes types"),
        (np.zeros((1, 1, 4, 4, 3)), r"\(B, H, W, C\)"),
        ("image.png", "PIL image"),
        ([], "empty list"),
    ],
)
def test_bad_input_names_the_argument(images, match):
    with pytest.raises(ValueError, match="`pictures`.*" + match):
        to_image_tensor(images, name="pictures")


def numpy_grid(images, num_columns, padding, scale, background):
    """The grid built cell by cell in numpy: images row-major, `padding` between and around them, then scaled."""
    count, height, width, channels = images.shape
    num_rows = -(-count // num_columns)
    grid = np.full(
        (num_rows * (height + padding) + padding, num_columns * (width + padding) + padding, channels), background
    )
    for index, image in enumerate(images):
        row, column = divmod(index, num_columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top : top + height, left : left + width] = image
    grid = np.kron(grid, np.ones((scale, scale, 1)))
    pixels = (grid * 255).round().astype(np.uint8)
    return pixels[..., 0] if channels == 1 else pixels


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("count, num_columns", [(1, 1), (5, 2), (6, 3), (7, 7), (9, None)])
@pytest.mark.parametrize("padding, scale, background", [(0, 1, 1.0), (1, 1, 1.0), (2, 3, 0.5), (0, 4, 0.0)])
def test_make_grid_equals_the_numpy_layout(channels, count, num_columns, padding, scale, background):
    images = np.random.default_rng(count).random((count, 3, 4, channels)).astype(np.float32)
    columns = num_columns or int(np.ceil(np.sqrt(count)))
    expected = numpy_grid(images, columns, padding, scale, background)
    grid = make_grid(images, num_columns=num_columns, padding=padding, scale=scale, background=background)
    assert grid.mode == ("L" if channels == 1 else "RGB")
    np.testing.assert_array_equal(np.asarray(grid), expected)
    # A (B, C, H, W) tensor gives the same grid.
    as_tensor = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), columns, padding, scale, background)
    np.testing.assert_array_equal(np.asarray(as_tensor), expected)


def test_make_grid_places_each_image():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.5, 1.0)])
    grid = np.asarray(make_grid(images, num_columns=2, padding=1, background=1.0))
    assert grid.shape == (7, 7, 3)
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 128).all() and (grid[4:6, 1:3] == 255).all()
    assert (grid[4:6, 4:6] == 255).all()  # empty cell: background
    big = make_grid(images[:, :1].numpy().transpose(0, 2, 3, 1), scale=3)
    assert big.mode == "L" and big.size == (21, 21)


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (torch.zeros(0, 1, 2, 2), {}, "empty"),
        (torch.zeros(2, 2, 2, 2), {}, "1 or 3 channels"),
        (torch.zeros(2, 1, 2, 2), {"scale": 0}, "`scale` must be >= 1"),
        (torch.zeros(2, 1, 2, 2), {"padding": -1}, "`padding` >= 0"),
        (torch.full((2, 1, 2, 2), 2.0), {}, r"\[0, 1\]"),
    ],
)
def test_make_grid_rejects_bad_input(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_grid(images, **kwargs)


def test_load_image_file_keeps_16_bit_grey_and_applies_exif_rotation(tmp_path):
    deep = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    PIL.Image.fromarray(deep).save(tmp_path / "deep.png")
    picture = load_image_file(str(tmp_path / "deep.png"))
    assert picture.mode.startswith("I") and np.array_equal(np.asarray(picture), deep)
    assert load_image_file(str(tmp_path / "deep.png"), "L").mode == "L"

    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # EXIF Orientation 6: the camera was turned; show the picture rotated 90 degrees clockwise
    PIL.Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    turned = np.asarray(load_image_file(str(tmp_path / "turned.jpg")))
    assert turned.shape == (4, 3)
    stored = np.asarray(PIL.Image.open(tmp_path / "turned.jpg"))
    np.testing.assert_array_equal(turned, np.rot90(stored, k=-1))
