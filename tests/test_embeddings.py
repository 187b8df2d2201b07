"""Textual-inversion embeddings: the files people have, against diffusers' load_textual_inversion
on the tiny SD1/SD2 references, and how they behave in prompts (emphasis, chunks, BREAK, unload)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from reference import STYLES, build_reference, save_reference_folder
from safetensors.torch import save_file

from stablediff import embeddings as emb_module
from stablediff.embeddings import Embedding, EmbeddingTable, check_token, check_width, read_embedding
from stablediff.errors import BadFileError
from stablediff.loading import load_pipeline
from stablediff.prompts import PLACEHOLDER_ID, apply_weights, tokenize_prompt
from stablediff.tokenizer import CLIPTokenizer

ATOL = 1e-5
FORMATS = ("diffusers-safetensors", "diffusers-bin", "a1111-pt", "a1111-safetensors")


@pytest.fixture(scope="module", params=STYLES)
def model(request, tmp_path_factory):
    """(style, reference parts, folder, our pipeline) for a tiny SD1- and SD2-style model."""
    parts = build_reference(request.param, seed=5)
    folder = save_reference_folder(tmp_path_factory.mktemp(request.param), *parts)
    return request.param, parts, folder, load_pipeline(folder)


@pytest.fixture
def pipe(model):
    """Our pipeline with nothing loaded before the test and nothing left after it."""
    ours = model[3]
    ours.unload_embedding()
    yield ours
    ours.unload_embedding()


@pytest.fixture(scope="module")
def sd1_pipe(tmp_path_factory):
    parts = build_reference("sd1", seed=6)
    return load_pipeline(save_reference_folder(tmp_path_factory.mktemp("sd1-only"), *parts))


def _vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_embedding(path, fmt: str, vectors: torch.Tensor, token: str = "<my-emb>"):
    """An embedding file as each tool writes it; one vector is stored 1-D in diffusers' format."""
    if fmt.startswith("diffusers"):
        stored = vectors[0] if len(vectors) == 1 else vectors
        if fmt.endswith("safetensors"):
            save_file({token: stored.contiguous()}, str(path))
        else:
            torch.save({token: stored}, path)
    elif fmt == "a1111-pt":
        torch.save(
            {
                "string_to_token": {"*": 265},
                "string_to_param": {"*": torch.nn.Parameter(vectors.clone())},
                "name": path.stem,
                "step": 500,
                "sd_checkpoint": "e1441589a6",
                "sd_checkpoint_name": "v1-5-pruned-emaonly",
            },
            path,
        )
    else:
        save_file({"emb_params": vectors.contiguous()}, str(path))
    return path


