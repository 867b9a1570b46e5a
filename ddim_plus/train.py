"""Train an unconditional `UNet2DModel` and publish it as a DDIM pipeline (ddim_plus).

    accelerate launch -m ddim_plus.train                                  # bundled digits, CPU or GPU, ~5 min on CPU
    python -m ddim_plus.train                                             # the same, one process, no launcher
    accelerate launch training/train.py ...                               # the same from a checkout
    accelerate launch -m ddim_plus.train --dataset_name huggan/flowers-102-categories --resolution 64 \\
        --output_dir flowers                                              # with train_unconditional's UNet
    accelerate launch -m ddim_plus.train --pretrained_model_name_or_path google/ddpm-cifar10-32 ...   # fine-tune
    accelerate launch --multi_gpu --num_processes 2 -m ddim_plus.train ...        # several processes (GPUs or CPU)
    accelerate launch -m ddim_plus.train ... --resume_from_checkpoint latest        # continue, bit-exact on CPU

The output folder holds the pipeline (`model_index.json`, `unet/` with the EMA weights, `scheduler/`), which
`DiffusionPipeline.from_pretrained` loads after `import ddim_plus`, sample grids, and a model card (`README.md`).
Flags follow diffusers' `examples/unconditional_image_generation/train_unconditional.py`; see docs/training.md.
"""

import argparse
import contextlib
import fnmatch
import functools
import hashlib
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.utils.import_utils import is_xformers_available
from PIL import Image
from tqdm.auto import tqdm

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus, ddim_math
from ddim_plus.evaluation.sampling import generate_images
from ddim_plus.hub import HubPublisher, make_model_card
from ddim_plus.images import make_grid
from ddim_plus.training.checkpoints import (
    HUB_IGNORE_PATTERNS,
    STAGING_PREFIX,
    check_checkpoint_compatible,
    check_resume,
    checkpoint_step,
    find_run_outputs,
    publish_directory,
    remove_run_outputs,
    resolve_checkpoint,
    save_checkpoint,
)
from ddim_plus.training.data import (
    DIGITS_DATASET_NAME,
    TrainingImages,
    check_images,
    find_image_column,
    load_image_dataset,
)
from ddim_plus.training.ema import create_ema_model, register_checkpoint_hooks
from ddim_plus.training.loss import diffusion_loss, min_snr_loss_weights, sample_noise_and_timesteps, step_generator

logger = get_logger(__name__, log_level="INFO")

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# Why the demo recipe saves the sampling config it does (measured in docs/results.md), for its model card.
SAMPLING_CONFIG_REASON = (
    "The saved sampling config (eta 0, `ddim_solver_order=2`, `logsnr` spacing, `clip_sample=True` with eps "
    "re-derived from the clipped x_0, 20 steps) is what docs/results.md measured for this recipe: deterministic "
    "sampling converges as S grows and reaches the DDPM sampler's quality, second-order steps spaced evenly in "
    "log-SNR bring 10 steps within the spread of 1000 and 20 steps level with 1000 block by block (`trailing` "
    "spacing stays 2x worse at 10 steps, its last network call being at t = 99; first-order DDIM stays 1.7x worse "
    "at 20), and clipping on or off makes no difference beyond the spread."
)
# What the model-index names as the data the digits scores were measured on (not a Hub dataset: no `datasets:`).
DIGITS_EVAL_DATASET = ("digits", "8x8 handwritten digits (UCI, bundled with ddim_plus)")
# Each sample is drawn at least this many pixels wide in the saved grids, so 8x8 digits stay readable.
GRID_TILE_PIXELS = 64
# Samples shown in each final grid; only data with a quality metric (the bundled digits) needs more.
GRID_SAMPLES = 64
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


