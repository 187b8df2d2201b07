"""Pipeline overhead: the share of the sampling loop spent outside U-Net calls, ours vs diffusers.

    .venv/bin/python benchmarks/pipeline_overhead.py [--steps 20] [--repeats 5]

With the tiny model a U-Net call takes milliseconds, so everything else the loop does per step
(scalings, guidance, sampler arithmetic, timestep look-ups) shows up here as nowhere else.
Prompt encoding and VAE decoding are excluded: loop time = sampling time - prompt encoding.
Writes benchmarks/results/pipeline_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}


class UNetTimer:
    """Accumulates wall time spent inside a module's forward (hooks, no change to the module)."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0.0
        self.calls = 0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t0
        self.calls += 1


def measure_ours(pipe, sampler: str, steps: int, repeats: int) -> dict:
    from stablediff.params import GenerationParams

    timer = UNetTimer(pipe.unet)
    encode_time = []
    original = pipe.encode_prompt

    def timed_encode(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        encode_time.append(time.perf_counter() - t0)
        return out

    pipe.encode_prompt = timed_encode
    params = GenerationParams("a red circle above a blue square", width=64, height=64, steps=steps, sampler=sampler)
    shares, loops = [], []
    for i in range(repeats + 1):
        timer.total, encode_time[:] = 0.0, []
        t0 = time.perf_counter()
        pipe.sample_latents(params)
        loop = time.perf_counter() - t0 - sum(encode_time)
        if i:  # the first run is a warm-up
            shares.append((loop - timer.total) / loop)
            loops.append(loop)
    pipe.encode_prompt = original
    return {
        "overhead_share": statistics.median(shares),
        "loop_s": statistics.median(loops),
        "unet_calls_per_run": timer.calls // (repeats + 1),
    }


def measure_diffusers(folder: Path, scheduler: str, steps: int, repeats: int) -> dict:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    timer = UNetTimer(pipe.unet)
    prompt = "a red circle above a blue square"
    shares, loops = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            embeds = pipe.encode_prompt(prompt, "cpu", 1, True, "")
            timer.total = 0.0
            t0 = time.perf_counter()
            pipe(
                prompt_embeds=embeds[0],
                negative_prompt_embeds=embeds[1],
                height=64,
                width=64,
                num_inference_steps=steps,
                output_type="latent",
            )
            loop = time.perf_counter() - t0
            if i:
                shares.append((loop - timer.total) / loop)
                loops.append(loop)
    return {"overhead_share": statistics.median(shares), "loop_s": statistics.median(loops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/pipeline_overhead.json")
    args = parser.parse_args()

    import tempfile

    from stablediff.loading import load_pipeline, save

    torch.set_grad_enabled(False)
    pipe = load_pipeline("tiny", seed=0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save(pipe, Path(tmp) / "tiny", layout="diffusers")
        for sampler, scheduler in SAMPLERS.items():
            ours = measure_ours(pipe, sampler, args.steps, args.repeats)
            ref = measure_diffusers(folder, scheduler, args.steps, args.repeats)
            rows[sampler] = {"ours": ours, "diffusers": ref}
            print(
                f"{sampler:10s} ours: {ours['overhead_share']:6.1%} of a {ours['loop_s'] * 1e3:6.1f} ms loop   "
                f"diffusers: {ref['overhead_share']:6.1%} of a {ref['loop_s'] * 1e3:6.1f} ms loop"
            )
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "model": "tiny preset, 64x64, CFG 7.5",
        "steps": args.steps,
        "samplers": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
