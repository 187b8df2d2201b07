"""SDXL LoRAs and textual-inversion embeddings against diffusers on the same tiny random model.

A tiny SDXL base (the U-Net of test_sdxl_unet, CLIP-L and a projected bigG-like tower, both with
transformers' default special ids) is written by diffusers' own `save_pretrained` and loaded by our
`load_pipeline`. Each LoRA file is applied by `StableDiffusionXLPipeline.load_lora_weights` to fresh
copies of diffusers' networks and by `pipe.load_lora` to ours; the U-Net output and both text
encoders' last hidden states (and bigG's projected pooled output) must agree within 1e-5. Text
encoders are compared at their last layer, so that a LoRA on any layer shows. Embeddings: diffusers'
`load_textual_inversion` (clip_l into `text_encoder`, clip_g into `text_encoder_2`) against
`pipe.load_embedding`, through each side's SDXL prompt encoding.

diffusers drops the per-module alphas of a kohya file on some modules (see test_lora.py), so the
kohya files here have one alpha for every module (alpha != rank).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import safetensors
import safetensors.torch
import torch
from test_sdxl_pipeline import SDXL_SCHEDULER, _save, _text, tiny_xl_pipeline

from stablediff.errors import BadFileError
from stablediff.loading import load_pipeline
from stablediff.lora import LoraFileError
from stablediff.models.unet import micro_conditioning, sdxl_time_ids
from stablediff.params import GenerationParams
from stablediff.weights import convert

ATOL = 1e-5
TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # what kohya adapts in a text encoder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine, threads waiting for each other make these
    tiny networks 100x slower (as tests/test_train_unet.py says)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return build_xl(tmp_path_factory.mktemp("sdxl_addons"))


def build_xl(tmp):
    """(diffusers' StableDiffusionXLPipeline, its folder `tmp/base`, ours loaded from the folder)."""
    from diffusers import EulerDiscreteScheduler

    reference = tiny_xl_pipeline(
        tmp, EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), 50, partial(_text, legacy_ids=False)
    )
    folder = _save(reference, tmp / "base")
    return reference, folder, load_pipeline(folder)


@pytest.fixture
def pipe(xl):
    ours = xl[2]
    yield ours
    ours.unload_lora()
    ours.unload_embedding()


