"""ddim_plus.hub: every model card and every Hub upload (offline: the Hub calls are recorded, not made)."""

import os
import re

import pytest
from conftest import make_tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler
from huggingface_hub import ModelCard

import ddim_plus
from ddim_plus import DDIMInversionPipeline, DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.hub import (
    INSTALL_COMMAND,
    NOT_ON_PYPI,
    make_model_card,
    merge_model_card,
    set_card_section,
    tuned_schedules_markdown,
)
from ddim_plus.timestep_tuning import tuned_timesteps_entry

TAGS = ["ddim-plus", "diffusers", "unconditional-image-generation", "ddim"]
METRICS = [
    {"DDIM steps": 10, "samples": 256, "recognisable fraction": 0.875, "FD [digits]": 1.5},
    {"DDIM steps": 50, "samples": 256, "recognisable fraction": 0.9, "FD [digits]": 1.25},
]


def trainer_like_card(**overrides):
    arguments = dict(
        repo_id="me/digits-ddim",
        scheduler_config=DDIMSchedulerPlus().config,
        description="An unconditional image model trained on `ylecun/mnist`.",
        dataset_name="ylecun/mnist",
        sample_images=["samples_10steps.png", "samples_50steps.png"],
        metrics=METRICS,
        metric_columns=["recognisable fraction", "FD [digits]"],
        metrics_dataset=("digits", "8x8 digits"),
        metrics_description="Measured on 256 samples.",
        training_config={"learning_rate": 0.001, "resolution": 16},
    )
    return make_model_card(**{**arguments, **overrides})


def test_trainer_card_metadata_sections_and_model_index(tmp_path):
    trainer_like_card().save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "diffusers"
    assert loaded.data.pipeline_tag == "unconditional-image-generation"
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.datasets == ["ylecun/mnist"]
    assert loaded.data.tags == TAGS
    # every score is an EvalResult (the Hub's model-index), its row's other columns its config
    results = {(r.metric_name, r.metric_value, r.metric_type) for r in loaded.data.eval_results}
    assert results == {
        ("recognisable fraction (DDIM steps=10, samples=256)", 0.875, "recognisable_fraction"),
        ("FD [digits] (DDIM steps=10, samples=256)", 1.5, "fd_digits"),
        ("recognisable fraction (DDIM steps=50, samples=256)", 0.9, "recognisable_fraction"),
        ("FD [digits] (DDIM steps=50, samples=256)", 1.25, "fd_digits"),
    }
    assert {(r.task_type, r.dataset_type, r.dataset_name) for r in loaded.data.eval_results} == {
        ("unconditional-image-generation", "digits", "8x8 digits")
    }
    assert loaded.data.model_name == "me/digits-ddim"
    assert "model-index:" in (tmp_path / "README.md").read_text()
    text = loaded.text
    assert INSTALL_COMMAND in text and NOT_ON_PYPI in text and f"Saved with ddim_plus {ddim_plus.__version__}" in text
    assert 'DiffusionPipeline.from_pretrained("me/digits-ddim")' in text
    assert text.index("import ddim_plus") < text.index('DiffusionPipeline.from_pretrained("me/digits-ddim")')
    assert "![samples_10steps](samples_10steps.png)" in text and "![samples_50steps](samples_50steps.png)" in text
    assert "trained on `ylecun/mnist`" in text
    assert (
        "| DDIM steps | samples | recognisable fraction | FD [digits] |" in text
        and "| 50 | 256 | 0.9 | 1.25 |" in text
    )
    assert "Measured on 256 samples." in text
    assert "| learning_rate | 0.001 |" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## How to use",
        "## Other diffusers schedulers",
        "## Samples",
        "## Results",
        "## Training configuration",
    ]


