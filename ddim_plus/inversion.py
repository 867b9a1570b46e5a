"""DDIM inversion (paper section 5.4) for any diffusers denoiser: pixel or latent, unconditional or text-guided.

Plain DDIM inversion runs eq. 13 forward in t but evaluates eps at the start of each step (the sample at the lower
noise level) instead of at its end, so decoding the x_T it finds misses the input by an error of the order of the
step. `invert` can refine each step: it solves the step's implicit equation "the DDIM step down from x_t lands on the
current sample" for x_t by a fixed-point iteration accelerated with Anderson mixing (as AIDI, Pan et al. 2023), with a
per-sample residual check, restart and tolerance. docs/results.md compares it with plain fixed-point iteration on an
exact denoiser.

- `invert(denoiser, latents, scheduler, ...)`: x_0 (or VAE latents) -> x_T, for a denoiser `(x_t, t) -> output`;
- `InversionRefinement`: how each step is refined (iterations, tolerance, Anderson memory), with the defaults;
- `make_denoiser(unet, prompt_embeds, negative_prompt_embeds, guidance_scale)`: that callable for a diffusers UNet,
  with classifier-free guidance for text-conditioned ones;
- `inversion_scheduler(scheduler)`: the deterministic, unclipped DDIM that inverts and decodes (clipping x_0 cannot be
  inverted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Union

import numpy as np
import torch
from diffusers import SchedulerMixin

from .scheduling_ddim_plus import DDIMSchedulerPlus, as_ddim_scheduler_plus

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Tikhonov weight of Anderson's least-squares problem, relative to the trace of its Gram matrix: it keeps the
# solve defined when two secant pairs are (nearly) parallel without changing well-posed solutions.
_ANDERSON_REGULARIZATION = 1e-10


def inversion_scheduler(scheduler: SchedulerMixin) -> DDIMSchedulerPlus:
    """The scheduler that inverts and decodes: a copy of `scheduler` (same betas, spacing, prediction type and final
    abar) as deterministic first-order DDIM with clipping and thresholding off, since neither can be inverted.

    Args:
        scheduler (`SchedulerMixin`): a `DDIMSchedulerPlus`, or any diffusers scheduler with a DDPM-style config
            (`DDIMScheduler`, `PNDMScheduler`, `DDPMScheduler`, ...).

    Returns:
        `DDIMSchedulerPlus`: a fresh copy; `scheduler` is not modified.
    """
    return DDIMSchedulerPlus.from_config(
        as_ddim_scheduler_plus(scheduler).config,
        clip_sample=False,
        thresholding=False,
        sigma_type="eta",
        ddim_solver_order=1,
    )


def make_denoiser(
    unet: torch.nn.Module,
    prompt_embeds: Optional[torch.Tensor] = None,
    negative_prompt_embeds: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    **unet_kwargs,
) -> Denoiser:
    """`(x_t, t) -> model output` for a diffusers UNet, with classifier-free guidance when `guidance_scale > 1`.

    Args:
        unet (`UNet2DModel` or `UNet2DConditionModel`): the network; called as `unet(x, t, ...).sample`.
        prompt_embeds (`torch.Tensor`, *optional*): the text conditioning (`encoder_hidden_states`), batch 1 or the
            latents' batch; required by a `UNet2DConditionModel`.
        negative_prompt_embeds (`torch.Tensor`, *optional*): the unconditional (or negative-prompt) embedding that
            guidance pushes away from; required when `guidance_scale > 1`. Both come from
            `pipe.encode_prompt(prompt, device, 1, True)` of a Stable Diffusion pipeline.
        guidance_scale (`float`, *optional*, defaults to 1.0): w of `eps_u + w (eps_c - eps_u)`; 1 is no guidance
            (one UNet evaluation per call), as in diffusers' pipelines.
        unet_kwargs: passed to every UNet call (e.g. `class_labels`, `added_cond_kwargs`).

    Returns:
        `Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`: the denoiser. It checks the latents' channels and
        batch against `unet` and the embeddings before calling the UNet.
    """
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 1:
        raise ValueError(f"`guidance_scale` must be a number >= 1 (1 = no guidance), got {guidance_scale!r}.")
    guided = guidance_scale > 1
    if guided and (prompt_embeds is None or negative_prompt_embeds is None):
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a text conditioning: pass both `prompt_embeds` and "
            "`negative_prompt_embeds` (e.g. from `pipe.encode_prompt(prompt, device, 1, True)`), or "
            "`guidance_scale=1` for unguided inversion."
        )
    if prompt_embeds is None and getattr(unet.config, "cross_attention_dim", None) is not None:
        raise ValueError(
            f"`prompt_embeds` is required: {type(unet).__name__} is text-conditioned (cross_attention_dim="
            f"{unet.config.cross_attention_dim}); pass the prompt's embedding (e.g. from `pipe.encode_prompt`)."
        )
    if guided and negative_prompt_embeds.shape != prompt_embeds.shape:
        raise ValueError(
            f"`negative_prompt_embeds` {tuple(negative_prompt_embeds.shape)} must have the shape of `prompt_embeds` "
            f"{tuple(prompt_embeds.shape)}."
        )
    in_channels = unet.config.in_channels

    def denoiser(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        if sample.ndim < 3 or sample.shape[1] != in_channels:
            raise ValueError(
                f"`latents` must be (batch, {in_channels}, ...) for this UNet (`unet.config.in_channels`), got "
                f"{tuple(sample.shape)}."
            )
        if prompt_embeds is None:
            return unet(sample, timestep, **unet_kwargs).sample
        if prompt_embeds.shape[0] not in (1, batch):
            raise ValueError(
                f"`latents` has batch {batch} but `prompt_embeds` has batch {prompt_embeds.shape[0]}; pass one "
                "embedding for all latents or one per latent."
            )
        cond = prompt_embeds.expand(batch, *prompt_embeds.shape[1:])
        if not guided:
            return unet(sample, timestep, encoder_hidden_states=cond, **unet_kwargs).sample
        uncond = negative_prompt_embeds.expand(batch, *negative_prompt_embeds.shape[1:])
        both = unet(
            torch.cat([sample, sample]), timestep, encoder_hidden_states=torch.cat([uncond, cond]), **unet_kwargs
        ).sample
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return denoiser


def _rms_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).float().pow(2).mean(1).sqrt()


def _refine_step(
    denoiser: Denoiser,
    scheduler: DDIMSchedulerPlus,
    timestep: int,
    model_timestep: torch.Tensor,
    sample: torch.Tensor,
    guess: torch.Tensor,
    refinement: InversionRefinement,
) -> torch.Tensor:
    """Solve step(x_t) = `sample` for x_t, starting from `guess` (plain inversion's answer), with at most
    `iterations` denoiser calls, Anderson `memory` and `tolerance` from `refinement`.

    With eps evaluated at x, `inverse_step` is the exact inverse of `step`, so x_t is a fixed point of
    g(x) = inverse_step(eps(x)). Each iteration spends one denoiser call at the current iterate x, which gives its
    residual ||step(x) - sample|| (RMS per sample) and f = g(x) - x. Per sample:

    - an improving iterate becomes the best one, and the next iterate is Anderson's mixing of the last `memory`
      secant pairs (x, f) (plain fixed-point iteration for `memory=0`), taken with weight w;
    - an iterate that did not improve (near a change of mode the iteration can cycle or diverge) clears the history,
      halves w and restarts from the best iterate: best + w f(best);
    - a sample stops once its best residual is at most `tolerance`; it then stays put, so its result does not depend
      on the rest of the batch.

    The result is best + w f(best), the (damped) fixed-point step from the best evaluated iterate, so `iterations`
    calls give `iterations` refinements; an Anderson proposal is only ever returned after it has been evaluated.
    """
    iterations, tolerance, memory = refinement.iterations, refinement.tolerance, refinement.anderson_memory
    batch, shape, dtype = sample.shape[0], guess.shape, guess.dtype
    device = sample.device
    x = guess.flatten(1).float()
    best, best_f = x, torch.zeros_like(x)
    best_residual = torch.full((batch,), math.inf, device=device)
    weight = torch.ones(batch, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    secants_x = x.new_zeros(batch, x.shape[1], max(memory, 1))
    secants_f = torch.zeros_like(secants_x)
    eye = torch.eye(secants_x.shape[-1], dtype=torch.float64, device=device)
    for _ in range(iterations):
        iterate = x.reshape(shape).to(dtype)
        model_output = denoiser(iterate, model_timestep)
        proposal = scheduler.inverse_step(model_output, timestep, sample, model_input=iterate).prev_sample
        f = proposal.flatten(1).float() - x
        residual = _rms_per_sample(scheduler.step(model_output, timestep, iterate).prev_sample - sample)

        improved = active & (residual < best_residual)  # NaN never improves
        rows = improved[:, None]
        if memory > 0:
            # the secant from the previous best to this iterate; a failed iterate restarts with an empty history
            shifted_x = torch.cat([secants_x[..., 1:], (x - best)[..., None]], -1)
            shifted_f = torch.cat([secants_f[..., 1:], (f - best_f)[..., None]], -1)
            secants_x = torch.where(rows[..., None], shifted_x, torch.zeros_like(shifted_x))
            secants_f = torch.where(rows[..., None], shifted_f, torch.zeros_like(shifted_f))
            gram = secants_f.double().transpose(1, 2) @ secants_f.double()
            ridge = _ANDERSON_REGULARIZATION * gram.diagonal(dim1=1, dim2=2).sum(-1) + torch.finfo(torch.float64).tiny
            gamma = torch.linalg.solve(
                gram + ridge[:, None, None] * eye, secants_f.double().transpose(1, 2) @ f.double()[..., None]
            ).float()
            mixed_x, mixed_f = x - (secants_x @ gamma)[..., 0], f - (secants_f @ gamma)[..., 0]
        else:
            mixed_x, mixed_f = x, f
        best = torch.where(rows, x, best)
        best_f = torch.where(rows, f, best_f)
        best_residual = torch.where(improved, residual, best_residual)
        weight = torch.where(active & ~improved, weight * 0.5, weight)

        active = active & (best_residual > tolerance)
        if not bool(active.any()):
            break
        restart = best + weight[:, None] * best_f
        step = torch.where(rows, mixed_x + weight[:, None] * mixed_f, restart)
        x = torch.where(active[:, None], step, x)
    return (best + weight[:, None] * best_f).reshape(shape).to(dtype)


def _check_int(value, name: str, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0 ({meaning}), got {value!r}.")


@dataclass(frozen=True)
class InversionRefinement:
    """How `invert` refines each step (see `_refine_step`); `refine=True` means these defaults.

    Args:
        iterations (`int`, defaults to 10): most refinements per step, one denoiser call each (on top of the plain
            step's call); 0 is plain DDIM inversion.
        tolerance (`float`, defaults to 1e-5): a sample stops refining a step once its RMS residual
            ||step(x_t) - x_s|| (model scale) is at most this.
        anderson_memory (`int`, defaults to 2): secant pairs Anderson mixing uses; 0 is plain fixed-point iteration
            (with the same restart and stopping rule).
    """

    iterations: int = 10
    tolerance: float = 1e-5
    anderson_memory: int = 2

    def __post_init__(self):
        _check_int(self.iterations, "InversionRefinement.iterations", "0 = plain DDIM inversion")
        _check_int(self.anderson_memory, "InversionRefinement.anderson_memory", "0 = plain fixed-point iteration")
        tolerance = self.tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
            raise ValueError(f"`InversionRefinement.tolerance` must be a finite number >= 0, got {tolerance!r}.")


def _as_refinement(refine: Union[bool, InversionRefinement]) -> InversionRefinement:
    """`refine` as `invert` and `DDIMInversionPipeline` take it -> the refinement to run (0 iterations: plain)."""
    if isinstance(refine, InversionRefinement):
        return refine
    if isinstance(refine, bool):
        return InversionRefinement() if refine else InversionRefinement(iterations=0)
    raise ValueError(
        f"`refine` must be True (refine with the defaults), False (plain DDIM inversion) or an "
        f"`InversionRefinement`, got {refine!r}."
    )


@torch.no_grad()
def invert(
    denoiser: Denoiser,
    latents: torch.Tensor,
    scheduler: SchedulerMixin,
    num_inference_steps: int = 50,
    timesteps: Optional[List[int]] = None,
    refine: Union[bool, InversionRefinement] = True,
    progress_bar: Optional[Callable[[Iterable], Iterable]] = None,
) -> torch.Tensor:
    r"""DDIM inversion: run eq. 13 forward in t from clean `latents` (x_0, in the model's scale) to x_T.

    Decoding the result with `inversion_scheduler(scheduler)`, the same schedule and the same denoiser gives back
    `latents`: exactly up to each step's residual with `refine=True`, up to O(step size) without.

    Args:
        denoiser (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`): `(x_t, t) -> model output` in the
            scheduler's `prediction_type`, e.g. `make_denoiser(unet, ...)`; `t` is a 0-dim tensor. Each sample's output
            must depend on that sample only (as a UNet in eval mode).
        latents (`torch.Tensor`): x_0, `(batch, ...)`: images in [-1, 1] for a pixel model, or VAE latents times
            `vae.config.scaling_factor`.
        scheduler (`SchedulerMixin`): gives the betas, spacing, prediction type and final abar; not modified (see
            `inversion_scheduler`).
        num_inference_steps (`int`, *optional*, defaults to 50): S.
        timesteps (`List[int]`, *optional*): a custom strictly descending schedule; replaces `num_inference_steps`.
        refine (`bool` or `InversionRefinement`, *optional*, defaults to `True`): solve each step's implicit
            equation (see `_refine_step`) with `InversionRefinement()`'s settings, or with the ones given; `False` is
            the paper's plain DDIM inversion, one denoiser call per step.
        progress_bar (`Callable`, *optional*): wraps the loop over steps, e.g. a pipeline's `progress_bar`.

    Returns:
        `torch.Tensor`: x_T, shape and dtype of `latents`.
    """
    if not callable(denoiser):
        raise ValueError(f"`denoiser` must be callable as denoiser(x_t, t), got {type(denoiser).__name__}.")
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.ndim < 2:
        kind = (
            f"{latents.dtype} tensor of shape {tuple(latents.shape)}"
            if isinstance(latents, torch.Tensor)
            else (type(latents).__name__)
        )
        raise ValueError(f"`latents` must be a float tensor (batch, ...), got a {kind}.")
    if latents.shape[0] == 0:
        raise ValueError("`latents` is an empty batch; pass at least one sample.")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("`latents` holds NaN or infinite values; inversion needs finite inputs.")
    refinement = _as_refinement(refine)
    scheduler = inversion_scheduler(scheduler)
    scheduler.set_timesteps(num_inference_steps if timesteps is None else None, timesteps=timesteps)

    timestep_list = scheduler.timesteps.tolist()
    model_timesteps = scheduler.timesteps.to(latents.device)
    sample = latents
    steps = range(len(timestep_list) - 1, -1, -1)
    for i in progress_bar(steps) if progress_bar is not None else steps:
        t = timestep_list[i]
        model_output = denoiser(sample, model_timesteps[i])
        guess = scheduler.inverse_step(model_output, t, sample).prev_sample  # plain DDIM inversion
        if refinement.iterations > 0:
            guess = _refine_step(denoiser, scheduler, t, model_timesteps[i], sample, guess, refinement)
        sample = guess
    return sample
