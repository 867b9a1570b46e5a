# Derived from the Hugging Face diffusers test suite, Copyright HuggingFace Inc., licensed under the Apache
# License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0): tests/schedulers/test_scheduler_ddim.py
# (class DDIMSchedulerTest) and the scheduler-agnostic checks of its base tests/schedulers/test_schedulers.py
# (class SchedulerCommonTest, SchedulerBaseTests), as of the diffusers 0.4x series.
"""diffusers' own DDIM scheduler tests, run against `DDIMSchedulerPlus` in place of `DDIMScheduler`.

Each test keeps its upstream name, inputs, thresholds and expected numbers (the full-loop sums and means); the
checks are re-expressed as pytest functions over a small local harness (`check_over_configs`,
`check_over_forward`, the dummy model and tensors) so nothing from diffusers' test utilities is needed. Where a
test cannot apply as written, the reason is given at the test.

Not carried over:
- `SchedulerPushToHubTester` (push_to_hub, push_to_hub_in_organization): need Hub staging credentials and the
  network; our own push is tested offline with the Hub calls recorded (tests/test_pipeline_utils.py).
- `SchedulerBaseTests.test_save_load_*`: exercise diffusers' `ConfigMixin` with dummy classes; no DDIM scheduler
  is involved.
- `test_default_arguments_not_in_config` and `test_default_solver_type_after_switch` download
  `hf-internal-testing/tiny-stable-diffusion-pipe`; they are run here offline on the same kind of config (a DDIM
  config saved without `timestep_spacing`).
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
    logging,
)
from diffusers.utils import is_torchsde_available

from ddim_plus import DDIMSchedulerPlus

FORWARD_DEFAULT_KWARGS = (("eta", 0.0), ("num_inference_steps", 50))


# --------------------------------------------------------------------------------------------------------------
# Harness (upstream: SchedulerCommonTest's properties and helpers)
# --------------------------------------------------------------------------------------------------------------
def get_scheduler_config(**kwargs):
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "clip_sample": True,
    }
    config.update(**kwargs)
    return config


def dummy_sample():
    return torch.rand((4, 3, 8, 8))


def _deterministic(reverse: bool):
    batch_size, num_channels, height, width = 4, 3, 8, 8
    num_elems = batch_size * num_channels * height * width
    values = torch.arange(num_elems)
    if reverse:
        values = values.flip(-1)
    return (values.reshape(num_channels, height, width, batch_size) / num_elems).permute(3, 0, 1, 2)


def dummy_sample_deter():
    return _deterministic(reverse=False)


def dummy_noise_deter():
    return _deterministic(reverse=True)


def dummy_model(sample, t):
    """sample * t / (t + 1), with a tensor t broadcast against the sample."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.device).to(sample.dtype)
    return sample * t / (t + 1)


def _step_pair(scheduler, new_scheduler, residual, time_step, sample, kwargs):
    kwargs = dict(kwargs)
    kwargs["generator"] = torch.manual_seed(0)
    output = scheduler.step(residual, time_step, sample, **kwargs).prev_sample
    kwargs["generator"] = torch.manual_seed(0)
    new_output = new_scheduler.step(residual, time_step, sample, **kwargs).prev_sample
    return output, new_output


def _saved_and_reloaded(scheduler, tmp_path):
    scheduler.save_config(tmp_path)
    return DDIMSchedulerPlus.from_pretrained(tmp_path)


def check_over_configs(tmp_path, time_step=0, **config):
    """A scheduler and its save_config/from_pretrained copy give the same step."""
    kwargs = dict(FORWARD_DEFAULT_KWARGS)
    num_inference_steps = kwargs.pop("num_inference_steps")
    scheduler = DDIMSchedulerPlus(**get_scheduler_config(**config))
    sample = dummy_sample()
    residual = 0.1 * sample
    new_scheduler = _saved_and_reloaded(scheduler, tmp_path)
    scheduler.set_timesteps(num_inference_steps)
    new_scheduler.set_timesteps(num_inference_steps)
    scheduler.scale_model_input(sample, 0)
    new_scheduler.scale_model_input(sample, 0)
    output, new_output = _step_pair(scheduler, new_scheduler, residual, time_step, sample, kwargs)
    assert torch.sum(torch.abs(output - new_output)) < 1e-5, "Scheduler outputs are not identical"


def check_over_forward(tmp_path, time_step=0, **forward_kwargs):
    """As `check_over_configs`, varying the arguments of `step` / `set_timesteps` instead of the config."""
    kwargs = dict(FORWARD_DEFAULT_KWARGS)
    kwargs.update(forward_kwargs)
    num_inference_steps = kwargs.pop("num_inference_steps")
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    sample = dummy_sample()
    residual = 0.1 * sample
    new_scheduler = _saved_and_reloaded(scheduler, tmp_path)
    scheduler.set_timesteps(num_inference_steps)
    new_scheduler.set_timesteps(num_inference_steps)
    output, new_output = _step_pair(scheduler, new_scheduler, residual, time_step, sample, kwargs)
    assert torch.sum(torch.abs(output - new_output)) < 1e-5, "Scheduler outputs are not identical"


