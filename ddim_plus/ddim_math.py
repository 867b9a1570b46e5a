"""The DDIM equations as small pure functions (Song, Meng & Ermon, ICLR 2021, arXiv 2010.02502).

Notation: ``abar_t`` is the paper's alpha_t (the cumulative product of 1 - beta, DDPM's alpha-bar),
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (eq. 4). Every function here is stateless, and each equation is
written here once: `DDIMSchedulerPlus` keeps the state diffusers expects (betas, the schedule, per-step coefficients
in float64) and calls these functions for every formula, including in `step`.

Equation map (see docs/theory.md):
- eq. 4   forward marginal (and the v target) ... :func:`add_noise`, :func:`velocity`
- eq. 9   x_0 from eps (and v, sample conversions) :func:`model_output_to_x0_eps`
- eq. 12  the generalized (DDIM) step ........... :func:`ddim_step_coefficients`, :func:`ddim_step`
- log-SNR (log-SNR spacing, second order) ....... :func:`log_snr`
- eq. 13  the ODE form, run forward = inversion . :func:`ddim_inverse_step`
- eq. 16  sigma_t(eta) .......................... :func:`ddim_sigma`
- sec. 5.1 sigma-hat (DDPM's "large" variance) .. :func:`ddim_sigma_hat`
- App. D.2 timestep subsequences ................ :func:`timesteps_for_spacing`
- sec. 5.3 slerp of x_T ......................... :func:`slerp`
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# diffusers' own spacings (all that stock DDIMScheduler takes), then the paper's quadratic and a log-SNR-uniform one
DIFFUSERS_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
TIMESTEP_SPACINGS = DIFFUSERS_TIMESTEP_SPACINGS + ("quadratic", "logsnr")
# The noise of stochastic steps: eq. 16 scaled by eta, or section 5.1's sigma-hat. "sigma_hat" is the one spelling,
# as saved in scheduler_config.json (`sigma_type`) and as an eta value of `ddim-plus evaluate` and `quality_sweep`.
SIGMA_HAT = "sigma_hat"
SIGMA_TYPES = ("eta", SIGMA_HAT)

# Stands in for abar = 0 (zero terminal SNR), where eq. 9 divides by zero and the log-SNR is -inf; only there: a
# small positive abar (2.4e-9 at t = 999 of squaredcos_cap_v2) is used as it is. 2**-24 is the value diffusers'
# multistep solvers set for the same case.
ZERO_SNR_ABAR_FLOOR = 2.0**-24


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------------
def _cosine_abar(t: float) -> float:
    """Improved DDPM's cosine abar(t), t in [0, 1] (diffusers' ``squaredcos_cap_v2``)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_abar(t: float) -> float:
    """abar(t) of the Laplace log-SNR schedule (Hang et al. 2024; diffusers' ``laplace``)."""
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _betas_for_abar(abar, num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretise a continuous abar(t), capped at ``max_beta`` (as diffusers' ``betas_for_alpha_bar``)."""
    betas = [
        min(1 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Betas exactly as diffusers builds them (float32), so a checkpoint sees the noise levels it was trained on.

    Args:
        beta_schedule (`str`): one of ``BETA_SCHEDULES``; ignored when ``trained_betas`` is given.
        num_train_timesteps (`int`): T.
        beta_start (`float`), beta_end (`float`): end points of the linear-type schedules.
        trained_betas (`Sequence[float]`, *optional*): explicit betas, length T.

    Returns:
        `torch.Tensor`: float32 betas of length T.
    """
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
        if betas.ndim != 1 or len(betas) != num_train_timesteps:
            raise ValueError(
                f"`trained_betas` must be a 1-D sequence of length `num_train_timesteps`={num_train_timesteps}, "
                f"got shape {tuple(betas.shape)}."
            )
        return betas
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _betas_for_abar(_cosine_abar, num_train_timesteps)
    if beta_schedule == "laplace":
        return _betas_for_abar(_laplace_abar, num_train_timesteps)
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"`beta_schedule`={beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}.")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that abar_T = 0 while abar_0 is kept (Lin et al. 2023, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), accumulated in float64 (1 - abar near t = 0 needs the precision)."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def log_snr(alphas_cumprod) -> np.ndarray:
    """lambda_t = log(abar_t / (1 - abar_t)) in float64, twice DPM-Solver's half-log-SNR. abar = 0 (zero terminal
    SNR) counts as ``ZERO_SNR_ABAR_FLOOR``, so lambda stays finite; abar = 1 (the clean level) gives +inf."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf is the intended limit at abar = 1
        return np.log(np.where(abar > 0, abar, ZERO_SNR_ABAR_FLOOR)) - np.log1p(-abar)


# ----------------------------------------------------------------------------------------------------------------
# Forward process and parameterisations
# ----------------------------------------------------------------------------------------------------------------
def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor
) -> torch.Tensor:
    """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

    Takes the two square roots (broadcasting against ``x0``) rather than abar, so that a caller computes them once
    per noise level in float64 and rounds once to the sample's dtype (the scheduler caches them per timestep)."""
    return sqrt_abar * x0 + sqrt_one_minus_abar * noise


def velocity(
    x0: torch.Tensor, noise: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor
) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022), the target of v-prediction; the square roots
    are given as in :func:`add_noise`."""
    return sqrt_abar * noise - sqrt_one_minus_abar * x0


def model_output_to_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, abar: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output into (x_0, eps) at noise level ``abar`` (eq. 9 and its v / sample analogues).

    Args:
        model_output (`torch.Tensor`): the network's prediction.
        sample (`torch.Tensor`): x_t.
        abar (`float`): abar_t. For epsilon prediction it must be > 0 (see ``ZERO_SNR_ABAR_FLOOR``).
        prediction_type (`str`): ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: (x0_hat, eps_hat).
    """
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / s
    if prediction_type == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    raise ValueError(f"`prediction_type`={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}.")


def eps_from_x0(sample: torch.Tensor, x0: torch.Tensor, abar: float) -> torch.Tensor:
    """Eq. 4 solved for eps: eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""
    return (sample - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)


def x0_from_eps(sample: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """Eq. 9: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (sample - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022): clip to the per-image ``ratio`` quantile s, divide by s."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile and clamp are not implemented for half on CPU
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The generalized step (eq. 12) and its noise scale (eq. 16)
# ----------------------------------------------------------------------------------------------------------------
def ddim_sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    """Eq. 16: sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).

    eta = 1 is the DDPM posterior standard deviation, eta = 0 the deterministic DDIM. Returns 0 where the formula is
    undefined: at the clean level (abar_t = 1), and when stepping to abar_prev <= 0, which only a degenerate
    schedule produces (betas near or above 1 make abar underflow; diffusers' own tests build one) and which has no
    signal left to step towards.
    """
    if abar_t >= 1.0 or abar_prev <= 0.0:
        return 0.0
    return eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * math.sqrt(max(1.0 - abar_t / abar_prev, 0.0))


def ddim_sigma_hat(abar_t: float, abar_prev: float) -> float:
    """Section 5.1: sigma-hat_t = sqrt(1 - abar_t / abar_prev), DDPM's larger ("beta") variance (0 for
    abar_prev <= 0, as in :func:`ddim_sigma`)."""
    if abar_prev <= 0.0:
        return 0.0
    return math.sqrt(max(1.0 - abar_t / abar_prev, 0.0))


def ddim_step_coefficients(abar_prev: float, sigma: float, direction_sigma: Optional[float] = None) -> tuple:
    """Eq. 12's weights: x_prev = c_x0 x0 + c_eps eps + c_noise z.

    Args:
        abar_prev (`float`): abar at the timestep being stepped to.
        sigma (`float`): standard deviation of the fresh noise z.
        direction_sigma (`float`, *optional*): the sigma inside "direction pointing to x_t",
            sqrt(1 - abar_prev - sigma^2). Equal to ``sigma`` except for sigma-hat, where the paper keeps sigma(1).

    Returns:
        `tuple[float, float, float]`: (c_x0, c_eps, c_noise).
    """
    d = sigma if direction_sigma is None else direction_sigma
    return math.sqrt(abar_prev), math.sqrt(max(1.0 - abar_prev - d * d, 0.0)), sigma


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    abar_prev: float,
    sigma: float = 0.0,
    noise: Optional[torch.Tensor] = None,
    direction_sigma: Optional[float] = None,
) -> torch.Tensor:
    """Eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, z = ``noise`` (needed only
    when sigma > 0); ``direction_sigma`` as in :func:`ddim_step_coefficients`."""
    c_x0, c_eps, c_noise = ddim_step_coefficients(abar_prev, sigma, direction_sigma)
    # torch.add(..., alpha=) and add_ fuse the scaling into the addition: two tensor passes fewer in the sampling loop
    x_prev = torch.add(x0 * c_x0, eps, alpha=c_eps)
    if c_noise > 0:
        if noise is None:
            raise ValueError("`noise` is required when `sigma` > 0.")
        x_prev = x_prev.add_(noise, alpha=c_noise)
    return x_prev


