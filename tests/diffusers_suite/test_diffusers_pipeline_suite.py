# Derived from the Hugging Face diffusers test suite, Copyright HuggingFace Inc., licensed under the Apache
# License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0): tests/pipelines/test_pipelines_common.py
# (class PipelineTesterMixin) and tests/pipelines/ddim/test_ddim.py (class DDIMPipelineFastTests), as of the
# diffusers 0.4x series (checked against diffusers 0.42.1).
"""diffusers' own pipeline tester mixin, run against `DDIMPlusPipeline` (as `DDIMPipelineFastTests` runs it against
`DDIMPipeline`) and `DDIMInversionPipeline`.

The mixin is not in the diffusers wheel and, in the 0.4x series, is bound to diffusers' test utilities
(`testing_utils`, accelerator backends, hooks, AST helpers), so its checks are re-expressed here as pytest functions
over a small harness: one config per pipeline (`get_dummy_components`, `get_dummy_inputs`, `params`,
`batch_params`, `required_optional_params`, as upstream). Each test keeps its upstream name, inputs and thresholds.

Run on both pipelines: test_save_load_local, test_pipeline_call_signature, test_inference_batch_consistent,
test_inference_batch_single_identical, test_dict_tuple_outputs_equivalent, test_components_function,
test_save_load_optional_components, test_to_dtype, test_attention_slicing_forward_pass, test_progress_bar,
test_serialization_with_variants, test_loading_with_variants, test_loading_with_incorrect_variants_raises_error,
test_torch_dtype_dict. On `DDIMPlusPipeline` only (the inversion pipeline takes no callback
and draws no noise): test_callback_inputs, and test_ddim.py's test_inference (its expected slice, recorded upstream
on `DDIMPipeline`).

Run only with a CUDA device (skipped otherwise, as upstream skips them without an accelerator):
test_float16_inference, test_save_load_float16, test_to_device, test_model_cpu_offload_forward_pass.

Not carried over:
- test_num_images_per_prompt, test_cfg, test_callback_cfg, test_encode_prompt_works_in_isolation,
  test_StableDiffusionMixin_component: upstream returns early for a pipeline without `num_images_per_prompt`,
  `guidance_scale`, `encode_prompt` or a VAE, as for `DDIMPipeline`; ours have none of them (`batch_size` plays the
  part of `num_images_per_prompt`, checked by the batch tests).
- test_layerwise_casting_inference, test_group_offloading_inference, test_sequential_cpu_offload_forward_pass,
  test_pipeline_with_accelerator_device_map, test_xformers_attention_forwardGenerator_pass: off for
  `DDIMPipelineFastTests` upstream too (`test_layerwise_casting` and `test_group_offloading` default to False there),
  or need accelerate hooks on an accelerator, or xformers.
- test_save_load_dduf: diffusers 0.42 no longer loads DDUF files (`from_pretrained(dduf_file=...)` raises).
- PipelineLatentTesterMixin, PipelineKarrasSchedulerTesterMixin: for pipelines with a VAE and image inputs, or
  Karras schedulers; `DDIMPipelineFastTests` does not use them either.
- PipelinePushToHubTester: needs Hub staging credentials; our push is tested offline with recorded Hub calls
  (tests/test_hub.py).
"""

import contextlib
import inspect
import io
import json
import logging as std_logging
import os
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.utils import logging

from ddim_plus import DDIMInversionPipeline, DDIMPlusPipeline

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="float16, device moves and CPU offload need a CUDA device")


def to_np(tensor):
    return tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor


# --------------------------------------------------------------------------------------------------------------
# Harness (upstream: the child test classes' attributes and dummy components / inputs)
# --------------------------------------------------------------------------------------------------------------
def dummy_unet():
    """DDIMPipelineFastTests' UNet: two levels, the second with attention."""
    torch.manual_seed(0)
    return UNet2DModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