def full_loop(**config):
    scheduler = DDIMSchedulerPlus(**get_scheduler_config(**config))
    num_inference_steps, eta = 10, 0.0
    sample = dummy_sample_deter()
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        residual = dummy_model(sample, t)
        sample = scheduler.step(residual, t, sample, eta).prev_sample
    return sample


class _CaptureLogger:
    """Collects what a diffusers logger writes (upstream: diffusers.utils.testing_utils.CaptureLogger)."""

    def __init__(self, logger):
        self.logger, self.records = logger, []

    def __enter__(self):
        import logging as std_logging

        capture = self

        class _Handler(std_logging.Handler):
            def emit(self, record):
                capture.records.append(record.getMessage())

        self.handler = _Handler()
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    @property
    def out(self):
        return "".join(message + "\n" for message in self.records)


# --------------------------------------------------------------------------------------------------------------
# DDIMSchedulerTest
# --------------------------------------------------------------------------------------------------------------
def test_timesteps(tmp_path):
    for timesteps in [100, 500, 1000]:
        check_over_configs(tmp_path, num_train_timesteps=timesteps)


def test_steps_offset(tmp_path):
    for steps_offset in [0, 1]:
        check_over_configs(tmp_path, steps_offset=steps_offset)
    scheduler = DDIMSchedulerPlus(**get_scheduler_config(steps_offset=1))
    scheduler.set_timesteps(5)
    assert torch.equal(scheduler.timesteps, torch.LongTensor([801, 601, 401, 201, 1]))


def test_betas(tmp_path):
    for beta_start, beta_end in zip([0.0001, 0.001, 0.01, 0.1], [0.002, 0.02, 0.2, 2]):
        check_over_configs(tmp_path, beta_start=beta_start, beta_end=beta_end)


def test_schedules(tmp_path):
    for schedule in ["linear", "squaredcos_cap_v2"]:
        check_over_configs(tmp_path, beta_schedule=schedule)


def test_prediction_type(tmp_path):
    for prediction_type in ["epsilon", "v_prediction"]:
        check_over_configs(tmp_path, prediction_type=prediction_type)


def test_clip_sample(tmp_path):
    for clip_sample in [True, False]:
        check_over_configs(tmp_path, clip_sample=clip_sample)


def test_timestep_spacing(tmp_path):
    for timestep_spacing in ["trailing", "leading"]:
        check_over_configs(tmp_path, timestep_spacing=timestep_spacing)


def test_rescale_betas_zero_snr(tmp_path):
    for rescale_betas_zero_snr in [True, False]:
        check_over_configs(tmp_path, rescale_betas_zero_snr=rescale_betas_zero_snr)


def test_thresholding(tmp_path):
    check_over_configs(tmp_path, thresholding=False)
    for threshold in [0.5, 1.0, 2.0]:
        for prediction_type in ["epsilon", "v_prediction"]:
            check_over_configs(
                tmp_path, thresholding=True, prediction_type=prediction_type, sample_max_value=threshold
            )


def test_time_indices(tmp_path):
    # 1, 10 and 49 are not in the 50-step leading schedule; they step to the largest scheduled timestep below
    # (tests/test_scheduling_ddim_plus.py checks where they land; here, as upstream, that a reloaded copy agrees).
    for t in [1, 10, 49]:
        check_over_forward(tmp_path, time_step=t)


def test_inference_steps(tmp_path):
    for t, num_inference_steps in zip([1, 10, 50], [10, 50, 500]):
        check_over_forward(tmp_path, time_step=t, num_inference_steps=num_inference_steps)


def test_eta(tmp_path):
    for t, eta in zip([1, 10, 49], [0.0, 0.5, 1.0]):
        check_over_forward(tmp_path, time_step=t, eta=eta)


def test_variance():
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    assert torch.sum(torch.abs(scheduler._get_variance(0, 0) - 0.0)) < 1e-5
    assert torch.sum(torch.abs(scheduler._get_variance(420, 400) - 0.14771)) < 1e-5
    assert torch.sum(torch.abs(scheduler._get_variance(980, 960) - 0.32460)) < 1e-5
    assert torch.sum(torch.abs(scheduler._get_variance(487, 486) - 0.00979)) < 1e-5
    assert torch.sum(torch.abs(scheduler._get_variance(999, 998) - 0.02)) < 1e-5


def test_full_loop_no_noise():
    sample = full_loop()
    assert abs(torch.sum(torch.abs(sample)).item() - 172.0067) < 1e-2
    assert abs(torch.mean(torch.abs(sample)).item() - 0.223967) < 1e-3


