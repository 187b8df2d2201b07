"""LoRAs against diffusers + PEFT on the same random weights (fp32, atol 1e-5), and how they apply.

The tiny SD1- and SD2-style reference models of reference.py are loaded into ours; a LoRA file is
then applied by diffusers' own loaders (`StableDiffusionLoraLoaderMixin.lora_state_dict`,
`load_lora_into_unet`, `load_lora_into_text_encoder`: what `load_lora_weights` runs) to fresh
reference models and by `pipe.load_lora` to ours, and the U-Net outputs and text-encoder hidden
states are compared. The kohya files are written here from the reference models' module names,
the PEFT file by diffusers' `save_lora_weights` itself.

diffusers 0.42.1 drops the per-module alphas of a kohya file on the U-Net's attention projections
and on the text encoder (its alpha_pattern keys match no module: it warns and uses the most common
alpha), so the parity files use one alpha for all modules (alpha != rank); per-module alphas are
checked against the formula in test_lora_formats.py.
"""

from __future__ import annotations

import pytest
import safetensors
import safetensors.torch
import torch
from reference import STYLES, build_reference, save_reference_folder

from stablediff.loading import load_pipeline
from stablediff.lora import LoraFileError, lora_hash
from stablediff.weights import convert

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Files (shared with test_lora_formats.py)


def adaptable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def random_lora(module: torch.nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) as kohya stores them: Linear [r, in] / [out, r]; Conv2d [r, in, kh, kw] / [out, r, 1, 1]."""
    if isinstance(module, torch.nn.Linear):
        down = torch.randn(rank, module.in_features, generator=g)
        up = torch.randn(module.out_features, rank, generator=g)
    else:
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g)
    return down * 0.1, up * 0.1


def kohya_tensors(unet, text, seed: int = 0, alpha: float | None = 2.5, ranks=(4, 3)) -> dict[str, torch.Tensor]:
    """A kohya file with diffusers-flavoured U-Net names (as kohya writes SD 1.x/2.x LoRAs) over
    every Linear and Conv2d of both reference networks: attention q/k/v/out, proj_in/out, ff,
    resnet conv1/conv2/conv_shortcut/time_emb_proj (LoCon), down/upsamplers, conv_in/out, the time
    embedding; text q/k/v/out_proj, fc1, fc2. Rank ranks[0] for Linear, ranks[1] for Conv2d."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, model, inner in (("lora_unet_", unet, ""), ("lora_te_", text, "text_model.")):
        for name, module in adaptable(model).items():
            stem = prefix + (inner + name).replace(".", "_")
            rank = ranks[0] if isinstance(module, torch.nn.Linear) else ranks[1]
            out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = random_lora(module, rank, g)
            if alpha is not None:
                out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def save(tensors: dict, path, metadata: dict | None = None):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------
# Models and outputs


@pytest.fixture(scope="module", params=STYLES)
def ours(request, tmp_path_factory):
    """(style, our pipeline loaded from the reference folder); LoRAs are unloaded after each test."""
    folder = save_reference_folder(tmp_path_factory.mktemp(request.param), *build_reference(request.param))
    return request.param, load_pipeline(folder)


@pytest.fixture
def pipe(ours):
    style, p = ours
    yield p
    p.unload_lora()


@pytest.fixture
def style(ours):
    return ours[0]


def inputs(pipe):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.context_dim, generator=g)
    ids = torch.tensor(pipe.tokenizer(["a photo of an astronaut riding a horse", ""]))
    return x, torch.tensor([3.0, 617.5]), ctx, ids


@torch.no_grad()
def our_outputs(pipe):
    x, t, ctx, ids = inputs(pipe)
    return pipe.unet(x, t, ctx), pipe.text_encoder(ids)


