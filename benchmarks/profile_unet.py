"""Where one U-Net call spends its time: torch.profiler over ours and diffusers' on the same weights.

    .venv/bin/python benchmarks/profile_unet.py [bf16|fp32] [latent side, default 64]

The SD 1.5 configuration with random weights (N(0, 0.02)), a batch of two (one guided call, both
rows given explicitly), one timed warm-up round, then one profiled call of each; prints the largest
difference between the two outputs and each side's operators by self CPU time.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from stablediff.models.unet import UNetConfig, UNetModel
from stablediff.weights import convert


def main() -> None:
    from diffusers import UNet2DConditionModel

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
    side = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    torch.manual_seed(0)
    cfg = UNetConfig()
    ours = UNetModel(cfg).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.02)
    diffusers_cfg = {k: v for k, v in convert.unet_config_to_diffusers(cfg.to_dict()).items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**diffusers_cfg, sample_size=side).eval()
    sd = convert.unet_ours_to_diffusers(ours.state_dict(), cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels)
    ref.load_state_dict(sd)
    ours.to(dtype)
    ref.to(dtype)
    x = torch.randn(2, 4, side, side, dtype=dtype)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, dtype=dtype)
    runs = {"ours": lambda: ours(x, t, context), "diffusers": lambda: ref(x, t, encoder_hidden_states=context).sample}
    with torch.no_grad():
        outs = {who: fn() for who, fn in runs.items()}
        print("max |ours - diffusers|:", (outs["ours"].float() - outs["diffusers"].float()).abs().max().item())
        for who, fn in runs.items():
            start = time.perf_counter()
            fn()
            print(f"{who}: {time.perf_counter() - start:.3f} s")
        for who, fn in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"===== {who}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
