"""DDIMPlusPipeline: equivalence with stock DDIMPipeline, determinism, outputs, callbacks, trajectory, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import count_unet_calls, make_tiny_unet, seeded_generators
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from ddim_plus import DDIMPlusPipeline, DDIMPlusPipelineOutput, DDIMSchedulerPlus

STEPS = 5


def make_pipe(channels=3, **scheduler_kwargs):
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(channels=channels), scheduler=DDIMSchedulerPlus(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("channels", [1, 3])
def test_matches_stock_ddim_pipeline_with_the_same_seed(eta, channels):
    unet = make_tiny_unet(channels=channels)
    stock = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    ours = DDIMPlusPipeline(unet=unet, scheduler=DDIMScheduler())
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, eta=eta, num_inference_steps=STEPS, output_type="np")
    # The config clips x_0; our default re-derives eps from the clipped x_0, stock's does so only when asked.
    expected = stock(generator=torch.Generator().manual_seed(0), use_clipped_model_output=True, **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == expected.shape == (2, 8, 8, channels)
    # our coefficients are float64, diffusers' float32: equal to float32 rounding
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_latents_reproduce_the_generator_noise_and_are_deterministic():
    pipe = make_pipe()
    from_generator = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS)
    latents = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    first = pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="pt").images
    second = pipe(batch_size=2, latents=latents.clone(), num_inference_steps=STEPS, output_type="pt").images
    assert torch.equal(first, second)
    expected = np.stack([np.asarray(im) for im in from_generator.images])
    got = (first.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_output_types_and_grayscale_pil():
    pipe = make_pipe(channels=1)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = {
        kind: pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type=kind).images
        for kind in ("pil", "np", "pt", "latent")
    }
    assert isinstance(pipe(batch_size=2, latents=latents, num_inference_steps=STEPS), ImagePipelineOutput)
    pil, arr, pt, latent = outputs["pil"], outputs["np"], outputs["pt"], outputs["latent"]
    assert [(im.mode, im.size) for im in pil] == [("L", (8, 8))] * 2 and isinstance(pil[0], PIL.Image.Image)
    assert arr.shape == (2, 8, 8, 1) and arr.min() >= 0 and arr.max() <= 1
    assert pt.shape == (2, 1, 8, 8)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1, ..., 0] * 255).round().astype(np.uint8))
    (images,) = pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="pt", return_dict=False)
    torch.testing.assert_close(images, pt)


def test_a_list_of_generators_gives_each_image_its_own_noise():
    pipe = make_pipe()
    kwargs = dict(num_inference_steps=STEPS, eta=1.0, output_type="pt")
    pair = pipe(batch_size=2, generator=seeded_generators(1, 2), **kwargs).images
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(2)], **kwargs).images
    torch.testing.assert_close(pair[1:], alone)
    assert not torch.allclose(pair[0], pair[1])


def test_stock_schedulers_are_upgraded_with_their_config():
    unet = make_tiny_unet()
    for stock in (DDIMScheduler(timestep_spacing="trailing", clip_sample=False), DDPMScheduler(beta_end=0.03)):
        pipe = DDIMPlusPipeline(unet=unet, scheduler=stock)
        assert type(pipe.scheduler) is DDIMSchedulerPlus
        for key in ("num_train_timesteps", "beta_start", "beta_end", "clip_sample", "timestep_spacing"):
            assert pipe.scheduler.config[key] == stock.config[key]
    with pytest.raises(ValueError, match="`scheduler`"):
        DDIMPlusPipeline(unet=unet, scheduler=object())


def reference_loop(unet, scheduler, latents, steps):
    """diffusers' documented sampling loop (scale_model_input, UNet, step), written out with the stock scheduler."""
    scheduler.set_timesteps(steps)
    sample = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        with torch.no_grad():
            model_output = unet(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(model_output, t, sample).prev_sample
    return (sample / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_other_diffusers_schedulers_sample_as_diffusers_loop(scheduler_cls):
    pipe = make_pipe()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    latents = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    got = pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="pt").images
    assert type(pipe.scheduler) is scheduler_cls
    reference = scheduler_cls.from_config(pipe.scheduler.config)
    torch.testing.assert_close(got, reference_loop(pipe.unet, reference, latents, STEPS), atol=1e-4, rtol=0)
    # eta is not a parameter of their step: refused before any UNet call rather than silently ignored
    calls = count_unet_calls(pipe)
    with pytest.raises(ValueError, match="`eta`"):
        pipe(eta=0.5, num_inference_steps=STEPS)
    assert calls == []


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDPMScheduler])
def test_other_schedulers_from_a_config_with_our_spacing_sample_at_its_timesteps(scheduler_cls):
    # `from_config` of a ddim_plus config (the trainer saves `logsnr`) gives a stock scheduler that raises on our
    # spacing; the pipeline passes that spacing's timesteps instead, here the paper's quadratic closed form.
    pipe = make_pipe(timestep_spacing="quadratic")
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    expected_timesteps = np.floor(np.linspace(0, np.sqrt(0.8 * 1000), STEPS) ** 2)[::-1].astype(int).tolist()
    seen = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: seen.append(round(float(args[1]))))
    latents = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)  # DDPM's step draws noise
    got = pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, generator=generator, output_type="pt").images
    hook.remove()
    # the same scheduler given the timesteps explicitly, in diffusers' own loop
    reference = scheduler_cls.from_config(pipe.scheduler.config)
    reference.set_timesteps(timesteps=expected_timesteps)
    sample, generator = latents * reference.init_noise_sigma, torch.Generator().manual_seed(1)
    for t in reference.timesteps:
        with torch.no_grad():
            model_output = pipe.unet(reference.scale_model_input(sample, t), t).sample
        sample = reference.step(model_output, t, sample, generator=generator).prev_sample
    assert [round(float(t)) for t in reference.timesteps] == seen
    if scheduler_cls is not EulerDiscreteScheduler:  # Euler's timesteps are interpolated floats of these
        assert seen == expected_timesteps
    torch.testing.assert_close(got, (sample / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="`num_inference_steps` must be between 1 and"):
        pipe(num_inference_steps=0)


def test_stock_ddim_scheduler_from_a_config_with_our_spacing_is_refused_with_the_fix():
    pipe = make_pipe(timestep_spacing="logsnr")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    calls = count_unet_calls(pipe)
    with pytest.raises(ValueError, match=r"no 'logsnr' timestep spacing.*timestep_spacing=\"trailing\""):
        pipe(num_inference_steps=STEPS)
    assert calls == []


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_assigned_stock_ddim_scheduler_matches_stock_ddim_pipeline(eta):
    pipe = make_pipe()
    pipe.scheduler = DDIMScheduler(timestep_spacing="trailing")
    assert type(pipe.scheduler) is DDIMScheduler
    stock = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler(timestep_spacing="trailing"))
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, eta=eta, num_inference_steps=STEPS, output_type="np")
    expected = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images, expected, atol=1e-4)


