"""Checkpoints and run outputs of `ddim_plus.train`: atomic `save_state` folders, their rotation, resolving and
checking a resume, the outputs a run writes into `output_dir`, and publishing a finished pipeline into it."""

import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
from typing import Dict, List, Optional, Tuple

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Folders being written are named like this; `latest` and the Hub upload never see them.
STAGING_PREFIX = ".staging-"
LOGS_DIRNAME = "logs"
# Written into every checkpoint and into `output_dir` when a run starts: the settings of the run (see
# `check_resume`). It holds local paths, so it is never uploaded.
RUN_RECORD_NAME = "training_run.json"
# What a run writes into `output_dir` besides the published pipeline (and besides the tracker folder, whose name is a
# flag): training state, progress grids, unfinished writes, debug logs and the run's record. None is uploaded.
TRAINING_STATE_PATTERNS = (
    f"{CHECKPOINT_PREFIX}*",
    f"{STAGING_PREFIX}*",
    "samples",
    "*.debug.jsonl",
    RUN_RECORD_NAME,
)
# The published pipeline a run writes into `output_dir`: model index, weights, scheduler, card, scores, final grids.
PIPELINE_PATTERNS = ("model_index.json", "unet", "scheduler", "README.md", "metrics.json", "samples*.png")
# Set by tests of killed runs only: the process kills itself (SIGKILL) at the point of that name (`kill_point`).
KILL_AT_ENV = "DDIM_PLUS_TEST_KILL_AT"
# Bytes of each file of an image folder hashed into the data fingerprint of a run.
FINGERPRINT_HEAD_BYTES = 4096


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
    kill_point("staging-checkpoint")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run_record is not None:
            write_run_record(staging_dir, run_record)
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


def write_run_record(folder: str, run_record: Dict[str, object]) -> None:
    """Write a run's settings as `training_run.json` into `folder` (a checkpoint, or `output_dir`)."""
    with open(os.path.join(folder, RUN_RECORD_NAME), "w", encoding="utf-8") as file:
        json.dump(run_record, file, indent=2, sort_keys=True)


def read_run_record(folder: str) -> Optional[Dict[str, object]]:
    """The `training_run.json` of `folder`, or `None` when it has none."""
    path = os.path.join(folder, RUN_RECORD_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def kill_point(name: str) -> None:
    """Kill this process with SIGKILL when the environment variable `DDIM_PLUS_TEST_KILL_AT` is `name`: the tests of
    runs killed at a given moment (during a checkpoint write, during the final export) set it; nothing else does."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def data_fingerprint(
    dataset, dataset_name: Optional[str], dataset_config_name: Optional[str], train_data_dir: Optional[str]
) -> Dict[str, object]:
    """What identifies a run's training data, for `check_resume`.

    An image folder is fingerprinted by its files: for each (relative path) its size and the SHA-256 of its first
    `FINGERPRINT_HEAD_BYTES` bytes, so an added, removed or replaced image is named. A `datasets` dataset is
    fingerprinted by its name, configuration, row count and `datasets`' own fingerprint (which follows the files and
    revision it was built from).

    Returns:
        `Dict[str, object]`: JSON-serialisable.
    """
    if train_data_dir is None:
        return {
            "dataset_name": dataset_name,
            "dataset_config_name": dataset_config_name,
            "rows": len(dataset),
            "fingerprint": getattr(dataset, "_fingerprint", None),
        }
    files = {}
    for root, folders, names in os.walk(train_data_dir):
        folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
        for name in sorted(name for name in names if not name.startswith(".")):
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                head = hashlib.sha256(file.read(FINGERPRINT_HEAD_BYTES)).hexdigest()[:16]
            files[os.path.relpath(path, train_data_dir).replace(os.sep, "/")] = [os.path.getsize(path), head]
    return {"files": files}


def describe_data_change(saved: Dict[str, object], current: Dict[str, object]) -> str:
    """In words, how the training data `current` differs from the `saved` fingerprint (`data_fingerprint`)."""
    if "files" in saved and "files" in current:
        old, new = saved["files"], current["files"]
        changes = {
            "added": sorted(new.keys() - old.keys()),
            "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(name for name in old.keys() & new.keys() if old[name] != new[name]),
        }
        return ", ".join(
            f"{len(names)} files {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for kind, names in changes.items()
            if names
        )
    keys = sorted(set(saved) | set(current))
    return ", ".join(
        f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)
    )


def compare_run_records(
    saved: Dict[str, object], run_record: Dict[str, object], saved_name: str = "checkpoint"
) -> List[str]:
    """The settings of `run_record` that differ from the `saved` record of a run (`saved_name` in the words), in
    words; `max_train_steps` aside, and settings the saved record lacks, as an older trainer's records do."""
    differences = []
    for key, value in run_record.items():
        if key == "max_train_steps" or key not in saved or _as_json(saved[key]) == _as_json(value):
            continue
        if key == "data":
            differences.append(f"the training data: {describe_data_change(saved[key], value)}")
        else:
            differences.append(f"`{key}`: {saved_name} {saved[key]!r}, now {value!r}")
    return differences


