"""`DDIMSchedulerPlus`: a drop-in for diffusers' `DDIMScheduler` that follows the paper exactly.

Differences from the stock scheduler (see docs/scheduler.md):
- the previous timestep is the next element of ``self.timesteps``, so trailing, linspace, quadratic, log-SNR and
  custom schedules step between the right noise levels (diffusers uses ``t - T // S``, right for leading only);
- the paper's quadratic spacing, a log-SNR-uniform spacing and custom ``timesteps``;
- the paper's sigma-hat variance (``sigma_type="sigma_hat"``), an inverse step for DDIM inversion and an optional
  second-order multistep correction (``ddim_solver_order=2``, DPM-Solver++(2M) written in DDIM form);
- coefficients computed once per ``set_timesteps`` in float64, so a step is a handful of tensor operations;
- zero terminal SNR with epsilon prediction never produces inf/NaN;
- `set_begin_index`, so second-order sampling can start mid-schedule (img2img, inpainting).

The equations live in :mod:`ddim_plus.ddim_math`; this class only keeps the state diffusers expects.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from . import ddim_math as dm

logger = logging.get_logger(__name__)


def _is_device_timestep(timestep) -> bool:
    """Whether `step` must not read `timestep` on the host: a tensor on an accelerator (reading it waits for the
    device) or any tensor while `torch.compile` traces (reading it breaks the graph). A CPU tensor in eager mode is
    read, which costs nothing and lets `step` check it against the schedule."""
    return isinstance(timestep, torch.Tensor) and (timestep.device.type != "cpu" or torch.compiler.is_compiling())


def _check_same_shape(model_output: torch.Tensor, sample: torch.Tensor) -> None:
    if model_output.shape != sample.shape:
        raise ValueError(
            f"`model_output` shape {tuple(model_output.shape)} does not match `sample` shape {tuple(sample.shape)}."
        )


def check_int_in_range(name: str, value, low: int, high: int, high_name: str) -> None:
    """Raise a `ValueError` naming `name` unless `value` is an int (not a bool) in [`low`, `high`]; `high_name` says
    where the upper bound comes from, e.g. "`num_train_timesteps`=1000"."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an int, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be between {low} and {high_name}, got {value}.")


def check_tuned_coefficients(entry: dict) -> None:
    """Raise a `ValueError` unless a `tuned_timesteps` entry has no coefficients or one finite `extrapolation` and
    one finite `eps_scale` per timestep."""
    if entry.get("extrapolation") is None and entry.get("eps_scale") is None:
        return
    steps = len(entry["timesteps"])
    for key in ("extrapolation", "eps_scale"):
        values = entry.get(key)
        if values is None or len(values) != steps or not np.all(np.isfinite(np.asarray(values, dtype=np.float64))):
            raise ValueError(
                f"`tuned_timesteps` entry for {steps} steps has `{key}`={values!r}; a tuned sampler needs one finite "
                f"value per timestep in both `extrapolation` and `eps_scale`. Re-run `ddim-plus tune-steps` or delete "
                "the entry from scheduler_config.json."
            )