@torch.no_grad()
def diffusers_outputs(style, path, pipe, scale: float = 1.0):
    """Fresh reference models with the file applied by diffusers' loaders, then their outputs."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    unet, _, text, _, _ = build_reference(style)
    state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata)
    Loader.load_lora_into_text_encoder(state, alphas, text_encoder=text, lora_scale=scale, metadata=metadata)
    x, t, ctx, ids = inputs(pipe)
    return unet(x, t, ctx, cross_attention_kwargs={"scale": scale}).sample, text(ids).last_hidden_state


def max_diff(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (reference max |x| {a.abs().max().item():.3f})")
    return diff


def assert_matches(case: str, reference, got) -> None:
    assert max_diff(f"{case} unet", reference[0], got[0]) < ATOL
    assert max_diff(f"{case} text", reference[1], got[1]) < ATOL


# ---------------------------------------------------------------------------------------------
# Parity with diffusers


def test_kohya_file_matches_diffusers(pipe, style, tmp_path):
    unet, _, text, _, _ = build_reference(style)
    path = save(kohya_tensors(unet, text), tmp_path / "kohya.safetensors")
    before = our_outputs(pipe)
    assert pipe.load_lora(path) == "kohya"
    after = our_outputs(pipe)
    assert (after[0] - before[0]).abs().max() > 0.1 and (after[1] - before[1]).abs().max() > 0.1  # it does something
    assert_matches(f"kohya {style}", diffusers_outputs(style, path, pipe), after)
    # the scale, changed later: diffusers' cross_attention_kwargs={"scale": s} and lora_scale=s
    pipe.set_lora_scale("kohya", 0.6)
    assert pipe.loras["kohya"].scale == 0.6
    assert_matches(f"kohya {style} scale 0.6", diffusers_outputs(style, path, pipe, 0.6), our_outputs(pipe))


def test_ldm_names_equal_diffusers_names(pipe, style, tmp_path):
    """kohya files with LDM module names (input_blocks_1_1_...) apply the same deltas."""
    unet, _, text, _, _ = build_reference(style)
    tensors = kohya_tensors(unet, text)
    pipe.load_lora(save(tensors, tmp_path / "diffusers_names.safetensors"))
    expected = our_outputs(pipe)
    pipe.unload_lora()
    # diffusers name -> LDM name through the (separately tested) checkpoint converter
    cfg = pipe.unet.config
    ldm = convert.unet_diffusers_to_ours(
        {f"{n}.weight": n for n in adaptable(unet)}, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels
    )
    renamed = {
        "lora_unet_" + d.replace(".", "_"): "lora_unet_" + k.removesuffix(".weight").replace(".", "_")
        for k, d in ldm.items()
    }
    assert any(v.startswith("lora_unet_input_blocks_") for v in renamed.values())
    tensors = {renamed.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}
    pipe.load_lora(save(tensors, tmp_path / "ldm_names.safetensors"))
    got = our_outputs(pipe)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def _peft_file(style, folder):
    """A PEFT LoRA on both networks (alpha != r, a rank_pattern and an alpha_pattern on the U-Net,
    rank-stabilised scaling on the text encoder), saved by diffusers' save_lora_weights as its
    training scripts do (text-encoder keys through convert_state_dict_to_diffusers)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, _, text, _, _ = build_reference(style)
    unet_modules = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    unet_modules += ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]
    unet_config = LoraConfig(
        r=4, lora_alpha=6, target_modules=unet_modules, rank_pattern={"proj_out": 2}, alpha_pattern={"to_k": 3}
    )
    text_config = LoraConfig(
        r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    )
    unet.add_adapter(unet_config)
    text.add_adapter(text_config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (unet, text):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    Loader.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_peft_file_matches_diffusers(pipe, style, tmp_path):
    path = _peft_file(style, tmp_path)
    keys = safetensors.safe_open(str(path), "pt").keys()
    assert any(".lora_A." in k for k in keys) and any(".lora_linear_layer." in k for k in keys)
    pipe.load_lora(path, scale=0.8)
    assert_matches(f"peft {style}", diffusers_outputs(style, path, pipe, 0.8), our_outputs(pipe))


def _old_diffusers_tensors(unet, text, g) -> dict:
    """diffusers' format before PEFT: attention processors' to_q_lora..., other layers' `.lora.`,
    the text encoder's to_q_lora / lora_linear_layer; no alphas (scale 1)."""
    out = {}
    processors = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    for name, module in adaptable(unet).items():
        parent, _, leaf = name.rpartition(".")
        if name.endswith("to_out.0"):
            parent, leaf = name[: -len(".to_out.0")], "to_out.0"
        stem = f"unet.{parent}.processor.{processors[leaf]}" if leaf in processors else f"unet.{name}.lora"
        out[f"{stem}.down.weight"], out[f"{stem}.up.weight"] = random_lora(module, 4, g)
    text_names = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    for name, module in adaptable(text).items():
        parent, _, leaf = name.rpartition(".")
        stem = f"text_encoder.text_model.{parent}.{text_names[leaf]}" if leaf in text_names else None
        stem = stem or f"text_encoder.text_model.{name}.lora_linear_layer"
        out[f"{stem}.down.weight"], out[f"{stem}.up.weight"] = random_lora(module, 4, g)
    return out


def test_old_diffusers_file_matches_diffusers(pipe, style, tmp_path):
    unet, _, text, _, _ = build_reference(style)
    path = save(_old_diffusers_tensors(unet, text, torch.Generator().manual_seed(3)), tmp_path / "old.safetensors")
    pipe.load_lora(path)
    assert_matches(f"old diffusers {style}", diffusers_outputs(style, path, pipe), our_outputs(pipe))


def test_our_kohya_file_loads_in_diffusers(pipe, style, tmp_path):
    """A LoRA we write (from a loaded one) reads back in diffusers with the same effect, and in ours."""
    unet, _, text, _, _ = build_reference(style)
    pipe.load_lora(save(kohya_tensors(unet, text, seed=7, alpha=1.5), tmp_path / "source.safetensors"), name="src")
    expected = our_outputs(pipe)
    out = tmp_path / "written.safetensors"
    pipe.save_lora("src", out)
    meta = safetensors.safe_open(str(out), "pt").metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1.5"
    assert meta["ss_base_model_version"] == ("sd_v2" if style == "sd2" else "sd_v1")
    assert meta["sshs_model_hash"][:12] == lora_hash(out)
    keys = safetensors.safe_open(str(out), "pt").keys()
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert_matches(f"our file in diffusers {style}", diffusers_outputs(style, out, pipe), expected)
    pipe.unload_lora()
    pipe.load_lora(out)
    again = our_outputs(pipe)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])


