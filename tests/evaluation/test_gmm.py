"""The Gaussian-mixture oracle of `ddim_plus.evaluation.gmm` against independent computations: Tweedie's formula on
an autograd score of the exact marginal density, the single-Gaussian closed form, sample moments, and the 1-D
Frechet distance."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from ddim_plus.evaluation.gmm import (
    GaussianMixture,
    GaussianMixtureOracle,
    component_mass_error,
    frechet_distance,
    frechet_distance_to_mixture,
)

ABAR = torch.from_numpy(np.linspace(0.9999, 1e-4, 1000))  # any decreasing schedule; the oracle only reads it


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _marginal_log_density(x, mixture, abar):
    """log p_t(x_t) of the noisy mixture, written directly as a (B, K, D) sum (no shared code with the oracle)."""
    flat = x.reshape(x.shape[0], 1, -1)
    var = abar * mixture.variances + (1 - abar)
    log_normal = -0.5 * ((flat - math.sqrt(abar) * mixture.means) ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
    return torch.logsumexp(log_normal + mixture.weights.log(), dim=1)


@pytest.mark.parametrize("t", [0, 150, 500, 999])
def test_oracle_x0_is_tweedie_posterior_mean(t):
    mixture = GaussianMixture.random(num_components=5, sample_shape=(2, 3, 3), seed=3)
    abar = float(ABAR[t])
    x, _ = mixture.sample(64, _generator(1), dtype=torch.float64)
    x_t = math.sqrt(abar) * x + math.sqrt(1 - abar) * torch.randn(x.shape, generator=_generator(2), dtype=x.dtype)
    x_t.requires_grad_(True)
    (score,) = torch.autograd.grad(_marginal_log_density(x_t, mixture, abar).sum(), x_t)
    # Tweedie: E[x_0 | x_t] = (x_t + (1 - abar) grad log p_t(x_t)) / sqrt(abar)
    expected_x0 = (x_t.detach() + (1 - abar) * score) / math.sqrt(abar)
    oracle = GaussianMixtureOracle(mixture, ABAR, prediction_type="sample")
    torch.testing.assert_close(oracle(x_t.detach(), t), expected_x0, rtol=1e-9, atol=1e-9)


def test_single_gaussian_closed_form():
    mu, std, abar = 0.3, 0.4, float(ABAR[300])
    mixture = GaussianMixture(
        torch.full((1, 1, 4, 4), mu, dtype=torch.float64), torch.tensor([std], dtype=torch.float64)
    )
    x_t = torch.randn(8, 1, 4, 4, generator=_generator(0), dtype=torch.float64)
    gain = math.sqrt(abar) * std**2 / (abar * std**2 + 1 - abar)
    expected = mu + gain * (x_t - math.sqrt(abar) * mu)
    torch.testing.assert_close(
        mixture.posterior_x0(x_t, torch.tensor(abar, dtype=torch.float64)), expected, rtol=1e-12, atol=1e-12
    )


def test_prediction_types_are_consistent_and_keep_dtype():
    mixture = GaussianMixture.random(seed=1)
    x_t = torch.randn(16, 1, 8, 8, generator=_generator(0))
    t = 400
    abar = float(ABAR[t])
    eps, x0, v = (GaussianMixtureOracle(mixture, ABAR, p)(x_t, t) for p in ("epsilon", "sample", "v_prediction"))
    assert eps.dtype == torch.float32 and eps.shape == x_t.shape
    torch.testing.assert_close(x_t, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_match_single_timestep_calls():
    mixture = GaussianMixture.random(seed=2)
    oracle = GaussianMixtureOracle(mixture, ABAR)
    x_t = torch.randn(6, 1, 8, 8, generator=_generator(0), dtype=torch.float64)
    timesteps = torch.tensor([10, 500, 10, 999, 0, 500])
    batched = oracle(x_t, timesteps)
    one_by_one = torch.cat([oracle(x_t[i : i + 1], int(t)) for i, t in enumerate(timesteps)])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-12)
    assert oracle.num_calls == 1 + len(timesteps)


def test_exact_moments_match_samples():
    mixture = GaussianMixture.random(num_components=4, sample_shape=(1, 2, 2), seed=5)
    x, labels = mixture.sample(200_000, _generator(0), dtype=torch.float64)
    flat = x.reshape(len(x), -1)
    torch.testing.assert_close(flat.mean(0), mixture.mean(), rtol=0, atol=5e-3)
    torch.testing.assert_close(torch.cov(flat.T), mixture.covariance(), rtol=0, atol=5e-3)
    shares = torch.bincount(labels, minlength=4).double() / len(labels)
    torch.testing.assert_close(shares, mixture.weights, rtol=0, atol=5e-3)


def test_frechet_distance_one_dimensional_closed_form_and_zero_on_itself():
    # for 1-D Gaussians the squared W2 distance is (m1 - m2)^2 + (s1 - s2)^2
    value = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]]))
    assert value == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)
    mixture = GaussianMixture.random(seed=0)
    cov = mixture.covariance()
    assert frechet_distance(mixture.mean(), cov, mixture.mean(), cov) == pytest.approx(0.0, abs=1e-9)


def test_distances_of_exact_samples_shrink_and_of_wrong_samples_are_large():
    mixture = GaussianMixture.random(seed=0)
    small, _ = mixture.sample(1_000, _generator(0))
    large, _ = mixture.sample(16_000, _generator(1))
    floor_small, floor_large = frechet_distance_to_mixture(small, mixture), frechet_distance_to_mixture(large, mixture)
    assert floor_large < floor_small / 4  # the estimation floor shrinks like 1 / N
    blurred = large.mean(0, keepdim=True) + 0.5 * (large - large.mean(0, keepdim=True))
    assert frechet_distance_to_mixture(blurred, mixture) > 100 * floor_large
    assert component_mass_error(large, mixture) < 0.02
    only_first = mixture.means[:1].reshape(1, 1, 8, 8).expand(100, -1, -1, -1)
    assert component_mass_error(only_first, mixture) == pytest.approx(1 - float(mixture.weights[0]))


def test_classify_recovers_labels_of_separated_components():
    mixture = GaussianMixture.random(seed=0)
    x, labels = mixture.sample(2_000, _generator(0))
    assert (mixture.classify(x) == labels).float().mean() > 0.99


def test_unet_wrapper_drives_a_diffusers_pipeline():
    mixture = GaussianMixture.random(num_components=3, sample_shape=(1, 8, 8), seed=0)
    scheduler = DDIMScheduler(clip_sample=False)
    unet = GaussianMixtureOracle(mixture, scheduler.alphas_cumprod).as_unet()
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5, generator=_generator(0), output_type="np").images

    x = torch.randn(2, 1, 8, 8, generator=_generator(0))
    scheduler.set_timesteps(5)
    for t in scheduler.timesteps:
        x = scheduler.step(unet.oracle(x, t), t, x).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)


def test_invalid_arguments_raise():
    mixture = GaussianMixture.random(seed=0)
    with pytest.raises(ValueError, match="`prediction_type`"):
        GaussianMixtureOracle(mixture, ABAR, prediction_type="flow")
    with pytest.raises(ValueError, match="`sample` must have shape"):
        GaussianMixtureOracle(mixture, ABAR)(torch.zeros(2, 3, 8, 8), 10)
    with pytest.raises(ValueError, match="`stds`"):
        GaussianMixture(torch.zeros(2, 1, 2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="`weights`"):
        GaussianMixture(torch.zeros(2, 1, 2, 2), torch.ones(2), weights=torch.tensor([1.0, -1.0]))