def build_parser() -> argparse.ArgumentParser:
    """The command line (diffusers' train_unconditional flag names, plus DDIM sampling and the digits defaults)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    # Data
    add("--dataset_name", default=DIGITS_DATASET_NAME, help="'digits' (bundled, offline), a Hub id or a local path")
    add("--dataset_config_name", default=None, help="configuration of the dataset, if it has several")
    add("--train_data_dir", default=None, help="a folder of images (imagefolder); used instead of --dataset_name")
    add("--cache_dir", default=None, help="where datasets are cached")
    add("--image_column", default=None, help="column holding the images (default: the first image column)")
    add("--resolution", type=int, default=8, help="side of the square training images (digits: 8, their own)")
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
        help="UNet2DModel config (default: a small UNet below 32 pixels, train_unconditional's UNet from 32)",
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
        help="sample a grid to samples/ and the trackers every this many epochs, and after the last (0: never)",
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
    add("--output_dir", default="ddim-plus-digits", help="where the pipeline, checkpoints and logs go")
    add("--overwrite_output_dir", action="store_true", help="delete another run's outputs in output_dir first")
    add("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation and noise")
    add("--train_batch_size", type=int, default=64, help="images per process per micro-batch")
    add("--num_epochs", type=int, default=100, help="passes over the data (unless --max_train_steps is given)")
    add("--max_train_steps", type=int, default=None, help="optimiser steps in all (overrides --num_epochs)")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimiser step")
    add("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    add("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    add("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS, help="learning-rate schedule")
    add("--lr_warmup_steps", type=int, default=100, help="optimiser steps of linear warm-up")
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


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


FLAG_NAMES = frozenset(vars(parse_args([])))


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
    if args.pretrained_model_name_or_path is not None and args.model_config_name_or_path is not None:
        raise ValueError(
            "Both `--pretrained_model_name_or_path` (a model to fine-tune) and `--model_config_name_or_path` (a new "
            "model) were given; pass only one."
        )
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

    Sized so that the bundled 8x8 digits train in about five minutes on 2 CPU cores to a model whose deterministic
    DDIM samples converge as S grows (docs/results.md).
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


def build_unet_config(args: argparse.Namespace, num_channels: int) -> dict:
    """The UNet's config, sized to the data's resolution and channels: `--pretrained_model_name_or_path`'s,
    `--model_config_name_or_path`, or the default (`default_unet_config` below 32 pixels, `anchor_unet_config` from
    32)."""
    if args.pretrained_model_name_or_path is not None:
        config = dict(
            UNet2DModel.load_config(args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision)
        )
        if config["in_channels"] != num_channels:
            raise ValueError(
                f"The UNet of `--pretrained_model_name_or_path`={args.pretrained_model_name_or_path!r} takes "
                f"{config['in_channels']} channels, the training images have {num_channels}; fine-tune it on "
                f"{'grayscale' if config['in_channels'] == 1 else 'RGB'} images."
            )
        config.update(sample_size=args.resolution)
    elif args.model_config_name_or_path is not None:
        config = dict(UNet2DModel.load_config(args.model_config_name_or_path))
        config.update(sample_size=args.resolution, in_channels=num_channels, out_channels=num_channels)
    elif args.resolution < 32:
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
        config = DDIMSchedulerPlus.load_config(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
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


def prepare_run(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Everything that can fail on bad flags or data, done before any file is written.

    Returns:
        `dict`: `dataset`, `image_column`, `num_channels`, `unet_config`, `noise_scheduler` and `checkpoint` (a
        folder or `None`).
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
    if args.resume_from_checkpoint == "latest" and checkpoint is None:
        accelerator.print(f"No checkpoint in {args.output_dir}, starting from scratch.")
    own_checkpoint = checkpoint is not None and os.path.realpath(os.path.dirname(os.path.abspath(checkpoint))) == (
        os.path.realpath(args.output_dir)
    )
    outputs = find_run_outputs(args.output_dir, args.logging_dir)
    if outputs and not own_checkpoint and not args.overwrite_output_dir:
        raise ValueError(
            f"`--output_dir`={args.output_dir!r} holds another run ({', '.join(outputs[:6])}"
            f"{', ...' if len(outputs) > 6 else ''}). Continue it with `--resume_from_checkpoint latest`, replace it "
            "with `--overwrite_output_dir`, or choose another folder."
        )
    dataset = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir, args.resolution
    )
    image_column = find_image_column(dataset, args.image_column)
    images = check_images(dataset, image_column, root=args.train_data_dir)
    smaller = sum(min(size) < args.resolution for size in images["sizes"])
    if smaller:
        logger.warning(
            f"{smaller} of {len(dataset)} images have a side shorter than `--resolution`={args.resolution} (the "
            f"shortest is {images['min_side']} pixels): they are upsampled, which adds no detail. A `--resolution` "
            f"of at most {images['min_side']} trains on the images as they are."
        )
    unet_config = build_unet_config(args, images["num_channels"])
    if checkpoint is not None:
        check_checkpoint_compatible(checkpoint, unet_config)
    return {
        "dataset": dataset,
        "image_column": image_column,
        "num_channels": images["num_channels"],
        "unet_config": unet_config,
        "noise_scheduler": noise_scheduler,
        "checkpoint": checkpoint,
    }


def run_record(args: argparse.Namespace, num_processes: int, max_train_steps: int) -> dict:
    """What a checkpoint records of its run (`RUN_FLAGS`, the number of processes and the run's length)."""
    record = {key: getattr(args, key) for key in RUN_FLAGS}
    if args.train_data_dir is not None:
        record["train_data_dir"] = os.path.abspath(args.train_data_dir)
    record.update(num_processes=num_processes, max_train_steps=max_train_steps)
    return record


def save_grid(images: np.ndarray, path: str, resolution: int) -> Image.Image:
    """Save (B, H, W, C) images in [0, 1] as a square-ish grid, each tile at least GRID_TILE_PIXELS wide."""
    # A grey frame around each tile: digits touch their tile's edges, and without it the grid reads as stripes.
    grid = make_grid(images, scale=max(1, GRID_TILE_PIXELS // resolution), background=0.5)
    grid.save(path)
    return grid


def generate_with_ema(
    accelerator, unet, ema_model, scheduler, num_samples, num_inference_steps, eta, seed, batch, metric=None, desc=None
):
    """`generate_images` (image i from seed + i, as `ddim-plus sample`/`evaluate` draw it) with the EMA weights
    swapped in, then the raw weights put back so training goes on with them. With `desc`, the pipeline shows a
    progress bar so described."""
    model = accelerator.unwrap_model(unet)
    if ema_model is not None:
        ema_model.store(model.parameters())
        ema_model.copy_to(model.parameters())
    was_training = model.training
    model.eval()
    pipeline = DDIMPlusPipeline(unet=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=desc is None, desc=desc)
    generated = generate_images(
        pipeline, num_samples, num_inference_steps, eta, seed=seed, batch_size=batch, metric=metric
    )
    model.train(was_training)
    if ema_model is not None:
        ema_model.restore(model.parameters())
    return generated


def log_grid(accelerator, grid: Image.Image, name: str, step: int) -> None:
    """Send a sample grid to every tracker that takes images, through accelerate's tracker API."""
    pixels = np.asarray(grid.convert("RGB"))[None]  # one image, NHWC
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: pixels}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: pixels}, step=step)


