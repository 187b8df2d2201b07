"""diffusers' scheduler_config.json <-> our ScheduleConfig and prediction type.

A model's noise schedule (the training betas) and the inference settings every sampler honours
(`steps_offset`, `set_alpha_to_one`, `timestep_spacing`) are read from the config a diffusers
folder ships, and written back as diffusers writes them: PNDM for SD 1.x/2.x, Euler for SDXL.
"""

from __future__ import annotations

import logging

from stablediff.diffusion.schedules import ScheduleConfig
from stablediff.limits import config_from_dict
from stablediff.weights.io import CheckpointError

logger = logging.getLogger(__name__)

# scheduler_config.json key -> ScheduleConfig field; a key the file lacks keeps our default.
_SCHEDULE_KEYS = {
    "num_train_timesteps": "num_train_timesteps",
    "beta_schedule": "beta_schedule",
    "beta_start": "beta_start",
    "beta_end": "beta_end",
    "rescale_betas_zero_snr": "rescale_zero_terminal_snr",
    "steps_offset": "steps_offset",
    "set_alpha_to_one": "set_alpha_to_one",
    "timestep_spacing": "timestep_spacing",
}
# diffusers' schedulers whose timestep_spacing defaults to "leading"; the others default to "linspace".
_LEADING_BY_DEFAULT = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler")
# Sampling preferences of a scheduler config that a model does not need: the sigma schedule is
# chosen per generation (GenerationParams.schedule, e.g. "karras"), so these are not honoured.
_SIGMA_PREFERENCES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def schedule_from_diffusers(sched: dict, where: object = "scheduler_config.json") -> ScheduleConfig:
    """The schedule of a ``scheduler_config.json``, checked like any config from a file
    (BadFileError naming ``where``): the training betas (``rescale_betas_zero_snr`` included) and
    the inference settings that every sampler honours, ``steps_offset``, ``set_alpha_to_one`` and
    ``timestep_spacing``. A key the file lacks keeps our default (SD's offset 1, no final alpha,
    and each sampler's own spacing).

    ``timestep_spacing`` is kept only when it differs from the default of the scheduler the file
    names (``_class_name``): diffusers writes every default, so SD folders it saved say "leading"
    for PNDM/DDIM without anyone choosing it, while SDXL base's "leading" Euler and SD-Turbo's
    "trailing" Euler are choices, honoured by every sampler as diffusers' ``from_config`` carries
    them over. Refused (CheckpointError): continuous timesteps (``timestep_type``), an explicit
    ``trained_betas`` table, and the EDM / flow-matching schedulers. Not honoured, with a warning:
    ``use_karras_sigmas`` and the other sigma-schedule flags (the schedule is a per-generation
    choice); silently ignored: the sampler-internal settings (``clip_sample``, ``thresholding``,
    ``interpolation_type``, ``final_sigmas_type``, ...), which our samplers fix to SD's values.
    """
    name = sched.get("_class_name")
    if isinstance(name, str) and name.startswith(("EDM", "FlowMatch")):
        raise CheckpointError(f"{where}: {name} is not supported (only discrete-time DDPM schedules)")
    if sched.get("timestep_type", "discrete") != "discrete":
        raise CheckpointError(
            f"{where}: timestep_type {sched['timestep_type']!r:.60} is not supported (only 'discrete')"
        )
    if sched.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: trained_betas (an explicit beta table) is not supported")
    values = {ours: sched[key] for key, ours in _SCHEDULE_KEYS.items() if key in sched}
    default_spacing = "leading" if name in _LEADING_BY_DEFAULT else "linspace"
    if values.get("timestep_spacing") == default_spacing:
        del values["timestep_spacing"]
    preferences = [key for key in _SIGMA_PREFERENCES if sched.get(key) is True]
    if preferences:
        logger.warning("%s: %s not honoured; pass schedule='karras' (or another) per generation", where, preferences)
    aliases = {ours: key for key, ours in _SCHEDULE_KEYS.items()}
    return config_from_dict(ScheduleConfig, values, str(where), aliases)


def prediction_type_from_diffusers(sched: dict, where: object) -> str:
    value = sched.get("prediction_type", "epsilon")
    if type(value) is not str:
        raise CheckpointError(f"{where}: prediction_type must be a string, got {value!r:.60}")
    return value


# The schedulers a written folder names: SD checkpoints ship PNDM, SDXL's Euler (both with the same
# keys, skip_prk_steps and set_alpha_to_one included, as the published configs have them).
WRITTEN_SCHEDULERS = ("PNDMScheduler", "EulerDiscreteScheduler")


def schedule_to_diffusers(schedule: ScheduleConfig, prediction_type: str, scheduler: str = "PNDMScheduler") -> dict:
    """A diffusers ``scheduler_config.json`` of class ``scheduler`` (one of WRITTEN_SCHEDULERS) for
    ``schedule``."""
    if scheduler not in WRITTEN_SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} not in {WRITTEN_SCHEDULERS}")
    config = {
        "_class_name": scheduler,
        "beta_schedule": schedule.beta_schedule,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": prediction_type,
        "set_alpha_to_one": schedule.set_alpha_to_one,
        "skip_prk_steps": True,
        "steps_offset": schedule.steps_offset,
        "clip_sample": False,
    }
    # Only a spacing the spec has: diffusers' from_config carries a written one over to every other
    # scheduler. (Read from this file alone, a spec's "leading" is PNDM's own default and comes back
    # as None, see schedule_from_diffusers; the spec stored in our weights keeps it. Euler's default
    # is "linspace", so SDXL's "leading" comes back from the file alone too.)
    if schedule.timestep_spacing is not None:
        config["timestep_spacing"] = schedule.timestep_spacing
    if schedule.rescale_zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
    return config
