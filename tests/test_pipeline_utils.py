"""Saving and loading (folder, Hub cache, stock diffusers, DDPM checkpoints) of both pipelines (uploads: test_hub)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import diffusers
import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline
from diffusers.utils.testing_utils import CaptureLogger
from packaging import version

from ddim_plus import DDIMInversionPipeline, DDIMPlusPipeline, DDIMSchedulerPlus

STEPS = 4
# A scheduler config that differs from the defaults in keys stock diffusers knows and in keys only we know.
SCHEDULER_CONFIG = dict(beta_end=0.03, clip_sample=False, sigma_type="sigma_hat", ddim_solver_order=1)


def saved_pipeline(folder, cls=DDIMPlusPipeline):
    pipe = cls(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus(**SCHEDULER_CONFIG))
    pipe.save_pretrained(folder)
    return pipe


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    # Explicit, so stock DDIMPipeline and ours sample alike: ours re-derives eps from a clipped x_0 by default.
    return pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=STEPS,
        output_type="np",
        use_clipped_model_output=True,
    )


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def test_save_pretrained_writes_safetensors_and_a_portable_model_index(tmp_path):
    saved_pipeline(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPlusPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    scheduler_config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "DDIMSchedulerPlus"
    assert scheduler_config["sigma_type"] == "sigma_hat"
    card = (tmp_path / "README.md").read_text()
    assert "library_name: diffusers" in card and "import ddim_plus" in card


@pytest.mark.parametrize("cls", [DDIMPlusPipeline, DDIMInversionPipeline])
def test_diffusion_pipeline_from_pretrained_returns_our_class(tmp_path, cls):
    original = saved_pipeline(tmp_path, cls)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert type(loaded.scheduler) is DDIMSchedulerPlus
    for key, value in SCHEDULER_CONFIG.items():
        assert loaded.scheduler.config[key] == value
    assert_same_weights(loaded.unet, original.unet)
    assert type(cls.from_pretrained(tmp_path)) is cls


def test_reloaded_pipeline_generates_the_same_images(tmp_path):
    original = saved_pipeline(tmp_path)
    original.scheduler = DDIMSchedulerPlus(beta_end=0.03)  # deterministic sampling for the comparison
    original.save_pretrained(tmp_path / "deterministic")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "deterministic")
    np.testing.assert_array_equal(generate(loaded).images, generate(original).images)


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch, diffusers

    out, sources = sys.argv[1], sys.argv[2:]


    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipe(
            batch_size=2, generator=generator, num_inference_steps=4, output_type="np", use_clipped_model_output=True
        ).images


    # a user without our package: stock DDIMPipeline loads every source; the generic loader cannot know our class
    for k, source in enumerate(sources):
        stock = diffusers.DDIMPipeline.from_pretrained(source)
        assert type(stock.scheduler).__name__ == "DDIMScheduler", type(stock.scheduler)
        np.save(f"{out}{k}_stock.npy", images(stock))
        try:
            diffusers.DiffusionPipeline.from_pretrained(source)
            raise SystemExit("DiffusionPipeline loaded a DDIMPlusPipeline without ddim_plus imported")
        except AttributeError as error:
            print(f"AttributeError: {error}")
    assert "ddim_plus" not in sys.modules

    import ddim_plus

    for k, source in enumerate(sources):
        pipe = diffusers.DiffusionPipeline.from_pretrained(source)
        print(type(pipe).__name__, type(pipe.scheduler).__name__, pipe.scheduler.config.beta_end)
        np.save(f"{out}{k}_ours.npy", images(pipe))
    """
)