def sample_grid(args, accelerator, unet, ema_model, scheduler, name: str, step: int) -> None:
    """`--eval_batch_size` samples from the EMA weights as a grid, into samples/<name>.png and to the trackers."""
    images = generate_with_ema(
        accelerator,
        unet,
        ema_model,
        scheduler,
        args.eval_batch_size,
        args.ddim_num_inference_steps,
        args.ddim_eta,
        args.seed,
        args.eval_batch_size,
    ).images
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    grid = save_grid(images, os.path.join(args.output_dir, "samples", f"{name}.png"), args.resolution)
    log_grid(accelerator, grid, "samples", step)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights, to check that processes (or runs) ended identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def card_data(args: argparse.Namespace, num_images: int) -> dict:
    """How the model card names the training data, without local paths (the card is published).

    Returns:
        `dict`: `hub_dataset_id` (for the card's `datasets:` metadata; `None` unless the data is a Hub dataset),
        `description` (words for the card's text) and `settings` (rows for its training-configuration table).
    """
    if args.train_data_dir is not None:
        folder = os.path.basename(os.path.normpath(args.train_data_dir))
        return {
            "hub_dataset_id": None,
            "description": f"a folder of {num_images:,} images",
            "settings": {"train_data_dir": folder},
        }
    if args.dataset_name == DIGITS_DATASET_NAME:
        return {
            "hub_dataset_id": None,
            "description": "the UCI ML hand-written digits (1,797 8x8, CC BY 4.0), bundled with ddim_plus"
            + ("" if args.resolution == 8 else f", resized to {args.resolution}x{args.resolution}"),
            "settings": {"dataset_name": DIGITS_DATASET_NAME},
        }
    if os.path.exists(args.dataset_name):
        name = os.path.basename(os.path.normpath(args.dataset_name))
        return {
            "hub_dataset_id": None,
            "description": f"a local dataset of {num_images:,} images (`{name}`)",
            "settings": {"dataset_name": name},
        }
    settings = {"dataset_name": args.dataset_name}
    if args.dataset_config_name is not None:
        settings["dataset_config_name"] = args.dataset_config_name
    return {"hub_dataset_id": args.dataset_name, "description": None, "settings": settings}


