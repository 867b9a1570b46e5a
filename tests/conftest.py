"""Shared fixtures: tiny models so the whole suite runs in minutes on 2 CPU cores."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: README.md, docs/, training/

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A custom schedule with an uneven gap, a gap of 1 and no t = 0, for the schedulers' `timesteps=` argument.
CUSTOM_TIMESTEPS = [999, 874, 601, 600, 333, 120, 47, 3]


def seeded_generators(*seeds: int) -> list:
    """One CPU generator per image, seeded as given: image i of a pipeline call then depends on `seeds[i]` only."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def launch_command(module: str, argv, num_processes: int = 1, port: int = 29500) -> list:
    """`python -m module ARGV`, or the same under `accelerate launch` with `num_processes` CPU processes (gloo)."""
    if num_processes == 1:
        return [sys.executable, "-m", module, *argv]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", module, *argv,
    ]  # fmt: skip


def make_tiny_unet(channels: int = 3, sample_size: int = 8, seed: int = 0):
    """A 2-level UNet2DModel with random weights (a few thousand parameters)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def count_unet_calls(pipe):
    """A list that grows by one at every forward call of `pipe.unet`."""
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def offline_hf_home(tmp_path, monkeypatch):
    """A private, empty Hugging Face cache with the Hub switched off."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


# Stable Diffusion's scheduler settings (steps_offset=1 and clip_sample=False, as its pipelines require)
STABLE_DIFFUSION_SCHEDULER_CONFIG = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def save_tiny_pipeline(folder, channels: int = 1) -> str:
    """A `DDIMPlusPipeline` with a tiny random 8x8 UNet saved into `folder`; returns the folder as a string."""
    from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus

    DDIMPlusPipeline(
        unet=make_tiny_unet(channels=channels, sample_size=8), scheduler=DDIMSchedulerPlus()
    ).save_pretrained(folder)
    return str(folder)


def make_tiny_stable_diffusion_components(tokenizer_folder, image_size: int = 16, prompt_length: int = 16) -> dict:
    """The `unet`, `vae`, `text_encoder` and `tokenizer` of a Stable-Diffusion-style pipeline, tiny and random, built
    offline: the CLIP tokenizer reads a character-level vocabulary (no merges) written into `tokenizer_folder`."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    (tokenizer_folder / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,  # the 2-level VAE halves the side
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=prompt_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    tokenizer = CLIPTokenizer(
        str(tokenizer_folder / "vocab.json"), str(tokenizer_folder / "merges.txt"), model_max_length=prompt_length
    )
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer)


class RecordedHub:
    """The Hub calls of `ddim_plus.hub`, recorded instead of made (nothing in the tests may reach the network).

    `calls` holds `(name, arguments)` in call order: `create_repo`, `upload_folder` (its `files` are those the Hub
    client would send, after `ignore_patterns`, listed when the upload runs) and `wait` (a background upload waited
    for). An upload with `run_as_future=True` returns a `Future` that runs only when `result()` is called, so a test
    sees exactly when its caller waits, and that the folder was still intact then. Set `create_repo_error` to an
    exception to make `create_repo` fail as with a bad token.

    The repo's README.md on the Hub is `card_on_hub` (`None`: the repo has none); `hf_hub_download` records each
    read in `card_reads` and raises `card_read_error` when set. Each upload records the README.md it sends as `card`.
    """

    def __init__(self):
        self.calls = []
        self.create_repo_error = None
        self.card_on_hub = None
        self.card_read_error = None
        self.card_reads = []

    def hf_hub_download(self, repo_id, filename, repo_type=None, token=None, **kwargs):
        import tempfile

        from huggingface_hub.utils import EntryNotFoundError

        self.card_reads.append(dict(repo_id=repo_id, filename=filename, repo_type=repo_type, token=token))
        if self.card_read_error is not None:
            raise self.card_read_error
        if self.card_on_hub is None:
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        path = os.path.join(tempfile.mkdtemp(prefix="recorded-hub-"), filename)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.card_on_hub)
        return path

    def names(self):
        return [name for name, _ in self.calls]

    def get(self, name):
        return [arguments for call, arguments in self.calls if call == name]

    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, repo_type=None, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(
            (
                "create_repo",
                dict(repo_id=repo_id, private=private, token=token, exist_ok=exist_ok, repo_type=repo_type),
            )
        )
        if self.create_repo_error is not None:
            raise self.create_repo_error
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'someone/' + repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, ignore_patterns=None, run_as_future=False,
                      **kwargs):  # fmt: skip
        from concurrent.futures import Future

        from huggingface_hub import CommitInfo
        from huggingface_hub.utils import filter_repo_objects

        arguments = dict(kwargs, repo_id=repo_id, folder_path=folder_path, commit_message=commit_message)
        arguments.update(ignore_patterns=ignore_patterns, run_as_future=run_as_future)
        self.calls.append(("upload_folder", arguments))

        def upload():
            names = [
                os.path.relpath(os.path.join(root, name), folder_path).replace(os.sep, "/")
                for root, _, files in os.walk(folder_path)
                for name in files
            ]
            arguments["files"] = sorted(filter_repo_objects(names, ignore_patterns=ignore_patterns))
            card_path = os.path.join(folder_path, "README.md")
            if "README.md" in arguments["files"]:
                with open(card_path, encoding="utf-8") as handle:
                    arguments["card"] = handle.read()
            number = len(self.get("upload_folder"))
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{number}",
                commit_message=commit_message,
                commit_description="",
                oid=str(number),
            )

        if not run_as_future:
            return upload()
        hub = self

        class DeferredUpload(Future):
            def result(self, timeout=None):
                if not self.done():
                    hub.calls.append(("wait", {"commit_message": commit_message}))
                    self.set_result(upload())
                return super().result(timeout)

        return DeferredUpload()


@pytest.fixture
def recorded_hub(monkeypatch):
    """A `RecordedHub` standing in for huggingface_hub's `create_repo`, `upload_folder` and `hf_hub_download` in
    `ddim_plus.hub`."""
    import ddim_plus.hub

    hub = RecordedHub()
    monkeypatch.setattr(ddim_plus.hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(ddim_plus.hub, "upload_folder", hub.upload_folder)
    monkeypatch.setattr(ddim_plus.hub, "hf_hub_download", hub.hf_hub_download)
    return hub
