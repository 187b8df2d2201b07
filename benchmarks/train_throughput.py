"""U-Net training throughput: images/s of one optimizer step, ours vs diffusers' UNet2DConditionModel.

    .venv/bin/python benchmarks/train_throughput.py [--rounds 3] [--steps 1] [--threads N] [--quick]
    python benchmarks/train_throughput.py --device cuda --steps 20 --out benchmarks/results/train_throughput_cuda.json

The same configuration in both (ours -> diffusers with `unet_config_to_diffusers`, the same
weights through `unet_ours_to_diffusers`), the same loop (AdamW, MSE against a fixed target, the
same batch, timesteps and text context), in float32 and under bf16 autocast. After a warm-up of
each, rounds alternate ours / diffusers so that drift in machine speed affects both alike; the
median over rounds is reported. Configurations:

- shapes-small: the bundled model's training size (16x16x4 latents, 128-wide context), batch 16;
- sd15-128: the SD 1.5 channel layout at model_channels 128 (instead of 320; ~142M parameters),
  32x32 latents, 768-wide context, batch 4.
On a GPU (`--device cuda`) the batches are 8x larger and every timed round ends with a synchronize.
`--compile` runs both models through `torch.compile` (inductor; on a CPU it needs a C++ compiler)
and writes train_throughput_compiled.json instead.

Takes about 3-4 minutes on 2 CPU cores (bf16 autocast is the slow half on CPUs without native
bf16). `--quick` runs the tiny preset's U-Net for one round: a check that the script works, which
writes no file unless `--out` is given. Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from stablediff.models.unet import UNetConfig, UNetModel
from stablediff.presets import PRESETS
from stablediff.train.stages.unet import UNET_SIZES
from stablediff.weights import convert

CONFIGS: dict[str, tuple[UNetConfig, int, int]] = {  # name -> (config, latent side, batch)
    "shapes-small": (UNET_SIZES["shapes-small"], 16, 16),
    "sd15-128": (dataclasses.replace(PRESETS["sd15"].unet, model_channels=128), 32, 4),
}
QUICK = {"tiny": (PRESETS["tiny"].unet, 16, 4)}


def build_pair(cfg: UNetConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our U-Net and diffusers' with the same weights, both in train mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ours = UNetModel(cfg)
    for p in ours.parameters():  # no zero-initialised output layer: gradients flow everywhere
        p.data.normal_(0, 0.02)
    kwargs = {k: v for k, v in convert.unet_config_to_diffusers(cfg.to_dict()).items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**kwargs)
    ref.load_state_dict(
        convert.unet_ours_to_diffusers(ours.state_dict(), cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels),
        strict=True,
    )
    return ours.train(), ref.train()


GPU_BATCH_FACTOR = 8


def make_step(model: torch.nn.Module, is_ref: bool, batch: dict, bf16: bool):
    """One training step of `model` on `batch`, as a closure."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(batch["x"].device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            out = model(batch["x"], batch["t"], batch["context"])
            out = out.sample if is_ref else out
            loss = torch.nn.functional.mse_loss(out.float(), batch["target"])
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def timed(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)  # waits for the device
    return (time.perf_counter() - start) / steps


def bench(
    name: str, cfg: UNetConfig, side: int, batch_size: int, rounds: int, steps: int, device: torch.device, compile: bool
) -> list[dict]:
    ours, ref = (m.to(device) for m in build_pair(cfg))
    if compile:  # the compiled wrappers share the parameters, so the optimizers are unchanged
        ours, ref = torch.compile(ours), torch.compile(ref)
    g = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.randn(batch_size, cfg.in_channels, side, side, generator=g),
        "t": torch.randint(0, 1000, (batch_size,), generator=g).float(),
        "context": torch.randn(batch_size, 77, cfg.context_dim, generator=g),
        "target": torch.randn(batch_size, cfg.out_channels, side, side, generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():  # same weights, same numbers: the comparison is of the same computation
        reference = ref(batch["x"], batch["t"], batch["context"]).sample
        diff = ours(batch["x"], batch["t"], batch["context"]) - reference
    rows = []
    for bf16 in (False, True):
        pair = {"ours": make_step(ours, False, batch, bf16), "diffusers": make_step(ref, True, batch, bf16)}
        for step in pair.values():  # warm-up: allocator, kernels, optimizer state
            step()
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(rounds):
            for who, step in pair.items():
                times[who].append(timed(step, steps, device))
        ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        rows.append(
            {
                "config": name,
                "precision": "bf16-autocast" if bf16 else "fp32",
                "compiled": compile,
                "batch": batch_size,
                "latent": side,
                "params_m": sum(p.numel() for p in ours.parameters()) / 1e6,
                "ours_images_per_s": batch_size / ours_s,
                "diffusers_images_per_s": batch_size / ref_s,
                "ours_over_diffusers": ref_s / ours_s,
                "forward_max_abs_diff": float(diff.abs().max()),
                "forward_max_abs": float(reference.abs().max()),
                "ours_step_s": times["ours"],
                "diffusers_step_s": times["diffusers"],
            }
        )
        row = rows[-1]
        print(
            f"{name:13s} {row['precision']:14s} ours {row['ours_images_per_s']:8.2f} img/s   "
            f"diffusers {row['diffusers_images_per_s']:8.2f} img/s   ratio {row['ours_over_diffusers']:.3f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per precision")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per timed round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny U-Net, one round: checks that the script runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU batches are 8x the CPU ones)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    factor = GPU_BATCH_FACTOR if device.type == "cuda" else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    chosen = {name: CONFIGS[name] for name in args.configs.split(",")}
    configs, rounds, steps = (QUICK, 1, 1) if args.quick else (chosen, args.rounds, args.steps)
    start = time.perf_counter()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    rows = [
        row
        for name, (cfg, side, batch) in configs.items()
        for row in bench(name, cfg, side, batch * factor, rounds, steps, device, args.compile)
    ]
    import diffusers

    result = {
        "benchmark": "train_throughput",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": where,
        "python": platform.python_version(),
        "rounds": rounds,
        "steps_per_round": steps,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    if args.quick and not args.out:
        return
    default = "train_throughput_compiled.json" if args.compile else "train_throughput.json"
    out = Path(args.out or Path(__file__).parent / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
