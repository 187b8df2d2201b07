"""Full-size SDXL base parity, speed and loading memory: random weights, ours vs diffusers / transformers.

    .venv/bin/python benchmarks/sdxl_full.py [--dtypes bfloat16,float32] [--repeats 3] [--file-dtype float16]
        [--parts unet,text,loading] [--out benchmarks/results/sdxl_full.json]
    .venv/bin/python benchmarks/sdxl_full.py --preset tiny-sdxl --out /tmp/sdxl_tiny.json  # seconds: a check

1. The U-Net: our `UNetModel` with random weights (the `sdxl` preset's U-Net, seed 0) and diffusers'
   `UNet2DConditionModel` built on the meta device and given the *same tensors* (renamed by
   `convert.unet_ours_to_diffusers`, loaded with ``assign=True``), so one copy of the weights serves
   both. One guided call: a 128x128 latent (1024x1024 image) shared by the uncond and cond rows,
   batch 2, contexts [2, 77, 2048], `y` = `micro_conditioning(pooled, time_ids)` for ours and
   ``added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}`` for diffusers (original size,
   crop (0, 0), target size). Reported: the max abs difference in float32, then for each of
   ``--dtypes`` the median time of one call of each side by side (alternating, after a warm-up
   call, ``--repeats`` rounds) and, in bfloat16, each side's distance from the float32 output. The
   weights are cast in place between dtypes (float32 first), never held twice.
2. The text encoders: CLIP ViT-L (transformers' `CLIPTextModel`) and OpenCLIP bigG
   (`CLIPTextModelWithProjection`) with random weights shared the same way: max abs difference (fp32)
   of the penultimate hidden state (SDXL's context, without the final layer norm), the pooled output
   and bigG's projected pooled output (`text_embeds`), for two prompts.
3. Loading memory: ``save(load_pipeline(preset, dtype=file_dtype, seed=0), path, dtype=file_dtype)``
   as a single file and as a diffusers folder; then, in a fresh process for each,
   ``load_pipeline(path, dtype=None)`` (the stored dtype), measuring the peak resident memory (VmHWM,
   reset after the imports) minus the resident memory before loading, against the weights' size on
   disk, once loaded and again after every weight has been read (safetensors files are mapped: pages
   become resident when first read). Target: at most 1.1x.

Each part also reports the peak resident memory of this process while it ran (VmHWM, reset at the
start of the part; the imports are included): what the machine must have free. Before starting, the
script prints its estimate of that peak from the parameter counts and, unless ``--force``, refuses
to run when the machine has less memory available (MemAvailable). For the SDXL base (2.57 B U-Net
parameters, 3.5 B in all) the largest peak is about 15 GB, in part 3: `load_pipeline("sdxl",
dtype=float16)` builds every network in float32 (13.9 GB) before casting it; part 1 needs 12-13 GB
(10.3 GB of float32 U-Net weights, the activations of one call), part 2 about 4 GB (bigG's 2.8 GB).

Figures are printed as they are measured; the JSON goes to ``--out`` (by default
benchmarks/results/sdxl_full.json for the `sdxl` preset, sdxl_full_<preset>.json for another).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stablediff.loading import load_pipeline, save
from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetModel, micro_conditioning, sdxl_time_ids
from stablediff.nn import randomize_
from stablediff.presets import get_preset
from stablediff.tokenizer import CLIPTokenizer
from stablediff.weights import convert

PRESET_CHOICES = ("sdxl", "sdxl-refiner", "tiny-sdxl", "tiny-sdxl-refiner")
PROMPTS = ["a photograph of an astronaut riding a horse", "a lighthouse at dusk, oil painting"]
GB = 1e9
# A small model's loading figures are dominated by fixed costs (tokenizer, allocator, libraries).
SMALL_FILE = 100e6


# --------------------------------------------------------------------------------------------
# Memory of this process.


def proc_status(key: str) -> int:
    """A /proc/self/status memory figure ("VmRSS", "VmHWM"), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+: clear_refs 5). False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PartMemory:
    """Peak RSS of this process during one part (VmHWM reset at the start), in ``result``."""

    def __init__(self, result: dict, name: str, device: torch.device):
        self.result, self.name, self.device = result, name, device

    def __enter__(self):
        free_memory()
        self.reset = reset_peak_rss()
        self.rss_before = proc_status("VmRSS")
        self.start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        peak = proc_status("VmHWM")
        self.result["process_rss_before_bytes"] = self.rss_before
        key = "process_peak_rss_bytes" if self.reset else "process_peak_rss_since_start_bytes"
        self.result[key] = peak
        self.result["seconds"] = time.perf_counter() - self.start
        line = f"[{self.name}] peak RSS of this process {peak / GB:.2f} GB (before the part {self.rss_before / GB:.2f})"
        if self.device.type == "cuda":
            self.result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            line += f", CUDA peak allocated {self.result['cuda_peak_allocated_bytes'] / GB:.2f} GB"
        print(f"{line}, {self.result['seconds']:.0f} s", flush=True)
        return False