class GenerationConfig:
    pipeline_class = DDIMPlusPipeline
    params = frozenset(["batch_size"])  # upstream UNCONDITIONAL_IMAGE_GENERATION_PARAMS
    batch_params = frozenset()  # upstream UNCONDITIONAL_IMAGE_GENERATION_BATCH_PARAMS
    # upstream's required_optional_params, less `num_images_per_prompt` (as for DDIMPipeline)
    required_optional_params = frozenset(
        ["num_inference_steps", "generator", "latents", "output_type", "return_dict", "callback_on_step_end"]
    )

    @staticmethod
    def get_dummy_components():
        return {"unet": dummy_unet(), "scheduler": DDIMScheduler()}

    @staticmethod
    def get_dummy_inputs(device="cpu", seed=0):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {"batch_size": 1, "generator": generator, "num_inference_steps": 2, "output_type": "np"}

    @staticmethod
    def batched(inputs, batch_size, device="cpu"):
        generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch_size)]
        return {**inputs, "batch_size": batch_size, "generator": generators}


def dummy_images(batch_size, seed=0):
    return np.random.default_rng(seed).random((batch_size, 8, 8, 3), dtype=np.float32)


class InversionConfig:
    pipeline_class = DDIMInversionPipeline
    params = frozenset(["image"])
    batch_params = frozenset(["image"])
    required_optional_params = frozenset(["num_inference_steps", "output_type", "return_dict"])

    @staticmethod
    def get_dummy_components():
        return {"unet": dummy_unet(), "scheduler": DDIMScheduler()}

    @staticmethod
    def get_dummy_inputs(device="cpu", seed=0):
        return {
            "image": dummy_images(1, seed),
            "num_inference_steps": 2,
            "refine": False,  # plain DDIM inversion: one UNet call a step keeps the suite fast
            "return_reconstruction": True,
            "output_type": "np",
        }

    @staticmethod
    def batched(inputs, batch_size, device="cpu"):
        # image 0 of the batch is the single input; the others differ, so a mix-up between images shows
        images = np.concatenate([inputs["image"], dummy_images(batch_size - 1, seed=1)])
        return {**inputs, "image": images}


@pytest.fixture(params=[GenerationConfig, InversionConfig], ids=["DDIMPlusPipeline", "DDIMInversionPipeline"])
def config(request):
    return request.param


def make_pipe(config, device="cpu", **to_kwargs):
    pipe = config.pipeline_class(**config.get_dummy_components())
    pipe.to(device, **to_kwargs)
    pipe.set_progress_bar_config(disable=None)
    return pipe


@contextlib.contextmanager
def captured_log(name):
    """What the diffusers logger `name` writes at INFO and above (upstream: CaptureLogger)."""
    logger = logging.get_logger(name)
    stream = io.StringIO()
    handler = std_logging.StreamHandler(stream)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------------------
# PipelineTesterMixin
# --------------------------------------------------------------------------------------------------------------
def test_save_load_local(config, tmp_path, expected_max_difference=5e-4):
    pipe = make_pipe(config)
    output = pipe(**config.get_dummy_inputs())[0]
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    with captured_log("diffusers.pipelines.pipeline_utils") as log:
        pipe_loaded = config.pipeline_class.from_pretrained(tmp_path)
    for name in pipe_loaded.components:
        if name not in pipe_loaded._optional_components:
            assert name in log.getvalue()
    pipe_loaded.set_progress_bar_config(disable=None)
    output_loaded = pipe_loaded(**config.get_dummy_inputs())[0]
    assert np.abs(to_np(output) - to_np(output_loaded)).max() < expected_max_difference


def test_pipeline_call_signature(config):
    parameters = inspect.signature(config.pipeline_class.__call__).parameters
    optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    names = set(parameters) - {"self", "kwargs"}
    assert not config.params - names, f"Required parameters not present: {config.params - names}"
    missing = config.required_optional_params - optional
    assert not missing, f"Required optional parameters not present: {missing}"