def test_full_loop_with_v_prediction():
    sample = full_loop(prediction_type="v_prediction")
    assert abs(torch.sum(torch.abs(sample)).item() - 52.5302) < 1e-2
    assert abs(torch.mean(torch.abs(sample)).item() - 0.0684) < 1e-3


def test_full_loop_with_set_alpha_to_one():
    # a different beta_start, so that the first alpha is 0.99
    sample = full_loop(set_alpha_to_one=True, beta_start=0.01)
    assert abs(torch.sum(torch.abs(sample)).item() - 149.8295) < 1e-2
    assert abs(torch.mean(torch.abs(sample)).item() - 0.1951) < 1e-3


def test_full_loop_with_no_set_alpha_to_one():
    sample = full_loop(set_alpha_to_one=False, beta_start=0.01)
    assert abs(torch.sum(torch.abs(sample)).item() - 149.0784) < 1e-2
    assert abs(torch.mean(torch.abs(sample)).item() - 0.1941) < 1e-3


def test_full_loop_with_noise():
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    num_inference_steps, eta, t_start = 10, 0.0, 8
    sample = dummy_sample_deter()
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    sample = scheduler.add_noise(sample, dummy_noise_deter(), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, eta).prev_sample
    assert abs(torch.sum(torch.abs(sample)).item() - 354.5418) < 1e-2
    assert abs(torch.mean(torch.abs(sample)).item() - 0.4616) < 1e-3


def test_num_inference_steps_zero_raises():
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    with pytest.raises(ValueError):
        scheduler.set_timesteps(num_inference_steps=0)


# --------------------------------------------------------------------------------------------------------------
# SchedulerCommonTest
# --------------------------------------------------------------------------------------------------------------
def test_from_save_pretrained(tmp_path):
    kwargs = dict(FORWARD_DEFAULT_KWARGS)
    num_inference_steps = kwargs.pop("num_inference_steps")
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    sample = dummy_sample()
    residual = 0.1 * sample
    new_scheduler = _saved_and_reloaded(scheduler, tmp_path)
    scheduler.set_timesteps(num_inference_steps)
    new_scheduler.set_timesteps(num_inference_steps)
    output, new_output = _step_pair(scheduler, new_scheduler, residual, 1, sample, kwargs)
    assert torch.sum(torch.abs(output - new_output)) < 1e-5, "Scheduler outputs are not identical"


def test_compatibles():
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    assert all(c is not None for c in scheduler.compatibles)
    for comp_scheduler_cls in scheduler.compatibles:
        if comp_scheduler_cls.__name__ == "DPMSolverSDEScheduler" and not is_torchsde_available():
            continue  # needs the optional `torchsde` package, which we do not install (diffusers' CI does)
        comp_scheduler = comp_scheduler_cls.from_config(scheduler.config)
        assert comp_scheduler is not None
    new_scheduler = DDIMSchedulerPlus.from_config(comp_scheduler.config)
    new_scheduler_config = {k: v for k, v in new_scheduler.config.items() if k in scheduler.config}
    scheduler_diff = {k: v for k, v in new_scheduler.config.items() if k not in scheduler.config}
    # configs essentially identical; the only differences are keys that are not arguments of __init__
    assert new_scheduler_config == dict(scheduler.config)
    init_keys = inspect.signature(DDIMSchedulerPlus.__init__).parameters.keys()
    assert set(scheduler_diff.keys()).intersection(set(init_keys)) == set()


def test_from_pretrained(tmp_path):
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    scheduler.save_pretrained(tmp_path)
    new_scheduler = DDIMSchedulerPlus.from_pretrained(tmp_path)
    # `_use_default_values` should not exist for a just saved and loaded scheduler
    scheduler_config = dict(scheduler.config)
    del scheduler_config["_use_default_values"]
    assert scheduler_config == new_scheduler.config


def test_step_shape():
    kwargs = dict(FORWARD_DEFAULT_KWARGS)
    num_inference_steps = kwargs.pop("num_inference_steps")
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    sample = dummy_sample()
    residual = 0.1 * sample
    scheduler.set_timesteps(num_inference_steps)
    output_0 = scheduler.step(residual, 0, sample, **kwargs).prev_sample
    output_1 = scheduler.step(residual, 1, sample, **kwargs).prev_sample
    assert output_0.shape == sample.shape
    assert output_0.shape == output_1.shape


