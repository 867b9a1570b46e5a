"""ddim_plus.model_card and Hub publishing (offline: the Hub calls are recorded, not made)."""

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from ddim_plus.model_card import make_model_card
from ddim_plus.training.checkpoints import HUB_IGNORE_PATTERNS, push_to_hub


def test_card_metadata_and_sections(tmp_path):
    card = make_model_card(
        "me/digits-ddim",
        "ylecun/mnist",
        {"learning_rate": 0.001, "resolution": 16},
        sample_images=["samples_10steps.png", "samples_50steps.png"],
        metrics=[
            {"DDIM steps": 10, "recognisable fraction": 0.875},
            {"DDIM steps": 50, "recognisable fraction": 0.9},
        ],
        metrics_description="Measured on 256 samples.",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "diffusers"
    assert loaded.data.pipeline_tag == "unconditional-image-generation"
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.datasets == ["ylecun/mnist"]
    assert loaded.data.tags == ["ddim", "ddim-plus", "diffusers", "unconditional-image-generation"]
    text = loaded.text
    assert "import ddim_plus" in text and 'DiffusionPipeline.from_pretrained("me/digits-ddim")' in text
    assert text.index("import ddim_plus") < text.index("DiffusionPipeline.from_pretrained")
    assert "![samples_10steps](samples_10steps.png)" in text and "![samples_50steps](samples_50steps.png)" in text
    assert "trained on `ylecun/mnist` with ddim_plus" in text
    assert "| DDIM steps | recognisable fraction |" in text and "| 50 | 0.9 |" in text
    assert "Measured on 256 samples." in text
    assert "| learning_rate | 0.001 |" in text


def test_card_names_local_data_only_in_words(tmp_path):
    """`datasets:` holds Hub ids only: the Hub links each one, and a local path would be a broken link (and leak)."""
    with pytest.raises(ValueError, match="is a local path, not a Hub dataset id"):
        make_model_card("local-model", str(tmp_path), {"seed": 0})
    card = make_model_card("local-model", None, {"seed": 0}, dataset_description="a folder of 6 images")
    assert card.data.datasets is None
    assert "trained on a folder of 6 images with ddim_plus" in card.text


def test_card_without_metrics_or_dataset():
    card = make_model_card("local-model", None, {"seed": 0}, extra_tags=["digits", "ddim"])
    assert "## Results" not in card.text
    assert "## Samples" in card.text  # the default grid
    assert "## Samples" not in make_model_card("local-model", None, {"seed": 0}, sample_images=[]).text
    assert card.data.datasets is None
    assert card.data.tags == ["ddim", "ddim-plus", "diffusers", "unconditional-image-generation", "digits"]


@pytest.fixture
def recorded_hub(monkeypatch):
    calls = {}

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = dict(kwargs, repo_id=repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id.split('/')[-1]}")

    def fake_upload_folder(**kwargs):
        calls["upload_folder"] = kwargs

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    return calls


def test_push_uploads_the_pipeline_without_checkpoints_or_logs(tmp_path, recorded_hub):
    published = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "samples.png",
        "samples_10steps.png",
        "README.md",
        "metrics.json",
    ]
    private = [
        "checkpoint-500/unet/config.json",
        "checkpoint-500/optimizer.bin",
        "logs/ddim_plus/events.out.tfevents.1",
        ".staging-checkpoint-1000/random_states_0.pkl",
        "process-0.debug.jsonl",
    ]
    for name in published + private:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")

    repo_id = push_to_hub(str(tmp_path), "digits-ddim", private=True, token="hf_test")

    assert repo_id == "someone/digits-ddim"
    create = recorded_hub["create_repo"]
    assert create["repo_id"] == "digits-ddim" and create["private"] is True and create["token"] == "hf_test"
    upload = recorded_hub["upload_folder"]
    assert upload["repo_id"] == "someone/digits-ddim" and upload["folder_path"] == str(tmp_path)
    assert list(upload["ignore_patterns"]) == list(HUB_IGNORE_PATTERNS)
    # What upload_folder would send: every file, filtered by the same rules the Hub client applies.
    all_files = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(all_files, ignore_patterns=upload["ignore_patterns"]))
    assert uploaded == set(published)


def test_push_is_public_unless_asked(tmp_path, recorded_hub):
    (tmp_path / "model_index.json").write_text("{}")
    push_to_hub(str(tmp_path), "me/public-model")
    assert recorded_hub["create_repo"]["private"] is False
