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
from ddim_plus.cli import _runs_on_cpu, build_parser, main
from ddim_plus.ddim_math import TIMESTEP_SPACINGS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-digits-pipeline")
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(channels=1, sample_size=8), scheduler=DDIMSchedulerPlus())
    pipe.save_pretrained(folder)
    return str(folder)


# every subcommand that loads a model, with the arguments it needs besides MODEL
MODEL_COMMANDS = {
    "sample": ["--out", "x.png"],
    "invert": ["a.png", "--out", "l.safetensors"],
    "interpolate": ["--out", "s.png"],
    "evaluate": ["--out", "r.md"],
    "tune-steps": ["--steps", "2"],
}


def grid_size(count_across, count_down, size=8, padding=1, scale=1):
    return ((size + padding) * count_across + padding) * scale, ((size + padding) * count_down + padding) * scale


def digit_png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def test_every_option_of_every_subcommand_is_explained(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(MODEL_COMMANDS) | {"env"}
    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            assert action.help, f"`ddim-plus {name}` option {action.option_strings or action.dest} has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "--out" in capsys.readouterr().out or name in ("tune-steps", "env")  # tune-steps writes into MODEL


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
        + ["--reconstruction", str(reconstruction), "--grid", "--scale", "1", "--quiet"]
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


def test_interpolate_ends_are_the_images_of_sample_for_those_seeds(tmp_path):
    # a folder whose saved sampler clips and runs order 2 on the trailing spacing: `sample` uses all of it
    folder = tmp_path / "model"
    scheduler = DDIMSchedulerPlus(clip_sample=True, ddim_solver_order=2, timestep_spacing="trailing")
    DDIMPlusPipeline(unet=make_tiny_unet(channels=3, sample_size=8), scheduler=scheduler).save_pretrained(folder)
    strip = tmp_path / "strip.png"
    argv = ["--steps", "3", "--scale", "1", "--quiet"]
    assert (
        main(
            ["interpolate", str(folder), "--seed-a", "1", "--seed-b", "2", "--frames", "4", "--out", str(strip)] + argv
        )
        == 0
    )
    strip_pixels = np.asarray(PIL.Image.open(strip), dtype=np.int16)
    assert strip_pixels.shape[:2] == grid_size(4, 1)[::-1]
    for seed, column in ((1, 0), (2, 3)):
        grid = tmp_path / f"sample{seed}.png"
        assert main(["sample", str(folder), "--seed", str(seed), "--num", "1", "--out", str(grid)] + argv) == 0
        expected = np.asarray(PIL.Image.open(grid), dtype=np.int16)[1:9, 1:9]
        left = 1 + column * 9
        # the frames are decoded in one batch, `sample --num 1` alone: a pixel may round to the next 8-bit value
        assert np.abs(strip_pixels[1:9, left : left + 8] - expected).max() <= 1


def test_interpolate_refuses_latents_of_another_model_naming_the_flag(model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "rgb_latents.safetensors"
    save_file({"latents": torch.zeros(2, 3, 8, 8)}, str(path))  # as `invert` writes them for a 3-channel model
    out = tmp_path / "strip.png"
    assert main(["interpolate", model_dir, "--latents", str(path), "--frames", "3", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--latents" in err and "(3, 8, 8)" in err and "takes (1, 8, 8)" in err and "ddim-plus invert" in err
    assert "latents_a" not in err and not out.exists()


def test_interpolate_between_inverted_latents_ends_at_their_reconstructions(model_dir, tmp_path):
    from safetensors.torch import load_file

    images = [digit_png(tmp_path / f"d{i}.png", seed=10 + i) for i in range(2)]
    latents_file, reconstruction = tmp_path / "pair.safetensors", tmp_path / "recon.png"
    argv = ["invert", model_dir, *images, "--steps", "3", "--no-refine", "--out", str(latents_file)]
    assert main(argv + ["--reconstruction", str(reconstruction), "--grid", "--scale", "1", "--quiet"]) == 0
    recon = np.asarray(PIL.Image.open(reconstruction), dtype=np.int16)
    torch.save({"latents": load_file(latents_file)["latents"]}, tmp_path / "pair.pt")  # the .pt format `invert` writes
    for source in (latents_file, tmp_path / "pair.pt"):
        strip = tmp_path / "strip.png"
        argv = ["interpolate", model_dir, "--latents", str(source), "--frames", "3", "--steps", "3"]
        assert main(argv + ["--scale", "1", "--out", str(strip), "--quiet"]) == 0
        strip_pixels = np.asarray(PIL.Image.open(strip), dtype=np.int16)
        np.testing.assert_allclose(strip_pixels[1:9, 1:9], recon[1:9, 1:9], atol=1)
        np.testing.assert_allclose(strip_pixels[1:9, 19:27], recon[1:9, 10:18], atol=1)


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


@pytest.mark.parametrize("model", ["/nonexistent", "./no-such-model", "no/such/folder"])
def test_missing_model_is_one_line_naming_model(model, tmp_path, capsys):
    code = main(["sample", model, "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert (
        line == f"ddim-plus sample: error: MODEL {model!r}: no such folder. Pass a folder written by "
        "save_pretrained (or the trainer's --output_dir), or a Hub model id such as google/ddpm-cifar10-32."
    )
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
        ["sample", "M", "--dtype", "half", "--out", "x.png"],
        ["invert", "M", "a.png", "--out", "latents.bin"],
        ["interpolate", "M", "--latents", "latents.npy", "--out", "s.png"],
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
    not_latents = tmp_path / "notes.safetensors"
    not_latents.write_text("hello")
    assert main(["interpolate", model_dir, "--latents", str(not_latents), "--out", str(tmp_path / "s.png")]) == 1
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
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert "No quality metric is available" in line and "Traceback" not in err
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
    assert err.splitlines()[-1].startswith("ddim-plus invert: error:") and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# Device, dtype, variant, revision: one loader for every command
# ----------------------------------------------------------------------------------------------------------------
def test_the_default_device_is_the_one_accelerate_reports(model_dir, tmp_path, capsys, monkeypatch):
    import accelerate

    class StateOnAGpu(accelerate.PartialState):
        @property
        def device(self):
            return torch.device("cuda", 3)

    monkeypatch.setattr(accelerate, "PartialState", StateOnAGpu)
    moved_to = []

    def to(pipe, device=None, *args, **kwargs):  # the pipeline stays on the CPU; the device it is sent to is kept
        moved_to.append(str(device))
        return pipe

    monkeypatch.setattr(DDIMPlusPipeline, "to", to)
    argv = ["sample", model_dir, "--steps", "2", "--num", "1", "--out", str(tmp_path / "x.png"), "--quiet"]
    assert main(argv) == 0
    assert moved_to == ["cuda:3"]
    err = capsys.readouterr().err
    assert "ddim-plus sample: running on cuda:3 (accelerate's device; --device overrides) in float32" in err
    assert main(argv + ["--device", "cpu"]) == 0
    assert moved_to == ["cuda:3", "cpu"]
    assert "running on cpu (--device) in float32" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_every_model_command_passes_dtype_variant_revision_to_from_pretrained(command, model_dir, monkeypatch, capsys):
    pytest.importorskip("torchmetrics")  # evaluate checks for its extra first
    calls = []

    def from_pretrained(cls, model, **kwargs):
        calls.append((model, kwargs))
        raise OSError("recorded")

    monkeypatch.setattr(DDIMPlusPipeline, "from_pretrained", classmethod(from_pretrained))
    options = ["--dtype", "bfloat16", "--variant", "fp16", "--revision", "v1.0", "--quiet"]
    assert main([command, model_dir, *MODEL_COMMANDS[command], *options]) == 1
    ((model, kwargs),) = calls
    assert model == model_dir
    assert kwargs["variant"] == "fp16" and kwargs["revision"] == "v1.0"
    assert kwargs.get("dtype", kwargs.get("torch_dtype")) is torch.bfloat16
    assert "recorded" in capsys.readouterr().err


def test_variant_loads_a_folder_saved_with_that_variant_only(tmp_path, capsys):
    folder = tmp_path / "fp16-only"
    DDIMPlusPipeline(unet=make_tiny_unet(channels=1), scheduler=DDIMSchedulerPlus()).save_pretrained(
        folder, variant="fp16"
    )
    argv = ["sample", str(folder), "--steps", "2", "--num", "1", "--out", str(tmp_path / "x.png"), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"MODEL {str(folder)!r} is not a loadable pipeline folder" in err
    assert "its weights are saved as variant fp16: pass --variant fp16" in err
    assert not (tmp_path / "x.png").exists()
    assert main(argv + ["--variant", "fp16"]) == 0
    assert (tmp_path / "x.png").exists()


def _sample_pixels(model_dir, tmp_path, *options):
    out = tmp_path / f"grid{'_'.join(options)}.png"
    argv = ["sample", model_dir, "--steps", "5", "--num", "6", "--columns", "6", "--scale", "1", "--out", str(out)]
    assert main(argv + ["--quiet", *options]) == 0
    return np.asarray(PIL.Image.open(out), dtype=np.int16)


def test_half_precision_samples_are_close_to_float32(rgb_model_dir, tmp_path, capsys):
    reference = _sample_pixels(rgb_model_dir, tmp_path)
    for dtype in ("bfloat16", "float16"):
        if not _runs_on_cpu(dtype):
            continue  # refused with a message instead: see the next test
        pixels = _sample_pixels(rgb_model_dir, tmp_path, "--dtype", dtype)
        assert f"in {dtype}" in capsys.readouterr().err
        difference = np.abs(pixels - reference)
        assert difference.any()  # the dtype reached the model
        # bfloat16 keeps 8 significant bits (float16 11): on average a pixel is within one 8-bit level of float32,
        # and none of the 6 x 8 x 8 x 3 values is off by more than 48 levels (the random UNet amplifies rounding)
        assert difference.mean() <= 1 and difference.max() <= 48, (dtype, difference.mean(), difference.max())


def test_a_dtype_the_cpu_runs_gets_no_warning_that_it_cannot(model_dir, tmp_path):
    import logging

    from diffusers.utils import logging as diffusers_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        for dtype in ("bfloat16", "float16"):
            if _runs_on_cpu(dtype):
                assert main(["sample", model_dir, "--dtype", dtype, "--steps", "1", "--num", "1", "--out",
                             str(tmp_path / "x.png"), "--quiet"]) == 0  # fmt: skip
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert not [r for r in records if "cannot run with `cpu`" in r.getMessage()]


def test_a_dtype_the_cpu_cannot_run_is_refused_naming_the_fix(model_dir, tmp_path, capsys, monkeypatch):
    import ddim_plus.cli

    monkeypatch.setattr(ddim_plus.cli, "_runs_on_cpu", lambda dtype: dtype != "float16")
    out = tmp_path / "x.png"
    assert main(["sample", model_dir, "--dtype", "float16", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--dtype float16 does not run on the CPU" in err and "use --dtype bfloat16 or float32" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# --version, env, and what parsing imports
# ----------------------------------------------------------------------------------------------------------------
HEAVY_MODULES = ("torchmetrics", "tensorboard", "matplotlib", "transformers", "datasets", "torch_fidelity")


def test_version_and_help_are_as_light_as_importing_ddim_plus():
    # metrics, trackers and plotting load only when a command runs (`import ddim_plus` itself loads transformers
    # when it is installed: diffusers' DiffusionPipeline imports it)
    code = f"""
import contextlib, io, sys
import ddim_plus
baseline = set(sys.modules)
from ddim_plus.cli import main
for argv in (["--version"], ["--help"], ["sample", "--help"], ["evaluate", "--help"], ["invert", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    if argv == ["--version"]:
        print(out.getvalue().strip())
# the console script's module (setup's entry point resolves to ddim_plus.cli:main), run as `python -m` runs it
import runpy
sys.argv = ["ddim-plus", "--help"]
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        runpy.run_module("ddim_plus.cli", run_name="__main__")
    except SystemExit as exit:
        assert exit.code == 0 and all(name in out.getvalue() for name in ("sample", "evaluate", "env"))
print(sorted(name for name in set(sys.modules) - baseline if name.split(".")[0] in {HEAVY_MODULES!r}))
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    from ddim_plus import __version__

    assert completed.stdout.splitlines()[-2:] == [f"ddim-plus {__version__}", "[]"]


def test_env_reports_versions_platform_and_devices(capsys):
    import importlib.metadata
    import platform

    from ddim_plus import __version__

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"- `ddim_plus` version: {__version__}\n" in out
    for package in ("diffusers", "accelerate", "huggingface_hub"):
        assert f"- `{package}` version: {importlib.metadata.version(package)}\n" in out
    assert f"- `torch` version: {torch.__version__} " in out
    assert f"- Python version: {platform.python_version()}\n" in out and f"- Platform: {platform.platform()}" in out
    assert "- Devices (dtypes they run): cpu (float32" in out


# ----------------------------------------------------------------------------------------------------------------
# invert: the latents file as its extension says, the reconstruction as plain images
# ----------------------------------------------------------------------------------------------------------------
def test_invert_writes_torch_save_for_pt(model_dir, tmp_path):
    image = digit_png(tmp_path / "d.png", 0)
    pt, safetensors = tmp_path / "l.pt", tmp_path / "l.safetensors"
    for path in (pt, safetensors):
        assert main(["invert", model_dir, image, "--steps", "2", "--no-refine", "--out", str(path), "--quiet"]) == 0
    saved = torch.load(pt, weights_only=True)
    with safe_open(str(safetensors), "pt") as handle:
        torch.testing.assert_close(saved["latents"], handle.get_tensor("latents"), rtol=0, atol=0)
        assert saved["metadata"] == handle.metadata()


def test_invert_reconstruction_is_a_plain_image(model_dir, tmp_path, capsys):
    images = [digit_png(tmp_path / f"d{i}.png", seed=i) for i in range(2)]
    argv = ["invert", model_dir, "--steps", "3", "--no-refine", "--out", str(tmp_path / "l.safetensors"), "--quiet"]
    grid = tmp_path / "grid.png"
    assert main(argv[:2] + images + argv[2:] + ["--reconstruction", str(grid), "--grid"]) == 0
    grid_pixels = np.asarray(PIL.Image.open(grid))
    # one image: that image, at the model's size, no border
    assert main(argv[:2] + images[:1] + argv[2:] + ["--reconstruction", str(tmp_path / "one.png")]) == 0
    one = np.asarray(PIL.Image.open(tmp_path / "one.png"))
    assert one.shape == (8, 8)
    np.testing.assert_array_equal(one, grid_pixels[1:9, 1:9])
    # several without --grid: one plain image each, numbered in the order given
    assert main(argv[:2] + images + argv[2:] + ["--reconstruction", str(tmp_path / "r.png"), "--scale", "2"]) == 0
    assert "r-0.png" in capsys.readouterr().out
    for i, left in ((0, 1), (1, 10)):
        with PIL.Image.open(tmp_path / f"r-{i}.png") as picture:
            assert picture.size == (16, 16)
            plain = np.asarray(picture.resize((8, 8), PIL.Image.NEAREST))
        np.testing.assert_array_equal(plain, grid_pixels[1:9, left : left + 8])
    assert not (tmp_path / "r.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# evaluate: generated sets against the feature dimension
# ----------------------------------------------------------------------------------------------------------------
def test_evaluate_flags_fewer_generated_images_than_feature_dimensions_and_defaults_to_full_rank(
    model_dir, tmp_path, capsys
):
    pytest.importorskip("torchmetrics")
    out = tmp_path / "r.md"
    argv = ["evaluate", model_dir, "--steps", "1", "--out", str(out), "--quiet"]
    assert main(argv + ["--num", "32"]) == 0  # the digits features have 32 dimensions
    err = capsys.readouterr().err
    assert "warning: --num 32 generated images for 32-dimensional digits-cnn-v1 features" in err
    assert "use --num 256 or more" in err and "**Warning**: --num 32" in out.read_text()
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err
    text = out.read_text()
    assert "256 generated images" in text and "Warning" not in text


# ----------------------------------------------------------------------------------------------------------------
# A new user's first commands on a folder of photos
# ----------------------------------------------------------------------------------------------------------------
def test_invert_takes_a_folder_of_photos(rgb_model_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:32, 0:32] / 31
    PIL.Image.fromarray((np.stack([x, y, 1 - x], -1) * 255).astype(np.uint8)).save(photos / "gradient.jpg")
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(photos / "noise_rgba.png")
    PIL.Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).save(photos / "wide_gray.png")
    (photos / "notes.txt").write_text("not an image")
    latents = tmp_path / "latents.pt"
    argv = ["invert", rgb_model_dir, str(photos), "--steps", "2", "--no-refine", "--out", str(latents)]
    assert main(argv + ["--reconstruction", str(tmp_path / "r.png"), "--quiet"]) == 0
    saved = torch.load(latents, weights_only=True)
    assert saved["latents"].shape == (3, 3, 8, 8)
    assert saved["metadata"]["images"] == "gradient.jpg,noise_rgba.png,wide_gray.png"  # sorted, images only
    for i in range(3):
        with PIL.Image.open(tmp_path / f"r-{i}.png") as picture:
            assert picture.size == (8, 8) and picture.mode == "RGB"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["invert", rgb_model_dir, str(empty), "--out", str(tmp_path / "l.pt"), "--quiet"]) == 2
    assert f"IMAGE {str(empty)!r} is a folder without" in capsys.readouterr().err
    assert not (tmp_path / "l.pt").exists()


def test_model_given_as_a_flag_or_a_part_of_a_pipeline_says_what_to_pass(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", model_dir, "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert f"MODEL is the first argument after the command, not a flag: ddim-plus sample {model_dir}" in (
        capsys.readouterr().err
    )
    unet_folder = os.path.join(model_dir, "unet")
    assert main(["sample", unet_folder, "--out", str(tmp_path / "x.png"), "--quiet"]) == 1
    assert f"pass the folder with model_index.json, {model_dir!r}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
