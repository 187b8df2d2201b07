"""SDXL files in and out (issue 19): the original single files (Stability's keys) and diffusers folders.

tiny-sdxl and tiny-sdxl-refiner are saved in both layouts and must load back bit-exact; diffusers'
own `from_pretrained` reads our folders (its U-Net, VAE and prompt encoding equal ours within 1e-5)
and its `from_single_file(path, config=<our folder>)` reads our single files to the same weights,
offline. The single file's keys are checked against what diffusers' single-file loader (written for
Stability's files) expects at full size, on the meta device. Foreign files (no stored spec) are
recognised from their shapes; broken ones end in one BadFileError naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablediff.cli import main
from stablediff.errors import BadFileError
from stablediff.loading import SPEC_CHECKSUM_KEY, SPEC_METADATA_KEY, load_pipeline, read_spec, save
from stablediff.models.clip import CLIPTextConfig, CLIPTextModel
from stablediff.models.unet import UNetConfig, UNetModel, micro_conditioning, sdxl_time_ids
from stablediff.models.vae import AutoencoderKL, VAEConfig
from stablediff.params import GenerationParams
from stablediff.presets import PRESETS
from stablediff.single_file import join_single_file
from stablediff.weights.io import read_metadata
from stablediff.weights.strict import WeightMismatchError

ATOL = 1e-5
NAMES = ("tiny-sdxl", "tiny-sdxl-refiner")
LAYOUTS = ("single-file", "diffusers")
BASE, REFINER = "conditioner.embedders.1.model.", "conditioner.embedders.0.model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."


def _file_name(name: str, layout: str) -> str:
    return f"{name}.safetensors" if layout == "single-file" else name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (pipe, {layout: path})} for the tiny SDXL presets."""
    tmp = tmp_path_factory.mktemp("sdxl-files")
    out = {}
    for name in NAMES:
        pipe = load_pipeline(name, seed=7)
        out[name] = (pipe, {layout: save(pipe, tmp / _file_name(name, layout), layout=layout) for layout in LAYOUTS})
    return out


def _assert_same_weights(a, b, what: str) -> None:
    sa, sb = a.state_dicts(), b.state_dicts()
    assert sa.keys() == sb.keys(), what
    for part in sa:
        assert sa[part].keys() == sb[part].keys(), f"{what}: {part}"
        bad = [k for k in sa[part] if not torch.equal(sa[part][k], sb[part][k])]
        assert not bad, f"{what}: {part} differs at {bad[:3]}"


# --- our own round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_exact(saved, tmp_path, name, layout):
    pipe, paths = saved[name]
    back = load_pipeline(paths[layout])
    _assert_same_weights(pipe, back, f"{name} {layout}")
    assert back.spec == pipe.spec and read_spec(paths[layout]) == pipe.spec
    assert (back.text_encoder_2 is None) == (name == "tiny-sdxl-refiner")
    assert back.tokenizer.pad_token == pipe.tokenizer.pad_token
    if back.tokenizer_2 is not None:
        assert back.tokenizer_2.pad_token == pipe.tokenizer_2.pad_token == "!"
    if layout == "single-file":  # written again: the same tensors under the same keys, the same metadata
        again = save(back, tmp_path / "again.safetensors")
        first, second = load_file(paths[layout]), load_file(again)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
        assert read_metadata(again) == read_metadata(paths[layout])


@pytest.mark.parametrize("name", NAMES)
def test_cli_convert_both_ways(saved, tmp_path, capsys, name):
    pipe, paths = saved[name]
    folder, file = tmp_path / "folder", tmp_path / "back.safetensors"
    assert main(["convert", str(paths["single-file"]), str(folder), "--layout", "diffusers"]) == 0
    assert main(["convert", str(folder), str(file)]) == 0
    assert capsys.readouterr().out.split() == [str(folder), str(file)]
    _assert_same_weights(pipe, load_pipeline(file), f"{name} file -> folder -> file")
    assert load_pipeline(file).spec == pipe.spec
    half = tmp_path / "half.safetensors"
    assert main(["convert", str(folder), str(half), "--dtype", "fp16"]) == 0
    assert {v.dtype for k, v in load_file(half).items() if not k.endswith("position_ids")} == {torch.float16}


