"""The trainer's command line: its flags (diffusers' train_unconditional names), their validation, the UNet and
noise schedule they describe, and the checks of the data and output folder done before anything is written."""

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import os
import re
from typing import Optional, Tuple

import torch
from accelerate.logging import get_logger
from diffusers import UNet2DModel

from ddim_plus import ddim_math
from ddim_plus.scheduling_ddim_plus import DDIMSchedulerPlus
from ddim_plus.training.checkpoints import (
    RUN_RECORD_NAME,
    compare_run_records,
    data_fingerprint,
    find_run_outputs,
    read_run_record,
    resolve_checkpoint,
)
from ddim_plus.training.data import (
    DIGITS_DATASET_NAME,
    check_images,
    find_image_column,
    load_image_dataset,
)

logger = get_logger(__name__, log_level="INFO")

# Samples shown in each final grid; only data with a quality metric (the bundled digits) needs more.
GRID_SAMPLES = 64
# The values of the flags a user leaves out that depend on the data: the bundled digits keep the recipe the demo is
# tuned with; any other data gets diffusers' train_unconditional's defaults.
DIGITS_RECIPE = {
    "resolution": 8,
    "learning_rate": 1e-3,
    "train_batch_size": 64,
    "lr_warmup_steps": 100,
    "output_dir": "ddim-plus-digits",
}
ANCHOR_RECIPE = {
    "resolution": 64,
    "learning_rate": 1e-4,
    "train_batch_size": 16,
    "lr_warmup_steps": 500,
    "output_dir": "ddim-plus-model",
}
RECIPE_HELP = "default: the bundled digits' recipe on them, train_unconditional's on other data (see the log)"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# The flags that shape a run's trajectory: a checkpoint records them, and resuming with any of them changed would
# silently continue another run (`max_train_steps` is recorded too, but only warned about).
RUN_FLAGS = (
    "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "resolution", "center_crop",
    "random_flip", "preserve_input_precision", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule",
    "rescale_betas_zero_snr", "snr_gamma", "noise_offset", "seed", "train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "use_ema", "ema_inv_gamma", "ema_power", "ema_max_decay",
    "pretrained_model_name_or_path", "revision", "variant",
)  # fmt: skip


class InputError(ValueError):
    """Bad flags or data, found before training starts: the command line prints the message, not a traceback."""


def as_flags(message: str) -> str:
    """The message of a library error with each parameter that is also a flag spelled as the flag (`--name`)."""
    return re.sub(
        r"`(\w+)`", lambda match: f"`--{match.group(1)}`" if match.group(1) in FLAG_NAMES else match.group(0), message
    )


