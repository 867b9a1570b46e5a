"""Timestep schedules tuned to the model, from the model alone.

A few-step sampler's quality depends mostly on where its S steps sit. :func:`optimize_timesteps` chooses them for one
pipeline by matching a many-step deterministic "teacher" run of the same model from the same x_T (the idea of the
teacher-matching schedules of Pei et al. 2025, "Optimal stepsize for diffusion sampling", and of GITS, Chen et al.
2024): it never sees data, only the model's own outputs.

The search is a pattern search (coordinate descent with a shrinking step) over the S timesteps, in log-SNR
coordinates, started from the best of a few fixed spacings. Every candidate schedule is scored by running the real
`DDIMSchedulerPlus.step` over it, so the tuned schedule is the best found for exactly the sampler that will use it
(its first-order final steps included). A candidate that moves timestep i reuses the model outputs of the first i
steps, which it shares with the current schedule, and costs S - i UNet calls.

:func:`save_tuned_timesteps` writes a result into a pipeline folder's scheduler config (key ``tuned_timesteps``),
where `DDIMSchedulerPlus.set_timesteps(S)` picks it up. `ddim_plus.tune_sampler` (``ddim-plus tune-steps``) runs
this search, then searches per-step coefficients jointly with the timesteps (the same pattern search over more
coordinates) and stores the result only if it beats the untuned sampler on held-out latents.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from . import ddim_math as dm
from .scheduling_ddim_plus import DDIMSchedulerPlus, check_int_in_range

# Fixed spacings scored first; the best one starts the search.
INITIAL_SPACINGS = ("quadratic", "logsnr", "trailing")
# The teacher: second order, equal log-SNR steps (the grid on which the 2M solver converges at second order).
TEACHER_SPACING = "logsnr"
DEFAULT_TEACHER_STEPS = 200
# Pattern-search step in log-SNR: starts at 1 and halves after every sweep without improvement, down to 1/64.
INITIAL_LOG_SNR_STEP = 1.0
MIN_LOG_SNR_STEP = 1.0 / 64
# What one unit of that step moves each per-step coefficient of a tuned sampler (`ddim_plus.tune_sampler`) by.
COEFFICIENT_UNITS = {"extrapolation": 0.5, "eps_scale": 0.05}
SOLVER_ORDERS = (1, 2)


@dataclass
class TimestepTuningOutput(BaseOutput):
    """Output of :func:`optimize_timesteps` with `return_details=True`.

    Args:
        timesteps (`List[int]`): the tuned schedule, strictly descending, in [0, T).
        teacher_distance (`float`): its distance to the teacher's samples on the tuning latents: the mean over
            samples of the root mean squared difference per element.
        spacing_distance (`Dict[str, float]`): the same for each fixed spacing in `INITIAL_SPACINGS`.
        num_unet_calls (`int`): UNet calls made (each on the whole batch of `num_samples` latents).
    """

    timesteps: List[int]
    teacher_distance: float
    spacing_distance: Dict[str, float]
    num_unet_calls: int


def default_max_trials(num_inference_steps: int) -> int:
    """Candidate schedules scored by default: 10 per timestep."""
    return 10 * num_inference_steps


def tuning_cost(
    num_inference_steps: int, num_teacher_steps: int = DEFAULT_TEACHER_STEPS, max_trials: Optional[int] = None
) -> int:
    """The most UNet calls :func:`optimize_timesteps` makes: the teacher, one run per initial spacing and at most
    S per candidate schedule (fewer when the moved timestep is not the first).

    Returns:
        `int`: num_teacher_steps + S * (len(INITIAL_SPACINGS) + max_trials).
    """
    trials = default_max_trials(num_inference_steps) if max_trials is None else max_trials
    return num_teacher_steps + num_inference_steps * (len(INITIAL_SPACINGS) + trials)


def check_tuning_arguments(
    num_train_timesteps: int, num_inference_steps: int, solver_order: int, num_teacher_steps: int
) -> None:
    """Raise a `ValueError` naming the parameter and the fix for a request the tuner cannot serve."""
    if solver_order not in SOLVER_ORDERS:
        raise ValueError(
            f"`solver_order`={solver_order!r} is not supported by DDIMSchedulerPlus; choose 1 (DDIM) or 2 "
            "(DPM-Solver++(2M) in DDIM form)."
        )
    check_int_in_range(
        "num_teacher_steps", num_teacher_steps, 2, num_train_timesteps, f"`num_train_timesteps`={num_train_timesteps}"
    )
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"`num_inference_steps` must be an int, got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps < num_teacher_steps:
        raise ValueError(
            f"`num_inference_steps`={num_inference_steps} cannot be tuned: it must be at least 1 and below "
            f"`num_teacher_steps`={num_teacher_steps} (the teacher must take more steps than the schedule it "
            f"teaches; at most `num_train_timesteps`={num_train_timesteps}). Use fewer steps, raise "
            "`num_teacher_steps`, or use a fixed `timestep_spacing` for this many steps."
        )


class _TeacherMatching:
    """Runs candidate samplers of one scheduler config from fixed x_T and scores them against the teacher's samples.

    A candidate is a dict with `timesteps` and, for a tuned sampler, its per-step `extrapolation` and `eps_scale`
    (the `tuned_timesteps` entry `DDIMSchedulerPlus` reads); it runs through the real `DDIMSchedulerPlus.step`."""

    def __init__(self, unet, scheduler: DDIMSchedulerPlus, x_T: torch.Tensor, bar: tqdm):
        self.unet, self.scheduler, self.x_T, self.bar = unet, scheduler, x_T, bar
        self.num_calls = 0
        self.target = None

    def _model_output(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.num_calls += 1
        self.bar.update(1)
        return self.unet(x, torch.tensor(t, device=x.device)).sample

    def sampler(self, candidate: dict) -> DDIMSchedulerPlus:
        """The scheduler that samples `candidate`, its timesteps set."""
        if candidate.get("extrapolation") is None:
            self.scheduler.set_timesteps(timesteps=candidate["timesteps"])
            return self.scheduler
        entry = {
            **tuned_timesteps_entry(self.scheduler, candidate["timesteps"], self.scheduler.config.ddim_solver_order)
        }
        entry.update(extrapolation=candidate["extrapolation"], eps_scale=candidate["eps_scale"])
        scheduler = DDIMSchedulerPlus.from_config(self.scheduler.config, tuned_timesteps=[entry])
        scheduler.set_timesteps(len(entry["timesteps"]))
        return scheduler

    def run(self, scheduler: DDIMSchedulerPlus, cached_outputs: List[torch.Tensor] = ()):
        """The deterministic sampling loop over `scheduler.timesteps`; the first len(cached_outputs) model outputs
        are reused.

        Returns:
            `tuple`: (x_0, the model output at every step).
        """
        x, outputs = self.x_T, []
        for k, t in enumerate(scheduler.timesteps.tolist()):
            output = cached_outputs[k] if k < len(cached_outputs) else self._model_output(x, t)
            outputs.append(output)
            x = scheduler.step(output, t, x).prev_sample
        return x, outputs

    def distance(self, x: torch.Tensor) -> float:
        """The mean over samples of each sample's root mean squared distance to its teacher sample: unlike the
        overall mean squared error it does not let the few samples that end in another mode than their teacher (a
        large, sampler-independent distance) decide, and on the Gaussian-mixture oracle its schedules are closer to
        the data in distribution (docs/sampler_quality.md)."""
        return float((x.double() - self.target).flatten(1).pow(2).mean(1).sqrt().mean())

    def score(self, candidate: dict, cached_outputs: List[torch.Tensor] = ()):
        """(distance to the teacher, model outputs) of a candidate sampler."""
        x, outputs = self.run(self.sampler(candidate), cached_outputs)
        return self.distance(x), outputs


def _teacher_samples(matching: _TeacherMatching, num_teacher_steps: int) -> torch.Tensor:
    teacher = DDIMSchedulerPlus.from_config(
        matching.scheduler.config, ddim_solver_order=2, timestep_spacing=TEACHER_SPACING, tuned_timesteps=None
    )
    teacher.set_timesteps(num_teacher_steps)
    return matching.run(teacher)[0].double()


def _best_spacing(matching: _TeacherMatching, num_inference_steps: int):
    """(distance, candidate, outputs) of the best of `INITIAL_SPACINGS`, and the distance of each."""
    scheduler, spacing_distance, best = matching.scheduler, {}, None
    T = scheduler.config.num_train_timesteps
    for spacing in INITIAL_SPACINGS:
        timesteps = dm.timesteps_for_spacing(spacing, num_inference_steps, T, 0, scheduler.alphas_cumprod).tolist()
        error, outputs = matching.score({"timesteps": timesteps})
        spacing_distance[spacing] = error
        if best is None or error < best[0]:
            best = (error, {"timesteps": timesteps}, outputs)
    return best, spacing_distance


def _moved(candidate: dict, kind: str, i: int, sign: float, step: float, log_snr: np.ndarray, T: int):
    """`candidate` with coordinate (`kind`, i) moved by sign x step units, or `None` where that changes nothing.
    A timestep moves by `step` in log-SNR to the nearest timestep, strictly between its neighbours; a coefficient
    by `step` x its unit in `COEFFICIENT_UNITS`."""
    if kind == "timesteps":
        timesteps = candidate["timesteps"]
        upper = timesteps[i - 1] if i > 0 else T  # timestep i stays strictly between its neighbours
        lower = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        nearest = int(np.abs(log_snr - (log_snr[timesteps[i]] + sign * step)).argmin())
        moved = min(max(nearest, lower + 1), upper - 1)
        if moved == timesteps[i]:
            return None
        return {**candidate, "timesteps": timesteps[:i] + [moved] + timesteps[i + 1 :]}
    values = list(candidate[kind])
    values[i] = round(values[i] + sign * step * COEFFICIENT_UNITS[kind], 12)  # 1.0, not 0.9999999999999999
    return {**candidate, kind: values}


def _pattern_search(
    matching: _TeacherMatching,
    start: tuple,
    coordinates: List[tuple],
    max_trials: int,
    max_calls: Optional[int] = None,
):
    """Coordinate descent with a shrinking step over `coordinates` ((kind, step index) pairs, swept in order): a
    move is kept when it brings the samples closer to the teacher; the step starts at `INITIAL_LOG_SNR_STEP` and
    halves after a sweep without improvement, down to `MIN_LOG_SNR_STEP`. A candidate that changes step i reuses
    the model outputs of the steps before it. Stops after `max_trials` candidates or when the next one could take
    the UNet calls past `max_calls`.

    Returns:
        `tuple`: (distance, candidate, outputs) of the best candidate found.
    """
    error, candidate, outputs = start
    S, T = len(candidate["timesteps"]), matching.scheduler.config.num_train_timesteps
    log_snr = dm.log_snr(matching.scheduler.alphas_cumprod.clamp(min=dm.ZERO_SNR_ABAR_FLOOR))
    step, trials_left = INITIAL_LOG_SNR_STEP, max_trials
    while step >= MIN_LOG_SNR_STEP and trials_left > 0:
        improved = False
        for kind, i in coordinates:
            for sign in (1.0, -1.0):
                moved = _moved(candidate, kind, i, sign, step, log_snr, T)
                # a moved timestep changes the step into it (i - 1) too; a coefficient only its own step
                reused = i if kind == "timesteps" else i + 1
                if moved is None or trials_left == 0:
                    continue
                if max_calls is not None and matching.num_calls + S - reused > max_calls:
                    trials_left = 0
                    continue
                trials_left -= 1
                moved_error, moved_outputs = matching.score(moved, outputs[:reused])
                if moved_error < error:
                    error, candidate, outputs, improved = moved_error, moved, moved_outputs, True
                    break
        if not improved:
            step /= 2
    return error, candidate, outputs


@torch.inference_mode()
def optimize_timesteps(
    pipeline,
    num_inference_steps: int,
    solver_order: int = 2,
    num_samples: int = 64,
    generator: Optional[torch.Generator] = None,
    num_teacher_steps: int = DEFAULT_TEACHER_STEPS,
    max_trials: Optional[int] = None,
    progress: bool = True,
    return_details: bool = False,
) -> Union[List[int], TimestepTuningOutput]:
    """Timesteps for `num_inference_steps` deterministic steps (eta = 0) that bring the pipeline's samples closest to
    those of a many-step run of the same model: chosen from the model's outputs only, no data needed.
    `ddim_plus.tune_sampler` runs the same search and then tunes per-step coefficients too, with a held-out check.

    Cost: at most `tuning_cost(num_inference_steps, num_teacher_steps, max_trials)` =
    num_teacher_steps + S * (3 + max_trials) UNet calls, each on a batch of `num_samples` latents (200 + 3 S + 10 S^2
    with the defaults: 465 calls for S = 5, 1230 for S = 10).

    Args:
        pipeline (`DDIMPlusPipeline`): its UNet and scheduler config (betas, prediction type, clipping) are used.
        num_inference_steps (`int`): S, below `num_teacher_steps`.
        solver_order (`int`, defaults to 2): the `solver_order` of the sampler to tune for: 1 (DDIM) or 2.
        num_samples (`int`, defaults to 64): latents x_T the schedules are scored on.
        generator (`torch.Generator`, *optional*): source of those latents.
        num_teacher_steps (`int`, defaults to 200): steps of the teacher (order 2, `"logsnr"` spacing), at most T.
        max_trials (`int`, *optional*): candidate schedules scored by the search; defaults to 10 S.
        progress (`bool`, defaults to `True`): show a progress bar of the UNet calls.
        return_details (`bool`, defaults to `False`): return a `TimestepTuningOutput` instead of the list.

    Returns:
        `List[int]` (strictly descending, in [0, T)) or `TimestepTuningOutput`.
    """
    config = pipeline.scheduler.config
    check_tuning_arguments(config.num_train_timesteps, num_inference_steps, solver_order, num_teacher_steps)
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}.")
    S = int(num_inference_steps)
    trials = default_max_trials(S) if max_trials is None else max_trials

    student = DDIMSchedulerPlus.from_config(config, ddim_solver_order=solver_order, tuned_timesteps=None)
    x_T = pipeline.prepare_latents(num_samples, generator, None)
    with tqdm(total=tuning_cost(S, num_teacher_steps, max_trials), desc="UNet calls", disable=not progress) as bar:
        matching = _TeacherMatching(pipeline.unet, student, x_T, bar)
        matching.target = _teacher_samples(matching, num_teacher_steps)
        start, spacing_distance = _best_spacing(matching, S)
        error, candidate, _ = _pattern_search(matching, start, [("timesteps", i) for i in range(S)], trials)
        bar.total = matching.num_calls
        bar.refresh()

    timesteps = [int(t) for t in candidate["timesteps"]]
    if not return_details:
        return timesteps
    return TimestepTuningOutput(
        timesteps=timesteps,
        teacher_distance=error,
        spacing_distance=spacing_distance,
        num_unet_calls=matching.num_calls,
    )


def tuned_timesteps_entry(scheduler: DDIMSchedulerPlus, timesteps: List[int], solver_order: int) -> dict:
    """The `tuned_timesteps` config entry for a schedule: S, the order, the timesteps and their abar (which
    identifies the noise schedule the timesteps were tuned on).

    Returns:
        `dict`
    """
    return {
        "num_inference_steps": len(timesteps),
        "solver_order": int(solver_order),
        "timesteps": [int(t) for t in timesteps],
        "alphas_cumprod": [float(scheduler.alphas_cumprod[int(t)]) for t in timesteps],
    }


def scheduler_config_path(folder: str) -> str:
    """The scheduler config of a local pipeline folder; a `ValueError` naming the fix if there is none."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder!r} is not a local pipeline folder with scheduler/scheduler_config.json; tuned schedules are "
            "written into a folder: save the pipeline with `save_pretrained` (or download it with "
            "`huggingface-cli download REPO --local-dir FOLDER`) and tune that folder."
        )
    return path


def save_tuned_timesteps(folder: str, entry: dict) -> List[dict]:
    """Add `entry` to the `tuned_timesteps` of a pipeline folder's scheduler config, replacing the entry for the
    same number of steps and solver order. Every other key of the file is kept as it is, so stock diffusers
    schedulers still load it (they ignore the extra key).

    Returns:
        `List[dict]`: all entries now stored, sorted by (solver_order, num_inference_steps).
    """
    path = scheduler_config_path(folder)
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    key = (entry["solver_order"], entry["num_inference_steps"])
    entries = [e for e in config.get("tuned_timesteps") or [] if (e["solver_order"], e["num_inference_steps"]) != key]
    entries = sorted([*entries, entry], key=lambda e: (e["solver_order"], e["num_inference_steps"]))
    config["tuned_timesteps"] = entries
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return entries
