"""ddim_plus: DDIM (Song, Meng & Ermon, ICLR 2021) as a diffusers plugin.

Importing the package registers its classes on the ``diffusers`` module, so ``DiffusionPipeline.from_pretrained``
finds them by name.
"""

import diffusers

from . import ddim_math
from .ddim_math import slerp
from .inversion import InversionRefinement, inversion_scheduler, invert, make_denoiser
from .pipeline_ddim_inversion import DDIMInversionPipeline, DDIMInversionPipelineOutput
from .pipeline_ddim_plus import DDIMPlusPipeline, DDIMPlusPipelineOutput
from .sampler_tuning import tune_sampler
from .scheduling_ddim_plus import DDIMSchedulerPlus, DDIMSchedulerPlusOutput
from .timestep_tuning import optimize_timesteps

__version__ = "0.1.0"

__all__ = [
    "DDIMSchedulerPlus",
    "DDIMPlusPipeline",
    "DDIMInversionPipeline",
    "DDIMSchedulerPlusOutput",
    "DDIMPlusPipelineOutput",
    "DDIMInversionPipelineOutput",
    "slerp",
    "optimize_timesteps",
    "tune_sampler",
    "invert",
    "InversionRefinement",
    "inversion_scheduler",
    "make_denoiser",
    "ddim_math",
    "__version__",
]

# `DiffusionPipeline.from_pretrained` and `from_config` look classes up as attributes of `diffusers`.
for _name in __all__[:3]:
    if not hasattr(diffusers, _name):
        setattr(diffusers, _name, globals()[_name])
