"""SDXL's two text encoders against transformers and diffusers on the same tiny random weights.

OpenAI CLIP ViT-L (quick_gelu, no projection) and OpenCLIP ViT-bigG (gelu, `text_projection`) are
both our CLIPTextModel: the penultimate hidden state without the final layer norm (diffusers'
`hidden_states[-2]`) and the projected pooled output must match transformers' within 1e-5, and the
SDXL prompt encoding must match diffusers' `StableDiffusionXLPipeline.encode_prompt`.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from reference import _randomize

from stablediff.errors import BadFileError
from stablediff.models.clip import CLIPTextModel
from stablediff.presets import PRESETS, TINY_SDXL_TEXT_G, TINY_SDXL_TEXT_L, ModelSpec
from stablediff.prompts import encode_chunks, encode_sdxl_chunks, encode_sdxl_prompt, tokenize_prompt
from stablediff.tokenizer import CLIPTokenizer
from stablediff.weights import convert

ATOL = 1e-5
PROMPTS = ["a photo of an astronaut riding a horse", "", "café, red car at night 🐱"]
LONG = ", ".join(f"word{i} thing" for i in range(25))  # 114 tokens: two chunks


def _hf_config(cfg, **special):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.width * cfg.mlp_ratio,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation,
        projection_dim=cfg.projection_dim or cfg.width,
        **special,
    )


@pytest.fixture(scope="module")
def towers():
    """transformers' CLIP-L (CLIPTextModel) and bigG (CLIPTextModelWithProjection, with SDXL's
    legacy special ids: eos_token_id 2 makes transformers pool at the argmax id), and ours with
    their weights converted."""
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection

    ref_l = HFText(_hf_config(TINY_SDXL_TEXT_L)).eval()
    ref_g = CLIPTextModelWithProjection(
        _hf_config(TINY_SDXL_TEXT_G, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    ).eval()
    _randomize(ref_l, 21)
    _randomize(ref_g, 22)
    ours_l, ours_g = CLIPTextModel(TINY_SDXL_TEXT_L).eval(), CLIPTextModel(TINY_SDXL_TEXT_G).eval()
    ours_l.load_state_dict(convert.text_transformers_to_ours(ref_l.state_dict()), strict=True)
    ours_g.load_state_dict(convert.text_transformers_to_ours(ref_g.state_dict(), keep_projection=True), strict=True)
    return ref_l, ref_g, ours_l, ours_g


@pytest.fixture(scope="module")
def tokenizers():
    return CLIPTokenizer.default(), CLIPTokenizer.default(pad_token="!")


def _diff(name: str, expected: torch.Tensor, got: torch.Tensor) -> float:
    assert expected.shape == got.shape, f"{name}: {tuple(expected.shape)} != {tuple(got.shape)}"
    diff = (expected - got).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e}")
    return diff


def _encoders(ours_l, ours_g, clip_skip: int = 1):
    """Our two towers as the callables prompts.py takes; clip skip counted as the pipeline does."""
    skip = TINY_SDXL_TEXT_L.skip_layers + clip_skip - 1
    return (lambda ids: ours_l(ids, skip_layers=skip), lambda ids: ours_g.encode_pooled(ids, skip_layers=skip))


@torch.no_grad()
def test_towers_match_transformers(towers, tokenizers):
    ref_l, ref_g, ours_l, ours_g = towers
    pairs = [(tokenizers[0], ref_l, ours_l, "pooler_output"), (tokenizers[1], ref_g, ours_g, "text_embeds")]
    for tok, ref, ours, pooled_name in pairs:
        ids = torch.tensor([tok(p) for p in PROMPTS])
        out = ref(ids, output_hidden_states=True)
        context, pooled = ours.encode_pooled(ids)
        assert _diff("penultimate, no final norm", out.hidden_states[-2], context) < ATOL
        assert _diff("pooled", getattr(out, pooled_name), pooled) < ATOL
        assert torch.equal(ours(ids), context)
        assert _diff("clip skip 2", out.hidden_states[-3], ours(ids, skip_layers=2)) < ATOL
        assert _diff("last layer", out.hidden_states[-1], ours(ids, skip_layers=0)) < ATOL
    # the SD 1.x/2.x reading (final norm on the context) is unchanged by the new fields
    plain = CLIPTextModel(dataclasses.replace(TINY_SDXL_TEXT_L, skip_layers=0, context_norm=True)).eval()
    plain.load_state_dict(ours_l.state_dict())
    ids = torch.tensor([tokenizers[0](PROMPTS[0])])
    assert _diff("sd1 context", ref_l(ids).last_hidden_state, plain(ids)) < ATOL


def _reference_pipeline(towers, tokenizers, tmp_path, force_zeros: bool):
    """diffusers' SDXL pipeline on the same towers; encode_prompt needs no U-Net or VAE."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    hf = []
    for i, tok in enumerate(tokenizers):
        tok.save(tmp_path / f"tokenizer_{i}")
        hf.append(HFTokenizer.from_pretrained(tmp_path / f"tokenizer_{i}"))
    assert (hf[0].pad_token_id, hf[1].pad_token_id) == (49407, 0)  # tokenizer_2 pads with "!"
    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=towers[0],
        text_encoder_2=towers[1],
        tokenizer=hf[0],
        tokenizer_2=hf[1],
        unet=None,
        scheduler=EulerDiscreteScheduler(),
        force_zeros_for_empty_prompt=force_zeros,
    )


