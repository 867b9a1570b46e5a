"""`DDIMPlusPipeline`: DDIM generation (x_T -> image) over a `UNet2DModel` and a `DDIMSchedulerPlus`.

Loading and saving (`from_pretrained`, the portable model_index.json, `save_pretrained`, `push_to_hub`) are
`DDIMPlusPipelineBase`'s, in ddim_plus/pipeline_utils.py.
"""

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from . import ddim_math as dm
from .pipeline_utils import DDIMPlusPipelineBase, check_latents, check_output_type, postprocess, sample_shape
from .scheduling_ddim_plus import DDIMSchedulerPlus, check_int_in_range

logger = logging.get_logger(__name__)


@dataclass
class DDIMPlusPipelineOutput(ImagePipelineOutput):
    """Output of `DDIMPlusPipeline` with `return_trajectory=True`.

    Args:
        images (`List[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the generated images, as `output_type` asks.
        trajectory (`torch.Tensor`): the latents x_T, ..., x_0 visited, shape `(num_steps + 1, batch, C, H, W)`.
        pred_original_samples (`torch.Tensor`): the x_0 predicted at each step (after clipping or thresholding), shape
            `(num_steps, batch, C, H, W)`, in the model's [-1, 1] scale.
    """

    trajectory: Optional[torch.Tensor] = None
    pred_original_samples: Optional[torch.Tensor] = None


