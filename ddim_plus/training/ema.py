"""The EMA of the UNet's weights, and the accelerate hooks that checkpoint the UNet and its EMA in diffusers format."""

import contextlib
import os


def create_ema_model(unet, max_decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 0.75):
    """diffusers' `EMAModel` of `unet` with the anchor trainer's warm-up (decay 1 - (1 + step / inv_gamma)^-power,
    capped at `max_decay`), using fused `foreach` updates."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    # train_unconditional's warm-up: the decay grows with the step count as 1 - (1 + step / inv_gamma) ** -power
    warmup = dict(use_ema_warmup=True, inv_gamma=inv_gamma, power=power)
    saved_as = dict(model_cls=UNet2DModel, model_config=unet.config)
    return EMAModel(unet.parameters(), decay=max_decay, foreach=True, **warmup, **saved_as)


def register_checkpoint_hooks(accelerator, ema_model=None) -> None:
    """Make `accelerator.save_state`/`load_state` store the UNet in `unet/` and the EMA in `unet_ema/`
    (diffusers format, safetensors), instead of accelerate's anonymous `model.safetensors`.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        ema_model (`diffusers.training_utils.EMAModel`, *optional*): the EMA to save and restore alongside.
    """
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    # `keep_torch_compile=False`: with `--torch_compile` the weights are saved and loaded without the compiled wrapper.
    def save_model_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                unet = accelerator.unwrap_model(model, keep_torch_compile=False)
                unet.save_pretrained(os.path.join(output_dir, "unet"))
            # Popped on every process so that accelerate does not save the same weights a second time (under
            # DeepSpeed and FSDP accelerate saves the model itself and passes no weights).
            if weights:
                weights.pop()
        if ema_model is not None and accelerator.is_main_process:
            ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            # Read directly rather than with `EMAModel.from_pretrained`, which passes the folder to `from_config` (a
            # diffusers FutureWarning) and warns twice that the EMA's settings in config.json are no UNet settings.
            ema_dir = os.path.join(input_dir, "unet_ema")
            state = UNet2DModel.load_config(ema_dir)
            weights = load_file(os.path.join(ema_dir, "diffusion_pytorch_model.safetensors"))
            names = [name for name, _ in UNet2DModel.from_config(ema_model.model_config).named_parameters()]
            state["shadow_params"] = [weights[name] for name in names]
            ema_model.load_state_dict(state)
            ema_model.to(accelerator.device)
        while models:
            model = accelerator.unwrap_model(models.pop(), keep_torch_compile=False)
            loaded = UNet2DModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


@contextlib.contextmanager
def ema_weights(model, ema_model=None):
    """Swap the EMA weights into `model` for the duration of the block, then put the raw weights back (training goes
    on with them). Without `ema_model` the block sees the raw weights.

    Args:
        model (`torch.nn.Module`): the (unwrapped) UNet being trained.
        ema_model (`diffusers.training_utils.EMAModel`, *optional*): its EMA.
    """
    if ema_model is None:
        yield model
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema_model.restore(model.parameters())
