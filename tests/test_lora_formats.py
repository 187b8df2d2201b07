"""LyCORIS LoHa / LoKr and LoCon's CP form against formulas written here (diffusers loads none of
them), per-module alphas, the errors a bad file gets, legacy .pt files, and A1111's LoRA hash.

The formulas follow LyCORIS and A1111's built-in Lora extension: LoHa dW = (w1_a w1_b) * (w2_a w2_b)
(or Tucker products with t1/t2), LoKr dW = w1 (x) w2 (Kronecker), scaled by alpha / rank, where a
LoKr with neither factor low-rank has scale 1. They are written with einsum, not with the code under
test, and checked module by module: the hooked module's output must equal F.linear / F.conv2d with
the weight W + scale * multiplier * dW.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from reference import build_reference, save_reference_folder
from test_lora import kohya_tensors, save

from stablediff.errors import BadFileError
from stablediff.loading import load_pipeline
from stablediff.lora import LoraFileError, lora_hash

ATOL = 1e-5
Q = "input_blocks.4.1.transformer_blocks.0"  # the tiny SD1 model's first transformer block


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return load_pipeline(save_reference_folder(tmp_path_factory.mktemp("sd1"), *build_reference("sd1")))


@pytest.fixture
def pipe(ours):
    yield ours
    ours.unload_lora()


def kohya(name: str) -> str:
    """kohya's LDM-flavoured name of our module."""
    return "lora_unet_" + name.replace(".", "_")


def randn(*shape, seed=[0]):  # noqa: B006 - a counter shared by the calls of one test run
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.3


@torch.no_grad()
def assert_module_applies(pipe, name: str, delta: torch.Tensor, multiplier: float) -> None:
    """The hooked module computes with W + multiplier * delta (delta already scaled by alpha/rank)."""
    module = pipe.unet.get_submodule(name)
    w = module.weight + multiplier * delta
    if isinstance(module, torch.nn.Linear):
        x = torch.randn(2, 5, module.in_features)
        expected = F.linear(x, w, module.bias)
    else:
        x = torch.randn(2, module.in_channels, 8, 8)
        expected = F.conv2d(x, w, module.bias, module.stride, module.padding)
    diff = (module(x) - expected).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (|dW| max {delta.abs().max().item():.3f})")
    assert diff < ATOL


# ---------------------------------------------------------------------------------------------
# The formulas


def loha(w1a, w1b, w2a, w2b, shape):
    return (torch.einsum("or,ri->oi", w1a, w1b.flatten(1)) * torch.einsum("or,ri->oi", w2a, w2b.flatten(1))).reshape(
        shape
    )


def tucker(t, wa, wb):
    # t [r, r', kh, kw], wa [r, out], wb [r', in] -> [out, in, kh, kw]
    return torch.einsum("ijhw,io,jn->onhw", t, wa, wb)