class DDIMPlusPipeline(DDIMPlusPipelineBase):
    r"""DDIM generation (Song, Meng & Ermon 2021): from Gaussian x_T to images with eq. 12.

    This model inherits from [`DiffusionPipeline`]; see it for loading, saving and device placement.

    Args:
        unet ([`UNet2DModel`]): the denoiser.
        scheduler ([`SchedulerMixin`]): a `DDIMSchedulerPlus`; a stock `DDIMScheduler` or `DDPMScheduler` is
            converted with `DDIMSchedulerPlus.from_config(scheduler.config)`; any other diffusers scheduler (e.g.
            `DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`) is sampled with as it is. To sample with a stock
            `DDIMScheduler` or `DDPMScheduler` itself, assign it afterwards: `pipe.scheduler = DDPMScheduler(...)`.
            Another scheduler whose config holds ddim_plus's own spacing (`quadratic`, `logsnr`, as
            `from_config(pipe.scheduler.config)` of a trained model gives) samples at that spacing's timesteps when
            its `set_timesteps` takes `timesteps`, and is refused with the fix before any UNet call otherwise.
    """

    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def check_inputs(
        self,
        batch_size: int,
        generator: Union[torch.Generator, List[torch.Generator], None],
        eta: float,
        timesteps: Optional[List[int]],
        latents: Optional[torch.Tensor],
        output_type: str,
        callback_on_step_end_tensor_inputs: List[str],
        use_clipped_model_output: Optional[bool] = None,
    ) -> None:
        """Raise a `ValueError` naming the first bad argument; runs before any work. The number of steps is
        checked by the scheduler's `set_timesteps`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but `batch_size` is {batch_size}: pass one "
                f"generator per image, or a single generator."
            )
        if not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"`eta` must be a number >= 0 (0 = deterministic DDIM, 1 = DDPM), got {eta!r}.")
        if eta > 1:
            logger.warning(f"`eta`={eta} > 1 adds more noise than DDPM (eta = 1); results may degrade.")
        step_parameters = inspect.signature(self.scheduler.step).parameters
        if eta > 0 and "eta" not in step_parameters:
            raise ValueError(
                f"`eta`={eta}, but {type(self.scheduler).__name__}.step takes no `eta`: use `eta`=0, or "
                "DDIMSchedulerPlus (or DDIMScheduler) for stochastic DDIM."
            )
        if use_clipped_model_output and "use_clipped_model_output" not in step_parameters:
            raise ValueError(
                f"`use_clipped_model_output`=True, but {type(self.scheduler).__name__}.step does not take it; leave "
                "it unset or use DDIMSchedulerPlus."
            )
        takes_timesteps = "timesteps" in inspect.signature(self.scheduler.set_timesteps).parameters
        if timesteps is not None and not takes_timesteps:
            raise ValueError(
                f"`timesteps` given, but {type(self.scheduler).__name__}.set_timesteps takes no custom timesteps: "
                "pass `num_inference_steps` instead, or use DDIMSchedulerPlus."
            )
        spacing = self.scheduler.config.get("timestep_spacing")
        if timesteps is None and self.own_spacing_on_foreign_scheduler() and not takes_timesteps:
            name = type(self.scheduler).__name__
            raise ValueError(
                f"{name} has no {spacing!r} timestep spacing (ddim_plus's own, from this pipeline's scheduler config) "
                f"and its `set_timesteps` takes no `timesteps`: build it with a stock spacing, "
                f'`{name}.from_config(pipe.scheduler.config, timestep_spacing="trailing")`, or sample with '
                "DDIMSchedulerPlus."
            )
        if latents is not None:
            check_latents(latents, self.unet, batch_size)
        check_output_type(output_type)
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {unknown}."
            )

    def own_spacing_on_foreign_scheduler(self) -> bool:
        """Whether `self.scheduler` is another diffusers scheduler whose config holds one of ddim_plus's own
        spacings (`quadratic`, `logsnr`), as `from_config(pipe.scheduler.config)` of a ddim_plus config gives; stock
        schedulers raise `ValueError` in `set_timesteps` on those."""
        spacing = self.scheduler.config.get("timestep_spacing")
        own = spacing in dm.TIMESTEP_SPACINGS and spacing not in dm.DIFFUSERS_TIMESTEP_SPACINGS
        return own and not isinstance(self.scheduler, DDIMSchedulerPlus)

    def own_spacing_timesteps(self, num_inference_steps: int) -> List[int]:
        """The timesteps DDIMSchedulerPlus visits for `num_inference_steps` with this config's spacing, for another
        scheduler (`own_spacing_on_foreign_scheduler`) whose `set_timesteps` takes a `timesteps` list."""
        config = self.scheduler.config
        T = config.num_train_timesteps
        check_int_in_range("num_inference_steps", num_inference_steps, 1, T, f"`num_train_timesteps`={T}")
        return dm.timesteps_for_spacing(
            config.timestep_spacing,
            int(num_inference_steps),
            T,
            config.get("steps_offset", 0),
            alphas_cumprod=getattr(self.scheduler, "alphas_cumprod", None),
        ).tolist()

    def prepare_latents(
        self,
        batch_size: int,
        generator: Union[torch.Generator, List[torch.Generator], None],
        latents: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """x_T: `latents` moved to the execution device, or fresh noise drawn exactly as stock `DDIMPipeline` does
        (so one seeded generator gives the same images in both).

        Returns:
            `torch.Tensor`: x_T scaled by the scheduler's `init_noise_sigma`.
        """
        if latents is None:
            latents = randn_tensor(
                (batch_size, *sample_shape(self.unet)),
                generator=generator,
                device=self._execution_device,
                dtype=self.unet.dtype,
            )
        else:
            latents = latents.to(self._execution_device)
        return latents * self.scheduler.init_noise_sigma

    @staticmethod
    def prepare_extra_step_kwargs(scheduler: SchedulerMixin, **kwargs) -> Dict[str, Any]:
        """The keyword arguments of `kwargs` that `scheduler.step` takes, as diffusers' pipelines pass `eta` and
        `generator` only to schedulers that accept them.

        Returns:
            `dict`
        """
        accepted = inspect.signature(scheduler.step).parameters
        return {name: value for name, value in kwargs.items() if name in accepted}

    @property
    def num_timesteps(self) -> int:
        """Number of steps of the last (or current) loop."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` from a callback to stop the loop after the current step."""
        return getattr(self, "_interrupt", False)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        latents: Optional[torch.Tensor] = None,
        use_clipped_model_output: Optional[bool] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Union[
            Callable[..., Dict[str, Any]], PipelineCallback, MultiPipelineCallbacks, None
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers' public signature)
        return_trajectory: bool = False,
    ) -> Union[ImagePipelineOutput, DDIMPlusPipelineOutput, Tuple]:
        r"""Generate images.

        Args:
            batch_size (`int`, *optional*, defaults to 1): number of images.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): source of x_T (and of the noise of
                stochastic steps); a list gives one generator per image, so image i depends on `generator[i]` only.
            eta (`float`, *optional*, defaults to 0.0): eq. 16's noise weight: 0 is deterministic DDIM, 1 is DDPM.
                Ignored by a scheduler with `sigma_type="sigma_hat"`. Passed only to schedulers whose `step` takes
                it; > 0 with any other scheduler is an error.
            num_inference_steps (`int`, *optional*, defaults to 50): number of steps S, 1 <= S <= T, spaced by the
                scheduler's `timestep_spacing`.
            timesteps (`List[int]`, *optional*): a custom strictly descending schedule in [0, T); replaces
                `num_inference_steps`.
            latents (`torch.Tensor`, *optional*): x_T, shape `(batch_size, C, H, W)` in the UNet's dtype. With
                `eta`=0 the output is a deterministic function of it.
            use_clipped_model_output (`bool`, *optional*): re-derive eps from the clipped x_0 (see
                `DDIMSchedulerPlus.step`); `None` does so whenever the scheduler clips or thresholds x_0.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (the raw
                sample in [-1, 1], unclamped).
            return_dict (`bool`, *optional*, defaults to `True`): return an output object rather than a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after each step as `callback_on_step_end(pipe, i, t, callback_kwargs)`; the dict it returns may replace
                `"latents"`. Set `pipe._interrupt = True` in it to stop early.
            callback_on_step_end_tensor_inputs (`List[str]`, *optional*, defaults to `["latents"]`): which tensors
                `callback_kwargs` holds, among `"latents"` and `"pred_original_sample"`.
            return_trajectory (`bool`, *optional*, defaults to `False`): also return every latent visited and every
                x_0 preview (a `DDIMPlusPipelineOutput`).

        Returns:
            [`ImagePipelineOutput`], [`DDIMPlusPipelineOutput`] (with `return_trajectory`) or `tuple`: the images
            (and, with `return_trajectory`, the trajectory and the x_0 previews).

        Examples:

        ```py
        >>> import torch
        >>> import ddim_plus  # registers DDIMPlusPipeline on diffusers
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/saved/pipeline")
        >>> images = pipe(batch_size=4, num_inference_steps=20, generator=torch.manual_seed(0)).images
        ```
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        # 1. Check inputs; the number of steps is checked by the scheduler's `set_timesteps` below
        self.check_inputs(
            batch_size,
            generator,
            eta,
            timesteps,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
            use_clipped_model_output,
        )
        self._interrupt = False

        # 2. Set the timesteps: a custom `timesteps` list wins over `num_inference_steps`, which always has a default.
        # Another scheduler built from a ddim_plus config gets that config's spacing as a list: stock schedulers
        # know only diffusers' spacings.
        if timesteps is None and self.own_spacing_on_foreign_scheduler():
            timesteps = self.own_spacing_timesteps(num_inference_steps)
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps)
        else:
            self.scheduler.set_timesteps(num_inference_steps)
        # plain ints for the scheduler and one device tensor for the UNet: no host<->device sync inside the loop
        timestep_list = self.scheduler.timesteps.tolist()
        timesteps_on_device = self.scheduler.timesteps.to(self._execution_device)
        self._num_timesteps = len(timestep_list)

        # 3. Sample x_T
        latents = self.prepare_latents(batch_size, generator, latents)
        if latents.device.type == "cpu":
            # PyTorch's CPU convolutions run faster on channels-last inputs (benchmarks/bench_pipeline.py measures
            # it); the scheduler's elementwise steps keep the layout. Values are unchanged up to float rounding.
            latents = latents.contiguous(memory_format=torch.channels_last)
        trajectory = [latents] if return_trajectory else None
        previews = [] if return_trajectory else None

        # 4. Denoising loop: eq. 12 from x_T to x_0
        extra_step_kwargs = self.prepare_extra_step_kwargs(
            self.scheduler, generator=generator, eta=eta, use_clipped_model_output=use_clipped_model_output
        )
        needs_preview = "pred_original_sample" in callback_on_step_end_tensor_inputs
        for i, t in enumerate(self.progress_bar(timestep_list)):
            if self.interrupt:
                break
            # scale_model_input is the identity for DDIM; Euler-type schedulers divide by sqrt(sigma^2 + 1) here
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.unet(model_input, timesteps_on_device[i]).sample
            step = self.scheduler.step(model_output, t, latents, **extra_step_kwargs)
            latents = step.prev_sample
            pred_original_sample = getattr(step, "pred_original_sample", None)
            if pred_original_sample is None and (return_trajectory or needs_preview):
                raise ValueError(
                    f"{type(self.scheduler).__name__}.step returns no `pred_original_sample`, so `return_trajectory` "
                    "and `callback_on_step_end_tensor_inputs=['pred_original_sample']` are unavailable with it; use "
                    "DDIMSchedulerPlus, DDIMScheduler, DDPMScheduler or EulerDiscreteScheduler."
                )
            if callback_on_step_end is not None:
                local_tensors = {"latents": latents, "pred_original_sample": pred_original_sample}
                callback_kwargs = {k: local_tensors[k] for k in callback_on_step_end_tensor_inputs}
                # the timestep as diffusers' pipelines pass it: a tensor on the execution device
                callback_outputs = callback_on_step_end(self, i, timesteps_on_device[i], callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
            if return_trajectory:
                trajectory.append(latents)
                previews.append(pred_original_sample)

        # 5. Post-process
        images = postprocess(latents, output_type)
        self.maybe_free_model_hooks()

        if return_trajectory:
            trajectory = torch.stack(trajectory).contiguous()
            # an interrupt before the first step leaves no preview: an empty stack keeps the documented shape
            previews = torch.stack(previews).contiguous() if previews else latents.new_zeros((0, *latents.shape))
            if not return_dict:
                return (images, trajectory, previews)
            return DDIMPlusPipelineOutput(images=images, trajectory=trajectory, pred_original_samples=previews)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
