"""What the trainer leaves behind: the exported pipeline (EMA weights), its model card, the final report and grid
files, tracker images, the Hub upload, and the weights digest of the debug log.

Nothing here samples or scores: the trainer (`ddim_plus.train`) draws the grids and scores them, and passes them in.
"""

import argparse
import fnmatch
import functools
import hashlib
import json
import os
import shutil
from typing import Dict, List, Optional

import numpy as np
import torch

from ddim_plus.hub import HubPublisher, make_model_card
from ddim_plus.pipeline_ddim_plus import DDIMPlusPipeline
from ddim_plus.training.args import InputError
from ddim_plus.training.checkpoints import STAGING_PREFIX, hub_ignore_patterns, publish_directory
from ddim_plus.training.data import DIGITS_DATASET_NAME
from ddim_plus.training.ema import ema_weights

# Why the demo recipe saves the sampling config it does, for its model card; the measurements are in
# docs/results.md, with the commands that made them.
SAMPLING_CONFIG_REASON = (
    "The saved sampling config (eta 0, `ddim_solver_order=2`, `logsnr` spacing, `clip_sample=True` with eps "
    "re-derived from the clipped x_0, 20 steps) is the one that ddim_plus's measurements for this recipe favour "
    "(docs/results.md in the ddim_plus source): deterministic sampling converges as the number of steps grows, "
    "second-order steps spaced evenly in log-SNR reach with few network calls the quality of many, and clipping "
    "does not change the scores beyond their spread."
)
# What the model-index names as the data the digits scores were measured on (not a Hub dataset: no `datasets:`).
DIGITS_EVAL_DATASET = ("digits", "8x8 handwritten digits (UCI, bundled with ddim_plus)")


def log_grid(accelerator, grid, name: str, step: int) -> None:
    """Send a sample grid (a PIL image) to every tracker that takes images, through accelerate's tracker API."""
    pixels = np.asarray(grid.convert("RGB"))[None]  # one image, NHWC
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: pixels}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: pixels}, step=step)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights, to check that processes (or runs) ended identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DebugLog:
    """`--debug_log`: one JSON line per optimiser step of this process (sample indices, loss, learning rate) in
    `process-<i>.debug.jsonl`, and a last line with the digest of the final weights, so that tests can compare runs
    and processes."""

    def __init__(self, output_dir: str, process_index: int):
        self.process_index = process_index
        path = os.path.join(output_dir, f"process-{process_index}.debug.jsonl")
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        # Flushed at once: a killed run keeps the lines of the steps it made.
        self.file.write(json.dumps(dict(record, process=self.process_index)) + "\n")
        self.file.flush()

    def close(self, unet: torch.nn.Module, **final) -> None:
        self.write(dict(final=True, weights=weights_digest(unet), **final))
        self.file.close()


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
    """Save the pipeline with the EMA weights (the raw ones without EMA) and its model card `card` into `folder`."""
    with ema_weights(unet, ema_model):
        DDIMPlusPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, model_card=card)


def export_snapshot(args, unet, ema_model, scheduler, card, publisher: Optional[HubPublisher], epoch: int) -> None:
    """The export at the end of an epoch (`--save_model_epochs`): the pipeline into `output_dir`, and with
    `publisher` a copy uploaded in the background while training goes on."""
    staging_dir = fresh_staging_dir(args.output_dir)
    export_pipeline(unet, ema_model, scheduler, staging_dir, card)
    if publisher is not None:
        # The upload reads the copy later, after the staging folder has been published.
        copy = functools.partial(shutil.copytree, staging_dir, dirs_exist_ok=True)
        publisher.upload_snapshot(copy, f"Epoch {epoch}")
    publish_directory(staging_dir, args.output_dir)


def metrics_description(args: argparse.Namespace, scored: bool) -> str:
    """The model card's words on how its samples were drawn and, for the digits (`scored`), scored."""
    sampler = (
        f"Samples from the EMA weights, DDIM with `{args.timestep_spacing}` spacing and solver order "
        f"{args.ddim_solver_order}."
    )
    if not scored:
        return sampler
    return (
        f"{sampler} Recognisable fraction: share of samples that the digits CNN shipped with ddim_plus, with its "
        "fitted not-a-digit output (`ddim_plus.evaluation.digits`), labels with probability > 0.5; class balance: "
        "normalised entropy of the predicted-class histogram (1 = uniform); FD: Frechet distance to the 1,797 real "
        "digits in the hidden-layer features of the same CNN (`ddim_plus.evaluation.fid`; lower is better). "
        + SAMPLING_CONFIG_REASON
    )


def finish_outputs(
    args,
    accelerator,
    unet,
    ema_model,
    scheduler,
    staging_dir: str,
    sample_images: List[str],
    metrics: List[Dict[str, object]],
    scored: bool,
    num_images: int,
    total_batch_size: int,
    global_step: int,
    publisher: Optional[HubPublisher] = None,
) -> None:
    """Complete the final outputs in `staging_dir` (which holds the grids `sample_images`): `metrics.json`, the model
    card (with the digits' scores when `scored`) and the pipeline; move them into `output_dir`, and with `publisher`
    (`--push_to_hub`) upload it once the background uploads are done."""
    with open(os.path.join(staging_dir, "metrics.json"), "w", encoding="utf-8") as file:
        json.dump(metrics, file, indent=2)
    fd_columns = [key for key in metrics[0] if key.startswith("FD [")] if metrics and scored else []
    card = model_card(
        args,
        scheduler,
        num_images,
        total_batch_size,
        global_step,
        sample_images=sample_images,
        metrics=metrics,
        metric_columns=["recognisable fraction", "class balance", *fd_columns] if scored else [],
        metrics_dataset=DIGITS_EVAL_DATASET if scored else None,
        metrics_description=metrics_description(args, scored),
    )
    export_pipeline(unet, ema_model, scheduler, staging_dir, card)
    # Grids of another run (other step counts) would otherwise stay beside the new ones and be pushed.
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
        ignore_patterns = hub_ignore_patterns(args.logging_dir)
        commit = publisher.finish(args.output_dir, "Upload DDIM pipeline trained with ddim_plus", ignore_patterns)
        accelerator.print(f"Pushed to https://huggingface.co/{publisher.repo_id} ({commit})")