def test_pipeline_card_is_the_minimal_card_with_the_same_metadata(tmp_path):
    DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus()).save_pretrained(tmp_path / "tiny")
    card = ModelCard.load(tmp_path / "tiny" / "README.md")
    assert card.data.tags == TAGS and card.data.license == "apache-2.0"
    assert card.data.datasets is None and card.data.eval_results is None
    assert INSTALL_COMMAND in card.text and f"ddim_plus {ddim_plus.__version__}" in card.text
    assert 'DiffusionPipeline.from_pretrained("tiny")' in card.text
    headings = [line for line in card.text.splitlines() if line.startswith("## ")]
    assert headings == ["## How to use", "## Other diffusers schedulers"]


@pytest.mark.parametrize("cls", [DDIMPlusPipeline, DDIMInversionPipeline])
def test_card_opens_with_the_import_line_and_the_error_without_it(cls):
    text = cls(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus()).model_card("me/m").text
    first_lines = text.split("## How to use")[0]
    # the message diffusers raises is checked against a real run in test_pipeline_loading's stock-loading test
    assert f"fails with `AttributeError: module diffusers has no attribute {cls.__name__}`" in first_lines
    assert "the fix is the one line `import ddim_plus`" in first_lines
    assert "(not on PyPI: see How to use)" in first_lines
    assert f"registers {cls.__name__}" in text


@pytest.mark.parametrize(
    "config, dropped",
    [
        (dict(), []),
        (dict(ddim_solver_order=2), ["`ddim_solver_order=2`"]),
        (dict(sigma_type="sigma_hat"), ['`sigma_type="sigma_hat"`']),
        (dict(timestep_spacing="quadratic"), ["the `quadratic` spacing (it raises `ValueError`"]),
        (dict(timestep_spacing="logsnr"), ["the `logsnr` spacing (it raises `ValueError`"]),
        (dict(timestep_spacing="trailing"), ["the `trailing` spacing's steps"]),
        (dict(timestep_spacing="linspace"), ["the `linspace` spacing's steps"]),
        (dict(timestep_spacing="leading"), []),
    ],
)
def test_card_says_what_stock_ddim_pipeline_drops(config, dropped):
    first_lines = make_model_card("me/m", DDIMSchedulerPlus(**config).config).text.split("## How to use")[0]
    assert 'Stock `diffusers.DDIMPipeline.from_pretrained("me/m")`' in first_lines
    if dropped:
        assert all(f"it drops this config's {item}" in first_lines or f"; {item}" in first_lines for item in dropped)
        assert "Its images differ from DDIMPlusPipeline's" in first_lines
    else:
        assert "this config uses none of what it drops" in first_lines


def test_the_cards_stock_workaround_for_our_spacings_samples(tmp_path):
    # The card's advice for stock diffusers users of a `logsnr` / `quadratic` config, run as written.
    DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus(timestep_spacing="logsnr")).save_pretrained(
        tmp_path
    )
    card = (tmp_path / "README.md").read_text()
    advice = re.search(r"pass `scheduler=(DDIMScheduler\.from_pretrained\(.*?\))`", card).group(1)
    scheduler = eval(advice.replace(f'"{tmp_path.name}"', repr(str(tmp_path))), {"DDIMScheduler": DDIMScheduler})
    stock = DDIMPipeline.from_pretrained(tmp_path, scheduler=scheduler)
    assert type(stock.scheduler) is DDIMScheduler and stock.scheduler.config.timestep_spacing == "trailing"
    assert stock(batch_size=1, num_inference_steps=2, output_type="np").images.shape[0] == 1


def test_save_pretrained_card_lists_the_tuned_schedules(tmp_path):
    """The card `save_pretrained` writes shows the scheduler's `tuned_timesteps` (and says stock DDIM drops them)."""
    plain = DDIMSchedulerPlus()
    entries = [tuned_timesteps_entry(plain, [900, 400, 0], 1), tuned_timesteps_entry(plain, [800, 0], 2)]
    scheduler = DDIMSchedulerPlus(tuned_timesteps=entries)
    DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Tuned timestep schedules") == 1
    assert "| 3 | 1 | 900, 400, 0 |" in text and "| 2 | 2 | 800, 0 |" in text
    assert "the tuned timestep schedules below" in text.split("## How to use")[0]


