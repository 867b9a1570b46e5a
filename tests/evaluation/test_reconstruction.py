"""Reconstruction MSE (Table 2) and consistency across numbers of steps (section 5.2) on tiny pipelines."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet, seeded_generators

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.evaluation.reconstruction import (
    consistency,
    inversion_error_table,
    inversion_reconstruction_error,
    mean_squared_error,
)


def tiny_pipeline(zero_output=False, timestep_spacing="leading"):
    unet = make_tiny_unet(channels=1, sample_size=8)
    if zero_output:
        # eps == 0 everywhere: x_t / sqrt(abar_t) is constant along DDIM, so the inversion is exact and every S
        # starting from the same timestep decodes x_T to the same image.
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    pipe = DDIMPlusPipeline(
        unet=unet, scheduler=DDIMSchedulerPlus(clip_sample=False, timestep_spacing=timestep_spacing)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digit_like_images(n=3, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_mean_squared_error_closed_form_and_layouts():
    a = torch.full((2, 3, 4, 4), 0.5)
    b = a.clone()
    b[:, 0] += 0.3  # one channel in three off by 0.3
    assert mean_squared_error(a, b) == pytest.approx(0.09 / 3)
    assert mean_squared_error(a.permute(0, 2, 3, 1).numpy(), b) == pytest.approx(0.09 / 3)
    with pytest.raises(ValueError, match="same shape"):
        mean_squared_error(a, b[:1])


def test_inversion_of_zero_noise_model_is_exact():
    pipe = tiny_pipeline(zero_output=True)
    images = digit_like_images()
    assert inversion_reconstruction_error(pipe, images, num_inference_steps=5) < 1e-10


def test_refined_inversion_beats_plain_on_a_real_network():
    pipe = tiny_pipeline()
    table = inversion_error_table(pipe, digit_like_images(n=2), steps=(3, 10))
    assert set(table) == {False, True} and set(table[False]) == {3, 10}
    for s in (3, 10):
        assert table[True][s] < table[False][s]


def test_consistency_of_zero_noise_model_is_perfect():
    # Trailing spacing starts every schedule at t = 999 (leading would start S = 2 at t = 500).
    pipe = tiny_pipeline(zero_output=True, timestep_spacing="trailing")
    result = consistency(pipe, seeds=(0, 1), steps=(2, 5), reference_steps=12)
    assert result.reference_steps == 12
    assert set(result.images) == {2, 5, 12}
    for s in (2, 5):
        assert result.distances[s] < 1e-10


def test_consistency_draws_x_t_like_the_pipeline():
    pipe = tiny_pipeline()
    result = consistency(pipe, seeds=(3, 4), steps=(4, 8), reference_steps=12)
    direct = pipe(
        batch_size=2,
        generator=seeded_generators(3, 4),
        num_inference_steps=4,
        output_type="np",
    ).images
    np.testing.assert_allclose(result.images[4], direct, atol=1e-6)
    assert result.images[12].shape == (2, 8, 8, 1)
    expected = float(((result.images[8].astype(np.float64) - result.images[12]) ** 2).mean())
    assert result.distances[8] == pytest.approx(expected, rel=1e-6)
    assert result.distances[4] > 0


@pytest.mark.parametrize("steps", [[], [0], [2.5], [True]])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        consistency(tiny_pipeline(), steps=steps)