def test_assigned_ddpm_scheduler_matches_stock_ddpm_pipeline():
    pipe = make_pipe()
    pipe.scheduler = DDPMScheduler(beta_end=0.03)
    stock = DDPMPipeline(unet=pipe.unet, scheduler=DDPMScheduler(beta_end=0.03))
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=STEPS, output_type="np")
    expected = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images, expected, atol=1e-4)


def test_other_scheduler_passed_to_the_constructor_is_kept_and_saved_as_itself(tmp_path):
    scheduler = DPMSolverMultistepScheduler(beta_end=0.03)
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(), scheduler=scheduler)
    assert pipe.scheduler is scheduler
    pipe.save_pretrained(tmp_path)
    loaded = DDIMPlusPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is DPMSolverMultistepScheduler and loaded.scheduler.config.beta_end == 0.03


def test_scheduler_without_previews_refuses_trajectory_and_custom_timesteps():
    pipe = make_pipe()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="pred_original_sample"):
        pipe(num_inference_steps=STEPS, return_trajectory=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe(num_inference_steps=STEPS, return_trajectory=True).pred_original_samples.shape == (STEPS, 1, 3, 8, 8)
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="`timesteps`"):
        pipe(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="`use_clipped_model_output`"):
        DDIMPlusPipeline(unet=pipe.unet, scheduler=EulerDiscreteScheduler())(use_clipped_model_output=True)