def test_the_card_lists_a_tuned_samplers_coefficients_step_by_step():
    """A `tune_sampler` entry's per-step extrapolation weights and eps scales are on the card; a timesteps-only
    entry shows none."""
    sampler = {"num_inference_steps": 2, "solver_order": 2, "timesteps": [700, 0]}
    sampler.update(extrapolation=[0.0, 0.5], eps_scale=[1.25, 1.0])
    steps_only = {"num_inference_steps": 3, "solver_order": 1, "timesteps": [900, 400, 0]}
    text = tuned_schedules_markdown([sampler, steps_only])
    assert "| steps | solver_order | timesteps | extrapolation | eps_scale |" in text
    assert "| 2 | 2 | 700, 0 | 0, 0.5 | 1.25, 1 |" in text and "| 3 | 1 | 900, 400, 0 | - | - |" in text


def test_save_pretrained_keeps_an_edited_card_and_writes_a_given_one(tmp_path):
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus())
    (tmp_path / "README.md").write_text("my notes\n")
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes\n"
    pipe.save_pretrained(tmp_path, model_card=pipe.model_card("me/m", training_config={"seed": 3}))
    assert "| seed | 3 |" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("name", [None, "ylecun/mnist", "mnist"])
def test_datasets_holds_hub_ids(name):
    card = make_model_card("m", DDIMSchedulerPlus().config, dataset_name=name)
    assert card.data.datasets == ([name] if name else None)


def test_datasets_refuses_local_paths_and_non_ids(tmp_path):
    """The Hub links each `datasets:` entry: a local path would be a broken link (and leak the path)."""
    for name in (str(tmp_path), "my data/images", "../images"):
        with pytest.raises(ValueError, match="is not a Hub dataset id"):
            make_model_card("m", DDIMSchedulerPlus().config, dataset_name=name)


def test_scores_need_the_data_they_were_measured_on():
    with pytest.raises(ValueError, match="`metric_columns` needs `metrics_dataset`"):
        trainer_like_card(metrics_dataset=None)
    card = trainer_like_card(metric_columns=[], metrics_dataset=None)  # a table without scores: no model-index
    assert card.data.eval_results is None and "## Results" in card.text


def test_set_card_section_replaces_or_appends():
    card = "---\nx: 1\n---\n\n# m\n\n## Samples\n\nA\n\n## Results\n\nold\n\n## Training\n\nB\n"
    replaced = set_card_section(card, "## Results", "new")
    assert "old" not in replaced and replaced.index("new") < replaced.index("## Training")
    assert replaced.count("## Results") == 1 and replaced.endswith("B\n")
    appended = set_card_section(card, "## Tuned", "T")
    assert appended.startswith(card.rstrip("\n")) and appended.endswith("## Tuned\n\nT\n")


# ----------------------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------------------
PIPELINE_FILES = [
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
]


def test_push_to_hub_creates_a_private_repo_and_uploads_the_pipeline(recorded_hub, offline_hf_home):
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus())
    url = pipe.push_to_hub("someone/tiny-ddim", private=True, commit_message="first", token="hf_test")
    assert url == "https://huggingface.co/someone/tiny-ddim/commit/1"
    assert recorded_hub.names() == ["create_repo", "upload_folder"]
    (create,), (upload,) = recorded_hub.get("create_repo"), recorded_hub.get("upload_folder")
    assert create == dict(repo_id="someone/tiny-ddim", private=True, token="hf_test", exist_ok=True, repo_type="model")
    assert upload["repo_id"] == "someone/tiny-ddim" and upload["token"] == "hf_test"
    assert upload["files"] == PIPELINE_FILES and upload["commit_message"] == "first"
    assert upload["run_as_future"] is False


