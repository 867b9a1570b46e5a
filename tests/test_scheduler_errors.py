"""Bad inputs to `DDIMSchedulerPlus` raise `ValueError`s that name the parameter; zero terminal SNR never yields
inf/NaN."""

import numpy as np
import pytest
import torch

from ddim_plus import DDIMSchedulerPlus


@pytest.fixture
def scheduler():
    s = DDIMSchedulerPlus()
    s.set_timesteps(10)
    return s


def _tensors(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for shape in shapes]


@pytest.mark.parametrize(
    "config, parameter",
    [
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(prediction_type="x0"), "prediction_type"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(sigma_type="large"), "sigma_type"),
        (dict(trained_betas=[0.1, 0.3]), "trained_betas"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
    ],
)
def test_bad_config_raises(config, parameter):
    with pytest.raises(ValueError, match=f"`{parameter}`"):
        DDIMSchedulerPlus(**config)


@pytest.mark.parametrize("value", [0, -1, 1001, 2.5, "10", True, None])
def test_bad_num_inference_steps_raises(value):
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        DDIMSchedulerPlus().set_timesteps(value)


def test_num_inference_steps_and_timesteps_together_raise():
    with pytest.raises(ValueError, match="`num_inference_steps` or `timesteps`"):
        DDIMSchedulerPlus().set_timesteps(10, timesteps=[900, 500, 100])


@pytest.mark.parametrize(
    "timesteps, fragment",
    [
        ([], "empty"),
        ([10, 20], "strictly descending"),
        ([500, 500, 100], "strictly descending"),
        ([1000, 500], r"\[0, 1000\)"),
        ([500, -1], r"\[0, 1000\)"),
        ([900.5, 100], "integers"),
        (torch.tensor([900.5, 100.0]), "integers"),
    ],
)
def test_bad_custom_timesteps_raise(timesteps, fragment):
    with pytest.raises(ValueError, match=f"`timesteps`.*{fragment}|{fragment}.*`timesteps`"):
        DDIMSchedulerPlus().set_timesteps(timesteps=timesteps)


def test_custom_timesteps_accept_lists_arrays_and_tensors():
    for timesteps in ([900, 500, 100], np.array([900, 500, 100]), torch.tensor([900, 500, 100]), [900.0, 500, 100]):
        s = DDIMSchedulerPlus()
        s.set_timesteps(timesteps=timesteps)
        assert s.timesteps.tolist() == [900, 500, 100] and s.num_inference_steps == 3


def test_steps_offset_pushing_the_schedule_out_of_range_raises():
    # leading S = 10: 900 + 100 = 1000; the message gives the largest offset that fits, 999 - 900 = 99
    with pytest.raises(ValueError, match=r"`steps_offset`=100 .*`num_inference_steps`=10.* = 99\."):
        DDIMSchedulerPlus(steps_offset=100).set_timesteps(10)
    DDIMSchedulerPlus(steps_offset=99).set_timesteps(10)
    for spacing in ("trailing", "linspace", "quadratic", "logsnr"):  # steps_offset only moves leading timesteps
        DDIMSchedulerPlus(steps_offset=100, timestep_spacing=spacing).set_timesteps(10)


@pytest.mark.parametrize("value", [-1, 2.0, True, None])
def test_bad_begin_index_raises(scheduler, value):
    with pytest.raises(ValueError, match="`begin_index`"):
        scheduler.set_begin_index(value)


def test_step_before_set_timesteps_raises():
    sample, model_output = _tensors((1, 3, 4, 4), (1, 3, 4, 4))
    with pytest.raises(ValueError, match="`set_timesteps`"):
        DDIMSchedulerPlus().step(model_output, 999, sample)
    with pytest.raises(ValueError, match="`set_timesteps`"):
        DDIMSchedulerPlus().inverse_step(model_output, 999, sample)


@pytest.mark.parametrize("timestep", [1000, -1, 10.5, torch.tensor([900, 800])])
def test_timestep_outside_range_raises(scheduler, timestep):
    sample, model_output = _tensors((1, 3, 4, 4), (1, 3, 4, 4))
    with pytest.raises(ValueError, match="`timestep`"):
        scheduler.step(model_output, timestep, sample)


def test_negative_eta_raises(scheduler):
    sample, model_output = _tensors((1, 3, 4, 4), (1, 3, 4, 4))
    with pytest.raises(ValueError, match="`eta`"):
        scheduler.step(model_output, 900, sample, eta=-0.1)


def test_shape_mismatches_raise(scheduler):
    sample, model_output, noise = _tensors((1, 3, 4, 4), (1, 6, 4, 4), (2, 3, 4, 4))
    with pytest.raises(ValueError, match="`model_output` shape"):
        scheduler.step(model_output, 900, sample)
    with pytest.raises(ValueError, match="`model_output` shape"):
        scheduler.inverse_step(model_output, 900, sample)
    with pytest.raises(ValueError, match="`variance_noise` shape"):
        scheduler.step(sample, 900, sample, eta=1.0, variance_noise=noise)


def test_generator_and_variance_noise_together_raise(scheduler):
    (sample,) = _tensors((1, 3, 4, 4))
    with pytest.raises(ValueError, match="`generator` or `variance_noise`"):
        scheduler.step(sample, 900, sample, eta=1.0, generator=torch.Generator(), variance_noise=sample)


def test_inverse_step_to_an_unscheduled_timestep_raises(scheduler):
    (sample,) = _tensors((1, 3, 4, 4))
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.inverse_step(sample, 901, sample)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_terminal_snr_epsilon_never_gives_inf_or_nan(eta, tiny_unet):
    # abar_T = 0 makes eq. 9 divide by zero at the first trailing step (t = T - 1); stock DDIMScheduler returns
    # inf/NaN there unless clipping hides it. Ours floors abar at 2**-24 for the conversion.
    s = DDIMSchedulerPlus(rescale_betas_zero_snr=True, clip_sample=False, timestep_spacing="trailing")
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    s.set_timesteps(10)
    assert int(s.timesteps[0]) == 999
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        for t in s.timesteps:
            out = s.step(tiny_unet(sample, t).sample, t, sample, eta=eta, generator=generator)
            assert torch.isfinite(out.pred_original_sample).all(), int(t)
            assert torch.isfinite(out.prev_sample).all(), int(t)
            sample = out.prev_sample
