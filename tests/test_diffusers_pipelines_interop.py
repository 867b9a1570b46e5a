"""`DDIMSchedulerPlus` inside diffusers' own Stable Diffusion pipelines (text-to-image, img2img, inpainting), built
from tiny random components created here (no download). img2img and inpainting with strength < 1 slice
`scheduler.timesteps[t_start:]` and call `set_begin_index(t_start)`: the loop starts mid-schedule.

References: with order 1 and leading or trailing spacing (S dividing T, so that stock's previous step t - T // S is
right), stock `DDIMScheduler` with the same config and generator; with `ddim_solver_order=2`, diffusers'
`DPMSolverMultistepScheduler` (DPM-Solver++(2M)) on the same timesteps.
"""

import numpy as np
import pytest
import torch
from conftest import STABLE_DIFFUSION_SCHEDULER_CONFIG, make_tiny_stable_diffusion_components
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from ddim_plus import DDIMSchedulerPlus

SIZE = 16  # pixels; the 2-level VAE makes 8x8 latents
PROMPT_LENGTH = 8
SD_CONFIG = STABLE_DIFFUSION_SCHEDULER_CONFIG
PIPELINES = {
    "text2img": (StableDiffusionPipeline, {}),
    "img2img": (StableDiffusionImg2ImgPipeline, dict(strength=0.5)),
    "inpaint": (StableDiffusionInpaintPipeline, dict(strength=0.75)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tensors of a few hundred elements: a second thread only adds synchronisation, which costs most on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return make_tiny_stable_diffusion_components(tmp_path_factory.mktemp("tokenizer"), SIZE, PROMPT_LENGTH)


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
    # stock keeps abar in float32, ours in float64: the outputs differ by float32 rounding only
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
