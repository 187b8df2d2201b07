"""Full-size parity and loading memory: SD 1.5 configuration, random weights, ours vs diffusers.

    .venv/bin/python benchmarks/parity_full.py [--out benchmarks/results/parity_full.json]

1. The same random SD 1.5 U-Net in both implementations: max abs difference of one call at
   64x64 latents (512x512 images), and the median time of that call in each, side by side.
2. The text encoder (CLIP ViT-L/14 text tower) against transformers, same weights.
3. Peak resident memory of `load_pipeline` on a full fp32 single-file checkpoint, measured in a
   fresh process, against the size of the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stablediff.loading import load_pipeline, save
from stablediff.presets import PRESETS
from stablediff.weights import convert


def touch_memory(gib: float = 8.0) -> None:
    """First-touch warm-up: a fresh VM runs ~2x slower until its memory has been touched."""
    buf = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32)
    buf.fill_(1.0)
    del buf


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def unet_parity(pipe, repeats: int) -> dict:
    from diffusers import UNet2DConditionModel

    cfg = pipe.spec.unet
    ref = UNet2DConditionModel(
        **{k: v for k, v in convert.unet_config_to_diffusers(cfg.to_dict()).items() if not k.startswith("_")},
        sample_size=64,
    ).eval()
    ref.load_state_dict(
        convert.unet_ours_to_diffusers(
            pipe.unet.state_dict(), cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels
        ),
        strict=True,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, 768, generator=g)
    ours_out, ref_out = pipe.unet(x, t, ctx), ref(x, t, ctx).sample  # also the warm-up calls
    # Alternate the two so that drift in machine speed affects both alike.
    ours_t, ref_t = [], []
    for _ in range(repeats):
        ours_t.append(median_time(lambda: pipe.unet(x, t, ctx), 1))
        ref_t.append(median_time(lambda: ref(x, t, ctx), 1))
    return {
        "max_abs_diff": (ours_out - ref_out).abs().max().item(),
        "ref_max_abs": ref_out.abs().max().item(),
        "ours_s": statistics.median(ours_t),
        "diffusers_s": statistics.median(ref_t),
        "speed_ratio_diffusers_over_ours": statistics.median(ref_t) / statistics.median(ours_t),
    }


@torch.no_grad()
def text_parity(pipe) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    t = pipe.spec.text
    ref = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.width * 4,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            hidden_act=t.activation,
        )
    ).eval()
    # transformers 5 names the text tower's modules exactly as we do (no `text_model.` prefix).
    ref.load_state_dict(pipe.text_encoder.state_dict(), strict=True)
    ids = torch.tensor(pipe.tokenizer(["a photograph of an astronaut riding a horse", "a red circle"]))
    return {"max_abs_diff": (ref(ids).last_hidden_state - pipe.text_encoder(ids)).abs().max().item()}


# Peak memory is read from VmHWM: ru_maxrss would include the parent's peak, inherited at fork.
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
LOAD_SNIPPET = f"""
import sys, time, torch
from stablediff.loading import load_pipeline
start = time.perf_counter()
pipe = load_pipeline(sys.argv[1])
elapsed = time.perf_counter() - start
after_load = {PEAK_RSS}
# safetensors maps the file: pages become resident when first read. Touch every weight once.
total = sum(float(t.float().sum()) for sd in pipe.state_dicts().values() for t in sd.values())
print(after_load, {PEAK_RSS}, elapsed)
"""


def loading_memory(pipe, folder: Path) -> dict:
    path = save(pipe, folder / "sd15-random.safetensors")
    size = path.stat().st_size
    base = subprocess.run(
        [sys.executable, "-c", f"import torch, stablediff.loading; print({PEAK_RSS})"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(path)], capture_output=True, text=True, check=True)
    after_load, after_touch, seconds = out.stdout.split()
    import_rss = int(base.stdout)
    return {
        "checkpoint_bytes": size,
        "import_rss_bytes": import_rss,
        "peak_rss_after_load_bytes": int(after_load),
        "peak_rss_after_touching_all_weights_bytes": int(after_touch),
        "peak_over_checkpoint": (int(after_touch) - import_rss) / size,
        "load_seconds": float(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/parity_full.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    touch_memory()
    pipe = load_pipeline("sd15", seed=0)
    assert pipe.spec == PRESETS["sd15"]
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "unet_64x64_latent": unet_parity(pipe, args.repeats),
        "text_encoder": text_parity(pipe),
    }
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        result["load_single_file_fp32"] = loading_memory(pipe, Path(tmp))
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
