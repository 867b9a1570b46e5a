"""`evaluation.sampling` at scale: several processes, images on disk, resuming a killed run, bad input, and the
trainer's metrics.json against `ddim-plus evaluate`.

Multi-process runs go through `accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo), as users launch
them; bad input is checked in-process.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO_ROOT, launch_command, make_tiny_unet, save_tiny_pipeline

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.cli import main
from ddim_plus.evaluation import sampling
from ddim_plus.evaluation.digits import digits_reference_images
from ddim_plus.evaluation.fid import FrechetDistance
from ddim_plus.evaluation.sampling import MANIFEST_NAME, generate_images

pytest.importorskip("torchmetrics")

NUM_IMAGES = 96
# Small shards so that a 2-process run has 12 rounds to be killed in.
COMMON = ["--steps", "40", "--num", str(NUM_IMAGES), "--seed", "3", "--batch-size", "3", "--shard-size", "4"]


def launch(argv, num_processes, port, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    command = launch_command("ddim_plus.cli", argv, num_processes, port)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"), channels=1)


def pngs(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


def test_two_processes_killed_and_resumed_equal_one_process(model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(["evaluate", model_dir, *COMMON, "--save-images", str(one), "--out", str(one / "r.json"), "--quiet"], 1, 0)

    argv = ["evaluate", model_dir, *COMMON, "--save-images", str(two), "--out", str(two / "r.json"), "--quiet"]
    cell = two / "leading_S40_eta0"
    process = launch(argv, 2, 29811, wait=False)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if cell.is_dir() and len(pngs(cell)) >= 8:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    written = len(pngs(cell))
    assert 8 <= written < NUM_IMAGES, f"the run was not killed part-way ({written} images written)"
    output = launch(argv, 2, 29812)
    assert "| 40 |" in output

    first, second = json.loads((one / "r.json").read_text()), json.loads((two / "r.json").read_text())
    assert first[0]["frechet_distance"] == second[0]["frechet_distance"]  # bit-identical, not approximately
    assert first[0]["num_images"] == NUM_IMAGES
    names = pngs(one / "leading_S40_eta0")
    assert names == pngs(cell) == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    for name in names:
        a, b = (np.asarray(PIL.Image.open(folder / "leading_S40_eta0" / name)) for folder in (one, two))
        np.testing.assert_array_equal(a, b)

    # The PNGs are image i from seed 3 + i, as the pipeline draws it in the same batches (88-90, then 91) and with the
    # same one thread (this random UNet is chaotic: other batches or threads round differently, and 40 steps amplify
    # that to a few 8-bit levels).
    pipe = DDIMPlusPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = generate_images(pipe, 4, 40, seed=3 + 88, batch_size=3).images
    finally:
        torch.set_num_threads(threads)
    saved = np.stack([np.asarray(PIL.Image.open(one / "leading_S40_eta0" / f"{88 + i:06d}.png")) for i in range(4)])
    np.testing.assert_array_equal(saved, (direct[..., 0] * 255).round())


def test_sample_writes_pngs_and_grid_across_two_processes(model_dir, tmp_path):
    argv = ["sample", model_dir, "--steps", "3", "--num", "7", "--batch-size", "2", "--shard-size", "2"]
    launch([*argv, "--save-images", str(tmp_path / "two"), "--out", str(tmp_path / "two.png"), "--quiet"], 2, 29813)
    main([*argv, "--save-images", str(tmp_path / "one"), "--out", str(tmp_path / "one.png"), "--quiet"])
    assert pngs(tmp_path / "two") == [f"{i:06d}.png" for i in range(7)]
    for name in ["one.png", "two.png"] + [f"one/{n}" for n in pngs(tmp_path / "one")]:
        other = name.replace("one", "two")
        np.testing.assert_array_equal(
            np.asarray(PIL.Image.open(tmp_path / name)), np.asarray(PIL.Image.open(tmp_path / other))
        )


def test_scores_do_not_depend_on_shard_size(model_dir):
    pipe = DDIMPlusPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    metric = FrechetDistance("digits")
    metric.update(digits_reference_images(8), real=True)
    whole = generate_images(pipe, 9, 3, batch_size=3, metric=metric, shard_size=9)
    sharded = generate_images(pipe, 9, 3, batch_size=3, metric=metric, shard_size=3)
    np.testing.assert_array_equal(whole.images, sharded.images)
    # Sums of three shards against one: the same up to float64 rounding.
    assert sharded.frechet_distance.value == pytest.approx(whole.frechet_distance.value, rel=1e-12)
    assert sharded.frechet_distance.num_generated == 9
    # The scored images are the 8-bit ones: scoring them afresh gives the same distance.
    metric.reset()
    metric.update(whole.images, real=False)
    assert metric.compute().value == pytest.approx(whole.frechet_distance.value, rel=1e-12)


def test_folder_of_other_settings_is_refused(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    argv = ["sample", model_dir, "--steps", "2", "--num", "3", "--save-images", str(folder), "--quiet"]
    assert main(argv) == 0
    assert json.loads((folder / MANIFEST_NAME).read_text())["seed"] == 0
    assert main([*argv, "--seed", "5"]) == 2
    error = capsys.readouterr().err
    assert "--save-images" in error and "seed" in error and "empty folder" in error
    other_model = tmp_path / "other-model"
    DDIMPlusPipeline(
        unet=make_tiny_unet(channels=1, sample_size=8, seed=1), scheduler=DDIMSchedulerPlus()
    ).save_pretrained(other_model)
    assert main(["sample", str(other_model), *argv[2:]]) == 2
    assert "unet_sha256" in capsys.readouterr().err
    # More images of the same settings extend the folder: the complete shard of images 0-2 is kept.
    before = (folder / "000000.png").stat().st_mtime_ns
    assert main([*argv[:5], "5", *argv[6:], "--shard-size", "3"]) == 0
    assert pngs(folder)[-1] == "000004.png" and (folder / "000000.png").stat().st_mtime_ns == before
    stray = tmp_path / "stray"
    stray.mkdir()
    PIL.Image.new("L", (8, 8)).save(stray / "photo.png")
    assert main([*argv[:-2], str(stray), "--quiet"]) == 2
    assert MANIFEST_NAME in capsys.readouterr().err


def test_fewer_images_than_processes_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    class TwoProcesses:
        num_processes, is_main_process, device = 2, True, "cpu"

    monkeypatch.setattr(sampling, "process_state", lambda: TwoProcesses())
    out = tmp_path / "grid.png"
    assert main(["sample", model_dir, "--num", "1", "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "--num 1" in error and "--num_processes" in error
    assert not out.exists()


def test_reference_smaller_than_the_feature_dimension_is_refused(model_dir):
    # The CLI turns this error into `--reference: ...` (exit 2); with digits features its own reference is the 1,797
    # bundled digits, so a too-small set reaches it only through the library (or other features' folders).
    from ddim_plus.evaluation.quality import ReferenceSetTooSmallError, quality_sweep

    pipe = DDIMPlusPipeline.from_pretrained(model_dir)
    with pytest.raises(ReferenceSetTooSmallError, match="holds 20 images.*32 dimensions"):
        quality_sweep(pipe, steps=(2,), num_images=4, reference_images=digits_reference_images(8)[:20])


def test_trainer_metrics_equal_evaluate(tmp_path, capsys):
    """The trainer's final table comes from the same generation and scoring as `ddim-plus evaluate`."""
    output_dir = tmp_path / "trained"
    (tmp_path / "unet").mkdir()
    make_tiny_unet(channels=1, sample_size=8).save_config(tmp_path / "unet")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["OMP_NUM_THREADS"], env["PYTHONPATH"] = "1", str(REPO_ROOT)
    command = [
        sys.executable, str(REPO_ROOT / "training" / "train.py"), "--output_dir", str(output_dir), "--resolution",
        "8", "--model_config_name_or_path", str(tmp_path / "unet"), "--max_train_steps", "3", "--train_batch_size",
        "8", "--eval_inference_steps", "3", "--ddim_num_inference_steps", "3", "--num_eval_samples", "40",
        "--logger", "none", "--seed", "4",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = json.loads((output_dir / "metrics.json").read_text())
    (fd_key,) = [key for key in row if key.startswith("FD [")]

    out = tmp_path / "evaluate.json"
    argv = ["evaluate", str(output_dir), "--steps", "3", "--eta", str(row["eta"]), "--num", "40", "--seed", "4"]
    assert main([*argv, "--batch-size", "256", "--out", str(out), "--quiet"]) == 0
    (cell,) = json.loads(out.read_text())
    assert fd_key == f"FD [{cell['features']}]"
    assert row[fd_key] == round(cell["frechet_distance"], 4)
    assert row["samples"] == cell["num_images"] == 40
