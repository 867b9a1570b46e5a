"""`DDIMPlusPipeline`: DDIM generation (x_T -> image) over a `UNet2DModel` and a `DDIMSchedulerPlus`.

Saved pipelines load three ways (see docs/pipelines.md):
- `DiffusionPipeline.from_pretrained(path_or_repo_id)` after `import ddim_plus` returns this class, because
  model_index.json names `"_class_name": "DDIMPlusPipeline"` and importing the package sets
  `diffusers.DDIMPlusPipeline`;
- stock `DDIMPipeline.from_pretrained(...)` still works without our package, because model_index.json lists the
  scheduler as `["diffusers", "DDIMScheduler"]` (scheduler_config.json keeps `"_class_name": "DDIMSchedulerPlus"`,
  which stock loaders ignore, and our extra config keys ride along as hidden config);
- `DDIMPlusPipeline.from_pretrained(<a DDPMPipeline or DDIMPipeline folder>)`: a stock `DDPMScheduler` or
  `DDIMScheduler` handed to `__init__` is upgraded to `DDIMSchedulerPlus` with the same config, so DDPM checkpoints
  sample with DDIM unchanged. Any other diffusers scheduler is kept as it is and sampled with.

Loading is diffusers' own `DiffusionPipeline.from_pretrained`: safetensors first, else pickled `.bin` weights through
`torch.load(weights_only=True)` (which refuses pickles that would run code), `variant`, `torch_dtype` / `dtype`.
"""

import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import ModelCard

from . import hub
from .scheduling_ddim_plus import DDIMSchedulerPlus

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# What model_index.json records for the scheduler: a class every diffusers install has, so the Hub download path and
# stock `DDIMPipeline.from_pretrained` accept the repo. Our `__init__` upgrades it back to `DDIMSchedulerPlus`.
_PORTABLE_SCHEDULER_ENTRY = ["diffusers", "DDIMScheduler"]


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


def _as_ddim_scheduler_plus(scheduler: SchedulerMixin) -> SchedulerMixin:
    """Upgrade a stock `DDPMScheduler` / `DDIMScheduler` (how model_index.json records ours, and what DDPM checkpoints
    hold) to `DDIMSchedulerPlus` with the same config; keep every other scheduler as the user chose it."""
    if type(scheduler) in (DDIMScheduler, DDPMScheduler):
        logger.info(f"Sampling with DDIMSchedulerPlus built from the {type(scheduler).__name__} config.")
        return DDIMSchedulerPlus.from_config(scheduler.config)
    if not isinstance(scheduler, SchedulerMixin) or not callable(getattr(scheduler, "step", None)):
        raise ValueError(
            f"`scheduler` must be a diffusers scheduler (DDIMSchedulerPlus, or any SchedulerMixin such as "
            f"DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler or EulerDiscreteScheduler), got "
            f"{type(scheduler).__name__}."
        )
    return scheduler


def _weights_file_used(component_folder: str, variant: Optional[str], use_safetensors: Optional[bool]) -> str:
    """The weights file diffusers read in `component_folder`, by its own order: safetensors unless
    `use_safetensors=False`, else the pickled `.bin`."""
    extensions = {True: ("safetensors",), False: ("bin",), None: ("safetensors", "bin")}[use_safetensors]
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    for extension in extensions:
        for name in (f"{stem}.{extension}", f"{stem}.{extension}.index.json"):
            if os.path.isfile(os.path.join(component_folder, name)):
                return os.path.join(component_folder, name)
    return component_folder


