"""Which bf16 result strays from fp32: ours or diffusers'? The SD 1.5 layout with random weights,
written once as a diffusers folder and loaded by both in fp32 and in bf16. One call of each network
(text encoder, U-Net at t = 999 and 500, VAE decoder) on the same inputs, as the relative error
against our fp32 output; then one image of each (DPM++ 2M Karras, 20 steps, guidance 7.5, seed 0)
and the mean and largest pixel differences between them.

    python benchmarks/gpu_bf16_drift.py          (a CUDA GPU; docs/benchmarks.md, results/gpu_bf16_drift.log)
    .venv/bin/python benchmarks/gpu_bf16_drift.py --preset tiny --size 64 --device cpu     (a quick check)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from gpu_generate import PROMPT, load_both

from stablediff import GenerationParams, load_pipeline
from stablediff.loading import save

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def network_outputs(pipes: dict, size: int, device: torch.device) -> dict:
    """{(who, precision, network): output} for one call of each network on the same inputs."""
    ids = pipes["ref", "fp32"].tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids = ids.to(device)
    x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.tensor([999.0, 500.0], device=device)
    context = pipes["ref", "fp32"].text_encoder(ids)[0]  # the same context for every U-Net
    out = {}
    for (who, name), p in pipes.items():
        dtype, ctx = DTYPES[name], context.to(DTYPES[name]).expand(2, -1, -1)
        if who == "ref":
            out[who, name, "text"] = p.text_encoder(ids)[0]
            out[who, name, "unet"] = p.unet(x.to(dtype), t, encoder_hidden_states=ctx).sample
            out[who, name, "vae"] = p.vae.decode(x[:1].to(dtype) / p.vae.config.scaling_factor).sample
        else:
            out[who, name, "text"] = p.text_encoder(ids)
            out[who, name, "unet"] = p.unet(x.to(dtype), t, ctx)
            out[who, name, "vae"] = p.vae.decode(x[:1].to(dtype))  # ours divides by the scaling factor itself
    return out


def image(who: str, pipe, size: int) -> np.ndarray:
    if who == "ours":
        params = GenerationParams(
            PROMPT, width=size, height=size, steps=20, sampler="dpmpp_2m", schedule="karras", guidance_scale=7.5, seed=0
        )
        picture = pipe.generate(params)[0]
    else:
        picture = pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=20,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    return np.asarray(picture, dtype=np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        folder = save(load_pipeline(args.preset, seed=0), Path(tmp) / "model", layout="diffusers", dtype=torch.float32)
        pipes = {}
        for name, dtype in DTYPES.items():
            pipes["ours", name], pipes["ref", name] = load_both(folder, device, dtype)
    out = network_outputs(pipes, args.size, device)
    for part in ("text", "unet", "vae"):
        base = out["ours", "fp32", part]
        errors = {
            label: relative_error(out[key + (part,)], base)
            for label, key in (
                ("diffusers fp32", ("ref", "fp32")),
                ("ours bf16", ("ours", "bf16")),
                ("diffusers bf16", ("ref", "bf16")),
            )
        }
        print(
            f"{part}: relative error against our fp32 output: "
            + ", ".join(f"{label} {e:.4f}" for label, e in errors.items()),
            flush=True,
        )
    images = {key: image(key[0], pipe, args.size) for key, pipe in pipes.items()}
    for a, b in (
        (("ours", "fp32"), ("ref", "fp32")),
        (("ours", "bf16"), ("ours", "fp32")),
        (("ref", "bf16"), ("ref", "fp32")),
        (("ours", "bf16"), ("ref", "bf16")),
    ):
        d = np.abs(images[a] - images[b])
        print(f"image {'/'.join(a)} vs {'/'.join(b)}: mean {d.mean():.2f}/255, max {d.max()}", flush=True)


if __name__ == "__main__":
    main()