def ddim_inverse_step(x0: torch.Tensor, eps: torch.Tensor, abar_next: float) -> torch.Tensor:
    """Eq. 13 run forward in t (inversion): x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps, with (x0, eps)
    predicted at the current, less noisy, point. It is eq. 12 at eta = 0 with the roles of the two levels swapped."""
    return math.sqrt(abar_next) * x0 + math.sqrt(1.0 - abar_next) * eps


def dpm_solver_2m_x0(x0: torch.Tensor, x0_prev: torch.Tensor, h: float, h_prev: float) -> torch.Tensor:
    """DPM-Solver++(2M)'s corrected data prediction (Lu et al. 2022, Algorithm 2):
    D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = h_prev / h, h the step in half-log-SNR. Used in place of x0 in
    eq. 12 at eta = 0 it turns DDIM (= DPM-Solver-1) into a second-order multistep solver."""
    c = h / (2.0 * h_prev)
    return (1.0 + c) * x0 - c * x0_prev


def dpm_solver_2m_extrapolation(h: float, h_prev: float) -> float:
    """The weight c = h / (2 h_prev) of :func:`dpm_solver_2m_x0`, D = x0_t + c (x0_t - x0_prev)."""
    return h / (2.0 * h_prev)


def extrapolate_x0(x0: torch.Tensor, x0_prev: torch.Tensor, weight: float) -> torch.Tensor:
    """D = x0_t + weight (x0_t - x0_prev): a multistep x_0 with a free weight, as a tuned sampler stores it per
    step (:func:`dpm_solver_2m_x0` is the weight :func:`dpm_solver_2m_extrapolation`)."""
    return torch.add(x0, x0 - x0_prev, alpha=weight)


