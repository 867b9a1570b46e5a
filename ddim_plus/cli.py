"""`ddim-plus`: sample, invert, interpolate, evaluate DDIM models and tune their timesteps from the command line.

MODEL is a folder written by ``save_pretrained`` (or the trainer) or a Hugging Face Hub id; any unconditional
UNet2DModel pipeline loads (DDPM, DDIM or ddim_plus), and sampling runs `DDIMSchedulerPlus` (a folder saved with
another diffusers scheduler samples with that one).

Exit codes: 0 success, 1 failure while running (model or file not loadable, feature weights missing), 2 invalid
arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from . import __version__
from .ddim_math import DIFFUSERS_TIMESTEP_SPACINGS, SIGMA_HAT, TIMESTEP_SPACINGS

DTYPES = ("float32", "float16", "bfloat16")
LATENTS_EXTENSIONS = (".safetensors", ".pt", ".pth")


class CommandError(Exception):
    """A failure to report in one line, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------------------------
# Argument types
# ----------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """A torch device this machine has, checked before the model loads."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has no usable CUDA device; use cpu")
    return text


def _model_flag(command: str):
    """The type of a hidden `--model`: diffusers users write it, but MODEL is the first argument."""

    def refuse(text: str) -> str:
        raise argparse.ArgumentTypeError(
            f"MODEL is the first argument after the command, not a flag: ddim-plus {command} {text} [options]"
        )

    return refuse


def _int_list(text: str) -> List[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()] or _positive_int("")


def _eta_list(text: str) -> list:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as 0,0.2,0.5,1")
    if "sigma-hat" in parts:
        raise argparse.ArgumentTypeError(f"write the sigma-hat value as {SIGMA_HAT!r} (as `sigma_type` spells it)")
    return [SIGMA_HAT if part == SIGMA_HAT else _non_negative_float(part) for part in parts]


def _image_file(text: str) -> str:
    """An output image path whose extension PIL can write, checked before any sampling."""
    import PIL.Image

    PIL.Image.init()
    extension = os.path.splitext(text)[1].lower()
    if PIL.Image.registered_extensions().get(extension) not in PIL.Image.SAVE:
        raise argparse.ArgumentTypeError(
            f"cannot write an image as {extension or 'a file without extension'!r} ({text!r}); use e.g. .png or .jpg"
        )
    return text


def _latents_file(text: str) -> str:
    """A latents file whose extension says its format, checked before any work."""
    if os.path.splitext(text)[1].lower() not in LATENTS_EXTENSIONS:
        raise argparse.ArgumentTypeError(
            f"cannot tell the format of {text!r} from its extension; use .safetensors (safetensors) or .pt / .pth "
            "(torch.save)"
        )
    return text


def _spacing_list(text: str) -> List[str]:
    from .evaluation.quality import STOCK_PREFIX, TUNED

    spacings = [part.strip() for part in text.split(",") if part.strip()]
    for spacing in spacings:
        if spacing == TUNED:
            continue
        stock = spacing.startswith(STOCK_PREFIX)
        name = spacing[len(STOCK_PREFIX) :] if stock else spacing
        if name not in (DIFFUSERS_TIMESTEP_SPACINGS if stock else TIMESTEP_SPACINGS):
            stock_names = ", ".join(STOCK_PREFIX + s for s in DIFFUSERS_TIMESTEP_SPACINGS)
            raise argparse.ArgumentTypeError(
                f"unknown spacing {spacing!r}; choose from {', '.join(TIMESTEP_SPACINGS)}, {TUNED} (the schedules "
                f"of `ddim-plus tune-steps`) or {stock_names} (diffusers' own DDIMScheduler)"
            )
    if not spacings:
        raise argparse.ArgumentTypeError("expected a comma-separated list of spacings")
    return spacings


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------
def run_device(device: Optional[str], state) -> str:
    """`--device` when given, else the device accelerate picks for this process (the GPU when there is one)."""
    if device is not None:
        return device
    # Plain "cpu", never accelerate's "cpu:0": the pipeline's batch-of-one calls round differently on the two.
    return "cpu" if state.device.type == "cpu" else str(state.device)


def _runs_on_cpu(dtype: str) -> bool:
    """Whether this torch build has the CPU kernels a UNet needs in `dtype` (older builds lack float16 ones)."""
    import torch
    import torch.nn.functional as F

    x = torch.ones(1, 4, 4, 4, dtype=getattr(torch, dtype))
    try:
        F.silu(F.group_norm(F.conv2d(x, torch.ones(4, 4, 3, 3, dtype=x.dtype), padding=1), 2))
    except RuntimeError:
        return False
    return True


