"""What a GPU run relies on, checked on the CPU: sampling reads no tensor value on the host inside the loop,
`torch.compile(fullgraph=True)` takes the scheduler's step whole, a compiled UNet is not recompiled per step, and
half precision keeps the scheduler's arithmetic in float32.

A host read of a GPU tensor (`.item()`, `int()`, `bool()`, `nonzero`) is the dispatcher's `_local_scalar_dense` or
`nonzero`: a `TorchDispatchMode` records them on the CPU as it would on a GPU. A step on the `meta` device, which
holds no values, raises on any such read."""

import copy

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDIMScheduler
from diffusers.utils import logging
from torch.utils._python_dispatch import TorchDispatchMode

from ddim_plus import DDIMPlusPipeline, DDIMSchedulerPlus
from ddim_plus.ddim_math import PREDICTION_TYPES, TIMESTEP_SPACINGS

HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal")


class HostReads(TorchDispatchMode):
    """Records every operator that copies a tensor's value to the host, with the label set in `where`."""

    def __init__(self):
        super().__init__()
        self.where, self.reads = "outside", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in HOST_READS:
            self.reads.append((self.where, str(func)))
        return func(*args, **(kwargs or {}))


def _step_configs():
    """Every solver order x noise setting x x_0 post-processing (24 configurations), with the spacings and the
    prediction types taken in turn, so that each appears with both orders and several noise settings."""
    noises = ((0.0, "eta"), (0.5, "eta"), (1.0, "eta"), (0.0, "sigma_hat"))
    for i, (order, (eta, sigma_type), post) in enumerate(
        (order, noise, post) for order in (1, 2) for noise in noises for post in ("none", "clip", "threshold")
    ):
        yield (
            dict(
                ddim_solver_order=order,
                sigma_type=sigma_type,
                timestep_spacing=TIMESTEP_SPACINGS[i % len(TIMESTEP_SPACINGS)],
                clip_sample=post == "clip",
                thresholding=post == "threshold",
                prediction_type=PREDICTION_TYPES[i % len(PREDICTION_TYPES)],
            ),
            eta,
        )


def test_step_reads_no_device_tensor_on_the_host():
    # Timesteps and samples on `meta`, standing in for a GPU: off the CPU, and any read of a value raises. Four
    # steps reach the second-order steps of order 2.
    sample = torch.zeros(1, 1, 4, 4, device="meta")
    mode = HostReads()
    with mode:
        for config, eta in _step_configs():
            mode.where = "set-up"
            scheduler = DDIMSchedulerPlus(**config)
            scheduler.set_timesteps(20)
            for t in scheduler.timesteps.to("meta")[:4]:
                mode.where = "step"
                out = scheduler.step(sample, t, sample, eta=eta)
                assert out.prev_sample.shape == sample.shape
    assert [read for read in mode.reads if read[0] == "step"] == []


