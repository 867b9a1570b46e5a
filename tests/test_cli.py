"""The `ddim-plus` command line on a tiny pipeline saved to disk: files written, exit codes, help, errors."""

import argparse
import importlib.util
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_unet, save_tiny_pipeline, seeded_generators
from safetensors import safe_open

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.cli import build_parser, main
from ddim_plus.ddim_math import TIMESTEP_SPACINGS


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
        generator=seeded_generators(5, 6),
        num_inference_steps=4,
        output_type="np",
    ).images
    grid = np.asarray(PIL.Image.open(out), dtype=np.float32) / 255
    np.testing.assert_allclose(grid[1:9, 1:9], expected[0, ..., 0], atol=1 / 255)
    np.testing.assert_allclose(grid[1:9, 10:18], expected[1, ..., 0], atol=1 / 255)


def test_order_overrides_the_saved_solver_order_at_any_eta(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["sample", model_dir, "--steps", "4", "--num", "2", "--eta", "1", "--scale", "1", "--columns", "2"]
    assert main(argv + ["--order", "2", "--out", str(out), "--quiet"]) == 0
    pipe = DDIMPlusPipeline.from_pretrained(model_dir)
    pipe.scheduler = DDIMSchedulerPlus.from_config(pipe.scheduler.config, ddim_solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    generators = seeded_generators(0, 1)
    expected = pipe(batch_size=2, generator=generators, num_inference_steps=4, eta=1.0, output_type="np").images
    grid = np.asarray(PIL.Image.open(out), dtype=np.float32) / 255
    np.testing.assert_allclose(grid[1:9, 1:9], expected[0, ..., 0], atol=1 / 255)
    np.testing.assert_allclose(grid[1:9, 10:18], expected[1, ..., 0], atol=1 / 255)
    # the evaluate table names the order it sampled with
    if importlib.util.find_spec("torchmetrics") is not None:
        table = tmp_path / "table.md"
        argv = ["evaluate", model_dir, "--steps", "2", "--num", "6", "--order", "2", "--out", str(table), "--quiet"]
        assert main(argv) == 0
        assert "solver order 2" in table.read_text().splitlines()[0]


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
    # the ends are the seeds' x_T decoded by eta = 0 DDIM without clipping: the generation pipeline with
    # clip_sample=False from the same seeds (the model clips, so this differs from `sample`)
    pipe = DDIMPlusPipeline.from_pretrained(model_dir)
    pipe.scheduler = DDIMSchedulerPlus.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    for seed, column in ((1, 0), (2, 4)):
        decoded = pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=3, output_type="np").images
        left = 1 + column * 9
        np.testing.assert_allclose(strip_pixels[1:9, left : left + 8] / 255, decoded[0, ..., 0], atol=1 / 255)

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
    assert "| S | eta=0 | eta=1 | sigma_hat |" in text  # ours: sigma-hat column, spelled as `sigma_type` spells it
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
        ["sample", "M", "--order", "3", "--out", "x.png"],
        ["sample", "M"],
        ["evaluate", "M", "--steps", "10,x", "--out", "r.md"],
        ["evaluate", "M", "--spacings", "cosine", "--out", "r.md"],
        ["interpolate", "M", "--frames", "1", "--out", "s.png"],
        ["frobnicate"],
        # checked while parsing, before the (here missing) model loads or anything is sampled
        ["sample", "M", "--out", "x.jpgx"],
        ["sample", "M", "--out", "grid"],
        ["interpolate", "M", "--out", "strip.txt"],
        ["invert", "M", "a.png", "--out", "l.safetensors", "--reconstruction", "r.jpgx"],
        ["sample", "M", "--device", "no-such-device", "--out", "x.png"],
    ],
)
def test_invalid_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_sigma_hat_has_one_spelling_and_the_spacings_are_the_schedulers(capsys):
    # the eta value is spelled as the scheduler's saved `sigma_type`; the other spelling is refused with the fix
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "M", "--eta", "0,sigma-hat", "--out", "r.md"])
    assert exit_info.value.code == 2
    assert "'sigma_hat'" in capsys.readouterr().err
    parsed = build_parser().parse_args(["evaluate", "M", "--eta", "0,sigma_hat", "--out", "r.md"])
    assert parsed.eta == [0.0, "sigma_hat"]
    # `--spacing` offers every spacing the scheduler takes, and `--spacings` accepts each of them
    sample = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    choices = next(a for a in sample._actions if a.dest == "spacing").choices
    assert tuple(choices) == TIMESTEP_SPACINGS
    for spacing in choices:
        DDIMSchedulerPlus(timestep_spacing=spacing).set_timesteps(10)
    parsed = build_parser().parse_args(["evaluate", "M", "--spacings", ",".join(choices), "--out", "r.md"])
    assert parsed.spacings == list(TIMESTEP_SPACINGS)


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


