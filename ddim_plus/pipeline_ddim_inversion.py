"""`DDIMInversionPipeline`: images -> x_T (DDIM inversion, paper section 5.4), reconstruction and interpolation.

Inversion is `ddim_plus.invert` (ddim_plus/inversion.py) over this pipeline's UNet: plain DDIM inversion, or each
step refined by an Anderson-accelerated fixed-point iteration (measured in docs/results.md, Table 2).

Clipping or thresholding x_0 cannot be inverted (many x_t map to the same clipped x_0), so inversion, reconstruction
and interpolation all run the deterministic first-order DDIM ODE with clipping and thresholding off, through a private
copy of the scheduler (`ddim_plus.inversion_scheduler`); the pipeline's own scheduler is left untouched.
"""

from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import ImagePipelineOutput
from diffusers.utils import BaseOutput

from .ddim_math import slerp
from .images import ImageInput, to_image_tensor
from .inversion import InversionRefinement, inversion_scheduler, invert, make_denoiser
from .pipeline_utils import DDIMPlusPipelineBase, check_latents, check_output_type, postprocess, sample_shape
from .scheduling_ddim_plus import DDIMSchedulerPlus


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
        return inversion_scheduler(self.scheduler)

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Images in [0, 1] (diffusers' convention) -> a batch in the model's [-1, 1] scale.

        Args:
            image: a PIL image or a list of them (mode "L" for one channel, "RGB" for three); a float numpy array
                `(H, W, C)` or `(B, H, W, C)`; a float tensor `(C, H, W)` or `(B, C, H, W)`; or a list of arrays or
                tensors, one image each (read by `ddim_plus.images.to_image_tensor`). Sizes and channels must match
                the UNet: nothing is resized or converted.

        Returns:
            `torch.Tensor`: `(B, C, H, W)` on the execution device in the UNet's dtype.
        """
        image = to_image_tensor(image, name="image", dtype=self.unet.dtype)
        if image.shape[0] == 0:
            raise ValueError("`image` is an empty batch; pass at least one image.")
        channels, height, width = sample_shape(self.unet)
        if tuple(image.shape[1:]) != (channels, height, width):
            got_c, got_h, got_w = image.shape[1:]
            raise ValueError(
                f"`image` has {got_c} channel(s) of {got_h}x{got_w} but the UNet takes {channels} channel(s) of "
                f"{height}x{width} (`unet.config.in_channels`, `unet.config.sample_size`); resize or convert first."
            )
        return (image.to(device=self._execution_device) * 2.0) - 1.0

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        refine: Union[bool, InversionRefinement] = True,
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
            refine (`bool` or `ddim_plus.InversionRefinement`, *optional*, defaults to `True`): refine each step by
                an Anderson-accelerated fixed-point iteration (see `ddim_plus.invert`), with the default
                `InversionRefinement()` (at most 10 extra UNet calls per step, tolerance 1e-5) or the one given.
                `False` is plain DDIM inversion (one UNet call per step).
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
        check_output_type(output_type)
        sample = self.preprocess(image)
        latents = invert(
            make_denoiser(self.unet),
            sample,
            self.scheduler,
            num_inference_steps,
            timesteps,
            refine=refine,
            progress_bar=self.progress_bar,
        )
        images = None
        if return_reconstruction:
            images = postprocess(self.decode(latents, num_inference_steps, timesteps), output_type)
        self.maybe_free_model_hooks()
        latents = latents.contiguous()  # NCHW, whatever layout the images came in (numpy images are channels-last)

        if not return_dict:
            return (latents, images)
        return DDIMInversionPipelineOutput(latents=latents, images=images)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding and interpolation
    # ------------------------------------------------------------------------------------------------------------
    def decode(
        self, latents: torch.Tensor, num_inference_steps: int = 50, timesteps: Optional[List[int]] = None
    ) -> torch.Tensor:
        r"""Decode latents x_T with `inversion_scheduler()`: the deterministic, unclipped DDIM ODE that inversion
        runs backwards, so decoding what `__call__` returns with the same schedule gives back its images.

        Args:
            latents (`torch.Tensor`): x_T, `(B, C, H, W)`, on the execution device in the UNet's dtype.
            num_inference_steps (`int`, *optional*, defaults to 50): number of steps S; checked by the scheduler.
            timesteps (`List[int]`, *optional*): a custom schedule; replaces `num_inference_steps`.

        Returns:
            `torch.Tensor`: x_0 in the model's [-1, 1] scale (see `ddim_plus.pipeline_utils.postprocess`).
        """
        scheduler = self.inversion_scheduler()
        scheduler.set_timesteps(num_inference_steps if timesteps is None else None, timesteps=timesteps)
        timesteps_on_device = scheduler.timesteps.to(latents.device)
        if latents.device.type == "cpu":
            latents = latents.contiguous(memory_format=torch.channels_last)  # faster convolutions, as in generation
        for i, t in enumerate(self.progress_bar(scheduler.timesteps.tolist())):
            model_output = self.unet(latents, timesteps_on_device[i]).sample
            latents = scheduler.step(model_output, t, latents).prev_sample
        return latents.contiguous()  # NCHW, as the loop's layout is an implementation detail

    @torch.no_grad()
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
        check_latents(latents_a, self.unet, latents_a.shape[0], name="latents_a")
        check_latents(latents_b, self.unet, latents_a.shape[0], name="latents_b")
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
            raise ValueError(f"`num_frames` must be an int >= 2 (both ends are included), got {num_frames!r}.")
        check_output_type(output_type)

        device = self._execution_device
        latents_a, latents_b = latents_a.to(device), latents_b.to(device)
        fractions = np.linspace(0.0, 1.0, num_frames)
        frames = torch.stack([slerp(latents_a, latents_b, float(a)) for a in fractions], dim=1)  # (B, F, C, H, W)
        images = postprocess(self.decode(frames.flatten(0, 1), num_inference_steps, timesteps), output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