def _dtype_keyword() -> str:
    # diffusers releases that read `dtype` deprecate `torch_dtype`; older ones read only `torch_dtype`
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_pipeline(
    model: str,
    spacing: Optional[str] = None,
    sigma_hat: bool = False,
    order: Optional[int] = None,
    device: Optional[str] = None,
    dtype: str = "float32",
    variant: Optional[str] = None,
    revision: Optional[str] = None,
    quiet: bool = False,
    command: Optional[str] = None,
):
    """Load MODEL as a `DDIMPlusPipeline`: the one loader of every command (`model_options(args)` passes the shared
    options of `_add_command`).

    Args:
        model (`str`): a folder written by ``save_pretrained`` or a Hub model id.
        spacing (`str`, *optional*): overrides the saved `timestep_spacing` (and ignores stored tuned schedules).
        sigma_hat (`bool`, defaults to False): use the paper's sigma-hat variance.
        order (`int`, *optional*): overrides the saved `ddim_solver_order`.
        device (`str`, *optional*): defaults to the device accelerate picks for this process (the GPU if any).
        dtype (`str`, defaults to ``"float32"``): one of `DTYPES`, passed to ``from_pretrained``.
        variant, revision (`str`, *optional*): passed to ``from_pretrained``.
        quiet (`bool`, defaults to False): no progress bars.
        command (`str`, *optional*): when given, "ddim-plus COMMAND: running on DEVICE in DTYPE" goes to stderr
            (main process only), so stdout stays the command's output.
    """
    import torch
    from diffusers.utils import logging as diffusers_logging

    from . import DDIMPlusPipeline, DDIMSchedulerPlus
    from .evaluation.sampling import process_state

    state = process_state()
    chosen = run_device(device, state)
    if torch.device(chosen).type == "cpu" and not _runs_on_cpu(dtype):
        raise CommandError(
            f"--dtype {dtype} does not run on the CPU with torch {torch.__version__}: use --dtype bfloat16 or "
            "float32 on the CPU (or --device cuda).",
            exit_code=2,
        )
    if quiet:
        diffusers_logging.disable_progress_bar()
    options = {_dtype_keyword(): getattr(torch, dtype), "variant": variant, "revision": revision}
    try:
        pipe = DDIMPlusPipeline.from_pretrained(model, **options)
    except Exception as error:  # diffusers raises OSError, ValueError or EnvironmentError depending on the cause
        raise CommandError(_load_error_message(model, variant, error)) from error
    overrides = {}
    if spacing is not None:
        # an explicit spacing is what the user asked for, even where a tuned schedule is stored for the same S
        overrides.update(timestep_spacing=spacing, tuned_timesteps=None)
    if sigma_hat:
        overrides["sigma_type"] = SIGMA_HAT
    if order is not None:
        overrides["ddim_solver_order"] = order
    if overrides:
        pipe.scheduler = DDIMSchedulerPlus.from_config(pipe.scheduler.config, **overrides)
    if command is not None and state.is_main_process:
        source = "--device" if device is not None else "accelerate's device; --device overrides"
        print(f"ddim-plus {command}: running on {chosen} ({source}) in {dtype}", file=sys.stderr)
    # `dtype` is known to run on `chosen` (checked above): diffusers' warning that float16 "cannot run" on the CPU
    # would contradict the run that follows
    return pipe.to(chosen, silence_dtype_warnings=True)


def model_options(args) -> dict:
    """The options every model-loading command shares (see `_add_command`), as `load_pipeline` keywords."""
    return {name: getattr(args, name) for name in ("device", "dtype", "variant", "revision", "quiet", "command")}


def _saved_variants(folder: str) -> set:
    """The variants of the weights files in the component folders, e.g. {"fp16"} for unet/*.fp16.safetensors."""
    variants = set()
    for component in os.listdir(folder):
        if os.path.isdir(os.path.join(folder, component)):
            for name in os.listdir(os.path.join(folder, component)):
                parts = name.split(".")
                if len(parts) == 3 and parts[-1] in ("safetensors", "bin"):
                    variants.add(parts[1])
    return variants


def _load_error_message(model: str, variant: Optional[str], error: Exception) -> str:
    """One line saying why MODEL did not load and what to pass instead."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    reason = " ".join(str(error).split())  # diffusers' messages span lines; the command reports one
    if os.path.isdir(model):
        parent = os.path.dirname(os.path.abspath(model))
        saved_variants = sorted(_saved_variants(model))
        if os.path.isfile(os.path.join(parent, "model_index.json")):
            hint = f" (a part or checkpoint of a pipeline: pass the folder with model_index.json, {parent!r})"
        elif saved_variants and variant not in saved_variants:
            hint = (
                f" (its weights are saved as variant {', '.join(saved_variants)}: pass --variant {saved_variants[0]})"
            )
        else:
            hint = ""
        return f"MODEL {model!r} is not a loadable pipeline folder{hint}: {reason}"
    try:
        validate_repo_id(model)
    except HFValidationError:
        return (
            f"MODEL {model!r}: no such folder. Pass a folder written by save_pretrained (or the trainer's "
            "--output_dir), or a Hub model id such as google/ddpm-cifar10-32."
        )
    return f"MODEL {model!r}: no such folder, and it could not be loaded as a Hub model id: {reason}"


def _require_extra(extra: str, modules: Sequence[str]) -> None:
    """Say which extra to install when an optional dependency is missing, before any work."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise CommandError(
                f"`ddim-plus` needs the {module!r} package here, which the {extra!r} extra installs: "
                f"pip install 'ddim-plus[{extra}]'"
            ) from error