# ---------------------------------------------------------------------------------------------
# Applying: unload, fuse, several at once, scale 0


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part, sd in pipe.state_dicts().items() for k, v in sd.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def test_unload_is_bit_exact_and_weights_never_change(pipe, style, tmp_path):
    unet, _, text, _, _ = build_reference(style)
    weights, before = _state(pipe), our_outputs(pipe)
    pipe.load_lora(save(kohya_tensors(unet, text), tmp_path / "a.safetensors"))
    assert _same(weights, _state(pipe))
    assert not torch.equal(our_outputs(pipe)[0], before[0])
    pipe.fuse_lora()
    pipe.unfuse_lora()
    assert _same(weights, _state(pipe))
    pipe.unload_lora("a")
    after = our_outputs(pipe)
    assert pipe.loras == {}
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_fuse_equals_hooks(pipe, style, tmp_path):
    unet, _, text, _, _ = build_reference(style)
    pipe.load_lora(save(kohya_tensors(unet, text), tmp_path / "a.safetensors"), scale=0.7)
    pipe.load_lora(save(kohya_tensors(unet, text, seed=1, alpha=None), tmp_path / "b.safetensors"), scale=-0.4)
    hooked = our_outputs(pipe)
    pipe.fuse_lora()
    fused = our_outputs(pipe)
    assert max_diff(f"fused {style} unet", hooked[0], fused[0]) < ATOL
    assert max_diff(f"fused {style} text", hooked[1], fused[1]) < ATOL
    pipe.set_lora_scale("b", 0.3)  # while fused: unfused, rescaled, fused again
    fused = our_outputs(pipe)
    pipe.unfuse_lora()
    assert max_diff(f"refused {style} unet", our_outputs(pipe)[0], fused[0]) < ATOL


