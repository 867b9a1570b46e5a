"""An exact benchmark for samplers: Gaussian-mixture "images" whose optimal denoiser is known in closed form.

With data x_0 ~ sum_k pi_k N(mu_k, diag(var_k)) and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (eq. 4 of the DDIM
paper), x_t given the component k is Gaussian, N(sqrt(abar) mu_k, abar var_k + 1 - abar), so

    E[x_0 | x_t] = sum_k w_k(x_t) (mu_k + sqrt(abar) var_k / (abar var_k + 1 - abar) (x_t - sqrt(abar) mu_k)),

with w_k(x_t) the posterior probability of component k. That is the minimiser of the training loss, i.e. the
network a perfect training run would produce; the noise and v predictions follow from eq. 4. Driving a sampler
with it measures the sampler's own error, with no training error in the way.

- :class:`GaussianMixture`: the data (exact samples, exact mean and covariance, component labels);
- :class:`GaussianMixtureOracle`: the optimal network as ``model(x, t) -> tensor`` for any prediction type;
  :meth:`GaussianMixtureOracle.as_unet` wraps it for pipelines that call ``unet(x, t).sample``;
- :func:`frechet_distance_to_mixture`, :func:`component_mass_error` and :func:`sliced_wasserstein_distance`:
  distances from generated samples to the true distribution (the last one to a set of exact samples).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence, Tuple, Union

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from ..ddim_math import PREDICTION_TYPES


class GaussianMixture:
    """A mixture of K Gaussians with diagonal covariances over tensors of shape ``sample_shape`` (e.g. 1x8x8).

    Args:
        means (`torch.Tensor`): shape (K, *sample_shape), the component means.
        stds (`torch.Tensor`): the component standard deviations, shape (K, *sample_shape) (diagonal) or (K,)
            (isotropic). All > 0.
        weights (`torch.Tensor`, *optional*): shape (K,), the mixing probabilities (normalised here); uniform when
            omitted.
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: Optional[torch.Tensor] = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"`means` must have shape (K, *sample_shape), got {tuple(means.shape)}.")
        num_components = means.shape[0]
        if stds.shape == (num_components,):
            stds = stds.reshape(-1, *([1] * (means.ndim - 1))).expand_as(means)
        if stds.shape != means.shape:
            raise ValueError(
                f"`stds` must have shape (K,) or the shape of `means` {tuple(means.shape)}, got {tuple(stds.shape)}."
            )
        if not bool((stds > 0).all()):
            raise ValueError("`stds` must be > 0 everywhere.")
        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num_components,) or not bool((weights > 0).all()):
            raise ValueError(f"`weights` must be {num_components} positive numbers, got {weights.tolist()}.")
        self.sample_shape = tuple(means.shape[1:])
        self.means = means.reshape(num_components, -1)  # (K, D), float64
        self.variances = stds.reshape(num_components, -1).contiguous() ** 2  # (K, D)
        self.weights = weights / weights.sum()

    @classmethod
    def random(
        cls,
        num_components: int = 8,
        sample_shape: Sequence[int] = (1, 8, 8),
        mean_range: float = 0.7,
        std_range: Tuple[float, float] = (0.05, 0.2),
        seed: int = 0,
    ) -> GaussianMixture:
        """A reproducible random mixture: means uniform in [-mean_range, mean_range] per pixel, standard deviations
        uniform in ``std_range`` per pixel and component, unequal weights (so mode collapse shows in the masses).

        Args:
            num_components (`int`, defaults to 8): K.
            sample_shape (`Sequence[int]`, defaults to (1, 8, 8)): shape of one sample.
            mean_range (`float`, defaults to 0.7): means lie in [-mean_range, mean_range], inside the usual [-1, 1].
            std_range (`Tuple[float, float]`, defaults to (0.05, 0.2)): range of the per-pixel standard deviations.
                Small values make the probability-flow ODE stiff near t = 0, which is what few-step samplers find hard.
            seed (`int`, defaults to 0): seed of the parameters.

        Returns:
            `GaussianMixture`.
        """
        generator = torch.Generator().manual_seed(seed)
        shape = (num_components, *sample_shape)
        means = (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1) * mean_range
        low, high = std_range
        stds = low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
        weights = 0.5 + torch.rand(num_components, generator=generator, dtype=torch.float64)
        return cls(means, stds, weights)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(
        self, num_samples: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact samples.

        Args:
            num_samples (`int`): how many.
            generator (`torch.Generator`, *optional*): CPU generator, for reproducibility.
            dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the returned samples.

        Returns:
            `Tuple[torch.Tensor, torch.Tensor]`: samples of shape (num_samples, *sample_shape) and their component
            labels (int64).
        """
        labels = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        noise = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.variances[labels].sqrt() * noise
        return x.reshape(num_samples, *self.sample_shape).to(dtype), labels

    def mean(self) -> torch.Tensor:
        """The exact mean, flattened to (D,), float64."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """The exact covariance, (D, D), float64: sum_k pi_k (diag(var_k) + mu_k mu_k^T) - mean mean^T."""
        mean = self.mean()
        second_moment = torch.diag(self.weights @ self.variances) + (self.means.T * self.weights) @ self.means
        return second_moment - torch.outer(mean, mean)

    def posterior_x0(self, noisy: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] at noise level ``abar`` (the closed form in the module docstring), in float64.

        Args:
            noisy (`torch.Tensor`): x_t, shape (B, *sample_shape).
            abar (`torch.Tensor`): abar_t, a scalar or one value per batch element.

        Returns:
            `torch.Tensor`: E[x_0 | x_t], float64, shape of ``noisy``.
        """
        x = noisy.reshape(noisy.shape[0], -1).double()
        abar = torch.as_tensor(abar, dtype=torch.float64).flatten().cpu()
        if abar.numel() == 1:
            return self._posterior_x0_one_level(x, float(abar)).reshape(noisy.shape)
        if abar.numel() != x.shape[0]:
            raise ValueError(f"`abar` must hold one value or one per batch element, got {abar.numel()} values.")
        x0 = torch.empty_like(x)
        for level in abar.unique():
            rows = (abar == level).nonzero().flatten().to(x.device)
            x0[rows] = self._posterior_x0_one_level(x[rows], float(level))
        return x0.reshape(noisy.shape)

    def _posterior_x0_one_level(self, x: torch.Tensor, abar: float) -> torch.Tensor:
        """E[x_0 | x_t] for flattened x_t (B, D) at one noise level. Every (B, K, D) product of the closed form is
        expanded into (B, D) x (D, K) matrix products, so the cost is that of two small matmuls."""
        means, variances = self.means.to(x.device), self.variances.to(x.device)
        sqrt_abar = abar**0.5
        inv_marginal_var = 1.0 / (abar * variances + (1.0 - abar))  # (K, D): 1 / Var(x_t | k)
        shifted_means = sqrt_abar * means  # (K, D): E[x_t | k]
        # log P(k | x_t) up to a constant: -1/2 sum_d (x_d - m_kd)^2 / v_kd - 1/2 sum_d log v_kd + log pi_k
        quadratic = (
            (x * x) @ inv_marginal_var.T
            - 2 * x @ (shifted_means * inv_marginal_var).T
            + (shifted_means**2 * inv_marginal_var).sum(1)
        )
        log_joint = -0.5 * (quadratic - inv_marginal_var.log().sum(1)) + self.weights.log().to(x.device)
        responsibilities = torch.softmax(log_joint, dim=1)  # (B, K)
        # E[x_0 | x_t, k] = mu_k + gain_k (x_t - sqrt(abar) mu_k), gain_k = sqrt(abar) var_k / Var(x_t | k)
        gain = sqrt_abar * variances * inv_marginal_var  # (K, D)
        return responsibilities @ (means - gain * shifted_means) + x * (responsibilities @ gain)

    def classify(self, samples: torch.Tensor) -> torch.Tensor:
        """The most probable component of each clean sample (Bayes classifier under the true mixture).

        Returns:
            `torch.Tensor`: int64 labels, shape (B,).
        """
        x = samples.reshape(samples.shape[0], 1, -1).double()
        log_joint = -0.5 * ((x - self.means) ** 2 / self.variances + self.variances.log()).sum(-1)
        return (log_joint + self.weights.log()).argmax(dim=1)


class GaussianMixtureOracle(torch.nn.Module):
    """The optimal network for a :class:`GaussianMixture` under a noise schedule: ``model(x, t) -> tensor``.

    It returns E[eps | x_t] (``"epsilon"``), E[x_0 | x_t] (``"sample"``) or E[v | x_t] (``"v_prediction"``),
    computed in float64 and returned in the dtype of ``x``.

    Args:
        mixture (`GaussianMixture`): the data distribution.
        alphas_cumprod (`torch.Tensor`): abar per training timestep, e.g. ``scheduler.alphas_cumprod``.
        prediction_type (`str`, defaults to `"epsilon"`): what to predict.
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"`prediction_type`={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}."
            )
        self.mixture = mixture
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.prediction_type = prediction_type
        self.num_calls = 0  # model evaluations, so a benchmark can check the number of function evaluations

    def forward(self, sample: torch.Tensor, timestep: Union[int, torch.Tensor]) -> torch.Tensor:
        """The optimal prediction at (``sample``, ``timestep``).

        Args:
            sample (`torch.Tensor`): x_t, shape (B, *sample_shape).
            timestep (`int` or `torch.Tensor`): one integer timestep in [0, T), or one per batch element.

        Returns:
            `torch.Tensor`: the prediction, shape and dtype of ``sample``.
        """
        if tuple(sample.shape[1:]) != self.mixture.sample_shape:
            raise ValueError(
                f"`sample` must have shape (B, {', '.join(map(str, self.mixture.sample_shape))}), "
                f"got {tuple(sample.shape)}."
            )
        t = torch.as_tensor(timestep).long().cpu().flatten()
        if t.numel() not in (1, sample.shape[0]):
            raise ValueError(f"`timestep` must be one value or one per batch element, got {t.numel()} values.")
        self.num_calls += 1
        abar = self.alphas_cumprod[t].to(sample.device)
        x0 = self.mixture.posterior_x0(sample, abar)
        abar = abar.reshape(-1, *([1] * (sample.ndim - 1)))
        if self.prediction_type == "sample":
            out = x0
        else:
            eps = (sample.double() - abar.sqrt() * x0) / (1.0 - abar).sqrt()
            out = eps if self.prediction_type == "epsilon" else abar.sqrt() * eps - (1.0 - abar).sqrt() * x0
        return out.to(sample.dtype)

    def as_unet(self) -> UNetLikeOracle:
        """This oracle behind the interface of diffusers' ``UNet2DModel``, for pipelines (``unet(x, t).sample``,
        ``unet.config.sample_size``, ``unet.config.in_channels``, ``unet.dtype``)."""
        return UNetLikeOracle(self)


class UNetLikeOracle(torch.nn.Module):
    """A :class:`GaussianMixtureOracle` that answers like ``UNet2DModel``: a ``UNet2DOutput`` (or a tuple with
    ``return_dict=False``) and a ``config`` with ``sample_size``, ``in_channels`` and ``out_channels``.

    Args:
        oracle (`GaussianMixtureOracle`): the optimal network.
    """

    def __init__(self, oracle: GaussianMixtureOracle):
        super().__init__()
        channels, height, width = oracle.mixture.sample_shape
        if height != width:
            raise ValueError(f"`UNet2DModel` pipelines need square samples, got {height}x{width}.")
        self.oracle = oracle
        self.config = SimpleNamespace(sample_size=height, in_channels=channels, out_channels=channels)
        # a parameter-free module has no dtype or device of its own; pipelines ask for both
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def forward(
        self, sample: torch.Tensor, timestep: Union[int, torch.Tensor], return_dict: bool = True, **kwargs
    ) -> Union[UNet2DOutput, Tuple[torch.Tensor]]:
        """``UNet2DModel.forward``'s signature; extra keyword arguments (class labels) are ignored.

        Returns:
            `UNet2DOutput` or `tuple`: the oracle's prediction.
        """
        out = self.oracle(sample, timestep)
        return UNet2DOutput(sample=out) if return_dict else (out,)


# ----------------------------------------------------------------------------------------------------------------
# Distances to the true distribution
# ----------------------------------------------------------------------------------------------------------------
def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Frechet (2-Wasserstein) distance between two Gaussians, squared:
    |m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), from symmetric eigendecompositions in float64.

    Returns:
        `float`: the squared distance (>= 0).
    """
    mean_a, cov_a, mean_b, cov_b = (v.double() for v in (mean_a, cov_a, mean_b, cov_b))
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(value), 0.0)