def test_save_pretrained_with_push_to_hub(tmp_path, recorded_hub, offline_hf_home):
    pipe = DDIMInversionPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus())
    pipe.save_pretrained(tmp_path / "tiny", push_to_hub=True, repo_id="org/tiny-inversion", private=False)
    (create,), (upload,) = recorded_hub.get("create_repo"), recorded_hub.get("upload_folder")
    assert create["repo_id"] == "org/tiny-inversion" and create["private"] is False
    assert upload["files"] == PIPELINE_FILES and upload["folder_path"] == str(tmp_path / "tiny")
    assert upload["commit_message"] == "Upload DDIMInversionPipeline"
    assert 'DiffusionPipeline.from_pretrained("org/tiny-inversion")' in (tmp_path / "tiny" / "README.md").read_text()


def test_a_bad_token_fails_at_create_repo_before_any_upload(recorded_hub, offline_hf_home):
    recorded_hub.create_repo_error = PermissionError("401 Unauthorized")
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus())
    with pytest.raises(PermissionError, match="401"):
        pipe.push_to_hub("someone/tiny-ddim")
    assert recorded_hub.names() == ["create_repo"]


def test_recorded_background_upload_runs_when_waited_for(tmp_path, recorded_hub):
    from ddim_plus.hub import upload_to_hub

    (tmp_path / "model_index.json").write_text("{}")
    future = upload_to_hub(tmp_path, "me/m", "epoch 1", run_as_future=True)
    assert recorded_hub.names() == ["upload_folder"] and not future.done()
    assert str(future.result()) == "https://huggingface.co/me/m/commit/1"
    assert recorded_hub.names() == ["upload_folder", "wait"]
    assert recorded_hub.get("upload_folder")[0]["files"] == ["model_index.json"]
    assert os.path.isdir(tmp_path)


def test_publisher_creates_the_repo_first_uploads_in_the_background_and_waits_before_the_final_upload(
    tmp_path, recorded_hub
):
    from ddim_plus.hub import HubPublisher

    publisher = HubPublisher("digits-ddim", private=True, token="hf_test")
    assert recorded_hub.names() == ["create_repo"] and publisher.repo_id == "someone/digits-ddim"
    snapshots = []

    def save(folder):
        snapshots.append(folder)
        with open(os.path.join(folder, "model_index.json"), "w") as handle:
            handle.write("{}")

    publisher.upload_snapshot(save, "Epoch 1")
    publisher.upload_snapshot(save, "Epoch 2")
    # nothing waited for yet: the caller went on while both uploads were pending
    assert recorded_hub.names() == ["create_repo", "upload_folder", "upload_folder"]
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model_index.json").write_text("{}")
    (tmp_path / "final" / "checkpoint-2").mkdir()
    (tmp_path / "final" / "checkpoint-2" / "optimizer.bin").write_text("x")
    commit = publisher.finish(tmp_path / "final", "Final", ignore_patterns=["checkpoint-*", "checkpoint-*/**"])
    assert recorded_hub.names() == ["create_repo", "upload_folder", "upload_folder", "wait", "wait", "upload_folder"]
    uploads = recorded_hub.get("upload_folder")
    assert [u["commit_message"] for u in uploads] == ["Epoch 1", "Epoch 2", "Final"]
    assert [u["run_as_future"] for u in uploads] == [True, True, False]
    assert all(u["repo_id"] == "someone/digits-ddim" and u["token"] == "hf_test" for u in uploads)
    # each snapshot was intact when its upload ran, and removed after it
    assert uploads[0]["files"] == uploads[1]["files"] == ["model_index.json"] == uploads[2]["files"]
    assert not any(os.path.exists(folder) for folder in snapshots)
    assert str(commit) == "https://huggingface.co/someone/digits-ddim/commit/3"