def _generators(seeds: Sequence[int]):
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]


def _write_image(picture, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        picture.save(path)
    except (ValueError, OSError) as error:
        raise CommandError(f"could not write {path!r}: {error}") from error


def _set_progress(pipe, quiet: bool) -> None:
    pipe.set_progress_bar_config(disable=quiet, leave=False)


# ----------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------
def _launch_state(num: int):
    """accelerate's state for this process; refuses fewer images than launched processes."""
    from .evaluation.sampling import process_state

    state = process_state()
    if num < state.num_processes:
        raise CommandError(
            f"--num {num} is smaller than the {state.num_processes} launched processes; ask for at least "
            f"{state.num_processes} images or launch fewer processes (--num_processes).",
            exit_code=2,
        )
    return state


def run_sample(args) -> None:
    from .evaluation.sampling import SampleFolderError, generate_images
    from .images import make_grid

    state = _launch_state(args.num)
    pipe = load_pipeline(args.model, args.spacing, args.sigma_hat, args.order, **model_options(args))
    _set_progress(pipe, args.quiet or not state.is_main_process)
    try:
        generated = generate_images(
            pipe,
            args.num,
            args.steps,
            args.eta,
            seed=args.seed,
            batch_size=args.batch_size,
            image_dir=args.save_images,
            return_images=args.out is not None,
            split_across_processes=True,
            shard_size=args.shard_size,
        )
    except SampleFolderError as error:
        raise CommandError(f"--save-images: {error}", exit_code=2) from error
    if not state.is_main_process:
        return
    settings = f"{args.steps} steps, eta={args.eta:g}, seeds {args.seed}..{args.seed + args.num - 1}"
    if args.save_images:
        resumed = f"; {generated.num_resumed} were there already" if generated.num_resumed else ""
        print(f"wrote {args.num} samples ({settings}) as PNGs to {args.save_images}{resumed}")
    if args.out:
        _write_image(make_grid(generated.images, num_columns=args.columns, scale=args.scale), args.out)
        print(f"wrote {args.num} samples ({settings}) to {args.out}")


def _image_files(folder: str) -> List[str]:
    """The image files directly in `folder`, sorted by name."""
    extensions = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(extensions))