def frechet_distance_to_mixture(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Squared Frechet distance between the Gaussian fitted to ``samples`` and the mixture's exact mean and
    covariance. Using the exact moments on one side halves the estimation noise of the usual two-sample FD;
    the rest of it (about D^2 / (2 N) for N samples of dimension D) is the floor that exact samples reach.

    Args:
        samples (`torch.Tensor`): shape (N, *sample_shape), N > D recommended.
        mixture (`GaussianMixture`): the true distribution.

    Returns:
        `float`: the squared distance on raw pixels.
    """
    x = samples.reshape(samples.shape[0], -1).double()
    return frechet_distance(x.mean(0), torch.cov(x.T), mixture.mean(), mixture.covariance())


def sliced_wasserstein_distance(
    samples: torch.Tensor, reference: torch.Tensor, num_projections: int = 512, seed: int = 0
) -> float:
    """Sliced 1-Wasserstein distance: the mean over random unit directions of the 1-D W1 between the two sets
    projected on them (Rabin et al. 2011). Unlike the Frechet distance it sees more than two moments, so it keeps
    separating samplers that already match the mean and covariance. With equal set sizes the 1-D W1 is the mean
    absolute difference of the sorted projections; otherwise both quantile functions are compared on the finer grid.

    Args:
        samples (`torch.Tensor`): shape (N, *sample_shape).
        reference (`torch.Tensor`): shape (M, *sample_shape), e.g. exact samples held out from everything else.
        num_projections (`int`, defaults to 512): number of directions, drawn uniformly on the sphere.
        seed (`int`, defaults to 0): seed of the directions (the same directions for every call with one seed).

    Returns:
        `float`: the distance, in the units of the samples.
    """
    x = samples.reshape(samples.shape[0], -1).double()
    y = reference.reshape(reference.shape[0], -1).double().to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`samples` and `reference` must have the same sample size, got {x.shape} and {y.shape}.")
    directions = torch.randn(x.shape[1], num_projections, generator=torch.Generator().manual_seed(seed))
    directions = (directions / directions.norm(dim=0)).double().to(x.device)
    x_sorted = (x @ directions).sort(dim=0).values
    y_sorted = (y @ directions).sort(dim=0).values
    if x_sorted.shape[0] != y_sorted.shape[0]:
        levels = (torch.arange(max(len(x), len(y)), dtype=torch.float64, device=x.device) + 0.5) / max(len(x), len(y))
        x_sorted = x_sorted[(levels * len(x)).long()]
        y_sorted = y_sorted[(levels * len(y)).long()]
    return float((x_sorted - y_sorted).abs().mean())


def component_mass_error(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Total variation between the share of samples the true Bayes classifier puts in each component and the
    mixing weights: 0 when every mode gets its mass, up to 1 when the mass lands on the wrong modes.

    Returns:
        `float`: 0.5 * sum_k |share_k - pi_k|.
    """
    labels = mixture.classify(samples)
    shares = torch.bincount(labels, minlength=mixture.num_components).double() / labels.numel()
    return 0.5 * float((shares - mixture.weights).abs().sum())


__all__ = [
    "GaussianMixture",
    "GaussianMixtureOracle",
    "UNetLikeOracle",
    "component_mass_error",
    "frechet_distance",
    "frechet_distance_to_mixture",
    "sliced_wasserstein_distance",
]
