"""A diffusers folder's scheduler_config.json is honoured: timestep_spacing, steps_offset,
set_alpha_to_one and rescale_betas_zero_snr reach every sampler's plan, as diffusers' from_config
carries them over; what we cannot honour is refused by name."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from reference import build_reference, save_reference_folder
from safetensors.torch import load_file, save_file

from stablediff.diffusion import NoiseSchedule, sampling_plan
from stablediff.diffusion.schedules import ScheduleConfig
from stablediff.loading import _schedule_from_diffusers, _schedule_to_diffusers, load_pipeline, save
from stablediff.params import GenerationParams
from stablediff.weights.io import CheckpointError

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# SDXL base 1.0's scheduler/scheduler_config.json, as shipped.
SDXL_BASE = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD_TURBO = {**SDXL_BASE, "timestep_spacing": "trailing"}
NO_SPACING = {k: v for k, v in SDXL_BASE.items() if k != "timestep_spacing"}
CONFIGS = {"leading": SDXL_BASE, "trailing": SD_TURBO, "absent": NO_SPACING}


def _max(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("steps", [1, 4, 25, 50])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_euler_plan_matches_diffusers_from_config(name, steps):
    cfg = CONFIGS[name]
    schedule = _schedule_from_diffusers(cfg)
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    # float64 (the pipeline's default) differs from diffusers' float32 tables by about 1e-7 relative
    for precision, tol in (("float32", 1e-6), ("float64", 1e-6 * max(1.0, float(ref.sigmas.max())))):
        plan = sampling_plan("euler", NoiseSchedule(schedule, precision=precision), steps)
        diffs = _max(ref.sigmas, plan.sigmas), _max(ref.timesteps, plan.timesteps)
        print(f"{name} {steps} steps {precision}: sigmas {diffs[0]:.2e}, timesteps {diffs[1]:.2e}")
        assert max(diffs) <= tol
        assert abs(float(ref.init_noise_sigma) - plan.init_noise_sigma) <= tol
    if name == "absent":  # a key the file lacks: today's behaviour, Euler's own "linspace"
        assert schedule == ScheduleConfig() and plan.spacing == "linspace"


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler"])
def test_other_samplers_follow_the_folder_spacing(cls):
    """diffusers' from_config carries SD-Turbo's "trailing" to any scheduler; so does our plan."""
    sampler = {"DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc"}.get(cls, "heun")
    schedule = NoiseSchedule(_schedule_from_diffusers(SD_TURBO), precision="float32")
    for steps in (2, 7):
        ref = getattr(diffusers, cls).from_config(SD_TURBO)
        ref.set_timesteps(steps)
        plan = sampling_plan(sampler, schedule, steps)
        if sampler == "heun":  # Heun lists each sigma twice (its two stages)
            ref_sigmas, ref_t = torch.cat([ref.sigmas[:1], ref.sigmas[1::2]]), ref.timesteps[::2]
        else:
            ref_sigmas, ref_t = ref.sigmas, ref.timesteps
        assert _max(ref_sigmas, plan.sigmas) <= 1e-6 and _max(ref_t, plan.timesteps) <= 1e-6


def test_inference_settings_are_read_and_defaults_stay():
    zero_snr = {
        "_class_name": "DDIMScheduler",
        "beta_schedule": "scaled_linear",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "set_alpha_to_one": True,
    }
    assert _schedule_from_diffusers(zero_snr) == ScheduleConfig(
        rescale_zero_terminal_snr=True, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True
    )
    ref = diffusers.DDIMScheduler.from_config(zero_snr)
    ref.set_timesteps(10)
    assert (
        _max(ref.timesteps, sampling_plan("ddim", NoiseSchedule(_schedule_from_diffusers(zero_snr)), 10).timesteps) == 0
    )
    # a scheduler's own default spacing is not a choice: diffusers writes every default
    assert _schedule_from_diffusers({"_class_name": "PNDMScheduler", "timestep_spacing": "leading"}) == ScheduleConfig()
    assert _schedule_from_diffusers({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "linspace"}) == (
        ScheduleConfig()
    )
    assert _schedule_from_diffusers({"_class_name": "DDIMScheduler", "timestep_spacing": "linspace"}).timestep_spacing
    assert _schedule_from_diffusers({}) == ScheduleConfig()


def test_what_we_cannot_honour_is_refused_or_reported(caplog):
    with pytest.raises(CheckpointError, match="timestep_type 'continuous' is not supported"):
        _schedule_from_diffusers({**SDXL_BASE, "timestep_type": "continuous"}, "sched.json")
    with pytest.raises(CheckpointError, match="trained_betas"):
        _schedule_from_diffusers({**SDXL_BASE, "trained_betas": [0.1] * 1000})
    with pytest.raises(CheckpointError, match="EDMEulerScheduler is not supported"):
        _schedule_from_diffusers({"_class_name": "EDMEulerScheduler", "sigma_data": 0.5})
    with pytest.raises(ValueError, match=r"sched\.json: .*timestep spacing 'even'"):
        _schedule_from_diffusers({**SDXL_BASE, "timestep_spacing": "even"}, "sched.json")
    with pytest.raises(ValueError, match=r"rescale_zero_terminal_snr \(from rescale_betas_zero_snr\)"):
        _schedule_from_diffusers({"rescale_betas_zero_snr": "yes"})
    with caplog.at_level(logging.WARNING, logger="stablediff.loading"):
        assert _schedule_from_diffusers({**SDXL_BASE, "use_karras_sigmas": True}) == _schedule_from_diffusers(SDXL_BASE)
    assert "use_karras_sigmas" in caplog.text


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_written_folders_round_trip(tmp_path, spacing):
    pipe = load_pipeline("tiny")
    pipe.spec = dataclasses.replace(pipe.spec, schedule=ScheduleConfig(timestep_spacing=spacing))
    folder = save(pipe, tmp_path / "model", layout="diffusers")
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert written.get("timestep_spacing") == spacing  # written only when the spec has one
    assert _schedule_to_diffusers(pipe.spec.schedule, "epsilon") == written
    assert load_pipeline(folder).spec == pipe.spec  # our metadata: exact
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(unet_file), unet_file)  # the configs alone: PNDM's own "leading" reads as None
    assert load_pipeline(folder).spec.schedule.timestep_spacing == (None if spacing == "leading" else spacing)


def _compare(ours, reference: np.ndarray, what: str) -> None:
    diff = np.abs(np.asarray(ours).astype(np.int16) - (reference * 255).round().astype(np.int16)).max()
    print(f"{what}: max pixel difference {diff}/255")
    assert diff <= 1, what


@pytest.mark.parametrize("name", ["leading", "trailing"])
def test_images_match_diffusers_with_the_folder_scheduler(tmp_path, name):
    """The tiny SD1 reference model saved with SDXL base's (or SD-Turbo's) Euler scheduler config:
    our pipeline from the folder against diffusers' StableDiffusionPipeline with that scheduler."""
    from transformers import CLIPTokenizer

    unet, vae, text, tokenizer, _ = build_reference("sd1", seed=11)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(CONFIGS[name])
    folder = save_reference_folder(tmp_path / "model", unet, vae, text, tokenizer, scheduler)
    pipe = load_pipeline(folder)
    assert pipe.spec.schedule.timestep_spacing == name and pipe.spec.schedule.steps_offset == 1
    ref = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    prompt, negative = "a red circle above a blue square", "blurry"
    params = GenerationParams(
        prompt, negative_prompt=negative, width=64, height=64, steps=9, guidance_scale=7.5, sampler="euler", seed=5
    )
    with torch.no_grad():
        expected = ref(
            prompt,
            negative_prompt=negative,
            height=64,
            width=64,
            num_inference_steps=9,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images[0]
    _compare(pipe.generate(params)[0], expected, f"euler {name}")
