"""LoRAs and embeddings from prompts and the command line: A1111's <lora:name:w> tags, --lora,
--embeddings-dir, the PNG parameters that name them (Lora hashes, TI hashes) and --from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from stablediff import GenerationParams, load_pipeline
from stablediff.cli import main
from stablediff.image import read_png_metadata
from stablediff.lora import lora_hash
from stablediff.lora.tags import LoraTag, find_lora, parse_lora_tags

FAST = ["--model", "tiny", "--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, pipe):
    return write_lora(tmp_path_factory.mktemp("loras"), pipe)


def write_lora(folder, pipe):
    """``folder/detail.safetensors``: a kohya LoRA (LDM-flavoured names) on every Linear of both networks."""
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_text_model_", pipe.text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                stem = prefix + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
                tensors[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
                tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(folder / "detail.safetensors"))
    return folder


def image_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def generate(pipe, prompt: str, **more) -> np.ndarray:
    return np.asarray(pipe.generate(GenerationParams(prompt, steps=2, seed=1, **more))[0])


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out.strip(), err


def test_tags_parse_as_a1111_reads_them():
    clean, tags = parse_lora_tags("a cat <lora:detail:0.7>, <LORA:x>, <lyco:y:0.5:0.9> <lora:z:te=0.2:unet=1.5>")
    assert clean == "a cat , ,  "
    assert tags == [LoraTag("detail", 0.7, 0.7), LoraTag("x"), LoraTag("y", unet=0.9, text=0.5), LoraTag("z", 1.5, 0.2)]
    assert LoraTag("y", unet=0.9, text=0.5).to_prompt() == "<lora:y:0.5:0.9>"
    for bad, message in [("<lora:>", "needs a name"), ("<lora:a:x>", "not a number"), ("<lora:a:inf>", "finite")]:
        with pytest.raises(ValueError, match=message):
            parse_lora_tags(bad)
    with pytest.raises(ValueError, match="more than one"):
        parse_lora_tags("<lora:a:1> <lora:a:0.5>")
    with pytest.raises(ValueError, match="dyn="):
        parse_lora_tags("<lora:a:1:dyn=8>")


def test_find_lora_in_a_folder(lora_dir, tmp_path):
    assert find_lora("detail", lora_dir) == lora_dir / "detail.safetensors"
    for name, message in [("nope", "no LoRA named 'nope'"), ("../detail", "without folders")]:
        with pytest.raises(ValueError, match=message):
            find_lora(name, lora_dir)
    with pytest.raises(ValueError, match="--lora-dir"):
        find_lora("detail", None)


def test_a_prompt_tag_applies_for_that_run_only(pipe, lora_dir):
    plain = generate(pipe, "a red circle , ")
    pipe.lora_dir = lora_dir
    try:
        tagged = generate(pipe, "a red circle <lora:detail:0.7>, ")
        assert pipe.loras == {} and pipe.last_loras[0]["in_prompt"] and pipe.last_loras[0]["unet"] == 0.7
        pipe.load_lora(lora_dir / "detail.safetensors", 0.7)
        loaded = generate(pipe, "a red circle , ")
        assert np.array_equal(tagged, loaded) and not np.array_equal(tagged, plain)
        pipe.set_lora_scale("detail", 1.0)
        generate(pipe, "a red circle <lora:detail:0.7>, ")  # the tag's weight for this run ...
        assert pipe.loras["detail"].scale == 1.0  # ... then the loaded weight again
        generate(pipe, "a red circle <lora:detail:0.3:0.7>, ")  # te=0.3, unet=0.7
        assert pipe.last_loras[0] | {"hash": None} == {
            "name": "detail",
            "unet": 0.7,
            "text": 0.3,
            "hash": None,
            "in_prompt": True,
        }
    finally:
        pipe.unload_lora()
        pipe.lora_dir = None
    assert np.array_equal(generate(pipe, "a red circle , "), plain)


def test_cli_tag_lora_option_png_parameters_and_from(pipe, lora_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, made, err = run(
        capsys, "generate", "a red circle <lora:detail:0.7>, ", *FAST, "--lora-dir", str(lora_dir), "--out", out
    )
    assert code == 0, err
    meta = read_png_metadata(made)
    digest = lora_hash(lora_dir / "detail.safetensors")
    assert f'Lora hashes: "detail: {digest}"' in meta["parameters"]
    assert meta["stablediff"]["loras"] == [
        {"name": "detail", "unet": 0.7, "text": 0.7, "hash": digest, "in_prompt": True}
    ]
    pipe.load_lora(lora_dir / "detail.safetensors", 0.7)
    try:
        assert np.array_equal(image_of(made), generate(pipe, "a red circle , "))
    finally:
        pipe.unload_lora()

    # --lora FILE:SCALE: A1111's text names it as a tag (its only way), our record as loaded
    code, made2, err = run(
        capsys, "generate", "a red circle , ", *FAST, "--lora", f"{lora_dir}/detail.safetensors:0.7", "--out", out
    )
    assert code == 0, err
    meta2 = read_png_metadata(made2)
    assert meta2["parameters"].startswith("a red circle ,  <lora:detail:0.7>\n")
    assert meta2["stablediff"]["loras"][0]["in_prompt"] is False
    assert np.array_equal(image_of(made2), image_of(made))

    # --from loads the record's LoRAs from --lora-dir again; without it, a clear error
    code, again, err = run(capsys, "generate", "--from", made2, "--lora-dir", str(lora_dir), "--out", out)
    assert code == 0, err
    assert np.array_equal(image_of(again), image_of(made))
    code, _, err = run(capsys, "generate", "--from", made2, "--out", out)
    assert code == 2 and "--lora-dir" in err

    # an A1111 PNG with the tag in its prompt
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a red circle <lora:detail:0.7>, \nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, "
        f'Seed: 1, Size: 64x64, RNG: CPU, Lora hashes: "detail: {digest}", Version: v1.10.1',
    )
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    code, theirs, err = run(
        capsys,
        "generate",
        "--from",
        str(tmp_path / "a1111.png"),
        "--model",
        "tiny",
        "--lora-dir",
        str(lora_dir),
        "--out",
        out,
    )
    assert code == 0, err
    assert "Lora hashes" not in err  # read, not reported as unsupported
    pipe.load_lora(lora_dir / "detail.safetensors", 0.7)
    try:
        expected = pipe.generate(
            GenerationParams("a red circle , ", steps=2, seed=1, schedule="karras", guidance_scale=7.5)
        )
    finally:
        pipe.unload_lora()
    assert np.array_equal(image_of(theirs), np.asarray(expected[0]))


def test_cli_errors_for_missing_loras(lora_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, _, err = run(capsys, "generate", "a <lora:detail:1>", *FAST, "--out", out)
    assert code == 2 and "--lora-dir" in err and "Traceback" not in err
    code, _, err = run(capsys, "generate", "a <lora:other:1>", *FAST, "--lora-dir", str(lora_dir), "--out", out)
    assert code == 2 and "no LoRA named 'other'" in err
    code, _, err = run(capsys, "generate", "a", *FAST, "--lora", str(tmp_path / "missing.safetensors"), "--out", out)
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "out").exists()


def test_cli_embeddings_dir_loads_what_the_prompt_names(pipe, tmp_path, capsys):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    width = pipe.text_encoder.embeddings.token_embedding.embedding_dim
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    save_file({"emb_params": vectors}, str(folder / "shinystyle.safetensors"))
    save_file({"emb_params": torch.randn(1, width + 1)}, str(folder / "unused.safetensors"))  # never read
    out = str(tmp_path / "out")
    code, made, err = run(
        capsys, "generate", "a shinystyle circle", *FAST, "--embeddings-dir", str(folder), "--out", out
    )
    assert code == 0, err
    meta = read_png_metadata(made)
    assert 'TI hashes: "shinystyle: ' in meta["parameters"] and list(meta["stablediff"]["embeddings"]) == ["shinystyle"]
    token = pipe.load_embedding(folder / "shinystyle.safetensors")
    try:
        assert np.array_equal(image_of(made), generate(pipe, "a shinystyle circle"))
    finally:
        pipe.unload_embedding(token)
    assert not np.array_equal(image_of(made), generate(pipe, "a shinystyle circle"))
    code, again, err = run(capsys, "generate", "--from", made, "--embeddings-dir", str(folder), "--out", out)
    assert code == 0 and np.array_equal(image_of(again), image_of(made)), err