# --- Stability's keys ---------------------------------------------------------------------------
def _meta_state_dicts(spec) -> dict:
    with torch.device("meta"):
        sds = {
            "unet": UNetModel(spec.unet).state_dict(),
            "vae": AutoencoderKL(spec.vae).state_dict(),
            "text": CLIPTextModel(spec.text).state_dict(),
        }
        if spec.text_2 is not None:
            sds["text_2"] = CLIPTextModel(spec.text_2).state_dict()
    return sds


def _openclip_keys(layers: int) -> set[str]:
    """OpenCLIP's text-tower names (open_clip's TextTransformer), written out here."""
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    block += [f"{m}.{p}" for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")]
    keys = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    keys |= {"text_projection", "logit_scale"}
    return keys | {f"transformer.resblocks.{i}.{k}" for i in range(layers) for k in block}


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_single_file_keys_are_stabilitys(name):
    """At full size (meta tensors): diffusers' single-file loader, written against Stability's
    sd_xl_base_1.0 / sd_xl_refiner_1.0 files, recognises the model type and maps every one of our
    keys onto diffusers' models, shape for shape; the text towers' keys are exactly CLIP-L's
    (transformers' names with `position_ids`) and OpenCLIP bigG's (with `logit_scale`)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection as HFTextProjection

    from stablediff.weights import convert

    spec = PRESETS[name]
    ckpt = join_single_file(spec, _meta_state_dicts(spec))
    refiner = name == "sdxl-refiner"
    prefixes = ("model.diffusion_model.", "first_stage_model.", *((REFINER,) if refiner else (CLIP_L, BASE)))
    assert all(k.startswith(prefixes) for k in ckpt)
    print(f"{name}: {len(ckpt)} tensors")
    assert sfu.infer_diffusers_model_type(ckpt) == ("xl_refiner" if refiner else "xl_base")
    bigg = REFINER if refiner else BASE
    assert {k[len(bigg) :] for k in ckpt if k.startswith(bigg)} == _openclip_keys(32)
    assert ckpt[bigg + "text_projection"].shape == (1280, 1280) and ckpt[bigg + "logit_scale"].shape == ()

    with torch.device("meta"):
        unet = UNet2DConditionModel(**convert.unet_config_to_diffusers(spec.unet.to_dict()))
        vae = DiffusersVAE(**convert.vae_config_to_diffusers(spec.vae.to_dict()))
        g_config = convert.text_config_to_transformers(spec.pooled_text.to_dict(), 0, 2, 1)
        towers = [(HFTextProjection(HFConfig(**g_config)), sfu.convert_open_clip_checkpoint, bigg)]
        if not refiner:
            clip_l = HFText(HFConfig(**convert.text_config_to_transformers(spec.text.to_dict(), 0, 2, 1)))
            towers.append((clip_l, lambda model, c, prefix: sfu.convert_ldm_clip_checkpoint(c), CLIP_L))
    got = [
        (unet, sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config))),
        (vae, sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config))),
    ]
    got += [(model, to_diffusers(model, ckpt, prefix)) for model, to_diffusers, prefix in towers]
    if not refiner:
        assert ckpt[CLIP_L + "embeddings.position_ids"].dtype == torch.int64
        assert ckpt[CLIP_L + "embeddings.position_ids"].shape == (1, 77)
    for model, converted in got:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        # transformers >= 5.6 keeps CLIPTextModel flat; the converters still name `text_model.`
        converted = {k if k in expected else k.removeprefix("text_model."): v for k, v in converted.items()}
        converted = {k: tuple(v.shape) for k, v in converted.items() if not k.endswith("position_ids")}
        assert converted == expected, f"{type(model).__name__}: {sorted(set(converted) ^ set(expected))[:4]}"


def test_tiny_single_file_buffers(saved):
    sd = load_file(saved["tiny-sdxl"][1]["single-file"])
    assert torch.equal(sd[CLIP_L + "embeddings.position_ids"], torch.arange(77)[None])
    assert sd[BASE + "logit_scale"].item() == pytest.approx(4.6052, abs=1e-4)
    refiner = load_file(saved["tiny-sdxl-refiner"][1]["single-file"])
    assert REFINER + "logit_scale" in refiner and not any(k.startswith("conditioner.embedders.1") for k in refiner)


# --- diffusers reads ours -----------------------------------------------------------------------
def _diffusers_class(name: str):
    import diffusers

    return diffusers.StableDiffusionXLImg2ImgPipeline if "refiner" in name else diffusers.StableDiffusionXLPipeline


def _max_diff(what: str, a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, what
    diff = (a.float() - b.float()).abs().max().item()
    print(f"{what}: max difference {diff:.2e}")
    return diff


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_diffusers_loads_our_folder_and_agrees(saved, name):
    ours, paths = saved[name]
    ref = _diffusers_class(name).from_pretrained(paths["diffusers"], local_files_only=True)
    refiner = name == "tiny-sdxl-refiner"
    assert ref.config["force_zeros_for_empty_prompt"] == (not refiner)
    assert ref.config.get("requires_aesthetics_score", False) == refiner
    assert (ref.text_encoder is None) == refiner and (ref.tokenizer is None) == refiner
    assert type(ref.scheduler).__name__ == "EulerDiscreteScheduler"
    assert ref.scheduler.config.timestep_spacing == "leading" and ref.scheduler.config.steps_offset == 1

    # the U-Net, with SDXL's added conditioning
    g = torch.Generator().manual_seed(0)
    spec = ours.spec
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, spec.unet.context_dim, generator=g)
    pooled = torch.randn(2, spec.pooled_text.projection_dim, generator=g)
    tail = dict(aesthetic_score=6.0) if refiner else dict(target_size=(64, 48))
    ids = torch.stack([sdxl_time_ids((64, 64), (0, 8), **tail)] * 2)
    t = torch.tensor([999.0, 321.0])
    expected = ref.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert _max_diff(f"{name} U-Net", expected, ours.unet(x, t, context, y=micro_conditioning(pooled, ids))) < ATOL

    # the VAE decoder (ours takes scaled latents)
    z = torch.randn(1, 4, 8, 8, generator=g)
    expected = ref.vae.decode(z / ref.vae.config.scaling_factor).sample
    assert _max_diff(f"{name} VAE decode", expected, ours.vae.decode(z)) < ATOL

    # the prompt through the text encoder(s): contexts and pooled embeddings
    prompt, negative = "a red circle above a blue square", "blurry"
    cond = ours.encode_sdxl_prompt(GenerationParams(prompt, negative_prompt=negative))
    assert min(cond.context.abs().max(), cond.uncond_context.abs().max()) > 0.1  # encodings, not zeros
    embeds, neg_embeds, pooled_ref, neg_pooled_ref = ref.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative
    )
    for what, a, b in (
        ("context", embeds, cond.context),
        ("pooled", pooled_ref, cond.pooled),
        ("negative context", neg_embeds, cond.uncond_context),
        ("negative pooled", neg_pooled_ref, cond.uncond_pooled),
    ):
        assert _max_diff(f"{name} {what}", a, b) < ATOL


def _wide_bigg_base():
    """tiny-sdxl with bigG wider than CLIP-L (48 against 32), as at full size (1280 against 768):
    diffusers' single-file loader tells the two towers apart by the width of their position
    embeddings, so with tiny-sdxl's equal widths it would fill text_encoder_2 from CLIP-L's keys."""
    base = PRESETS["tiny-sdxl"]
    text_2 = dataclasses.replace(base.text_2, width=48, projection_dim=40)
    unet = dataclasses.replace(base.unet, context_dim=32 + 48, adm_in_channels=40 + 6 * 256)
    spec = dataclasses.replace(base, name="tiny-sdxl-wide-bigg", text_2=text_2, unet=unet)
    return load_pipeline("tiny-sdxl", spec=spec, seed=11)


@pytest.mark.parametrize("name", ["tiny-sdxl-wide-bigg", "tiny-sdxl-refiner"])
@torch.no_grad()
def test_diffusers_from_single_file_reads_ours(saved, tmp_path, name):
    """Offline: `config=` a diffusers folder of the same model gives every component's config
    (no `original_config` is needed), and `local_files_only` keeps it off the network."""
    pipe = _wide_bigg_base() if name == "tiny-sdxl-wide-bigg" else saved[name][0]
    folder = save(pipe, tmp_path / "folder", layout="diffusers")
    file = save(pipe, tmp_path / "model.safetensors")
    cls = _diffusers_class(name)
    from_folder = cls.from_pretrained(folder, local_files_only=True)
    from_file = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(from_folder, part), getattr(from_file, part)
        if part == "text_encoder" and name == "tiny-sdxl-refiner":
            assert a is None and b is None
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name}: {part} differs"
    # and the folder's networks are ours (test_diffusers_loads_our_folder_and_agrees checks the numbers)
    ours = load_pipeline(folder)
    _assert_same_weights(pipe, ours, name)


# --- foreign files ------------------------------------------------------------------------------
# SDXL-shaped models small enough for a test whose every config field the weights show, or SDXL's
# fixed values give (norm groups 32, 64-wide heads): a foreign file (no stored spec) is recognised
# as exactly this.
_SMALL_L = CLIPTextConfig(width=64, layers=2, heads=1, skip_layers=1, context_norm=False)
_SMALL_G = CLIPTextConfig(
    width=64, layers=2, heads=1, activation="gelu", skip_layers=1, context_norm=False, projection_dim=32
)
_SMALL_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=None,
    head_dim=64,
    context_dim=128,
    use_linear_proj=True,
    adm_in_channels=32 + 6 * 256,
)
_SMALL_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scaling_factor=0.13025)
SMALL = {
    "sdxl": dataclasses.replace(
        PRESETS["sdxl"], unet=_SMALL_UNET, vae=_SMALL_VAE, text=_SMALL_L, text_2=_SMALL_G, default_size=64
    ),
    "sdxl-refiner": dataclasses.replace(
        PRESETS["sdxl-refiner"],
        unet=dataclasses.replace(_SMALL_UNET, context_dim=64, adm_in_channels=32 + 5 * 256),
        vae=_SMALL_VAE,
        text=_SMALL_G,
        default_size=64,
    ),
}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """{kind: (pipe, a file with Stability's keys and no metadata)}."""
    tmp = tmp_path_factory.mktemp("foreign")
    out = {}
    for kind, spec in SMALL.items():
        pipe = load_pipeline("tiny-sdxl", spec=spec, seed=5)
        ours = save(pipe, tmp / f"ours-{kind}.safetensors")
        save_file(load_file(ours), tmp / f"{kind}.safetensors")  # the tensors alone, as Stability's files hold them
        out[kind] = (pipe, tmp / f"{kind}.safetensors")
    return out


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_foreign_single_file_is_recognised_from_its_shapes(foreign, kind):
    pipe, path = foreign[kind]
    expected = dataclasses.replace(pipe.spec, default_size=1024)  # the size no tensor shows: SDXL's
    assert read_spec(path) == expected
    back = load_pipeline(path)
    assert back.spec == expected and back.spec.name == kind
    _assert_same_weights(pipe, back, kind)


def test_other_spellings_of_the_text_towers(foreign, tmp_path):
    """What diffusers' conversion script writes: the projection as transformers holds it
    (`text_projection.weight`, scripts before 2024) and CLIP-L without `text_model.` (transformers 5
    saves CLIPTextModel flat); no `position_ids` or `logit_scale`."""
    pipe, path = foreign["sdxl"]
    sd = load_file(path)
    sd[BASE + "text_projection.weight"] = sd.pop(BASE + "text_projection").t().contiguous()
    sd = {k.replace(CLIP_L, "conditioner.embedders.0.transformer."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(("position_ids", "logit_scale"))}
    other = tmp_path / "other.safetensors"
    save_file(sd, other)
    _assert_same_weights(pipe, load_pipeline(other), "other spellings")


_SCRIPTS = os.environ.get("STABLEDIFF_DIFFUSERS_SCRIPTS")


@pytest.mark.skipif(not _SCRIPTS, reason="set STABLEDIFF_DIFFUSERS_SCRIPTS to a diffusers checkout's scripts/")
def test_diffusers_conversion_script_output_loads(tmp_path):
    """diffusers' scripts/convert_diffusers_to_original_sdxl.py (not part of the installed package)
    on a folder diffusers saved: its U-Net and VAE block tables are written for SDXL base's layout
    (3 U-Net levels, 4 VAE levels, 2 blocks each), so the model here has that layout, small."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from reference import _randomize
    from test_sdxl_pipeline import SDXL_SCHEDULER, _hf_tokenizer, _text
    from test_sdxl_unet import TINY_BASE

    wide_bigg = dict(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=40 + 6 * 256)
    unet = UNet2DConditionModel(**{**TINY_BASE, **wide_bigg}, sample_size=32).eval()
    vae = DiffusersVAE(
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        layers_per_block=2,
        scaling_factor=0.13025,
    ).eval()
    nets = [unet, vae, _text(32, None), _text(48, 40)]
    for i, net in enumerate(nets):
        _randomize(net, 60 + i)
    folder, file = tmp_path / "folder", tmp_path / "script.safetensors"
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=nets[2],
        text_encoder_2=nets[3],
        tokenizer=_hf_tokenizer(tmp_path / "tok", "<|endoftext|>"),
        tokenizer_2=_hf_tokenizer(tmp_path / "tok_2", "!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    ).save_pretrained(folder)
    script = Path(_SCRIPTS) / "convert_diffusers_to_original_sdxl.py"
    args = ["--model_path", str(folder), "--checkpoint_path", str(file), "--use_safetensors"]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    reference = load_pipeline(folder)  # test_sdxl_pipeline: a diffusers folder reads as diffusers runs it
    # tiny norm groups (8) cannot be seen in weights: the folder's spec is given, every key still checked
    _assert_same_weights(reference, load_pipeline(file, spec=reference.spec), "diffusers' script")


# --- loading holds one copy ---------------------------------------------------------------------
def test_single_file_load_holds_one_copy(tmp_path):
    """Peak memory of loading an SDXL single file stays within 1.1 x the file's size: the towers
    are renamed and split as views, never copied whole (a copy of every tensor measures 2 x).
    Measured in a fresh process as Linux's peak RSS, reset through /proc/self/clear_refs after a
    first load of a tiny SDXL file has paid for imports, the tokenizer and thread pools (about
    120 MiB that no file size explains)."""
    base = PRESETS["tiny-sdxl"]
    wide = dict(width=256, layers=2, heads=4, skip_layers=1, context_norm=False)
    spec = dataclasses.replace(
        base,
        text=CLIPTextConfig(**wide),
        text_2=CLIPTextConfig(**wide, activation="gelu", projection_dim=256),
        unet=dataclasses.replace(base.unet, context_dim=512, adm_in_channels=256 + 6 * 256),
    )
    path = save(load_pipeline("tiny-sdxl", spec=spec), tmp_path / "wide.safetensors")
    warm_up = save(load_pipeline("tiny-sdxl"), tmp_path / "tiny.safetensors")
    size = path.stat().st_size
    code = (
        "import re, sys\n"
        "from stablediff.loading import load_pipeline\n"
        "def kib(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "load_pipeline(sys.argv[2])\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # the peak starts again from here\n"
        "before = kib('VmRSS')\n"
        "pipe = load_pipeline(sys.argv[1])\n"
        "print((kib('VmHWM') - before) * 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(warm_up)], check=True, capture_output=True, text=True
    )
    peak = int(done.stdout.split()[-1])
    print(f"file {size / 2**20:.0f} MiB, load peak {peak / 2**20:.0f} MiB ({peak / size:.2f} x)")
    assert peak <= 1.1 * size


# --- broken files -------------------------------------------------------------------------------
def _broken(path: Path, tmp_path: Path, change) -> Path:
    sd = load_file(path)
    change(sd)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    return bad


def _drop(prefix: str):
    return lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]]


def _set(key: str, value: torch.Tensor):
    return lambda sd: sd.__setitem__(key, value)


def _sd_text_tower(sd: dict) -> None:
    """CLIP-L moved to SD 1.x's `cond_stage_model.`, bigG dropped: an SDXL U-Net with SD's text tower."""
    for key in [k for k in sd if k.startswith("conditioner.")]:
        value = sd.pop(key)
        if key.startswith(CLIP_L):
            sd["cond_stage_model.transformer.text_model." + key[len(CLIP_L) :]] = value


HOSTILE = {
    "no bigG": ("sdxl", _drop(BASE), r"an SDXL base checkpoint without its text encoder 'conditioner\.embedders\.1"),
    "no CLIP-L": ("sdxl", _drop(CLIP_L), r"without its text encoder 'conditioner\.embedders\.0\.transformer"),
    "refiner tower beside the base's": (
        "sdxl",
        lambda sd: sd.update({REFINER + "ln_final.weight": torch.zeros(64)}),
        r"an SDXL conditioner of unknown layout",
    ),
    "no projection": ("sdxl-refiner", _drop(REFINER + "text_projection"), r"bigG tower has no .*text_projection"),
    "in_proj not 3 parts": (
        "sdxl",
        _set(BASE + "transformer.resblocks.0.attn.in_proj_weight", torch.zeros(193, 64)),
        r"in_proj_weight' has shape \(193, 64\): a fused q/k/v projection",
    ),
    "in_proj of a scalar": (
        "sdxl",
        _set(BASE + "transformer.resblocks.1.attn.in_proj_bias", torch.zeros(())),
        r"in_proj_bias' has shape \(\)",
    ),
    "projection not a matrix": (
        "sdxl",
        _set(BASE + "text_projection", torch.zeros(2, 3, 4)),
        r"'text_projection' has shape \(2, 3, 4\): a text projection is a matrix",
    ),
    "U-Net without label_emb": (
        "sdxl",
        _drop("model.diffusion_model.label_emb."),
        r"the U-Net has no 'label_emb\.0\.0\.weight'.*not an SDXL checkpoint",
    ),
    "SDXL U-Net, SD text tower": ("sdxl", _sd_text_tower, r"an SDXL U-Net .* without SDXL's text encoders"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_broken_sdxl_files_name_the_problem(foreign, tmp_path, capsys, case):
    kind, change, message = HOSTILE[case]
    bad = _broken(foreign[kind][1], tmp_path, change)
    with pytest.raises(BadFileError, match=rf"^{bad}: .*{message}"):
        load_pipeline(bad)
    # the command line prints one line and writes nothing
    target = tmp_path / "out"
    assert main(["convert", str(bad), str(target)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and not target.exists()


def test_wrong_shapes_name_our_key_and_both_shapes(foreign, tmp_path):
    pipe, path = foreign["sdxl"]
    width = 64
    # a fused in_proj of 3 x 48 rows splits into three, each the wrong shape for a 64-wide tower
    bad = _broken(path, tmp_path, _set(BASE + "transformer.resblocks.0.attn.in_proj_weight", torch.zeros(144, width)))
    message = r"text_encoder_2: key 'encoder\.layers\.0\.self_attn\.q_proj\.weight' has shape \(48, 64\)"
    with pytest.raises(WeightMismatchError, match=rf"{bad}: .*{message} in the checkpoint but \(64, 64\)"):
        load_pipeline(bad, spec=pipe.spec)
    # a spec with one tower forced onto a base's file: the second tower is not silently dropped
    unet = dataclasses.replace(pipe.spec.unet, context_dim=width, adm_in_channels=width + 6 * 256)
    one_tower = dataclasses.replace(pipe.spec, text_2=None, unet=unet)
    with pytest.raises(WeightMismatchError, match=r"text_encoder_2: the checkpoint has a second text encoder"):
        load_pipeline(path, spec=one_tower)


def test_stored_spec_of_the_other_family_is_refused(saved, tmp_path):
    """A file whose (checksummed) spec says SDXL base but whose weights are a refiner's."""
    path = saved["tiny-sdxl-refiner"][1]["single-file"]
    spec = saved["tiny-sdxl"][0].spec.to_json()
    checksum = hashlib.sha256(spec.encode()).hexdigest()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(path), bad, metadata={SPEC_METADATA_KEY: spec, SPEC_CHECKSUM_KEY: checksum})
    with pytest.raises(BadFileError, match=rf"^{bad}: the stored model spec is an SDXL base model but the weights"):
        load_pipeline(bad)
