"""Inference speed on the CPU, ours against diffusers on the same weights, side by side in one process.

    .venv/bin/python benchmarks/cpu_generate.py [--parts unet,vae,image] [--dtypes bfloat16,float32]
        [--repeats 3] [--out benchmarks/results/cpu_generate.json]
    .venv/bin/python benchmarks/cpu_generate.py --preset tiny --size 64 --out /tmp/x.json   # a quick check

The SD 1.5 configuration with random weights, written once as a diffusers folder and loaded by our
`load_pipeline` and by diffusers' `StableDiffusionPipeline`, each as its user gets it. Three parts:

- unet: one guided U-Net call at 512x512 (the unconditional and conditional predictions of one
  latent, combined with guidance 7.5): ours through the pipeline's guidance wrapper, diffusers as
  its pipeline does it (a batch of two, then the guidance arithmetic).
- vae: one VAE decode of a 64x64 latent to a 512x512 image.
- image: a whole 512x512 image, DPM++ 2M, 20 steps, guidance 7.5, prompt encoding and decoding
  included; the images of each precision are compared with our float32 image.

Calls alternate between the two after a warm-up of each; the median is reported. Run it on a quiet
machine (nothing else on the cores), after the first-touch warm-up this script does itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from stablediff import GenerationParams, load_pipeline
from stablediff.diffusion import CFGDenoiser, Denoiser
from stablediff.loading import save

PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def touch_memory(gib: float = 8.0) -> None:
    """A fresh VM runs about 2x slower until its memory has been touched once."""
    buf = torch.empty(int(gib * 2**30) // 4)
    buf.fill_(1.0)
    del buf


def alternate(runs: dict, repeats: int, warm: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each function, calls alternating; a warm-up call of each first, its time
    under "first call NAME" (a compiled U-Net compiles there)."""
    times: dict[str, list[float]] = {}
    if warm:
        for who, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[f"first call {who}"] = [time.perf_counter() - start]
    times |= {who: [] for who in runs}
    for _ in range(repeats):
        for who, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[who].append(time.perf_counter() - start)
    return times


def summary(part: str, dtype: str, times: dict[str, list[float]], **extra) -> dict:
    ours, ref = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    row = {"part": part, "dtype": dtype, "ours_s": ours, "diffusers_s": ref, "speedup": ref / ours, **extra}
    row["times"] = times
    print(f"{part} {dtype}: ours {ours:.2f} s, diffusers {ref:.2f} s, diffusers/ours {ref / ours:.3f}", flush=True)
    if "ours compiled" in times:
        compiled, first = statistics.median(times["ours compiled"]), times["first call ours compiled"][0]
        row |= {"compiled_s": compiled, "compiled_speedup": ref / compiled, "compiled_first_call_s": first}
        print(f"  compiled: {compiled:.2f} s, diffusers/compiled {ref / compiled:.3f}, first call {first:.1f} s")
    return row


def load_both(folder: Path, dtype: torch.dtype, without: set[str]):
    """Our pipeline (less the speed-ups named in ``without``) and diffusers', from one folder."""
    import diffusers

    ours = load_pipeline(folder, dtype=dtype)
    if "channels-last" in without:
        for net in (ours.unet, ours.vae):
            net.to(memory_format=torch.contiguous_format)
    if "shared-input" in without:
        ours.unet.shares_input_rows = False
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


@torch.no_grad()
def unet_calls(ours, ref, size: int, dtype: torch.dtype, repeats: int, compiled=None) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    side = size // 8
    x = torch.randn(1, 4, side, side, generator=g)
    cond = torch.randn(1, 77, ours.spec.unet.context_dim, generator=g)
    uncond = torch.randn(1, 77, ours.spec.unet.context_dim, generator=g)
    schedule = ours.noise_schedule()
    sigma = torch.tensor([5.0])
    guided, fast = (
        CFGDenoiser(Denoiser(p.unet, schedule, net_dtype=dtype), 7.5) if p else None for p in (ours, compiled)
    )
    t = schedule.sigma_to_t(sigma)
    scale = 1 / (sigma**2 + 1) ** 0.5

    def run_ours():
        return guided(x, sigma, context=cond, uncond_context=uncond)

    def run_ref():
        both = torch.cat([uncond, cond]).to(dtype)
        out = ref.unet(torch.cat([x * scale, x * scale]).to(dtype), t, encoder_hidden_states=both).sample
        out_uncond, out_cond = out.float().chunk(2)
        return out_uncond + 7.5 * (out_cond - out_uncond)

    runs = {"ours": run_ours, "diffusers": run_ref}
    if fast:
        runs["ours compiled"] = lambda: fast(x, sigma, context=cond, uncond_context=uncond)
    return alternate(runs, repeats)