def _diffusers_pipe(parts, folder):
    import diffusers
    from transformers import CLIPTokenizer as HFTokenizer

    unet, vae, text, _, scheduler = parts
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=copy.deepcopy(text),  # load_textual_inversion grows the encoder's table
        tokenizer=HFTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _max_diff(what: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    print(f"{what}: max abs diff {diff:.3e}")
    return diff


# ---------------------------------------------------------------------------------------------
# Parity with diffusers
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_embeddings_match_diffusers(model, pipe, tmp_path, fmt, n):
    style, parts, folder, _ = model
    width = pipe.text_encoder.config.width
    suffix = {"diffusers-safetensors": ".safetensors", "diffusers-bin": ".bin", "a1111-pt": ".pt"}
    name = "learned_embeds" if fmt.startswith("diffusers") else "myemb"
    path = write_embedding(tmp_path / f"{name}{suffix.get(fmt, '.safetensors')}", fmt, _vectors(n, width))
    token = pipe.load_embedding(path)
    assert token == ("<my-emb>" if fmt.startswith("diffusers") else "myemb")  # stored token / file stem
    reference = _diffusers_pipe(parts, folder)
    reference.load_textual_inversion(str(path), token=token)

    prompt, negative = f"a photo of {token}, highly detailed", f"blurry {token} twice {token}"
    with torch.no_grad():
        expected = reference.encode_prompt(prompt, "cpu", 1, True, negative)
    cond, uncond = pipe.encode_prompt(prompt, negative)
    assert _max_diff(f"{style} {fmt} n={n} prompt", expected[0], cond) < ATOL
    assert _max_diff(f"{style} {fmt} n={n} negative", expected[1], uncond) < ATOL
    assert pipe.embeddings[token].format == fmt.split("-")[0] and len(pipe.embeddings[token]) == n
    # the embedding matters: the same text without it encodes differently
    pipe.unload_embedding(token)
    assert (pipe.encode_prompt(prompt, negative)[0] - cond).abs().max() > 1e-3


def test_clip_skip_matches_diffusers(model, pipe, tmp_path):
    style, parts, folder, _ = model
    path = write_embedding(
        tmp_path / "learned_embeds.safetensors", "diffusers-safetensors", _vectors(2, 48 if style == "sd2" else 32)
    )
    pipe.load_embedding(path)
    reference = _diffusers_pipe(parts, folder)
    reference.load_textual_inversion(str(path))
    # diffusers' clip_skip=1 is one layer earlier, our (A1111's) clip_skip=2; its encode_prompt cannot
    # run it with transformers 5 (no `text_model`), so take the same steps on its tokenizer and encoder.
    prompt = reference.maybe_convert_prompt("<my-emb> on a table", reference.tokenizer)
    ids = reference.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = reference.text_encoder.final_layer_norm(hidden)
    assert _max_diff(f"{style} clip skip", expected, pipe.encode_prompt("<my-emb> on a table", clip_skip=2)[0]) < ATOL


# ---------------------------------------------------------------------------------------------
# In prompts
def _load(pipe, tmp_path, n: int, token: str = "<my-emb>", seed: int = 0) -> Embedding:
    path = tmp_path / f"{abs(hash(token))}-{n}.safetensors"
    write_embedding(path, "diffusers-safetensors", _vectors(n, pipe.text_encoder.config.width, seed), token)
    return pipe.embeddings[pipe.load_embedding(path)]


def test_emphasis_weights_every_vector(pipe, tmp_path):
    emb = _load(pipe, tmp_path, 3)
    (chunk,) = tokenize_prompt(pipe.tokenizer, "a (<my-emb>:1.3) cat", embeddings=pipe._embedding_table)
    assert chunk.fixes == ((2, emb),) and chunk.ids[2:5] == (PLACEHOLDER_ID,) * 3
    assert chunk.weights[:7] == (1.0, 1.0, 1.3, 1.3, 1.3, 1.0, 1.0)
    plain = pipe.encode_prompt("a <my-emb> cat")[0]
    weighted = pipe.encode_prompt("a (<my-emb>:1.3) cat")[0]
    assert torch.equal(weighted, apply_weights(plain, chunk.weights))


def test_embedding_is_never_split_across_chunks(pipe, tmp_path):
    emb = _load(pipe, tmp_path, 3)
    table = pipe._embedding_table
    # 73 cats leave room for 2 of the 3 vectors: the embedding goes whole into the next chunk
    chunks = tokenize_prompt(pipe.tokenizer, "cat " * 73 + "<my-emb>", embeddings=table)
    assert [c.n_tokens for c in chunks] == [73, 3]
    assert chunks[0].fixes == () and chunks[1].fixes == ((1, emb),)
    cond = pipe.encode_prompt("cat " * 73 + "<my-emb>")[0]
    assert cond.shape[1] == 154
    assert torch.equal(cond[:, :77], pipe.encode_prompt("cat " * 73)[0])
    assert torch.equal(cond[:, 77:], pipe.encode_prompt("<my-emb>")[0])
    # comma backtrack: the phrase after the last comma moves on with the embedding in it
    chunks = tokenize_prompt(pipe.tokenizer, "cat " * 70 + ", <my-emb> dog dog", embeddings=table)
    assert [c.n_tokens for c in chunks] == [71, 5]
    assert chunks[0].fixes == () and chunks[1].fixes == ((1, emb),)


def test_break_and_negative_prompt(pipe, tmp_path):
    emb = _load(pipe, tmp_path, 2)
    chunks = tokenize_prompt(pipe.tokenizer, "<my-emb> BREAK red <my-emb>", embeddings=pipe._embedding_table)
    assert [c.fixes for c in chunks] == [((1, emb),), ((2, emb),)]
    cond, uncond = pipe.encode_prompt("a cat", "cat " * 80 + "<my-emb>")
    assert cond.shape == uncond.shape == (1, 154, pipe.text_encoder.config.width)
    assert torch.equal(uncond[:, 77:], pipe.encode_prompt("cat " * 5 + "<my-emb>")[0])


def test_unload_is_exact(pipe, tmp_path):
    prompt, negative = "a <my-emb> and <other-emb>, (red:1.2)", "<my-emb> " * 40
    before = pipe.encode_prompt(prompt, negative)
    weights = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    _load(pipe, tmp_path, 3)
    _load(pipe, tmp_path, 1, "<other-emb>", seed=1)
    during = pipe.encode_prompt(prompt, negative)
    # 40 x 3 vectors take 2 chunks, the literal text more
    assert not torch.equal(during[0], before[0]) and during[1].shape[1] == 154 < before[1].shape[1]
    assert sorted(pipe.embeddings) == ["<my-emb>", "<other-emb>"]
    pipe.unload_embedding("<MY-EMB>")  # any case
    assert list(pipe.embeddings) == ["<other-emb>"]
    pipe.unload_embedding()
    after = pipe.encode_prompt(prompt, negative)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert all(torch.equal(weights[k], v) for k, v in pipe.text_encoder.state_dict().items())
    with pytest.raises(ValueError, match=r"no embedding named '<my-emb>' is loaded"):
        pipe.unload_embedding("<my-emb>")


def test_a1111_metadata_and_explicit_token(pipe, tmp_path):
    path = write_embedding(tmp_path / "style-v2.pt", "a1111-pt", _vectors(4, pipe.text_encoder.config.width))
    assert pipe.load_embedding(path, token="<style>") == "<style>"
    info = pipe.embeddings["<style>"]
    assert (len(info), info.dim, info.format, info.step, info.path) == (
        4,
        pipe.text_encoder.config.width,
        "a1111",
        500,
        str(path),
    )
    assert pipe.load_embedding(path) == "style-v2"  # the same file again, under its file name


# ---------------------------------------------------------------------------------------------
# Finding names in text
def _table(*tokens: str) -> tuple[EmbeddingTable, dict[str, Embedding]]:
    table, made = EmbeddingTable(), {}
    for t in tokens:
        made[t] = Embedding(t, torch.zeros(1, 4), "test", "diffusers")
        table.add(made[t])
    return table, made


def test_names_match_as_whole_words():
    table, e = _table("mytok", "mytok-v2", "<cat-toy>", "my cooltok")
    assert table.split("no names here") == ["no names here"]
    assert table.split("a MyTok, b") == ["a ", e["mytok"], ", b"]
    assert table.split("mytoks xmytok mytok2 mytok_") == ["mytoks xmytok mytok2 ", e["mytok"], "_"]
    assert table.split("mytok-v2 mytok") == [e["mytok-v2"], " ", e["mytok"]]  # longest name first
    assert table.split("a <cat-toy>, xx<cat-toy>yy") == ["a ", e["<cat-toy>"], ", xx", e["<cat-toy>"], "yy"]
    assert table.split("my   cooltok") == [e["my cooltok"]]
    with pytest.raises(ValueError, match="loaded already"):
        table.add(Embedding("MYTOK", torch.zeros(1, 4), "other", "a1111"))


def test_matching_text_keeps_the_tokens_around_it():
    tok = CLIPTokenizer.default()
    table, _ = _table("<cat-toy>")
    chunk = tokenize_prompt(tok, "a <cat-toy>, red cat.", embeddings=table)[0]
    assert chunk.ids[:8] == (tok.bos_id, *tok.encode("a"), PLACEHOLDER_ID, *tok.encode(", red cat."), tok.eos_id)


# ---------------------------------------------------------------------------------------------
# Errors
def test_wrong_width_names_both_families(sd1_pipe, tmp_path):
    path = write_embedding(tmp_path / "sd2-style.safetensors", "a1111-safetensors", _vectors(2, 1024))
    with pytest.raises(BadFileError, match=r"1024 wide \(SD 2\.x\).*takes 32-wide .*no SD family"):
        sd1_pipe.load_embedding(path)
    assert not sd1_pipe.embeddings
    e = read_embedding(path)
    with pytest.raises(
        BadFileError, match=r"1024 wide \(SD 2\.x\), but this model's text encoder takes 768-wide .*\(SD 1\.x\)"
    ):
        check_width(e, 768)
    e = read_embedding(write_embedding(tmp_path / "sd1.safetensors", "a1111-safetensors", _vectors(2, 768)))
    with pytest.raises(BadFileError, match=r"768 wide \(SD 1\.x\), but .* 1024-wide .*\(SD 2\.x\)"):
        check_width(e, 1024)


def test_sdxl_embedding_is_refused(sd1_pipe, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": _vectors(2, 768), "clip_g": _vectors(2, 1280)}, str(path))
    with pytest.raises(BadFileError, match="an SDXL embedding .*SDXL models only"):
        sd1_pipe.load_embedding(path)


def test_malicious_pickle_is_refused_without_running(sd1_pipe, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}, "name": "evil"}, path)
    with pytest.raises(BadFileError, match=r"evil\.pt: refusing to unpickle the forbidden global '(posix|nt)\.system'"):
        sd1_pipe.load_embedding(path)
    assert not marker.exists()
    old = tmp_path / "old.pt"  # the original textual-inversion code saved an nn.ParameterDict
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(_vectors(1, 32))})}, old)
    with pytest.raises(BadFileError, match="ParameterDict.*re-save it as .safetensors"):
        sd1_pipe.load_embedding(old)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)},
            r"no textual-inversion embedding found.*2 keys \['a', 'b'\]",
        ),
        ({"emb_params": torch.zeros(76, 32)}, "has 76 vectors; it may have 1 to 75"),
        ({"emb_params": torch.zeros(0, 32)}, "has 0 vectors; it may have 1 to 75"),
        ({"emb_params": torch.zeros(2, 3, 32)}, r"shape \[2, 3, 32\]; expected \[n_vectors, dim\] or \[dim\]"),
        ({"emb_params": torch.zeros(2, 32, dtype=torch.int32)}, "torch.int32; they must be floating point"),
        ({"emb_params": torch.full((2, 32), float("nan"))}, "NaN or infinite"),
    ],
)
def test_bad_files(sd1_pipe, tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    save_file(content, str(path))
    with pytest.raises(BadFileError, match=message):
        sd1_pipe.load_embedding(path)


def test_bad_a1111_pickles_and_foreign_files(sd1_pipe, tmp_path, monkeypatch):
    two = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32), "+": torch.zeros(1, 32)}}, two)
    with pytest.raises(BadFileError, match=r"string_to_param must hold exactly one entry.*2 entries"):
        sd1_pipe.load_embedding(two)
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(2, 32), bare)
    with pytest.raises(BadFileError, match="holds a Tensor, not a textual-inversion embedding"):
        sd1_pipe.load_embedding(bare)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(BadFileError, match="unrecognised format"):
        sd1_pipe.load_embedding(text)
    big = write_embedding(tmp_path / "big.safetensors", "a1111-safetensors", _vectors(2, 32))
    monkeypatch.setattr(emb_module, "MAX_FILE_BYTES", 100)
    with pytest.raises(BadFileError, match=r"too large for a textual-inversion embedding.*LoRA or a model checkpoint"):
        sd1_pipe.load_embedding(big)