def _fresh(xl):
    """A diffusers pipeline with copies of the reference networks (LoRAs and embeddings change them)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    reference, folder, _ = xl
    return StableDiffusionXLPipeline(
        vae=reference.vae,
        text_encoder=copy.deepcopy(reference.text_encoder),
        text_encoder_2=copy.deepcopy(reference.text_encoder_2),
        tokenizer=HFTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=HFTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=copy.deepcopy(reference.unet),
        scheduler=reference.scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _inputs(pipe):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    time_ids = sdxl_time_ids((96, 64), (8, 0), target_size=(64, 64))
    prompts = ["a photo of an astronaut riding a horse", ""]
    ids = torch.tensor(pipe.tokenizer(prompts))
    ids_2 = torch.tensor(pipe.tokenizer_2(prompts))
    return x, torch.tensor([3.0, 617.5]), ctx, pooled, time_ids, ids, ids_2


@torch.no_grad()
def _ours(pipe):
    """U-Net output, both towers' last hidden states (before the final norm), bigG's pooled output."""
    x, t, ctx, pooled, time_ids, ids, ids_2 = _inputs(pipe)
    hidden_2, pooled_2 = pipe.text_encoder_2.encode_pooled(ids_2, skip_layers=0)
    unet = pipe.unet(x, t, ctx, y=micro_conditioning(pooled, time_ids))
    return unet, pipe.text_encoder(ids, skip_layers=0), hidden_2, pooled_2


@torch.no_grad()
def _theirs(reference, pipe):
    x, t, ctx, pooled, time_ids, ids, ids_2 = _inputs(pipe)
    added = {"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}
    out_2 = reference.text_encoder_2(ids_2, output_hidden_states=True)
    return (
        reference.unet(x, t, ctx, added_cond_kwargs=added).sample,
        reference.text_encoder(ids, output_hidden_states=True).hidden_states[-1],
        out_2.hidden_states[-1],
        out_2.text_embeds,
    )


def _assert_matches(case: str, expected, got) -> None:
    for name, a, b in zip(("unet", "text", "text_2", "pooled"), expected, got, strict=True):
        diff = (a - b).abs().max().item()
        print(f"{case} {name}: max abs diff {diff:.3e} (reference max |x| {a.abs().max().item():.3f})")
        assert diff < ATOL, f"{case} {name}"


def _diffusers_with(xl, path, pipe):
    reference = _fresh(xl)
    reference.load_lora_weights(str(path))
    return _theirs(reference, pipe)


# ---------------------------------------------------------------------------------------------
# LoRA files


def _adaptable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _random_lora(module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, torch.nn.Linear):
        down, up = (
            torch.randn(rank, module.in_features, generator=g),
            torch.randn(module.out_features, rank, generator=g),
        )
    else:
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g)
    return down * 0.1, up * 0.1


def _kohya_sdxl(pipe, seed: int = 0, alpha: float = 2.5, unet_names: str = "sgm") -> dict[str, torch.Tensor]:
    """A kohya SDXL file over every Linear and Conv2d of our U-Net (attention, ff, projections,
    resnets, samplers, conv_in/out, time and added-conditioning embeddings), named as kohya's
    sdxl_train_network does (the original SGM names, which are ours) or, with unet_names="diffusers",
    in diffusers' spelling; and the text encoders' layers as lora_te1_ / lora_te2_. Rank 4 for
    Linear, 3 for Conv2d."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    renamed = convert.unet_module_names_to_diffusers(
        _adaptable(pipe.unet), cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels
    )
    out = {}
    for name, module in _adaptable(pipe.unet).items():
        spelled = name if unet_names == "sgm" else renamed[name]
        stem = "lora_unet_" + spelled.replace(".", "_")
        rank = 4 if isinstance(module, torch.nn.Linear) else 3
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = _random_lora(module, rank, g)
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for name, module in _adaptable(encoder).items():
            if name.rsplit(".", 1)[-1] not in TEXT_MODULES:
                continue
            stem = prefix + ("text_model." + name).replace(".", "_")
            out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = _random_lora(module, 4, g)
            out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def _write(tensors: dict, path, metadata: dict | None = None):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def test_kohya_sdxl_file_matches_diffusers(xl, pipe, tmp_path):
    tensors = _kohya_sdxl(pipe)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_label_emb_0_0.lora_up.weight" in tensors and "lora_unet_middle_block_1_proj_in.alpha" in tensors
    path = _write(tensors, tmp_path / "kohya_xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    before = _ours(pipe)
    pipe.load_lora(path)
    after = _ours(pipe)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() > 1e-2  # every part changes
    theirs = _diffusers_with(xl, path, pipe)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(before, theirs, strict=True))  # applied there too
    _assert_matches("kohya sdxl", theirs, after)
    # diffusers' spelling of the U-Net modules in a kohya file (lora_unet_down_blocks_...) means the same
    pipe.unload_lora()
    assert all(torch.equal(a, b) for a, b in zip(before, _ours(pipe), strict=True))
    pipe.load_lora(_write(_kohya_sdxl(pipe, unet_names="diffusers"), tmp_path / "kohya_diffusers_names.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(after, _ours(pipe), strict=True))


def _peft_file(xl, folder):
    """A PEFT LoRA on all three networks (alpha != r, a rank_pattern and an alpha_pattern on the U-Net,
    rank-stabilised scaling on bigG), saved by diffusers' StableDiffusionXLPipeline.save_lora_weights."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    reference = _fresh(xl)
    unet_modules = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    configs = {
        "unet": LoraConfig(
            r=4, lora_alpha=6, target_modules=unet_modules + ["conv1", "conv2", "time_emb_proj"],
            rank_pattern={"proj_out": 2}, alpha_pattern={"to_k": 3},
        ),
        "text_encoder": LoraConfig(r=3, lora_alpha=5, target_modules=list(TEXT_MODULES)),
        "text_encoder_2": LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=list(TEXT_MODULES)),
    }  # fmt: skip
    g = torch.Generator().manual_seed(5)
    layers = {}
    for name, config in configs.items():
        net = getattr(reference, name)
        net.add_adapter(config)
        with torch.no_grad():
            for key, p in net.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        state = get_peft_model_state_dict(net)
        layers[name] = state if name == "unet" else convert_state_dict_to_diffusers(state)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_peft_sdxl_file_matches_diffusers(xl, pipe, tmp_path):
    path = _peft_file(xl, tmp_path)
    keys = list(safetensors.safe_open(str(path), "pt").keys())
    assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("unet.") for k in keys)
    before = _ours(pipe)
    pipe.load_lora(path)
    after = _ours(pipe)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(before, after, strict=True))
    _assert_matches("peft sdxl", _diffusers_with(xl, path, pipe), after)


def test_our_sdxl_kohya_file_loads_in_diffusers(xl, pipe, tmp_path):
    """A LoRA we write on SDXL has kohya's SDXL names and metadata; diffusers and ours read it alike."""
    pipe.load_lora(_write(_kohya_sdxl(pipe, seed=7, alpha=1.5), tmp_path / "source.safetensors"), name="src")
    expected = _ours(pipe)
    out = tmp_path / "written.safetensors"
    pipe.save_lora("src", out)
    meta = safetensors.safe_open(str(out), "pt").metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    keys = set(safetensors.safe_open(str(out), "pt").keys())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in keys  # an upsampler, SGM-named
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_down.weight" in keys
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_te_")) for k in keys)
    _assert_matches("our sdxl file in diffusers", _diffusers_with(xl, out, pipe), expected)
    pipe.unload_lora()
    pipe.load_lora(out)
    assert all(torch.equal(a, b) for a, b in zip(expected, _ours(pipe), strict=True))


def test_text_scale_applies_to_both_text_encoders(pipe, tmp_path):
    path = _write(_kohya_sdxl(pipe), tmp_path / "xl.safetensors")
    plain = _ours(pipe)
    pipe.load_lora(path)
    full = _ours(pipe)
    pipe.set_lora_scale("xl", 1.0, text_scale=0.0)  # A1111's <lora:xl:0:1>: the U-Net part only
    unet_only = _ours(pipe)
    assert torch.equal(unet_only[0], full[0])
    assert all(torch.equal(a, b) for a, b in zip(unet_only[1:], plain[1:], strict=True))


def test_other_family_loras_are_clear_errors(pipe, tmp_path):
    # kohya's SD 1.x text-encoder prefix on SDXL
    sd1 = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
    }
    with pytest.raises(LoraFileError, match=r"an SD 1\.x/2\.x LoRA \(keys such as 'lora_te_.*this model is SDXL"):
        pipe.load_lora(_write(sd1, tmp_path / "sd1.safetensors"))
    # an SD 1.x U-Net-only LoRA (diffusers names, 768-wide cross-attention) says which family it is for
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    cross = {f"{key}.lora_A.weight": torch.zeros(4, 768), f"{key}.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(LoraFileError, match=r"768-wide text features \(SD 1\.x\), this model's are 64 wide"):
        pipe.load_lora(_write(cross, tmp_path / "sd1_unet.safetensors"))
    meta = {"ss_base_model_version": "sd_v1"}  # U-Net keys alone do not tell the family; kohya's metadata does
    unet_only = {k: v for k, v in _kohya_sdxl(pipe).items() if k.startswith("lora_unet_")}
    with pytest.raises(LoraFileError, match=r"an SD 1\.x/2\.x LoRA \(ss_base_model_version = 'sd_v1'\)"):
        pipe.load_lora(_write(unet_only, tmp_path / "tagged.safetensors", meta))
    assert pipe.loras == {}
    # and an SDXL LoRA on SD 1.x
    sd1_pipe = load_pipeline("tiny")
    with pytest.raises(LoraFileError, match=r"an SDXL LoRA \(keys such as 'lora_te1_.*this model is SD 1\.x/2\.x"):
        sd1_pipe.load_lora(_write(_kohya_sdxl(pipe), tmp_path / "xl.safetensors"))


def test_refiner_reads_the_second_text_encoder_keys(tmp_path):
    refiner = load_pipeline("tiny-sdxl-refiner", seed=3)
    q = "text_model_encoder_layers_0_self_attn_q_proj"
    down, up = torch.randn(4, 32) * 0.1, torch.randn(32, 4) * 0.1
    te2 = {f"lora_te2_{q}.lora_down.weight": down, f"lora_te2_{q}.lora_up.weight": up}
    ids = torch.tensor(refiner.tokenizer(["a cat"]))
    before = refiner.text_encoder(ids, skip_layers=0)
    refiner.load_lora(_write(te2, tmp_path / "te2.safetensors"))
    assert (refiner.text_encoder(ids, skip_layers=0) - before).abs().max() > 1e-3
    written = tmp_path / "written.safetensors"
    refiner.save_lora("te2", written)
    assert f"lora_te2_{q}.lora_down.weight" in safetensors.safe_open(str(written), "pt").keys()
    te1 = {k.replace("lora_te2_", "lora_te1_"): v for k, v in te2.items()}
    with pytest.raises(LoraFileError, match="the SDXL refiner has no first text encoder"):
        refiner.load_lora(_write(te1, tmp_path / "te1.safetensors"))


# ---------------------------------------------------------------------------------------------
# Textual-inversion embeddings

TOKEN = "<xl-style>"


def _sdxl_embedding(path, n: int = 2, seed: int = 9, widths=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    vectors = {"clip_l": torch.randn(n, widths[0], generator=g), "clip_g": torch.randn(n, widths[1], generator=g)}
    safetensors.torch.save_file(vectors, str(path))
    return path, vectors


@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_sdxl_embedding_matches_diffusers(xl, pipe, tmp_path, n):
    path, vectors = _sdxl_embedding(tmp_path / "xl-style.safetensors", n=n)
    assert pipe.load_embedding(path, token=TOKEN) == TOKEN
    assert pipe.embeddings[TOKEN].format == "sdxl" and torch.equal(pipe.embeddings[TOKEN].vectors_2, vectors["clip_g"])
    reference = _fresh(xl)
    for key, encoder, tokenizer in (
        ("clip_l", "text_encoder", "tokenizer"),
        ("clip_g", "text_encoder_2", "tokenizer_2"),
    ):
        reference.load_textual_inversion(
            vectors[key], token=TOKEN, text_encoder=getattr(reference, encoder), tokenizer=getattr(reference, tokenizer)
        )
    cases = {
        "prompt": dict(prompt=f"a photo of {TOKEN}, red car"),
        "both prompts and negatives": dict(
            prompt=f"{TOKEN} at night", prompt_2=f"oil painting by {TOKEN}", negative_prompt=f"blurry {TOKEN}",
            negative_prompt_2="text",
        ),
    }  # fmt: skip
    for case, kw in cases.items():
        ours = pipe.encode_sdxl_prompt(GenerationParams(**kw))
        theirs = reference.encode_prompt(**kw, device="cpu", do_classifier_free_guidance=True)
        names = ("context", "uncond context", "pooled", "uncond pooled")
        got = (ours.context, ours.uncond_context, ours.pooled, ours.uncond_pooled)
        for name, a, b in zip(names, theirs, got, strict=True):
            diff = (a - b).abs().max().item()
            print(f"embedding ({n} vectors), {case}, {name}: max abs diff {diff:.3e}")
            assert diff < ATOL, (case, name)
    pipe.unload_embedding()
    plain = pipe.encode_sdxl_prompt(GenerationParams(**cases["prompt"]))
    assert (plain.context - ours.context).abs().max() > 1e-3  # the embedding mattered (case "prompt" above)


def test_sdxl_embedding_generates_and_names_itself(pipe, tmp_path):
    path, _ = _sdxl_embedding(tmp_path / "xlstyle.safetensors")
    params = GenerationParams(f"a cat, {TOKEN}", width=64, height=64, steps=2, sampler="euler", seed=3)
    without = pipe.generate(params)[0]
    pipe.embeddings_dir = tmp_path  # loaded by name the first time a prompt says it
    try:
        named = pipe.generate(
            GenerationParams("a cat, xlstyle", width=64, height=64, steps=2, sampler="euler", seed=3)
        )[0]
    finally:
        pipe.embeddings_dir = None
    assert "xlstyle" in pipe.last_embeddings and "xlstyle" in pipe.embeddings
    pipe.unload_embedding()
    pipe.load_embedding(path, token=TOKEN)
    with_token = pipe.generate(params)[0]
    assert with_token.tobytes() == named.tobytes() and with_token.tobytes() != without.tobytes()


def test_embedding_family_and_shape_errors(pipe, tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(2, 768)}, str(sd1))
    with pytest.raises(BadFileError, match=r"one text encoder \(768 wide, SD 1\.x\), but this model is SDXL"):
        pipe.load_embedding(sd1, token=TOKEN)
    wide, _ = _sdxl_embedding(tmp_path / "wide.safetensors", widths=(768, 1280))
    with pytest.raises(BadFileError, match=r"clip_l / clip_g vectors are 768 / 1280 wide.*take 32 / 32"):
        pipe.load_embedding(wide, token=TOKEN)
    odd = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 32)}, str(odd))
    with pytest.raises(BadFileError, match="clip_l has 2 vectors and clip_g 3"):
        pipe.load_embedding(odd, token=TOKEN)
    half = tmp_path / "half.safetensors"
    safetensors.torch.save_file({"clip_l": torch.randn(2, 32)}, str(half))
    with pytest.raises(BadFileError, match="needs both clip_l and clip_g vectors.*clip_g is missing"):
        pipe.load_embedding(half, token=TOKEN)
    assert not pipe.embeddings
    xl_file, _ = _sdxl_embedding(tmp_path / "xl.safetensors", widths=(768, 1280))
    with pytest.raises(BadFileError, match=r"an SDXL embedding .*this model has one text encoder.*SDXL models only"):
        load_pipeline("tiny").load_embedding(xl_file, token=TOKEN)
    with pytest.raises(ValueError, match="embeddings on an SDXL refiner are not supported yet"):
        load_pipeline("tiny-sdxl-refiner").load_embedding(xl_file, token=TOKEN)