# --------------------------------------------------------------------------------------------
# Models with shared weights.


def random_net(cls, config, device, seed: int):
    """Ours with `randomize_` weights, built without default initialisation (meta, then empty): for
    the U-Net with seed 0, exactly the U-Net of ``load_pipeline(preset, seed=0)``."""
    with torch.device("meta"):
        net = cls(config)
    net = net.to_empty(device=device)
    return randomize_(net, torch.Generator().manual_seed(seed)).eval()


def assign_shared(ref: torch.nn.Module, sd: dict) -> torch.nn.Module:
    """Load ``sd`` into ``ref`` (built on the meta device) by assignment: ``ref`` then holds the very
    tensors of ``sd``, no copy. Buffers the state dict does not hold (transformers' non-persistent
    ``position_ids``) are rebuilt; any other tensor left on the meta device is an error."""
    ref.load_state_dict(sd, strict=True, assign=True)
    device = next(iter(sd.values())).device
    for name, buf in list(ref.named_buffers()):
        if not buf.is_meta:
            continue
        owner, _, attr = name.rpartition(".")
        if attr != "position_ids":
            raise RuntimeError(f"{name} was left on the meta device")
        setattr(ref.get_submodule(owner), attr, torch.arange(buf.shape[-1], device=device).expand(buf.shape))
    ours_ptrs = {t.data_ptr() for t in sd.values()}
    assert all(p.data_ptr() in ours_ptrs for p in ref.parameters()), "a parameter was copied"
    return ref.eval()


def diffusers_unet(ours: UNetModel, sample_size: int):
    from diffusers import UNet2DConditionModel

    cfg = ours.config
    conf = {k: v for k, v in convert.unet_config_to_diffusers(cfg.to_dict()).items() if not k.startswith("_")}
    conf["sample_size"] = sample_size
    with torch.device("meta"):
        ref = UNet2DConditionModel(**conf)
    sd = convert.unet_ours_to_diffusers(ours.state_dict(), cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels)
    return assign_shared(ref, sd)


# --------------------------------------------------------------------------------------------
# 1. The U-Net.


def unet_inputs(spec, size: int, seed: int = 0) -> dict:
    """One guided call: a latent shared by the uncond and cond rows, two contexts, two pooled
    embeddings and the micro-conditioning of each row (the refiner: aesthetic scores 2.5 and 6)."""
    g = torch.Generator().manual_seed(seed)
    u = spec.unet
    side = size // 8
    x = torch.randn(1, u.in_channels, side, side, generator=g)
    pooled_dim = spec.pooled_text.projection_dim or spec.pooled_text.width
    if spec.is_refiner:
        ids = torch.stack([sdxl_time_ids((size, size), aesthetic_score=s) for s in (2.5, 6.0)])
    else:
        ids = sdxl_time_ids((size, size), (0, 0), target_size=(size, size)).expand(2, -1)
    return {
        "x": torch.cat([x, x]),
        "t": torch.tensor([500.0, 500.0]),
        "context": torch.randn(2, 77, u.context_dim, generator=g),
        "pooled": torch.randn(2, pooled_dim, generator=g),
        "time_ids": ids.contiguous(),
    }


