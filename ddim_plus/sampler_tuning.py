"""A few-step sampler tuned to the model, from the model alone: timesteps and per-step coefficients.

:func:`tune_sampler` extends the timestep search of :func:`ddim_plus.optimize_timesteps` with two coefficients per
step, in the spirit of the per-step solver parameters learned from a model's own trajectories by bespoke /
distilled ODE solvers (Shaul et al. 2023) and of DPM-Solver-v3's empirical model statistics (Zheng et al. 2023),
in a low-dimensional form that leaves the DDIM step intact:

- `extrapolation` c_i: the step uses D = x0_i + c_i (x0_i - x0_{i-1}) for x_0 (DPM-Solver++(2M)'s weight is
  h_i / (2 h_{i-1}); 0 is DDIM);
- `eps_scale` s_i: the direction term of eq. 12 uses s_i eps (1 is DDIM; epsilon scaling, Ning et al. 2024, fixes
  the same exposure bias with one global factor).

Both start at the values of the untuned sampler on the best fixed spacing, so the search starts from the sampler it
must beat. Every candidate runs the real `DDIMSchedulerPlus.step`, scored by the distance of its samples to a
many-step teacher run of the same model from the same x_T (the objective of `optimize_timesteps`). No data are used.

Before anything is stored, tuned and untuned samplers are compared on held-out latents (their own teacher run): the
tuned one is stored only if it is closer to the teacher there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from diffusers.utils import BaseOutput, logging
from tqdm.auto import tqdm

from .scheduling_ddim_plus import DDIMSchedulerPlus
from .timestep_tuning import (
    DEFAULT_TEACHER_STEPS,
    INITIAL_SPACINGS,
    _best_spacing,
    _pattern_search,
    _teacher_samples,
    _TeacherMatching,
    check_tuning_arguments,
    default_max_trials,
    tuned_timesteps_entry,
)

logger = logging.get_logger(__name__)

# UNet calls of the coefficient search by default, per sampling step.
DEFAULT_SEARCH_CALLS_PER_STEP = 200


@dataclass
class SamplerTuningOutput(BaseOutput):
    """Output of :func:`tune_sampler`.

    Args:
        entry (`dict`): the `tuned_timesteps` entry (S, solver order, timesteps, their abar, `extrapolation`,
            `eps_scale`); stored in the scheduler config only when `stored` is `True`.
        stored (`bool`): whether the tuned sampler beat the untuned one on the held-out latents and was stored.
        teacher_distance (`float`): distance to the teacher on the tuning latents (as in `optimize_timesteps`).
        heldout_distance (`float`): the same on the held-out latents.
        heldout_untuned_distance (`float`): the untuned sampler's (the pipeline's own for S before tuning) on them.
        spacing_distance (`Dict[str, float]`): each fixed spacing's distance on the tuning latents.
        num_unet_calls (`int`): UNet calls made, each on a batch of `num_samples` latents.
        budget (`int`): the most UNet calls this run could make.
    """

    entry: dict
    stored: bool
    teacher_distance: float
    heldout_distance: float
    heldout_untuned_distance: float
    spacing_distance: dict
    num_unet_calls: int
    budget: int


def sampler_tuning_cost(
    num_inference_steps: int, num_teacher_steps: int = DEFAULT_TEACHER_STEPS, max_unet_calls: Optional[int] = None
) -> tuple:
    """(the least, the most) UNet calls :func:`tune_sampler` makes: two teacher runs (tuning and held-out latents),
    the fixed spacings, the run that starts the coefficient search and two held-out runs of S steps; then the
    search, up to `max_unet_calls` in all (default: that least plus 200 S).

    Returns:
        `tuple[int, int]`
    """
    least = 2 * num_teacher_steps + num_inference_steps * (len(INITIAL_SPACINGS) + 3)
    most = least + DEFAULT_SEARCH_CALLS_PER_STEP * num_inference_steps if max_unet_calls is None else max_unet_calls
    return least, most


def _default_coefficients(scheduler: DDIMSchedulerPlus, timesteps: List[int]) -> tuple:
    """(extrapolation, eps_scale) that make a tuned-sampler step equal to the plain step of `scheduler`'s
    `ddim_solver_order` on `timesteps`: the 2M weights where order 2 extrapolates, 0 elsewhere, and eps scale 1."""
    scheduler.set_timesteps(timesteps=timesteps)
    if scheduler.config.ddim_solver_order == 2:
        extrapolation = scheduler.multistep_extrapolation_weights()
    else:
        extrapolation = [0.0] * len(timesteps)
    return extrapolation, [1.0] * len(timesteps)


def _coordinates(num_inference_steps: int, solver_order: int) -> List[tuple]:
    """The search's coordinates, step by step: the timestep, the extrapolation weight (order 2, from the second
    step), the eps scale (not on the last step, which goes to x_0 and has no direction term when it reaches abar =
    1; a final step to abar_0 < 1 has a tiny one)."""
    coordinates = []
    for i in range(num_inference_steps):
        coordinates.append(("timesteps", i))
        if solver_order == 2 and i > 0:
            coordinates.append(("extrapolation", i))
        if i + 1 < num_inference_steps:
            coordinates.append(("eps_scale", i))
    return coordinates


@torch.inference_mode()
def tune_sampler(
    pipeline,
    num_inference_steps: int,
    solver_order: int = 2,
    generator: Optional[torch.Generator] = None,
    num_samples: int = 64,
    num_teacher_steps: int = DEFAULT_TEACHER_STEPS,
    max_unet_calls: Optional[int] = None,
    max_trials: Optional[int] = None,
    tune_coefficients: bool = True,
    progress: bool = True,
) -> SamplerTuningOutput:
    """Tune the deterministic (eta = 0) `num_inference_steps`-step sampler of `pipeline` to the model, from the
    model alone, and store it in `pipeline.scheduler`'s config (`tuned_timesteps`) if it beats the untuned sampler
    on held-out latents.

    After it returns with `stored=True`, `pipeline(num_inference_steps=S, eta=0)` samples with the tuned sampler,
    and `pipeline.save_pretrained` saves it (stock diffusers schedulers ignore the `tuned_timesteps` key). The
    pipeline's scheduler becomes a `DDIMSchedulerPlus` with `ddim_solver_order=solver_order` (a warning says so if
    that changes it). When the tuned sampler is not better on the held-out latents, a warning says so and nothing
    is stored.

    Steps: a `num_teacher_steps` order-2 `"logsnr"` teacher run from `num_samples` tuning latents; the best of the
    fixed spacings; the timestep search of `optimize_timesteps` (at most `max_trials` candidates); then, with
    `tune_coefficients`, a joint search over the timesteps and two coefficients per step until the budget is
    spent; finally a teacher run and both samplers on `num_samples` held-out latents.

    Cost: at most `sampler_tuning_cost(S, num_teacher_steps, max_unet_calls)[1]` UNet calls on batches of
    `num_samples` (1,430 for S = 5 with the defaults); it is printed before the first call.

    Args:
        pipeline (`DDIMPlusPipeline`): its UNet and scheduler config (betas, prediction type, clipping) are used.
        num_inference_steps (`int`): S, below `num_teacher_steps`.
        solver_order (`int`, defaults to 2): 1 (DDIM: timesteps and eps scales are tuned) or 2 (extrapolation
            weights too).
        generator (`torch.Generator`, *optional*): source of the tuning latents, then of the held-out ones.
        num_samples (`int`, defaults to 64): latents per batch, for tuning and again for the held-out check.
        num_teacher_steps (`int`, defaults to 200): steps of the teacher, at most T.
        max_unet_calls (`int`, *optional*): the budget; defaults to the fixed part plus 200 S (see
            `sampler_tuning_cost`). A budget below the fixed part raises a `ValueError` before any call.
        max_trials (`int`, *optional*): candidates of the timestep search; defaults to 10 S.
        tune_coefficients (`bool`, defaults to `True`): `False` tunes the timesteps only (`optimize_timesteps`'s
            search, with the held-out check).
        progress (`bool`, defaults to `True`): show a progress bar of the UNet calls.

    Returns:
        `SamplerTuningOutput`
    """
    config = pipeline.scheduler.config
    check_tuning_arguments(config.num_train_timesteps, num_inference_steps, solver_order, num_teacher_steps)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an int of at least 1, got {num_samples!r}.")
    S = int(num_inference_steps)
    least, budget = sampler_tuning_cost(S, num_teacher_steps, max_unet_calls)
    if budget < least:
        raise ValueError(
            f"`max_unet_calls`={max_unet_calls} is below the {least} UNet calls tuning {S} steps needs before any "
            f"search (two {num_teacher_steps}-step teacher runs, {len(INITIAL_SPACINGS)} fixed spacings and the "
            f"held-out check); raise `max_unet_calls` or lower `num_teacher_steps`."
        )
    print(
        f"tune_sampler: {S} steps, solver_order={solver_order}, {num_teacher_steps}-step teacher: at most {budget} "
        f"UNet calls on batches of {num_samples} ({least} fixed, the rest for the search)"
    )

    base = DDIMSchedulerPlus.from_config(config, ddim_solver_order=solver_order)
    student = DDIMSchedulerPlus.from_config(base.config, tuned_timesteps=None)
    x_T = pipeline.prepare_latents(num_samples, generator, None)
    x_T_heldout = pipeline.prepare_latents(num_samples, generator, None)
    with tqdm(total=budget, desc="UNet calls", disable=not progress) as bar:
        matching = _TeacherMatching(pipeline.unet, student, x_T, bar)
        heldout = _TeacherMatching(pipeline.unet, student, x_T_heldout, bar)
        matching.target = _teacher_samples(matching, num_teacher_steps)
        heldout.target = _teacher_samples(heldout, num_teacher_steps)
        calls_left = lambda: budget - heldout.num_calls - 2 * S  # noqa: E731 (the held-out runs come last)

        start, spacing_distance = _best_spacing(matching, S)
        timesteps_only = [("timesteps", i) for i in range(S)]
        trials = default_max_trials(S) if max_trials is None else max_trials
        best = _pattern_search(matching, start, timesteps_only, trials, calls_left() - S * tune_coefficients)
        if tune_coefficients:
            error, candidate, _ = best
            extrapolation, eps_scale = _default_coefficients(student, candidate["timesteps"])
            candidate = {**candidate, "extrapolation": extrapolation, "eps_scale": eps_scale}
            error, outputs = matching.score(candidate)
            start = (error, candidate, outputs)
            best = _pattern_search(matching, start, _coordinates(S, solver_order), budget, calls_left())
        error, candidate, _ = best

        entry = tuned_timesteps_entry(student, candidate["timesteps"], solver_order)
        if candidate.get("extrapolation") is not None:
            entry.update(extrapolation=candidate["extrapolation"], eps_scale=candidate["eps_scale"])
        heldout_distance = heldout.score(candidate)[0]
        base.set_timesteps(S)
        untuned_distance = heldout.distance(heldout.run(base)[0])
        bar.total = matching.num_calls + heldout.num_calls
        bar.refresh()

    stored = heldout_distance < untuned_distance
    if stored:
        key = (solver_order, S)
        kept = [e for e in base.config.tuned_timesteps or [] if (e["solver_order"], e["num_inference_steps"]) != key]
        entries = sorted([*kept, entry], key=lambda e: (e["solver_order"], e["num_inference_steps"]))
        if getattr(config, "ddim_solver_order", None) != solver_order:
            logger.warning(
                f"tune_sampler sets the pipeline scheduler's `ddim_solver_order` to {solver_order}, the order of the "
                f"tuned sampler (it was {getattr(config, 'ddim_solver_order', None)})."
            )
        pipeline.scheduler = DDIMSchedulerPlus.from_config(base.config, tuned_timesteps=entries)
    else:
        logger.warning(
            f"The tuned {S}-step sampler is not closer to the teacher than the untuned one on held-out latents "
            f"({heldout_distance:.4f} against {untuned_distance:.4f}); nothing is stored. Try more `num_samples` "
            "or a larger `max_unet_calls`."
        )
    return SamplerTuningOutput(
        entry=entry,
        stored=stored,
        teacher_distance=error,
        heldout_distance=heldout_distance,
        heldout_untuned_distance=untuned_distance,
        spacing_distance=spacing_distance,
        num_unet_calls=matching.num_calls + heldout.num_calls,
        budget=budget,
    )
