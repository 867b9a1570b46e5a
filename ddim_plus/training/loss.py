"""The diffusion loss of `ddim_plus.train`: keyed noise and timesteps, min-SNR weights, and the loss itself."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..ddim_math import PREDICTION_TYPES
from .data import keyed_seed


def step_generator(seed: int, step: int, process_index: int, device="cpu") -> torch.Generator:
    """The generator of one micro-batch's noise and timesteps on one process.

    Args:
        seed (`int`): the run's seed.
        step (`int`): index of the micro-batch since the start of training (counting every process's batches once).
        process_index (`int`): the process, so that processes draw different noise.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the generator draws.
    """
    return torch.Generator(device=device).manual_seed(keyed_seed(seed, step, process_index))


def sample_noise_and_timesteps(
    clean_images: torch.Tensor, num_train_timesteps: int, generator: torch.Generator, noise_offset: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (plus `noise_offset` times a per-channel constant, Guttenberg 2023) and uniform timesteps.

    Returns:
        `Tuple[torch.Tensor, torch.Tensor]`: noise shaped like `clean_images` and timesteps (B,) int64.
    """
    batch_size, num_channels = clean_images.shape[:2]
    device = clean_images.device
    noise = torch.randn(clean_images.shape, generator=generator, device=device, dtype=clean_images.dtype)
    if noise_offset:
        offset = torch.randn(
            (batch_size, num_channels, 1, 1), generator=generator, device=device, dtype=clean_images.dtype
        )
        noise = noise + noise_offset * offset
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
    return noise, timesteps


def min_snr_loss_weights(alphas_cumprod: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per timestep (Hang et al. 2023), for a loss measured on the network's output.

    With SNR_t = abar_t / (1 - abar_t), the weight is min(SNR_t, gamma) / SNR_t for epsilon prediction,
    min(SNR_t, gamma) / (SNR_t + 1) for v-prediction and min(SNR_t, gamma) for x_0 prediction: each is the
    x_0-space weight min(SNR_t, gamma) converted to the space the network predicts in. The epsilon weight is written
    min(1, gamma / SNR_t) so that zero-terminal-SNR schedules (SNR_T = 0) give 1, not 0/0.

    Args:
        alphas_cumprod (`torch.Tensor`): abar_t for every training timestep.
        snr_gamma (`float`): gamma > 0 (5 in the paper).
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"sample"`.

    Returns:
        `torch.Tensor`: float32 weights, one per training timestep.
    """
    if snr_gamma <= 0:
        raise ValueError(f"`snr_gamma` must be > 0, got {snr_gamma}; 5.0 is the paper's value.")
    abar = alphas_cumprod.to(torch.float64)
    snr = abar / (1.0 - abar)
    if prediction_type == "epsilon":
        weights = torch.clamp(snr_gamma / snr, max=1.0)
    elif prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1.0)
    elif prediction_type == "sample":
        weights = torch.clamp(snr, max=snr_gamma)
    else:
        raise ValueError(f"`prediction_type`={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}.")
    return weights.to(torch.float32)


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str = "epsilon",
    loss_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean squared error between the UNet's output at x_t = add_noise(x_0, noise, t) and its target.

    Args:
        unet (`torch.nn.Module`): a `UNet2DModel` (or anything called as `unet(x_t, t).sample`).
        noise_scheduler: gives `add_noise` and `get_velocity` (e.g. `DDIMSchedulerPlus`).
        clean_images (`torch.Tensor`): x_0, (B, C, H, W) in [-1, 1].
        noise (`torch.Tensor`): eps, same shape.
        timesteps (`torch.Tensor`): (B,) training timesteps.
        prediction_type (`str`, defaults to `"epsilon"`): target: eps, v = sqrt(abar) eps - sqrt(1 - abar) x_0, or x_0.
        loss_weights (`torch.Tensor`, *optional*): one weight per training timestep (e.g. `min_snr_loss_weights`);
            the unweighted mean when `None`.

    Returns:
        `torch.Tensor`: the scalar loss, float32.
    """
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    model_output = unet(noisy_images, timesteps).sample
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    elif prediction_type == "sample":
        target = clean_images
    else:
        raise ValueError(f"`prediction_type`={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}.")
    if loss_weights is None:
        return F.mse_loss(model_output.float(), target.float())
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * loss_weights.to(per_sample.device)[timesteps]).mean()
