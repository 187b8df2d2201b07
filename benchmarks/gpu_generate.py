"""Text-to-image on a GPU: our pipeline against diffusers' StableDiffusionPipeline, same weights.

    python benchmarks/gpu_generate.py [--repeats 3] [--out benchmarks/results/gpu_generate.json]
    .venv/bin/python benchmarks/gpu_generate.py --preset tiny --size 64 --device cpu --dtype float32 --out /tmp/x.json

The SD 1.5 configuration with random weights (no real weights can be downloaded here), written once
as a diffusers folder and loaded by both; bf16 by default (random weights overflow fp16's range).
DPM++ 2M with Karras sigmas, 20 steps, guidance 7.5, one prompt; image k of a batch uses seed + k
in both (diffusers gets one generator per image). Reports the median seconds per call for batches
of 1 and 4 (rounds alternate ours / diffusers after a warm-up of each), the peak device memory of
a call, and the largest pixel difference between the two implementations' images.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stablediff import GenerationParams, load_pipeline
from stablediff.loading import save

PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(fn, device: torch.device) -> tuple[float, int, list]:
    """(seconds, peak device bytes or 0, result) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    images = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0, images


def load_both(folder: Path, device: torch.device, dtype: torch.dtype):
    """Our pipeline and diffusers' StableDiffusionPipeline (DPM++ 2M, Karras sigmas) from one diffusers folder."""
    import diffusers

    ours = load_pipeline(folder, device=device, dtype=dtype)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config, use_karras_sigmas=True)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/gpu_generate.json")
    args = parser.parse_args()
    import diffusers

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        folder = save(load_pipeline(args.preset, seed=0), Path(tmp) / "model", layout="diffusers", dtype=dtype)
        ours, ref = load_both(folder, device, dtype)
    setup_s = time.perf_counter() - t0

    def run_ours(batch: int):
        params = GenerationParams(
            PROMPT,
            width=args.size,
            height=args.size,
            steps=20,
            sampler="dpmpp_2m",
            schedule="karras",
            guidance_scale=7.5,
            seed=0,
            batch_size=batch,
        )
        return ours.generate(params)

    def run_ref(batch: int):
        generators = [torch.Generator().manual_seed(k) for k in range(batch)]
        return ref(
            PROMPT,
            height=args.size,
            width=args.size,
            num_inference_steps=20,
            guidance_scale=7.5,
            generator=generators,
            num_images_per_prompt=batch,
        ).images

    rows = []
    for batch in (1, 4):
        runs = {"ours": lambda b=batch: run_ours(b), "diffusers": lambda b=batch: run_ref(b)}
        first = {who: measured(fn, device) for who, fn in runs.items()}  # warm-up, and the images compared
        times: dict[str, list[float]] = {who: [] for who in runs}
        for _ in range(args.repeats):
            for who, fn in runs.items():
                times[who].append(measured(fn, device)[0])
        pixels = [
            np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)
            for a, b in zip(first["ours"][2], first["diffusers"][2], strict=True)
        ]
        row = {
            "batch": batch,
            "ours_s": statistics.median(times["ours"]),
            "diffusers_s": statistics.median(times["diffusers"]),
            "ours_peak_bytes": first["ours"][1],
            "diffusers_peak_bytes": first["diffusers"][1],
            "max_pixel_diff": int(max(int(np.abs(p).max()) for p in pixels)),
            "mean_pixel_diff": float(np.mean([np.abs(p).mean() for p in pixels])),
            "ours_times": times["ours"],
            "diffusers_times": times["diffusers"],
        }
        row["diffusers_over_ours"] = row["diffusers_s"] / row["ours_s"]
        rows.append(row)
        print(
            f"batch {batch}: ours {row['ours_s']:.3f} s, diffusers {row['diffusers_s']:.3f} s "
            f"(ratio {row['diffusers_over_ours']:.3f}); peak {row['ours_peak_bytes'] / 2**30:.2f} / "
            f"{row['diffusers_peak_bytes'] / 2**30:.2f} GiB; max pixel diff {row['max_pixel_diff']}, "
            f"mean {row['mean_pixel_diff']:.3f}",
            flush=True,
        )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "benchmark": "gpu_generate",
        "device": where,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "preset": args.preset,
        "size": args.size,
        "dtype": args.dtype,
        "steps": 20,
        "sampler": "dpmpp_2m karras",
        "guidance": 7.5,
        "repeats": args.repeats,
        "setup_s": setup_s,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