# ----------------------------------------------------------------------------------------------------------------
# The trainer's Hub flow (`--push_to_hub`), in-process so that the recorded Hub stands in for the real one
# ----------------------------------------------------------------------------------------------------------------
SECRET = "hf_secret_marker"


def tiny_run_args(tmp_path, *extra):
    import numpy as np
    from PIL import Image

    data_dir = tmp_path / "images"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for index in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(data_dir / f"image_{index}.png")
    make_tiny_unet(channels=1, sample_size=8).save_config(tmp_path / "tiny_unet")
    return [
        "--output_dir", str(tmp_path / "run"), "--train_data_dir", str(data_dir), "--resolution", "8",
        "--model_config_name_or_path", str(tmp_path / "tiny_unet"), "--train_batch_size", "4", "--num_epochs", "3",
        "--lr_warmup_steps", "1", "--eval_inference_steps", "2", "--ddim_num_inference_steps", "2",
        "--num_eval_samples", "4", "--logger", "none", "--push_to_hub", "--hub_model_id", "me/tiny-ddim",
        "--hub_private_repo", "--hub_token", SECRET, *extra,
    ]  # fmt: skip


def test_trainer_creates_the_repo_first_uploads_each_export_in_the_background_and_waits_before_the_final_upload(
    tmp_path, recorded_hub, offline_hf_home
):
    from ddim_plus import train

    # 8 images in batches of 4: 2 steps an epoch; exports after epochs 0 and 1, the final pipeline after epoch 2
    train.main(tiny_run_args(tmp_path, "--save_model_epochs", "1", "--checkpointing_steps", "4"))
    assert recorded_hub.names() == ["create_repo", "upload_folder", "upload_folder", "wait", "wait", "upload_folder"]
    (create,) = recorded_hub.get("create_repo")
    assert create == dict(repo_id="me/tiny-ddim", private=True, token=SECRET, exist_ok=True, repo_type="model")
    epoch_1, epoch_2, final = recorded_hub.get("upload_folder")
    assert [epoch_1["commit_message"], epoch_2["commit_message"]] == ["Epoch 0", "Epoch 1"]
    assert [u["run_as_future"] for u in (epoch_1, epoch_2, final)] == [True, True, False]
    assert all(u["token"] == SECRET and u["repo_id"] == "me/tiny-ddim" for u in (epoch_1, epoch_2, final))
    # each export was intact when its upload ran, and is gone after it
    assert epoch_1["files"] == epoch_2["files"] == PIPELINE_FILES
    assert not os.path.exists(epoch_1["folder_path"]) and not os.path.exists(epoch_2["folder_path"])
    # the final upload: the output folder without checkpoints, logs or staging folders
    output_dir = tmp_path / "run"
    assert final["folder_path"] == str(output_dir) and (output_dir / "checkpoint-4").is_dir()
    # the final grid is uploaded; the grids drawn during training (samples/, here epoch 0's) are not
    assert (output_dir / "samples" / "epoch-0.png").is_file()
    assert final["files"] == sorted([*PIPELINE_FILES, "metrics.json", "samples_2steps.png"])
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.tags == TAGS and card.data.datasets is None  # local data: named in words only
    assert "a folder of 8 images" in card.text and "## Training configuration" in card.text
    assert [path for path in output_dir.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()] == []


def test_trainer_with_a_bad_token_stops_before_training(tmp_path, recorded_hub, offline_hf_home):
    from ddim_plus import train

    recorded_hub.create_repo_error = PermissionError("401 Client Error: Unauthorized")
    with pytest.raises(train.InputError, match=r"`--push_to_hub`: cannot create or use the Hub repo 'me/tiny-ddim'.*"
                       r"401.*`--hub_token`"):  # fmt: skip
        train.main(tiny_run_args(tmp_path))
    assert recorded_hub.names() == ["create_repo"]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# The card's install line and its advice for other diffusers schedulers, run as written