def test_two_loras_equal_one_holding_both(pipe, style, tmp_path):
    """LoRA A (scale 0.5) with LoRA B (scale 1.5) on: the same as one LoRA whose rank holds both."""
    unet, _, text, _, _ = build_reference(style)
    a = kohya_tensors(unet, text, seed=1, alpha=None)
    b = kohya_tensors(unet, text, seed=2, alpha=None)
    both = {}
    for key in a:
        if key.endswith("lora_down.weight"):
            both[key] = torch.cat([a[key], b[key]])
        else:  # up: columns of A and B, each with its LoRA's scale
            both[key] = torch.cat([a[key] * 0.5, b[key] * 1.5], dim=1)
    pipe.load_lora(save(a, tmp_path / "a.safetensors"), scale=0.5)
    pipe.load_lora(save(b, tmp_path / "b.safetensors"), scale=1.5)
    assert set(pipe.loras) == {"a", "b"}
    two = our_outputs(pipe)
    pipe.unload_lora()
    pipe.load_lora(save(both, tmp_path / "both.safetensors"))
    one = our_outputs(pipe)
    assert max_diff(f"two loras {style} unet", one[0], two[0]) < ATOL
    assert max_diff(f"two loras {style} text", one[1], two[1]) < ATOL


def test_scale_zero_is_no_lora(pipe, style, tmp_path):
    unet, _, text, _, _ = build_reference(style)
    before = our_outputs(pipe)
    pipe.load_lora(save(kohya_tensors(unet, text), tmp_path / "a.safetensors"), scale=0.0)
    after = our_outputs(pipe)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_bfloat16_model(pipe, style, tmp_path):
    """A bf16 model takes the LoRA in bf16 (adapters in the module's dtype), close to fp32."""
    unet, _, text, _, _ = build_reference(style)
    path = save(kohya_tensors(unet, text), tmp_path / "a.safetensors")
    pipe.load_lora(path)
    expected = our_outputs(pipe)
    pipe.unload_lora()
    pipe.to(dtype=torch.bfloat16)
    try:
        pipe.load_lora(path)
        network = pipe._lora_stack.networks["a"]
        assert all(p.dtype == torch.bfloat16 for p in network.parameters())
        x, t, ctx, ids = inputs(pipe)
        with torch.no_grad():
            got = pipe.unet(x.bfloat16(), t, ctx.bfloat16()).float()
        assert max_diff(f"bf16 {style} unet", expected[0], got) < 0.1 * expected[0].abs().max()
        pipe.fuse_lora()
        pipe.unfuse_lora()
    finally:
        pipe.unload_lora()
        pipe.to(dtype=torch.float32)


def test_info_names_and_errors(pipe, style, tmp_path):
    unet, _, text, _, _ = build_reference(style)
    path = save(kohya_tensors(unet, text), tmp_path / "my_style.safetensors")
    assert pipe.load_lora(path, scale=0.8) == "my_style"
    assert pipe.loras["my_style"] == (str(path), 0.8, lora_hash(path))
    assert pipe.load_lora(path, name="again") == "again"
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora(path)
    with pytest.raises(KeyError, match="no LoRA named 'nope'"):
        pipe.set_lora_scale("nope", 1.0)
    with pytest.raises(ValueError, match="finite"):
        pipe.set_lora_scale("again", float("nan"))
    pipe.unload_lora("again")
    assert list(pipe.loras) == ["my_style"]


def test_failed_load_applies_nothing(pipe, style, tmp_path):
    unet, _, text, _, _ = build_reference(style)
    tensors = kohya_tensors(unet, text)
    tensors["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_module.lora_up.weight"] = torch.zeros(8, 4)
    before = our_outputs(pipe)
    with pytest.raises(LoraFileError, match="no module 'no_such_module' in this model's U-Net"):
        pipe.load_lora(save(tensors, tmp_path / "bad.safetensors"))
    assert pipe.loras == {}
    assert torch.equal(our_outputs(pipe)[0], before[0])
    name = pipe.load_lora(tmp_path / "bad.safetensors", strict=False)
    assert [k for k, _ in pipe._lora_stack.networks[name].skipped] == ["lora_unet_no_such_module"]
