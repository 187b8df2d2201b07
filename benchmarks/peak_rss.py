"""Peak resident memory of one generation per image size, each in a fresh process.

    .venv/bin/python benchmarks/peak_rss.py [--cases 512,512-diffusers,1024,2048-img2img]
        [--out benchmarks/results/peak_rss.json]

The SD 1.5 configuration with random weights (written once as a diffusers folder, loaded by each
process). A case is a size and a kind:

- ``512`` / ``1024``: txt2img with our pipeline; ``512-diffusers`` / ``1024-diffusers``: the same
  with diffusers' StableDiffusionPipeline. DPM++ 2M, guidance 7.5, 2 steps: the peak does not
  depend on the number of steps, and the time does not matter here.
- ``2048-img2img``: an upscale pass, a 2048x2048 image (a 512x512 txt2img image resized) through
  img2img at strength 0.1 with 10 steps (one denoising step), VAE tiling automatic.

Peak RSS is the kernel's high-water mark (VmHWM) of the process, so it includes the weights, the
libraries and the allocator's slack: what a user's machine must have free. ``--dtype`` applies to
every case (float32 by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from stablediff import load_pipeline
from stablediff.loading import save

CHILD = """
import json, sys, time
from pathlib import Path
import torch

folder, size, kind, dtype_name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
dtype = getattr(torch, dtype_name)
prompt = "a photograph of an astronaut riding a horse"

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

start = time.perf_counter()
if kind == "diffusers":
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = status("VmRSS:")
    pipe(prompt, height=size, width=size, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
else:
    from stablediff import GenerationParams, load_pipeline
    pipe = load_pipeline(folder, dtype=dtype)
    loaded = status("VmRSS:")
    params = GenerationParams(prompt, width=size, height=size, steps=2, sampler="dpmpp_2m", seed=0)
    if kind == "img2img":
        small = pipe.generate(GenerationParams(prompt, width=512, height=512, steps=2, sampler="dpmpp_2m", seed=0))[0]
        params = GenerationParams(
            prompt, width=size, height=size, steps=10, strength=0.1, sampler="dpmpp_2m", seed=0,
            init_image=small.resize((size, size)),
        )
    pipe.generate(params)
print(json.dumps({"peak_rss": status("VmHWM:"), "rss_after_load": loaded, "seconds": time.perf_counter() - start}))
"""


def run_case(folder: Path, case: str, dtype: str) -> dict:
    size, _, kind = case.partition("-")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), size, kind or "txt2img", dtype],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        return {"case": case, "error": out.stderr[-2000:], "seconds": time.perf_counter() - start}
    row = {"case": case, **json.loads(out.stdout.strip().splitlines()[-1])}
    print(
        f"{case}: peak RSS {row['peak_rss'] / 2**30:.2f} GiB (after loading {row['rss_after_load'] / 2**30:.2f} GiB), "
        f"{row['seconds']:.0f} s",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="512,512-diffusers,1024,2048-img2img")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--preset", default="sd15", help="tiny: a quick check of the script")
    parser.add_argument("--out", default="benchmarks/results/peak_rss.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        folder = save(load_pipeline(args.preset, seed=0), Path(tmp) / "model", layout="diffusers")
        rows = [run_case(folder, case, args.dtype) for case in args.cases.split(",")]
    for row in rows:
        if "error" in row:
            print(f"{row['case']} failed:\n{row['error']}", file=sys.stderr)
    result = {
        "benchmark": "peak_rss",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "preset": args.preset,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
