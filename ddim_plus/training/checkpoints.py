"""Checkpoints and run outputs of `ddim_plus.train`: atomic `save_state` folders, their rotation, resolving and
checking a resume, the outputs a run writes into `output_dir`, and publishing a finished pipeline into it."""

import fnmatch
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Folders being written are named like this; `latest` and the Hub upload never see them.
STAGING_PREFIX = ".staging-"
LOGS_DIRNAME = "logs"
# What the trainer's Hub upload leaves out: training state, logs and unfinished writes.
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
    """The checkpoint folder `resume_from_checkpoint` names.

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
        f"`resume_from_checkpoint`={resume_from_checkpoint!r} is not a checkpoint folder (checkpoints in "
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
            f"The checkpoint {checkpoint_dir!r} has no `unet/config.json`; it was not written by `ddim_plus.train`."
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
            f"The checkpoint {checkpoint_dir!r} holds a UNet with another configuration ({details}); resume with the "
            "UNet configuration it was saved with, or start a new run in another `output_dir`."
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
        `str` or `None`: a warning to print (a changed `max_train_steps`, or a checkpoint without a run record,
        which cannot be checked), else `None`.

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
            details = "; ".join(f"`{key}`: checkpoint {old!r}, now {new!r}" for key, (old, new) in differing.items())
            raise ValueError(
                f"The checkpoint {checkpoint_dir!r} belongs to a run with other settings ({details}). Resume with the "
                "same settings, or start a new run in another `output_dir`."
            )
    step = checkpoint_step(checkpoint_dir)
    if step >= run_record["max_train_steps"]:
        raise ValueError(
            f"The checkpoint {checkpoint_dir!r} is at step {step}, at or past `max_train_steps`="
            f"{run_record['max_train_steps']}; nothing is left to train. Raise `max_train_steps`, or start a new "
            "run in another `output_dir`."
        )
    if saved is None:
        return (
            f"{checkpoint_dir!r} has no {RUN_RECORD_NAME} (an older trainer's): it cannot be checked to be this run's."
        )
    if saved.get("max_train_steps") != run_record["max_train_steps"]:
        return (
            f"`max_train_steps` changed from {saved.get('max_train_steps')} to {run_record['max_train_steps']}: "
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
    """Delete what `find_run_outputs` finds (for `overwrite_output_dir`); returns the names removed."""
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