def test_tokens_that_would_break_prompts_are_refused(sd1_pipe, tmp_path):
    tok = sd1_pipe.tokenizer
    for token, message in [
        ("cat", r"'cat' is an ordinary word .*every prompt that says 'cat'.*token='<cat>'"),
        ("bad hands", r"ordinary phrase .*token='<bad-hands>'"),
        ("(x)", r"contains '\(\)', which prompts read as emphasis"),
        (" lead", "without spaces at either end"),
        ("", "must be non-empty"),
        ("a\x1bb", "control characters"),
        ("x" * 101, "101 characters; at most 100"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_token(token, tok)
    for token in ("easynegative", "<cat>", "bad-hands-5", "my cooltok"):
        assert check_token(token, tok) == token
    path = write_embedding(tmp_path / "cat.safetensors", "a1111-safetensors", _vectors(1, 32))
    with pytest.raises(
        ValueError, match=r"cat\.safetensors: .*ordinary word.*the name comes from the file; pass token="
    ):
        sd1_pipe.load_embedding(path)
    assert sd1_pipe.load_embedding(path, token="<cat>") == "<cat>"
    try:
        with pytest.raises(ValueError, match=r"named '<cat>' is loaded already .*unload_embedding\('<cat>'\) first"):
            sd1_pipe.load_embedding(path, token="<CAT>")
    finally:
        sd1_pipe.unload_embedding()