# ----------------------------------------------------------------------------------------------------------------
# Timestep subsequences (App. D.2) and interpolation (sec. 5.3)
# ----------------------------------------------------------------------------------------------------------------
def _strictly_descending(ascending: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """Bump repeated values up by one so an ascending int array becomes strictly ascending; return it descending.

    Bumping can push the top past T - 1 when many values repeat near the top (log-SNR spacing at S close to T);
    a second pass from the top then caps the values at T - 1, T - 2, ... . For S <= T the result lies in [0, T)."""
    # out[i] = max(x[i], out[i - 1] + 1) is a running maximum of x[i] - i; the cap from the top,
    # out[i] = min(out[i], out[i + 1] - 1) with out[S] = T, a running minimum of out[i] - i from the end.
    index = np.arange(len(ascending))
    bumped = np.maximum.accumulate(ascending.astype(np.int64) - index)
    capped = np.minimum(np.minimum.accumulate(bumped[::-1])[::-1], num_train_timesteps - len(ascending)) + index
    return capped[::-1].copy()


def _nearest_index(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target, the index of the nearest value, the smallest index on ties: ``np.abs(values[None] -
    targets[:, None]).argmin(1)`` in O((S + T) log T) rather than O(S T) time and memory. ``values`` need not be
    sorted (lambda is not monotone at zero terminal SNR, where only abar = 0 is floored)."""
    order = np.argsort(values, kind="stable")
    ascending = values[order]
    run_starts = np.flatnonzero(np.r_[True, ascending[1:] != ascending[:-1]])
    # the smallest index among equal values, for each sorted position
    first_index = np.minimum.reduceat(order, run_starts)[np.cumsum(np.r_[True, ascending[1:] != ascending[:-1]]) - 1]
    above = np.minimum(np.searchsorted(ascending, targets), len(values) - 1)  # nearest value >= target (or top)
    below = np.maximum(above - 1, 0)
    gap_below, gap_above = np.abs(ascending[below] - targets), np.abs(ascending[above] - targets)
    return np.where(
        gap_below < gap_above,
        first_index[below],
        np.where(gap_above < gap_below, first_index[above], np.minimum(first_index[below], first_index[above])),
    )


def timesteps_for_spacing(
    spacing: str,
    num_inference_steps: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    alphas_cumprod: Optional[torch.Tensor] = None,
) -> np.ndarray:
    """The S timesteps to visit, descending, each in [0, T).

    - ``leading``, ``trailing``, ``linspace``: diffusers' definitions (``steps_offset`` added to leading; it must
      keep the largest leading timestep, ``(S - 1) * (T // S) + steps_offset``, below T). For trailing, diffusers'
      float ``arange(T, 0, -T / S)`` returns S + 1 values for some S (62 of the S <= 1000 at T = 1000, e.g. 61),
      the last of which becomes -1; the first S are taken, which are diffusers' values wherever it returns S.
    - ``quadratic``: the paper's released code, ``floor(linspace(0, sqrt(0.8 T), S) ** 2)``. For large S that
      formula repeats small timesteps; each repeat is moved up to one more than its predecessor, so S distinct
      steps are always returned.
    - ``logsnr``: uniform in log-SNR between the first and the last training timestep (needs ``alphas_cumprod``;
      a level with abar = 0, zero terminal SNR, counts as ``ZERO_SNR_ABAR_FLOOR``); repeats are removed the same
      way, and any step bumped past T - 1 is moved back below its successor.

    Every spacing returns exactly S distinct timesteps in [0, T) for every 1 <= S <= T.

    Returns:
        `np.ndarray`: int64 timesteps, strictly descending.

    Raises:
        `ValueError`: for ``leading`` with a ``steps_offset`` that moves a timestep outside [0, T).
    """
    S, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, S).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        largest_offset = T - 1 - (S - 1) * (T // S)
        if not 0 <= steps_offset <= largest_offset:
            raise ValueError(
                f"`steps_offset`={steps_offset} moves the 'leading' timesteps outside [0, {T}) for "
                f"`num_inference_steps`={S}: it must lie between 0 and T - 1 - (S - 1) * (T // S) = {largest_offset}."
            )
        return (np.arange(0, S) * (T // S)).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / S)[:S]).astype(np.int64) - 1
    if spacing == "quadratic":
        return _strictly_descending(np.floor(np.linspace(0, math.sqrt(T * 0.8), S) ** 2), T)
    if spacing == "logsnr":
        if alphas_cumprod is None:
            raise ValueError("`logsnr` spacing needs `alphas_cumprod`.")
        lam = log_snr(alphas_cumprod)
        targets = np.linspace(lam[0], lam[-1], S)
        return _strictly_descending(np.sort(_nearest_index(lam, targets)), T)
    raise ValueError(f"`timestep_spacing`={spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}.")


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Section 5.3: x(a) = sin((1 - a) theta) / sin(theta) x0 + sin(a theta) / sin(theta) x1, theta the angle
    between x0 and x1 per batch element. Falls back to linear interpolation when the two are (anti)parallel."""
    if x0.shape != x1.shape:
        raise ValueError(f"`x0` and `x1` must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}.")
    a = x0.reshape(x0.shape[0], -1).double()
    b = x1.reshape(x1.shape[0], -1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, torch.full_like(sin, 1 - alpha), torch.sin((1 - alpha) * theta) / safe_sin)
    w1 = torch.where(parallel, torch.full_like(sin, alpha), torch.sin(alpha * theta) / safe_sin)
    out = w0[:, None] * a + w1[:, None] * b
    return out.reshape(x0.shape).to(x0.dtype)
