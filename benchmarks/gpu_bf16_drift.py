"""Which bf16 result strays from fp32: ours or diffusers'? The SD 1.5 layout with random weights,
written once as a diffusers folder and loaded by both in fp32 and in bf16. One call of each network
(text encoder, U-Net at t = 999 and 500, VAE decoder) on the same inputs, as the relative error
against our fp32 output; then one 512x512 image of each (DPM++ 2M Karras, 20 steps, guidance 7.5,
seed 0) and the mean and largest pixel differences between them.

    python benchmarks/gpu_bf16_drift.py                          (on a CUDA GPU; docs/benchmarks.md)
    PRESET=tiny SIZE=64 .venv/bin/python benchmarks/gpu_bf16_drift.py      (a quick run on the CPU)
"""
import os
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch

from stablediff import GenerationParams, load_pipeline
from stablediff.loading import save

T0 = time.time()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET, SIZE = os.environ.get("PRESET", "sd15"), int(os.environ.get("SIZE", "512"))
PROMPT = "a photograph of an astronaut riding a horse"


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel(a, b):
    a, b = a.float(), b.float()
    return f"{((a - b).norm() / b.norm()).item():.4f}"


with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
    folder = save(load_pipeline(PRESET, seed=0), Path(tmp) / "model", layout="diffusers", dtype=torch.float32)
    pipes = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pipes["ours", name] = load_pipeline(folder, device=dev, dtype=dtype)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                                requires_safety_checker=False).to(dev)
        ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config, use_karras_sigmas=True)
        ref.set_progress_bar_config(disable=True)
        pipes["ref", name] = ref
log("loaded")
g = torch.Generator().manual_seed(0)
ids = pipes["ref", "fp32"].tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(dev)
x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g).to(dev)
t = torch.tensor([999.0, 500.0], device=dev)
out = {}
with torch.no_grad():
    context = pipes["ref", "fp32"].text_encoder(ids)[0]
    for who in ("ours", "ref"):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            p = pipes[who, name]
            text = p.text_encoder(ids)[0] if who == "ref" else p.text_encoder(ids)
            out[who, name, "text"] = text.float()
            ctx = context.to(dtype).expand(2, -1, -1)  # the same context for every U-Net
            if who == "ref":
                out[who, name, "unet"] = p.unet(x.to(dtype), t, encoder_hidden_states=ctx).sample.float()
                out[who, name, "vae"] = p.vae.decode(x[:1].to(dtype) / 0.18215).sample.float()
            else:
                out[who, name, "unet"] = p.unet(x.to(dtype), t, ctx).float()
                out[who, name, "vae"] = p.vae.decode(x[:1].to(dtype)).float()  # ours divides by the scale itself
for part in ("text", "unet", "vae"):
    base = out["ours", "fp32", part]
    log(f"{part}: rel. error vs ours fp32 -> ref fp32 {rel(out['ref', 'fp32', part], base)}, "
        f"ours bf16 {rel(out['ours', 'bf16', part], base)}, ref bf16 {rel(out['ref', 'bf16', part], base)}, "
        f"ours bf16 vs ref bf16 {rel(out['ours', 'bf16', part], out['ref', 'bf16', part])}")
images = {}
for name in ("fp32", "bf16"):
    images["ours", name] = np.asarray(pipes["ours", name].generate(GenerationParams(
        PROMPT, width=SIZE, height=SIZE, steps=20, sampler="dpmpp_2m", schedule="karras", guidance_scale=7.5,
        seed=0))[0], dtype=np.int16)
    images["ref", name] = np.asarray(pipes["ref", name](PROMPT, height=SIZE, width=SIZE, num_inference_steps=20,
                                     guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0],
                                     dtype=np.int16)
for a, b in ((("ours", "fp32"), ("ref", "fp32")), (("ours", "bf16"), ("ours", "fp32")),
             (("ref", "bf16"), ("ref", "fp32")), (("ours", "bf16"), ("ref", "bf16")),
             (("ref", "bf16"), ("ours", "fp32"))):
    d = np.abs(images[a] - images[b])
    log(f"image {'/'.join(a)} vs {'/'.join(b)}: mean {d.mean():.2f}, max {d.max()}")
log("done")