def unet_callers(ours, ref, inputs: dict, dtype: torch.dtype, device: torch.device):
    floats = {"x", "context", "pooled"}
    i = {k: v.to(device=device, dtype=dtype if k in floats else v.dtype) for k, v in inputs.items()}
    y = micro_conditioning(i["pooled"], i["time_ids"])
    added = {"text_embeds": i["pooled"], "time_ids": i["time_ids"]}

    def run_ours():
        return ours(i["x"], i["t"], i["context"], y=y)

    def run_ref():
        return ref(i["x"], i["t"], encoder_hidden_states=i["context"], added_cond_kwargs=added).sample

    return run_ours, run_ref


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def time_pair(run_ours, run_ref, repeats: int, device: torch.device, label: str) -> dict:
    ours_t, ref_t = [], []
    for r in range(repeats):  # alternating, so that drift in machine speed affects both alike
        _, a = timed(run_ours, device)
        _, b = timed(run_ref, device)
        ours_t.append(a)
        ref_t.append(b)
        print(f"  {label} round {r + 1}/{repeats}: ours {a:.3f} s, diffusers {b:.3f} s", flush=True)
    ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
    print(f"  {label}: median ours {ours_s:.3f} s, diffusers {ref_s:.3f} s (diffusers / ours {ref_s / ours_s:.3f})")
    return {
        "ours_s": ours_s,
        "diffusers_s": ref_s,
        "speed_ratio_diffusers_over_ours": ref_s / ours_s,
        "ours_calls_s": ours_t,
        "diffusers_calls_s": ref_t,
    }


