"""`DDIMInversionPipeline`: images -> x_T (DDIM inversion, paper section 5.4), reconstruction and interpolation.

Plain DDIM inversion runs eq. 13 forward in t but evaluates eps at the start of each step (x at the lower noise
level) instead of the end, so decoding the x_T it finds misses the image by O(step size). The refinement here solves
each step's implicit equation "the DDIM step down from x_t lands on the current sample" by fixed-point iteration on
x_t, with a per-sample residual check that keeps the best iterate and damps an iteration that stops improving, so it
is never worse than plain inversion at any step count (measured in docs/inversion.md).

Clipping or thresholding x_0 cannot be inverted (many x_t map to the same clipped x_0), so inversion, reconstruction
and interpolation all run the deterministic first-order DDIM ODE with clipping and thresholding off, through a private
copy of the scheduler; the pipeline's own scheduler is left untouched.
"""

from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import ImagePipelineOutput
from diffusers.utils import BaseOutput

from .ddim_math import slerp
from .pipeline_ddim_plus import DDIMPlusPipelineBase
from .scheduling_ddim_plus import DDIMSchedulerPlus

ImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]
]

# Channels -> the PIL mode that holds exactly those channels.
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# A damped iterate below this weight moves too little to matter: that sample stops refining.
_MIN_DAMPING = 1.0 / 16


@dataclass
class DDIMInversionPipelineOutput(BaseOutput):
    """Output of `DDIMInversionPipeline.__call__`.

    Args:
        latents (`torch.Tensor`): x_T, shape `(batch, C, H, W)`: decoding it with the same schedule (eta = 0, no
            clipping) gives back the images.
        images (`List[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`, *optional*): the reconstruction, when
            `return_reconstruction=True`.
    """

    latents: torch.Tensor
    images: Optional[Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]] = None


def _rms_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).mean(1).sqrt()


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


