"""Steps-vs-quality sweeps: same x_T in every cell, stock parity, the markdown a model card receives."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.evaluation.quality import SIGMA_HAT, quality_sweep, results_to_markdown
from ddim_plus.evaluation.sampling import generate_images

pytest.importorskip("torchmetrics")


@pytest.fixture(scope="module")
def pipe():
    pipe = DDIMPlusPipeline(unet=make_tiny_unet(channels=1, sample_size=8), scheduler=DDIMSchedulerPlus())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generate_images_is_independent_of_batch_size(pipe):
    whole = generate_images(pipe, 5, num_inference_steps=3, eta=1.0, seed=7, batch_size=5).images
    pieces = generate_images(pipe, 5, num_inference_steps=3, eta=1.0, seed=7, batch_size=2).images
    assert whole.shape == (5, 8, 8, 1)
    # Batched convolutions round differently (~1e-5): at most a pixel at an 8-bit rounding boundary moves one level.
    np.testing.assert_allclose(pieces, whole, atol=1 / 255 + 1e-6)
    assert np.mean(pieces != whole) < 0.01
    # Image i comes from seed + i alone: images 3 and 4 of the set are images 0 and 1 of a set that starts at seed 10.
    shifted = generate_images(pipe, 2, num_inference_steps=3, eta=1.0, seed=10, batch_size=2).images
    np.testing.assert_array_equal(shifted, pieces[3:])
    # The pipeline's own output for seed 7, rounded to 8 bits as numpy_to_pil rounds it.
    alone = pipe(
        batch_size=1, generator=torch.Generator().manual_seed(7), eta=1.0, num_inference_steps=3, output_type="np"
    ).images
    np.testing.assert_array_equal(whole[:1], (alone * 255).round() / 255)


def test_stock_leading_matches_ours_at_leading(pipe):
    # With "leading" spacing diffusers' step rule is right, so both samplers must agree cell by cell. Without
    # clipping: with it, our default re-derives eps from the clipped x_0 and stock's does not.
    unclipped = DDIMPlusPipeline(unet=pipe.unet, scheduler=DDIMSchedulerPlus(clip_sample=False))
    results = quality_sweep(
        unclipped, steps=(2, 4), etas=(0.0, SIGMA_HAT), spacings=("leading", "stock:leading"), num_images=8
    )
    ours = {(r.steps, r.eta): r.frechet_distance for r in results if r.spacing == "leading"}
    stock = {(r.steps, r.eta): r.frechet_distance for r in results if r.spacing == "stock:leading"}
    assert set(ours) == {(2, 0.0), (4, 0.0), (2, SIGMA_HAT), (4, SIGMA_HAT)}
    assert set(stock) == {(2, 0.0), (4, 0.0)}  # stock has no sigma-hat
    for key, value in stock.items():
        assert value == pytest.approx(ours[key], rel=1e-4)
    assert all(r.features == "digits-cnn-v1" and r.num_images == 8 and r.seconds > 0 for r in results)


def test_sweep_rejects_bad_arguments(pipe):
    with pytest.raises(ValueError, match="num_images"):
        quality_sweep(pipe, num_images=1)
    with pytest.raises(ValueError, match="etas"):
        quality_sweep(pipe, etas=(-0.5,), num_images=4)


def test_markdown_names_features_and_sample_size(pipe):
    markdown = results_to_markdown(quality_sweep(pipe, steps=(2, 3), num_images=6))
    assert "digits-cnn-v1" in markdown and "6 generated images" in markdown
    assert "| S | eta=0 |" in markdown
    for num_steps in (2, 3):
        assert f"| {num_steps} | " in markdown
    with pytest.raises(ValueError, match="empty"):
        results_to_markdown([])
