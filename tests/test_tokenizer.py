"""CLIP tokenizer: known answers, the transformers/OpenAI golden ids, folders, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stablediff import tokenizer as tokenizer_module
from stablediff.tokenizer import CLIPTokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_prompts.json").read_text())
PROMPTS = FIXTURE["prompts"]
MAX_LENGTH = FIXTURE["max_length"]
ASTRONAUT = "a photo of an astronaut riding a horse"
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


@pytest.fixture(scope="module")
def sd1() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def sd2() -> CLIPTokenizer:
    return CLIPTokenizer.default(pad_token="!")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, sd1, sd2) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"sd1": sd1.save(root / "sd1"), "sd2": sd2.save(root / "sd2")}


def padded(ids: list[int], pad_id: int) -> list[int]:
    return ids + [pad_id] * (MAX_LENGTH - len(ids))


def mismatches(tok: CLIPTokenizer, field: str, pad_id: int | None = None) -> list[tuple[str, list, list]]:
    """(text, ours, expected) for every fixture prompt whose ``field`` we do not reproduce."""
    bad = []
    for record in PROMPTS:
        if field not in record:
            continue
        expected = record[field] if pad_id is None else padded(record[field], pad_id)
        ours = tok.encode(record["text"]) if pad_id is None else tok(record["text"])
        if ours != expected:
            bad.append((record["text"], ours, expected))
    return bad


def report(bad: list, field: str) -> str:
    total = sum(field in r for r in PROMPTS)
    first = f"; first: {bad[0][0]!r} ours={bad[0][1]} expected={bad[0][2]}" if bad else ""
    return f"{len(bad)} of {total} prompts differ in {field!r}{first}"


def test_known_answer(sd1):
    assert sd1(ASTRONAUT)[: len(ASTRONAUT_IDS)] == ASTRONAUT_IDS
    assert sd1(ASTRONAUT)[len(ASTRONAUT_IDS) :] == [49407] * (MAX_LENGTH - len(ASTRONAUT_IDS))
    assert sd1.encode(ASTRONAUT) == ASTRONAUT_IDS[1:-1]


def test_vocabulary_and_special_ids(sd1, sd2):
    assert sd1.vocab_size == 49408
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id, sd1.max_length) == (49406, 49407, 49407, 77)
    assert (sd2.bos_id, sd2.eos_id, sd2.pad_id) == (49406, 49407, 0)
    assert sd1.encoder["!"] == 0 and sd1.encoder["!</w>"] == 256 and sd1.encoder["<|endoftext|>"] == 49407


def test_fixture_is_large_and_varied():
    assert len(PROMPTS) >= 300
    assert sum("sd2_input_ids" in r for r in PROMPTS) >= 5
    assert any(len(r["encode"]) > MAX_LENGTH for r in PROMPTS)  # truncation is exercised


@pytest.mark.parametrize("field", ["input_ids", "encode"])
def test_fixture_sd1_matches_transformers(sd1, field):
    bad = mismatches(sd1, field, FIXTURE["pad_id"]["sd1"] if field == "input_ids" else None)
    print(report(bad, field))
    assert not bad, report(bad, field)


def test_fixture_sd2_matches_transformers(sd2):
    bad = mismatches(sd2, "sd2_input_ids", FIXTURE["pad_id"]["sd2"])
    print(report(bad, "sd2_input_ids"))
    assert not bad, report(bad, "sd2_input_ids")


def test_fixture_openai_mode_matches_openai_clip():
    if FIXTURE["openai_reference"] is None:
        pytest.skip("fixture was generated without openai/CLIP's simple_tokenizer")
    tok = CLIPTokenizer.default(compat="openai")
    bad = [(r["text"], tok.encode(r["text"]), r.get("openai_encode", r["encode"])) for r in PROMPTS]
    bad = [b for b in bad if b[1] != b[2]]
    print(report(bad, "encode"), sum("openai_encode" in r for r in PROMPTS), "prompts where OpenAI differs")
    assert not bad, report(bad, "openai_encode/encode")


def test_openai_mode_cleans_like_clip():
    tok = CLIPTokenizer.default(compat="openai")
    assert tok.encode("tom &amp; jerry") == tok.encode("tom & jerry")
    assert tok.encode("don\u2019t") == tok.encode("don't")
    assert tok.encode("\uff21\uff22\uff23") == tok.encode("abc")
    assert tok.encode("wow!!!") == [2781, 995]  # no "!" splitting, whatever the pad token


def test_sd2_pad_and_exclamation_mark(sd1, sd2):
    ids = sd2("a cat")
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * (MAX_LENGTH - 4)
    # transformers cuts the pad token "!" out of the text, so it is always id 0 with SD2 folders
    assert sd2.encode("wow!!!") == [2781, 0, 0, 0]
    assert sd1.encode("wow!!!") == [2781, 995]


def test_truncation_keeps_bos_and_eos(sd1):
    ids = sd1(" ".join(["cat"] * 200))
    assert len(ids) == MAX_LENGTH and ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1] == sd1.encode("cat") * (MAX_LENGTH - 2)


def test_batch_equals_single(sd1):
    texts = [ASTRONAUT, "", "wow!!!"]
    assert sd1(texts) == [sd1(t) for t in texts]
    assert sd1(tuple(texts)) == sd1(texts)
    assert sd1([]) == []


def test_live_against_transformers(saved):
    transformers = pytest.importorskip("transformers")
    texts = [r["text"] for r in PROMPTS[::4]] + ["A<|ENDOFTEXT|>b", "x!<|startoftext|>y!"]
    for name, pad in (("sd1", None), ("sd2", "!")):
        ref = transformers.CLIPTokenizer.from_pretrained(str(saved[name]))
        ours = CLIPTokenizer.from_folder(saved[name])
        assert ours.pad_token == (pad or "<|endoftext|>")
        expected = ref(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
        got = ours(texts)
        bad = [(t, g, e) for t, g, e in zip(texts, got, expected, strict=True) if g != e]
        assert not bad, f"{name}: {len(bad)} of {len(texts)} differ; first: {bad[0]}"
        assert ref(texts, add_special_tokens=False).input_ids == [ours.encode(t) for t in texts]


def test_save_round_trip(saved, sd1, sd2):
    for name, original in (("sd1", sd1), ("sd2", sd2)):
        folder = saved[name]
        assert sorted(os.listdir(folder)) == sorted(tokenizer_module.FOLDER_FILES)  # no temp files left
        assert (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
        loaded = CLIPTokenizer.from_folder(folder)
        assert loaded.vocab_size == original.vocab_size and loaded.added_tokens == original.added_tokens
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.max_length) == (
            original.bos_id,
            original.eos_id,
            original.pad_id,
            original.max_length,
        )
        texts = [r["text"] for r in PROMPTS]
        assert loaded(texts) == original(texts)


def write_hub_style(folder: Path, saved: Path, pad: str) -> Path:
    """A folder shaped like the SD1.5/SD2.1 hub ones: no added_tokens_decoder, special tokens as
    ``__type: AddedToken`` dicts with ``normalized: true``, the pad token a plain string."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((saved / name).read_bytes())
    token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", **token},
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", **token},
        "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", **token},
        "pad_token": pad,
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    special_map = {
        k: (v if isinstance(v, str) else {"content": v["content"], **token})
        for k, v in config.items()
        if k.endswith("_token")
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


def test_hub_style_folders(tmp_path, saved, sd1, sd2):
    hub1 = CLIPTokenizer.from_folder(write_hub_style(tmp_path / "sd1", saved["sd1"], "<|endoftext|>"))
    hub2 = CLIPTokenizer.from_folder(write_hub_style(tmp_path / "sd2", saved["sd2"], "!"))
    assert hub1.added_tokens == sd1.added_tokens == {"<|startoftext|>": True, "<|endoftext|>": False}
    assert hub2.added_tokens == sd2.added_tokens == {"<|startoftext|>": True, "<|endoftext|>": True, "!": False}
    assert hub2.pad_id == 0 and hub1.pad_id == 49407
    # as transformers does: SD1.x matches "<|endoftext|>" in the raw text only, SD2.x after lower-casing
    assert hub1.encode("A<|ENDOFTEXT|>b") == [320, 27, 347, 40786, 4160, 91, 285, 321]
    assert hub2.encode("A<|ENDOFTEXT|>b") == [320, 49407, 321]
    (tmp_path / "sd1" / "special_tokens_map.json").unlink()  # optional file
    assert CLIPTokenizer.from_folder(tmp_path / "sd1").added_tokens == hub1.added_tokens


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_is_named(tmp_path, saved, missing):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in tokenizer_module.FOLDER_FILES:
        if name != missing:
            (folder / name).write_bytes((saved["sd1"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        CLIPTokenizer.from_folder(folder)


def test_bad_folders(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in tokenizer_module.FOLDER_FILES:
        (folder / name).write_bytes((saved["sd1"] / name).read_bytes())
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nbroken\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt:3: .*'broken'"):
        CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").write_bytes((saved["sd1"] / "merges.txt").read_bytes())
    (folder / "special_tokens_map.json").unlink()  # it would override the config's pad token
    (folder / "tokenizer_config.json").write_text('{"pad_token": "<|nope|>"}')
    with pytest.raises(ValueError, match=r"<\|nope\|>.*not in the vocabulary"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        CLIPTokenizer.from_folder(folder)


def test_bad_input_types(sd1):
    with pytest.raises(TypeError, match="text must be a str, got int"):
        sd1.encode(3)
    with pytest.raises(TypeError, match="text must be a str or a list of str, got NoneType"):
        sd1(None)
    with pytest.raises(TypeError, match="text must be a str or a list of str, got bytes"):
        sd1(b"a cat")
    with pytest.raises(TypeError, match=r"text\[1\] must be a str, got int"):
        sd1(["a cat", 7])


def test_bad_options():
    with pytest.raises(ValueError, match=r"compat must be one of \('transformers', 'openai'\), got 'hf'"):
        CLIPTokenizer.default(compat="hf")
    with pytest.raises(ValueError, match="special tokens \\['<pad>'\\] are not in the vocabulary"):
        CLIPTokenizer.default(pad_token="<pad>")
    vocab, merges = {"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, []
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        CLIPTokenizer(vocab, merges, max_length=1)


def test_failed_save_writes_nothing(tmp_path, sd1, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        sd1.save(tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []
