"""ddim_plus.train (and training/train.py, the script that runs it) end to end: exact resume, checkpoint rotation,
two processes, bad input, a short real run.

Runs launch the script in a subprocess (as users do) with a tiny UNet; bad-input checks call it in-process, since
they must fail before anything is trained or written.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, launch_command, make_tiny_unet
from PIL import Image
from safetensors.torch import load_file

from ddim_plus import train
from ddim_plus.training import args as train_args

TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"


def subprocess_env(hf_home):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def run_train(argv, hf_home, num_processes=1, port=29731):
    # One process runs the checkout's script, as `make demo` does; several run the package module under accelerate.
    if num_processes == 1:
        command = [sys.executable, str(TRAIN_SCRIPT), *argv]
    else:
        command = launch_command("ddim_plus.train", argv, num_processes, port)
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(hf_home), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def read_tensorboard(logging_dir):
    """The scalars and images of every tensorboard event file under `logging_dir`, as {tag: [(step, value)]} (an
    image's value is its encoded size)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, {}
    for path in Path(logging_dir).rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in events.Scalars(tag))
        for tag in events.Tags()["images"]:
            images.setdefault(tag, []).extend((event.step, event.width) for event in events.Images(tag))
    return scalars, images


def read_debug_log(output_dir, process=0):
    with open(Path(output_dir) / f"process-{process}.debug.jsonl", encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    steps = [record for record in records if not record.get("final")]
    finals = [record for record in records if record.get("final")]
    return steps, finals[-1]


def write_digit_folder(folder, num_images):
    """The first `num_images` bundled digits as 8x8 PNG files (an imagefolder dataset)."""
    from ddim_plus.digits import load_digits

    folder.mkdir(parents=True)
    for index, image in enumerate(load_digits().images[:num_images]):
        Image.fromarray(np.uint8(image / 16 * 255)).save(folder / f"digit_{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    (root / "hf_home").mkdir()
    make_tiny_unet(channels=1, sample_size=8).save_config(root / "tiny_unet")
    return root


def tiny_args(workdir, output_dir, *extra):
    return [
        "--output_dir", str(output_dir), "--resolution", "8", "--model_config_name_or_path",
        str(workdir / "tiny_unet"), "--train_batch_size", "4", "--eval_inference_steps", "2",
        "--ddim_num_inference_steps", "2", "--num_eval_samples", "4", "--logger", "none", "--debug_log",
        "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


# A run long enough to cross epochs with gradient accumulation: 20 images in micro-batches of 4 are 5 micro-batches
# per epoch, 3 optimiser steps of 2 micro-batches (the last takes the leftover one), so 7 steps span 3 epochs.
REFERENCE_FLAGS = (
    "--gradient_accumulation_steps", "2", "--max_train_steps", "7", "--checkpointing_steps", "2",
    "--checkpoints_total_limit", "2", "--random_flip", "--lr_warmup_steps", "2", "--snr_gamma", "5",
    "--noise_offset", "0.05",
)  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(workdir):
    """An uninterrupted run, shared by the resume, rotation and output tests."""
    data_dir = write_digit_folder(workdir / "digits_folder", 20)
    output_dir = workdir / "reference"
    argv = tiny_args(workdir, output_dir, "--train_data_dir", str(data_dir), *REFERENCE_FLAGS)
    run_train(argv, workdir / "hf_home")
    return {"output_dir": output_dir, "data_dir": data_dir}


def test_checkpoints_rotate_and_outputs_are_complete(reference_run):
    output_dir = reference_run["output_dir"]
    # Checkpoints at 2, 4 and 6; with --checkpoints_total_limit 2 only the newest two remain.
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for checkpoint in ("checkpoint-4", "checkpoint-6"):
        assert (output_dir / checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (output_dir / checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(output_dir.glob(".staging-*"))
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "samples_2steps.png"):
        assert (output_dir / name).is_file(), name
    # One grid per --eval_inference_steps entry, and no copy of one under another name.
    assert sorted(p.name for p in output_dir.glob("samples*.png")) == ["samples_2steps.png"]
    record = json.loads((output_dir / "checkpoint-6" / "training_run.json").read_text())
    assert record["max_train_steps"] == 7 and record["learning_rate"] == 1e-3 and record["num_processes"] == 1
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "DDIMSchedulerPlus"
    assert scheduler_config["timestep_spacing"] == "logsnr"
    assert scheduler_config["ddim_solver_order"] == 2 and scheduler_config["clip_sample"] is True

    steps, final = read_debug_log(output_dir)
    assert [record["step"] for record in steps] == list(range(1, 8))
    assert [record["epoch"] for record in steps] == [0, 0, 0, 1, 1, 1, 2]
    # Each epoch's micro-batches cover the 20 images exactly once.
    for epoch in (0, 1):
        seen = sorted(i for record in steps if record["epoch"] == epoch for i in record["indices"])
        assert seen == list(range(20))
    # Warm-up over 2 steps then cosine decay to 0 at step 7.
    assert steps[0]["lr"] == pytest.approx(0.5e-3)
    assert final["lr"] == pytest.approx(0.0, abs=1e-12)


def test_resume_after_a_kill_is_bit_exact(reference_run, workdir):
    """A run killed after checkpoint 4 (while writing checkpoint 6) and resumed with `latest` ends bit-identical,
    even when it samples along the way."""
    reference = reference_run["output_dir"]
    resumed = workdir / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-4", resumed / "checkpoint-4")
    # What a kill during the next save leaves behind: a half-written staging folder that `latest` must ignore.
    (resumed / ".staging-checkpoint-6" / "unet").mkdir(parents=True)
    # Grids of an earlier run with other step counts: they must not stay beside the new ones (and be pushed).
    for stale in ("samples.png", "samples_99steps.png"):
        Image.new("L", (4, 4)).save(resumed / stale)
    argv = tiny_args(workdir, resumed, "--train_data_dir", str(reference_run["data_dir"]), *REFERENCE_FLAGS)
    # Sampling with the EMA weights swapped in after every step must leave training untouched.
    sampling = ["--save_images_steps", "1", "--eval_batch_size", "2"]
    result = run_train([*argv, *sampling, "--resume_from_checkpoint", "latest"], workdir / "hf_home")
    # Loading the EMA goes without diffusers' deprecation and "unexpected config attributes" warnings.
    assert "FutureWarning" not in result.stderr and "are not expected" not in result.stderr
    assert sorted(p.name for p in resumed.glob("samples*.png")) == ["samples_2steps.png"]

    reference_steps, reference_final = read_debug_log(reference)
    resumed_steps, resumed_final = read_debug_log(resumed)
    assert [r["step"] for r in resumed_steps] == [5, 6, 7]
    assert sorted(p.name for p in (resumed / "samples").iterdir()) == ["step-5.png", "step-6.png", "step-7.png"]
    # Same data order, same losses, same raw weights...
    assert [r["indices"] for r in resumed_steps] == [r["indices"] for r in reference_steps[4:]]
    assert [r["loss"] for r in resumed_steps] == [r["loss"] for r in reference_steps[4:]]
    assert resumed_final["weights"] == reference_final["weights"]
    # ... and the same EMA weights in the published pipeline.
    expected = load_file(reference / "unet" / "diffusion_pytorch_model.safetensors")
    actual = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_two_processes_split_the_data_and_end_identical(workdir):
    output_dir = workdir / "two_processes"
    argv = tiny_args(workdir, output_dir, "--max_train_steps", "3", "--lr_warmup_steps", "2")
    run_train(argv, workdir / "hf_home", num_processes=2)

    steps_0, final_0 = read_debug_log(output_dir, process=0)
    steps_1, final_1 = read_debug_log(output_dir, process=1)
    seen_0 = {i for record in steps_0 for i in record["indices"]}
    seen_1 = {i for record in steps_1 for i in record["indices"]}
    assert len(seen_0) == len(seen_1) == 12
    assert not seen_0 & seen_1
    assert final_0["weights"] == final_1["weights"]
    # The loss is reduced across processes, so both log the same value.
    assert [r["loss"] for r in steps_0] == [r["loss"] for r in steps_1]
    # LR steps counted once per optimiser step (diffusers issue 8384): half-way through warm-up after step 1, and
    # the cosine at 0 after the last step (without the fix it would be back at its peak).
    assert steps_0[0]["lr"] == pytest.approx(0.5e-3)
    assert final_0["lr"] == pytest.approx(0.0, abs=1e-12)
    assert (output_dir / "model_index.json").is_file()


def test_short_digits_run_learns_and_loads(workdir):
    """The demo's set-up (default UNet, bundled digits) for a few dozen steps: the loss falls and the output loads."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import ModelCard

    import ddim_plus

    output_dir = workdir / "short_demo"
    argv = [
        "--output_dir", str(output_dir), "--max_train_steps", "40", "--train_batch_size", "32",
        "--lr_warmup_steps", "5", "--eval_inference_steps", "5", "--ddim_num_inference_steps", "5",
        "--num_eval_samples", "16", "--debug_log", "--save_images_steps", "20", "--eval_batch_size", "4",
    ]  # fmt: skip
    run_train(argv, workdir / "hf_home")
    steps, _ = read_debug_log(output_dir)
    losses = [record["loss"] for record in steps]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    # Grids every --save_images_steps and every --save_images_epochs (10: here only after epoch 0, as 40 steps of 32
    # of the 1,797 digits are less than one epoch).
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["epoch-0.png", "step-20.png", "step-40.png"]
    scalars, images = read_tensorboard(output_dir / "logs")
    assert {"loss", "lr", "ema_decay"} <= scalars.keys() and len(scalars["loss"]) == 40
    assert images.keys() == {"samples", "final/samples_5steps"} and [step for step, _ in images["samples"]] == [
        20,
        40,
        40,
    ]
    # The final scores reach the tracker, equal to those in metrics.json.
    metrics = json.loads((output_dir / "metrics.json").read_text())
    fd_key = next(key for key in metrics[0] if key.startswith("FD ["))
    for key in ("recognisable fraction", "class balance", fd_key):
        assert scalars[f"final/5steps/{key}"] == [(40, pytest.approx(metrics[0][key], rel=1e-6))]
    # ... and the FD is the one `ddim-plus evaluate` gives for the saved pipeline with the same seeds and count.
    from ddim_plus.cli import main as cli_main

    evaluated = workdir / "short_demo_evaluate.json"
    argv = ["evaluate", str(output_dir), "--steps", "5", "--eta", "0", "--num", "16", "--seed", "0"]
    assert cli_main([*argv, "--batch-size", "256", "--out", str(evaluated), "--quiet"]) == 0
    (result,) = json.loads(evaluated.read_text())
    assert fd_key == f"FD [{result['features']}]"
    assert metrics[0][fd_key] == round(result["frechet_distance"], 4)

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    assert isinstance(pipeline, ddim_plus.DDIMPlusPipeline)
    assert isinstance(pipeline.scheduler, ddim_plus.DDIMSchedulerPlus)
    images = pipeline(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert images.images.shape == (2, 8, 8, 1)  # the digits at their own resolution

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "recognisable fraction" in card.text
    assert "samples_5steps.png" in card.text and (output_dir / "samples_5steps.png").is_file()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics[0]["DDIM steps"] == 5 and sum(map(int, metrics[0]["class histogram (0-9)"].split())) == 16
    (fd_key,) = [key for key in metrics[0] if key.startswith("FD [")]
    assert "digits" in fd_key and 0 < metrics[0][fd_key] < float("inf")
    assert fd_key in card.text
    # the bundled digits are no Hub dataset: not in `datasets:`; their scores are the card's model-index
    assert card.data.datasets is None
    scores = {(r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert ("recognisable_fraction", metrics[0]["recognisable fraction"]) in scores
    assert any(value == metrics[0][fd_key] for _, value in scores)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before training, and nothing written.
# ---------------------------------------------------------------------------------------------------------------
def expect_error_without_output(argv, output_dir, match):
    before = sorted(str(p) for p in output_dir.rglob("*")) if output_dir.exists() else None
    with pytest.raises(ValueError, match=match):
        train.main(argv)
    after = sorted(str(p) for p in output_dir.rglob("*")) if output_dir.exists() else None
    assert after == before


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--train_batch_size", "0"], "`--train_batch_size` must be >= 1, got 0"),
        (["--eval_batch_size", "-1"], "`--eval_batch_size` must be >= 1"),
        (["--snr_gamma", "0"], "`--snr_gamma` must be > 0, got 0.0"),
        (["--snr_gamma", "-5"], "`--snr_gamma` must be > 0"),
        (["--resolution", "10"], "`--resolution`=10 must be a positive multiple of 4"),
        (["--ddim_num_inference_steps", "2000"], "DDIM steps must be between 1 and"),
        (["--ddim_eta", "-0.5"], "`--ddim_eta` must be >= 0"),
        (["--ddpm_num_steps", "0"], "`--ddpm_num_steps` must be >= 1"),
        (["--ema_max_decay", "1.5"], "`--ema_max_decay` must be in \\(0, 1\\]"),
        (["--adam_beta2", "1"], "`--adam_beta2` must be in \\[0, 1\\)"),
        (["--dataloader_num_workers", "-1"], "`--dataloader_num_workers` must be >= 0"),
        (
            ["--hub_token", "hf_x", "--logger", "wandb"],  # train_unconditional's name for --report_to
            "`--hub_token` cannot be used with `--report_to wandb`.*hf auth login",
        ),
        (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "pass only one of them"),
    ],
)
def test_bad_flags_fail_before_training(tmp_path, flags, match):
    expect_error_without_output(["--output_dir", str(tmp_path / "out"), *flags], tmp_path / "out", match)


def test_wandb_without_the_package_fails_before_training(tmp_path, monkeypatch):
    # accelerate would only warn and log nowhere; diffusers' examples refuse
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    expect_error_without_output(
        ["--output_dir", str(tmp_path / "out"), "--report_to", "wandb"],
        tmp_path / "out",
        "`--report_to wandb` needs the wandb package: pip install wandb",
    )


@pytest.mark.parametrize(
    "flag, value, choices",
    [
        ("--prediction_type", "noise", ("epsilon", "sample", "v_prediction")),
        ("--ddpm_beta_schedule", "cosine", ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")),
        ("--timestep_spacing", "uniform", ("leading", "trailing", "linspace", "quadratic", "logsnr")),
        ("--lr_scheduler", "step", ("linear", "cosine", "constant")),
        ("--ddim_solver_order", "3", ("1", "2")),
    ],
)
def test_fixed_sets_are_argparse_choices_listed_in_help(tmp_path, capsys, flag, value, choices):
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output_dir", str(output_dir), flag, value])
    assert exit_info.value.code == 2 and not output_dir.exists()
    error = capsys.readouterr().err
    assert (
        f"argument {flag}: invalid choice: '{value}'" in error or f"argument {flag}: invalid choice: {value} " in error
    )
    with pytest.raises(SystemExit):
        train_args.parse_args(["--help"])
    usage = capsys.readouterr().out
    assert all(choice in usage for choice in choices)


def test_every_beta_schedule_builds_before_training():
    from ddim_plus.ddim_math import BETA_SCHEDULES

    for schedule in BETA_SCHEDULES:
        scheduler = train_args.build_noise_scheduler(train_args.parse_args(["--ddpm_beta_schedule", schedule]))
        assert scheduler.config.beta_schedule == schedule
        # Every abar_t in (0, 1] and decreasing: the schedule is usable for training.
        abar = scheduler.alphas_cumprod
        assert (abar > 0).all() and (abar <= 1).all() and (abar[1:] < abar[:-1]).all()


def test_bad_data_folders_fail_before_training(tmp_path):
    output_dir = tmp_path / "out"
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--train_data_dir", str(tmp_path / "missing")], output_dir, "is not a folder"
    )
    (tmp_path / "empty").mkdir()
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--train_data_dir", str(tmp_path / "empty")], output_dir, "is empty"
    )
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("not an image")
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--train_data_dir", str(tmp_path / "texts")], output_dir, "no image files"
    )
    fake = write_digit_folder(tmp_path / "fake", 3)
    (fake / "broken.png").write_text("not an image either")
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--train_data_dir", str(fake)], output_dir, "cannot be decoded: broken.png"
    )


def test_bad_checkpoints_fail_before_training(tmp_path):
    output_dir = tmp_path / "out"
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--resume_from_checkpoint", "checkpoint-3"], output_dir, "checkpoint-3"
    )
    # A checkpoint of another architecture (here: the tiny UNet) cannot be resumed with the default UNet.
    make_tiny_unet(channels=1, sample_size=16).save_pretrained(output_dir / "checkpoint-2" / "unet")
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"],
        output_dir,
        "another configuration .*block_out_channels",
    )


# ---------------------------------------------------------------------------------------------------------------
# Building blocks in ddim_plus.training
# ---------------------------------------------------------------------------------------------------------------
class EchoUNet(torch.nn.Module):
    """Returns a fixed output whatever the input, so the loss has a closed form."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, sample, timesteps):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=self.output)


def test_min_snr_weights_closed_forms():
    from ddim_plus import DDIMSchedulerPlus
    from ddim_plus.training.loss import min_snr_loss_weights

    abar = DDIMSchedulerPlus().alphas_cumprod
    snr = abar / (1 - abar)
    gamma = 5.0
    eps = min_snr_loss_weights(abar, gamma, "epsilon").double()
    v = min_snr_loss_weights(abar, gamma, "v_prediction").double()
    x0 = min_snr_loss_weights(abar, gamma, "sample").double()
    torch.testing.assert_close(eps, torch.minimum(snr, torch.tensor(gamma)) / snr, rtol=1e-6, atol=0)
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(gamma)) / (snr + 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(x0, torch.minimum(snr, torch.tensor(gamma)), rtol=1e-6, atol=0)
    # Zero terminal SNR: the epsilon weight at t = T is 1 (the limit), not 0/0.
    zero_snr = DDIMSchedulerPlus(rescale_betas_zero_snr=True).alphas_cumprod
    weights = min_snr_loss_weights(zero_snr, gamma, "epsilon")
    assert torch.isfinite(weights).all() and weights[-1] == 1.0
    assert min_snr_loss_weights(zero_snr, gamma, "v_prediction")[-1] == 0.0


def test_diffusion_loss_targets_and_weights():
    from ddim_plus import DDIMSchedulerPlus
    from ddim_plus.training.loss import diffusion_loss

    scheduler = DDIMSchedulerPlus()
    generator = torch.Generator().manual_seed(0)
    clean, noise, output = (torch.randn(3, 1, 4, 4, generator=generator) for _ in range(3))
    timesteps = torch.tensor([0, 500, 999])
    unet = EchoUNet(output)
    abar = scheduler.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
    targets = {
        "epsilon": noise,
        "sample": clean,
        "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * clean,
    }
    for prediction_type, target in targets.items():
        loss = diffusion_loss(unet, scheduler, clean, noise, timesteps, prediction_type)
        torch.testing.assert_close(loss, ((output - target) ** 2).mean())
    weights = torch.linspace(0.5, 2.0, 1000)
    loss = diffusion_loss(unet, scheduler, clean, noise, timesteps, "epsilon", weights)
    per_sample = ((output - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per_sample * weights[timesteps]).mean())
    with pytest.raises(ValueError, match="`prediction_type`='x0' is not supported"):
        diffusion_loss(unet, scheduler, clean, noise, timesteps, "x0")


def test_noise_is_keyed_and_offset_is_per_channel():
    from ddim_plus.training.loss import sample_noise_and_timesteps, step_generator

    clean = torch.zeros(256, 3, 4, 4)
    noise_a, t_a = sample_noise_and_timesteps(clean, 1000, step_generator(0, 7, 1))
    noise_b, t_b = sample_noise_and_timesteps(clean, 1000, step_generator(0, 7, 1))
    assert torch.equal(noise_a, noise_b) and torch.equal(t_a, t_b)
    noise_c, _ = sample_noise_and_timesteps(clean, 1000, step_generator(0, 7, 0))
    assert not torch.equal(noise_a, noise_c)  # another process draws other noise
    assert t_a.min() >= 0 and t_a.max() < 1000
    offset_noise, _ = sample_noise_and_timesteps(clean, 1000, step_generator(0, 7, 1), noise_offset=1.0)
    # Per image and channel the offset is one constant: the spread of channel means grows from 1/4 to about 1.
    assert noise_a.mean(dim=(2, 3)).std() < 0.35 and offset_noise.mean(dim=(2, 3)).std() > 0.8


def test_checkpoint_resolution_rotation_and_publishing(tmp_path):
    from ddim_plus.training.checkpoints import (
        list_checkpoints,
        publish_directory,
        resolve_checkpoint,
        rotate_checkpoints,
    )

    assert resolve_checkpoint(str(tmp_path), "latest") is None
    for step in (9, 10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".staging-checkpoint-11").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 9, 10]
    assert resolve_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(str(tmp_path), "checkpoint-9") == str(tmp_path / "checkpoint-9")
    assert resolve_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"'checkpoint-11' is not a checkpoint folder .*checkpoint-10"):
        resolve_checkpoint(str(tmp_path), "checkpoint-11")
    assert rotate_checkpoints(str(tmp_path), 2) == [str(tmp_path / "checkpoint-2")]
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [9, 10]

    # Publishing replaces the previous pipeline and leaves checkpoints alone.
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "old.bin").write_text("old")
    (tmp_path / "model_index.json").write_text("old")
    staging = tmp_path / ".staging-pipeline"
    (staging / "unet").mkdir(parents=True)
    (staging / "unet" / "new.bin").write_text("new")
    (staging / "model_index.json").write_text("new")
    publish_directory(str(staging), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["new.bin"]
    assert (tmp_path / "model_index.json").read_text() == "new"
    assert not staging.exists() and not list(tmp_path.glob(".staging-old-*"))
    assert (tmp_path / "checkpoint-10").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Safety of a run: secrets, published weights, other runs' folders, 16-bit data, the model card
# ---------------------------------------------------------------------------------------------------------------
SECRET = "hf_secret_marker"


@pytest.fixture(scope="module")
def folder_run(workdir):
    """A run on 16-bit grayscale PNGs smaller than --resolution, with a Hub token and tensorboard logging, and a
    checkpoint at its last step (so the published weights can be compared with the EMA and raw weights then)."""
    data_dir = workdir / "scans16"
    data_dir.mkdir()
    for index in range(6):
        ramp = np.linspace(0, 65535, 42).reshape(6, 7) * (index + 1) / 6
        Image.fromarray(ramp.round().astype(np.uint16)).save(data_dir / f"scan_{index}.png")
    output_dir = workdir / "folder_run"
    argv = tiny_args(
        workdir, output_dir, "--train_data_dir", str(data_dir), "--max_train_steps", "3", "--checkpointing_steps",
        "3", "--lr_warmup_steps", "2", "--logger", "tensorboard", "--hub_token", SECRET, "--num_eval_samples", "100",
        "--preserve_input_precision",
    )  # fmt: skip
    result = run_train(argv, workdir / "hf_home")
    return {"output_dir": output_dir, "result": result, "data_dir": data_dir}


def test_hub_token_is_never_written(folder_run):
    output_dir = folder_run["output_dir"]
    files = [path for path in output_dir.rglob("*") if path.is_file()]
    # The tracker config was written (so the token had a chance to leak), and no file holds the token.
    assert any(path.name == "hparams.yml" for path in files)
    assert [path for path in files if SECRET.encode() in path.read_bytes()] == []


def test_published_unet_holds_the_ema_weights(folder_run):
    output_dir = folder_run["output_dir"]
    published = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(output_dir / "checkpoint-3" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    raw = load_file(output_dir / "checkpoint-3" / "unet" / "diffusion_pytorch_model.safetensors")
    assert published.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(published[key], ema[key]) for key in ema)
    assert any(not torch.equal(published[key], raw[key]) for key in raw)


def test_published_unet_holds_the_raw_weights_without_ema_and_overwrite_clears_the_old_run(workdir, reference_run):
    output_dir = workdir / "raw_run"
    # Another run's outputs: --overwrite_output_dir replaces them all, so none is mixed into the new run.
    shutil.copytree(reference_run["output_dir"], output_dir)
    argv = tiny_args(
        workdir, output_dir, "--train_data_dir", str(reference_run["data_dir"]), "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--lr_warmup_steps", "0", "--no-use_ema", "--overwrite_output_dir",
        "--eval_inference_steps", "3",
    )  # fmt: skip
    run_train(argv, workdir / "hf_home")
    published = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(output_dir / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(published[key], raw[key]) for key in raw)
    assert not (output_dir / "checkpoint-2" / "unet_ema").exists()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert sorted(p.name for p in output_dir.glob("samples*.png")) == ["samples_3steps.png"]
    steps, _ = read_debug_log(output_dir)
    assert [record["step"] for record in steps] == [1, 2]  # the old run's debug log is gone, not appended to


def test_folder_run_warns_and_writes_a_card_without_local_paths(folder_run, workdir):
    from huggingface_hub import ModelCard

    output_dir, result = folder_run["output_dir"], folder_run["result"]
    log = result.stdout + result.stderr
    assert "6 of 6 images have a side shorter than `--resolution`=8" in log
    assert "`--lr_warmup_steps`=2 is more than half of the 3 optimiser steps" in log
    assert "No quality metric for this data" in log
    # Unscored samples only fill the 64-sample grid, whatever --num_eval_samples asks for.
    assert json.loads((output_dir / "metrics.json").read_text())[0]["samples"] == 64
    # A 1-channel model: the 16-bit images were read as grayscale.
    assert json.loads((output_dir / "unet" / "config.json").read_text())["in_channels"] == 1
    card_text = (output_dir / "README.md").read_text()
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.datasets is None
    assert str(workdir) not in card_text and "| train_data_dir | scans16 |" in card_text
    assert "dataset_name" not in card_text and "a folder of 6 images" in card_text


def test_an_output_dir_holding_another_run_is_refused(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "model_index.json").write_text("{}")
    expect_error_without_output(
        ["--output_dir", str(output_dir)],
        output_dir,
        "holds another run \\(model_index.json\\).*--overwrite_output_dir",
    )


def test_resuming_another_run_or_a_finished_one_is_refused(reference_run, workdir, tmp_path, capsys):
    data = ["--train_data_dir", str(reference_run["data_dir"])]
    output_dir = tmp_path / "other"
    shutil.copytree(reference_run["output_dir"] / "checkpoint-6", output_dir / "checkpoint-6")
    argv = tiny_args(workdir, output_dir, *data, *REFERENCE_FLAGS)
    resume = ["--resume_from_checkpoint", "latest"]
    # Another learning rate and seed: the checkpoint belongs to another run.
    expect_error_without_output(
        [*argv, *resume, "--learning_rate", "3e-4", "--seed", "1"],
        output_dir,
        r"other settings \(`--seed`: checkpoint 0, now 1; `--learning_rate`: checkpoint 0.001, now 0.0003\)",
    )
    # Another resolution is named as the flag, not as the UNet configuration it changes.
    expect_error_without_output(
        [*argv, *resume, "--resolution", "16"], output_dir, r"other settings \(`--resolution`: checkpoint 8, now 16\)"
    )
    # The same run, but checkpoint-6 is past the end of a 5-step run.
    expect_error_without_output([*argv, *resume, "--max_train_steps", "5"], output_dir, "at step 6, past")
    # `latest` finding nothing says so (here the run then stops at its bad data).
    empty = tmp_path / "empty"
    expect_error_without_output(
        ["--output_dir", str(empty), *resume, "--train_data_dir", str(tmp_path / "missing")], empty, "not a folder"
    )
    assert f"No checkpoint in {empty}, starting from scratch." in capsys.readouterr().out


def test_check_resume_warns_about_a_new_length_and_an_unrecorded_checkpoint(tmp_path):
    from ddim_plus.training.checkpoints import check_resume

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    record = {"learning_rate": 1e-3, "max_train_steps": 10}
    assert "cannot be checked" in check_resume(str(checkpoint), record)
    (checkpoint / "training_run.json").write_text(json.dumps(record))
    assert check_resume(str(checkpoint), record) is None
    warning = check_resume(str(checkpoint), dict(record, max_train_steps=20))
    assert "`max_train_steps` changed from 10 to 20" in warning and "learning-rate schedule is rebuilt" in warning


def test_a_user_mistake_prints_the_message_not_a_traceback(tmp_path, monkeypatch):
    """The script's entry point exits with the message (Python prints it, with exit code 1), not a traceback."""
    import runpy

    argv = ["train.py", "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(tmp_path / "missing")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    assert isinstance(exit_info.value.code, str)
    assert exit_info.value.code.startswith("train.py: error: `--train_data_dir`=")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# diffusers users' habits: the anchor's flags, fine-tuning, --help, the documented flag table
# ---------------------------------------------------------------------------------------------------------------
def test_the_anchor_command_parses_with_the_anchors_meaning_and_unet(monkeypatch):
    # train_unconditional's README command and the flags its scripts pass (with wandb installed, as it needs).
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: name if name == "wandb" else find_spec(name, *a))
    args = train_args.parse_args(
        [
            "--dataset_name", "huggan/flowers-102-categories", "--resolution", "64", "--center_crop", "--random_flip",
            "--output_dir", "ddpm-ema-flowers-64", "--train_batch_size", "16", "--num_epochs", "100",
            "--gradient_accumulation_steps", "1", "--use_ema", "--learning_rate", "1e-4", "--lr_warmup_steps", "500",
            "--mixed_precision", "no", "--ddpm_num_inference_steps", "100", "--save_images_epochs", "5",
            "--save_model_epochs", "5", "--preserve_input_precision", "--enable_xformers_memory_efficient_attention",
            "--logger", "wandb",
        ]
    )  # fmt: skip
    assert args.ddim_num_inference_steps == 100 and args.report_to == "wandb"
    assert (args.save_images_epochs, args.save_model_epochs) == (5, 5)
    train_args.validate_args(args)
    # Without --model_config_name_or_path, 64 pixels get train_unconditional's UNet (its source's values).
    config = train_args.build_unet_config(args, 3)
    assert config["block_out_channels"] == (128, 128, 256, 256, 512, 512) and config["layers_per_block"] == 2
    assert config["down_block_types"] == ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
    assert config["up_block_types"] == ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4
    assert config["sample_size"] == 64 and config["in_channels"] == config["out_channels"] == 3
    # Below 32 pixels the small default stays (the digits' 8x8).
    assert train_args.build_unet_config(train_args.parse_args([]), 1)["block_out_channels"] == (16, 32, 32)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        train_args.parse_args(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    for default in ("(default: logsnr)", "(default: 20)", "(default: 7200)", "(default: tensorboard)"):
        assert default in usage
    assert "(default: None)" not in usage


@pytest.mark.parametrize("module", ["datasets", "tensorboard"])
def test_a_base_install_names_the_train_extra_before_writing_anything(module, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as without the `train` extra
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.cli(["--output_dir", str(output_dir)])
    assert f"Training needs the '{module}' package" in str(exit_info.value)
    assert "pip install 'ddim-plus[train]'" in str(exit_info.value)
    assert not output_dir.exists()


def test_every_flag_is_in_the_documented_table():
    table = {}
    for line in (REPO_ROOT / "docs" / "training.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            for flag in re.findall(r"`(--[\w-]+)`", cells[0]):
                table[flag] = cells[1].strip("`")
    for action in train_args.build_parser()._actions:
        if action.dest == "help":
            continue
        for flag in action.option_strings:
            assert flag in table, f"{flag} is missing from docs/training.md's flag table"
            default = action.default
            expected = "" if default is None else " ".join(map(str, default)) if isinstance(default, list) else default
            assert table[flag] == str(expected), flag


@pytest.fixture(scope="module")
def stock_ddpm_folder(workdir):
    """A stock `DDPMPipeline` with a tiny 1-channel UNet saved as the `fp16` variant only, and a noise schedule
    unlike the trainer's defaults."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = workdir / "stock_ddpm"
    scheduler = DDPMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    DDPMPipeline(unet=make_tiny_unet(channels=1, seed=3), scheduler=scheduler).save_pretrained(folder, variant="fp16")
    return folder


def test_fine_tuning_starts_from_the_pretrained_unet_and_keeps_its_noise_schedule(
    workdir, reference_run, stock_ddpm_folder
):
    output_dir = workdir / "fine_tuned"
    argv = [
        "--output_dir", str(output_dir), "--pretrained_model_name_or_path", str(stock_ddpm_folder), "--variant",
        "fp16", "--train_data_dir", str(reference_run["data_dir"]), "--train_batch_size", "4", "--max_train_steps",
        "2", "--learning_rate", "1e-12", "--lr_warmup_steps", "0", "--no-use_ema", "--eval_inference_steps", "2",
        "--ddim_num_inference_steps", "2", "--num_eval_samples", "4", "--report_to", "none",
    ]  # fmt: skip
    result = run_train(argv, workdir / "hf_home")
    assert "with its noise schedule: T=100, squaredcos_cap_v2" in result.stderr
    assert (
        "(instead of --ddpm_num_steps 1000, --ddpm_beta_schedule linear, --prediction_type epsilon)" in result.stderr
    )
    scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMSchedulerPlus"
    assert (scheduler["num_train_timesteps"], scheduler["beta_schedule"], scheduler["prediction_type"]) == (
        100,
        "squaredcos_cap_v2",
        "v_prediction",
    )
    # Two steps at a learning rate of 1e-12 leave the pretrained weights (a fresh UNet would differ everywhere).
    pretrained = load_file(stock_ddpm_folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    tuned = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert pretrained.keys() == tuned.keys()
    assert all(torch.allclose(pretrained[key], tuned[key], atol=1e-6) for key in pretrained)


def test_fine_tuning_refuses_data_with_other_channels_or_a_second_model(tmp_path, workdir, stock_ddpm_folder):
    from diffusers import DDPMPipeline, DDPMScheduler

    rgb = tmp_path / "rgb_ddpm"
    DDPMPipeline(unet=make_tiny_unet(channels=3), scheduler=DDPMScheduler()).save_pretrained(rgb)
    output_dir = tmp_path / "out"
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--pretrained_model_name_or_path", str(rgb)],
        output_dir,
        "takes 3 channels, the training images have 1",
    )
    # Weights saved as the fp16 variant only, asked for without `--variant`: one error naming the flags, no traceback.
    expect_error_without_output(
        ["--output_dir", str(output_dir), "--pretrained_model_name_or_path", str(stock_ddpm_folder)],
        output_dir,
        r"its UNet \(`unet/`\) cannot be loaded .*Check `--variant` and `--revision`",
    )
    expect_error_without_output(
        [
            "--output_dir", str(output_dir), "--pretrained_model_name_or_path", str(stock_ddpm_folder),
            "--model_config_name_or_path", str(workdir / "tiny_unet"),
        ],
        output_dir,
        "pass only one",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Defaults follow the data: the digits' recipe on the bundled digits, train_unconditional's on any other data
# ---------------------------------------------------------------------------------------------------------------
def test_other_data_gets_train_unconditionals_defaults_for_what_is_left_out(tmp_path):
    # train_unconditional's values, from its source: --resolution 64, --learning_rate 1e-4, --train_batch_size 16,
    # --lr_warmup_steps 500, and its UNet.
    folder = ["--train_data_dir", str(tmp_path)]
    args = train_args.parse_args(folder)
    assert (args.resolution, args.learning_rate, args.train_batch_size, args.lr_warmup_steps) == (64, 1e-4, 16, 500)
    assert args.recipe_defaults == ("resolution", "learning_rate", "train_batch_size", "lr_warmup_steps", "output_dir")
    # A folder named after the data, not after the digits: it is also the Hub repo name without --hub_model_id.
    assert args.output_dir == "ddim-plus-model"
    config = train_args.build_unet_config(args, 3)
    assert config["block_out_channels"] == (128, 128, 256, 256, 512, 512) and config["sample_size"] == 64
    assert "train_unconditional's defaults" in train_args.describe_recipe(args)
    # What the user sets is kept and not listed as a default.
    args = train_args.parse_args([*folder, "--learning_rate", "3e-4", "--resolution", "32", "--output_dir", "out"])
    assert (args.learning_rate, args.resolution, args.train_batch_size, args.output_dir) == (3e-4, 32, 16, "out")
    assert args.recipe_defaults == ("train_batch_size", "lr_warmup_steps")
    # A Hub dataset is other data too; the bundled digits keep their recipe.
    assert train_args.parse_args(["--dataset_name", "huggan/flowers-102-categories"]).learning_rate == 1e-4
    digits = train_args.parse_args([])
    assert (digits.resolution, digits.learning_rate, digits.train_batch_size, digits.lr_warmup_steps) == (
        8,
        1e-3,
        64,
        100,
    )
    assert "the bundled digits' recipe" in train_args.describe_recipe(digits)
    assert digits.output_dir == "ddim-plus-digits"


def test_one_step_on_a_folder_of_photos_logs_the_recipe_and_trains_with_its_defaults(tmp_path, caplog, one_thread):
    """One training step on small RGB images: the log names the recipe and every default applied, images shrunk by
    more than 2x are warned about, and the run trains with train_unconditional's learning rate and batch size."""
    data_dir = tmp_path / "photos"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data_dir / f"photo_{index}.png")
    output_dir = tmp_path / "out"
    argv = [
        "--output_dir", str(output_dir), "--train_data_dir", str(data_dir), "--resolution", "16",
        "--max_train_steps", "1", "--eval_inference_steps", "2", "--ddim_num_inference_steps", "2",
        "--num_eval_samples", "2", "--report_to", "none", "--debug_log",
    ]  # fmt: skip
    with caplog.at_level("INFO"):
        train.main(argv)
    log = " ".join(caplog.text.split())
    assert "Recipe: diffusers train_unconditional's defaults (the data, --train_data_dir" in log
    assert "Resolution: 16x16; UNet: a small UNet" in log
    assert "Defaults applied for flags left out: --learning_rate 0.0001, --train_batch_size 16, " in log
    assert "--lr_warmup_steps 500." in log
    assert "4 of 4 images have a shorter side more than twice `--resolution`=16" in log
    record = json.loads((output_dir / "training_run.json").read_text())
    assert (record["learning_rate"], record["train_batch_size"], record["lr_warmup_steps"]) == (1e-4, 16, 500)
    unet = json.loads((output_dir / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [16, 32, 32] and unet["in_channels"] == 3 and unet["sample_size"] == 16
    (step,), _ = read_debug_log(output_dir)
    assert step["lr"] == pytest.approx(1e-4 / 500)  # the first of 500 warm-up steps to 1e-4
    assert len(step["indices"]) == 4  # all 4 images in one batch of up to 16


# ---------------------------------------------------------------------------------------------------------------
# Killed at any moment, continued with `--resume_from_checkpoint latest`
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """An in-process run that computes as a fresh subprocess (OMP_NUM_THREADS=1) does, so that their weights can be
    compared bit for bit: one thread (the order of a convolution's float sums depends on the thread count), and none
    of accelerate's process-wide state left by an earlier in-process run."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_killed(argv, hf_home, kill_at):
    """Run the trainer in a subprocess that SIGKILLs itself at the named point (`checkpoints.kill_point`)."""
    env = dict(subprocess_env(hf_home), DDIM_PLUS_TEST_KILL_AT=kill_at)
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *argv], capture_output=True, text=True, env=env)
    assert result.returncode == -9, result.stderr[-3000:]


@pytest.mark.parametrize(
    "kill_at, left",
    [
        # before the first checkpoint: the record of the run, its tracker logs and debug log
        ("step-1", ["logs", "process-0.debug.jsonl", "training_run.json"]),
        # while writing the first checkpoint
        ("staging-checkpoint", [".staging-checkpoint-2", "logs", "process-0.debug.jsonl", "training_run.json"]),
        # while moving the final pipeline into output_dir (after checkpoint 6 of 7)
        ("publish", [".staging-pipeline", "checkpoint-4", "checkpoint-6", "logs", "process-0.debug.jsonl"]),
    ],
)
def test_a_run_killed_at_any_moment_continues_with_latest_and_ends_identical(
    reference_run, workdir, tmp_path, one_thread, kill_at, left
):
    output_dir = tmp_path / "out"
    argv = tiny_args(workdir, output_dir, "--train_data_dir", str(reference_run["data_dir"]), *REFERENCE_FLAGS)
    argv += ["--logger", "tensorboard", "--save_model_epochs", "0"]
    run_killed(argv, workdir / "hf_home", kill_at)
    assert set(left) <= {path.name for path in output_dir.iterdir()}
    train.main([*argv, "--resume_from_checkpoint", "latest"])

    assert not list(output_dir.glob(".staging-*"))
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    _, reference_final = read_debug_log(reference_run["output_dir"])
    steps, final = read_debug_log(output_dir)
    assert final["weights"] == reference_final["weights"]
    # Started over (removing only this run's files: the killed run's debug lines are gone), or continued from
    # checkpoint 6 (the debug log appended to).
    assert [record["step"] for record in steps] == list(range(1, 8)) + ([7] if kill_at == "publish" else [])
    expected = load_file(reference_run["output_dir"] / "unet" / "diffusion_pytorch_model.safetensors")
    actual = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert (output_dir / "model_index.json").is_file()


def test_a_checkpoint_at_the_last_step_writes_the_final_outputs_again(reference_run, workdir, tmp_path, one_thread):
    """What a kill during the final export leaves when the last checkpoint is at the run's end."""
    output_dir = tmp_path / "out"
    shutil.copytree(reference_run["output_dir"] / "checkpoint-6", output_dir / "checkpoint-6")
    argv = tiny_args(workdir, output_dir, "--train_data_dir", str(reference_run["data_dir"]), *REFERENCE_FLAGS)
    train.main([*argv, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    steps, _ = read_debug_log(output_dir)
    assert steps == []  # nothing trained
    published = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(output_dir / "checkpoint-6" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(published[key], ema[key]) for key in ema)


def test_restarting_refuses_an_unfinished_run_with_other_settings_or_no_record(reference_run, workdir, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "process-0.debug.jsonl").write_text("")
    argv = tiny_args(workdir, output_dir, "--train_data_dir", str(reference_run["data_dir"]), *REFERENCE_FLAGS)
    resume = ["--resume_from_checkpoint", "latest"]
    expect_error_without_output([*argv, *resume], output_dir, "no complete checkpoint and no training_run.json")
    record = json.loads((reference_run["output_dir"] / "checkpoint-6" / "training_run.json").read_text())
    (output_dir / "training_run.json").write_text(json.dumps(dict(record, seed=5)))
    expect_error_without_output(
        [*argv, *resume], output_dir, r"unfinished run \(no complete checkpoint\) with other settings \(`--seed`"
    )


# ---------------------------------------------------------------------------------------------------------------
# Resume checks the data; a missing model config is one line
# ---------------------------------------------------------------------------------------------------------------
def test_resume_refuses_changed_data_naming_the_files(reference_run, workdir, tmp_path):
    data_dir = tmp_path / "digits"
    shutil.copytree(reference_run["data_dir"], data_dir)
    output_dir = tmp_path / "out"
    shutil.copytree(reference_run["output_dir"] / "checkpoint-4", output_dir / "checkpoint-4")
    argv = tiny_args(workdir, output_dir, "--train_data_dir", str(data_dir), *REFERENCE_FLAGS)
    argv += ["--resume_from_checkpoint", "latest"]
    Image.new("L", (8, 8), 255).save(data_dir / "added.png")
    Image.new("L", (8, 8), 0).save(data_dir / "digit_003.png")
    (data_dir / "digit_007.png").unlink()
    # The copy lies elsewhere, so the folder's path differs too; both are named.
    expect_error_without_output(
        argv,
        output_dir,
        r"`--train_data_dir`: checkpoint .*the training data: 1 files added \(added.png\), 1 files removed "
        r"\(digit_007.png\), 1 files changed \(digit_003.png\)",
    )


def test_a_hub_datasets_change_is_named_by_its_fingerprint():
    from ddim_plus.training.checkpoints import compare_run_records

    saved = {"data": {"dataset_name": "me/photos", "dataset_config_name": None, "rows": 460, "fingerprint": "a1"}}
    current = {"data": dict(saved["data"], rows=560, fingerprint="b2"), "max_train_steps": 9}
    assert compare_run_records(saved, current) == ["the training data: fingerprint 'a1' -> 'b2', rows 460 -> 560"]
    # A record without a data fingerprint (an older trainer's) is not refused for lacking one.
    assert compare_run_records({}, current) == []


@pytest.mark.parametrize("flag", ["--model_config_name_or_path", "--pretrained_model_name_or_path"])
def test_a_missing_or_broken_model_config_is_a_one_line_error_naming_the_flag(tmp_path, flag):
    output_dir = tmp_path / "out"
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    (broken / "scheduler").mkdir()
    (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
    for path in (tmp_path / "missing", broken):
        with pytest.raises(SystemExit) as exit_info:
            train.cli(["--output_dir", str(output_dir), flag, str(path)])
        message = str(exit_info.value.code)
        assert f"error: `{flag}`={str(path)!r}: no " in message and "\n" not in message
        assert "config could be loaded" in message and not output_dir.exists()


# ---------------------------------------------------------------------------------------------------------------
# What is uploaded: one list, from the run's own folders, as huggingface_hub's filter applies it
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logging_dir", ["logs", "tb", "runs/tb", "/elsewhere/tb"])
def test_upload_filter_leaves_out_the_runs_state_and_its_actual_logging_dir(logging_dir):
    from huggingface_hub.utils import filter_repo_objects

    from ddim_plus.training.checkpoints import hub_ignore_patterns

    published = [
        "README.md", "model_index.json", "metrics.json", "samples_10steps.png", "scheduler/scheduler_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "notes/logs.txt", "logs.md",
    ]  # fmt: skip
    training_state = [
        "checkpoint-4/unet/config.json", "checkpoint-4/random_states_0.pkl", ".staging-checkpoint-6/optimizer.bin",
        ".staging-pipeline/model_index.json", "samples/epoch-0.png", "samples/step-20.png",
        "process-0.debug.jsonl", "training_run.json",
    ]  # fmt: skip
    logs = [] if logging_dir.startswith("/") else [f"{logging_dir}/ddim_plus/events.out.tfevents.1"]
    names = published + training_state + logs
    kept = sorted(filter_repo_objects(names, ignore_patterns=hub_ignore_patterns(logging_dir)))
    assert kept == sorted(published)
    # The same lists say what of a folder is a run's (for --overwrite_output_dir and restarts).
    expected = {name.split("/")[0] for name in published + training_state + logs} - {"notes", "logs.md"}
    assert find_run_outputs_in(names, logging_dir) == sorted(expected)


def find_run_outputs_in(names, logging_dir):
    """What `find_run_outputs` finds in a folder holding the files `names` (written empty)."""
    import tempfile

    from ddim_plus.training.checkpoints import find_run_outputs

    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        return find_run_outputs(folder, logging_dir)


# ---------------------------------------------------------------------------------------------------------------
# Speed flags (opt-in): each leaves the loss and the EMA exact, or within float rounding where the arithmetic changes
# ---------------------------------------------------------------------------------------------------------------
def short_run(workdir, data_dir, output_dir, *flags):
    """Three optimiser steps of the tiny UNet on 20 digits, in-process, with no sampling; returns the losses, the
    final raw weights and the published (EMA) weights."""
    argv = tiny_args(workdir, output_dir, "--train_data_dir", str(data_dir), "--max_train_steps", "3", *flags)
    argv += ["--lr_warmup_steps", "1"]
    train.main([*argv, "--eval_inference_steps", "--save_images_epochs", "0", "--checkpointing_steps", "3"])
    steps, final = read_debug_log(output_dir)
    ema = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(output_dir / "checkpoint-3" / "unet" / "diffusion_pytorch_model.safetensors")
    return [record["loss"] for record in steps], raw, ema


@pytest.fixture(scope="module")
def plain_short_run(workdir, reference_run):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield short_run(workdir, reference_run["data_dir"], workdir / "plain_short_run")
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "flag, exact",
    [
        ("--allow_tf32", True),  # TF32 exists only on CUDA: the CPU's float32 arithmetic is unchanged
        ("--torch_compile", True),  # compiled here with dynamo's "eager" backend: the same operations, captured
        ("--fused_adam", False),  # another AdamW kernel: the same update up to float rounding
        ("--channels_last", False),  # other convolution kernels: the same sums in another order
    ],
)
def test_speed_flags_keep_the_loss_and_the_ema(
    workdir, reference_run, plain_short_run, one_thread, monkeypatch, flag, exact
):
    if flag == "--torch_compile":
        # Inductor's code generation takes minutes on a shared CPU; dynamo's capture (what can break the
        # trainer: saving, EMA, the hooks) is the same with any backend.
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    losses, raw, ema = short_run(workdir, reference_run["data_dir"], workdir / f"short_run{flag}", flag)
    plain_losses, plain_raw, plain_ema = plain_short_run
    assert raw.keys() == plain_raw.keys() and ema.keys() == plain_ema.keys()  # no `_orig_mod.` prefixes
    if exact:
        assert losses == plain_losses
        assert all(torch.equal(raw[key], plain_raw[key]) for key in raw)
        assert all(torch.equal(ema[key], plain_ema[key]) for key in ema)
    else:
        # The losses differ by float rounding. A weight can differ by up to the learning rate per step: Adam's
        # first updates are +-lr whatever the gradient's size, so a near-zero gradient whose rounding differs can
        # move its weight the other way (3 steps at lr 1e-3 here).
        assert losses == pytest.approx(plain_losses, rel=1e-5)
        for weights, plain in ((raw, plain_raw), (ema, plain_ema)):
            for key in plain:
                torch.testing.assert_close(weights[key], plain[key], rtol=0, atol=3 * 1e-3)