def test_inference_batch_consistent(config, batch_sizes=(2,)):
    pipe = make_pipe(config)
    for batch_size in batch_sizes:
        output = pipe(**config.batched(config.get_dummy_inputs(), batch_size))
        assert len(output[0]) == batch_size


def test_inference_batch_single_identical(config, batch_size=3, expected_max_diff=1e-4):
    pipe = make_pipe(config)
    inputs = config.get_dummy_inputs()
    output = pipe(**inputs)
    output_batch = pipe(**config.batched(config.get_dummy_inputs(), batch_size))
    assert output_batch[0].shape[0] == batch_size
    assert np.abs(to_np(output_batch[0][0]) - to_np(output[0][0])).max() < expected_max_diff


def test_dict_tuple_outputs_equivalent(config, expected_max_difference=1e-4):
    pipe = make_pipe(config)
    output = pipe(**config.get_dummy_inputs())[0]
    output_tuple = pipe(**config.get_dummy_inputs(), return_dict=False)[0]
    assert np.abs(to_np(output) - to_np(output_tuple)).max() < expected_max_difference


def test_components_function(config):
    init_components = {k: v for k, v in config.get_dummy_components().items() if not isinstance(v, (str, int, float))}
    pipe = config.pipeline_class(**init_components)
    assert hasattr(pipe, "components") and set(pipe.components) == set(init_components)


def test_save_load_optional_components(config, tmp_path, expected_max_difference=1e-4):
    pipe = make_pipe(config)
    for optional_component in pipe._optional_components:
        setattr(pipe, optional_component, None)
    output = pipe(**config.get_dummy_inputs())[0]
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    pipe_loaded = config.pipeline_class.from_pretrained(tmp_path)
    pipe_loaded.set_progress_bar_config(disable=None)
    for optional_component in pipe._optional_components:
        assert getattr(pipe_loaded, optional_component) is None
    output_loaded = pipe_loaded(**config.get_dummy_inputs())[0]
    assert np.abs(to_np(output) - to_np(output_loaded)).max() < expected_max_difference


def test_to_dtype(config):
    components = config.get_dummy_components()
    pipe = config.pipeline_class(**components)
    pipe.set_progress_bar_config(disable=None)
    assert all(c.dtype == torch.float32 for c in components.values() if hasattr(c, "dtype"))
    pipe.to(dtype=torch.float16)
    assert all(c.dtype == torch.float16 for c in components.values() if hasattr(c, "dtype"))


def test_attention_slicing_forward_pass(config, expected_max_diff=1e-3):
    pipe = make_pipe(config)
    output_without_slicing = pipe(**config.get_dummy_inputs())[0]
    pipe.enable_attention_slicing(slice_size=1)
    output_with_slicing1 = pipe(**config.get_dummy_inputs())[0]
    pipe.enable_attention_slicing(slice_size=2)
    output_with_slicing2 = pipe(**config.get_dummy_inputs())[0]
    max_diff1 = np.abs(to_np(output_with_slicing1) - to_np(output_without_slicing)).max()
    max_diff2 = np.abs(to_np(output_with_slicing2) - to_np(output_without_slicing)).max()
    assert max(max_diff1, max_diff2) < expected_max_diff, "Attention slicing should not affect the inference results"


def test_progress_bar(config):
    pipe = config.pipeline_class(**config.get_dummy_components())
    inputs = config.get_dummy_inputs()
    with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
        pipe(**inputs)
        stderr = stderr.getvalue()
    # upstream cannot know the number of steps in advance, so it matches "5" in "#####| 1/5 [00:01<00:00]"
    max_steps = re.search("/(.*?) ", stderr).group(1)
    assert max_steps is not None and len(max_steps) > 0
    assert f"{max_steps}/{max_steps}" in stderr, "Progress bar should be enabled and stopped at the max step"
    pipe.set_progress_bar_config(disable=True)
    with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
        pipe(**config.get_dummy_inputs())
        assert stderr.getvalue() == "", "Progress bar should be disabled"


