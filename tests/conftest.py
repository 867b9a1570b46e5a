"""Shared fixtures: tiny models so the whole suite runs in minutes on 2 CPU cores."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