@dataclass
class DDIMSchedulerPlusOutput(BaseOutput):
    """Output of :meth:`DDIMSchedulerPlus.step` and :meth:`DDIMSchedulerPlus.inverse_step`.

    Args:
        prev_sample (`torch.Tensor`): the sample at the timestep stepped to (x_{t-1} for ``step``, x_{t+1} for
            ``inverse_step``).
        pred_original_sample (`torch.Tensor`): the predicted x_0 (after clipping or thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _StepPlan:
    """One scheduled transition as Python floats: the levels `inverse_step` moves between and the log-SNR step the
    second-order weights are made of (`step` reads its coefficients from the step table)."""

    abar_t: float  # abar at the current timestep (ZERO_SNR_ABAR_FLOOR for epsilon prediction where it is 0)
    abar_prev: float  # abar at the timestep stepped to (final_alpha_cumprod after the last scheduled one)
    h: float  # step in log-SNR, lambda_prev - lambda_t (inf when stepping to abar = 1)


# The columns of `DDIMSchedulerPlus._build_step_table`, one row per training timestep.
_STEP_TABLE_COLUMNS = (
    "sqrt_abar",
    "sqrt_one_minus_abar",
    "sqrt_abar_prev",
    "eps_coefficient_eta_zero",
    "eps_coefficient_eta_one",
    "ddpm_sigma",
    "sigma_hat",
    "weight_2m",
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step computes in: float32 for half-precision samples (float16, bfloat16), whose 8 or 11
    significant bits would round the coefficients and the differences of eq. 12; the sample's own dtype otherwise.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class DDIMSchedulerPlus(SchedulerMixin, ConfigMixin):
    """Denoising diffusion implicit models (Song et al. 2021), eq. 12 and 16 exactly, with a correct previous
    timestep for every spacing.

    Args:
        num_train_timesteps (`int`, defaults to 1000): number of diffusion steps used to train the model.
        beta_start (`float`, defaults to 0.0001): first beta of the linear-type schedules.
        beta_end (`float`, defaults to 0.02): last beta of the linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`,
            `"sigmoid"` or `"laplace"` (the betas diffusers' `DDPMScheduler` builds for each name).
        trained_betas (`np.ndarray` or `List[float]`, *optional*): betas given directly.
        clip_sample (`bool`, defaults to `True`): clip the predicted x_0 to [-clip_sample_range, clip_sample_range].
        set_alpha_to_one (`bool`, defaults to `True`): after the last scheduled step, go to abar = 1 (a clean
            image); if `False`, to abar_0.
        steps_offset (`int`, defaults to 0): added to the timesteps of the `"leading"` spacing.
        prediction_type (`str`, defaults to `"epsilon"`): what the network predicts: `"epsilon"`, `"sample"` or
            `"v_prediction"`.
        thresholding (`bool`, defaults to `False`): Imagen's dynamic thresholding of x_0 (instead of clipping).
        dynamic_thresholding_ratio (`float`, defaults to 0.995): quantile used by dynamic thresholding.
        clip_sample_range (`float`, defaults to 1.0): clipping bound for `clip_sample`.
        sample_max_value (`float`, defaults to 1.0): largest threshold of dynamic thresholding.
        timestep_spacing (`str`, defaults to `"leading"`): `"leading"`, `"trailing"`, `"linspace"` (diffusers'
            definitions), `"quadratic"` (the paper's CIFAR-10 schedule) or `"logsnr"` (uniform in log-SNR).
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale betas to zero terminal SNR (Lin et al. 2023).
            With epsilon prediction abar_T = 0 is floored at 2**-24 when converting to x_0, so no inf/NaN appears.
        sigma_type (`str`, defaults to `"eta"`): the noise of stochastic steps. `"eta"` is eq. 16 scaled by the
            `eta` passed to `step`; `"sigma_hat"` is the paper's sigma-hat (section 5.1, DDPM's larger variance),
            for which `eta` is ignored. The last step (to `final_alpha_cumprod`) adds no noise.
        ddim_solver_order (`int`, defaults to 1): 1 is the paper's DDIM. 2 replaces x_0 in eq. 12 by the
            DPM-Solver++(2M) multistep extrapolation of x_0, at every `eta` and `sigma_type`: at `eta`=0 the step is
            DPM-Solver++(2M), at `eta`=1 SDE-DPM-Solver++(2M) (diffusers' `algorithm_type="sde-dpmsolver++"`). The
            first step, the step to abar = 1 and, with fewer than 15 steps, the last two steps stay first order.
            A config or keyword that holds `solver_order` instead loads as `ddim_solver_order`.
        tuned_timesteps (`List[dict]`, *optional*): schedules found for this model by
            `ddim_plus.optimize_timesteps` (written by `ddim-plus tune-steps`). Each entry holds
            `num_inference_steps`, `solver_order`, `timesteps` and the `alphas_cumprod` at those timesteps;
            `set_timesteps(S)` uses the entry for S and this `ddim_solver_order` instead of `timestep_spacing`. Entries
            whose abar differ from this noise schedule (another T or other betas) are ignored with a warning.
            An entry written by `ddim_plus.tune_sampler` also holds per-step coefficients, `extrapolation` and
            `eps_scale` (one per step): deterministic steps on that schedule then use them (see `step`). Without
            them, or with `eta` > 0, the step is the plain one of this `ddim_solver_order`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        sigma_type: str = "eta",
        ddim_solver_order: int = 1,
        tuned_timesteps: Optional[List[dict]] = None,
    ):
        if num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be >= 1, got {num_train_timesteps}.")
        if prediction_type not in dm.PREDICTION_TYPES:
            raise ValueError(
                f"`prediction_type`={prediction_type!r} is not supported; choose one of {dm.PREDICTION_TYPES}."
            )
        if timestep_spacing not in dm.TIMESTEP_SPACINGS:
            raise ValueError(
                f"`timestep_spacing`={timestep_spacing!r} is not supported; choose one of {dm.TIMESTEP_SPACINGS}."
            )
        if sigma_type not in dm.SIGMA_TYPES:
            raise ValueError(f"`sigma_type`={sigma_type!r} is not supported; choose one of {dm.SIGMA_TYPES}.")
        if ddim_solver_order not in (1, 2):
            raise ValueError(
                f"`ddim_solver_order` must be 1 (DDIM) or 2 (multistep second order), got {ddim_solver_order}."
            )

        self.betas = dm.make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = dm.rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        # float64 on the CPU: the source of every coefficient. Device copies are made (and cached) where needed.
        self.alphas_cumprod = dm.alphas_cumprod_from_betas(self.betas)
        self.final_alpha_cumprod = (
            torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else self.alphas_cumprod[0]
        )

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self._abar_list = self.alphas_cumprod.tolist()
        self._noise_tables = {}
        self._tuned = self._usable_tuned_timesteps(tuned_timesteps or [])
        self._reset_schedule_state([])

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # The order has its own name because DPMSolverMultistep, UniPC and DEIS keep theirs as `solver_order`
        # (default 2) and would take ours when a saved pipeline is switched to them. A config of ours that holds
        # `solver_order` and no `ddim_solver_order` (its `_class_name` is ours) has the key read as the order rather
        # than carried on as a hidden entry; another scheduler's `solver_order` stays hidden, as diffusers keeps
        # every key of a compatible scheduler. A `solver_order` keyword is read as the order too.
        if (
            config_dict.get("_class_name") == cls.__name__
            and "solver_order" in config_dict
            and "ddim_solver_order" not in config_dict
        ):
            config_dict = dict(config_dict)
            config_dict["ddim_solver_order"] = config_dict.pop("solver_order")
        if "solver_order" in kwargs:
            kwargs.setdefault("ddim_solver_order", kwargs.pop("solver_order"))
        return super().extract_init_dict(config_dict, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Schedule
    # ------------------------------------------------------------------------------------------------------------
    def _usable_tuned_timesteps(self, entries: Sequence[dict]) -> dict:
        """(solver_order, S) -> timesteps for the entries tuned on this noise schedule; warn about the others.

        A tuned schedule is a list of noise levels: it was tuned for the abar it recorded, so it is kept only where
        this scheduler's abar at the same timesteps agree (float32 rounding apart)."""
        T = self.config.num_train_timesteps
        usable = {}
        for entry in entries:
            check_tuned_coefficients(entry)
            steps, order, timesteps = entry["num_inference_steps"], entry["solver_order"], list(entry["timesteps"])
            recorded = np.asarray(entry["alphas_cumprod"], dtype=np.float64)
            in_range = all(0 <= t < T for t in timesteps) and len(recorded) == len(timesteps)
            if not in_range or not np.allclose(self.alphas_cumprod.numpy()[timesteps], recorded, rtol=1e-5, atol=0):
                logger.warning(
                    f"`tuned_timesteps` for {steps} steps (solver_order={order}) were tuned for another noise "
                    f"schedule (other betas or `num_train_timesteps`={T} differs) and are ignored; "
                    f"{steps} steps use `timestep_spacing`={self.config.timestep_spacing!r}. Re-run "
                    f"`ddim-plus tune-steps MODEL --steps {steps} --order {order}` (or "
                    "`ddim_plus.optimize_timesteps`) for this schedule, or delete `tuned_timesteps` from "
                    "scheduler_config.json."
                )
                continue
            usable[(order, steps)] = entry
        return usable

    def tuned_schedule(self, num_inference_steps: int) -> Optional[List[int]]:
        """The tuned timesteps `set_timesteps(num_inference_steps)` uses at this `ddim_solver_order`, or `None` when
        there are none for that number of steps (the `timestep_spacing` is used).

        Returns:
            `List[int]` or `None`.
        """
        entry = self._tuned.get((self.config.ddim_solver_order, num_inference_steps))
        return None if entry is None else list(entry["timesteps"])

    def tuned_coefficients(self, num_inference_steps: int) -> Optional[Tuple[List[float], List[float]]]:
        """The per-step coefficients (`extrapolation`, `eps_scale`) of the sampler tuned by
        `ddim_plus.tune_sampler` for `num_inference_steps` at this `ddim_solver_order`, or `None`.

        Returns:
            `tuple` of two `List[float]`, or `None`.
        """
        entry = self._tuned.get((self.config.ddim_solver_order, num_inference_steps))
        if entry is None or entry.get("extrapolation") is None:
            return None
        return [float(c) for c in entry["extrapolation"]], [float(c) for c in entry["eps_scale"]]

    def _reset_schedule_state(self, timesteps: List[int]) -> None:
        self._timestep_list = timesteps
        self._ascending = sorted(timesteps)
        self._index_of = {t: i for i, t in enumerate(timesteps)}
        self._plans = [self._plan(t, self._prev_of_index(i)) for i, t in enumerate(timesteps)]
        self._step_table = self._build_step_table()
        self._device_tables = {}  # (device, dtype) -> (step table, self.timesteps) there, made at the first step
        self._begin_index = None
        self._step_index = None
        self._last_x0 = None  # multistep history (ddim_solver_order=2): x_0 of the last step taken
        self._step_coefficients = None  # (extrapolation, eps_scale) per step of a tuned sampler, see `step`

    def _prev_of_index(self, index: int) -> int:
        return self._timestep_list[index + 1] if index + 1 < len(self._timestep_list) else -1

    def _abar(self, timestep: int) -> float:
        """abar at an integer timestep; -1 stands for the level after the last step (final_alpha_cumprod)."""
        return self._abar_list[timestep] if timestep >= 0 else float(self.final_alpha_cumprod)

    def _plan(self, timestep: int, prev_timestep: int) -> _StepPlan:
        abar_t, abar_prev = self._abar(timestep), self._abar(prev_timestep)
        if abar_t <= 0 and self.config.prediction_type == "epsilon":
            abar_t = dm.ZERO_SNR_ABAR_FLOOR  # eq. 9 is undefined only here; any abar > 0 is used as it is
        lam_t, lam_prev = dm.log_snr((abar_t, abar_prev)).tolist()
        return _StepPlan(abar_t, abar_prev, lam_prev - lam_t)

    def multistep_extrapolation_weights(self) -> List[float]:
        """DPM-Solver++(2M)'s extrapolation weight for each step of the current schedule, 0 where `step` takes a
        first-order step: the first step, the step to abar = 1 and, with fewer than 15 steps, the last two (see
        `step`). With `ddim_solver_order=2` these are the weights `step` uses; `ddim_plus.tune_sampler` starts
        from them.

        Returns:
            `List[float]`: one weight per element of `self.timesteps`.
        """
        num_steps = len(self._plans)
        weights = [0.0] * num_steps
        for index in range(1, num_steps):
            final_steps = num_steps < 15 and index >= num_steps - 2
            if self._plans[index].abar_prev < 1.0 and not final_steps:
                weights[index] = dm.dpm_solver_2m_weight(self._plans[index].h, self._plans[index - 1].h)
        return weights

    def _build_step_table(self) -> torch.Tensor:
        """Every coefficient `step` needs, per training timestep t in [0, T), in float64: row t holds the columns
        of `_STEP_TABLE_COLUMNS` for the step from t to the largest scheduled timestep below it (the next element of
        `self.timesteps` for a scheduled t, as `_plan`). A step reads its row by indexing with the timestep, on the
        sample's device, so a tensor timestep on a GPU is never read on the host."""
        T = self.config.num_train_timesteps
        abar = self.alphas_cumprod.numpy()
        ascending = np.asarray(self._ascending, dtype=np.int64)
        below = np.searchsorted(ascending, np.arange(T), side="left")  # number of scheduled timesteps < t
        prev = np.where(below > 0, ascending[np.maximum(below - 1, 0)] if len(ascending) else -1, -1)
        final = float(self.final_alpha_cumprod)
        abar_t = abar.copy()
        if self.config.prediction_type == "epsilon":
            abar_t[abar_t <= 0] = dm.ZERO_SNR_ABAR_FLOOR  # as in `_plan`
        abar_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        ddpm_sigma = dm.ddim_sigma(abar_t, abar_prev, 1.0)
        # The step to final_alpha_cumprod adds no fresh noise: it is the output (DDPM's Algorithm 2 sets z = 0 at
        # t = 1, the paper's code masks the noise at t = 0, diffusers' DDPMScheduler adds none at t = 0).
        sigma_hat = np.where(prev >= 0, dm.ddim_sigma_hat(abar_t, abar_prev), 0.0)
        weight_2m = np.zeros(T)
        weight_2m[self._timestep_list] = self.multistep_extrapolation_weights()
        columns = {
            "sqrt_abar": np.sqrt(abar_t),
            "sqrt_one_minus_abar": np.sqrt(1.0 - abar_t),
            "sqrt_abar_prev": np.sqrt(abar_prev),
            "eps_coefficient_eta_zero": np.sqrt(1.0 - abar_prev),
            "eps_coefficient_eta_one": dm.ddim_direction_coefficient(1.0 - abar_prev, ddpm_sigma),
            "ddpm_sigma": ddpm_sigma,
            "sigma_hat": sigma_hat,
            "weight_2m": weight_2m,
        }
        return torch.from_numpy(np.stack([columns[name] for name in _STEP_TABLE_COLUMNS], axis=1))

    def _device_table(self, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """`_step_table` and `self.timesteps` on (device, dtype), copied once per schedule; `non_blocking` keeps
        the copy from waiting on the GPU."""
        key = (str(device), dtype)
        if key not in self._device_tables:
            self._device_tables[key] = (
                self._step_table.to(dtype).to(device, non_blocking=True),
                self.timesteps.to(device, non_blocking=True),
            )
        return self._device_tables[key]

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """Choose the timesteps to visit (run before sampling). Also resets the multistep history, `begin_index`
        and `step_index`.

        Args:
            num_inference_steps (`int`, *optional*): S, the number of sampling steps, 1 <= S <= T: the tuned
                schedule for S (see `tuned_timesteps`) if there is one, otherwise spaced by `config.timestep_spacing`.
            device (`str` or `torch.device`, *optional*): device of `self.timesteps`.
            timesteps (`List[int]`, *optional*): a custom strictly descending schedule within [0, T); replaces
                `num_inference_steps`.
        """
        T = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("Pass either `num_inference_steps` or `timesteps` to `set_timesteps`, not both.")
            schedule = self._validate_custom_timesteps(timesteps)
        else:
            if num_inference_steps is None:
                raise ValueError("`set_timesteps` needs `num_inference_steps` (1 to T) or a list of `timesteps`.")
            check_int_in_range("num_inference_steps", num_inference_steps, 1, T, f"`num_train_timesteps`={T}")
            tuned = self.tuned_schedule(int(num_inference_steps))
            schedule = (
                self._validate_custom_timesteps(tuned)
                if tuned is not None
                else dm.timesteps_for_spacing(
                    self.config.timestep_spacing,
                    int(num_inference_steps),
                    T,
                    self.config.steps_offset,
                    self.alphas_cumprod,
                )
            )
        self.num_inference_steps = len(schedule)
        self.timesteps = torch.from_numpy(np.asarray(schedule, dtype=np.int64)).to(device)
        self._reset_schedule_state([int(t) for t in schedule])
        if timesteps is None:
            self._step_coefficients = self.tuned_coefficients(int(num_inference_steps))

    def _validate_custom_timesteps(self, timesteps: Sequence[int]) -> np.ndarray:
        T = self.config.num_train_timesteps
        values = timesteps.tolist() if isinstance(timesteps, (torch.Tensor, np.ndarray)) else list(timesteps)
        if len(values) == 0:
            raise ValueError("`timesteps` is empty; give at least one timestep in [0, T).")
        for v in values:
            if isinstance(v, bool) or not float(v).is_integer():
                raise ValueError(f"`timesteps` must hold integers, got {v!r}.")
        values = [int(v) for v in values]
        bad = [v for v in values if not 0 <= v < T]
        if bad:
            raise ValueError(f"`timesteps` must lie in [0, {T}) (`num_train_timesteps`); got {bad}.")
        for a, b in zip(values, values[1:]):
            if b >= a:
                raise ValueError(
                    f"`timesteps` must be strictly descending (sampling goes from noise to data); found {a} then {b}."
                )
        return np.asarray(values, dtype=np.int64)

    @property
    def step_index(self) -> Optional[int]:
        """The index in `self.timesteps` of the step after the last one taken (None before the first `step` since
        `set_timesteps`)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The index of the first timestep of the sampling loop, set by a pipeline with `set_begin_index` (None:
        the loop starts at the first timestep)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the sampling loop at `self.timesteps[begin_index]`, as diffusers' img2img and inpainting pipelines
        do (run after `set_timesteps`, which resets it). With `ddim_solver_order=2` the step at `begin_index` is
        first order and starts the multistep history.

        Args:
            begin_index (`int`, defaults to `0`): the index of the first timestep to step from.
        """
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(
                f"`begin_index` must be an int >= 0 (an index into `self.timesteps`), got {begin_index!r}."
            )
        self._begin_index = int(begin_index)

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> int:
        """The timestep `step` moves to from `timestep`: the next element of `self.timesteps`, or -1 (meaning
        `final_alpha_cumprod`) after the last. A timestep not in the schedule moves to the largest scheduled
        timestep below it."""
        t = self._checked_timestep(timestep)
        index = self._index_of.get(t)
        if index is not None:
            return self._prev_of_index(index)
        below = bisect.bisect_left(self._ascending, t)  # number of scheduled timesteps < t
        return self._ascending[below - 1] if below > 0 else -1

    def _checked_timestep(self, timestep: Union[int, torch.Tensor]) -> int:
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is None: call `set_timesteps` before `step`.")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"`timestep` must be a single value, got a tensor of shape {tuple(timestep.shape)}.")
            timestep = timestep.item()
        t = int(timestep)
        if t != timestep or not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(
                f"`timestep` must be an integer in [0, {self.config.num_train_timesteps}), got {timestep!r}."
            )
        return t

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """DDIM needs no input scaling; kept for interchangeability with other schedulers.

        Returns:
            `torch.Tensor`: `sample`, unchanged.
        """
        return sample

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """sigma_t(1)^2 of eq. 16 between two integer timesteps (diffusers' private helper, same arguments)."""
        return torch.tensor(dm.ddim_sigma(self._abar(timestep), self._abar(prev_timestep), 1.0) ** 2)

    def _postprocess_x0(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return dm.dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        if self.config.clip_sample:
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DDIMSchedulerPlusOutput, Tuple]:
        """One step of eq. 12 from `timestep` to the previous timestep (the next element of `self.timesteps`).

        Args:
            model_output (`torch.Tensor`): the network's output at (`sample`, `timestep`).
            timestep (`int` or `torch.Tensor`): the current timestep, in [0, T). One that is not in the schedule steps
                to the largest scheduled timestep below it. A tensor on a GPU (or any tensor under `torch.compile`)
                is never read on the host: its coefficients are gathered on the device, so a sampling loop does not
                wait for the GPU; it is not checked against [0, T) and, with `ddim_solver_order=2`, not against the
                order of the schedule (the step counter gives the position, as in diffusers' multistep schedulers).
            sample (`torch.Tensor`): x_t. Half-precision samples (float16, bfloat16) are stepped in float32 and the
                results rounded once to their dtype.
            eta (`float`, defaults to 0.0): weight of the noise, eq. 16: 0 is deterministic DDIM, 1 the DDPM
                posterior. Ignored when `sigma_type="sigma_hat"`.
            use_clipped_model_output (`bool`, *optional*): re-derive eps from the clipped (or thresholded) x_0.
                The default, `None`, does so whenever `clip_sample` or `thresholding` is on: the step is then eq. 12
                written in (x_t, x_0), which is DDPM's posterior with a clipped x_0 at eta = 1 and an ODE that
                converges as S grows at eta = 0. `False` is stock `DDIMScheduler`'s default: it moves x_0 without
                moving eps, a shift that does not shrink with the step size, so deterministic samples get worse as S
                grows (docs/results.md).
            generator (`torch.Generator`, *optional*): source of the noise when `eta` > 0.
            variance_noise (`torch.Tensor`, *optional*): the noise itself (instead of `generator`).
            return_dict (`bool`, defaults to `True`): return a `DDIMSchedulerPlusOutput` rather than a tuple.

        Returns:
            `DDIMSchedulerPlusOutput` or `tuple`: (prev_sample, pred_original_sample).
        """
        if eta < 0:
            raise ValueError(f"`eta` must be >= 0 (0 = deterministic DDIM, 1 = DDPM), got {eta}.")
        _check_same_shape(model_output, sample)
        dtype = compute_dtype(sample.dtype)
        table, timesteps = self._device_table(sample.device, dtype)
        order_2 = self.config.ddim_solver_order == 2
        stochastic = self.config.sigma_type == "sigma_hat" or eta > 0
        # a sampler tuned by `ddim_plus.tune_sampler` steps deterministically; with noise the plain step is taken
        tuned = None if stochastic else self._step_coefficients
        if _is_device_timestep(timestep):
            # Read on the device only: its row of coefficients is gathered there, and the position in the schedule
            # comes from the host's step counter, not from the value (reading it would wait for the GPU).
            row = table.index_select(0, self._device_timestep(timestep, table.device)).squeeze(0)
            starts = self._step_index is None
            next_index = (self._begin_index or 0) + 1 if starts else self._step_index + 1
        else:
            t = self._checked_timestep(timestep)
            row = table[t]
            index = self._index_of.get(t)
            next_index = (
                index + 1
                if index is not None
                else self._index_of.get(self.previous_timestep(t), self.num_inference_steps)
            )
            starts = self._check_multistep_order(t, index) if order_2 or tuned is not None else True
        (
            sqrt_abar,
            sqrt_one_minus_abar,
            sqrt_abar_prev,
            c_eps_eta_zero,
            c_eps_eta_one,
            ddpm_sigma,
            sigma_hat,
            weight_2m,
        ) = row.unbind()
        # Half-precision samples are stepped in float32 and rounded once at the end (see `compute_dtype`).
        model_output_c, sample_c = model_output.to(dtype), sample.to(dtype)

        # 1. x_0 and eps from the network's output (eq. 9), then clipping or thresholding of x_0
        x0, eps = dm.model_output_to_x0_eps(
            model_output_c, sample_c, sqrt_abar, sqrt_one_minus_abar, self.config.prediction_type
        )
        x0 = self._postprocess_x0(x0)
        if use_clipped_model_output is None:
            use_clipped_model_output = self.config.clip_sample or self.config.thresholding
        if use_clipped_model_output:
            eps = dm.eps_from_x0(sample_c, x0, sqrt_abar, sqrt_one_minus_abar)

        # 2. second-order multistep: replace x_0 by the DPM-Solver++(2M) combination, eps by its consistent value.
        # Eq. 12 with that x_0 is DPM-Solver++(2M) at eta = 0 and SDE-DPM-Solver++(2M) at eta = 1: both solvers put
        # the same extrapolated x_0 into their first-order step, and their first-order steps are DDIM at eta 0 and 1.
        # The weight is 0 (a first-order step) on the first step of a schedule, the step to abar = 1 and, with fewer
        # than 15 steps, the last two steps (diffusers' `lower_order_final` makes only the last one first order):
        # the log-SNR jump into the last timestep (t = 0 for most spacings) is then several times the previous one
        # and the 2M extrapolation overshoots (docs/sampler_quality.md measures it at 5 "leading" steps).
        x0_for_step = x0
        if tuned is not None:
            # 2'. a sampler tuned by `ddim_plus.tune_sampler`: its own extrapolation weight and eps scale per step
            # take the place of the 2M weight (which they start from) and of eps's weight 1.
            extrapolation, eps_scale = tuned[0][next_index - 1], tuned[1][next_index - 1]
            if not starts and extrapolation != 0.0:
                x0_for_step = dm.dpm_solver_2m_x0(x0, self._last_x0, extrapolation)
                eps = dm.eps_from_x0(sample_c, x0_for_step, sqrt_abar, sqrt_one_minus_abar)
            if eps_scale != 1.0:
                eps = eps * eps_scale
            self._last_x0 = x0
        elif order_2:
            if not starts and self._last_x0 is not None:
                if _is_device_timestep(timestep):
                    # a loop restarted at `begin_index` without `set_timesteps` starts first order again
                    weight_2m = torch.where(
                        timestep.to(table.device) == timesteps[self._begin_index or 0], 0, weight_2m
                    )
                second_order = weight_2m != 0
                x0_for_step = torch.where(second_order, dm.dpm_solver_2m_x0(x0, self._last_x0, weight_2m), x0)
                eps = torch.where(
                    second_order, dm.eps_from_x0(sample_c, x0_for_step, sqrt_abar, sqrt_one_minus_abar), eps
                )
            self._last_x0 = x0
        self._step_index = next_index

        # 3. sigma: eq. 16, or sigma-hat with the direction term of sigma(1) (section 5.1), and the noise z
        if self.config.sigma_type == "sigma_hat":
            sigma, c_eps = sigma_hat, c_eps_eta_one
        else:
            sigma, c_eps = eta * ddpm_sigma, dm.ddim_eps_coefficient_for_eta(c_eps_eta_zero, c_eps_eta_one, eta)
        if stochastic:
            if variance_noise is not None and generator is not None:
                raise ValueError("Pass either `generator` or `variance_noise` to `step`, not both.")
            if variance_noise is None:
                # drawn in the model output's dtype, as stock DDIMScheduler does, so a seed gives the same noise
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            elif variance_noise.shape != sample.shape:
                raise ValueError(
                    f"`variance_noise` shape {tuple(variance_noise.shape)} does not match `sample` shape "
                    f"{tuple(sample.shape)}."
                )
            variance_noise = variance_noise.to(dtype)

        # 4. eq. 12: x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        prev_sample = dm.ddim_update(
            x0_for_step, eps, sqrt_abar_prev, c_eps, variance_noise if stochastic else None, sigma
        )
        prev_sample, x0 = prev_sample.to(sample.dtype), x0.to(sample.dtype)

        if not return_dict:
            return (prev_sample, x0)
        return DDIMSchedulerPlusOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _device_timestep(self, timestep: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A tensor timestep as a 1-element int64 index on `device`, checked on the host by its shape only."""
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is None: call `set_timesteps` before `step`.")
        if timestep.numel() != 1:
            raise ValueError(f"`timestep` must be a single value, got a tensor of shape {tuple(timestep.shape)}.")
        return timestep.reshape(1).to(device=device, dtype=torch.long, non_blocking=True)

    def _check_multistep_order(self, t: int, index: Optional[int]) -> bool:
        """Raise unless `t` is the next scheduled timestep or the first of a loop (`begin_index`, default 0);
        return whether it starts a loop (then the step is first order and the history restarts)."""
        if index is None:
            raise ValueError(
                f"`ddim_solver_order`=2 needs the scheduled timesteps in order; timestep {t} is not in "
                "`self.timesteps`."
            )
        begin = self._begin_index or 0
        if index != begin and index != self._step_index:
            expected = begin if self._step_index is None else self._step_index
            next_one = self._timestep_list[expected] if expected < len(self._timestep_list) else "none (it ended)"
            raise ValueError(
                f"`ddim_solver_order`=2 steps through `self.timesteps` in order from `begin_index`={begin}: got "
                f"timestep {t} but the next one is {next_one}. Call `set_timesteps` to restart."
            )
        return index == begin

    def inverse_step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        model_input: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DDIMSchedulerPlusOutput, Tuple]:
        """One deterministic inversion step (eq. 13 run forward in t): from the level just below `timestep` in the
        schedule (the element after it in `self.timesteps`, or the clean level after the last) up to `timestep`.

        Args:
            model_output (`torch.Tensor`): the network's output at (`model_input`, `timestep`).
            timestep (`int`): the scheduled timestep to move to.
            sample (`torch.Tensor`): the sample at the level below `timestep`.
            model_input (`torch.Tensor`, *optional*): what the network saw; defaults to `sample`, which is plain DDIM
                inversion. Passing a guess of the result (fixed-point refinement) makes the step the exact inverse of
                `step` at that guess.
            return_dict (`bool`, defaults to `True`): return a `DDIMSchedulerPlusOutput` rather than a tuple.

        Returns:
            `DDIMSchedulerPlusOutput` or `tuple`: (the sample at `timestep`, the x_0 implied by `sample`).
            x_0 is not clipped here: clipping cannot be inverted.
        """
        t = self._checked_timestep(timestep)
        index = self._index_of.get(t)
        if index is None:
            raise ValueError(f"`timestep`={t} is not in the schedule; `inverse_step` moves between scheduled levels.")
        _check_same_shape(model_output, sample)
        plan = self._plans[index]  # plan.abar_t: the level moved to; plan.abar_prev: the level of `sample`
        model_input = sample if model_input is None else model_input
        sqrt_abar, sqrt_one_minus_abar = math.sqrt(plan.abar_t), math.sqrt(1.0 - plan.abar_t)
        _, eps = dm.model_output_to_x0_eps(
            model_output, model_input, sqrt_abar, sqrt_one_minus_abar, self.config.prediction_type
        )
        x0 = dm.x0_from_eps(sample, eps, math.sqrt(plan.abar_prev), math.sqrt(1.0 - plan.abar_prev))
        next_sample = dm.ddim_inverse_step(x0, eps, plan.abar_t)
        if not return_dict:
            return (next_sample, x0)
        return DDIMSchedulerPlusOutput(prev_sample=next_sample, pred_original_sample=x0)

    # ------------------------------------------------------------------------------------------------------------
    # Training helpers
    # ------------------------------------------------------------------------------------------------------------
    def _noise_table(self, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar) and sqrt(1 - abar) per timestep on (device, dtype), computed in float64 once and cached."""
        key = (str(device), dtype)
        if key not in self._noise_tables:
            self._noise_tables[key] = (
                self.alphas_cumprod.sqrt().to(dtype).to(device),
                (1.0 - self.alphas_cumprod).sqrt().to(dtype).to(device),
            )
        return self._noise_tables[key]

    def _coefficients_for(self, timesteps, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        sqrt_abar, sqrt_one_minus = self._noise_table(like.device, like.dtype)
        timesteps = torch.as_tensor(timesteps, device=like.device).long().flatten()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return sqrt_abar[timesteps].reshape(shape), sqrt_one_minus[timesteps].reshape(shape)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Eq. 4, the forward marginal: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

        Args:
            original_samples (`torch.Tensor`): x_0.
            noise (`torch.Tensor`): eps, same shape.
            timesteps (`torch.IntTensor`): one timestep per batch element (or one for all).

        Returns:
            `torch.Tensor`: x_t.
        """
        sqrt_abar, sqrt_one_minus_abar = self._coefficients_for(timesteps, original_samples)
        return dm.add_noise(original_samples, noise, sqrt_abar, sqrt_one_minus_abar)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.

        Returns:
            `torch.Tensor`: v.
        """
        sqrt_abar, sqrt_one_minus_abar = self._coefficients_for(timesteps, sample)
        return dm.velocity(sample, noise, sqrt_abar, sqrt_one_minus_abar)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def as_ddim_scheduler_plus(scheduler: SchedulerMixin) -> SchedulerMixin:
    """Upgrade a stock `DDPMScheduler` / `DDIMScheduler` (how model_index.json records ours, and what DDPM checkpoints
    hold) to `DDIMSchedulerPlus` with the same config; keep every other scheduler as the user chose it.

    Args:
        scheduler (`SchedulerMixin`): any diffusers scheduler.

    Returns:
        `SchedulerMixin`: a new `DDIMSchedulerPlus` for a stock DDPM or DDIM scheduler, else `scheduler` itself.

    Raises:
        `ValueError`: `scheduler` is not a diffusers scheduler.
    """
    if type(scheduler) in (DDIMScheduler, DDPMScheduler):
        logger.info(f"Sampling with DDIMSchedulerPlus built from the {type(scheduler).__name__} config.")
        return DDIMSchedulerPlus.from_config(scheduler.config)
    if not isinstance(scheduler, SchedulerMixin) or not callable(getattr(scheduler, "step", None)):
        raise ValueError(
            f"`scheduler` must be a diffusers scheduler (DDIMSchedulerPlus, or any SchedulerMixin such as "
            f"DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler or EulerDiscreteScheduler), got "
            f"{type(scheduler).__name__}."
        )
    return scheduler