class DDIMPlusPipelineBase(DiffusionPipeline):
    """What the generation and the inversion pipelines share: the components, the portable model_index.json, input
    checks, the denoising loop and the conversion of samples to images.

    Args:
        unet ([`UNet2DModel`]): the denoiser.
        scheduler ([`SchedulerMixin`]): a `DDIMSchedulerPlus`; a stock `DDIMScheduler` or `DDPMScheduler` is
            converted with `DDIMSchedulerPlus.from_config(scheduler.config)`; any other diffusers scheduler (e.g.
            `DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`) is sampled with as it is. To sample with a stock
            `DDIMScheduler` or `DDPMScheduler` itself, assign it afterwards: `pipe.scheduler = DDPMScheduler(...)`.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=_as_ddim_scheduler_plus(scheduler))

    def to_json_string(self) -> str:
        """model_index.json with a `DDIMSchedulerPlus` recorded as `["diffusers", "DDIMScheduler"]` (see the module
        docstring); any other scheduler keeps its own entry, so it loads back as itself.

        Returns:
            `str`: the JSON text.
        """
        config = json.loads(super().to_json_string())
        if isinstance(self.components.get("scheduler"), DDIMSchedulerPlus):
            config["scheduler"] = list(_PORTABLE_SCHEDULER_ENTRY)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # ------------------------------------------------------------------------------------------------------------
    # Loading and publishing
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        r"""Load a saved pipeline (ours, or a stock `DDPMPipeline` / `DDIMPipeline`) as this class.

        This is [`DiffusionPipeline.from_pretrained`] with all its arguments (`variant`, `torch_dtype` or `dtype` as a
        dtype or a dict per component, `use_safetensors`, `revision`, ...). Safetensors are preferred; a folder or
        repo with only pickled `.bin` weights loads through `torch.load(weights_only=True)`, which refuses a pickle
        that would run code. The weights file read is logged (at info level).

        Returns:
            The pipeline; a stock `DDPMScheduler` or `DDIMScheduler` becomes a `DDIMSchedulerPlus`.
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        unet_folder = pipe.unet.config.get("_name_or_path", "")
        if os.path.isdir(unet_folder):
            weights = _weights_file_used(unet_folder, kwargs.get("variant"), kwargs.get("use_safetensors"))
            logger.info(f"Loaded the UNet weights from {weights}.")
        return pipe

    def model_card(self, repo_id: str, **sections) -> ModelCard:
        """The model card of this pipeline, from `ddim_plus.hub.make_model_card` with this class and scheduler config
        (so it lists the scheduler's tuned timestep schedules, if it has any).

        Args:
            repo_id (`str`): the Hub repo id (or folder name) shown in the card.
            sections: optional sections and metadata for `make_model_card` (`description`, `dataset_name`,
                `sample_images`, `metrics`, `training_config`, `license`, ...).

        Returns:
            `huggingface_hub.ModelCard`
        """
        return hub.make_model_card(repo_id, self.scheduler.config, pipeline_class=self.__class__.__name__, **sections)

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Union[int, str, None] = None,
        push_to_hub: bool = False,
        model_card: Optional[ModelCard] = None,
        **kwargs,
    ) -> None:
        """Save the components (safetensors by default), model_index.json and a model card (README.md), and with
        `push_to_hub=True` upload the folder.

        Args:
            save_directory (`str` or `os.PathLike`): where to save; created if missing.
            safe_serialization (`bool`, *optional*, defaults to `True`): write safetensors (not pickle).
            variant (`str`, *optional*): weights variant, e.g. `"fp16"`.
            max_shard_size (`int` or `str`, *optional*): largest checkpoint shard.
            push_to_hub (`bool`, *optional*, defaults to `False`): also upload to the Hub; `kwargs` may hold
                `repo_id` (defaults to the folder's name), `private`, `token`, `commit_message` and `create_pr`.
            model_card (`huggingface_hub.ModelCard`, *optional*): the card to write (see `model_card`); by default
                `self.model_card(repo_id)`, written only if the folder has no README.md yet (an edited card is kept).
        """
        super().save_pretrained(
            save_directory, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
        )
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
        card_path = os.path.join(save_directory, "README.md")
        if model_card is not None:
            model_card.save(card_path)
        elif not os.path.exists(card_path):
            self.model_card(repo_id).save(card_path)
        if push_to_hub:
            self._upload(save_directory, repo_id, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
    ) -> str:
        """Create (or reuse) the Hub repo `repo_id` and upload the saved pipeline and its model card to it.

        Args:
            repo_id (`str`): `"user/name"` or `"org/name"`.
            commit_message (`str`, *optional*): defaults to `"Upload <class name>"`.
            private (`bool`, *optional*): make a new repo private (an existing repo keeps its visibility).
            token (`str`, *optional*): Hub token; defaults to the stored login.
            create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.
            safe_serialization (`bool`, *optional*, defaults to `True`): upload safetensors.
            variant (`str`, *optional*): weights variant.

        Returns:
            `str`: the URL of the commit.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant, repo_id=repo_id)
            return self._upload(folder, repo_id, commit_message, private, token, create_pr)

    def _upload(self, folder, repo_id, commit_message=None, private=None, token=None, create_pr=False) -> str:
        commit_message = commit_message or f"Upload {self.__class__.__name__}"
        return hub.push_to_hub(folder, repo_id, commit_message, private=private, token=token, create_pr=create_pr)

    # ------------------------------------------------------------------------------------------------------------
    # Shapes and checks
    # ------------------------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        """(channels, height, width) of the UNet's samples."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    @staticmethod
    def _set_schedule(
        scheduler: DDIMSchedulerPlus, num_inference_steps: int, timesteps: Optional[Sequence[int]]
    ) -> None:
        """A custom `timesteps` list wins over `num_inference_steps`, which always has a default."""
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps)
        else:
            scheduler.set_timesteps(num_inference_steps)

    def _check_num_inference_steps(self, num_inference_steps: int, timesteps: Optional[Sequence[int]]) -> None:
        if timesteps is not None:
            return  # the scheduler validates custom timesteps before touching its state
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"`num_inference_steps` must be an int, got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` must be between 1 and the scheduler's `num_train_timesteps` "
                f"({num_train_timesteps}), got {num_inference_steps}."
            )

    @staticmethod
    def _check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

    def _check_latents(self, latents: torch.Tensor, batch_size: int, name: str = "latents") -> None:
        expected = (batch_size, *self.sample_shape)
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor of shape {expected}, got {type(latents).__name__}.")
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"`{name}` must have shape {expected} (batch, unet.in_channels, sample height, sample width), "
                f"got {tuple(latents.shape)}."
            )
        if latents.dtype != self.unet.dtype:
            raise ValueError(
                f"`{name}` has dtype {latents.dtype} but the UNet runs in {self.unet.dtype}; pass "
                f"`{name}.to({self.unet.dtype})`."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Denoising loop and output conversion
    # ------------------------------------------------------------------------------------------------------------
    def _denoise(
        self,
        latents: torch.Tensor,
        scheduler: SchedulerMixin,
        eta: float = 0.0,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        use_clipped_model_output: Optional[bool] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_trajectory: bool = False,
    ) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]], Optional[List[torch.Tensor]]]:
        """Run `scheduler` (already `set_timesteps`) from `latents` down to x_0.

        Returns:
            `tuple`: (x_0, the latents visited or None, the x_0 previews or None).
        """
        # Plain ints for the scheduler and one device tensor for the UNet: no host<->device sync inside the loop.
        timestep_list = scheduler.timesteps.tolist()
        timesteps_on_device = scheduler.timesteps.to(latents.device)
        if latents.device.type == "cpu":
            # PyTorch's CPU convolutions run about 7% faster on channels-last inputs (benchmarks/bench_pipeline.py);
            # the scheduler's elementwise steps keep the layout. Values are unchanged up to float rounding.
            latents = latents.contiguous(memory_format=torch.channels_last)
        trajectory = [latents] if return_trajectory else None
        previews = [] if return_trajectory else None
        extra_step_kwargs = self.prepare_extra_step_kwargs(
            scheduler, generator=generator, eta=eta, use_clipped_model_output=use_clipped_model_output
        )
        needs_preview = "pred_original_sample" in callback_on_step_end_tensor_inputs
        self._num_timesteps = len(timestep_list)
        for i, t in enumerate(self.progress_bar(timestep_list)):
            if self.interrupt:
                break
            # scale_model_input is the identity for DDIM; Euler-type schedulers divide by sqrt(sigma^2 + 1) here
            model_input = scheduler.scale_model_input(latents, t)
            model_output = self.unet(model_input, timesteps_on_device[i]).sample
            step = scheduler.step(model_output, t, latents, **extra_step_kwargs)
            latents = step.prev_sample
            pred_original_sample = getattr(step, "pred_original_sample", None)
            if pred_original_sample is None and (return_trajectory or needs_preview):
                raise ValueError(
                    f"{type(scheduler).__name__}.step returns no `pred_original_sample`, so `return_trajectory` and "
                    "`callback_on_step_end_tensor_inputs=['pred_original_sample']` are unavailable with it; use "
                    "DDIMSchedulerPlus, DDIMScheduler, DDPMScheduler or EulerDiscreteScheduler."
                )
            if callback_on_step_end is not None:
                local_tensors = {"latents": latents, "pred_original_sample": pred_original_sample}
                callback_kwargs = {k: local_tensors[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
            if return_trajectory:
                trajectory.append(latents)
                previews.append(pred_original_sample)
        return latents, trajectory, previews

    @staticmethod
    def prepare_extra_step_kwargs(scheduler: SchedulerMixin, **kwargs) -> Dict[str, Any]:
        """The keyword arguments of `kwargs` that `scheduler.step` takes, as diffusers' pipelines pass `eta` and
        `generator` only to schedulers that accept them.

        Returns:
            `dict`
        """
        accepted = inspect.signature(scheduler.step).parameters
        return {name: value for name, value in kwargs.items() if name in accepted}

    def postprocess(
        self, sample: torch.Tensor, output_type: str
    ) -> Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]:
        """Map a sample from the model's [-1, 1] scale to images.

        Args:
            sample (`torch.Tensor`): shape `(batch, C, H, W)`.
            output_type (`str`): `"pil"` (list of PIL images, mode "L" for one channel), `"np"` (float array
                `(batch, H, W, C)` in [0, 1]), `"pt"` (tensor `(batch, C, H, W)` in [0, 1]) or `"latent"` (`sample`
                unchanged).

        Returns:
            The images.
        """
        if output_type == "latent":
            return sample
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image

    @property
    def num_timesteps(self) -> int:
        """Number of steps of the last (or current) loop."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` from a callback to stop the loop after the current step."""
        return getattr(self, "_interrupt", False)


class DDIMPlusPipeline(DDIMPlusPipelineBase):
    r"""DDIM generation (Song, Meng & Ermon 2021): from Gaussian x_T to images with eq. 12.

    This model inherits from [`DiffusionPipeline`]; see it for loading, saving and device placement.

    Args:
        unet ([`UNet2DModel`]): the denoiser.
        scheduler ([`SchedulerMixin`]): a `DDIMSchedulerPlus`; a stock `DDIMScheduler` or `DDPMScheduler` is
            converted with `DDIMSchedulerPlus.from_config(scheduler.config)`; any other diffusers scheduler (e.g.
            `DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`) is sampled with as it is. To sample with a stock
            `DDIMScheduler` or `DDPMScheduler` itself, assign it afterwards: `pipe.scheduler = DDPMScheduler(...)`.
    """

    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def check_inputs(
        self,
        batch_size: int,
        generator: Union[torch.Generator, List[torch.Generator], None],
        eta: float,
        num_inference_steps: int,
        timesteps: Optional[Sequence[int]],
        latents: Optional[torch.Tensor],
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
        use_clipped_model_output: Optional[bool] = None,
    ) -> None:
        """Raise a `ValueError` naming the first bad argument; runs before any work."""
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
        if timesteps is not None and "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            raise ValueError(
                f"`timesteps` given, but {type(self.scheduler).__name__}.set_timesteps takes no custom timesteps: "
                "pass `num_inference_steps` instead, or use DDIMSchedulerPlus."
            )
        if eta > 0 and isinstance(self.scheduler, DDIMSchedulerPlus) and self.scheduler.config.ddim_solver_order == 2:
            raise ValueError(
                f"`eta`={eta}, but the scheduler has `ddim_solver_order`=2, a deterministic solver: use `eta`=0, or a "
                "scheduler with `ddim_solver_order`=1."
            )
        self._check_num_inference_steps(num_inference_steps, timesteps)
        if latents is not None:
            self._check_latents(latents, batch_size)
        self._check_output_type(output_type)
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {unknown}."
            )

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
                (batch_size, *self.sample_shape),
                generator=generator,
                device=self._execution_device,
                dtype=self.unet.dtype,
            )
        else:
            latents = latents.to(self._execution_device)
        return latents * self.scheduler.init_noise_sigma

    @torch.inference_mode()
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
        self.check_inputs(
            batch_size,
            generator,
            eta,
            num_inference_steps,
            timesteps,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
            use_clipped_model_output,
        )
        self._interrupt = False

        self._set_schedule(self.scheduler, num_inference_steps, timesteps)
        latents = self.prepare_latents(batch_size, generator, latents)

        sample, trajectory, previews = self._denoise(
            latents,
            self.scheduler,
            eta=eta,
            generator=generator,
            use_clipped_model_output=use_clipped_model_output,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            return_trajectory=return_trajectory,
        )
        images = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()

        if return_trajectory:
            trajectory = torch.stack(trajectory)
            # an interrupt before the first step leaves no preview: an empty stack keeps the documented shape
            previews = torch.stack(previews) if previews else sample.new_zeros((0, *sample.shape))
            if not return_dict:
                return (images, trajectory, previews)
            return DDIMPlusPipelineOutput(images=images, trajectory=trajectory, pred_original_samples=previews)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