# ----------------------------------------------------------------------------------------------------------------
def test_the_cards_install_line_names_the_source_tree_and_says_the_package_is_not_on_pypi():
    tomllib = pytest.importorskip("tomllib")
    from conftest import REPO_ROOT

    text = make_model_card("me/m", DDIMSchedulerPlus().config).text
    assert "pip install ddim-plus" not in text  # no index serves that name
    assert f"Saved with ddim_plus {ddim_plus.__version__}. {NOT_ON_PYPI}:\n\n```bash\n{INSTALL_COMMAND}\n```" in text
    # the path stands for the source tree: the folder holding pyproject.toml, which names no repository to install
    # from (a `Source` or `Repository` URL there would have to become the card's install line)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert INSTALL_COMMAND.endswith("/path/to/ddim_plus") and project["name"] == "ddim-plus"
    assert not {"Source", "Repository", "Homepage"} & set(project.get("urls", {}))


def python_blocks(card_text, heading):
    body = card_text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("spacing", ["logsnr", "quadratic", "trailing"])
def test_the_cards_other_scheduler_snippet_runs_with_stock_dpm_solver(tmp_path, monkeypatch, spacing):
    """The how-to snippet, then the "Other diffusers schedulers" snippet, exactly as the card has them (the repo id
    pointed at the saved folder), with stock `DPMSolverMultistepScheduler`. What is checked is the schedulers' part,
    so the UNet's forward is a cheap linear stand-in: the snippets' 16-image batches stay fast."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel
    from diffusers.models.unets.unet_2d import UNet2DOutput

    monkeypatch.setattr(UNet2DModel, "forward", lambda self, sample, timestep, **kwargs: UNet2DOutput(0.1 * sample))

    folder = tmp_path / "tiny"
    DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus(timestep_spacing=spacing)).save_pretrained(
        folder
    )
    card = (folder / "README.md").read_text()
    (how_to,) = python_blocks(card, "## How to use")
    (other,) = python_blocks(card, "## Other diffusers schedulers")
    namespace = {}
    exec(how_to.replace('"tiny"', repr(str(folder))), namespace)
    config = namespace["pipeline"].scheduler.config
    if spacing in ("logsnr", "quadratic"):
        # what the card warns about: a stock scheduler raises on this spacing
        with pytest.raises(ValueError):
            DPMSolverMultistepScheduler.from_config(config).set_timesteps(20)
    exec(other, namespace)
    pipeline = namespace["pipeline"]
    assert type(pipeline.scheduler) is DPMSolverMultistepScheduler and len(namespace["images"]) == 16
    expected = DDIMSchedulerPlus(timestep_spacing=spacing)
    expected.set_timesteps(20)
    # DDIMPlusPipeline samples at the config's own timesteps (the stock spacing's for trailing)
    assert pipeline.scheduler.timesteps.tolist() == expected.timesteps.tolist()
    assert pipeline.scheduler.config.timestep_spacing == spacing


# ----------------------------------------------------------------------------------------------------------------
# A card edited on the Hub is kept: only the sections ddim_plus writes are replaced
# ----------------------------------------------------------------------------------------------------------------
EDITED_CARD = """---
license: mit
tags:
- my-tag
---

# My digits model

> **Load with `import ddim_plus` first** (an old note).
>
> Old second line.

Trained by me on my own digits.

## How to use

old instructions

## My notes

Keep this text.

## Results

