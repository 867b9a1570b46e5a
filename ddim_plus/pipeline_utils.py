"""What `DDIMPlusPipeline` and `DDIMInversionPipeline` share: `DDIMPlusPipelineBase`, which loads and saves them,
and the small conversions both use (sample shape, latents and `output_type` checks, samples -> images).

Saved pipelines load three ways (see docs/pipelines.md):
- `DiffusionPipeline.from_pretrained(path_or_repo_id)` after `import ddim_plus` returns the saved class, because
  model_index.json names it (`"_class_name": "DDIMPlusPipeline"`) and importing the package sets
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

import json
import os
import tempfile
from typing import List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from huggingface_hub import ModelCard

from . import hub
from .scheduling_ddim_plus import DDIMSchedulerPlus, as_ddim_scheduler_plus

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# What model_index.json records for the scheduler: a class every diffusers install has, so the Hub download path and
# stock `DDIMPipeline.from_pretrained` accept the repo. Our `__init__` upgrades it back to `DDIMSchedulerPlus`.
_PORTABLE_SCHEDULER_ENTRY = ["diffusers", "DDIMScheduler"]


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
    """Loading and saving for the generation and the inversion pipelines: the components, the portable
    model_index.json, `from_pretrained`, `save_pretrained` and `push_to_hub`.

    Args:
        unet ([`UNet2DModel`]): the denoiser.
        scheduler ([`SchedulerMixin`]): a stock `DDIMScheduler` or `DDPMScheduler` becomes a `DDIMSchedulerPlus`
            with the same config; any other scheduler is kept (see `DDIMPlusPipeline`).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=as_ddim_scheduler_plus(scheduler))

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
                `repo_id` (defaults to the folder's name), `private`, `token`, `commit_message` and `create_pr`. A
                card already on the Hub is kept, with the sections ddim_plus writes replaced; the folder's README.md
                becomes that merged card.
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

        A card already in the repo (one edited on the Hub) is kept, as diffusers' `load_or_create_model_card` keeps
        it: only the sections ddim_plus writes are replaced (see `ddim_plus.hub.merge_model_card`).

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


def sample_shape(unet: UNet2DModel) -> Tuple[int, int, int]:
    """(channels, height, width) of the UNet's samples."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, height, width)


def check_latents(latents: torch.Tensor, unet: UNet2DModel, batch_size: int, name: str = "latents") -> None:
    """Raise a `ValueError` naming `name` unless `latents` is a `(batch_size, C, H, W)` tensor in the UNet's dtype."""
    expected = (batch_size, *sample_shape(unet))
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape {expected}, got {type(latents).__name__}.")
    if tuple(latents.shape) != expected:
        raise ValueError(
            f"`{name}` must have shape {expected} (batch, unet.in_channels, sample height, sample width), "
            f"got {tuple(latents.shape)}."
        )
    if latents.dtype != unet.dtype:
        raise ValueError(
            f"`{name}` has dtype {latents.dtype} but the UNet runs in {unet.dtype}; pass `{name}.to({unet.dtype})`."
        )


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")


def postprocess(sample: torch.Tensor, output_type: str) -> Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]:
    """Map a sample from the model's [-1, 1] scale to images.

    Args:
        sample (`torch.Tensor`): shape `(batch, C, H, W)`.
        output_type (`str`): `"pil"` (list of PIL images, mode "L" for one channel), `"np"` (float array
            `(batch, H, W, C)` in [0, 1]), `"pt"` (contiguous tensor `(batch, C, H, W)` in [0, 1]) or `"latent"`
            (`sample`'s values, as a contiguous tensor).

    Returns:
        The images.
    """
    if output_type == "latent":
        return sample.contiguous()  # NCHW as diffusers returns it, whatever layout the denoising loop used
    image = (sample / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image.contiguous()
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return DiffusionPipeline.numpy_to_pil(image) if output_type == "pil" else image