def training_config_for_card(
    args: argparse.Namespace, total_batch_size: int, global_step: int, data_settings: dict
) -> dict:
    """The settings that shaped the model, for the model card's training-configuration table."""
    keys = (
        "resolution", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule", "rescale_betas_zero_snr",
        "snr_gamma", "noise_offset", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
        "adam_weight_decay", "max_grad_norm", "use_ema", "ema_max_decay", "ema_power", "mixed_precision",
        "clip_sample", "timestep_spacing", "ddim_solver_order", "ddim_eta", "seed",
    )  # fmt: skip
    config = dict(data_settings)
    config.update({key: getattr(args, key) for key in keys if getattr(args, key) is not None})
    config.update(total_batch_size=total_batch_size, optimizer_steps=global_step)
    return config


def launched_without_accelerator_devices() -> bool:
    """Whether several processes were launched (e.g. `accelerate launch --multi_gpu`) on a machine without GPUs.

    accelerate then treats each process as a separate single-process run: each trains alone and all write the same
    files. Running them on the CPU makes them one data-parallel run over gloo instead.
    """
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_gpu


def main(argv=None) -> str:
    args = parse_args(argv)
    with input_errors():
        validate_args(args)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        cpu=launched_without_accelerator_devices(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # A sampler seeded per epoch is what makes the data order after a resume the same as without one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # The other processes wait at the next collective while the main process samples, evaluates or saves.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.nccl_timeout))],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # accelerate reports every file of every checkpoint at INFO; our own line per checkpoint is enough.
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    with input_errors():
        run = prepare_run(args, accelerator)
    set_seed(args.seed)

    # Model, EMA, noise schedule, optimiser
    if args.pretrained_model_name_or_path is None:
        unet = UNet2DModel.from_config(run["unet_config"])
    else:
        unet = UNet2DModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
        )
        unet.register_to_config(sample_size=args.resolution)
    logger.info(f"UNet: {sum(p.numel() for p in unet.parameters()):,} parameters")
    if args.enable_xformers_memory_efficient_attention:
        if is_xformers_available():
            unet.enable_xformers_memory_efficient_attention()
        else:
            logger.info(
                "`--enable_xformers_memory_efficient_attention`: xformers is not installed; PyTorch's "
                "scaled_dot_product_attention, which diffusers uses by default, is already memory-efficient."
            )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema_model = None
    if args.use_ema:
        ema_model = create_ema_model(unet, args.ema_max_decay, args.ema_inv_gamma, args.ema_power)
        ema_model.to(accelerator.device)
    noise_scheduler = run["noise_scheduler"]
    loss_weights = None
    if args.snr_gamma is not None:
        loss_weights = min_snr_loss_weights(noise_scheduler.alphas_cumprod, args.snr_gamma, args.prediction_type)
        loss_weights = loss_weights.to(accelerator.device)
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Data
    train_dataset = TrainingImages(
        run["dataset"],
        run["image_column"],
        args.resolution,
        run["num_channels"],
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        seed=args.seed,
        preserve_input_precision=args.preserve_input_precision,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers
    )
    train_dataloader = accelerator.prepare(train_dataloader)
    batches_per_epoch = len(train_dataloader)  # per process, after sharding
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    settings = run_record(args, accelerator.num_processes, max_train_steps)
    if run["checkpoint"] is not None:
        with input_errors():
            warning = check_resume(run["checkpoint"], settings)
        if warning:
            logger.warning(as_flags(warning))
    if args.lr_scheduler != "constant" and args.lr_warmup_steps > max_train_steps / 2:
        logger.warning(
            f"`--lr_warmup_steps`={args.lr_warmup_steps} is more than half of the {max_train_steps} optimiser steps: "
            "most of the run trains below the peak learning rate. Shorten the warm-up or train longer."
        )

    publisher = None
    if args.push_to_hub and accelerator.is_main_process:
        # Before anything is trained or written: a bad token or a missing permission fails here.
        publisher = start_publishing(args)

    # Nothing has been written so far; from here on the run owns output_dir.
    if args.overwrite_output_dir and accelerator.is_main_process:
        removed = remove_run_outputs(args.output_dir, args.logging_dir)
        if removed:
            logger.info(f"`--overwrite_output_dir`: removed {', '.join(removed)} from {args.output_dir}")
    accelerator.wait_for_everyone()
    # On every process: each writes its share of the checkpoints (and its debug log) into this folder.
    os.makedirs(args.output_dir, exist_ok=True)

    # A prepared LR scheduler steps once per process at every optimiser step (diffusers issue 8384): scale its
    # step counts by the number of processes so warm-up and decay take the intended number of optimiser steps.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_checkpoint_hooks(accelerator, ema_model)

    global_step = 0
    if run["checkpoint"] is not None:
        accelerator.print(f"Resuming from {run['checkpoint']}")
        accelerator.load_state(run["checkpoint"])
        global_step = checkpoint_step(run["checkpoint"])
    first_epoch = global_step // updates_per_epoch
    # Checkpoints are saved only after optimiser steps, so a resume starts at a whole number of them.
    batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process:
        # Never the Hub token: trackers write their config to disk (tensorboard's hparams.yml) or upload it (wandb).
        tracked = {
            key: value
            for key, value in vars(args).items()
            if key != "hub_token" and isinstance(value, (int, float, str, bool))
        }
        accelerator.init_trackers(args.tracker_project_name, config=tracked)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} images, {num_epochs} epochs, {max_train_steps} optimiser steps of {total_batch_size} "
        f"images ({accelerator.num_processes} processes x {args.train_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation); starting at step {global_step}"
    )
    debug_file = None
    if args.debug_log:
        debug_path = os.path.join(args.output_dir, f"process-{accelerator.process_index}.debug.jsonl")
        debug_file = open(debug_path, "a", encoding="utf-8")
    sampling_scheduler = DDIMSchedulerPlus.from_config(noise_scheduler.config)

    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="Steps"
    )
    started = time.perf_counter()
    step_losses, step_indices = [], []
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        skip = batches_to_skip if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        unet.train()
        for batch_index, batch in enumerate(batches, start=skip):
            micro_step = epoch * batches_per_epoch + batch_index
            generator = step_generator(args.seed, micro_step, accelerator.process_index, accelerator.device)
            with accelerator.accumulate(unet):
                clean_images = batch["pixel_values"]
                noise, timesteps = sample_noise_and_timesteps(
                    clean_images, noise_scheduler.config.num_train_timesteps, generator, args.noise_offset
                )
                with accelerator.autocast():
                    loss = diffusion_loss(
                        unet, noise_scheduler, clean_images, noise, timesteps, args.prediction_type, loss_weights
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                # On accumulation-only micro-batches the prepared optimiser and LR scheduler skip these by themselves.
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.detach())
            step_indices.extend(batch["index"].tolist())
            if not accelerator.sync_gradients:
                continue

            # One optimiser step done: EMA on every process (so all hold the same EMA), then bookkeeping.
            if ema_model is not None:
                ema_model.step(unet.parameters())
            global_step += 1
            mean_loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean").item()
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
            if ema_model is not None:
                logs["ema_decay"] = ema_model.cur_decay_value
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if debug_file is not None:
                record = dict(logs, step=global_step, process=accelerator.process_index, indices=step_indices)
                debug_file.write(json.dumps(record) + "\n")
                debug_file.flush()
            step_losses, step_indices = [], []

            if global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(
                    accelerator, args.output_dir, global_step, args.checkpoints_total_limit, run_record=settings
                )
                logger.info(f"Saved {path}")
            if args.save_images_steps and global_step % args.save_images_steps == 0 and accelerator.is_main_process:
                sample_grid(args, accelerator, unet, ema_model, sampling_scheduler, f"step-{global_step}", global_step)
            if global_step >= max_train_steps:
                break

        # The end of an epoch, as in train_unconditional: grids and a pipeline export on the main process only (the
        # others wait for it at their next collective, for up to `--nccl_timeout`). The final ones follow training.
        last_epoch = global_step >= max_train_steps
        if accelerator.is_main_process and args.save_images_epochs and epoch % args.save_images_epochs == 0:
            sample_grid(args, accelerator, unet, ema_model, sampling_scheduler, f"epoch-{epoch}", global_step)
        if (
            accelerator.is_main_process
            and args.save_model_epochs
            and epoch % args.save_model_epochs == 0
            and not last_epoch
        ):
            staging_dir = fresh_staging_dir(args.output_dir)
            card = model_card(args, sampling_scheduler, len(train_dataset), total_batch_size, global_step)
            export_pipeline(accelerator.unwrap_model(unet), ema_model, sampling_scheduler, staging_dir, card)
            if publisher is not None:
                # A copy, uploaded in the background while training goes on; the upload reads it later.
                publisher.upload_snapshot(
                    functools.partial(shutil.copytree, staging_dir, dirs_exist_ok=True), f"Epoch {epoch}"
                )
            publish_directory(staging_dir, args.output_dir)
            logger.info(f"Epoch {epoch}: exported the pipeline to {args.output_dir}")
    progress_bar.close()
    training_seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()

    final_unet = accelerator.unwrap_model(unet)
    if debug_file is not None:
        final = {"final": True, "process": accelerator.process_index, "step": global_step}
        final.update(weights=weights_digest(final_unet), lr=lr_scheduler.get_last_lr()[0])
        debug_file.write(json.dumps(final) + "\n")
        debug_file.close()
    if accelerator.is_main_process:
        write_outputs(
            args,
            accelerator,
            final_unet,
            ema_model,
            sampling_scheduler,
            total_batch_size,
            global_step,
            len(train_dataset),
            publisher,
        )
        logger.info(f"Trained {global_step} steps in {training_seconds:.1f} s; outputs in {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return args.output_dir


def start_publishing(args: argparse.Namespace) -> HubPublisher:
    """Create (or reuse) the Hub repo of `--push_to_hub` and return the publisher that uploads to it."""
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        return HubPublisher(repo_id, private=args.hub_private_repo, token=args.hub_token)
    except Exception as error:  # whatever the Hub answered, the run must stop before training, with the fix
        raise InputError(
            f"`--push_to_hub`: cannot create or use the Hub repo {repo_id!r} ({type(error).__name__}: {error}). "
            "Check `--hub_token` (or `hf auth login`), that the token may write to that user or organisation, and "
            "`--hub_model_id`."
        ) from error


def model_card(args, scheduler, num_images: int, total_batch_size: int, global_step: int, **sections):
    """The run's model card (`ddim_plus.hub.make_model_card`): data, training configuration, license, and the
    `sections` given (samples, metrics)."""
    data = card_data(args, num_images)
    data_words = data["description"] or f"`{data['hub_dataset_id']}`"
    description = (
        f"An unconditional image model trained on {data_words} with ddim_plus's trainer (`ddim_plus.train`), for "
        "sampling with DDIM (Song, Meng & Ermon, ICLR 2021)."
    )
    return make_model_card(
        args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)),
        scheduler.config,
        description=description,
        dataset_name=data["hub_dataset_id"],
        training_config=training_config_for_card(args, total_batch_size, global_step, data["settings"]),
        license=args.license,
        **sections,
    )