| steps | FD |
|---|---|
| 10 | 9.9 |
"""


def test_push_to_hub_keeps_the_card_edited_on_the_hub(recorded_hub, offline_hf_home):
    recorded_hub.card_on_hub = EDITED_CARD
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus(timestep_spacing="logsnr"))
    pipe.push_to_hub("someone/tiny-ddim", token="hf_test")
    assert recorded_hub.card_reads == [
        dict(repo_id="someone/tiny-ddim", filename="README.md", repo_type="model", token="hf_test")
    ]
    (upload,) = recorded_hub.get("upload_folder")
    uploaded, ours = ModelCard(upload["card"]), pipe.model_card("someone/tiny-ddim")
    # theirs: title, description, their own section, a section ours does not write; in their order
    assert uploaded.text.startswith("\n# My digits model\n\n> **Load with `import ddim_plus` first**")
    assert "Trained by me on my own digits." in uploaded.text and "## My notes\n\nKeep this text." in uploaded.text
    assert "| 10 | 9.9 |" in uploaded.text
    # ours: the loading note, the how-to and the other-schedulers section, replaced or appended
    assert (
        "an old note" not in uploaded.text
        and "Old second line" not in uploaded.text
        and "old instructions" not in uploaded.text
    )
    our_note = ours.text.split("# someone/tiny-ddim\n\n", 1)[1].split("\n\nA DDIM pipeline")[0]
    assert our_note.startswith("> **Load with `import ddim_plus` first**") and our_note in uploaded.text
    for heading in ("## How to use", "## Other diffusers schedulers"):
        body = ours.text.split(heading + "\n", 1)[1].split("\n## ", 1)[0].strip()
        assert f"{heading}\n\n{body}\n" in uploaded.text
    headings = [line for line in uploaded.text.splitlines() if line.startswith("## ")]
    assert headings == ["## How to use", "## My notes", "## Results", "## Other diffusers schedulers"]
    # metadata: theirs kept, ours added where missing
    assert uploaded.data.license == "mit" and uploaded.data.tags == ["my-tag", *TAGS]
    assert uploaded.data.library_name == "diffusers" and uploaded.data.pipeline_tag == "unconditional-image-generation"


def test_merging_a_card_into_itself_changes_nothing_and_a_new_repo_gets_ours(recorded_hub, offline_hf_home):
    card = trainer_like_card().content
    assert merge_model_card(card, card) == card
    pipe = DDIMInversionPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus())
    pipe.push_to_hub("someone/tiny-inversion")  # no README.md on the Hub yet
    assert recorded_hub.get("upload_folder")[0]["card"] == pipe.model_card("someone/tiny-inversion").content


def test_trainer_results_replace_the_hubs_and_keep_its_metadata():
    merged = ModelCard(merge_model_card(EDITED_CARD, trainer_like_card().content))
    assert "| 10 | 9.9 |" not in merged.text and "| 50 | 256 | 0.9 | 1.25 |" in merged.text
    assert "## My notes\n\nKeep this text." in merged.text
    assert merged.data.license == "mit" and merged.data.datasets == ["ylecun/mnist"]
    assert {r.metric_value for r in merged.data.eval_results} == {0.875, 1.5, 0.9, 1.25}


def test_an_unreadable_hub_card_is_left_alone(recorded_hub, offline_hf_home, caplog):
    from huggingface_hub.utils import LocalEntryNotFoundError

    recorded_hub.card_read_error = LocalEntryNotFoundError("Connection error")
    DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus()).push_to_hub("someone/tiny-ddim")
    (upload,) = recorded_hub.get("upload_folder")
    assert upload["files"] == [name for name in PIPELINE_FILES if name != "README.md"] and "card" not in upload
    assert "Could not read the model card of someone/tiny-ddim" in caplog.text


def test_publisher_snapshots_keep_the_card_edited_on_the_hub(recorded_hub):
    from ddim_plus.hub import HubPublisher

    recorded_hub.card_on_hub = EDITED_CARD
    publisher = HubPublisher("me/digits-ddim")
    publisher.upload_snapshot(lambda folder: trainer_like_card().save(os.path.join(folder, "README.md")), "Epoch 1")
    publisher.wait()
    card = recorded_hub.get("upload_folder")[0]["card"]
    assert "## My notes\n\nKeep this text." in card and "| 50 | 256 | 0.9 | 1.25 |" in card
