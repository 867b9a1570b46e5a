"""Train an unconditional `UNet2DModel` and publish it as a DDIM pipeline (ddim_plus).

    accelerate launch -m ddim_plus.train                                  # bundled digits, CPU or GPU
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

import logging
import math
import os
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
from tqdm.auto import tqdm

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.evaluation.sampling import generate_images
from ddim_plus.images import make_grid
from ddim_plus.training.args import (
    GRID_SAMPLES,
    InputError,
    as_flags,
    check_restart,
    describe_recipe,
    input_errors,
    parse_args,
    prepare_run,
    run_record,
    uses_bundled_digits,
    validate_args,
)
from ddim_plus.training.checkpoints import (
    check_checkpoint_compatible,
    check_resume,
    checkpoint_step,
    kill_point,
    remove_run_outputs,
    remove_unfinished,
    save_checkpoint,
    write_run_record,
)
from ddim_plus.training.data import TrainingImages
from ddim_plus.training.ema import create_ema_model, ema_weights, register_checkpoint_hooks
from ddim_plus.training.loss import diffusion_loss, min_snr_loss_weights, sample_noise_and_timesteps, step_generator
from ddim_plus.training.outputs import (
    DebugLog,
    export_snapshot,
    finish_outputs,
    fresh_staging_dir,
    log_grid,
    model_card,
    start_publishing,
)

logger = get_logger(__name__, log_level="INFO")

# Each sample is drawn at least this many pixels wide in the saved grids, so 8x8 digits stay readable.
GRID_TILE_PIXELS = 64


def launched_without_accelerator_devices() -> bool:
    """Whether several processes were launched (e.g. `accelerate launch --multi_gpu`) on a machine without GPUs.

    accelerate then treats each process as a separate single-process run: each trains alone and all write the same
    files. Running them on the CPU makes them one data-parallel run over gloo instead.
    """
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_gpu


def create_accelerator(args) -> Accelerator:
    """The run's `Accelerator`, with a seedable data order, and INFO logging (and TF32 with `--allow_tf32`)."""
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        cpu=launched_without_accelerator_devices(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # A sampler seeded per epoch is what makes the data order after a resume the same as without one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # The other processes wait at the next collective while the main process samples, evaluates or saves.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.nccl_timeout))],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # accelerate reports every file of every checkpoint at INFO; our own line per checkpoint is enough.
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    return accelerator


def create_unet(args, unet_config: dict, accelerator: Accelerator):
    """The UNet to train (new from `unet_config`, or `--pretrained_model_name_or_path`'s) and its EMA (or `None`)."""
    if args.pretrained_model_name_or_path is None:
        unet = UNet2DModel.from_config(unet_config)
    else:
        try:
            unet = UNet2DModel.from_pretrained(
                args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
            )
        except OSError as error:  # diffusers' error for missing or unreadable weights (a variant not saved, ...)
            variant = f" as variant {args.variant!r}" if args.variant else ""
            raise InputError(
                f"`--pretrained_model_name_or_path`={args.pretrained_model_name_or_path!r}: its UNet (`unet/`) cannot "
                f"be loaded{variant} ({error}). Check `--variant` and `--revision` (leave `--variant` out for the "
                "default weights)."
            ) from error
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
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    ema_model = None
    if args.use_ema:
        ema_model = create_ema_model(unet, args.ema_max_decay, args.ema_inv_gamma, args.ema_power)
        ema_model.to(accelerator.device)
    if args.torch_compile:
        # After the EMA: it keeps the plain module's parameters, which the compiled module shares.
        unet = torch.compile(unet)
    return unet, ema_model


def create_dataloader(args, run: dict, accelerator: Accelerator):
    """The training images of `prepare_run`'s dataset, and their prepared (sharded, seeded) DataLoader."""
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
    return train_dataset, accelerator.prepare(train_dataloader)


def check_run_length(args, run: dict, settings: dict) -> None:
    """Refuse a checkpoint (or an unfinished run to start over) of another run, or a checkpoint past this one's end;
    warn about a changed length or a long warm-up."""
    with input_errors():
        if run["restart"] is not None:
            check_restart(args.output_dir, run["restart"], settings)
        warning = None
        if run["checkpoint"] is not None:
            # the flags first: a changed `--resolution` is named as such, not as the UNet config it changes
            warning = check_resume(run["checkpoint"], settings)
            check_checkpoint_compatible(run["checkpoint"], run["unet_config"])
    if warning:
        logger.warning(as_flags(warning))
    max_train_steps = settings["max_train_steps"]
    if args.lr_scheduler != "constant" and args.lr_warmup_steps > max_train_steps / 2:
        logger.warning(
            f"`--lr_warmup_steps`={args.lr_warmup_steps} is more than half of the {max_train_steps} optimiser steps: "
            "most of the run trains below the peak learning rate. Shorten the warm-up or train longer."
        )


def create_lr_scheduler(args, optimizer, max_train_steps: int, num_processes: int):
    """diffusers' `get_scheduler` for `--lr_scheduler`, counted in optimiser steps whatever the number of processes.

    A prepared LR scheduler steps once per process at every optimiser step (diffusers issue 8384): its step counts
    are scaled by the number of processes so warm-up and decay take the intended number of optimiser steps.
    """
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )


def resume(accelerator: Accelerator, checkpoint: str, max_train_steps: int) -> int:
    """Load the state saved in `checkpoint` (weights, EMA, optimiser, LR schedule, RNGs); returns its step."""
    accelerator.print(f"Resuming from {checkpoint}")
    accelerator.load_state(checkpoint)
    global_step = checkpoint_step(checkpoint)
    if global_step == max_train_steps:
        logger.info(f"{checkpoint} is the run's last step: writing its final outputs")
    return global_step


def take_output_dir(args, accelerator: Accelerator, run: dict, settings: dict):
    """Start the Hub upload (`--push_to_hub`), clear another run (`--overwrite_output_dir`) or this run's unfinished
    files, create `output_dir` and record the run in it: the first writes of the run, after every check. Returns the
    Hub publisher, or `None`."""
    publisher = None
    if args.push_to_hub and accelerator.is_main_process:
        # Before anything is trained or written: a bad token or a missing permission fails here.
        publisher = start_publishing(args)
    if accelerator.is_main_process:
        if args.overwrite_output_dir or run["restart"] is not None:
            removed = remove_run_outputs(args.output_dir, args.logging_dir)
            reason = "`--overwrite_output_dir`" if args.overwrite_output_dir else "No checkpoint: starting over"
            if removed:
                logger.info(f"{reason}: removed {', '.join(removed)} from {args.output_dir}")
        elif run["checkpoint"] is not None:
            removed = remove_unfinished(args.output_dir)
            if removed:
                logger.info(f"Removed the unfinished {', '.join(removed)} from {args.output_dir}")
    accelerator.wait_for_everyone()
    # On every process: each writes its share of the checkpoints (and its debug log) into this folder.
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        # Before any other file: a run killed before its first checkpoint can be started over (`restart`).
        write_run_record(args.output_dir, settings)
        # Never the Hub token: trackers write their config to disk (tensorboard's hparams.yml) or upload it (wandb).
        tracked = {
            key: value
            for key, value in vars(args).items()
            if key != "hub_token" and isinstance(value, (int, float, str, bool))
        }
        accelerator.init_trackers(args.tracker_project_name, config=tracked)
    return publisher