def test_callback_inputs():
    config = GenerationConfig
    pipe = make_pipe(config)
    assert hasattr(pipe, "_callback_tensor_inputs")

    def callback_inputs_subset(pipe, i, t, callback_kwargs):
        for tensor_name in callback_kwargs:
            assert tensor_name in pipe._callback_tensor_inputs
        return callback_kwargs

    def callback_inputs_all(pipe, i, t, callback_kwargs):
        for tensor_name in pipe._callback_tensor_inputs:
            assert tensor_name in callback_kwargs
        for tensor_name in callback_kwargs:
            assert tensor_name in pipe._callback_tensor_inputs
        return callback_kwargs

    inputs = config.get_dummy_inputs()
    inputs.update(callback_on_step_end=callback_inputs_subset, callback_on_step_end_tensor_inputs=["latents"])
    inputs["output_type"] = "latent"
    pipe(**inputs)
    inputs.update(
        callback_on_step_end=callback_inputs_all, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs
    )
    pipe(**inputs)

    def callback_inputs_change_tensor(pipe, i, t, callback_kwargs):
        if i == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    inputs["callback_on_step_end"] = callback_inputs_change_tensor
    output = pipe(**inputs)[0]
    assert output.abs().sum() == 0


def test_serialization_with_variants(config, tmp_path):
    pipe = config.pipeline_class(**config.get_dummy_components())
    model_components = [name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
    variant = "fp16"
    pipe.save_pretrained(tmp_path, variant=variant, safe_serialization=False)
    saved = json.loads((tmp_path / "model_index.json").read_text())
    for subfolder in os.listdir(tmp_path):
        if subfolder in model_components:
            folder_path = os.path.join(tmp_path, subfolder)
            assert os.path.isdir(folder_path) and subfolder in saved
            assert any(p.split(".")[1].startswith(variant) for p in os.listdir(folder_path))


def test_loading_with_variants(config, tmp_path):
    pipe = config.pipeline_class(**config.get_dummy_components())
    variant = "fp16"
    pipe.save_pretrained(tmp_path, variant=variant, safe_serialization=False)
    pipe_loaded = config.pipeline_class.from_pretrained(tmp_path, variant=variant)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for p1, p2 in zip(component.parameters(), pipe_loaded.components[name].parameters()):
                assert torch.equal(p1, p2)


def test_loading_with_incorrect_variants_raises_error(config, tmp_path):
    pipe = config.pipeline_class(**config.get_dummy_components())
    variant = "fp16"
    pipe.save_pretrained(tmp_path, safe_serialization=False)  # no variants
    with pytest.raises(ValueError) as error:
        config.pipeline_class.from_pretrained(tmp_path, variant=variant)
    assert f"You are trying to load the model files of the `variant={variant}`" in str(error.value)


def test_torch_dtype_dict(config, tmp_path):
    components = config.get_dummy_components()
    pipe = config.pipeline_class(**components)
    specified_key = next(iter(components.keys()))
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    torch_dtype_dict = {specified_key: torch.bfloat16, "default": torch.float16}
    loaded_pipe = config.pipeline_class.from_pretrained(tmp_path, torch_dtype=torch_dtype_dict)
    for name, component in loaded_pipe.components.items():
        if isinstance(component, torch.nn.Module) and hasattr(component, "dtype"):
            expected_dtype = torch_dtype_dict.get(name, torch_dtype_dict.get("default", torch.float32))
            assert component.dtype == expected_dtype, f"Component '{name}' has dtype {component.dtype}"


# --------------------------------------------------------------------------------------------------------------
# DDIMPipelineFastTests.test_inference
# --------------------------------------------------------------------------------------------------------------
def test_inference():
    """Upstream's expected slice was recorded on `DDIMPipeline`, whose default does not re-derive eps from the
    clipped x_0; ours does whenever the scheduler clips, so the comparison asks for the stock behaviour."""
    pipe = make_pipe(GenerationConfig)
    image = pipe(**GenerationConfig.get_dummy_inputs(), use_clipped_model_output=False).images
    image_slice = image[0, -3:, -3:, -1]
    assert image.shape == (1, 8, 8, 3)
    expected_slice = np.array([0.0, 9.979e-01, 0.0, 9.999e-01, 9.986e-01, 9.991e-01, 7.106e-04, 0.0, 0.0])
    assert np.abs(image_slice.flatten() - expected_slice).max() <= 1e-3


# --------------------------------------------------------------------------------------------------------------
# CUDA only (upstream: skipped without an accelerator)
# --------------------------------------------------------------------------------------------------------------
@requires_cuda
def test_float16_inference(config, expected_max_diff=5e-2):
    pipe = make_pipe(config, "cuda")
    pipe_fp16 = make_pipe(config, "cuda", dtype=torch.float16)
    inputs = config.get_dummy_inputs("cuda")
    fp16_inputs = config.get_dummy_inputs("cuda")
    if "image" in fp16_inputs:
        fp16_inputs["image"] = fp16_inputs["image"].astype(np.float16).astype(np.float32)
    output = pipe(**inputs)[0]
    output_fp16 = pipe_fp16(**fp16_inputs)[0]
    max_diff = np.abs(to_np(output) - to_np(output_fp16).astype(np.float32)).max()
    assert max_diff < expected_max_diff, "The outputs of the fp16 and fp32 pipelines are too different."


@requires_cuda
def test_save_load_float16(config, tmp_path, expected_max_diff=1e-2):
    components = {
        k: (v.to("cuda").half() if hasattr(v, "half") else v) for k, v in config.get_dummy_components().items()
    }
    pipe = config.pipeline_class(**components)
    pipe.set_progress_bar_config(disable=None)
    output = pipe(**config.get_dummy_inputs("cuda"))[0]
    pipe.save_pretrained(tmp_path)
    pipe_loaded = config.pipeline_class.from_pretrained(tmp_path, torch_dtype=torch.float16).to("cuda")
    pipe_loaded.set_progress_bar_config(disable=None)
    for name, component in pipe_loaded.components.items():
        if hasattr(component, "dtype"):
            assert component.dtype == torch.float16, f"`{name}.dtype` switched from `float16` to {component.dtype}"
    output_loaded = pipe_loaded(**config.get_dummy_inputs("cuda"))[0]
    assert np.abs(to_np(output).astype(np.float32) - to_np(output_loaded).astype(np.float32)).max() < expected_max_diff


@requires_cuda
def test_to_device(config):
    components = config.get_dummy_components()
    pipe = config.pipeline_class(**components)
    pipe.set_progress_bar_config(disable=None)
    pipe.to("cpu")
    assert all(c.device.type == "cpu" for c in components.values() if hasattr(c, "device"))
    output_cpu = pipe(**config.get_dummy_inputs("cpu"))[0]
    assert np.isnan(to_np(output_cpu)).sum() == 0
    pipe.to("cuda")
    assert all(c.device.type == "cuda" for c in components.values() if hasattr(c, "device"))
    output_cuda = pipe(**config.get_dummy_inputs("cuda"))[0]
    assert np.isnan(to_np(output_cuda)).sum() == 0


@requires_cuda
def test_model_cpu_offload_forward_pass(config, expected_max_diff=2e-4):
    pipe = make_pipe(config, "cuda")
    output_without_offload = pipe(**config.get_dummy_inputs("cpu"))[0]
    pipe = config.pipeline_class(**config.get_dummy_components())
    pipe.set_progress_bar_config(disable=None)
    pipe.enable_model_cpu_offload()
    output_with_offload = pipe(**config.get_dummy_inputs("cpu"))[0]
    max_diff = np.abs(to_np(output_with_offload) - to_np(output_without_offload)).max()
    assert max_diff < expected_max_diff, "CPU offloading should not affect the inference results"
    offloaded = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert all(c.device.type == "cpu" for c in offloaded), "CPU offloading should leave the components on the CPU"