def test_device_timesteps_give_the_host_timesteps_results():
    # The device path (the coefficient row gathered by the tensor) against the host path (an int timestep), on a
    # CUDA-free stand-in: `torch.compile` traces the device path, and with `fullgraph=True` a graph break raises.
    # Orders 1 and 2, eta 0, 0.5, 1 and sigma-hat, every spacing, clipping and thresholding, every prediction type.
    configs = [
        dict(ddim_solver_order=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=True, eta=0.0),
        dict(ddim_solver_order=2, timestep_spacing="logsnr", prediction_type="v_prediction", thresholding=True, eta=1),
        dict(ddim_solver_order=1, timestep_spacing="trailing", prediction_type="sample", clip_sample=False, eta=0.5),
        dict(ddim_solver_order=2, timestep_spacing="quadratic", prediction_type="epsilon", clip_sample=False, eta=0),
        dict(
            ddim_solver_order=2, timestep_spacing="linspace", prediction_type="sample", sigma_type="sigma_hat", eta=0
        ),
    ]

    def schedulers():
        made = []
        for config in configs:
            config = dict(config)
            eta = config.pop("eta")
            made.append((DDIMSchedulerPlus(**config), eta))
            made[-1][0].set_timesteps(6)
        return made

    def sample_all(cases, x, as_int):
        outputs = []
        for scheduler, eta in cases:
            y = x
            for t in scheduler.timesteps[:2]:  # the second step of order 2 is second order
                y = scheduler.step(0.5 * y - 0.1, int(t) if as_int else t, y, eta=eta).prev_sample
            outputs.append(y)
        return outputs

    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the noise of eta > 0, drawn inside `step` from the global generator in both runs
    eager = sample_all(schedulers(), x, as_int=True)
    cases = schedulers()
    compiled = torch.compile(lambda x: sample_all(cases, x, as_int=False), fullgraph=True, backend="eager")
    torch.manual_seed(0)
    for got, expected in zip(compiled(x), eager):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _pipeline(unet, **scheduler_config):
    pipe = DDIMPlusPipeline(unet=unet, scheduler=DDIMSchedulerPlus(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("order, eta", [(1, 0.0), (2, 1.0)])
def test_pipeline_loop_reads_nothing_on_the_host(order, eta):
    pipe = _pipeline(make_tiny_unet(), ddim_solver_order=order, thresholding=True, timestep_spacing="logsnr")
    mode = HostReads()
    pipe.unet.register_forward_pre_hook(lambda *_: setattr(mode, "where", "loop"))

    def after_step(pipe, i, t, callback_kwargs):
        mode.where = "after the last step" if i == pipe.num_timesteps - 1 else "loop"
        return callback_kwargs

    with mode:
        pipe(batch_size=2, num_inference_steps=4, eta=eta, output_type="latent", callback_on_step_end=after_step)
    assert [read for read in mode.reads if read[0] == "loop"] == []


def test_compiled_unet_is_not_recompiled_per_step():
    # diffusers' recipe `pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")`: recompiles are decided by
    # dynamo's guards, the same with any backend, so the CPU-only "eager" backend shows them. The UNet gets the same
    # kind of timestep (a 0-d int64 tensor) at every step.
    pipe = _pipeline(make_tiny_unet(), ddim_solver_order=2)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe(batch_size=1, num_inference_steps=4, output_type="latent")
        pipe(batch_size=1, num_inference_steps=3, output_type="latent")  # another schedule: no recompile either


# --------------------------------------------------------------------------------------------------------------
# Half precision
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_half_precision_step_is_the_float32_step_rounded(dtype, prediction_type):
    # Stock DDIMScheduler in float32 on the same (half-precision) inputs, rounded once to `dtype`, is the reference:
    # within one unit in the last place of `dtype` (the two float32 results differ by float32 rounding, which can
    # flip the final rounding). Leading spacing, where stock steps between the same timesteps.
    config = dict(prediction_type=prediction_type, clip_sample=False)
    ours, stock = DDIMSchedulerPlus(**config), DDIMScheduler(**config)
    ours.set_timesteps(20)
    stock.set_timesteps(20)
    eps_of_dtype = torch.finfo(dtype).eps
    generator = torch.Generator().manual_seed(0)
    for eta in (0.0, 1.0):
        for t in ours.timesteps.tolist():
            sample, model_output, noise = (torch.randn(2, 3, 4, 4, generator=generator).to(dtype) for _ in range(3))
            out = ours.step(model_output, t, sample, eta=eta, variance_noise=noise)
            expected = stock.step(model_output.float(), t, sample.float(), eta=eta, variance_noise=noise.float())
            assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
            for got, want in ((out.prev_sample, expected.prev_sample), (out.pred_original_sample,
                                                                        expected.pred_original_sample)):  # fmt: skip
                torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=eps_of_dtype, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sampling_matches_float32(dtype):
    # The UNet and the latents in `dtype` (float16 works on the CPU too) against float32 from the same x_T. Each of
    # the S steps rounds the latents to `dtype` (relative eps / 2) and runs the UNet in it (a few eps / 2 on its
    # output); x_0 is clipped to [-1, 1], so the differences add up to at most about S * eps over the loop.
    logging.set_verbosity_error()  # the warning about casting a UNet with `.to()`
    unet = make_tiny_unet()
    with torch.no_grad():  # a milder random denoiser: at full scale it is chaotic and amplifies any rounding
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    steps = 5
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    for order in (1, 2):
        full = _pipeline(unet, ddim_solver_order=order, timestep_spacing="logsnr")
        half = _pipeline(copy.deepcopy(unet).to(dtype), ddim_solver_order=order, timestep_spacing="logsnr")
        expected = full(batch_size=1, latents=latents.float(), num_inference_steps=steps, output_type="latent").images
        got = half(batch_size=1, latents=latents, num_inference_steps=steps, output_type="latent").images
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=steps * torch.finfo(dtype).eps)