def save_grid(images: np.ndarray, path: str, resolution: int):
    """Save (B, H, W, C) images in [0, 1] as a square-ish grid, each tile at least GRID_TILE_PIXELS wide."""
    # A grey frame around each tile: digits touch their tile's edges, and without it the grid reads as stripes.
    grid = make_grid(images, scale=max(1, GRID_TILE_PIXELS // resolution), background=0.5)
    grid.save(path)
    return grid


def generate_with_ema(
    accelerator, unet, ema_model, scheduler, num_samples, num_inference_steps, eta, seed, batch, metric=None, desc=None
):
    """`generate_images` (image i from seed + i, as `ddim-plus sample`/`evaluate` draw it) with the EMA weights
    swapped in. With `desc`, the pipeline shows a progress bar so described."""
    model = accelerator.unwrap_model(unet, keep_torch_compile=False)
    with ema_weights(model, ema_model):
        was_training = model.training
        model.eval()
        pipeline = DDIMPlusPipeline(unet=model, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=desc is None, desc=desc)
        generated = generate_images(
            pipeline, num_samples, num_inference_steps, eta, seed=seed, batch_size=batch, metric=metric
        )
        model.train(was_training)
    return generated


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


def final_samples(args, accelerator, unet, ema_model, scheduler, staging_dir: str, global_step: int):
    """The final grids (one per `--eval_inference_steps`) into `staging_dir`, scored on the bundled digits.

    Returns:
        `(grid file names, metrics rows, whether they are scored)`.
    """
    scored = uses_bundled_digits(args)
    if scored:
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
            metric=digits_metric if scored else None,
            desc=f"Final samples, {num_steps} DDIM steps",
        )
        images = generated.images
        grid_name = f"samples_{num_steps}steps.png"
        # The grids show the first GRID_SAMPLES samples; the scores use all of them.
        grid = save_grid(images[:GRID_SAMPLES], os.path.join(staging_dir, grid_name), args.resolution)
        log_grid(accelerator, grid, f"final/samples_{num_steps}steps", global_step)
        sample_images.append(grid_name)
        row = {"DDIM steps": num_steps, "eta": args.ddim_eta, "samples": len(images)}
        if scored:
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
    return sample_images, metrics, scored


def main(argv=None) -> str:
    args = parse_args(argv, description=__doc__)
    with input_errors():
        validate_args(args)
    accelerator = create_accelerator(args)
    logger.info(describe_recipe(args))
    with input_errors():
        run = prepare_run(args, accelerator)
    set_seed(args.seed)

    # Model, EMA, loss weights, optimiser
    unet, ema_model = create_unet(args, run["unet_config"], accelerator)
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
        fused=args.fused_adam or None,
    )

    # Data, and the run's length
    train_dataset, train_dataloader = create_dataloader(args, run, accelerator)
    batches_per_epoch = len(train_dataloader)  # per process, after sharding
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    settings = run_record(args, run["data"], accelerator.num_processes, max_train_steps)
    check_run_length(args, run, settings)
    publisher = take_output_dir(args, accelerator, run, settings)  # nothing has been written before this

    lr_scheduler = create_lr_scheduler(args, optimizer, max_train_steps, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_checkpoint_hooks(accelerator, ema_model)
    global_step = resume(accelerator, run["checkpoint"], max_train_steps) if run["checkpoint"] else 0
    first_epoch = global_step // updates_per_epoch
    # Checkpoints are saved only after optimiser steps, so a resume starts at a whole number of them.
    batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} images, {num_epochs} epochs, {max_train_steps} optimiser steps of {total_batch_size} "
        f"images ({accelerator.num_processes} processes x {args.train_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation); starting at step {global_step}"
    )
    debug_log = DebugLog(args.output_dir, accelerator.process_index) if args.debug_log else None
    sampling_scheduler = DDIMSchedulerPlus.from_config(noise_scheduler.config)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

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
                clean_images = batch["pixel_values"].contiguous(memory_format=memory_format)
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
            if debug_log is not None:
                debug_log.write(dict(logs, step=global_step, indices=step_indices))
            step_losses, step_indices = [], []
            kill_point(f"step-{global_step}")

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
            card = model_card(args, sampling_scheduler, len(train_dataset), total_batch_size, global_step)
            unwrapped = accelerator.unwrap_model(unet, keep_torch_compile=False)
            export_snapshot(args, unwrapped, ema_model, sampling_scheduler, card, publisher, epoch)
            logger.info(f"Epoch {epoch}: exported the pipeline to {args.output_dir}")
    progress_bar.close()
    training_seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()

    final_unet = accelerator.unwrap_model(unet, keep_torch_compile=False)
    if debug_log is not None:
        debug_log.close(final_unet, step=global_step, lr=lr_scheduler.get_last_lr()[0])
    if accelerator.is_main_process:
        staging_dir = fresh_staging_dir(args.output_dir)
        grids, metrics, scored = final_samples(
            args, accelerator, final_unet, ema_model, sampling_scheduler, staging_dir, global_step
        )
        finish_outputs(
            args, accelerator, final_unet, ema_model, sampling_scheduler, staging_dir, grids, metrics, scored,
            len(train_dataset), total_batch_size, global_step, publisher,
        )  # fmt: skip
        logger.info(f"Trained {global_step} steps in {training_seconds:.1f} s; outputs in {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return args.output_dir


def cli(argv=None) -> None:
    """The command-line entry point: a mistake in the flags or data exits with its message, not a traceback."""
    try:
        main(argv)
    except InputError as error:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {error}")


if __name__ == "__main__":
    cli()
