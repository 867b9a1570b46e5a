"""`ddim_plus.invert` on the exact Gaussian-mixture denoiser, with a text-guided latent pipeline, and on bad input."""

import re
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO_ROOT,
    STABLE_DIFFUSION_SCHEDULER_CONFIG,
    make_tiny_stable_diffusion_components,
    make_tiny_unet,
)

import ddim_plus
from ddim_plus import DDIMSchedulerPlus
from ddim_plus.evaluation.gmm import GaussianMixture, GaussianMixtureOracle
from ddim_plus.evaluation.reconstruction import digits_mixture

DOCS = REPO_ROOT / "docs" / "inversion.md"


def counted(denoiser):
    calls = []

    def wrapped(x, t):
        calls.append(x.shape[0])
        return denoiser(x, t)

    return wrapped, calls


def exact_setup(num_images=12, prediction_type="epsilon", seed=0):
    scheduler = DDIMSchedulerPlus(clip_sample=False, prediction_type=prediction_type)
    mixture = digits_mixture()
    oracle = GaussianMixtureOracle(mixture, scheduler.alphas_cumprod, prediction_type)
    samples, _ = mixture.sample(num_images, generator=torch.Generator().manual_seed(seed))
    return oracle, scheduler, samples.clamp(-1, 1)


def decode(denoiser, scheduler, latents, steps):
    """The DDIM ODE (eq. 12, eta = 0) written out from the closed-form coefficients, independent of `step`."""
    decoder = ddim_plus.inversion_scheduler(scheduler)
    decoder.set_timesteps(steps)
    timesteps = decoder.timesteps.tolist()
    abar = scheduler.alphas_cumprod.double()
    x = latents.double()
    for i, t in enumerate(timesteps):
        abar_t = abar[t]
        abar_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        out = denoiser(x.float(), torch.tensor(t)).double()
        if scheduler.config.prediction_type == "epsilon":
            eps = out
        elif scheduler.config.prediction_type == "sample":
            eps = (x - abar_t.sqrt() * out) / (1 - abar_t).sqrt()
        else:
            eps = abar_t.sqrt() * out + (1 - abar_t).sqrt() * x
        x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    return x


def per_image_mse(denoiser, scheduler, images, steps, **kwargs):
    latents = ddim_plus.invert(denoiser, images, scheduler, steps, **kwargs)
    reconstruction = decode(denoiser, scheduler, latents, steps)
    # per-pixel MSE on [0, 1] (the paper's Table 2 unit): a quarter of the MSE in the model's [-1, 1] scale
    return (reconstruction - images.double()).pow(2).flatten(1).mean(1) / 4


def test_refined_inversion_is_5x_better_than_plain_at_every_step_count():
    oracle, scheduler, images = exact_setup()
    refined_means = []
    for steps in (10, 20, 50, 100):
        plain = per_image_mse(oracle, scheduler, images, steps, refine=False)
        refined = per_image_mse(oracle, scheduler, images, steps)
        assert refined.mean() * 5 <= plain.mean(), f"S={steps}: {refined.mean():.3g} vs plain {plain.mean():.3g}"
        assert bool((refined <= plain).all()), f"S={steps}: refined worse than plain for some image"
        refined_means.append(float(refined.mean()))
    # from S = 20 on, the error sits at the floor float32 and the refinement tolerance leave (docs/results.md)
    assert max(refined_means[1:]) < min(1e-8, refined_means[0]), f"refined error grows with S: {refined_means}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_refinement_solves_each_step_for_every_prediction_type(prediction_type):
    oracle, scheduler, images = exact_setup(num_images=8, prediction_type=prediction_type)
    plain = per_image_mse(oracle, scheduler, images, 20, refine=False)
    refined = per_image_mse(oracle, scheduler, images, 20)
    assert float(refined.mean()) * 100 < float(plain.mean())