def fresh_staging_dir(output_dir: str) -> str:
    """An empty staging folder in `output_dir`, where a pipeline is written before `publish_directory` moves it."""
    staging_dir = os.path.join(output_dir, f"{STAGING_PREFIX}pipeline")
    if os.path.exists(staging_dir):
        shutil.rmtree(staging_dir)
    os.makedirs(staging_dir)
    return staging_dir


def export_pipeline(unet, ema_model, scheduler, folder: str, card) -> None:
    """Save the pipeline with the EMA weights (the raw ones without EMA) and its model card `card` into `folder`,
    then put the raw weights back for training."""
    if ema_model is not None:
        ema_model.store(unet.parameters())
        ema_model.copy_to(unet.parameters())
    DDIMPlusPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, model_card=card)
    if ema_model is not None:
        ema_model.restore(unet.parameters())


def write_outputs(
    args, accelerator, unet, ema_model, scheduler, total_batch_size, global_step, num_images, publisher=None
) -> None:
    """Write the EMA pipeline, sample grids, scores and model card atomically into `output_dir`; with `publisher`
    (`--push_to_hub`), upload it once the background uploads are done."""
    staging_dir = fresh_staging_dir(args.output_dir)

    is_digits = args.train_data_dir is None and args.dataset_name == DIGITS_DATASET_NAME
    if is_digits:
        from ddim_plus.evaluation.digits import digits_reference_images, digits_report
        from ddim_plus.evaluation.fid import FrechetDistance

        digits_metric = FrechetDistance("digits")
        digits_metric.update(digits_reference_images(args.resolution, unet.config.in_channels), real=True)
        num_samples = args.num_eval_samples
    else:
        # Unscored samples only fill the grid: drawing more would only cost time.
        num_samples = min(args.num_eval_samples, GRID_SAMPLES)
        accelerator.print(
            "No quality metric for this data: the only feature network the trainer has (ddim_plus's digits CNN) "
            "fits only the bundled digits; score the model with `ddim-plus evaluate` and DINOv2 or Inception "
            "weights (docs/evaluation.md)."
        )
    sample_images, metrics = [], []
    for num_steps in dict.fromkeys(args.eval_inference_steps):
        generated = generate_with_ema(
            accelerator,
            unet,
            ema_model,
            scheduler,
            num_samples,
            num_steps,
            args.ddim_eta,
            args.seed,
            256,
            metric=digits_metric if is_digits else None,
            desc=f"Final samples, {num_steps} DDIM steps",
        )
        images = generated.images
        grid_name = f"samples_{num_steps}steps.png"
        # The grids show the first GRID_SAMPLES samples; the scores use all of them.
        grid = save_grid(images[:GRID_SAMPLES], os.path.join(staging_dir, grid_name), args.resolution)
        log_grid(accelerator, grid, f"final/samples_{num_steps}steps", global_step)
        sample_images.append(grid_name)
        row = {"DDIM steps": num_steps, "eta": args.ddim_eta, "samples": len(images)}
        if is_digits:
            report = digits_report(images)
            distance = generated.frechet_distance
            row.update(
                {
                    "recognisable fraction": report["recognisable_fraction"],
                    "class histogram (0-9)": " ".join(map(str, report["class_histogram"])),
                    "class balance": report["class_balance"],
                    f"FD [{distance.features}]": round(distance.value, 4),
                }
            )
        metrics.append(row)
        accelerator.print("  " + ", ".join(f"{key}: {value}" for key, value in row.items()))
        scores = {key: value for key, value in row.items() if isinstance(value, float) and key != "eta"}
        accelerator.log({f"final/{num_steps}steps/{key}": value for key, value in scores.items()}, step=global_step)
    with open(os.path.join(staging_dir, "metrics.json"), "w", encoding="utf-8") as file:
        json.dump(metrics, file, indent=2)

    fd_columns = [key for key in metrics[0] if key.startswith("FD [")] if metrics and is_digits else []
    card = model_card(
        args,
        scheduler,
        num_images,
        total_batch_size,
        global_step,
        sample_images=sample_images,
        metrics=metrics,
        metric_columns=["recognisable fraction", "class balance", *fd_columns] if is_digits else [],
        metrics_dataset=DIGITS_EVAL_DATASET if is_digits else None,
        metrics_description=(
            f"Samples from the EMA weights, DDIM with `{args.timestep_spacing}` spacing and solver order "
            f"{args.ddim_solver_order}. Recognisable fraction: share of samples that the digits CNN shipped with "
            "ddim_plus, with its fitted not-a-digit output (`ddim_plus.evaluation.digits`), labels with probability "
            "> 0.5; class balance: normalised entropy of the predicted-class histogram (1 = uniform); FD: Frechet "
            "distance to the 1,797 real digits in the hidden-layer features of the same CNN "
            "(`ddim_plus.evaluation.fid`; lower is better). " + SAMPLING_CONFIG_REASON
            if is_digits
            else f"Samples from the EMA weights, DDIM with `{args.timestep_spacing}` spacing and solver order "
            f"{args.ddim_solver_order}."
        ),
    )
    export_pipeline(unet, ema_model, scheduler, staging_dir, card)
    # Grids of an earlier run (other step counts, or the old `samples.png`) would otherwise stay and be pushed.
    for name in os.listdir(args.output_dir):
        if fnmatch.fnmatch(name, "samples*.png") and name not in sample_images:
            os.remove(os.path.join(args.output_dir, name))
    publish_directory(staging_dir, args.output_dir)
    accelerator.print(
        f"Pipeline: {os.path.abspath(args.output_dir)} (load with `import ddim_plus; "
        f"DiffusionPipeline.from_pretrained({args.output_dir!r})`)\n"
        f"Samples: {', '.join(os.path.join(args.output_dir, name) for name in sample_images)}\n"
        f"Model card: {os.path.join(args.output_dir, 'README.md')}"
    )
    if publisher is not None:
        commit = publisher.finish(args.output_dir, "Upload DDIM pipeline trained with ddim_plus", HUB_IGNORE_PATTERNS)
        accelerator.print(f"Pushed to https://huggingface.co/{publisher.repo_id} ({commit})")


def cli(argv=None) -> None:
    """The command-line entry point: a mistake in the flags or data exits with its message, not a traceback."""
    try:
        main(argv)
    except InputError as error:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {error}")


if __name__ == "__main__":
    cli()
