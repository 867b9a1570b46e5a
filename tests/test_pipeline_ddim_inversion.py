"""DDIMInversionPipeline: accuracy on an exact denoiser, input formats, interpolation, sharing weights, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import count_unet_calls, make_tiny_unet
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

import ddim_plus
from ddim_plus import DDIMInversionPipeline, DDIMPlusPipeline, DDIMSchedulerPlus, InversionRefinement


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """The exact eps-prediction for data x_0 ~ N(mean, std^2 I): E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar)
    mean) / (abar std^2 + 1 - abar). Its probability-flow ODE is the one DDIM discretises, with no training error."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, out_channels: int = 1, std: float = 0.2):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("mean", torch.rand(1, in_channels, sample_size, sample_size, generator=generator) - 0.5)
        self.register_buffer("alphas_cumprod", DDIMSchedulerPlus().alphas_cumprod.float())
        self.gain = torch.nn.Parameter(torch.ones(()))  # gives the model a dtype and a device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> UNet2DOutput:
        abar = self.alphas_cumprod[timestep]
        eps = (1 - abar).sqrt() * (sample - abar.sqrt() * self.mean) / (abar * self.config.std**2 + 1 - abar)
        return UNet2DOutput(sample=self.gain * eps)


def gaussian_setup(batch=8):
    denoiser = GaussianDenoiser()
    pipe = DDIMInversionPipeline(unet=denoiser, scheduler=DDIMSchedulerPlus())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    images = ((denoiser.mean + 0.2 * noise) / 2 + 0.5).clamp(0, 1)
    return pipe, images


def make_pipe(channels=3):
    pipe = DDIMInversionPipeline(unet=make_tiny_unet(channels=channels), scheduler=DDIMSchedulerPlus())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reconstruction_mse(pipe, images, steps, refine):
    out = pipe(images, num_inference_steps=steps, refine=refine, return_reconstruction=True, output_type="pt")
    return float(((out.images - images) ** 2).mean())


def test_refinement_beats_plain_inversion_on_an_exact_denoiser():
    pipe, images = gaussian_setup()
    errors = {
        s: (reconstruction_mse(pipe, images, s, False), reconstruction_mse(pipe, images, s, True)) for s in (2, 5, 20)
    }
    plain_20, refined_20 = errors[20]
    assert refined_20 * 5 <= plain_20
    assert refined_20 < 1e-5 < plain_20
    for steps, (plain, refined) in errors.items():
        assert refined <= plain, f"refined inversion worse than plain at {steps} steps: {refined} > {plain}"


def test_latents_decode_to_the_images_with_the_generation_pipeline():
    pipe, images = gaussian_setup()
    latents = pipe(images, num_inference_steps=20).latents
    # the same ODE run by the generation pipeline over the same components, with clipping off
    generator_pipe = DDIMPlusPipeline(unet=pipe.unet, scheduler=pipe.inversion_scheduler())
    generator_pipe.set_progress_bar_config(disable=True)
    decoded = generator_pipe(batch_size=len(images), latents=latents, num_inference_steps=20, output_type="pt").images
    torch.testing.assert_close(decoded, images, atol=2e-3, rtol=0)


def test_inversion_leaves_the_pipeline_scheduler_alone():
    pipe, images = gaussian_setup(batch=2)
    pipe.scheduler.set_timesteps(3)
    out = pipe(images, num_inference_steps=10, return_reconstruction=True, output_type="pt")
    assert pipe.scheduler.config.clip_sample is True
    assert pipe.scheduler.timesteps.tolist() == [666, 333, 0]
    assert out.latents.shape == images.shape