@pytest.fixture(scope="module")
def rgb_model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-rgb-pipeline"), channels=3)


def photo_folder(folder, count=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return str(folder)


def test_evaluate_never_scores_a_non_digits_model_in_digits_features(rgb_model_dir, tmp_path, capsys):
    pytest.importorskip("torchmetrics")
    out = tmp_path / "r.md"
    # the default reference (digits) does not fit an RGB model
    assert main(["evaluate", rgb_model_dir, "--out", str(out), "--quiet"]) == 2
    assert "--reference digits holds 1-channel digits" in capsys.readouterr().err
    # digits features against the user's own folder are refused
    reference = photo_folder(tmp_path / "photos")
    argv = ["evaluate", rgb_model_dir, "--reference", reference, "--features", "digits", "--out", str(out)]
    assert main(argv + ["--quiet"]) == 2
    assert "--features digits measures digits only" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_without_fitting_features_says_why_in_one_line(
    rgb_model_dir, tmp_path, capsys, offline_hf_home, monkeypatch
):
    pytest.importorskip("torchmetrics")
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline_hf_home / "hub"))
    out = tmp_path / "r.md"
    reference = photo_folder(tmp_path / "photos")
    assert main(["evaluate", rgb_model_dir, "--reference", reference, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No quality metric is available" in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_scores_against_the_users_folder_in_dinov2_features_from_the_cache(
    rgb_model_dir, tmp_path, capsys, offline_hf_home, monkeypatch
):
    pytest.importorskip("torchmetrics")
    transformers = pytest.importorskip("transformers")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline_hf_home / "hub"))
    config = transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=56, image_size=224
    )
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hf_home / "hub" / "models--facebook--dinov2-small"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(repo / "snapshots" / commit)
    out = tmp_path / "r.md"
    reference = photo_folder(tmp_path / "photos", count=20)  # more images than the 16 feature dimensions
    argv = ["evaluate", rgb_model_dir, "--reference", reference, "--steps", "2", "--num", "3", "--out", str(out)]
    assert main(argv + ["--quiet"]) == 0
    text = out.read_text()
    assert "dinov2(dinov2-small)" in text and "digits" not in text


@pytest.mark.parametrize("module, options", [("torchmetrics", []), ("matplotlib", ["--plot", "plot.png"])])
def test_evaluate_on_a_base_install_names_the_extra(model_dir, tmp_path, capsys, monkeypatch, module, options):
    if module != "torchmetrics":
        pytest.importorskip("torchmetrics")  # imported first: it fails to import where matplotlib is half there
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", model_dir, "--out", str(tmp_path / "r.md"), "--quiet"] + options) == 1
    err = capsys.readouterr().err
    assert "pip install 'ddim-plus[eval]'" in err and repr(module) in err and "Traceback" not in err
    assert not (tmp_path / "r.md").exists()  # refused before any work


def test_invert_centre_crops_a_non_square_image_as_the_trainer(tmp_path, caplog):
    from ddim_plus.cli import _load_images

    pixels = np.random.default_rng(0).integers(0, 256, (8, 16), dtype=np.uint8)  # 16 wide, 8 high
    PIL.Image.fromarray(pixels).save(tmp_path / "wide.png")
    images = _load_images([str(tmp_path / "wide.png")], channels=1, size=8)
    # shorter side is already 8: no resize, the centre 8 columns are kept (not the whole width squashed)
    np.testing.assert_allclose(images[0, ..., 0], pixels[:, 4:12] / 255.0, atol=1e-6)
    assert "centre 8x8 kept" in caplog.text


def test_unwritable_output_is_a_message_not_a_traceback(model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    image = digit_png(tmp_path / "d.png", 0)
    argv = ["invert", model_dir, image, "--steps", "2", "--no-refine", "--out", str(blocker / "l.safetensors")]
    assert main(argv + ["--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddim-plus invert: error:") and "Traceback" not in err
