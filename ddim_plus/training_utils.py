"""Building blocks of `training/train.py`: the diffusion loss, reproducible randomness, EMA checkpoint hooks,
atomic checkpoints, argument checks and Hub publishing.

They live here rather than in the script so that tests and `benchmarks/bench_train.py` call exactly the code the
trainer runs.
"""

import fnmatch
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .ddim_math import PREDICTION_TYPES

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Folders being written are named like this; `latest` and the Hub upload never see them.
STAGING_PREFIX = ".staging-"
LOGS_DIRNAME = "logs"
# What `push_to_hub` leaves out: training state, logs and unfinished writes.
HUB_IGNORE_PATTERNS = (
    f"{CHECKPOINT_PREFIX}*",
    f"{CHECKPOINT_PREFIX}*/**",
    f"{LOGS_DIRNAME}/**",
    f"{STAGING_PREFIX}*",
    f"{STAGING_PREFIX}*/**",
    "*.debug.jsonl",
)
# What the trainer writes into `output_dir` (besides the tracker folder): a folder holding any of these holds a run.
RUN_OUTPUT_PATTERNS = (
    "model_index.json",
    "unet",
    "scheduler",
    "README.md",
    "metrics.json",
    "samples",
    "samples*.png",
    f"{CHECKPOINT_PREFIX}*",
    f"{STAGING_PREFIX}*",
    "*.debug.jsonl",
)
# Written into every checkpoint: the settings of the run it belongs to (see `check_resume`).
RUN_RECORD_NAME = "training_run.json"