def test_every_image_format_gives_the_same_latents():
    pipe = make_pipe()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = (images * 255).round() / 255  # exactly representable in uint8 PIL images
    array = images.permute(0, 2, 3, 1).numpy()
    pil = [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    kwargs = dict(num_inference_steps=3, refine=InversionRefinement(iterations=2))
    expected = pipe(images, **kwargs).latents
    for form in (pil, array, list(array), list(images)):
        torch.testing.assert_close(pipe(form, **kwargs).latents, expected)
    torch.testing.assert_close(pipe(pil[1], **kwargs).latents, expected[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe(array[1], **kwargs).latents, expected[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe(images[1], **kwargs).latents, expected[1:], atol=1e-5, rtol=1e-5)


def test_grayscale_pil_round_trip_and_output_types():
    pipe = make_pipe(channels=1)
    pil = [PIL.Image.fromarray(np.full((8, 8), 40 * i + 60, dtype=np.uint8), mode="L") for i in range(3)]
    out = pipe(pil, num_inference_steps=3, return_reconstruction=True)
    assert out.latents.shape == (3, 1, 8, 8)
    assert [(im.mode, im.size) for im in out.images] == [("L", (8, 8))] * 3
    latents, arr = pipe(pil, num_inference_steps=3, return_reconstruction=True, output_type="np", return_dict=False)
    assert arr.shape == (3, 8, 8, 1)
    assert pipe(pil, num_inference_steps=3).images is None


def test_batch_members_are_refined_independently():
    pipe, images = gaussian_setup(batch=3)
    together = pipe(images, num_inference_steps=5).latents
    for i in range(3):
        alone = pipe(images[i : i + 1], num_inference_steps=5).latents
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-5, rtol=1e-5)


def test_refinement_spends_exactly_the_iteration_budget_without_tolerance():
    pipe, images = gaussian_setup(batch=2)
    calls = count_unet_calls(pipe)
    pipe(images, num_inference_steps=4, refine=False)
    assert len(calls) == 4
    calls.clear()
    pipe(images, num_inference_steps=4, refine=InversionRefinement(iterations=3, tolerance=0.0))
    assert len(calls) == 4 * (1 + 3)


def test_interpolation_ends_reproduce_the_reconstructions():
    pipe, images = gaussian_setup(batch=2)
    out = pipe(images, num_inference_steps=10, return_reconstruction=True, output_type="pt")
    frames = pipe.interpolate(out.latents[0], out.latents[1], num_frames=5, num_inference_steps=10, output_type="pt")
    assert frames.images.shape == (5, 1, 8, 8)
    torch.testing.assert_close(frames.images[0], out.images[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(frames.images[-1], out.images[1], atol=1e-5, rtol=0)
    # batched pairs come back pair-major
    (batched,) = pipe.interpolate(
        out.latents, out.latents.flip(0), num_frames=3, num_inference_steps=10, output_type="pt", return_dict=False
    )
    assert batched.shape == (6, 1, 8, 8)
    torch.testing.assert_close(batched[0], out.images[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[2], out.images[1], atol=1e-5, rtol=0)
    # the middle frame decodes slerp(a, b, 1/2)
    middle = ddim_plus.slerp(out.latents[:1], out.latents[1:], 0.5)
    (decoded,) = pipe.interpolate(
        middle, middle, num_frames=2, num_inference_steps=10, output_type="pt", return_dict=False
    )
    torch.testing.assert_close(batched[1], decoded[0], atol=1e-5, rtol=0)


def test_slerp_is_the_paper_function():
    assert ddim_plus.slerp is ddim_plus.ddim_math.slerp


def test_built_from_the_generation_pipeline_shares_weights():
    generation = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=DDIMSchedulerPlus(clip_sample=False))
    for inversion in (DDIMInversionPipeline(**generation.components), DDIMInversionPipeline.from_pipe(generation)):
        assert isinstance(inversion, DDIMInversionPipeline)
        assert inversion.unet is generation.unet and inversion.scheduler is generation.scheduler
        pointers = [p.data_ptr() for p in generation.unet.parameters()]
        assert [p.data_ptr() for p in inversion.unet.parameters()] == pointers
    back = DDIMPlusPipeline.from_pipe(inversion)
    assert isinstance(back, DDIMPlusPipeline) and back.unet is generation.unet


@pytest.mark.parametrize(
    "image, argument",
    [
        (torch.rand(1, 3, 8, 6), "image"),  # wrong size
        (torch.rand(2, 1, 8, 8), "image"),  # wrong channels
        (PIL.Image.new("L", (8, 8)), "image"),  # grayscale PIL for an RGB UNet
        (PIL.Image.new("RGB", (16, 16)), "image"),
        (torch.full((1, 3, 8, 8), 1.5), "image"),  # outside [0, 1]
        (torch.full((1, 3, 8, 8), -0.1), "image"),
        (torch.full((1, 3, 8, 8), float("nan")), "image"),
        (torch.full((1, 3, 8, 8), float("inf")), "image"),
        (np.zeros((1, 8, 8, 3), dtype=np.uint8), "image"),  # uint8 instead of float in [0, 1]
        (torch.zeros(1, 3, 8, 8, dtype=torch.long), "image"),
        (torch.zeros(0, 3, 8, 8), "image"),  # empty batch
        ([], "image"),
        ([torch.rand(3, 8, 8), np.random.rand(8, 8, 3)], "image"),  # mixed kinds
        ("cat.png", "image"),
    ],
)
def test_bad_images_raise_before_any_work(image, argument):
    pipe = make_pipe()
    calls = count_unet_calls(pipe)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe(image, num_inference_steps=3)
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1001), "num_inference_steps"),
        (dict(timesteps=[3, 3]), "timesteps"),
        (dict(refine="always"), "refine"),
        (dict(output_type="gif"), "output_type"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, argument):
    pipe = make_pipe()
    calls = count_unet_calls(pipe)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe(torch.rand(1, 3, 8, 8), **{"num_inference_steps": 3, **kwargs})
    assert calls == []


@pytest.mark.parametrize(
    "latents_a, latents_b, kwargs, argument",
    [
        (torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 8, 8), {}, "latents_b"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), {}, "latents_a"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.float64), torch.zeros(1, 3, 8, 8), {}, "latents_a"),
        (torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), {"num_frames": 1}, "num_frames"),
        (torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), {"num_inference_steps": -2}, "num_inference_steps"),
    ],
)
def test_bad_interpolation_arguments(latents_a, latents_b, kwargs, argument):
    pipe = make_pipe()
    calls = count_unet_calls(pipe)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe.interpolate(latents_a, latents_b, **{"num_inference_steps": 3, **kwargs})
    assert calls == []


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_outputs_are_ordinary_contiguous_nchw_tensors(output_type):
    """As diffusers' pipelines return them (`@torch.no_grad()`, NCHW), for every image format, including numpy
    images, which are channels-last in memory."""
    from test_pipeline_ddim_plus import assert_ordinary_tensor

    pipe = make_pipe()
    images = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    out = pipe(images, num_inference_steps=2, refine=False, return_reconstruction=True, output_type=output_type)
    frames = pipe.interpolate(
        out.latents[0], out.latents[1], num_frames=2, num_inference_steps=2, output_type=output_type
    )
    decoded = pipe.decode(out.latents, num_inference_steps=2)
    assert out.latents.shape == out.images.shape == frames.images.shape == decoded.shape == (2, 3, 8, 8)
    assert decoded.is_contiguous()
    for tensor in (out.latents, out.images, frames.images):
        assert_ordinary_tensor(tensor)