def _expand_image_arguments(paths: Sequence[str]) -> List[str]:
    """IMAGE arguments with each folder replaced by the image files in it (sorted by name)."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = _image_files(path)
        if not found:
            raise CommandError(f"IMAGE {path!r} is a folder without .png, .jpg, .bmp or .webp files.", exit_code=2)
        files += found
    return files


def _load_images(paths: Sequence[str], channels: int, size: int):
    from .images import load_images

    try:
        return load_images(paths, channels, size)
    except ValueError as error:
        raise CommandError(str(error)) from error


def save_latents(latents, path: str, metadata: dict) -> None:
    """Write latents in the format the extension names: safetensors, or ``torch.save`` for .pt / .pth."""
    latents = latents.detach().cpu().contiguous()
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"latents": latents}, path, metadata=metadata)
    else:
        import torch

        torch.save({"latents": latents, "metadata": metadata}, path)


def load_latents(path: str):
    """The latents `save_latents` wrote, from either format."""
    import torch

    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)["latents"]
    return torch.load(path, map_location="cpu", weights_only=True)["latents"]


def run_invert(args) -> None:
    from . import DDIMInversionPipeline, InversionRefinement
    from .evaluation.reconstruction import mean_squared_error
    from .images import make_grid

    pipe = load_pipeline(args.model, args.spacing, **model_options(args))
    inversion = DDIMInversionPipeline(**pipe.components)
    _set_progress(inversion, args.quiet)
    files = _expand_image_arguments(args.images)
    images = _load_images(files, pipe.unet.config.in_channels, pipe.unet.config.sample_size)
    output = inversion(
        images,
        num_inference_steps=args.steps,
        refine=False if args.no_refine else InversionRefinement(iterations=args.refine_iterations),
        return_reconstruction=args.reconstruction is not None,
        output_type="np",
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    metadata = {
        "model": args.model,
        "num_inference_steps": str(args.steps),
        "timestep_spacing": str(pipe.scheduler.config.timestep_spacing),
        "refine": str(not args.no_refine),
        "images": ",".join(os.path.basename(p) for p in files),
    }
    save_latents(output.latents, args.out, metadata)
    print(f"wrote latents {tuple(output.latents.shape)} to {args.out}")
    if args.reconstruction is not None:
        one_file = args.grid or len(images) == 1
        paths = [args.reconstruction] if one_file else reconstruction_paths(args.reconstruction, len(images))
        groups = [output.images] if one_file else [image[None] for image in output.images]
        for path, group in zip(paths, groups):
            grid = make_grid(group, num_columns=len(group), padding=1 if args.grid else 0, scale=args.scale)
            _write_image(grid, path)
        mse = mean_squared_error(output.images, images)
        print(f"reconstruction MSE (per pixel, [0, 1]): {mse:.3g}; written to {', '.join(paths)}")


def reconstruction_paths(path: str, count: int) -> List[str]:
    """Where `count` reconstructions go without --grid: ``recon.png`` -> ``recon-0.png``, ``recon-1.png``, ..."""
    stem, extension = os.path.splitext(path)
    return [f"{stem}-{i}{extension}" for i in range(count)]


def _load_latents_pair(path: str):
    import pickle

    from safetensors import SafetensorError

    try:
        latents = load_latents(path)
    except (OSError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        message = f"could not read latents from {path!r} (write them with `ddim-plus invert`): {error}"
        raise CommandError(message) from error
    if latents.shape[0] < 2:
        raise CommandError(f"{path!r} holds {latents.shape[0]} latent(s); interpolation needs two.", exit_code=2)
    return latents[0], latents[1]


def run_interpolate(args) -> None:
    import numpy as np
    import torch

    from . import DDIMInversionPipeline
    from .ddim_math import slerp
    from .images import make_grid
    from .pipeline_utils import sample_shape

    pipe = load_pipeline(args.model, args.spacing, order=args.order, **model_options(args))
    _set_progress(pipe, args.quiet)
    if args.latents is not None:
        latents_a, latents_b = _load_latents_pair(args.latents)
        if tuple(latents_a.shape) != sample_shape(pipe.unet):
            raise CommandError(
                f"--latents {args.latents!r} holds latents of shape {tuple(latents_a.shape)}, but MODEL "
                f"{args.model!r} takes {sample_shape(pipe.unet)} (channels, height, width): invert the images with "
                "this model (`ddim-plus invert MODEL IMAGE ...`).",
                exit_code=2,
            )
        latents_a, latents_b = latents_a.to(pipe.unet.dtype), latents_b.to(pipe.unet.dtype)
        # Inverted latents decode with the unclipped ODE that inversion runs backwards, so the end frames reproduce
        # the images they were inverted from (`sample`'s clipping would change them).
        interpolation = DDIMInversionPipeline(**pipe.components)
        _set_progress(interpolation, args.quiet)
        images = interpolation.interpolate(
            latents_a, latents_b, num_frames=args.frames, num_inference_steps=args.steps, output_type="np"
        ).images
        source = f"the first two latents of {args.latents} (decoded as `invert` reconstructs)"
    else:
        # x_T drawn as `sample` draws it from a seed, decoded by `sample`'s sampler at eta = 0, so the end frames
        # are the images of `sample --seed A` and `--seed B`
        latents_a = pipe.prepare_latents(1, _generators([args.seed_a]), None)
        latents_b = pipe.prepare_latents(1, _generators([args.seed_b]), None)
        frames = torch.cat([slerp(latents_a, latents_b, float(f)) for f in np.linspace(0.0, 1.0, args.frames)])
        images = pipe(
            batch_size=args.frames, latents=frames, eta=0.0, num_inference_steps=args.steps, output_type="np"
        ).images
        source = f"seeds {args.seed_a} and {args.seed_b}"
    _write_image(make_grid(images, num_columns=args.frames, scale=args.scale), args.out)
    print(f"wrote a {args.frames}-frame slerp between {source} ({args.steps} steps) to {args.out}")


def _load_reference(reference: str, channels: int, size: int):
    import numpy as np
    import torch

    from .evaluation.digits import digits_reference_images

    if reference == "digits":
        return digits_reference_images(resolution=size, channels=channels)
    if reference.endswith(".npy") and os.path.isfile(reference):
        return torch.from_numpy(np.load(reference)).float()
    if os.path.isdir(reference):
        files = _image_files(reference)
        if len(files) < 2:
            raise CommandError(f"reference folder {reference!r} holds {len(files)} image(s); need at least 2.")
        return _load_images(files, channels, size)
    raise CommandError(
        f"`--reference` must be 'digits', a folder of images or a (N, H, W, C) .npy file, got {reference!r}.", 2
    )


def _evaluation_features(features: str, reference: str, channels: int) -> str:
    """The feature spec to score in: digits features only for the digits (1-channel digits models against the
    bundled digits); `auto` picks what fits and is on disk (`choose_features`)."""
    from .evaluation.fid import FeatureWeightsUnavailableError, choose_features, parse_features

    if reference == "digits" and channels != 1:
        raise CommandError(
            f"--reference digits holds 1-channel digits, but the model makes {channels}-channel images: pass "
            "--reference with a folder (or .npy) of the images the model was trained on.",
            exit_code=2,
        )
    if features == "auto":
        try:
            return choose_features(digits_data=reference == "digits")
        except FeatureWeightsUnavailableError as error:
            raise CommandError(str(error)) from error
    try:
        kind, _ = parse_features(features)
    except ValueError as error:
        raise CommandError(str(error), exit_code=2) from error
    if kind == "digits" and reference != "digits":
        raise CommandError(
            "--features digits measures digits only (a CNN trained on the 8x8 digits); for --reference "
            f"{reference!r} use --features auto, dinov2:PATH_OR_REPO_ID or inception:PATH.",
            exit_code=2,
        )
    return features


def run_evaluate(args) -> None:
    _require_extra("eval", ["torchmetrics"] + (["matplotlib"] if args.plot else []))
    import dataclasses
    import json

    from tqdm.auto import tqdm

    from .evaluation.fid import FeatureWeightsUnavailableError, FrechetDistance, full_rank_num_images
    from .evaluation.quality import (
        STOCK_PREFIX,
        ReferenceSetTooSmallError,
        plot_results,
        quality_sweep,
        results_to_markdown,
    )
    from .evaluation.sampling import SampleFolderError

    pipe = load_pipeline(args.model, order=args.order, **model_options(args))
    features = _evaluation_features(args.features, args.reference, pipe.unet.config.in_channels)
    reference = _load_reference(args.reference, pipe.unet.config.in_channels, pipe.unet.config.sample_size)
    try:
        metric = FrechetDistance(features, device=pipe.device)  # extracted where the sampler runs
    except FeatureWeightsUnavailableError as error:
        raise CommandError(str(error)) from error
    dimension = metric.num_features
    num = args.num or full_rank_num_images(dimension)
    state = _launch_state(num)
    note = None
    if num <= dimension:
        note = (
            f"--num {num} generated images for {dimension}-dimensional {metric.features_name} features: their "
            f"covariance is rank-deficient (it needs more than {dimension} images), so these distances are biased "
            f"and only comparable at the same --num; use --num {full_rank_num_images(dimension)} or more."
        )
        if state.is_main_process:
            print(f"ddim-plus evaluate: warning: {note}", file=sys.stderr)
    etas = list(args.eta) + ([SIGMA_HAT] if args.sigma_hat and SIGMA_HAT not in args.eta else [])
    spacings = args.spacings or [None]
    # diffusers' stock scheduler has no sigma-hat: those cells are skipped.
    runnable = [(s, e) for s in spacings for e in etas if not (s and s.startswith(STOCK_PREFIX) and e == SIGMA_HAT)]
    total = len(runnable) * len(args.steps)
    with tqdm(total=total, desc="configurations", disable=args.quiet or not state.is_main_process) as bar:
        try:
            results = quality_sweep(
                pipe,
                steps=args.steps,
                etas=etas,
                spacings=spacings,
                features=metric,
                reference_images=reference,
                num_images=num,
                seed=args.seed,
                batch_size=args.batch_size,
                on_result=lambda result: bar.update(1),
                image_dir=args.save_images,
                split_across_processes=True,
                shard_size=args.shard_size,
            )
        except FeatureWeightsUnavailableError as error:
            raise CommandError(str(error)) from error
        except SampleFolderError as error:
            raise CommandError(f"--save-images: {error}", exit_code=2) from error
        except ReferenceSetTooSmallError as error:
            raise CommandError(f"--reference: {error}", exit_code=2) from error
    if not state.is_main_process:
        return
    title = f"# Steps vs quality: `{args.model}`, solver order {pipe.scheduler.config.ddim_solver_order}"
    if note is not None:
        title += f"\n\n**Warning**: {note}"
    markdown = results_to_markdown(results, title=title)
    print(markdown)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        if args.out.endswith(".json"):
            json.dump([dataclasses.asdict(result) for result in results], handle, indent=2)
        else:
            handle.write(markdown)
    print(f"wrote {args.out}")
    if args.plot:
        try:
            plot_results(results, args.plot, title=f"{os.path.basename(os.path.normpath(args.model))}")
        except ImportError as error:
            raise CommandError(str(error)) from error
        print(f"wrote {args.plot}")


def run_tune_steps(args) -> None:
    import torch

    from .hub import TUNED_SCHEDULES_HEADING, set_card_section, tuned_schedules_markdown
    from .sampler_tuning import sampler_tuning_cost, tune_sampler
    from .timestep_tuning import check_tuning_arguments, save_tuned_timesteps, scheduler_config_path

    scheduler_config_path(args.model)  # a local folder to write into, checked before any work
    pipe = load_pipeline(args.model, **model_options(args))
    check_tuning_arguments(pipe.scheduler.config.num_train_timesteps, args.steps, args.order, args.teacher_steps)
    least, budget = sampler_tuning_cost(args.steps, args.teacher_steps, args.max_unet_calls)
    if budget < least:
        raise CommandError(
            f"--max-unet-calls {args.max_unet_calls} is below the {least} UNet calls tuning {args.steps} steps needs "
            f"before any search (with --teacher-steps {args.teacher_steps}); raise --max-unet-calls."
        )
    what = "timesteps" if args.timesteps_only else "timesteps and per-step coefficients"
    print(f"tuning the {what}; checked on {args.num_samples} held-out latents before anything is written")
    result = tune_sampler(
        pipe,
        args.steps,
        solver_order=args.order,
        generator=torch.Generator().manual_seed(args.seed),
        num_samples=args.num_samples,
        num_teacher_steps=args.teacher_steps,
        max_unet_calls=args.max_unet_calls,
        max_trials=args.max_trials,
        tune_coefficients=not args.timesteps_only,
        progress=not args.quiet,
    )
    fixed = ", ".join(f"{name} {value:.4f}" for name, value in result.spacing_distance.items())
    print(f"timesteps: {result.entry['timesteps']}")
    if "extrapolation" in result.entry:
        print(f"extrapolation: {[round(c, 4) for c in result.entry['extrapolation']]}")
        print(f"eps_scale: {[round(c, 4) for c in result.entry['eps_scale']]}")
    print(f"distance to the teacher: tuned {result.teacher_distance:.4f}; fixed spacings: {fixed}")
    print(
        f"held-out latents: tuned {result.heldout_distance:.4f}, untuned {result.heldout_untuned_distance:.4f}; "
        f"{result.num_unet_calls} UNet calls"
    )
    if not result.stored:
        print(f"the tuned sampler is not better on the held-out latents: nothing written to {args.model}")
        return
    entries = save_tuned_timesteps(args.model, result.entry)
    card_path = os.path.join(args.model, "README.md")
    card = open(card_path, encoding="utf-8").read() if os.path.isfile(card_path) else str(pipe.model_card(args.model))
    with open(card_path, "w", encoding="utf-8") as handle:
        handle.write(set_card_section(card, TUNED_SCHEDULES_HEADING, tuned_schedules_markdown(entries)))
    print(
        f"wrote {scheduler_config_path(args.model)} and the model card {card_path}. Sampling with {args.steps} "
        f"steps at solver_order={args.order} (eta = 0) now uses this sampler."
    )


def environment_report() -> str:
    """Versions, platform, devices and the dtypes each runs, as `ddim-plus env` prints them for a bug report."""
    import importlib.metadata
    import platform

    import torch

    from .evaluation.sampling import process_state

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    devices = ["cpu (" + ", ".join(dtype for dtype in DTYPES if _runs_on_cpu(dtype)) + ")"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            dtypes = ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
            devices.append(
                f"cuda:{index} {properties.name}, {properties.total_memory / 2**30:.0f} GiB, compute capability "
                f"{properties.major}.{properties.minor} ({', '.join(dtypes)})"
            )
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        devices.append("mps")
    optional = ("torchmetrics", "torch-fidelity", "transformers", "matplotlib", "datasets", "tensorboard")
    lines = [
        f"- `ddim_plus` version: {__version__}",
        f"- `diffusers` version: {version('diffusers')}",
        f"- `torch` version: {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"- `accelerate` version: {version('accelerate')}",
        f"- `huggingface_hub` version: {version('huggingface_hub')}",
        f"- Optional packages: {', '.join(f'{name} {version(name)}' for name in optional)}",
        f"- Python version: {platform.python_version()}",
        f"- Platform: {platform.platform()}",
        f"- Default device (accelerate): {process_state().device}",
        f"- Devices (dtypes they run): {'; '.join(devices)}",
    ]
    return "\n".join(lines)


def run_env(args) -> None:
    print("Copy-and-paste the text below into your bug report.\n")
    print(environment_report())


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------
def _add_command(
    commands, name: str, help: str, description: str, spacing: bool = True, order: bool = False
) -> argparse.ArgumentParser:
    """A subcommand with the arguments every model-loading command takes: MODEL, --device, --dtype, --variant,
    --revision, --quiet (and --spacing if `spacing`, --order if `order`); `model_options` hands them on."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("model", metavar="MODEL", help="a folder written by save_pretrained, or a Hub model id")
    parser.add_argument("--model", dest="model_flag", type=_model_flag(name), help=argparse.SUPPRESS)
    if spacing:
        parser.add_argument(
            "--spacing",
            choices=TIMESTEP_SPACINGS,
            default=None,
            help="timestep spacing of the S steps (default: the model's scheduler config)",
        )
    if order:
        parser.add_argument(
            "--order",
            type=int,
            choices=(1, 2),
            default=None,
            help="solver order: 1 is the paper's DDIM, 2 adds the DPM-Solver++(2M) correction of x_0, at any eta "
            "(default: the model's scheduler config, `ddim_solver_order`)",
        )
    parser.add_argument(
        "--device",
        type=_device,
        default=None,
        help="torch device to run on, e.g. cpu, cuda or cuda:1 (default: the device accelerate picks, the GPU when "
        "there is one, else the CPU; under `accelerate launch`, each process's own device); printed on stderr",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="precision the model is loaded and run in, passed to from_pretrained (default: float32); float16 "
        "is for GPUs (refused on a CPU whose torch cannot run it: use bfloat16 there)",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="weights variant to load, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors (default: none)",
    )
    parser.add_argument(
        "--revision", default=None, help="Hub branch, tag or commit of MODEL (default: main; ignored for folders)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _add_scale_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--save-images",
        default=None,
        metavar="DIR",
        help="also save image i as DIR/{i:06d}.png (evaluate: one subfolder per configuration); rerunning the same "
        "command after a kill skips the shards already there",
    )
    parser.add_argument(
        "--shard-size",
        type=_positive_int,
        default=1000,
        help="images per shard: the unit split between processes, resumed and summed (default: 1000)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddim-plus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ddim-plus {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    sample = _add_command(
        commands,
        "sample",
        help="generate a grid of samples",
        description="Generate a grid of samples.",
        order=True,
    )
    sample.add_argument("--steps", type=_positive_int, default=50, help="number of sampling steps S (default: 50)")
    sample.add_argument(
        "--eta", type=_non_negative_float, default=0.0, help="0 = deterministic DDIM, 1 = DDPM-like (default: 0)"
    )
    sample.add_argument("--sigma-hat", action="store_true", help="use the paper's sigma-hat variance (ignores --eta)")
    sample.add_argument("--num", type=_positive_int, default=64, help="number of samples (default: 64)")
    sample.add_argument("--seed", type=int, default=0, help="sample i starts from seed SEED + i (default: 0)")
    sample.add_argument("--batch-size", type=_positive_int, default=64, help="samples per model call (default: 64)")
    sample.add_argument("--columns", type=_positive_int, default=None, help="grid columns (default: square grid)")
    sample.add_argument("--scale", type=_positive_int, default=4, help="pixel upscaling of the grid (default: 4)")
    sample.add_argument(
        "--out", type=_image_file, default=None, help="image file for a grid of all samples, e.g. grid.png"
    )
    _add_scale_options(sample)
    sample.set_defaults(run=run_sample)

    invert = _add_command(
        commands,
        "invert",
        help="invert images to their DDIM latents x_T",
        description="Invert images to their DDIM latents x_T (decoding them with the same steps gives the images "
        "back). Images are converted to the model's channels and resized to its size if needed.",
    )
    invert.add_argument(
        "images", metavar="IMAGE", nargs="+", help="image files to invert, or folders (their images, sorted by name)"
    )
    invert.add_argument("--steps", type=_positive_int, default=50, help="number of inversion steps S (default: 50)")
    invert.add_argument(
        "--no-refine", action="store_true", help="plain DDIM inversion (the paper's), without fixed-point refinement"
    )
    invert.add_argument(
        "--refine-iterations", type=int, default=10, help="most extra model calls per refined step (default: 10)"
    )
    invert.add_argument(
        "--out",
        type=_latents_file,
        required=True,
        help="file for the latents (key 'latents'), written as its extension says: .safetensors, or .pt / .pth "
        "(torch.save of {'latents', 'metadata'})",
    )
    invert.add_argument(
        "--reconstruction",
        type=_image_file,
        default=None,
        help="also decode the latents, print the MSE and save the reconstruction as plain images: one image is "
        "written to this file; several to NAME-0.EXT, NAME-1.EXT, ... (in the order given), or to this file as "
        "one grid with --grid",
    )
    invert.add_argument(
        "--grid", action="store_true", help="write several reconstructions as one bordered grid, in a row"
    )
    invert.add_argument(
        "--scale", type=_positive_int, default=1, help="pixel upscaling of the reconstruction (default: 1)"
    )
    invert.set_defaults(run=run_invert)

    interpolate = _add_command(
        commands,
        "interpolate",
        help="decode a spherical interpolation between two x_T",
        description="Decode a spherical interpolation (slerp, paper section 5.3) between two latents x_T: drawn "
        "from two seeds, or the first two latents of a file written by `ddim-plus invert`. Seeds decode with "
        "`sample`'s sampler at eta = 0 (the saved scheduler config: spacing, solver order, clipping; --spacing and "
        "--order as in `sample`), so the first and last frames are the images of `sample --seed A` and `--seed B` "
        "(up to 1/255 where batched convolutions round a pixel the other way). Inverted latents decode as `invert` "
        "reconstructs (DDIMInversionPipeline.interpolate: eta = 0 DDIM without clipping), so the end frames are "
        "the reconstructions.",
        order=True,
    )
    interpolate.add_argument("--seed-a", type=int, default=1, help="seed of the first x_T (default: 1)")
    interpolate.add_argument("--seed-b", type=int, default=2, help="seed of the second x_T (default: 2)")
    interpolate.add_argument(
        "--latents", type=_latents_file, default=None, help="latents file from `invert`; overrides the seeds"
    )
    interpolate.add_argument("--frames", type=int, default=8, help="images along the path, ends included (default: 8)")
    interpolate.add_argument("--steps", type=_positive_int, default=50, help="decoding steps (default: 50)")
    interpolate.add_argument(
        "--scale", type=_positive_int, default=4, help="pixel upscaling of the strip (default: 4)"
    )
    interpolate.add_argument("--out", type=_image_file, required=True, help="image file for the strip, e.g. strip.png")
    interpolate.set_defaults(run=run_interpolate)

    evaluate = _add_command(
        commands,
        "evaluate",
        help="Frechet distance for each number of steps, eta and spacing",
        description="Frechet distance for each number of steps S, eta and spacing, all from the same x_T; prints a "
        "markdown table (rows S, columns eta, one table per spacing) and writes it to --out.",
        spacing=False,
        order=True,
    )
    evaluate.add_argument(
        "--steps", type=_int_list, default=[10, 20, 50, 100], help="comma-separated S values (default: 10,20,50,100)"
    )
    evaluate.add_argument(
        "--eta",
        type=_eta_list,
        default=[0.0],
        help=f"comma-separated eta values; {SIGMA_HAT!r} is accepted as a value too (default: 0)",
    )
    evaluate.add_argument("--sigma-hat", action="store_true", help="add the paper's sigma-hat column")
    evaluate.add_argument(
        "--spacings",
        type=_spacing_list,
        default=None,
        help="comma-separated spacings (leading, trailing, linspace, quadratic, logsnr), tuned (the schedules stored "
        "by tune-steps) and stock:leading etc. for diffusers' DDIMScheduler (default: the model's own scheduler)",
    )
    evaluate.add_argument(
        "--features",
        default="auto",
        help="feature network: auto (digits features for digits models against --reference digits; otherwise "
        "DINOv2 from the local Hugging Face cache or Inception from torch hub's checkpoints, else it says why no "
        "metric is available), digits, inception[:PATH] (needs torch-fidelity; downloads without PATH) or "
        "dinov2:PATH_OR_REPO_ID (local weights) (default: auto)",
    )
    evaluate.add_argument(
        "--reference",
        default="digits",
        help="real images: digits (the bundled 8x8 digits), a folder of images or a (N, H, W, C) .npy in [0, 1] "
        "(default: digits)",
    )
    evaluate.add_argument(
        "--num",
        type=_positive_int,
        default=None,
        help="generated images per cell (default: max(256, D + 1) for features of dimension D, the fewest whose "
        "covariance has full rank: 256 for digits (D = 32), 385 for DINOv2-small, 769 for DINOv2-base, 2049 for "
        "Inception; fewer than D + 1 are run but flagged, since the distance is then biased)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="image i starts from seed SEED + i (default: 0)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, help="images per model call (default: 64)")
    evaluate.add_argument(
        "--out", required=True, help="file for the table: markdown (results.md), or the raw numbers as .json"
    )
    _add_scale_options(evaluate)
    evaluate.add_argument("--plot", default=None, help="also plot distance against S to this image (needs matplotlib)")
    evaluate.set_defaults(run=run_evaluate)

    tune = _add_command(
        commands,
        "tune-steps",
        help="tune the S-step sampler (timesteps and per-step coefficients) to the model and store it in its folder",
        description="Choose the S timesteps and two coefficients per step that bring the model's samples closest to "
        "a many-step run of the same model (no data needed; see ddim_plus.tune_sampler) and store them in MODEL/"
        "scheduler/scheduler_config.json and its model card if they beat the untuned sampler on held-out latents. "
        "Deterministic sampling with S steps at that solver order then uses them.",
        spacing=False,
    )
    tune.add_argument("--steps", type=_positive_int, required=True, help="number of sampling steps S to tune")
    tune.add_argument("--order", type=int, default=2, help="solver order to tune for: 1 (DDIM) or 2 (default: 2)")
    tune.add_argument(
        "--num-samples", type=_positive_int, default=64, help="latents the schedules are scored on (default: 64)"
    )
    tune.add_argument(
        "--teacher-steps", type=_positive_int, default=200, help="steps of the order-2 teacher (default: 200)"
    )
    tune.add_argument(
        "--max-trials", type=_positive_int, default=None, help="timestep-search candidates (default: 10 S)"
    )
    tune.add_argument(
        "--max-unet-calls",
        type=_positive_int,
        default=None,
        help="budget of UNet calls, held-out check included (default: the fixed part plus 200 S; printed)",
    )
    tune.add_argument(
        "--timesteps-only", action="store_true", help="tune the timesteps only, not the per-step coefficients"
    )
    tune.add_argument(
        "--seed",
        type=int,
        default=12345,
        help="seed of the tuning latents (default: 12345, not sample's or evaluate's 0: scored images stay held out)",
    )
    tune.set_defaults(run=run_tune_steps)

    env = commands.add_parser(
        "env",
        help="print versions, platform and devices for a bug report",
        description="Print the versions of ddim_plus, diffusers, torch, accelerate, huggingface_hub and the optional "
        "packages, Python, the platform, and the devices with the dtypes each runs, ready to paste into a bug "
        "report (as `diffusers-cli env`).",
    )
    env.set_defaults(run=run_env)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `ddim-plus` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "sigma_hat", False) and args.command == "sample" and args.eta:
        print("note: --sigma-hat sets the variance itself; --eta is ignored", file=sys.stderr)
    if args.command == "sample" and args.out is None and args.save_images is None:
        parser.error("sample needs --out GRID.png, --save-images DIR, or both")
    if args.command == "interpolate" and args.frames < 2:
        parser.error(f"--frames must be at least 2 (both ends are included), got {args.frames}")
    try:
        args.run(args)
    except CommandError as error:
        print(f"ddim-plus {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except ValueError as error:
        print(f"ddim-plus {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder that cannot be read or written: the message says which
        print(f"ddim-plus {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ddim-plus {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Destroy the process group a launched command joined: gloo's threads then stop before the interpreter exits,
    instead of aborting the process ("terminate called without an active exception") after its work is done."""
    if "torch" not in sys.modules:  # --help, --version and parse errors never import torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