@contextlib.contextmanager
def input_errors():
    """Report the `ValueError`s of the checks inside as `InputError`s naming flags (a `ValueError` during training is
    a bug). The library's errors name its parameters, which carry the flags' names."""
    try:
        yield
    except ValueError as error:
        raise InputError(as_flags(str(error))) from error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` with each flag's default (an unset default is said in the help's words, not as `None`)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line (diffusers' train_unconditional flag names, plus DDIM sampling and the digits defaults), with
    `description` (the trainer's usage) at the top of `--help`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add = parser.add_argument
    # Data
    add("--dataset_name", default=DIGITS_DATASET_NAME, help="'digits' (bundled, offline), a Hub id or a local path")
    add("--dataset_config_name", default=None, help="configuration of the dataset, if it has several")
    add("--train_data_dir", default=None, help="a folder of images (imagefolder); used instead of --dataset_name")
    add("--cache_dir", default=None, help="where datasets are cached")
    add("--image_column", default=None, help="column holding the images (default: the first image column)")
    add(
        "--resolution",
        type=int,
        default=None,
        help=f"side of the square training images (default: {DIGITS_RECIPE['resolution']} for the bundled digits, "
        f"their own; {ANCHOR_RECIPE['resolution']} for other data, as train_unconditional)",
    )
    add("--center_crop", action="store_true", help="crop the centre (default: a random crop)")
    add(
        "--preserve_input_precision",
        action="store_true",
        help="keep 16-bit and float grayscale images in float instead of rounding them to 8 bits",
    )
    add("--random_flip", action="store_true", help="flip images left-right at random (not for digits!)")
    add("--dataloader_num_workers", type=int, default=0, help="data-loading subprocesses (0: in the main one)")
    # Model and diffusion
    add(
        "--model_config_name_or_path",
        default=None,
        help="UNet2DModel config: a folder or Hub id holding config.json, or that file (default: a small UNet below "
        "32 pixels, train_unconditional's UNet from 32)",
    )
    add(
        "--pretrained_model_name_or_path",
        default=None,
        help="fine-tune the UNet of this DDPM/DDIM pipeline (folder or Hub id), keeping its noise schedule",
    )
    add("--revision", default=None, help="Hub revision of --pretrained_model_name_or_path")
    add("--variant", default=None, help="weights variant of --pretrained_model_name_or_path, e.g. fp16")
    add(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="use xformers' attention if installed; without it PyTorch's scaled_dot_product_attention (diffusers' "
        "default) is already memory-efficient",
    )
    add("--prediction_type", default="epsilon", choices=ddim_math.PREDICTION_TYPES, help="what the UNet predicts")
    add("--ddpm_num_steps", type=int, default=1000, help="diffusion steps T of the training noise schedule")
    add("--ddpm_beta_schedule", default="linear", choices=ddim_math.BETA_SCHEDULES, help="betas of the noise schedule")
    add("--rescale_betas_zero_snr", action="store_true", help="rescale betas to zero terminal SNR (Lin et al.)")
    add("--snr_gamma", type=float, default=None, help="min-SNR loss weighting with this gamma (5.0 is usual)")
    add("--noise_offset", type=float, default=0.0, help="scale of the per-channel offset added to the noise")
    # Sampling with DDIM
    add(
        "--ddim_num_inference_steps",
        "--ddpm_num_inference_steps",
        type=int,
        default=20,
        help="DDIM steps of the grids drawn during training (--ddpm_num_inference_steps: train_unconditional's name)",
    )
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta of the samples (0: deterministic DDIM)")
    add(
        "--clip_sample",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="saved sampling config: clip x_0 to [-1, 1] (eps is re-derived from it, so DDIM still converges in S)",
    )
    add(
        "--timestep_spacing",
        default="logsnr",
        choices=ddim_math.TIMESTEP_SPACINGS,
        help="saved sampling config: DDIM step spacing (logsnr suits order 2; trailing or quadratic suit order 1)",
    )
    add(
        "--ddim_solver_order",
        type=int,
        default=2,
        choices=(1, 2),
        help="saved sampling config: 1 is the paper's DDIM, 2 adds the DPM-Solver++(2M) correction of x_0",
    )
    add(
        "--eval_inference_steps",
        type=int,
        nargs="*",
        default=[10, 50],
        help="DDIM steps of the final grids (none: no final sampling)",
    )
    add(
        "--num_eval_samples",
        type=int,
        default=256,
        help=f"samples drawn and scored per final grid on digits; other data, unscored, draws at most {GRID_SAMPLES}",
    )
    add(
        "--save_images_epochs",
        type=int,
        default=10,
        help="grid to samples/ and the trackers every this many epochs (0: never); the final grids follow training",
    )
    add("--save_images_steps", type=int, default=None, help="also sample a grid every this many optimiser steps")
    add(
        "--save_model_epochs",
        type=int,
        default=10,
        help="export the pipeline (EMA weights) to output_dir every this many epochs (0: only at the end)",
    )
    add("--eval_batch_size", type=int, default=64, help="samples per grid drawn during training")
    # Optimisation
    add("--output_dir", default=None, help="output folder (default: ddim-plus-digits on digits, else ddim-plus-model)")
    add("--overwrite_output_dir", action="store_true", help="delete another run's outputs in output_dir first")
    add("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation and noise")
    add("--train_batch_size", type=int, default=None, help=f"images per process per micro-batch ({RECIPE_HELP})")
    add("--num_epochs", type=int, default=100, help="passes over the data (unless --max_train_steps is given)")
    add("--max_train_steps", type=int, default=None, help="optimiser steps in all (overrides --num_epochs)")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimiser step")
    add("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    add("--learning_rate", type=float, default=None, help=f"peak learning rate ({RECIPE_HELP})")
    add("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS, help="learning-rate schedule")
    add("--lr_warmup_steps", type=int, default=None, help=f"optimiser steps of linear warm-up ({RECIPE_HELP})")
    add("--adam_beta1", type=float, default=0.95, help="AdamW beta1")
    add("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    add("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    add("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA of the weights")
    add("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse gamma")
    add("--ema_power", type=float, default=0.75, help="EMA warm-up power")
    add("--ema_max_decay", type=float, default=0.9999, help="largest EMA decay")
    add("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    # Speed (opt-in; each leaves the loss and the EMA exact or within float rounding: docs/training.md)
    add(
        "--allow_tf32",
        action="store_true",
        help="allow TF32 matrix multiplications and convolutions on Ampere or newer GPUs (as diffusers' examples)",
    )
    add("--torch_compile", action="store_true", help="compile the UNet with torch.compile (the first steps compile)")
    add("--fused_adam", action="store_true", help="use AdamW's fused implementation (torch.optim.AdamW(fused=True))")
    add("--channels_last", action="store_true", help="keep the UNet's weights and the batches in channels-last layout")
    # Checkpoints, logs, Hub
    add("--checkpointing_steps", type=int, default=500, help="save a checkpoint every this many optimiser steps")
    add("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    add("--resume_from_checkpoint", default=None, help="'latest', a checkpoint folder, or its name in output_dir")
    add(
        "--report_to",
        "--logger",
        default="tensorboard",
        choices=["tensorboard", "wandb", "none"],
        help="experiment tracker (--logger: train_unconditional's name)",
    )
    add("--tracker_project_name", default="ddim_plus", help="project (run group) name given to the tracker")
    add("--logging_dir", default="logs", help="tracker folder, inside output_dir")
    add("--push_to_hub", action="store_true", help="upload the pipeline and model card (no checkpoints or logs)")
    add("--hub_model_id", default=None, help="Hub repo id (default: the output folder's name)")
    add("--hub_private_repo", action="store_true", help="create the Hub repo private")
    add("--hub_token", default=None, help="Hub token (default: the logged-in one); never written to disk")
    add("--license", default="apache-2.0", help="license in the model card")
    add(
        "--nccl_timeout",
        type=int,
        default=7200,
        help="seconds a process waits for the others (e.g. while the main process samples) before the run fails",
    )
    add("--debug_log", action="store_true", help="write per-process sample indices, loss and LR to *.debug.jsonl")
    return parser


def parse_args(argv=None, description: Optional[str] = None) -> argparse.Namespace:
    """The flags, with the data-dependent ones left out filled in by `apply_recipe` (listed in
    `args.recipe_defaults`)."""
    args = build_parser(description).parse_args(argv)
    args.recipe_defaults = apply_recipe(args)
    return args


FLAG_NAMES = frozenset(action.dest for action in build_parser()._actions)


def uses_bundled_digits(args: argparse.Namespace) -> bool:
    return args.train_data_dir is None and args.dataset_name == DIGITS_DATASET_NAME


def apply_recipe(args: argparse.Namespace) -> Tuple[str, ...]:
    """Fill in the data-dependent flags left out (`None`) from `DIGITS_RECIPE` for the bundled digits, else from
    `ANCHOR_RECIPE`; returns the names of the flags filled in."""
    recipe = DIGITS_RECIPE if uses_bundled_digits(args) else ANCHOR_RECIPE
    applied = tuple(name for name in recipe if getattr(args, name) is None)
    for name in applied:
        setattr(args, name, recipe[name])
    return applied


def describe_recipe(args: argparse.Namespace) -> str:
    """The log's first lines: the recipe chosen and why, the resolution, the UNet, and each default applied."""
    if uses_bundled_digits(args):
        recipe = "the bundled digits' recipe (the data is the bundled digits)"
    else:
        data = f"--dataset_name {args.dataset_name}"
        if args.train_data_dir is not None:
            data = f"--train_data_dir {args.train_data_dir}"
        recipe = f"diffusers train_unconditional's defaults (the data, {data}, is not the bundled digits)"
    if args.pretrained_model_name_or_path is not None:
        unet = f"the UNet of --pretrained_model_name_or_path {args.pretrained_model_name_or_path}"
    elif args.model_config_name_or_path is not None:
        unet = f"--model_config_name_or_path {args.model_config_name_or_path}"
    elif args.resolution < ANCHOR_MIN_RESOLUTION:
        unet = (
            "a small UNet (16/32/32 channels, no attention; train_unconditional's UNet needs a `--resolution` of "
            f"{ANCHOR_MIN_RESOLUTION} or more)"
        )
    else:
        unet = "train_unconditional's UNet (128/128/256/256/512/512 channels, attention at the fifth level)"
    applied = ", ".join(f"--{name} {getattr(args, name)}" for name in args.recipe_defaults) or "none"
    return (
        f"Recipe: {recipe}.\nResolution: {args.resolution}x{args.resolution}; UNet: {unet}.\n"
        f"Defaults applied for flags left out: {applied}."
    )


def unet_downsampling_factor(unet_config: dict) -> int:
    """How much `UNet2DModel` shrinks its input: 2 per down block except the last."""
    return 2 ** (len(unet_config["down_block_types"]) - 1)


def check_resolution(resolution: int, unet_config: dict) -> None:
    """Raise unless `resolution` is divisible by the UNet's downsampling factor."""
    factor = unet_downsampling_factor(unet_config)
    if resolution < 1 or resolution % factor:
        suggestion = max(factor, round(resolution / factor) * factor)
        raise ValueError(
            f"`--resolution`={resolution} must be a positive multiple of {factor}, the UNet's downsampling factor "
            f"({len(unet_config['down_block_types'])} down blocks); try {suggestion}."
        )


def check_positive(name: str, value, allow_none: bool = False) -> None:
    """Raise unless `value` (the command-line flag `name`) is > 0."""
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"`--{name}` must be > 0, got {value}.")


def validate_args(args: argparse.Namespace) -> None:
    """Check the flags that need no data (each error names the flag, the value and the fix)."""
    # On a base install (no `train` extra) say which extra to install, before anything is written.
    for module in ["datasets"] + (["tensorboard"] if args.report_to == "tensorboard" else []):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(
                f"Training needs the {module!r} package, which the 'train' extra installs: "
                "pip install 'ddim-plus[train]'"
            ) from error
    for name in (
        "train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_epochs", "resolution",
        "ddpm_num_steps",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "checkpoints_total_limit", "save_images_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1 (or left out), got {getattr(args, name)}.")
    for name in (
        "learning_rate",
        "checkpointing_steps",
        "num_eval_samples",
        "ema_inv_gamma",
        "ema_power",
        "nccl_timeout",
    ):
        check_positive(name, getattr(args, name))
    check_positive("adam_epsilon", args.adam_epsilon)
    check_positive("snr_gamma", args.snr_gamma, allow_none=True)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be in [0, 1), got {getattr(args, name)}.")
    if not 0 < args.ema_max_decay <= 1:
        raise ValueError(f"`--ema_max_decay` must be in (0, 1], got {args.ema_max_decay}; 0.9999 is usual.")
    if args.ddim_eta < 0:
        raise ValueError(f"`--ddim_eta` must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {args.ddim_eta}.")
    if args.hub_token is not None and args.report_to == "wandb":
        # As diffusers' examples: wandb uploads the run's config, and with it the token.
        raise ValueError(
            "`--hub_token` cannot be used with `--report_to wandb`: the token would be uploaded with the run's "
            "config. Log in with `hf auth login` instead and leave out `--hub_token`."
        )
    if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        # accelerate only warns and then logs nowhere; diffusers' examples refuse, as here.
        raise ValueError("`--report_to wandb` needs the wandb package: pip install wandb, or pass `--report_to none`.")
    if args.pretrained_model_name_or_path is not None and args.model_config_name_or_path is not None:
        raise ValueError(
            "Both `--pretrained_model_name_or_path` (a model to fine-tune) and `--model_config_name_or_path` (a new "
            "model) were given; pass only one."
        )
    if args.torch_compile and not hasattr(torch, "compile"):
        raise ValueError(f"`--torch_compile` needs torch.compile (PyTorch 2.0 or newer); this is {torch.__version__}.")
    if args.fused_adam and "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        raise ValueError(f"`--fused_adam` needs a fused AdamW, which torch {torch.__version__} does not have.")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ValueError(
            "`--overwrite_output_dir` deletes the checkpoints that `--resume_from_checkpoint` would resume from; "
            "pass only one of them."
        )
    for steps in [args.ddim_num_inference_steps, *args.eval_inference_steps]:
        if not 1 <= steps <= args.ddpm_num_steps:
            raise ValueError(
                f"DDIM steps must be between 1 and `--ddpm_num_steps`={args.ddpm_num_steps}, got {steps} "
                "(`--ddim_num_inference_steps` / `--eval_inference_steps`)."
            )
    for name in (
        "noise_offset", "lr_warmup_steps", "max_grad_norm", "adam_weight_decay", "dataloader_num_workers",
        "save_images_epochs", "save_model_epochs",
    ):  # fmt: skip
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    if args.train_data_dir is not None and args.dataset_name not in (None, DIGITS_DATASET_NAME):
        raise ValueError(
            f"Both `--dataset_name`={args.dataset_name!r} and `--train_data_dir`={args.train_data_dir!r} were "
            "given; pass only one."
        )


def default_unet_config(resolution: int, num_channels: int) -> dict:
    """A small UNet for small images: 3 levels of 16/32/32 channels, no attention (~0.27M parameters).

    Sized so that the bundled 8x8 digits train in minutes on a CPU to a model whose deterministic DDIM samples
    converge as S grows (docs/results.md).
    """
    return {
        "sample_size": resolution,
        "in_channels": num_channels,
        "out_channels": num_channels,
        "layers_per_block": 1,
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    }


def anchor_unet_config(resolution: int, num_channels: int) -> dict:
    """train_unconditional's UNet: 6 levels of 128/128/256/256/512/512 channels, attention at the fifth (~114M
    parameters for RGB), for images of 32 pixels and more."""
    return {
        "sample_size": resolution,
        "in_channels": num_channels,
        "out_channels": num_channels,
        "layers_per_block": 2,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    }


# train_unconditional's UNet halves its input five times: below this it has no room.
ANCHOR_MIN_RESOLUTION = 32


def load_flag_config(flag: str, config_class, name_or_path: str, **kwargs) -> dict:
    """`config_class.load_config(name_or_path, **kwargs)` for the flag `flag`, with a one-line error naming the flag
    when the config is missing or unreadable."""
    try:
        return dict(config_class.load_config(name_or_path, **kwargs))
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(
            f"`--{flag}`={name_or_path!r}: no {config_class.__name__} config could be loaded ({type(error).__name__}:"
            f" {reason[:300]}{'...' if len(reason) > 300 else ''}). Pass a folder or Hub id holding its config.json"
            f"{' (in `' + kwargs['subfolder'] + '/`)' if kwargs.get('subfolder') else ', or that file'}."
        ) from error


def build_unet_config(args: argparse.Namespace, num_channels: int) -> dict:
    """The UNet's config, sized to the data's resolution and channels: `--pretrained_model_name_or_path`'s,
    `--model_config_name_or_path`, or the default (`default_unet_config` below 32 pixels, `anchor_unet_config` from
    32)."""
    if args.pretrained_model_name_or_path is not None:
        config = load_flag_config(
            "pretrained_model_name_or_path",
            UNet2DModel,
            args.pretrained_model_name_or_path,
            subfolder="unet",
            revision=args.revision,
        )
        if config["in_channels"] != num_channels:
            raise ValueError(
                f"The UNet of `--pretrained_model_name_or_path`={args.pretrained_model_name_or_path!r} takes "
                f"{config['in_channels']} channels, the training images have {num_channels}; fine-tune it on "
                f"{'grayscale' if config['in_channels'] == 1 else 'RGB'} images."
            )
        config.update(sample_size=args.resolution)
    elif args.model_config_name_or_path is not None:
        config = load_flag_config("model_config_name_or_path", UNet2DModel, args.model_config_name_or_path)
        config.update(sample_size=args.resolution, in_channels=num_channels, out_channels=num_channels)
    elif args.resolution < ANCHOR_MIN_RESOLUTION:
        config = default_unet_config(args.resolution, num_channels)
    else:
        config = anchor_unet_config(args.resolution, num_channels)
    check_resolution(args.resolution, config)
    # Built on the meta device only to fill in the defaults: no memory, no time, even for train_unconditional's UNet.
    with torch.device("meta"):
        return dict(UNet2DModel.from_config(config).config)


def build_noise_scheduler(args: argparse.Namespace) -> DDIMSchedulerPlus:
    """The training noise schedule (also the sampler, with `--timestep_spacing`, `--clip_sample` and
    `--ddim_solver_order`): the flags', or with `--pretrained_model_name_or_path` the pretrained pipeline's (its betas,
    T and prediction type); raises on settings it rejects."""
    if args.pretrained_model_name_or_path is None:
        scheduler = DDIMSchedulerPlus(
            num_train_timesteps=args.ddpm_num_steps,
            beta_schedule=args.ddpm_beta_schedule,
            prediction_type=args.prediction_type,
            timestep_spacing=args.timestep_spacing,
            rescale_betas_zero_snr=args.rescale_betas_zero_snr,
            clip_sample=args.clip_sample,
            ddim_solver_order=args.ddim_solver_order,
        )
    else:
        config = load_flag_config(
            "pretrained_model_name_or_path",
            DDIMSchedulerPlus,
            args.pretrained_model_name_or_path,
            subfolder="scheduler",
            revision=args.revision,
        )
        scheduler = DDIMSchedulerPlus.from_config(
            config,
            timestep_spacing=args.timestep_spacing,
            clip_sample=args.clip_sample,
            ddim_solver_order=args.ddim_solver_order,
        )
    sampler = DDIMSchedulerPlus.from_config(scheduler.config)
    for steps in dict.fromkeys([args.ddim_num_inference_steps, *args.eval_inference_steps]):
        try:
            sampler.set_timesteps(steps)
        except ValueError as error:
            raise ValueError(f"`--ddim_num_inference_steps` / `--eval_inference_steps` {steps}: {error}") from error
    return scheduler


def prepare_run(args: argparse.Namespace, accelerator) -> dict:
    """Everything that can fail on bad flags or data, done before any file is written.

    Returns:
        `dict`: `dataset`, `image_column`, `num_channels`, `unet_config`, `noise_scheduler`, `checkpoint` (a folder
        or `None`), `data` (the data's fingerprint) and `restart` (the record of the unfinished run in `output_dir`
        that `--resume_from_checkpoint latest` starts over, as it has no complete checkpoint; else `None`).
    """
    noise_scheduler = build_noise_scheduler(args)
    if args.pretrained_model_name_or_path is not None:
        # The flags of the noise schedule take the pretrained model's values, so that the loss, the checkpoints'
        # record of the run and the model card all say what is trained.
        config = noise_scheduler.config
        kept = {
            "ddpm_num_steps": config.num_train_timesteps,
            "ddpm_beta_schedule": config.beta_schedule,
            "prediction_type": config.prediction_type,
            "rescale_betas_zero_snr": config.rescale_betas_zero_snr,
        }
        replaced = [f"--{flag} {getattr(args, flag)}" for flag, value in kept.items() if getattr(args, flag) != value]
        vars(args).update(kept)
        logger.info(
            f"Fine-tuning {args.pretrained_model_name_or_path} with its noise schedule: T="
            f"{config.num_train_timesteps}, {config.beta_schedule} betas {config.beta_start}..{config.beta_end}, "
            f"prediction_type {config.prediction_type}" + (f" (instead of {', '.join(replaced)})" if replaced else "")
        )
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    own_checkpoint = checkpoint is not None and os.path.realpath(os.path.dirname(os.path.abspath(checkpoint))) == (
        os.path.realpath(args.output_dir)
    )
    outputs = find_run_outputs(args.output_dir, args.logging_dir)
    restart = None
    if outputs and args.resume_from_checkpoint == "latest" and checkpoint is None:
        # A run killed before its first complete checkpoint: its record says whether it is this run (checked once
        # the run's length is known, in `check_restart`).
        restart = read_run_record(args.output_dir)
        if restart is None:
            raise ValueError(
                f"`--output_dir`={args.output_dir!r} holds files of a run ({', '.join(outputs[:6])}"
                f"{', ...' if len(outputs) > 6 else ''}) but no complete checkpoint and no {RUN_RECORD_NAME} saying "
                "which run wrote them. Replace them with `--overwrite_output_dir` (instead of "
                "`--resume_from_checkpoint`), or choose another folder."
            )
    elif outputs and not own_checkpoint and not args.overwrite_output_dir:
        resume = "Continue it with `--resume_from_checkpoint latest`, replace" if checkpoint is None else "Replace"
        raise ValueError(
            f"`--output_dir`={args.output_dir!r} holds another run ({', '.join(outputs[:6])}"
            f"{', ...' if len(outputs) > 6 else ''}). {resume} it with `--overwrite_output_dir`, or choose another "
            "folder."
        )
    elif args.resume_from_checkpoint == "latest" and checkpoint is None:
        accelerator.print(f"No checkpoint in {args.output_dir}, starting from scratch.")
    dataset = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir, args.resolution
    )
    image_column = find_image_column(dataset, args.image_column)
    images = check_images(dataset, image_column, root=args.train_data_dir)
    grayscale = images["grayscale_in_colour"]
    if grayscale:
        logger.warning(
            f"{len(grayscale)} of {len(dataset)} images are grayscale among colour ones ({', '.join(grayscale[:5])}"
            f"{', ...' if len(grayscale) > 5 else ''}): they train as gray RGB images (R = G = B), as in "
            "train_unconditional. Remove them for a model of colour images only."
        )
    smaller = sum(min(size) < args.resolution for size in images["sizes"])
    if smaller:
        logger.warning(
            f"{smaller} of {len(dataset)} images have a side shorter than `--resolution`={args.resolution} (the "
            f"shortest is {images['min_side']} pixels): they are upsampled, which adds no detail. A `--resolution` "
            f"of at most {images['min_side']} trains on the images as they are."
        )
    # Resizing by more than 2x skips pixels (bilinear resampling reads a 2x2 neighbourhood at the target scale).
    shorter_sides = [min(size) for size in images["sizes"]]
    larger = sum(side > 2 * args.resolution for side in shorter_sides)
    if larger:
        logger.warning(
            f"{larger} of {len(dataset)} images have a shorter side more than twice `--resolution`={args.resolution} "
            f"(up to {max(shorter_sides)} pixels): they are downscaled by more than 2x, which discards their detail. "
            f"A larger `--resolution` (up to {min(shorter_sides)}) keeps more of it."
        )
    unet_config = build_unet_config(args, images["num_channels"])
    data = data_fingerprint(dataset, args.dataset_name, args.dataset_config_name, args.train_data_dir)
    return {
        "data": data,
        "restart": restart,
        "dataset": dataset,
        "image_column": image_column,
        "num_channels": images["num_channels"],
        "unet_config": unet_config,
        "noise_scheduler": noise_scheduler,
        "checkpoint": checkpoint,
    }


def run_record(args: argparse.Namespace, data: dict, num_processes: int, max_train_steps: int) -> dict:
    """What a checkpoint records of its run (`RUN_FLAGS`, the data's fingerprint `data`, the number of processes and
    the run's length)."""
    record = {key: getattr(args, key) for key in RUN_FLAGS}
    if args.train_data_dir is not None:
        record["train_data_dir"] = os.path.abspath(args.train_data_dir)
    record.update(data=data, num_processes=num_processes, max_train_steps=max_train_steps)
    return record


def check_restart(output_dir: str, saved: dict, settings: dict) -> None:
    """Raise unless the unfinished run recorded by `saved` in `output_dir` is the run `settings` describe."""
    differences = compare_run_records(saved, settings, saved_name="recorded")
    if differences:
        raise ValueError(
            f"`--output_dir`={output_dir!r} holds an unfinished run (no complete checkpoint) with other settings "
            f"({'; '.join(differences)}). Start it over with its settings, replace it with `--overwrite_output_dir` "
            "(instead of `--resume_from_checkpoint`), or choose another folder."
        )