def test_k_iterations_are_k_refinements():
    oracle, scheduler, images = exact_setup(num_images=6)
    denoiser, calls = counted(oracle)
    for k in (0, 1, 2, 3):
        calls.clear()
        ddim_plus.invert(
            denoiser, images, scheduler, 7, refine=ddim_plus.InversionRefinement(iterations=k, tolerance=0.0)
        )
        assert len(calls) == 7 * (1 + k)
    plain = per_image_mse(oracle, scheduler, images, 20, refine=False)
    once = per_image_mse(oracle, scheduler, images, 20, refine=ddim_plus.InversionRefinement(iterations=1))
    assert float(once.mean()) < float(plain.mean())


def test_one_refinement_is_one_fixed_point_step_in_closed_form():
    """One Gaussian: eps(x, t) = b (x - a mu) / (a^2 s^2 + b^2). From a clean x_0 to level t (a = sqrt(abar_t),
    b = sqrt(1 - abar_t)), plain inversion is x_1 = a x_0 + b eps(x_0, t); one refinement is
    x_2 = a x_0 + b eps(x_1, t)."""
    mean, std, t = torch.full((1, 1, 2, 2), 0.3), 0.2, 400
    scheduler = DDIMSchedulerPlus(clip_sample=False)
    oracle = GaussianMixtureOracle(GaussianMixture(mean, torch.tensor([std])), scheduler.alphas_cumprod)
    x0 = torch.tensor([[[[0.1, 0.5], [0.2, 0.4]]]], dtype=torch.float64)
    abar = scheduler.alphas_cumprod[t].double()
    a, b = abar.sqrt(), (1 - abar).sqrt()

    def eps(x):
        return b * (x - a * mean.double()) / (a**2 * std**2 + b**2)

    x1 = a * x0 + b * eps(x0)
    x2 = a * x0 + b * eps(x1)
    once = ddim_plus.InversionRefinement(iterations=1, tolerance=0.0)
    torch.testing.assert_close(
        ddim_plus.invert(oracle, x0.float(), scheduler, timesteps=[t], refine=False), x1.float()
    )
    torch.testing.assert_close(ddim_plus.invert(oracle, x0.float(), scheduler, timesteps=[t], refine=once), x2.float())


def test_each_sample_is_refined_independently_of_its_batch():
    oracle, scheduler, images = exact_setup(num_images=5)
    together = ddim_plus.invert(oracle, images, scheduler, 10)
    for i in range(len(images)):
        alone = ddim_plus.invert(oracle, images[i : i + 1], scheduler, 10)
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-6, rtol=0)


def test_stopping_early_saves_calls_and_does_not_touch_the_scheduler():
    oracle, scheduler, images = exact_setup(num_images=4)
    denoiser, calls = counted(oracle)
    ddim_plus.invert(denoiser, images, scheduler, 30)
    assert 30 < len(calls) < 30 * (1 + 10)  # the tolerance stops most steps before the budget
    assert scheduler.config.clip_sample is False and scheduler.num_inference_steps is None


# --------------------------------------------------------------------------------------------------------------
# A Stable-Diffusion-style pipeline from tiny components: VAE latents, CLIP text encoder, classifier-free guidance
# --------------------------------------------------------------------------------------------------------------
def tiny_stable_diffusion(folder: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**STABLE_DIFFUSION_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        **make_tiny_stable_diffusion_components(folder),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guided_latent_inversion_reconstructs_better_with_refinement(tmp_path):
    pipe = tiny_stable_diffusion(tmp_path / "tokenizer")
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt("a cat", "cpu", 1, True)
    guidance = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, guidance_scale=3.0)
    denoiser = ddim_plus.make_denoiser(pipe.unet, **guidance)
    stock_scheduler = pipe.scheduler
    # decoding: diffusers' own StableDiffusionPipeline, with the same guidance, from the inverted latents
    pipe.scheduler = ddim_plus.inversion_scheduler(stock_scheduler)
    errors = {}
    for refine in (False, True):
        x_T = ddim_plus.invert(denoiser, latents, stock_scheduler, 4, refine=refine)
        decoded = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=3.0,
            latents=x_T,
            num_inference_steps=4,
            output_type="latent",
        ).images
        errors[refine] = float((decoded - latents).pow(2).mean())
    assert errors[True] * 5 < errors[False], errors