def kron(w1, w2):
    """w1 (x) w2 for w1 [a, c] and w2 [b, d] or [b, d, kh, kw], as [a*b, c*d(, kh, kw)]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    return torch.einsum("ac,bd...->abcd...", w1, w2).reshape(a * b, c * d, *w2.shape[2:])


def test_loha_matches_formula(pipe, tmp_path):
    linear, conv, conv_tucker = f"{Q}.ff.net.0.proj", "input_blocks.4.0.in_layers.2", "input_blocks.4.0.out_layers.3"
    t = {}
    t |= {f"{kohya(linear)}.hada_w1_a": randn(512, 4), f"{kohya(linear)}.hada_w1_b": randn(4, 64)}
    t |= {f"{kohya(linear)}.hada_w2_a": randn(512, 4), f"{kohya(linear)}.hada_w2_b": randn(4, 64)}
    t[f"{kohya(linear)}.alpha"] = torch.tensor(3.0)
    t |= {f"{kohya(conv)}.hada_w1_a": randn(64, 4), f"{kohya(conv)}.hada_w1_b": randn(4, 32 * 9)}
    t |= {f"{kohya(conv)}.hada_w2_a": randn(64, 4), f"{kohya(conv)}.hada_w2_b": randn(4, 32 * 9)}
    t[f"{kohya(conv)}.alpha"] = torch.tensor(6.0)
    for n in ("1", "2"):  # Tucker form: t [r, r, 3, 3], w_a [r, out], w_b [r, in]
        k = kohya(conv_tucker)
        t |= {f"{k}.hada_t{n}": randn(4, 4, 3, 3), f"{k}.hada_w{n}_a": randn(4, 64), f"{k}.hada_w{n}_b": randn(4, 64)}
    pipe.load_lora(save(t, tmp_path / "loha.safetensors"), scale=0.7)
    k = kohya(linear)
    delta = loha(t[f"{k}.hada_w1_a"], t[f"{k}.hada_w1_b"], t[f"{k}.hada_w2_a"], t[f"{k}.hada_w2_b"], (512, 64))
    assert_module_applies(pipe, linear, delta * 3 / 4, 0.7)
    k = kohya(conv)
    delta = loha(t[f"{k}.hada_w1_a"], t[f"{k}.hada_w1_b"], t[f"{k}.hada_w2_a"], t[f"{k}.hada_w2_b"], (64, 32, 3, 3))
    assert_module_applies(pipe, conv, delta * 6 / 4, 0.7)
    k = kohya(conv_tucker)
    delta = tucker(t[f"{k}.hada_t1"], t[f"{k}.hada_w1_a"], t[f"{k}.hada_w1_b"]) * tucker(
        t[f"{k}.hada_t2"], t[f"{k}.hada_w2_a"], t[f"{k}.hada_w2_b"]
    )
    assert_module_applies(pipe, conv_tucker, delta, 0.7)  # no alpha: scale 1


def test_lokr_matches_formula(pipe, tmp_path):
    linear, full, conv, down, conv_tucker = (
        f"{Q}.ff.net.0.proj",  # [512, 64] = [8 * 64, 4 * 16]
        f"{Q}.attn2.to_k",  # [64, 32]
        "input_blocks.4.0.in_layers.2",  # [64, 32, 3, 3]
        "input_blocks.3.0.op",  # [32, 32, 3, 3], stride 2
        "input_blocks.5.0.in_layers.2",  # [64, 64, 3, 3]
    )
    t = {
        # w1 full, w2 low-rank (rank 3): scale alpha / 3
        f"{kohya(linear)}.lokr_w1": randn(8, 4),
        f"{kohya(linear)}.lokr_w2_a": randn(64, 3),
        f"{kohya(linear)}.lokr_w2_b": randn(3, 16),
        f"{kohya(linear)}.alpha": torch.tensor(2.0),
        # both full: scale 1 whatever alpha says
        f"{kohya(full)}.lokr_w1": randn(4, 4),
        f"{kohya(full)}.lokr_w2": randn(16, 8),
        f"{kohya(full)}.alpha": torch.tensor(7.0),
        # w1 low-rank (rank 2), w2 full with the kernel
        f"{kohya(conv)}.lokr_w1_a": randn(4, 2),
        f"{kohya(conv)}.lokr_w1_b": randn(2, 2),
        f"{kohya(conv)}.lokr_w2": randn(16, 16, 3, 3),
        f"{kohya(conv)}.alpha": torch.tensor(1.0),
        # w2 low-rank over the flattened kernel
        f"{kohya(down)}.lokr_w1": randn(4, 4),
        f"{kohya(down)}.lokr_w2_a": randn(8, 2),
        f"{kohya(down)}.lokr_w2_b": randn(2, 8 * 9),
        f"{kohya(down)}.alpha": torch.tensor(3.0),
        # w2 as a Tucker product
        f"{kohya(conv_tucker)}.lokr_w1": randn(8, 8),
        f"{kohya(conv_tucker)}.lokr_t2": randn(2, 3, 3, 3),
        f"{kohya(conv_tucker)}.lokr_w2_a": randn(2, 8),
        f"{kohya(conv_tucker)}.lokr_w2_b": randn(3, 8),
        f"{kohya(conv_tucker)}.alpha": torch.tensor(1.5),
    }
    pipe.load_lora(save(t, tmp_path / "lokr.safetensors"), scale=1.3)

    def w(name, role):
        return t[f"{kohya(name)}.lokr_{role}"]

    delta = kron(w(linear, "w1"), w(linear, "w2_a") @ w(linear, "w2_b"))
    assert_module_applies(pipe, linear, delta * 2 / 3, 1.3)
    assert_module_applies(pipe, full, kron(w(full, "w1"), w(full, "w2")), 1.3)
    assert_module_applies(pipe, conv, kron(w(conv, "w1_a") @ w(conv, "w1_b"), w(conv, "w2")) / 2, 1.3)
    delta = kron(w(down, "w1"), (w(down, "w2_a") @ w(down, "w2_b")).reshape(8, 8, 3, 3))
    assert_module_applies(pipe, down, delta * 3 / 2, 1.3)
    delta = kron(w(conv_tucker, "w1"), tucker(w(conv_tucker, "t2"), w(conv_tucker, "w2_a"), w(conv_tucker, "w2_b")))
    assert_module_applies(pipe, conv_tucker, delta * 1.5 / 3, 1.3)
    # the fused weights hold the same deltas
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        hooked = pipe.unet(x, 10.0, ctx)
        pipe.fuse_lora()
        fused = pipe.unet(x, 10.0, ctx)
    pipe.unfuse_lora()
    assert (fused - hooked).abs().max() < ATOL


def test_locon_cp_and_1x1_and_per_module_alphas(pipe, tmp_path):
    mid, shortcut, q, v = (
        "input_blocks.5.0.out_layers.3",
        "input_blocks.4.0.skip_connection",
        f"{Q}.attn1.to_q",
        f"{Q}.attn1.to_v",
    )
    t = {
        f"{kohya(mid)}.lora_down.weight": randn(4, 64, 1, 1),
        f"{kohya(mid)}.lora_mid.weight": randn(4, 4, 3, 3),
        f"{kohya(mid)}.lora_up.weight": randn(64, 4, 1, 1),
        f"{kohya(mid)}.alpha": torch.tensor(2.0),
        f"{kohya(shortcut)}.lora_down.weight": randn(4, 32),  # a 1x1 convolution's LoRA stored 2-D
        f"{kohya(shortcut)}.lora_up.weight": randn(64, 4),
        f"{kohya(q)}.lora_down.weight": randn(4, 64),
        f"{kohya(q)}.lora_up.weight": randn(64, 4),
        f"{kohya(q)}.alpha": torch.tensor(1.0),
        f"{kohya(v)}.lora_down.weight": randn(4, 64),
        f"{kohya(v)}.lora_up.weight": randn(64, 4),
        f"{kohya(v)}.alpha": torch.tensor(8.0),
    }
    pipe.load_lora(save(t, tmp_path / "locon.safetensors"), scale=0.9)

    def lora(name, role):
        return t[f"{kohya(name)}.lora_{role}.weight"].flatten(1)

    cp = torch.einsum("om,mnhw,ni->oihw", lora(mid, "up"), t[f"{kohya(mid)}.lora_mid.weight"], lora(mid, "down"))
    assert_module_applies(pipe, mid, cp / 2, 0.9)
    assert_module_applies(pipe, shortcut, (lora(shortcut, "up") @ lora(shortcut, "down"))[:, :, None, None], 0.9)
    assert_module_applies(pipe, q, lora(q, "up") @ lora(q, "down") / 4, 0.9)
    assert_module_applies(pipe, v, lora(v, "up") @ lora(v, "down") * 2, 0.9)


# ---------------------------------------------------------------------------------------------
# Errors: each names the key and what is allowed


def _lora(name: str, down_shape, up_shape, prefix="lora_unet_") -> dict:
    stem = prefix + name.replace(".", "_")
    return {f"{stem}.lora_down.weight": torch.zeros(down_shape), f"{stem}.lora_up.weight": torch.zeros(up_shape)}


def _refused(pipe, tmp_path, tensors, match, metadata=None):
    path = save(tensors, tmp_path / "bad.safetensors", metadata)
    with pytest.raises(LoraFileError, match=match) as info:
        pipe.load_lora(path)
    assert isinstance(info.value, BadFileError) and isinstance(info.value, ValueError)
    assert pipe.loras == {}
    print(info.value)
    return str(info.value)


def test_unknown_modules_listed_with_count(pipe, tmp_path):
    good = _lora(f"{Q}.attn1.to_q", (4, 64), (64, 4))
    bad = {}
    for i in range(12):
        bad |= _lora(f"down_blocks.7.attentions.{i}.proj_in", (4, 64), (64, 4))
    message = _refused(pipe, tmp_path, {**good, **bad}, r"24 of 26 keys do not fit")
    assert "lora_unet_down_blocks_7_attentions_0_proj_in: no module 'down_blocks_7_attentions_0_proj_in'" in message
    assert "... and 2 more" in message


def test_shape_mismatch_names_both_shapes(pipe, tmp_path):
    _refused(
        pipe,
        tmp_path,
        _lora(f"{Q}.attn1.to_q", (4, 99), (64, 4)),
        r"lora_down has shape \[4, 99\], which does not fit the Linear weight \[64, 64\]: expected \[4, 64\]",
    )


def test_huge_rank_is_refused_before_computing(pipe, tmp_path):
    _refused(
        pipe,
        tmp_path,
        _lora(f"{Q}.attn1.to_q", (5000, 64), (64, 5000)),
        r"lora_down has rank 5000; the Linear weight \[64, 64\] allows 1 to 64",
    )


def test_sdxl_files_are_refused(pipe, tmp_path):
    te1 = _lora("text_model.encoder.layers.0.self_attn.q_proj", (4, 768), (768, 4), prefix="lora_te1_")
    _refused(pipe, tmp_path, te1, r"an SDXL LoRA \(keys such as 'lora_te1_.*this model is SD 1\.x/2\.x")
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    _refused(pipe, tmp_path, _lora(f"{Q}.attn1.to_q", (4, 64), (64, 4)), r"SDXL LoRA \(ss_base_model_version", meta)


def test_text_width_names_the_family(pipe, tmp_path):
    te = _lora("text_model.encoder.layers.0.self_attn.q_proj", (4, 768), (768, 4), prefix="lora_te_")
    _refused(pipe, tmp_path, te, r"made for a model with 768-wide text features \(SD 1\.x\), this model's are 32 wide")
    cross = _lora(f"{Q}.attn2.to_k", (4, 1024), (64, 4))
    _refused(pipe, tmp_path, cross, r"1024-wide text features \(SD 2\.x\)")


def test_files_without_lora_keys(pipe, tmp_path):
    _refused(
        pipe,
        tmp_path,
        {"model.diffusion_model.out.2.weight": torch.zeros(2)},
        "(?s)nothing in this file fits.*not a LoRA key",
    )
    _refused(pipe, tmp_path, {}, r"no LoRA tensors in the file \(0 keys\)")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"dora_scale": torch.ones(64, 1)}, "DoRA"),
        ({"diff": torch.ones(64, 64)}, "unsupported tensor kind 'diff'"),
        ({"alpha": torch.ones(2)}, "alpha has shape"),
        ({"hada_w1_a": torch.ones(64, 4)}, "mixes (LoRA and LoHa|LoHa and LoRA) tensors in one module"),
    ],
)
def test_unsupported_keys(pipe, tmp_path, extra, match):
    stem = kohya(f"{Q}.attn1.to_q")
    tensors = {**_lora(f"{Q}.attn1.to_q", (4, 64), (64, 4)), **{f"{stem}.{k}": v for k, v in extra.items()}}
    _refused(pipe, tmp_path, tensors, match)


def test_incomplete_and_non_finite(pipe, tmp_path):
    stem = kohya(f"{Q}.attn1.to_q")
    _refused(pipe, tmp_path, {f"{stem}.hada_w1_a": torch.ones(64, 4)}, "incomplete LoHa: needs hada_w1_a, hada_w1_b")
    nan = _lora(f"{Q}.attn1.to_q", (4, 64), (64, 4))
    nan[f"{stem}.lora_up.weight"][0, 0] = float("nan")
    _refused(pipe, tmp_path, nan, "lora_up holds NaN or inf")


def test_peft_pattern_must_be_module_names(pipe, tmp_path):
    tensors = {
        "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64, 1, 1),
        "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 4, 1, 1),
    }
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"(a+)+$": 2}})}
    _refused(pipe, tmp_path, tensors, "is a regular expression; only module names are supported", meta)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pt_files_load_through_the_restricted_unpickler(pipe, tmp_path):
    tensors = _lora(f"{Q}.attn1.to_q", (4, 64), (64, 4))
    torch.save(tensors, tmp_path / "ok.pt")
    assert pipe.load_lora(tmp_path / "ok.pt") == "ok"
    marker = tmp_path / "marker"
    torch.save({**tensors, "evil": _System(marker)}, tmp_path / "evil.pt")
    with pytest.raises(
        BadFileError, match=r"evil\.pt: refusing to unpickle the forbidden global '(posix|os|nt)\.system'"
    ):
        pipe.load_lora(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "raw.ckpt").write_bytes(pickle.dumps(_System(marker)))
    with pytest.raises(BadFileError, match="forbidden global"):
        pipe.load_lora(tmp_path / "raw.ckpt")
    assert not marker.exists()


def test_lora_hash_is_a1111s(tmp_path):
    """SHA-256 of the bytes after the safetensors header (so not of the metadata), 12 hex digits;
    of the whole file for other formats."""
    unet, _, text, _, _ = build_reference("sd1")
    path = save(kohya_tensors(unet, text), tmp_path / "x.safetensors", {"ss_note": "a"})
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[start:]).hexdigest()[:12]
    again = save(kohya_tensors(unet, text), tmp_path / "y.safetensors", {"ss_note": "other"})
    assert lora_hash(again) == lora_hash(path) and again.read_bytes() != data
    torch.save({"a": torch.ones(3)}, tmp_path / "z.pt")
    assert lora_hash(tmp_path / "z.pt") == hashlib.sha256((tmp_path / "z.pt").read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize(("preset", "version"), [("sd15", "sd_v1"), ("sd2", "sd_v2")])
def test_real_layouts_resolve_every_spelling(preset, version):
    """On SD 1.5's and SD 2.x's full-size layouts (meta device), every Linear and Conv2d has one
    diffusers name, the very set diffusers' own U-Net has, and no spelling is ambiguous."""
    from diffusers import UNet2DConditionModel

    from stablediff.lora import ModuleTable
    from stablediff.models.clip import CLIPTextModel
    from stablediff.models.unet import UNetModel
    from stablediff.presets import PRESETS
    from stablediff.weights import convert

    spec = PRESETS[preset]
    with torch.device("meta"):
        table = ModuleTable(UNetModel(spec.unet), CLIPTextModel(spec.text))
        reference = UNet2DConditionModel.from_config(convert.unet_config_to_diffusers(spec.unet.to_dict()))
    names = {n for n, m in reference.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(table.diffusers.values()) == names and len(names) == len(table.modules["unet"])
    assert table.base_model_version == version
    for part, modules in table.modules.items():
        for ours in modules:
            kohya_name = table.kohya_name(part, ours)
            stem = kohya_name.removeprefix("lora_unet_" if part == "unet" else "lora_te_")
            assert table.resolve(part, stem, underscored=True) == (ours, None)
            assert table.resolve(part, ours, underscored=False) == (ours, None)
            assert table.resolve(part, ours.replace(".", "_"), underscored=True) == (ours, None)
