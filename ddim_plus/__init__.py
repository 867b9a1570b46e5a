"""ddim_plus: DDIM (Song, Meng & Ermon, ICLR 2021) as a diffusers plugin.

Importing the package registers its classes on the ``diffusers`` module, so ``DiffusionPipeline.from_pretrained``
finds them by name.
"""

import diffusers

from . import ddim_math
from ._version import __version__
from .ddim_math import slerp
from .inversion import InversionRefinement, inversion_scheduler, invert, make_denoiser
from .pipeline_ddim_inversion import DDIMInversionPipeline, DDIMInversionPipelineOutput
from .pipeline_ddim_plus import DDIMPlusPipeline, DDIMPlusPipelineOutput
from .sampler_tuning import tune_sampler
from .scheduling_ddim_plus import DDIMSchedulerPlus, DDIMSchedulerPlusOutput
from .timestep_tuning import optimize_timesteps

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
for _class in (DDIMSchedulerPlus, DDIMPlusPipeline, DDIMInversionPipeline):
    if not hasattr(diffusers, _class.__name__):
        setattr(diffusers, _class.__name__, _class)
