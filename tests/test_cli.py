"""The `ddim-plus` command line on a tiny pipeline saved to disk: files written, exit codes, help, errors."""

import argparse
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_unet
from safetensors import safe_open

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-digits-pipeline")
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(channels=1, sample_size=8), scheduler=DDIMSchedulerPlus())
    pipe.save_pretrained(folder)
    return str(folder)


def grid_size(count_across, count_down, size=8, padding=1, scale=1):
    return ((size + padding) * count_across + padding) * scale, ((size + padding) * count_down + padding) * scale


def digit_png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def test_every_option_of_every_subcommand_is_explained(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"sample", "invert", "interpolate", "evaluate", "tune-steps"}
    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            assert action.help, f"`ddim-plus {name}` option {action.option_strings or action.dest} has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "--out" in capsys.readouterr().out or name == "tune-steps"  # it writes into MODEL


def test_console_script_runs():
    # The installed entry point (setup.py) resolves to ddim_plus.cli:main.
    completed = subprocess.run(
        [sys.executable, "-m", "ddim_plus.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    assert "sample" in completed.stdout and "evaluate" in completed.stdout


def test_sample_writes_grid_of_the_right_size(model_dir, tmp_path, capsys):
    out = tmp_path / "nested" / "grid.png"
    code = main(
        ["sample", model_dir, "--steps", "3", "--num", "6", "--columns", "3", "--scale", "2"]
        + ["--out", str(out), "--quiet", "--batch-size", "4"]
    )
    assert code == 0
    with PIL.Image.open(out) as picture:
        assert picture.size == grid_size(3, 2, scale=2)
        assert picture.mode == "L"
    assert str(out) in capsys.readouterr().out


def test_sample_grid_matches_the_pipeline(model_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert (
        main(
            ["sample", model_dir, "--steps", "4", "--num", "2", "--seed", "5", "--scale", "1"]
            + ["--columns", "2", "--out", str(out), "--quiet"]
        )
        == 0
    )
    pipe = DDIMPlusPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=2,
        generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        num_inference_steps=4,
        output_type="np",
    ).images
    grid = np.asarray(PIL.Image.open(out), dtype=np.float32) / 255
    np.testing.assert_allclose(grid[1:9, 1:9], expected[0, ..., 0], atol=1 / 255)
    np.testing.assert_allclose(grid[1:9, 10:18], expected[1, ..., 0], atol=1 / 255)


def test_invert_writes_latents_that_decode_to_the_reconstruction(model_dir, tmp_path, capsys):
    images = [digit_png(tmp_path / f"digit{i}.png", seed=i) for i in range(2)]
    latents_file, reconstruction = tmp_path / "latents.safetensors", tmp_path / "recon.png"
    code = main(
        ["invert", model_dir, *images, "--steps", "5", "--no-refine", "--out", str(latents_file)]
        + ["--reconstruction", str(reconstruction), "--scale", "1", "--quiet"]
    )
    assert code == 0
    with safe_open(str(latents_file), "pt") as handle:
        latents = handle.get_tensor("latents")
        metadata = handle.metadata()
    assert latents.shape == (2, 1, 8, 8)
    assert metadata["num_inference_steps"] == "5" and metadata["refine"] == "False"
    assert metadata["images"] == "digit0.png,digit1.png"
    assert "reconstruction MSE" in capsys.readouterr().out
    with PIL.Image.open(reconstruction) as picture:
        assert picture.size == grid_size(2, 1)

    pipe = DDIMPlusPipeline.from_pretrained(model_dir)
    pipe.scheduler = DDIMSchedulerPlus.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    decoded = pipe(batch_size=2, latents=latents, num_inference_steps=5, output_type="np").images
    grid = np.asarray(PIL.Image.open(reconstruction), dtype=np.float32) / 255
    np.testing.assert_allclose(grid[1:9, 1:9], decoded[0, ..., 0], atol=1 / 255)


def test_interpolate_from_seeds_and_from_inverted_latents(model_dir, tmp_path):
    strip = tmp_path / "strip.png"
    assert (
        main(
            ["interpolate", model_dir, "--seed-a", "1", "--seed-b", "2", "--frames", "5", "--steps", "3"]
            + ["--scale", "1", "--out", str(strip), "--quiet"]
        )
        == 0
    )
    with PIL.Image.open(strip) as picture:
        assert picture.size == grid_size(5, 1)
        strip_pixels = np.asarray(picture)
    # seed interpolation is generation: its end frames are exactly what `sample` draws from those seeds
    for seed, column in (("1", 0), ("2", 4)):
        single = tmp_path / f"sample_{seed}.png"
        argv = [
            "sample",
            model_dir,
            "--seed",
            seed,
            "--num",
            "1",
            "--steps",
            "3",
            "--scale",
            "1",
            "--out",
            str(single),
        ]
        assert main(argv + ["--quiet"]) == 0
        with PIL.Image.open(single) as picture:
            tile = np.asarray(picture)[1:9, 1:9]
        left = 1 + column * 9
        np.testing.assert_array_equal(strip_pixels[1:9, left : left + 8], tile)

    images = [digit_png(tmp_path / f"d{i}.png", seed=10 + i) for i in range(2)]
    latents_file = tmp_path / "pair.safetensors"
    assert main(["invert", model_dir, *images, "--steps", "3", "--out", str(latents_file), "--quiet"]) == 0
    from_file = tmp_path / "strip_file.png"
    assert (
        main(
            ["interpolate", model_dir, "--latents", str(latents_file), "--frames", "3", "--steps", "3"]
            + ["--scale", "1", "--out", str(from_file), "--quiet"]
        )
        == 0
    )
    assert os.path.getsize(from_file) > 0


def test_evaluate_writes_table_and_plot(model_dir, tmp_path, capsys):
    pytest.importorskip("torchmetrics")
    out, plot = tmp_path / "results.md", tmp_path / "plot.png"
    code = main(
        ["evaluate", model_dir, "--steps", "2,4", "--eta", "0,1", "--sigma-hat", "--num", "6"]
        + ["--spacings", "trailing,stock:leading", "--out", str(out), "--plot", str(plot), "--quiet"]
    )
    assert code == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    assert "digits-cnn-v1" in text and "6 generated images" in text
    assert "| S | eta=0 | eta=1 | sigma-hat |" in text  # ours: sigma-hat column
    assert "| S | eta=0 | eta=1 |\n" in text  # stock DDIMScheduler has no sigma-hat
    assert text.count("| 2 |") == 2 and text.count("| 4 |") == 2
    if plot.exists():
        with PIL.Image.open(plot) as picture:
            assert picture.width > 100
    else:
        pytest.importorskip("matplotlib")
        pytest.fail("matplotlib is installed but no plot was written")


def test_missing_model_exits_1_with_message(tmp_path, capsys):
    code = main(["sample", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 1
    assert "could not load model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "M", "--steps", "0", "--out", "x.png"],
        ["sample", "M", "--eta", "-1", "--out", "x.png"],
        ["sample", "M"],
        ["evaluate", "M", "--steps", "10,x", "--out", "r.md"],
        ["evaluate", "M", "--spacings", "cosine", "--out", "r.md"],
        ["interpolate", "M", "--frames", "1", "--out", "s.png"],
        ["frobnicate"],
    ],
)
def test_invalid_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unknown_features_and_missing_weights(model_dir, tmp_path, capsys, offline_hf_home):
    assert main(["evaluate", model_dir, "--features", "clip", "--out", str(tmp_path / "r.md"), "--quiet"]) == 2
    assert "features" in capsys.readouterr().err
    missing = ["--features", f"dinov2:{tmp_path / 'no-dinov2'}", "--out", str(tmp_path / "r.md"), "--quiet"]
    assert main(["evaluate", model_dir, *missing]) == 1
    assert "not available locally" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_unreadable_image_and_latents_exit_1(model_dir, tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    assert main(["invert", model_dir, str(not_an_image), "--out", str(tmp_path / "l.safetensors"), "--quiet"]) == 1
    assert "could not read image" in capsys.readouterr().err
    assert main(["interpolate", model_dir, "--latents", str(not_an_image), "--out", str(tmp_path / "s.png")]) == 1
    assert "could not read latents" in capsys.readouterr().err