def test_folder_and_hub_cache_load_offline_in_stock_diffusers_and_in_ours(tmp_path, offline_hf_home):
    """One fresh interpreter (HF_HUB_OFFLINE=1, a private HF_HOME) loads a folder and a repo id from the Hub cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hf_home / "hub" / "models--ddim-plus-tests--tiny-ddim"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for folder in (tmp_path / "pipe", repo / "snapshots" / commit):
        DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus(beta_end=0.03)).save_pretrained(folder)

    out = tmp_path / "images"
    command = [sys.executable, "-c", LOAD_SCRIPT, str(out), str(tmp_path / "pipe"), "ddim-plus-tests/tiny-ddim"]
    result = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()
    assert printed[2:] == ["DDIMPlusPipeline DDIMSchedulerPlus 0.03"] * 2
    # the model card's first lines quote the error diffusers raises without `import ddim_plus` ...
    first_lines = (tmp_path / "pipe" / "README.md").read_text().split("## How to use")[0]
    assert printed[0] == printed[1] and f"fails with `{printed[0]}`" in first_lines
    # ... and the warning that is stock DDIMPipeline's only sign of dropping our scheduler settings
    assert "config attributes" in result.stderr and "will be ignored" in result.stderr
    assert "'ddim_solver_order'" in result.stderr and '"config attributes ... will be ignored" warning' in first_lines
    for k in range(2):
        # leading spacing, eta = 0: stock DDIMScheduler and DDIMSchedulerPlus give the same images
        np.testing.assert_allclose(np.load(f"{out}{k}_ours.npy"), np.load(f"{out}{k}_stock.npy"), atol=1e-4)


@pytest.mark.parametrize("stock_cls, stock_scheduler", [(DDPMPipeline, DDPMScheduler), (DDIMPipeline, DDIMScheduler)])
def test_stock_checkpoints_load_as_ddim_plus(tmp_path, stock_cls, stock_scheduler):
    unet = make_tiny_unet(channels=1)
    stock_cls(unet=unet, scheduler=stock_scheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(tmp_path)
    ours = DDIMPlusPipeline.from_pretrained(tmp_path)
    assert type(ours.scheduler) is DDIMSchedulerPlus
    assert ours.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(
        ours.scheduler.alphas_cumprod.float(), stock_scheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    )
    assert_same_weights(ours.unet, unet)
    # DDIM reuses the DDPM checkpoint: the same images as stock DDIMPipeline on the same folder
    stock_ddim = DDIMPipeline.from_pretrained(tmp_path)
    np.testing.assert_allclose(generate(ours).images, generate(stock_ddim).images, atol=1e-4)
    assert type(DDIMInversionPipeline.from_pretrained(tmp_path).scheduler) is DDIMSchedulerPlus


def test_folder_that_is_not_a_pipeline_gets_diffusers_error(tmp_path):
    for cls in (DDIMPlusPipeline, DDIMInversionPipeline, DiffusionPipeline):
        with pytest.raises(OSError, match="model_index.json"):
            cls.from_pretrained(tmp_path)


def test_missing_weights_file_gets_diffusers_error(tmp_path):
    saved_pipeline(tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        DDIMPlusPipeline.from_pretrained(tmp_path)


# The checks diffusers' PipelineTesterMixin runs on every pipeline (its DDIMPipeline included), on ours.
def test_save_load_local_with_pickled_weights(tmp_path, caplog):
    """diffusers' test_save_load_local: `safe_serialization=False`, every component named in the load log."""
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus(beta_end=0.03))
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    diffusers_logger = diffusers.utils.logging.get_logger("diffusers.pipelines.pipeline_utils")
    diffusers_logger.setLevel(diffusers.utils.logging.INFO)
    try:
        with CaptureLogger(diffusers_logger) as captured, caplog.at_level(logging.INFO):
            loaded = DDIMPlusPipeline.from_pretrained(tmp_path)
    finally:
        diffusers_logger.setLevel(diffusers.utils.logging.WARNING)
    for name in loaded.components:
        assert name in captured.out
    # ours: which weights file was read
    assert f"Loaded the UNet weights from {tmp_path / 'unet' / 'diffusion_pytorch_model.bin'}" in caplog.text
    assert type(loaded.scheduler) is DDIMSchedulerPlus
    np.testing.assert_allclose(generate(loaded).images, generate(pipe).images, atol=5e-4)


def test_save_load_float16(tmp_path):
    """diffusers' test_save_load_float16: half-precision components come back in half precision."""
    pipe = DDIMPlusPipeline(unet=make_tiny_unet().half(), scheduler=DDIMSchedulerPlus(beta_end=0.03))
    pipe.save_pretrained(tmp_path)
    loaded = DDIMPlusPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    assert_same_weights(loaded.unet, pipe.unet)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_loading_with_variants(tmp_path, safe_serialization):
    """diffusers' test_serialization_with_variants and test_loading_with_variants."""
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus())
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=safe_serialization)
    extension = "safetensors" if safe_serialization else "bin"
    assert sorted(os.listdir(tmp_path / "unet")) == ["config.json", f"diffusion_pytorch_model.fp16.{extension}"]
    assert_same_weights(DDIMPlusPipeline.from_pretrained(tmp_path, variant="fp16").unet, pipe.unet)


def test_loading_with_incorrect_variants_raises_diffusers_error(tmp_path):
    """diffusers' test_loading_with_incorrect_variants_raises_error, word for word in its message."""
    DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus()).save_pretrained(
        tmp_path, safe_serialization=False
    )
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        DDIMPlusPipeline.from_pretrained(tmp_path, variant="fp16")


def test_torch_dtype_dict(tmp_path):
    """diffusers' test_torch_dtype_dict: a dtype per component, with a `default`."""
    DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus()).save_pretrained(
        tmp_path, safe_serialization=False
    )
    loaded = DDIMPlusPipeline.from_pretrained(tmp_path, torch_dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert loaded.unet.dtype == torch.bfloat16
    assert (
        DDIMPlusPipeline.from_pretrained(tmp_path, torch_dtype={"default": torch.float16}).unet.dtype == torch.float16
    )


@pytest.mark.skipif(
    version.parse(diffusers.__version__) < version.parse("0.40"), reason="diffusers < 0.40 has no `dtype` alias"
)
def test_dtype_alias(tmp_path):
    """`dtype=` is diffusers' alias of `torch_dtype=` (a dtype or a dict)."""
    saved_pipeline(tmp_path)
    assert DDIMPlusPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    assert DiffusionPipeline.from_pretrained(tmp_path, dtype={"unet": torch.float16}).unet.dtype == torch.float16


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"

    class RunsCodeWhenUnpickled:
        def __reduce__(self):  # unpickling calls open(marker, "w"): creating the file proves the code ran
            return (open, (str(marker), "w"))

    saved_pipeline(tmp_path / "pipe")
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": RunsCodeWhenUnpickled()}, tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.bin")
    for cls in (DDIMPlusPipeline, DiffusionPipeline):
        with pytest.raises(OSError, match="Unable to load weights"):
            cls.from_pretrained(tmp_path / "pipe")
    assert not marker.exists()