def test_scheduler_outputs_equivalence():
    kwargs = dict(FORWARD_DEFAULT_KWARGS)
    num_inference_steps = kwargs.pop("num_inference_steps")
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    sample = dummy_sample()
    residual = 0.1 * sample
    scheduler.set_timesteps(num_inference_steps)
    outputs_dict = scheduler.step(residual, 0, sample, generator=torch.manual_seed(0), **kwargs)
    scheduler.set_timesteps(num_inference_steps)
    outputs_tuple = scheduler.step(residual, 0, sample, return_dict=False, generator=torch.manual_seed(0), **kwargs)
    for tuple_value, dict_value in zip(outputs_tuple, outputs_dict.values()):
        assert torch.allclose(torch.nan_to_num(tuple_value), torch.nan_to_num(dict_value), atol=1e-5)


def test_scheduler_public_api():
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    assert hasattr(scheduler, "init_noise_sigma")
    assert hasattr(scheduler, "scale_model_input")
    assert hasattr(scheduler, "step")
    sample = dummy_sample()
    assert scheduler.scale_model_input(sample, 0.0).shape == sample.shape


def test_add_noise_device():
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    scheduler.set_timesteps(100)
    sample = dummy_sample()
    scaled_sample = scheduler.scale_model_input(sample, 0.0)
    assert sample.shape == scaled_sample.shape
    noise = torch.randn_like(scaled_sample)
    t = scheduler.timesteps[5][None]
    assert scheduler.add_noise(scaled_sample, noise, t).shape == scaled_sample.shape


def test_deprecated_kwargs():
    has_kwarg_in_model_class = "kwargs" in inspect.signature(DDIMSchedulerPlus.__init__).parameters
    has_deprecated_kwarg = len(DDIMSchedulerPlus._deprecated_kwargs) > 0
    assert has_kwarg_in_model_class == has_deprecated_kwarg


def test_trained_betas(tmp_path):
    # Upstream passes two betas with the default num_train_timesteps=1000, which stock diffusers accepts and then
    # indexes out of range at sampling time; ours rejects the mismatch (tests/test_scheduler_errors.py). The
    # behaviour under test, trained betas surviving save/load, is checked with a consistent T = 2.
    scheduler = DDIMSchedulerPlus(**get_scheduler_config(num_train_timesteps=2), trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    new_scheduler = DDIMSchedulerPlus.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == new_scheduler.betas.tolist()


def test_getattr_is_correct():
    scheduler = DDIMSchedulerPlus(**get_scheduler_config())
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)

    logger = logging.get_logger("diffusers.configuration_utils")
    logger.setLevel(30)
    with _CaptureLogger(logger) as cap_logger:
        assert hasattr(scheduler, "dummy_attribute")
        assert scheduler.dummy_attribute == 5
    assert cap_logger.out == ""  # no warning

    logger = logging.get_logger("diffusers.schedulers.scheduling_utils")
    logger.setLevel(30)
    with _CaptureLogger(logger) as cap_logger:
        assert hasattr(scheduler, "save_pretrained")
        assert callable(scheduler.save_pretrained)
    assert cap_logger.out == ""

    # a config entry read as an attribute works, with a deprecation warning (getattr(x, "a") is x.a)
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError) as error:
        _ = scheduler.does_not_exist
    assert str(error.value) == f"'{type(scheduler).__name__}' object has no attribute 'does_not_exist'"


# --------------------------------------------------------------------------------------------------------------
# SchedulerBaseTests that download a pipeline upstream, run offline on the same kind of config
# --------------------------------------------------------------------------------------------------------------
def _old_ddim_config_without_timestep_spacing():
    """What tiny-stable-diffusion-pipe's scheduler config looks like: a DDIM config from before timestep_spacing."""
    config = {k: v for k, v in DDIMSchedulerPlus().config.items() if not k.startswith("_")}
    for key in ("timestep_spacing", "sigma_type", "ddim_solver_order", "rescale_betas_zero_snr"):
        config.pop(key)
    return config


def test_default_arguments_not_in_config():
    scheduler = DDIMSchedulerPlus.from_config(_old_ddim_config_without_timestep_spacing())
    assert scheduler.config.timestep_spacing == "leading"  # our default, same as DDIMScheduler's
    # switching to another scheduler uses that scheduler's default for a value the config did not set
    scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    assert scheduler.config.timestep_spacing == "linspace"
    scheduler = EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler = LMSDiscreteScheduler.from_config(scheduler.config)
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler = LMSDiscreteScheduler.from_config(scheduler.config)
    assert scheduler.config.timestep_spacing == "trailing"
    assert DDIMSchedulerPlus.from_config(scheduler.config).config.timestep_spacing == "trailing"


def test_default_solver_type_after_switch():
    scheduler = DDIMSchedulerPlus.from_config(_old_ddim_config_without_timestep_spacing())
    scheduler = DEISMultistepScheduler.from_config(scheduler.config)
    assert scheduler.config.solver_type == "logrho"
    scheduler = UniPCMultistepScheduler.from_config(scheduler.config)
    assert scheduler.config.solver_type == "bh2"