@torch.no_grad()
def vae_decodes(ours, ref, size: int, dtype: torch.dtype, repeats: int) -> dict[str, list[float]]:
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    runs = {
        "ours": lambda: ours.vae.decode(z.to(dtype)),
        "diffusers": lambda: ref.vae.decode(z.to(dtype) / ref.vae.config.scaling_factor).sample,
    }
    return alternate(runs, repeats)


def images(ours, ref, size: int, steps: int, repeats: int, compiled=None):
    params = GenerationParams(
        PROMPT, width=size, height=size, steps=steps, sampler="dpmpp_2m", guidance_scale=7.5, seed=0
    )
    out: dict[str, list] = {}

    def run_ours():
        out["ours"] = ours.generate(params)[0]

    def run_ref():
        generator = torch.Generator().manual_seed(0)
        out["diffusers"] = ref(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, generator=generator
        ).images[0]

    # Warm-up: a 2-step image of each (kernels set up, weights paged in), cheaper than a whole one.
    ours.generate(replace(params, steps=2))
    ref(PROMPT, height=size, width=size, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    runs = {"ours": run_ours, "diffusers": run_ref}
    first = {}
    if compiled:
        start = time.perf_counter()
        compiled.generate(replace(params, steps=2))  # compiles
        first["first call ours compiled"] = [time.perf_counter() - start]
        runs["ours compiled"] = lambda: out.__setitem__("ours compiled", compiled.generate(params)[0])
    return first | alternate(runs, repeats, warm=False), out


def pixel_distance(a, b) -> dict:
    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return {"max": int(d.max()), "mean": float(d.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--parts", default="unet,vae,image")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each (U-Net, VAE)")
    parser.add_argument("--image-repeats", type=int, default=1, help="timed whole images of each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--without", default="", help="ours without: channels-last,shared-input (to measure each)")
    parser.add_argument("--compile", action="store_true", help="also our pipeline with a compiled U-Net")
    parser.add_argument("--out", default="benchmarks/results/cpu_generate.json")
    args = parser.parse_args()
    import diffusers

    torch.set_num_threads(args.threads)
    touch_memory()
    parts, rows, pictures = args.parts.split(","), [], {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        folder = save(load_pipeline(args.preset, seed=0), Path(tmp) / "model", layout="diffusers")
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            ours, ref = load_both(folder, dtype, set(filter(None, args.without.split(","))))
            compiled = load_pipeline(folder, dtype=dtype).compile() if args.compile else None
            if "unet" in parts:
                times = unet_calls(ours, ref, args.size, dtype, args.repeats, compiled)
                rows.append(summary("unet", name, times))
            if "vae" in parts:
                rows.append(summary("vae", name, vae_decodes(ours, ref, args.size, dtype, args.repeats)))
            if "image" in parts:
                times, pictures[name] = images(ours, ref, args.size, args.steps, args.image_repeats, compiled)
                rows.append(summary("image", name, times))
            del ours, ref, compiled
    if "float32" in pictures:  # every image against our float32 image
        reference = pictures["float32"]["ours"]
        for row in rows:
            if row["part"] == "image":
                row["pixels_vs_ours_float32"] = {
                    who: pixel_distance(img, reference) for who, img in pictures[row["dtype"]].items()
                }
                print(f"image {row['dtype']}: pixels against our float32 image {row['pixels_vs_ours_float32']}")
    result = {
        "benchmark": "cpu_generate",
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "ours_without": args.without,
        "compiled": args.compile,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