@torch.no_grad()
def unet_part(spec, size: int, dtypes: list[str], repeats: int, device: torch.device) -> dict:
    start = time.perf_counter()
    ours = random_net(UNetModel, spec.unet, device, seed=0)
    n = sum(p.numel() for p in ours.parameters())
    print(f"[unet] ours built and randomised: {n:,} parameters, {time.perf_counter() - start:.0f} s", flush=True)
    inputs = unet_inputs(spec, size)
    result = {
        "parameters": n,
        "latent": list(inputs["x"].shape),
        "context": list(inputs["context"].shape),
        "time_ids": inputs["time_ids"][0].tolist(),
        "t": 500.0,
    }

    # float32 first: the parity figure; these calls are also the float32 warm-up.
    ref = diffusers_unet(ours, size // 8)
    run_ours, run_ref = unet_callers(ours, ref, inputs, torch.float32, device)
    out_ours, ours_first = timed(run_ours, device)
    out_ref, ref_first = timed(run_ref, device)
    reference = out_ref.float().cpu()
    parity = {
        "max_abs_diff": max_diff(out_ours, out_ref),
        "ref_max_abs": reference.abs().max().item(),
        "bit_identical": torch.equal(out_ours, out_ref),
        "first_call_s": {"ours": ours_first, "diffusers": ref_first},
    }
    result["float32_parity"] = parity
    print(
        f"[unet] float32 max abs diff {parity['max_abs_diff']:.3e} (bit-identical: {parity['bit_identical']}; "
        f"diffusers max |x| {parity['ref_max_abs']:.3f}); first calls ours {ours_first:.2f} s, "
        f"diffusers {ref_first:.2f} s",
        flush=True,
    )
    del out_ours, out_ref
    timing = {}
    if "float32" in dtypes:
        timing["float32"] = time_pair(run_ours, run_ref, repeats, device, "[unet] float32")
    del run_ours, run_ref, ref
    free_memory()

    for name in [d for d in dtypes if d != "float32"]:
        dtype = getattr(torch, name)
        ours.to(dtype)  # in place, parameter by parameter: the diffusers twin no longer holds the old ones
        free_memory()
        ref = diffusers_unet(ours, size // 8)
        run_ours, run_ref = unet_callers(ours, ref, inputs, dtype, device)
        out_ours, ours_first = timed(run_ours, device)  # warm-up
        out_ref, ref_first = timed(run_ref, device)
        entry = {
            "max_abs_diff": max_diff(out_ours, out_ref),
            "ours_max_abs_diff_from_float32": max_diff(out_ours.cpu(), reference),
            "diffusers_max_abs_diff_from_float32": max_diff(out_ref.cpu(), reference),
            "first_call_s": {"ours": ours_first, "diffusers": ref_first},
        }
        print(
            f"[unet] {name}: max abs diff ours vs diffusers {entry['max_abs_diff']:.3e}; from the float32 output: "
            f"ours {entry['ours_max_abs_diff_from_float32']:.3e}, diffusers "
            f"{entry['diffusers_max_abs_diff_from_float32']:.3e}; first calls ours {ours_first:.2f} s, "
            f"diffusers {ref_first:.2f} s",
            flush=True,
        )
        del out_ours, out_ref
        entry.update(time_pair(run_ours, run_ref, repeats, device, f"[unet] {name}"))
        timing[name] = entry
        del run_ours, run_ref, ref
        free_memory()
    result["timing"] = timing
    del ours
    free_memory()
    return result


# --------------------------------------------------------------------------------------------
# 2. The text encoders.


def transformers_text(cfg, sd: dict):
    """transformers' tower with SDXL's published special ids (bos 0, eos 2, pad 1: with eos_token_id
    2 transformers pools at the argmax id, as OpenCLIP does), given the tensors of ``sd``."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection

    config = HFConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.width * cfg.mlp_ratio,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim or cfg.width,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    cls = HFText if cfg.projection_dim is None else CLIPTextModelWithProjection
    with torch.device("meta"):
        ref = cls(config)
    names = set(ref.state_dict())
    if "text_model.embeddings.token_embedding.weight" in names:  # transformers 5 names CLIPTextModel as we do
        sd = convert.text_ours_to_transformers(sd)
    return assign_shared(ref, sd)


@torch.no_grad()
def text_part(spec) -> dict:
    towers = [("text_encoder", spec.text, spec.pad_token)]
    if spec.text_2 is not None:
        towers.append(("text_encoder_2", spec.text_2, spec.pad_token_2))
    result = {"prompts": PROMPTS}
    for seed, (name, cfg, pad) in enumerate(towers, start=1):
        start = time.perf_counter()
        ours = random_net(CLIPTextModel, cfg, torch.device("cpu"), seed=seed)
        ref = transformers_text(cfg, ours.state_dict())
        ids = torch.tensor(CLIPTokenizer.default(pad_token=pad)(PROMPTS))
        context, pooled = ours.encode_pooled(ids)
        out = ref(ids, output_hidden_states=True)
        expected = out.hidden_states[-1 - cfg.skip_layers]  # skip 1: hidden_states[-2], SDXL's context
        entry = {
            "class": type(ref).__name__,
            "parameters": sum(p.numel() for p in ours.parameters()),
            "context_layer": f"hidden_states[{-1 - cfg.skip_layers}]",
            "context_max_abs_diff": max_diff(context, expected),
            "context_ref_max_abs": expected.abs().max().item(),
        }
        line = f"[text] {name} ({type(ref).__name__}, {entry['parameters']:,} parameters): "
        line += f"context ({entry['context_layer']}) max abs diff {entry['context_max_abs_diff']:.3e}"
        if cfg.projection_dim is None:
            entry["pooled_max_abs_diff"] = max_diff(pooled, out.pooler_output)
            line += f", pooled {entry['pooled_max_abs_diff']:.3e}"
        else:
            entry["projected_pooled_max_abs_diff"] = max_diff(pooled, out.text_embeds)
            entry["projected_pooled_ref_max_abs"] = out.text_embeds.abs().max().item()
            line += f", projected pooled (text_embeds) {entry['projected_pooled_max_abs_diff']:.3e}"
        entry["seconds"] = time.perf_counter() - start
        print(line, flush=True)
        result[name] = entry
        del ours, ref, out, context, pooled, expected
        free_memory()
    return result


# --------------------------------------------------------------------------------------------
# 3. Loading memory, each load in a fresh process.

LOAD_CHILD = """
import json, sys, time
import torch
from stablediff.loading import load_pipeline

def status(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024

path, dtype_name = sys.argv[1], sys.argv[2]
dtype = None if dtype_name == "stored" else getattr(torch, dtype_name)
try:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS: the imports' peak is not counted
        f.write("5")
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
start = time.perf_counter()
pipe = load_pipeline(path, dtype=dtype)
seconds = time.perf_counter() - start
after_load = status("VmHWM")
# Read every weight once (a reduction, no copy): mapped pages become resident.
with torch.no_grad():
    for sd in pipe.state_dicts().values():
        for t in sd.values():
            if t.numel():
                t.max()
print(json.dumps({
    "rss_before_load_bytes": before, "peak_rss_after_load_bytes": after_load,
    "peak_rss_after_reading_all_weights_bytes": status("VmHWM"), "load_seconds": seconds,
    "peak_reset_after_imports": reset, "dtypes": sorted({str(t.dtype) for sd in pipe.state_dicts().values()
                                                         for t in sd.values()}),
}))
"""


def measure_load(path: Path, weights_bytes: int, load_dtype: str, label: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD, str(path), load_dtype], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"loading {path} failed in the child process:\n{out.stderr}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    added_load = child["peak_rss_after_load_bytes"] - child["rss_before_load_bytes"]
    added_all = child["peak_rss_after_reading_all_weights_bytes"] - child["rss_before_load_bytes"]
    entry = {
        "weights_bytes": weights_bytes,
        **child,
        "load_dtype": load_dtype,
        "added_peak_rss_after_load_bytes": added_load,
        "added_peak_rss_after_reading_all_weights_bytes": added_all,
        "peak_over_weights_after_load": added_load / weights_bytes,
        "peak_over_weights": added_all / weights_bytes,
    }
    print(
        f"[loading] {label}: {weights_bytes / GB:.3f} GB of weights; loaded in {child['load_seconds']:.2f} s; "
        f"peak RSS above the pre-load RSS {added_load / GB:.3f} GB after loading, {added_all / GB:.3f} GB "
        f"after reading every weight: {entry['peak_over_weights']:.3f}x the weights (target <= 1.1)",
        flush=True,
    )
    return entry


def loading_part(preset: str, file_dtype: str, load_dtype: str, folder: Path, layouts: list[str]) -> dict:
    dtype = getattr(torch, file_dtype)
    start = time.perf_counter()
    pipe = load_pipeline(preset, dtype=dtype, seed=0)
    print(f"[loading] {preset} built in {file_dtype}: {time.perf_counter() - start:.0f} s", flush=True)
    paths = {}
    for layout in layouts:
        start = time.perf_counter()
        if layout == "single-file":
            path = save(pipe, folder / f"{preset}.safetensors", layout="single-file", dtype=dtype)
            weights = path.stat().st_size
        else:
            path = save(pipe, folder / f"{preset}-diffusers", layout="diffusers", dtype=dtype)
            weights = sum(p.stat().st_size for p in path.rglob("*.safetensors"))
        seconds = time.perf_counter() - start
        paths[layout] = (path, weights, seconds)
        print(f"[loading] wrote {layout} ({weights / GB:.3f} GB of weights) in {seconds:.0f} s", flush=True)
    del pipe
    free_memory()
    result = {"file_dtype": file_dtype}
    for layout, (path, weights, seconds) in paths.items():
        result[layout] = {"save_seconds": seconds, **measure_load(path, weights, load_dtype, layout)}
        if weights < SMALL_FILE:
            result[layout]["note"] = "small model: fixed costs dominate the ratio"
    return result


# --------------------------------------------------------------------------------------------


def parameter_counts(spec) -> dict:
    from stablediff.models.vae import AutoencoderKL

    with torch.device("meta"):
        nets = {"unet": UNetModel(spec.unet), "vae": AutoencoderKL(spec.vae), "text": CLIPTextModel(spec.text)}
        if spec.text_2 is not None:
            nets["text_2"] = CLIPTextModel(spec.text_2)
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}


def estimate_peak(counts: dict, parts: list[str], file_dtype: str, size: int) -> dict:
    """Rough peak RSS of this process per part, in bytes (see the module docstring)."""
    total = sum(counts.values())
    base = 1.0e9  # libraries (torch, diffusers, transformers)
    file_bytes = total * torch.finfo(getattr(torch, file_dtype)).bits // 8
    activations = 2.0e9 * (size / 1024) ** 2  # one batch-2 call at ``size`` pixels, float32
    estimates = {
        "unet": base + counts["unet"] * 4 + activations,
        "text": base + int(1.1 * max(counts["text"], counts.get("text_2", 0)) * 4),  # one copy, shared
        # load_pipeline(preset, dtype=file_dtype) builds every network in float32 before the cast
        "loading": base + max(total * 4, int(1.1 * file_bytes)),
    }
    return {part: int(estimates[part]) for part in parts}


def versions() -> dict:
    import diffusers
    import safetensors
    import transformers

    import stablediff

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "stablediff": getattr(stablediff, "__version__", "?"),
    }


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "arch": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": meminfo("MemTotal"),
        "memory_available_at_start_bytes": meminfo("MemAvailable"),
        "load_average_at_start": os.getloadavg(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl", choices=PRESET_CHOICES)
    parser.add_argument("--parts", default="unet,text,loading", help="comma-separated: unet, text, loading")
    parser.add_argument(
        "--dtypes", default="bfloat16,float32", help="U-Net timing dtypes (float32 parity is always measured)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed U-Net calls per side and dtype")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the preset's)")
    parser.add_argument("--device", default="cpu", help="device of the U-Net part (the others run on the CPU)")
    parser.add_argument("--file-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument(
        "--load-dtype", default="stored", help="dtype given to load_pipeline in part 3; 'stored' = None (the file's)"
    )
    parser.add_argument(
        "--layouts", default="single-file,diffusers", help="part 3: comma-separated single-file, diffusers"
    )
    parser.add_argument("--tmp", default=None, help="folder for the files of part 3 (default: the system's)")
    parser.add_argument("--force", action="store_true", help="run even if MemAvailable is below the estimate")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    parts = [p for p in args.parts.split(",") if p]
    dtypes = [d for d in args.dtypes.split(",") if d]
    layouts = [x for x in args.layouts.split(",") if x]
    bad = [p for p in parts if p not in ("unet", "text", "loading")]
    bad += [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    bad += [x for x in layouts if x not in ("single-file", "diffusers")]
    if bad or args.repeats < 1 or args.load_dtype not in ("stored", "float32", "float16", "bfloat16"):
        parser.error(f"unknown value(s) {bad}" if bad else "--repeats must be >= 1 and --load-dtype a dtype name")
    spec = get_preset(args.preset)
    if not spec.is_sdxl:
        parser.error(f"{args.preset} is not an SDXL model")
    size = args.size or spec.default_size
    if size % 64:
        parser.error("--size must be a multiple of 64")
    device = torch.device(args.device)
    out_path = Path(
        args.out or f"benchmarks/results/sdxl_full{'' if args.preset == 'sdxl' else '_' + args.preset}.json"
    )
    torch.set_grad_enabled(False)

    counts = parameter_counts(spec)
    estimate = estimate_peak(counts, parts, args.file_dtype, size)
    available = meminfo("MemAvailable")
    print(
        f"{args.preset}: parameters {', '.join(f'{k} {v:,}' for k, v in counts.items())} "
        f"({sum(counts.values()):,} in all); estimated peak RSS per part: "
        f"{', '.join(f'{k} {v / GB:.1f} GB' for k, v in estimate.items())}; available now {available / GB:.1f} GB",
        flush=True,
    )
    if max(estimate.values()) > available and not args.force:
        sys.exit(f"not enough memory available ({available / GB:.1f} GB): pass --force to run anyway")

    result = {
        "preset": args.preset,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "machine": machine(device),
        "image_size": size,
        "parameters": counts,
        "estimated_peak_rss_bytes": estimate,
    }
    print(f"versions: {result['versions']}", flush=True)
    start = time.perf_counter()
    if "unet" in parts:
        result["unet"] = {}
        with PartMemory(result["unet"], "unet", device):
            result["unet"].update(unet_part(spec, size, dtypes, args.repeats, device))
    if "text" in parts:
        result["text_encoders"] = {}
        with PartMemory(result["text_encoders"], "text", torch.device("cpu")):
            result["text_encoders"].update(text_part(spec))
    if "loading" in parts:
        result["loading"] = {}
        with PartMemory(result["loading"], "loading", torch.device("cpu")):
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                result["loading"].update(
                    loading_part(args.preset, args.file_dtype, args.load_dtype, Path(tmp), layouts)
                )
    result["total_seconds"] = time.perf_counter() - start
    peaks = [result[k].get("process_peak_rss_bytes") for k in ("unet", "text_encoders", "loading") if k in result]
    if peaks and None not in peaks:
        result["process_peak_rss_bytes"] = max(peaks)
        print(f"peak RSS of this process over the parts run: {max(peaks) / GB:.2f} GB", flush=True)
    print(json.dumps(result, indent=2))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
