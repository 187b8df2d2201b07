"""Tiled VAE passes: accuracy against the untiled pass, and peak memory against the estimates.

    .venv/bin/python benchmarks/vae_tiling.py accuracy [--size 1024]
    .venv/bin/python benchmarks/vae_tiling.py memory CASE [CASE ...]

`accuracy` decodes one latent of an SD-sized image with the real SD VAE configuration and random
weights, untiled and tiled (default tiles), and reports the largest difference, the 99.9th
percentile and the share of pixels within 2/255 (as 8-bit images), and the times; then the same
for encoding the decoded image. The latent is "structured": noise whose scale grows left to
right plus a bright blob, so that parts of the image have different statistics, as real images
do (with iid noise every tile sees the same statistics: the easy case).

`memory` runs each CASE in a fresh process and reports its peak RSS (ru_maxrss) beside the
estimate (`stablediff.tiling` for a VAE pass, `stablediff.memory` for a generation). A CASE is
`decode:SIZE:MODE`, `encode:SIZE:MODE` (MODE never or always) or `generate:SIZE` (SD 1.5
configuration, random weights, 2 steps with guidance, decode tiling auto).

Results go to benchmarks/results/vae_tiling_accuracy.json and vae_tiling_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


def _rss() -> int:
    """Resident bytes now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _vae():
    from stablediff.models.vae import AutoencoderKL
    from stablediff.nn import randomize_
    from stablediff.presets import PRESETS

    return randomize_(AutoencoderKL(PRESETS["sd15"].vae), torch.Generator().manual_seed(0)).eval()


def structured_latent(h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    blob = 1.5 * torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) * 4)
    return torch.randn(1, 4, h, w, generator=g) * (1 + 0.8 * xx) + blob


def _compare(tiled: torch.Tensor, ref: torch.Tensor) -> dict:
    """Differences in /255 units of the 8-bit images (values in [-1, 1] -> [0, 255])."""
    diff = (tiled.float() - ref.float()).abs().flatten() * 127.5
    pixels = lambda t: ((t.float().clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731 - as tensor_to_images
    eight_bit = (pixels(tiled) - pixels(ref)).abs()
    sample = diff[:: max(1, diff.numel() // 4_000_000)]  # quantile needs a bounded input
    return {
        "max_per255": round(diff.max().item(), 4),
        "p99.9_per255": round(torch.quantile(sample, 0.999).item(), 4),
        "within_2_of_255_pct": round((eight_bit <= 2).float().mean().item() * 100, 4),
    }


def accuracy(args: argparse.Namespace) -> dict:
    from stablediff.tiling import DEFAULT_TILE, decode_tiled, encode_tiled

    torch.set_num_threads(args.threads)
    vae = _vae()
    h = w = args.size // 8
    z = structured_latent(h, w)
    out: dict = {"size": args.size, "tile": DEFAULT_TILE, "latent": "structured"}
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = vae.decode(z)
        untiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        tiled = decode_tiled(vae, z)
        out["decode"] = {
            **_compare(tiled, ref),
            "untiled_s": round(untiled, 1),
            "tiled_s": round(time.perf_counter() - t0, 1),
            "saturated_pct": round((ref.abs() > 1).float().mean().item() * 100, 2),
        }
        print("decode:", out["decode"], flush=True)
        image = ref.clamp(-1, 1)  # an image of the size, with the structure of the latent
        t0 = time.perf_counter()
        ref_post = vae.encode(image)
        untiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        post = encode_tiled(vae, image)
        tiled_s = time.perf_counter() - t0
        d = (post.mean - ref_post.mean).abs()
        out["encode"] = {
            "mean_max_abs": d.max().item(),
            "mean_max_rel_to_largest": d.max().item() / ref_post.mean.abs().max().item(),
            "std_max_abs": (post.std - ref_post.std).abs().max().item(),
            "untiled_s": round(untiled, 1),
            "tiled_s": round(tiled_s, 1),
        }
        print("encode:", out["encode"], flush=True)
    return out


def one_case(case: str, threads: int) -> dict:
    """Runs in its own process: the peak RSS of one case and its estimate."""
    torch.set_num_threads(threads)
    kind, size, *rest = case.split(":")
    size = int(size)
    start = _rss()
    t0 = time.perf_counter()
    if kind == "generate":
        from stablediff.loading import load_pipeline
        from stablediff.memory import estimate_generation
        from stablediff.params import GenerationParams

        pipe = load_pipeline("sd15")
        params = GenerationParams("a photograph of a cat", width=size, height=size, steps=2, seed=0)
        estimate = estimate_generation(pipe.spec, params, available=None)
        weights = _rss() - start
        pipe.generate(params)
        result = {
            "estimate_bytes": estimate.peak,
            "estimate_stages": estimate.stages,
            "tiled_decode": pipe.uses_vae_tiling(size, size),
        }
    else:
        from stablediff.tiling import DEFAULT_TILE, decode_bytes, decode_tiled, encode_bytes, encode_tiled

        mode = rest[0]
        tile = DEFAULT_TILE if mode == "always" else None
        vae = _vae()
        weights = _rss() - start
        with torch.no_grad():
            if kind == "decode":
                z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
                base = _rss()
                _ = decode_tiled(vae, z) if tile else vae.decode(z)
                activations = decode_bytes(vae.config, size, size, 4, tile)
            else:
                x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
                base = _rss()
                _ = encode_tiled(vae, x) if tile else vae.encode(x)
                activations = encode_bytes(vae.config, size, size, 4, tile)
        result = {"estimate_bytes": weights + activations, "activations_estimate": activations, "inputs_rss": base}
    peak = _peak()
    return {
        "case": case,
        "rss_at_start": start,
        "weights_rss": weights,
        "peak_rss": peak,
        "peak_above_start": peak - start,
        "seconds": round(time.perf_counter() - t0, 1),
        **result,
    }


def memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "one", case, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            rows.append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{case}: peak RSS {row['peak_rss'] / GIB:.2f} GiB ({row['peak_above_start'] / GIB:.2f} above the "
            f"start), estimate {row['estimate_bytes'] / GIB:.2f} GiB, {row['seconds']} s",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--size", type=int, default=1024)
    mem = sub.add_parser("memory")
    mem.add_argument("cases", nargs="+")
    one = sub.add_parser("one")
    one.add_argument("case")
    for p in (acc, mem, one):
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(one_case(args.case, args.threads)))
        return
    machine = {
        "machine": platform.machine(),
        "cpus_used": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.command == "accuracy":
        result = {**machine, **accuracy(args)}
        name = f"vae_tiling_accuracy_{args.size}.json"
    else:
        result = {**machine, "cases": memory(args)}
        name = "vae_tiling_memory.json"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    if path.exists() and args.command == "memory":  # runs add cases
        old = {row["case"]: row for row in json.loads(path.read_text()).get("cases", [])}
        old.update({row["case"]: row for row in result["cases"]})
        result["cases"] = list(old.values())
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
