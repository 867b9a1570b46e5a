"""`DDIMSchedulerPlus` inside diffusers' own Stable Diffusion pipelines (text-to-image, img2img, inpainting), built
from tiny random components created here (no download). img2img and inpainting with strength < 1 slice
`scheduler.timesteps[t_start:]` and call `set_begin_index(t_start)`: the loop starts mid-schedule.

References: with order 1 and leading or trailing spacing (S dividing T, so that stock's previous step t - T // S is
right), stock `DDIMScheduler` with the same config and generator; with `ddim_solver_order=2`, diffusers'
`DPMSolverMultistepScheduler` (DPM-Solver++(2M)) on the same timesteps.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ddim_plus import DDIMSchedulerPlus

SIZE = 16  # pixels; the 2-level VAE makes 8x8 latents
PROMPT_LENGTH = 8
# Stable Diffusion's scheduler config (steps_offset=1 and clip_sample=False, as its pipelines require)
SD_CONFIG = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
PIPELINES = {
    "text2img": (StableDiffusionPipeline, {}),
    "img2img": (StableDiffusionImg2ImgPipeline, dict(strength=0.5)),
    "inpaint": (StableDiffusionInpaintPipeline, dict(strength=0.75)),
}


def _write_tiny_clip_vocab(folder):
    """A character-level CLIP BPE vocabulary (no merges): enough for the tokenizer to run offline."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tensors of a few hundred elements: a second thread only adds synchronisation (5x slower on a busy box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab_size = _write_tiny_clip_vocab(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
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
        sample_size=SIZE,
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
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=PROMPT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=PROMPT_LENGTH)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer)


def _images():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2 :] = 255  # repaint the right half
    return image, Image.fromarray(mask)


def _generate(components, pipeline, scheduler, eta=0.0, **call_kwargs):
    cls, pipeline_kwargs = PIPELINES[pipeline]
    pipe = cls(
        **components, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image, mask = _images()
    inputs = (
        {"image": image}
        if pipeline == "img2img"
        else {"image": image, "mask_image": mask}
        if pipeline == "inpaint"
        else {}
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(
            "a cat",
            height=SIZE,
            width=SIZE,
            eta=eta,
            generator=generator,
            output_type="np",
            **inputs,
            **pipeline_kwargs,
            **call_kwargs,
        ).images


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_order_one_equals_stock_ddim_in_diffusers_pipelines(components, pipeline, spacing, eta):
    config = dict(SD_CONFIG, timestep_spacing=spacing)
    ours = _generate(components, pipeline, DDIMSchedulerPlus(**config), eta=eta, num_inference_steps=4)
    stock = _generate(components, pipeline, DDIMScheduler(**config), eta=eta, num_inference_steps=4)
    assert ours.shape == (1, SIZE, SIZE, 3) and np.isfinite(ours).all()
    # stock keeps abar in float32, ours in float64: measured differences <= 1e-6
    np.testing.assert_allclose(ours, stock, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_order_two_equals_dpm_solver_pp_2m_in_diffusers_pipelines(components, pipeline):
    # 15 steps: img2img (strength 0.5) starts at index 8, inpainting (0.75) at index 4, with a first-order step,
    # then second order up to the last step, which is first order. (Below 15 steps ours also keeps the
    # second-to-last step first order, where diffusers' DPM-Solver++(2M) does not; see docs/scheduler.md.)
    ours = DDIMSchedulerPlus(**SD_CONFIG, timestep_spacing="trailing", ddim_solver_order=2)
    ours.set_timesteps(15)
    timesteps = ours.timesteps.tolist()
    # switched the usual way, from our config: it keeps its own solver_order (2) and our betas
    theirs = DPMSolverMultistepScheduler.from_config(
        ours.config, algorithm_type="dpmsolver++", final_sigmas_type="sigma_min"
    )
    assert theirs.config.solver_order == 2 and torch.equal(theirs.betas, ours.betas)
    expected = _generate(components, pipeline, theirs, timesteps=timesteps)
    got = _generate(components, pipeline, ours, timesteps=timesteps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # and order 2 is not order 1 here
    first_order = DDIMSchedulerPlus(**SD_CONFIG, timestep_spacing="trailing")
    assert np.abs(got - _generate(components, pipeline, first_order, timesteps=timesteps)).max() > 1e-4