def test_the_docs_example_runs(tmp_path, monkeypatch):
    code = re.search(
        r"```python\n(import ddim_plus\nfrom diffusers import StableDiffusionPipeline.*?)```",
        DOCS.read_text(encoding="utf-8"),
        re.S,
    ).group(1)
    repo_id = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    folder = tmp_path / "tiny-sd"
    tiny_stable_diffusion(tmp_path / "tokenizer").save_pretrained(folder)
    import PIL.Image

    PIL.Image.new("RGB", (16, 16), (200, 120, 40)).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    # two steps instead of the example's 50: the point is that the code runs as written
    code = code.replace(repo_id, str(folder)).replace("num_inference_steps=50", "num_inference_steps=2")
    exec(code, namespace)
    assert namespace["x_T"].shape == (1, 4, 8, 8)
    assert namespace["reconstruction"].size == (16, 16)


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the parameter, before any model call
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, argument",
    [
        (dict(iterations=-1), "InversionRefinement.iterations"),
        (dict(iterations=2.5), "InversionRefinement.iterations"),
        (dict(tolerance=float("nan")), "InversionRefinement.tolerance"),
        (dict(tolerance=True), "InversionRefinement.tolerance"),
        (dict(anderson_memory=-1), "InversionRefinement.anderson_memory"),
    ],
)
def test_bad_refinement_settings_raise_naming_the_field(settings, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ddim_plus.InversionRefinement(**settings)


@pytest.mark.parametrize(
    "latents, kwargs, argument",
    [
        (torch.full((1, 3, 8, 8), float("nan")), {}, "latents"),
        (torch.full((1, 3, 8, 8), float("inf")), {}, "latents"),
        (torch.zeros(0, 3, 8, 8), {}, "latents"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.long), {}, "latents"),
        ([[0.0]], {}, "latents"),
        (torch.zeros(1, 4, 8, 8), {}, "latents"),  # wrong channels for the UNet
        (torch.zeros(1, 3, 8, 8), {"refine": "yes"}, "refine"),
        (torch.zeros(1, 3, 8, 8), {"refine": 1}, "refine"),
        (torch.zeros(1, 3, 8, 8), {"num_inference_steps": 0}, "num_inference_steps"),
        (torch.zeros(1, 3, 8, 8), {"timesteps": [5, 5]}, "timesteps"),
    ],
)
def test_bad_inversion_input_raises_before_any_model_call(latents, kwargs, argument):
    unet = make_tiny_unet()
    calls = []
    unet.register_forward_hook(lambda module, args, output: calls.append(1))
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ddim_plus.invert(
            ddim_plus.make_denoiser(unet), latents, DDIMSchedulerPlus(), **{"num_inference_steps": 3, **kwargs}
        )
    assert calls == []


def test_guidance_without_conditioning_raises_naming_the_parameter(tmp_path):
    pipe = tiny_stable_diffusion(tmp_path / "tokenizer")
    embeds = torch.zeros(1, 16, 16)
    with pytest.raises(ValueError, match="`guidance_scale`"):
        ddim_plus.make_denoiser(make_tiny_unet(), guidance_scale=3.0)  # an unconditional UNet, no text encoder
    with pytest.raises(ValueError, match="`guidance_scale`"):
        ddim_plus.make_denoiser(pipe.unet, prompt_embeds=embeds, guidance_scale=3.0)
    with pytest.raises(ValueError, match="`guidance_scale`"):
        ddim_plus.make_denoiser(pipe.unet, embeds, embeds, guidance_scale=0.5)
    with pytest.raises(ValueError, match="`prompt_embeds`"):
        ddim_plus.make_denoiser(pipe.unet)
    with pytest.raises(ValueError, match="`negative_prompt_embeds`"):
        ddim_plus.make_denoiser(pipe.unet, embeds, torch.zeros(1, 8, 16), guidance_scale=2.0)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    denoiser = ddim_plus.make_denoiser(pipe.unet, embeds.expand(2, -1, -1), embeds.expand(2, -1, -1), 2.0)
    with pytest.raises(ValueError, match="`latents`"):  # batch 3 against embeddings for 2
        ddim_plus.invert(denoiser, torch.zeros(3, 4, 8, 8), pipe.scheduler, 3)
    assert calls == []