def check_resume(checkpoint_dir: str, run_record: Dict[str, object]) -> Optional[str]:
    """Raise unless `checkpoint_dir` belongs to the run described by `run_record` and is not past its end.

    A checkpoint at the run's last step is accepted: a run killed while writing its final outputs writes them again.

    Args:
        checkpoint_dir (`str`): the checkpoint to resume from.
        run_record (`Dict[str, object]`): the current run's settings (with its data's fingerprint under `data`),
            including `max_train_steps`.

    Returns:
        `str` or `None`: a warning to print (a changed `max_train_steps`, or a checkpoint without a run record,
        which cannot be checked), else `None`.

    Raises:
        `ValueError`: the checkpoint's step is past `max_train_steps`, or it was saved by a run with other settings
        or data (naming what differs).
    """
    saved = read_run_record(checkpoint_dir)
    if saved is not None:
        differences = compare_run_records(saved, run_record)
        if differences:
            raise ValueError(
                f"The checkpoint {checkpoint_dir!r} belongs to a run with other settings ({'; '.join(differences)})."
                " Resume with the same settings and data, or start a new run in another `output_dir`."
            )
    step = checkpoint_step(checkpoint_dir)
    if step > run_record["max_train_steps"]:
        raise ValueError(
            f"The checkpoint {checkpoint_dir!r} is at step {step}, past `max_train_steps`="
            f"{run_record['max_train_steps']}. Raise `max_train_steps`, or start a new run in another `output_dir`."
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


def logging_dir_entry(logging_dir: str) -> Optional[str]:
    """The entry of `output_dir` that holds the tracker folder `--logging_dir` (its first component), or `None` when
    the tracker folder lies outside `output_dir`."""
    path = os.path.normpath(logging_dir)
    if os.path.isabs(path) or path == os.curdir or path.split(os.sep)[0] == os.pardir:
        return None
    return path.split(os.sep)[0]


def unpublished_entries(logging_dir: str = LOGS_DIRNAME) -> Tuple[str, ...]:
    """Name patterns of the entries of `output_dir` that are not uploaded: `TRAINING_STATE_PATTERNS` and the tracker
    folder of `--logging_dir`."""
    entry = logging_dir_entry(logging_dir)
    return TRAINING_STATE_PATTERNS + ((glob_escape(entry),) if entry else ())


def glob_escape(name: str) -> str:
    """`name` as a pattern for `fnmatch` that matches only itself."""
    return re.sub(r"([*?[])", r"[\1]", name)


def hub_ignore_patterns(logging_dir: str = LOGS_DIRNAME) -> List[str]:
    """`ignore_patterns` for `huggingface_hub.upload_folder` of a run's `output_dir`: each entry of
    `unpublished_entries`, as a file and as a folder."""
    return [pattern for entry in unpublished_entries(logging_dir) for pattern in (entry, f"{entry}/**")]


def find_run_outputs(output_dir: str, logging_dir: str = LOGS_DIRNAME) -> List[str]:
    """The entries of `output_dir` that a training run writes (pipeline, grids, checkpoints, logs), sorted."""
    if not os.path.isdir(output_dir):
        return []
    patterns = (*PIPELINE_PATTERNS, *unpublished_entries(logging_dir))
    return sorted(name for name in os.listdir(output_dir) if any(fnmatch.fnmatch(name, p) for p in patterns))


def remove_entries(output_dir: str, names: List[str]) -> List[str]:
    """Delete the entries `names` (files or folders) of `output_dir`; returns `names`."""
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return names


def remove_unfinished(output_dir: str) -> List[str]:
    """Delete the staging folders a killed run leaves in `output_dir` (`.staging-*`); returns the names removed."""
    return remove_entries(
        output_dir, sorted(name for name in os.listdir(output_dir) if name.startswith(STAGING_PREFIX))
    )


def remove_run_outputs(output_dir: str, logging_dir: str = LOGS_DIRNAME) -> List[str]:
    """Delete what `find_run_outputs` finds (for `overwrite_output_dir`, and to start an unfinished run over);
    returns the names removed."""
    return remove_entries(output_dir, find_run_outputs(output_dir, logging_dir))


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
    for position, name in enumerate(names):
        if position == 1:
            kill_point("publish")
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