def test_trajectory_and_x0_previews():
    pipe = make_pipe()
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(batch_size=2, latents=latents, num_inference_steps=STEPS, output_type="latent", return_trajectory=True)
    assert isinstance(out, DDIMPlusPipelineOutput)
    assert out.trajectory.shape == (STEPS + 1, 2, 3, 8, 8)
    assert out.pred_original_samples.shape == (STEPS, 2, 3, 8, 8)
    torch.testing.assert_close(out.trajectory[0], latents)
    torch.testing.assert_close(out.trajectory[-1], out.images)
    # the last step goes to abar = 1 (set_alpha_to_one), where x_prev is the predicted x_0 itself
    torch.testing.assert_close(out.pred_original_samples[-1], out.images)
    # each entry is one scheduler step from the previous one, recomputed independently
    scheduler = DDIMSchedulerPlus()
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = pipe.unet(out.trajectory[i], t).sample
            torch.testing.assert_close(scheduler.step(eps, t, out.trajectory[i]).prev_sample, out.trajectory[i + 1])
    images, trajectory, previews = pipe(
        batch_size=2, latents=latents, num_inference_steps=STEPS, return_trajectory=True, return_dict=False
    )
    assert len(images) == 2 and trajectory.shape[0] == STEPS + 1 and previews.shape[0] == STEPS


def test_callback_sees_every_step_and_can_replace_latents_or_interrupt():
    pipe = make_pipe()
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, t, sorted(kwargs)))
        return {}

    pipe(
        latents=latents,
        num_inference_steps=STEPS,
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    # t as diffusers' pipelines pass it: the scheduler's timestep as a tensor
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for _, t, _ in seen)
    assert [(i, int(t)) for i, t, _ in seen] == list(enumerate(pipe.scheduler.timesteps.tolist()))
    assert all(keys == ["latents", "pred_original_sample"] for _, _, keys in seen)
    assert pipe.num_timesteps == STEPS

    def zero_at_last_step(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == STEPS - 1 else {}

    images = pipe(latents=latents, num_inference_steps=STEPS, output_type="pt", callback_on_step_end=zero_at_last_step)
    torch.testing.assert_close(images.images, torch.full((1, 3, 8, 8), 0.5))

    calls = count_unet_calls(pipe)

    def stop_after_two(p, i, t, kwargs):
        if i == 1:
            p._interrupt = True
        return {}

    out = pipe(latents=latents, num_inference_steps=STEPS, callback_on_step_end=stop_after_two, return_trajectory=True)
    assert len(calls) == 2 and out.trajectory.shape[0] == 3


def assert_ordinary_tensor(tensor):
    """What a diffusers user does with an output: view it flat, write into it, clamp it in place, track gradients."""
    assert isinstance(tensor, torch.Tensor) and tensor.is_contiguous() and not tensor.is_inference()
    assert not tensor.requires_grad
    tensor.view(tensor.shape[0], -1)
    tensor[0] = 0.25
    tensor.clamp_(0, 1)
    tensor.requires_grad_()


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_outputs_are_ordinary_contiguous_nchw_tensors(output_type):
    """As `DDIMPipeline` returns them (`@torch.no_grad()`, NCHW), whatever layout the loop runs in."""
    out = make_pipe()(batch_size=2, num_inference_steps=2, output_type=output_type, return_trajectory=True)
    assert out.images.shape == (2, 3, 8, 8)
    for tensor in (out.images, out.trajectory, out.pred_original_samples):
        assert_ordinary_tensor(tensor)


def test_custom_timesteps_are_visited_in_order():
    pipe = make_pipe(timestep_spacing="trailing")
    seen = []
    pipe(
        timesteps=[999, 600, 250, 40],
        callback_on_step_end=lambda p, i, t, kwargs: seen.append(t) or {},
        num_inference_steps=7,  # ignored: `timesteps` replaces it
    )
    assert seen == [999, 600, 250, 40]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2, generator=[torch.Generator()]), "generator"),
        (dict(eta=-0.1), "eta"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1001), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(timesteps=[10, 500]), "timesteps"),
        (dict(latents=torch.zeros(1, 3, 8, 4)), "latents"),
        (dict(latents=torch.zeros(2, 3, 8, 8)), "latents"),
        (dict(latents=torch.zeros(1, 1, 8, 8)), "latents"),
        (dict(latents=torch.zeros(1, 3, 8, 8, dtype=torch.float64)), "latents"),
        (dict(latents=np.zeros((1, 3, 8, 8), dtype=np.float32)), "latents"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_input_raises_before_any_work(kwargs, argument):
    pipe = make_pipe()
    pipe.scheduler.set_timesteps(3)
    calls = count_unet_calls(pipe)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe(**{"num_inference_steps": STEPS, **kwargs})
    assert calls == [] and pipe.scheduler.timesteps.tolist() == [666, 333, 0]