class DDIMInversionPipeline(DDIMPlusPipelineBase):
    r"""DDIM inversion (image -> x_T), reconstruction (x_T -> image) and spherical interpolation between two x_T.

    Built over the same components as [`DDIMPlusPipeline`]: `DDIMInversionPipeline(**pipe.components)` or
    `DDIMInversionPipeline.from_pipe(pipe)` share its weights.

    Args:
        unet ([`UNet2DModel`]): the denoiser.
        scheduler ([`SchedulerMixin`]): a `DDIMSchedulerPlus`; a stock `DDIMScheduler` or `DDPMScheduler` is
            converted with `DDIMSchedulerPlus.from_config(scheduler.config)`.
    """

    def inversion_scheduler(self) -> DDIMSchedulerPlus:
        """The scheduler inversion, reconstruction and interpolation run: the pipeline's, as deterministic
        first-order DDIM without clipping or thresholding (neither can be inverted).

        Returns:
            `DDIMSchedulerPlus`: a fresh copy; the pipeline's scheduler is not modified.
        """
        return DDIMSchedulerPlus.from_config(
            self.scheduler.config, clip_sample=False, thresholding=False, sigma_type="eta", ddim_solver_order=1
        )

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Images in [0, 1] (diffusers' convention) -> a batch in the model's [-1, 1] scale.

        Args:
            image: a PIL image or a list of them (mode "L" for one channel, "RGB" for three); a float numpy array
                `(H, W, C)` or `(B, H, W, C)`; a float tensor `(C, H, W)` or `(B, C, H, W)`; or a list of arrays or
                tensors, one image each. Sizes and channels must match the UNet: nothing is resized or converted.

        Returns:
            `torch.Tensor`: `(B, C, H, W)` on the execution device in the UNet's dtype.
        """
        channels, height, width = self.sample_shape
        if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)) and not (
            isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4
        ):
            image = [image]
        if isinstance(image, (list, tuple)):
            if len(image) == 0:
                raise ValueError("`image` is an empty list; pass at least one image.")
            if all(isinstance(im, PIL.Image.Image) for im in image):
                expected_mode = _PIL_MODES.get(channels)
                if expected_mode is None:
                    raise ValueError(
                        f"`image` holds PIL images, which cannot carry the UNet's {channels} channels; pass a numpy "
                        "array or a tensor."
                    )
                bad_modes = sorted({im.mode for im in image if im.mode != expected_mode})
                if bad_modes:
                    raise ValueError(
                        f"`image` holds PIL images of mode {bad_modes}, but the UNet has {channels} channel(s): "
                        f"convert them with `.convert({expected_mode!r})`."
                    )
                arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in image]
                image = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
            elif all(isinstance(im, np.ndarray) for im in image) or all(isinstance(im, torch.Tensor) for im in image):
                shapes = sorted({tuple(im.shape) for im in image})
                if len(shapes) > 1:
                    raise ValueError(f"`image` items must share one shape, got {shapes}.")
                image = np.stack(image) if isinstance(image[0], np.ndarray) else torch.stack(image)
            else:
                kinds = sorted({type(im).__name__ for im in image})
                raise ValueError(
                    f"`image` mixes types {kinds}; pass PIL images, numpy arrays or tensors, one kind at a time."
                )
        if isinstance(image, np.ndarray):
            if image.ndim != 4:
                raise ValueError(f"`image` as numpy must be (H, W, C) or (B, H, W, C), got shape {image.shape}.")
            if not np.issubdtype(image.dtype, np.floating):
                raise ValueError(
                    f"`image` as numpy must be float in [0, 1], got dtype {image.dtype}; for uint8 pixels pass "
                    "`image.astype(np.float32) / 255`."
                )
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            if image.ndim != 4:
                raise ValueError(f"`image` as a tensor must be (C, H, W) or (B, C, H, W), got {tuple(image.shape)}.")
            if not image.is_floating_point():
                raise ValueError(f"`image` as a tensor must be float in [0, 1], got dtype {image.dtype}.")
        else:
            raise ValueError(
                f"`image` must be PIL image(s), a numpy array or a torch tensor, got {type(image).__name__}."
            )
        if image.shape[0] == 0:
            raise ValueError("`image` is an empty batch; pass at least one image.")
        if tuple(image.shape[1:]) != (channels, height, width):
            got_c, got_h, got_w = image.shape[1:]
            raise ValueError(
                f"`image` has {got_c} channel(s) of {got_h}x{got_w} but the UNet takes {channels} channel(s) of "
                f"{height}x{width} (`unet.config.in_channels`, `unet.config.sample_size`); resize or convert first."
            )
        low, high = float(image.min()), float(image.max())
        if not (0.0 <= low and high <= 1.0):  # also rejects NaN
            raise ValueError(
                f"`image` values must lie in [0, 1] (diffusers' image convention), got min {low} and max {high}."
            )
        return (image.to(device=self._execution_device, dtype=self.unet.dtype) * 2.0) - 1.0

    @staticmethod
    def _check_refinement(refine_iterations: int, refine_tolerance: float) -> None:
        if isinstance(refine_iterations, bool) or not isinstance(refine_iterations, (int, np.integer)):
            raise ValueError(f"`refine_iterations` must be an int >= 0, got {refine_iterations!r}.")
        if refine_iterations < 0:
            raise ValueError(f"`refine_iterations` must be >= 0 (0 = plain DDIM inversion), got {refine_iterations}.")
        if not isinstance(refine_tolerance, (int, float)) or refine_tolerance < 0:
            raise ValueError(f"`refine_tolerance` must be a number >= 0, got {refine_tolerance!r}.")

    # ------------------------------------------------------------------------------------------------------------
    # Inversion
    # ------------------------------------------------------------------------------------------------------------
    def _refine_step(
        self,
        scheduler: DDIMSchedulerPlus,
        timestep: int,
        timestep_on_device: torch.Tensor,
        sample: torch.Tensor,
        guess: torch.Tensor,
        iterations: int,
        tolerance: float,
    ) -> torch.Tensor:
        """Solve step(x_t) = `sample` for x_t by damped fixed-point iteration, starting from `guess`.

        Each iteration evaluates the UNet once at the current iterate, which gives both its residual
        ||step(iterate) - sample|| (RMS, per sample) and the next proposal (`inverse_step` with that eps). A sample
        whose residual did not improve restarts from its best iterate with half the step (large steps can make the
        plain iteration diverge); the best evaluated iterate is returned, so the result is never worse than `guess`.
        """
        batch = sample.shape[0]
        best = guess
        best_proposal = guess
        best_residual = torch.full((batch,), float("inf"), device=sample.device, dtype=torch.float32)
        damping = torch.ones(batch, device=sample.device, dtype=sample.dtype)
        for _ in range(iterations):
            model_output = self.unet(guess, timestep_on_device).sample
            stepped_down = scheduler.step(model_output, timestep, guess).prev_sample
            residual = _rms_per_sample((stepped_down - sample).float())
            proposal = scheduler.inverse_step(model_output, timestep, sample, model_input=guess).prev_sample

            improved = residual < best_residual
            keep = _per_sample(improved, guess)
            best = torch.where(keep, guess, best)
            best_proposal = torch.where(keep, proposal, best_proposal)
            best_residual = torch.where(improved, residual, best_residual)
            damping = torch.where(improved, damping, damping * 0.5)

            done = (best_residual <= tolerance) | (damping < _MIN_DAMPING)
            if bool(done.all()):
                break
            # finished samples stay at their best iterate, so a sample's result does not depend on its batch
            step_weight = torch.where(done, torch.zeros_like(damping), damping)
            guess = best + _per_sample(step_weight, best) * (best_proposal - best)
        return best

    def _invert(
        self, sample: torch.Tensor, scheduler: DDIMSchedulerPlus, refine_iterations: int, refine_tolerance: float
    ) -> torch.Tensor:
        """Eq. 13 run forward in t through `scheduler.timesteps` (already set), from x_0 = `sample` to x_T."""
        timestep_list = scheduler.timesteps.tolist()
        timesteps_on_device = scheduler.timesteps.to(sample.device)
        for i in self.progress_bar(range(len(timestep_list) - 1, -1, -1)):
            t = timestep_list[i]
            model_output = self.unet(sample, timesteps_on_device[i]).sample
            guess = scheduler.inverse_step(model_output, t, sample).prev_sample  # plain DDIM inversion
            if refine_iterations > 0:
                guess = self._refine_step(
                    scheduler, t, timesteps_on_device[i], sample, guess, refine_iterations, refine_tolerance
                )
            sample = guess
        return sample

    @torch.inference_mode()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        refine: bool = True,
        refine_iterations: int = 6,
        refine_tolerance: float = 1e-5,
        return_reconstruction: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[DDIMInversionPipelineOutput, tuple]:
        r"""Invert images to their DDIM latents x_T.

        Args:
            image (PIL image(s), `np.ndarray` or `torch.Tensor`): images in [0, 1] of the UNet's size and channels,
                any batch size (see `preprocess`).
            num_inference_steps (`int`, *optional*, defaults to 50): number of steps S, spaced by the scheduler's
                `timestep_spacing`; decode with the same S (and spacing) to reconstruct.
            timesteps (`List[int]`, *optional*): a custom strictly descending schedule in [0, T); replaces
                `num_inference_steps`.
            refine (`bool`, *optional*, defaults to `True`): refine each step by damped fixed-point iterations (see
                the module docstring). `False` is plain DDIM inversion (one UNet call per step).
            refine_iterations (`int`, *optional*, defaults to 6): most UNet calls spent refining one step, on top of
                the plain step's call.
            refine_tolerance (`float`, *optional*, defaults to 1e-5): stop refining a step once every sample's RMS
                residual ||step(x_t) - x_s|| (model scale, [-1, 1]) is at most this.
            return_reconstruction (`bool`, *optional*, defaults to `False`): also decode the latents back with the
                same schedule (eta = 0, no clipping) and return the images.
            output_type (`str`, *optional*, defaults to `"pil"`): format of the reconstruction: `"pil"`, `"np"`,
                `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`): return a `DDIMInversionPipelineOutput` rather
                than a tuple.

        Returns:
            [`DDIMInversionPipelineOutput`] or `tuple`: `(latents, images)`; `images` is `None` without
            `return_reconstruction`.
        """
        self._check_num_inference_steps(num_inference_steps, timesteps)
        self._check_output_type(output_type)
        self._check_refinement(refine_iterations, refine_tolerance)
        sample = self.preprocess(image)
        scheduler = self.inversion_scheduler()
        self._set_schedule(scheduler, num_inference_steps, timesteps)
        self._interrupt = False

        latents = self._invert(sample, scheduler, refine_iterations if refine else 0, refine_tolerance)
        images = None
        if return_reconstruction:
            reconstruction, _, _ = self._denoise(latents, scheduler)
            images = self.postprocess(reconstruction, output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (latents, images)
        return DDIMInversionPipelineOutput(latents=latents, images=images)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding and interpolation
    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def interpolate(
        self,
        latents_a: torch.Tensor,
        latents_b: torch.Tensor,
        num_frames: int = 8,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""Decode the spherical interpolation between two latents x_T (paper section 5.3).

        Frame f decodes `slerp(latents_a, latents_b, f / (num_frames - 1))` with the same deterministic, unclipped
        schedule as the reconstruction, so the first and last frames reproduce the images the latents were
        inverted from.

        Args:
            latents_a (`torch.Tensor`): x_T of the start, `(C, H, W)` or `(B, C, H, W)`.
            latents_b (`torch.Tensor`): x_T of the end, same shape as `latents_a`.
            num_frames (`int`, *optional*, defaults to 8): number of images along the path, ends included (>= 2).
            num_inference_steps (`int`, *optional*, defaults to 50): decoding steps.
            timesteps (`List[int]`, *optional*): a custom decoding schedule; replaces `num_inference_steps`.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`): return an `ImagePipelineOutput` rather than a
                tuple.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: `B * num_frames` images, pair-major: image `b * num_frames + f` is
            frame f of pair b.
        """
        if isinstance(latents_a, torch.Tensor) and latents_a.ndim == 3:
            latents_a = latents_a[None]
        if isinstance(latents_b, torch.Tensor) and latents_b.ndim == 3:
            latents_b = latents_b[None]
        if not isinstance(latents_a, torch.Tensor):
            raise ValueError(f"`latents_a` must be a torch.Tensor, got {type(latents_a).__name__}.")
        self._check_latents(latents_a, latents_a.shape[0], name="latents_a")
        self._check_latents(latents_b, latents_a.shape[0], name="latents_b")
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
            raise ValueError(f"`num_frames` must be an int >= 2 (both ends are included), got {num_frames!r}.")
        self._check_num_inference_steps(num_inference_steps, timesteps)
        self._check_output_type(output_type)
        scheduler = self.inversion_scheduler()
        self._set_schedule(scheduler, num_inference_steps, timesteps)
        self._interrupt = False

        device = self._execution_device
        latents_a, latents_b = latents_a.to(device), latents_b.to(device)
        fractions = np.linspace(0.0, 1.0, num_frames)
        frames = torch.stack([slerp(latents_a, latents_b, float(a)) for a in fractions], dim=1)  # (B, F, C, H, W)
        sample, _, _ = self._denoise(frames.flatten(0, 1), scheduler)
        images = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