# ----------------------------------------------------------------------------------------------------------------
# Reproducible randomness
# ----------------------------------------------------------------------------------------------------------------
def keyed_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy's `SeedSequence`, so nearby keys give unrelated streams)."""
    low, high = np.random.SeedSequence([int(key) for key in keys]).generate_state(2, dtype=np.uint32)
    return int(high & 0x7FFFFFFF) << 32 | int(low)


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch, the same whenever and wherever it is drawn."""
    return np.random.default_rng(keyed_seed(seed, epoch, index))


def step_generator(seed: int, step: int, process_index: int, device="cpu") -> torch.Generator:
    """The generator of one micro-batch's noise and timesteps on one process.

    Args:
        seed (`int`): the run's seed.
        step (`int`): index of the micro-batch since the start of training (counting every process's batches once).
        process_index (`int`): the process, so that processes draw different noise.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the generator draws.
    """
    return torch.Generator(device=device).manual_seed(keyed_seed(seed, step, process_index))


# ----------------------------------------------------------------------------------------------------------------
# The diffusion loss
# ----------------------------------------------------------------------------------------------------------------
def sample_noise_and_timesteps(
    clean_images: torch.Tensor, num_train_timesteps: int, generator: torch.Generator, noise_offset: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (plus `noise_offset` times a per-channel constant, Guttenberg 2023) and uniform timesteps.

    Returns:
        `Tuple[torch.Tensor, torch.Tensor]`: noise shaped like `clean_images` and timesteps (B,) int64.
    """
    batch_size, num_channels = clean_images.shape[:2]
    device = clean_images.device
    noise = torch.randn(clean_images.shape, generator=generator, device=device, dtype=clean_images.dtype)
    if noise_offset:
        offset = torch.randn(
            (batch_size, num_channels, 1, 1), generator=generator, device=device, dtype=clean_images.dtype
        )
        noise = noise + noise_offset * offset
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
    return noise, timesteps


def min_snr_loss_weights(alphas_cumprod: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per timestep (Hang et al. 2023), for a loss measured on the network's output.

    With SNR_t = abar_t / (1 - abar_t), the weight is min(SNR_t, gamma) / SNR_t for epsilon prediction,
    min(SNR_t, gamma) / (SNR_t + 1) for v-prediction and min(SNR_t, gamma) for x_0 prediction: each is the
    x_0-space weight min(SNR_t, gamma) converted to the space the network predicts in. The epsilon weight is written
    min(1, gamma / SNR_t) so that zero-terminal-SNR schedules (SNR_T = 0) give 1, not 0/0.

    Args:
        alphas_cumprod (`torch.Tensor`): abar_t for every training timestep.
        snr_gamma (`float`): gamma > 0 (5 in the paper).
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"sample"`.

    Returns:
        `torch.Tensor`: float32 weights, one per training timestep.
    """
    if snr_gamma <= 0:
        raise ValueError(f"`snr_gamma` must be > 0, got {snr_gamma}; 5.0 is the paper's value.")
    abar = alphas_cumprod.to(torch.float64)
    snr = abar / (1.0 - abar)
    if prediction_type == "epsilon":
        weights = torch.clamp(snr_gamma / snr, max=1.0)
    elif prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1.0)
    elif prediction_type == "sample":
        weights = torch.clamp(snr, max=snr_gamma)
    else:
        raise ValueError(f"`prediction_type`={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}.")
    return weights.to(torch.float32)


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str = "epsilon",
    loss_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean squared error between the UNet's output at x_t = add_noise(x_0, noise, t) and its target.

    Args:
        unet (`torch.nn.Module`): a `UNet2DModel` (or anything called as `unet(x_t, t).sample`).
        noise_scheduler: gives `add_noise` and `get_velocity` (e.g. `DDIMSchedulerPlus`).
        clean_images (`torch.Tensor`): x_0, (B, C, H, W) in [-1, 1].
        noise (`torch.Tensor`): eps, same shape.
        timesteps (`torch.Tensor`): (B,) training timesteps.
        prediction_type (`str`, defaults to `"epsilon"`): target: eps, v = sqrt(abar) eps - sqrt(1 - abar) x_0, or x_0.
        loss_weights (`torch.Tensor`, *optional*): one weight per training timestep (e.g. `min_snr_loss_weights`);
            the unweighted mean when `None`.

    Returns:
        `torch.Tensor`: the scalar loss, float32.
    """
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    model_output = unet(noisy_images, timesteps).sample
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    elif prediction_type == "sample":
        target = clean_images
    else:
        raise ValueError(f"`prediction_type`={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}.")
    if loss_weights is None:
        return F.mse_loss(model_output.float(), target.float())
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * loss_weights.to(per_sample.device)[timesteps]).mean()


def training_step(
    accelerator,
    unet: torch.nn.Module,
    optimizer,
    lr_scheduler,
    noise_scheduler,
    clean_images: torch.Tensor,
    generator: torch.Generator,
    prediction_type: str = "epsilon",
    loss_weights: Optional[torch.Tensor] = None,
    noise_offset: float = 0.0,
    max_grad_norm: Optional[float] = 1.0,
) -> torch.Tensor:
    """One micro-batch: noise, loss, backward and (on gradient-sync steps) clipping and the optimiser step.

    Call it inside `accelerator.accumulate(unet)`; the prepared optimiser and LR scheduler skip their steps by
    themselves on accumulation-only micro-batches.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        unet, optimizer, lr_scheduler: as returned by `accelerator.prepare`.
        noise_scheduler: the training noise schedule (`DDIMSchedulerPlus`).
        clean_images (`torch.Tensor`): the micro-batch, (B, C, H, W) in [-1, 1].
        generator (`torch.Generator`): source of noise and timesteps (see `step_generator`).
        prediction_type (`str`, defaults to `"epsilon"`), loss_weights (`torch.Tensor`, *optional*): see
            `diffusion_loss`.
        noise_offset (`float`, defaults to 0.0): see `sample_noise_and_timesteps`.
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient clipping norm; `None` or 0 turns it off.

    Returns:
        `torch.Tensor`: the micro-batch's loss, detached.
    """
    noise, timesteps = sample_noise_and_timesteps(
        clean_images, noise_scheduler.config.num_train_timesteps, generator, noise_offset
    )
    with accelerator.autocast():
        loss = diffusion_loss(unet, noise_scheduler, clean_images, noise, timesteps, prediction_type, loss_weights)
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------------------------------------------
# EMA and checkpoint hooks
# ----------------------------------------------------------------------------------------------------------------
def create_ema_model(unet, max_decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 0.75):
    """diffusers' `EMAModel` of `unet` with the anchor trainer's warm-up (decay 1 - (1 + step / inv_gamma)^-power,
    capped at `max_decay`), using fused `foreach` updates."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    return EMAModel(
        unet.parameters(),
        decay=max_decay,
        use_ema_warmup=True,
        inv_gamma=inv_gamma,
        power=power,
        foreach=True,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )


def register_checkpoint_hooks(accelerator, ema_model=None) -> None:
    """Make `accelerator.save_state`/`load_state` store the UNet in `unet/` and the EMA in `unet_ema/`
    (diffusers format, safetensors), instead of accelerate's anonymous `model.safetensors`.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        ema_model (`diffusers.training_utils.EMAModel`, *optional*): the EMA to save and restore alongside.
    """
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    def save_model_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
            # Popped on every process so that accelerate does not save the same weights a second time (under
            # DeepSpeed and FSDP accelerate saves the model itself and passes no weights).
            if weights:
                weights.pop()
        if ema_model is not None and accelerator.is_main_process:
            ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            # Read directly rather than with `EMAModel.from_pretrained`, which passes the folder to `from_config` (a
            # diffusers FutureWarning) and warns twice that the EMA's settings in config.json are no UNet settings.
            ema_dir = os.path.join(input_dir, "unet_ema")
            state = UNet2DModel.load_config(ema_dir)
            weights = load_file(os.path.join(ema_dir, "diffusion_pytorch_model.safetensors"))
            names = [name for name, _ in UNet2DModel.from_config(ema_model.model_config).named_parameters()]
            state["shadow_params"] = [weights[name] for name in names]
            ema_model.load_state_dict(state)
            ema_model.to(accelerator.device)
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = UNet2DModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Finished checkpoints in `output_dir` as (step, path), oldest first; folders being written are skipped."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """The checkpoint folder `--resume_from_checkpoint` names.

    Args:
        output_dir (`str`): the run's output folder.
        resume_from_checkpoint (`str`, *optional*): `"latest"` (the newest finished checkpoint in `output_dir`, or
            none: a fresh start), a path, or a checkpoint name inside `output_dir`.

    Returns:
        `str` or `None`: the folder to resume from, `None` to start from scratch.

    Raises:
        `ValueError`: a named checkpoint does not exist.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if _CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(candidate))) and os.path.isdir(candidate):
            return candidate
    available = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
    raise ValueError(
        f"`--resume_from_checkpoint`={resume_from_checkpoint!r} is not a checkpoint folder (checkpoints in "
        f"{output_dir!r}: {available or 'none'}); pass one of them, a path to one, or 'latest'."
    )


def checkpoint_step(checkpoint_dir: str) -> int:
    """The optimiser step a checkpoint was saved at, from its folder name."""
    return int(_CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(checkpoint_dir))).group(1))


def check_checkpoint_compatible(checkpoint_dir: str, unet_config: Dict) -> None:
    """Raise if the checkpoint's UNet was built with another architecture than `unet_config`.

    Raises:
        `ValueError`: naming the settings that differ, or the missing `unet/config.json`.
    """
    config_path = os.path.join(checkpoint_dir, "unet", "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"`--resume_from_checkpoint`: {checkpoint_dir!r} has no `unet/config.json`; it was not written by "
            "this trainer."
        )
    with open(config_path, encoding="utf-8") as file:
        saved = json.load(file)
    differing = {
        key: (saved.get(key), value)
        for key, value in unet_config.items()
        if not key.startswith("_") and _as_json(saved.get(key)) != _as_json(value)
    }
    if differing:
        details = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in sorted(differing.items()))
        raise ValueError(
            f"`--resume_from_checkpoint`: {checkpoint_dir!r} holds a UNet with another configuration ({details}); "
            "resume with the same `--model_config_name_or_path` and `--resolution`, or start a new `--output_dir`."
        )


def _as_json(value):
    return json.loads(json.dumps(value))


def save_checkpoint(
    accelerator,
    output_dir: str,
    global_step: int,
    checkpoints_total_limit: Optional[int],
    run_record: Optional[Dict[str, object]] = None,
) -> str:
    """`accelerator.save_state` into `checkpoint-<global_step>`, atomically, then drop the oldest checkpoints.

    Every process writes its part (e.g. its RNG state) into a staging folder; the main process renames it only when
    all are done, so a run killed while saving never leaves a `checkpoint-N` that `latest` would pick up.

    Args:
        run_record (`Dict[str, object]`, *optional*): the run's settings, saved as `training_run.json` so that a
            resume can check that it continues the same run (`check_resume`).

    Returns:
        `str`: the checkpoint folder.
    """
    final_dir = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    staging_dir = os.path.join(output_dir, f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}{global_step}")
    if accelerator.is_main_process and os.path.exists(staging_dir):
        shutil.rmtree(staging_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run_record is not None:
            with open(os.path.join(staging_dir, RUN_RECORD_NAME), "w", encoding="utf-8") as file:
                json.dump(run_record, file, indent=2, sort_keys=True)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(staging_dir, final_dir)
        rotate_checkpoints(output_dir, checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return final_dir


def rotate_checkpoints(output_dir: str, checkpoints_total_limit: Optional[int]) -> List[str]:
    """Delete the oldest checkpoints so that at most `checkpoints_total_limit` remain; returns those deleted."""
    if checkpoints_total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - checkpoints_total_limit)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def check_resume(checkpoint_dir: str, run_record: Dict[str, object]) -> Optional[str]:
    """Raise unless `checkpoint_dir` belongs to the run described by `run_record` and is not past its end.

    Args:
        checkpoint_dir (`str`): the checkpoint to resume from.
        run_record (`Dict[str, object]`): the current run's settings, including `max_train_steps`.

    Returns:
        `str` or `None`: a warning to print (a changed `max_train_steps`, or a checkpoint without a record, written
        by an earlier version of the trainer), else `None`.

    Raises:
        `ValueError`: the checkpoint's step is at or past `max_train_steps`, or it was saved by a run with other
        settings (naming them).
    """
    record_path = os.path.join(checkpoint_dir, RUN_RECORD_NAME)
    saved = None
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as file:
            saved = json.load(file)
    if saved is not None:
        differing = {
            key: (saved.get(key), value)
            for key, value in run_record.items()
            if key != "max_train_steps" and _as_json(saved.get(key)) != _as_json(value)
        }
        if differing:
            details = "; ".join(f"--{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in differing.items())
            raise ValueError(
                f"`--resume_from_checkpoint`: {checkpoint_dir!r} belongs to a run with other settings ({details}). "
                "Resume with the same flags, or start a new run in another `--output_dir`."
            )
    step = checkpoint_step(checkpoint_dir)
    if step >= run_record["max_train_steps"]:
        raise ValueError(
            f"`--resume_from_checkpoint`: {checkpoint_dir!r} is at step {step}, at or past `--max_train_steps`="
            f"{run_record['max_train_steps']}; nothing is left to train. Raise `--max_train_steps`, or start a new "
            "run in another `--output_dir`."
        )
    if saved is None:
        return (
            f"{checkpoint_dir!r} has no {RUN_RECORD_NAME} (an older trainer's): it cannot be checked to be this run's."
        )
    if saved.get("max_train_steps") != run_record["max_train_steps"]:
        return (
            f"`--max_train_steps` changed from {saved.get('max_train_steps')} to {run_record['max_train_steps']}: "
            "the learning-rate schedule is rebuilt for the new length, so the learning rate jumps at the resume."
        )
    return None


def find_run_outputs(output_dir: str, logging_dir: str = LOGS_DIRNAME) -> List[str]:
    """The entries of `output_dir` that a training run writes (pipeline, grids, checkpoints, logs), sorted."""
    if not os.path.isdir(output_dir):
        return []
    patterns = (*RUN_OUTPUT_PATTERNS, os.path.normpath(logging_dir).split(os.sep)[0])
    return sorted(name for name in os.listdir(output_dir) if any(fnmatch.fnmatch(name, p) for p in patterns))


def remove_run_outputs(output_dir: str, logging_dir: str = LOGS_DIRNAME) -> List[str]:
    """Delete what `find_run_outputs` finds (for `--overwrite_output_dir`); returns the names removed."""
    removed = find_run_outputs(output_dir, logging_dir)
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def publish_directory(staging_dir: str, output_dir: str, commit_file: str = "model_index.json") -> None:
    """Move everything in `staging_dir` into `output_dir`, `commit_file` last, then remove `staging_dir`.

    Each entry is moved with `os.replace` (atomic per entry), and the old `commit_file` is removed first: a loader
    that needs `model_index.json` therefore never sees a pipeline that is half old and half new.
    """
    os.makedirs(output_dir, exist_ok=True)
    commit_target = os.path.join(output_dir, commit_file)
    if os.path.exists(commit_target):
        os.remove(commit_target)
    names = sorted(os.listdir(staging_dir), key=lambda name: name == commit_file)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            # A folder cannot be replaced while not empty: move the old one aside, then delete it.
            trash = os.path.join(output_dir, f"{STAGING_PREFIX}old-{name}")
            os.replace(target, trash)
            os.replace(os.path.join(staging_dir, name), target)
            shutil.rmtree(trash)
        else:
            os.replace(os.path.join(staging_dir, name), target)
    shutil.rmtree(staging_dir)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------
def unet_downsampling_factor(unet_config: Dict) -> int:
    """How much `UNet2DModel` shrinks its input: 2 per down block except the last."""
    return 2 ** (len(unet_config["down_block_types"]) - 1)


def check_resolution(resolution: int, unet_config: Dict) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------
def push_to_hub(
    output_dir: str,
    repo_id: str,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload DDIM pipeline trained with ddim_plus",
    ignore_patterns: Sequence[str] = HUB_IGNORE_PATTERNS,
) -> str:
    """Create (or reuse) the model repo `repo_id` and upload `output_dir` without checkpoints and logs.

    Args:
        output_dir (`str`): the trained pipeline, its samples and `README.md`.
        repo_id (`str`): `name` or `user/name`.
        private (`bool`, defaults to `False`): create the repo private (an existing repo keeps its visibility).
        token (`str`, *optional*): a Hub token; the logged-in one otherwise.
        commit_message (`str`): the commit's message.
        ignore_patterns (`Sequence[str]`): what stays local (defaults to checkpoints, logs and unfinished writes).

    Returns:
        `str`: the repo id the Hub resolved (with the user or organisation).
    """
    from huggingface_hub import create_repo, upload_folder

    resolved_id = create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
    upload_folder(
        repo_id=resolved_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns),
        token=token,
        repo_type="model",
    )
    return resolved_id