CASES = {
    "prompt": dict(prompt="a red car"),
    "prompt_2": dict(prompt="a red car", prompt_2="oil painting, night"),
    "negatives": dict(prompt="a red car", negative_prompt="blurry", negative_prompt_2="lowres, text"),
    "negative 1 only": dict(prompt="a dog", negative_prompt="cat"),
    "empty negative, zeros": dict(prompt="a red car", force_zeros=True),
    "empty negative, encoded": dict(prompt="a red car", force_zeros=False),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_sdxl_prompt_matches_diffusers(towers, tokenizers, tmp_path, case):
    kw = dict(CASES[case])
    force_zeros = kw.pop("force_zeros", True)
    ref = _reference_pipeline(towers, tokenizers, tmp_path, force_zeros)
    # diffusers zeroes the negative for `negative_prompt=None`; ours for an empty negative prompt
    expected = ref.encode_prompt(
        device="cpu", do_classifier_free_guidance=True, **{k: v for k, v in kw.items() if v != ""}
    )
    got = encode_sdxl_prompt(tokenizers, _encoders(*towers[2:]), force_zeros_for_empty_prompt=force_zeros, **kw)
    names = ("context", "uncond_context", "pooled", "uncond_pooled")
    for name, e in zip(names, expected, strict=True):
        assert _diff(f"{case}: {name}", e, getattr(got, name)) < ATOL
    if force_zeros and "negative_prompt" not in kw:
        assert not got.uncond_context.any() and not got.uncond_pooled.any()


@torch.no_grad()
def test_clip_skip_matches_diffusers(towers, tokenizers, tmp_path):
    """Our clip skip 2 (A1111's count: 1 is SDXL's own penultimate layer) is diffusers' clip_skip=1
    (`hidden_states[-3]`). diffusers applies it to the prompt only; we to both, so only the
    prompt's context is compared."""
    ref = _reference_pipeline(towers, tokenizers, tmp_path, True)
    context, _, pooled, _ = ref.encode_prompt("a red car", device="cpu", clip_skip=1)
    got = encode_sdxl_prompt(tokenizers, _encoders(*towers[2:], clip_skip=2), "a red car")
    assert _diff("clip skip context", context, got.context) < ATOL
    assert _diff("clip skip pooled (always the last layer)", pooled, got.pooled) < ATOL


@torch.no_grad()
def test_long_prompts_weights_and_pooled_from_the_first_chunk(towers, tokenizers):
    enc_l, enc_g = _encoders(*towers[2:])
    prompt = f"a (red:1.3) car, {LONG}"
    got = encode_sdxl_prompt(tokenizers, (enc_l, enc_g), prompt, "blurry BREAK lowres BREAK ugly")
    chunks = [tokenize_prompt(t, prompt) for t in tokenizers]
    assert len(chunks[0]) == 2
    assert encode_sdxl_prompt(tokenizers, (enc_l, enc_g), prompt).context.shape == (1, 154, 64)
    # three negative chunks: the prompt gets a third, empty one
    assert got.context.shape == got.uncond_context.shape == (1, 231, 64)
    # each encoder's chunks weighted on their own (A1111), then side by side along the width
    assert torch.equal(got.context[:, :154, :32], encode_chunks(enc_l, chunks[0]))
    assert torch.equal(got.context[:, :154, 32:], encode_chunks(lambda ids: enc_g(ids)[0], chunks[1]))
    blank = torch.tensor([tokenizers[0]("")])
    assert torch.equal(got.context[:, 154:, :32], enc_l(blank))
    # the pooled embedding: encoder 2 on the first chunk alone, emphasis not applied
    plain = [tokenize_prompt(t, f"a red car, {LONG}") for t in tokenizers]
    assert plain[1][0].ids == chunks[1][0].ids and not chunks[1][0].plain
    assert torch.equal(got.pooled, enc_g(torch.tensor([plain[1][0].ids]))[1])
    assert not torch.equal(got.pooled, enc_g(torch.tensor([plain[1][1].ids]))[1])
    # the two tokenizers chunk alike and pad with their own pad token
    for a, b in zip(*chunks, strict=True):
        assert a.n_tokens == b.n_tokens and a.ids[: a.n_tokens + 2] == b.ids[: b.n_tokens + 2]
    assert chunks[0][1].ids[-1] == 49407 and chunks[1][1].ids[-1] == 0


@torch.no_grad()
def test_prompt_2_of_another_length_is_padded(towers, tokenizers):
    encoders = _encoders(*towers[2:])
    got = encode_sdxl_prompt(tokenizers, encoders, "a cat", prompt_2=LONG)
    assert got.context.shape == (1, 154, 64) and got.uncond_context.shape == (1, 154, 64)
    # without force_zeros_for_empty_prompt the empty negative prompt is encoded, chunk by chunk
    blank = [torch.tensor([t("")]) for t in tokenizers]
    empty = torch.cat([encoders[0](blank[0]), encoders[1](blank[1])[0]], dim=-1)
    assert torch.equal(got.uncond_context, torch.cat([empty, empty], dim=1))
    assert torch.equal(got.context[:, 77:, :32], encoders[0](blank[0]))  # prompt 1 padded with ""
    with pytest.raises(ValueError, match="as many chunks"):
        encode_sdxl_chunks(*encoders, tokenize_prompt(tokenizers[0], "a"), tokenize_prompt(tokenizers[1], LONG))


def test_textual_inversion_reaches_both_encoders(tokenizers):
    """An embedding named in the prompt reaches each encoder as (ids, fixes) at the same place; which
    vectors each encoder reads, and the parity with diffusers: tests/test_sdxl_addons.py."""
    from stablediff.embeddings import Embedding, EmbeddingTable

    table = EmbeddingTable()
    embedding = Embedding("<xl-tok>", torch.zeros(2, 32), "", "sdxl", vectors_2=torch.ones(2, 32))
    table.add(embedding)
    seen = []

    def first(ids, fixes=()):
        seen.append((ids[0, :5].tolist(), fixes))
        return torch.zeros(1, ids.shape[1], 32)

    def second(ids, fixes=()):
        return first(ids, fixes), torch.zeros(1, 32)

    encode_sdxl_prompt(tokenizers, (first, second), "a <xl-tok> cat", negative_prompt="dog", embeddings=table)
    cat, dog = tokenizers[0].encode("cat")[0], tokenizers[0].encode("dog")[0]
    prompt = ([tokenizers[0].bos_id, tokenizers[0].encode("a")[0], 0, 0, cat], ((2, embedding),))
    negative = ([tokenizers[0].bos_id, dog, tokenizers[0].eos_id], ())
    assert seen[:2] == [prompt, prompt] and [(ids[:3], fixes) for ids, fixes in seen[2:]] == [negative, negative]


def _openclip_names(sd: dict) -> dict:
    """transformers' names -> OpenCLIP's, written out here independently of convert.py: q/k/v fused
    into in_proj, the projection stored transposed."""
    renames = [
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        ("text_model.final_layer_norm.", "ln_final."),
        ("text_model.encoder.layers.", "transformer.resblocks."),
        (".layer_norm1.", ".ln_1."),
        (".layer_norm2.", ".ln_2."),
        (".self_attn.out_proj.", ".attn.out_proj."),
        (".mlp.fc1.", ".mlp.c_fc."),
        (".mlp.fc2.", ".mlp.c_proj."),
    ]
    out = {}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        if ".self_attn.q_proj." in key:
            base, kind = key.split(".self_attn.q_proj.")
            fused = torch.cat([sd[f"{base}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")])
            key, value = f"{base}.attn.in_proj_{kind}", fused
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def test_single_file_text_towers_convert(towers):
    """SDXL's single-file layout: CLIP-L under conditioner.embedders.0.transformer.text_model.,
    bigG in OpenCLIP's names under conditioner.embedders.1.model.; ours both ways, and diffusers'
    own converters read what we write back to the reference weights."""
    from diffusers.loaders import single_file_utils as sfu

    ref_l, ref_g, ours_l, ours_g = towers
    ckpt = {f"{convert.SDXL_TEXT_PREFIX}{k}": v for k, v in ref_l.state_dict().items()}
    ckpt.update({convert.SDXL_TEXT_2_PREFIX + k: v for k, v in _openclip_names(ref_g.state_dict()).items()})
    ckpt[convert.SDXL_TEXT_2_PREFIX + "logit_scale"] = torch.tensor(4.6)
    ckpt[convert.SDXL_TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    text, text_2 = convert.sdxl_text_from_single_file(ckpt)
    for name, got, ours in (("clip-l", text, ours_l), ("bigG", text_2, ours_g)):
        expected = ours.state_dict()
        assert set(got) == set(expected), f"{name}: {sorted(set(got) ^ set(expected))[:5]}"
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    written = convert.sdxl_text_to_single_file(ours_l.state_dict(), ours_g.state_dict())
    unused = {"logit_scale", "embeddings.position_ids"}
    assert set(written) == {k for k in ckpt if not k.endswith(tuple(unused))}
    assert all(torch.equal(written[k], ckpt[k]) for k in written)
    # diffusers' single-file loader reads our layout to the reference weights
    got_g = sfu.convert_open_clip_checkpoint(ref_g, written, prefix=convert.SDXL_TEXT_2_PREFIX)
    got_l = sfu.convert_ldm_clip_checkpoint(written)
    for name, got, ref in (("bigG", got_g, ref_g), ("clip-l", got_l, ref_l)):
        expected = ref.state_dict()
        got = {k if k in expected else k.removeprefix("text_model."): v for k, v in got.items()}
        assert set(got) == set(expected), f"{name}: {sorted(set(got) ^ set(expected))[:5]}"
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_transformers_layout_and_config_round_trip(towers):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    ref_g, ours_g = towers[1], towers[3]
    back = convert.text_ours_to_transformers(ours_g.state_dict())
    assert "text_projection.weight" in back
    fresh = CLIPTextModelWithProjection(ref_g.config)
    fresh.load_state_dict(back, strict=True)
    fields = convert.text_config_from_transformers(ref_g.config.to_dict(), with_projection=True)
    assert fields["projection_dim"] == TINY_SDXL_TEXT_G.projection_dim
    assert convert.text_config_from_transformers(ref_g.config.to_dict())["projection_dim"] is None
    written = convert.text_config_to_transformers({**TINY_SDXL_TEXT_G.to_dict()}, 49406, 49407, 0)
    assert written["architectures"] == ["CLIPTextModelWithProjection"] and written["projection_dim"] == 32
    assert CLIPTextConfig(**written).projection_dim == 32
    sd1 = convert.text_config_to_transformers(PRESETS["tiny"].text.to_dict(), 49406, 49407, 49407)
    assert sd1["architectures"] == ["CLIPTextModel"] and sd1["projection_dim"] == 32


def test_model_spec_text_2_field():
    tiny = PRESETS["tiny"]
    spec = dataclasses.replace(
        tiny,
        name="tiny-two-towers",
        unet=dataclasses.replace(tiny.unet, context_dim=64),
        text=TINY_SDXL_TEXT_L,
        text_2=TINY_SDXL_TEXT_G,
    )
    assert ModelSpec.from_json(spec.to_json()) == spec
    # specs stored before text_2 existed load as before, with no second tower
    stored = json.loads(tiny.to_json())
    for key in ("text_2", "pad_token_2"):
        stored.pop(key)
    for key in ("context_norm", "projection_dim"):
        stored["text"].pop(key)
    assert ModelSpec.from_json(json.dumps(stored)) == tiny and tiny.text_2 is None
    with pytest.raises(ValueError, match=r"context_dim 32 != text width 64 \(32 \+ 32\)"):
        dataclasses.replace(tiny, text_2=TINY_SDXL_TEXT_G)
    bad = json.loads(spec.to_json())
    bad["text_2"]["projection_dim"] = 10**6
    with pytest.raises(BadFileError, match="text_2: projection_dim"):
        ModelSpec.from_json(json.dumps(bad))
