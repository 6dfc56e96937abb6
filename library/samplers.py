"""sd-scripts sampler names → diffusers schedulers, plus the training noise scheduler.

All schedulers use the SD constants (SPEC 1.8): 1000 train timesteps, betas from 0.00085
to 0.012 on a "scaled_linear" schedule; `prediction_type="v_prediction"` with
`--v_parameterization`. Sampling schedulers that have a `clip_sample` option get it set
to True, as sd-scripts does.
"""
from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

from library.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
BETA_SCHEDULE = "scaled_linear"

# The argparse choices of sd-scripts' --sample_sampler / gen_img --sampler, in its order.
SAMPLER_NAMES = [
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
]

# diffusers class names, imported when a scheduler is made: the name checks (argparse, prompt
# files) run without importing diffusers
_SCHEDULER_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",  # accepted by get_sampler, though not an argparse choice (needs many steps)
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}


def _common_args(v_parameterization: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": BETA_SCHEDULE,
    }
    if v_parameterization:
        args["prediction_type"] = "v_prediction"
    return args


def check_sampler_name(name: str, source: str = "--sample_sampler / --sampler") -> str:
    """The lower-cased sampler name; UserError naming `source` if it is unknown."""
    key = name.lower()
    if key not in _SCHEDULER_CLASSES:
        raise UserError(f"unknown sampler '{name}' ({source}); valid: {', '.join(SAMPLER_NAMES)}")
    return key


def get_sampler(name: str, v_parameterization: bool = False) -> SchedulerMixin:
    """A fresh diffusers scheduler for an sd-scripts sampler name (case-insensitive)."""
    import diffusers

    key = check_sampler_name(name)
    scheduler_class = getattr(diffusers, _SCHEDULER_CLASSES[key])
    init_args = _common_args(v_parameterization)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    if key in ("dpmsolver", "dpmsolver++"):
        init_args["algorithm_type"] = key
        if key == "dpmsolver":
            # modern diffusers refuses the first-order "dpmsolver" with a final sigma of zero
            init_args["final_sigmas_type"] = "sigma_min"
    if key == "dpmsingle":
        # diffusers switches this on anyway (with a warning) for a final sigma of zero
        init_args["lower_order_final"] = True
    if "clip_sample" in accepted:
        init_args["clip_sample"] = True
    with warnings.catch_warnings():
        # "dpmsolver" is deprecated in diffusers but is a valid sd-scripts choice
        warnings.simplefilter("ignore", FutureWarning)
        return scheduler_class(**init_args)


def get_noise_scheduler(v_parameterization: bool = False) -> DDPMScheduler:
    """The DDPM scheduler used for adding noise in training (no sample clipping)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_common_args(v_parameterization), clip_sample=False)
