"""Files other tools write and files we write for them: tokenizer.json folders (transformers 5),
`convert` (what --overwrite may replace, dtype and metadata kept), and the mode of written files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers
from reference import build_reference, save_reference_folder
from safetensors.torch import load_file, save_file

from stablediff import tokenizer as tokenizer_module
from stablediff.cli import main
from stablediff.loading import (
    SPEC_CHECKSUM_KEY,
    SPEC_METADATA_KEY,
    load_pipeline,
    model_metadata,
    save,
)
from stablediff.presets import ModelSpec
from stablediff.tokenizer import CLIPTokenizer
from stablediff.weights.io import atomic_write_bytes, current_umask, read_metadata, read_state_dict, write_safetensors

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_prompts.json").read_text())
PROMPTS = FIXTURE["prompts"]
SPECIAL_TEXTS = ["A<|ENDOFTEXT|>b", "x!<|startoftext|>y!", "<|STARTOFTEXT|>a", "hi!! <|endoftext|>", "ſ's"]
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def transformers_folder(tmp_path: Path, name: str, pad_token: str, merges: str = "pairs") -> Path:
    """A tokenizer folder as transformers 5 saves it: tokenizer.json + tokenizer_config.json only.
    `merges="strings"` rewrites the merges the way tokenizers before 0.20 stored them ("a b")."""
    ours = CLIPTokenizer.default(pad_token=pad_token).save(tmp_path / f"{name}-ours")
    folder = tmp_path / name
    transformers.CLIPTokenizer.from_pretrained(str(ours)).save_pretrained(str(folder))
    for legacy in ("vocab.json", "merges.txt"):  # transformers 5 writes neither; be sure of the layout
        (folder / legacy).unlink(missing_ok=True)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(isinstance(m, list) for m in data["model"]["merges"])  # tokenizers 0.23 writes pairs
    if merges == "strings":
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# 1. tokenizer.json folders
@pytest.mark.parametrize("merges", ["pairs", "strings"])
def test_tokenizer_json_folder_matches_transformers(tmp_path, merges):
    for name, pad, field in (("sd1", "<|endoftext|>", "input_ids"), ("sd2", "!", "sd2_input_ids")):
        folder = transformers_folder(tmp_path, name, pad, merges)
        ours = CLIPTokenizer.from_folder(folder)
        assert ours.pad_token == pad and ours.vocab_size == 49408
        assert ours.merges == CLIPTokenizer.default().merges
        # the fixture's golden ids (transformers 5 on the hub folders)
        pad_id = FIXTURE["pad_id"][name]
        records = [r for r in PROMPTS if field in r]
        assert len(records) >= 5
        expected = [r[field] + [pad_id] * (FIXTURE["max_length"] - len(r[field])) for r in records]
        got = ours([r["text"] for r in records])
        bad = [(r["text"], g, e) for r, g, e in zip(records, got, expected, strict=True) if g != e]
        assert not bad, f"{name}: {len(bad)} of {len(records)} differ; first {bad[0]}"
        if name == "sd1":
            assert [ours.encode(r["text"]) for r in PROMPTS] == [r["encode"] for r in PROMPTS]
        # and transformers itself on the very same folder, special tokens in the text included
        ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
        texts = [r["text"] for r in PROMPTS[::5]] + SPECIAL_TEXTS
        assert ours(texts) == ref(texts, padding="max_length", max_length=77, truncation=True).input_ids
        assert [ours.encode(t) for t in texts] == ref(texts, add_special_tokens=False).input_ids


def test_diffusers_folder_with_tokenizer_json_loads(tmp_path):
    unet, vae, text, tokenizer, scheduler = build_reference("sd2")
    legacy = save_reference_folder(tmp_path / "legacy", unet, vae, text, tokenizer, scheduler)
    modern = tmp_path / "modern"
    shutil.copytree(legacy, modern)
    shutil.rmtree(modern / "tokenizer")
    transformers.CLIPTokenizer.from_pretrained(str(legacy / "tokenizer")).save_pretrained(str(modern / "tokenizer"))
    for name in ("vocab.json", "merges.txt"):
        (modern / "tokenizer" / name).unlink(missing_ok=True)
    a, b = load_pipeline(legacy), load_pipeline(modern)
    assert b.tokenizer.pad_token == "!" and b.tokenizer.added_tokens == a.tokenizer.added_tokens
    texts = [r["text"] for r in PROMPTS[::7]] + SPECIAL_TEXTS
    assert b.tokenizer(texts) == a.tokenizer(texts)
    assert b.spec == dataclasses.replace(a.spec, name="diffusers:modern")
    cond_a, cond_b = a.encode_prompt("a red circle"), b.encode_prompt("a red circle")
    assert all(torch.equal(x, y) for x, y in zip(cond_a, cond_b, strict=True))


def _tokenizer_json(folder: Path) -> dict:
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def _put(folder: Path, data: dict) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_bad_tokenizer_json(tmp_path, monkeypatch):
    folder = transformers_folder(tmp_path, "tok", "<|endoftext|>")
    good = _tokenizer_json(folder)
    cases = [
        ({**good, "model": {**good["model"], "type": "WordPiece"}}, r"must be a BPE model.*'WordPiece'"),
        (
            {**good, "model": {**good["model"], "end_of_word_suffix": ""}},
            r"end_of_word_suffix is '', not CLIP's '</w>'",
        ),
        ({**good, "model": {**good["model"], "merges": [["a", "b", "c"]]}}, r"model\.merges\[0\] must be"),
        ({**good, "model": {**good["model"], "merges": ["ab"]}}, r"a merge line must be two tokens"),
        ({**good, "model": {**good["model"], "vocab": {"a": "1"}}}, r"token 'a' has id '1'"),
        ({**good, "model": {**good["model"], "vocab": []}}, r"model\.vocab must be a JSON object"),
        ({**good, "added_tokens": [{"id": 5, "content": "<|endoftext|>"}]}, r"added token '<\|endoftext\|>' has id 5"),
        ({**good, "added_tokens": [{"content": "x"}]}, r"added_tokens\[0\] must be an object"),
    ]
    for data, message in cases:
        _put(folder, data)
        with pytest.raises(ValueError, match=message):
            CLIPTokenizer.from_folder(folder)
    _put(folder, good)
    assert CLIPTokenizer.from_folder(folder).vocab_size == 49408
    # bounded: the file's size, and the number of entries it lists
    monkeypatch.setattr(tokenizer_module, "MAX_FILE_BYTES", 1 << 20)
    with pytest.raises(ValueError, match=r"tokenizer\.json is \d+ bytes; a tokenizer file may be at most 1048576"):
        CLIPTokenizer.from_folder(folder)
    monkeypatch.setattr(tokenizer_module, "MAX_FILE_BYTES", 64 << 20)
    monkeypatch.setattr(tokenizer_module, "MAX_ENTRIES", 40000)
    with pytest.raises(ValueError, match=r"vocabulary has 49408 entries, more than the limit of 40000"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no vocab\.json \(and no tokenizer\.json\)"):
        CLIPTokenizer.from_folder(folder)


# ---------------------------------------------------------------------------------------------
# 2. convert --overwrite replaces only a model, atomically
@pytest.fixture
def model_file(tmp_path) -> Path:
    return save(load_pipeline("tiny", seed=1), tmp_path / "src.safetensors")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_convert_overwrite_refuses_a_folder_that_is_not_a_model(tmp_path, model_file, capsys):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, "convert", str(model_file), str(target), "--layout", "diffusers", "--overwrite")
    assert code == 2 and str(target) in err and "not a model" in err, err
    assert (target / "holiday.txt").read_text() == "mine" and os.listdir(target) == ["holiday.txt"]
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder left behind
    code, _, err = run(capsys, "convert", str(model_file), str(target), "--overwrite")  # single-file layout too
    assert code == 2 and "not a model" in err and os.listdir(target) == ["holiday.txt"]


@pytest.mark.parametrize("name", ["notes.txt", "notes.safetensors", "results.pkl"])
def test_convert_overwrite_refuses_a_file_that_is_not_a_model(tmp_path, model_file, capsys, name):
    target = tmp_path / name
    if name.endswith(".pkl"):  # a torch pickle, but by its name not a checkpoint
        torch.save({"scores": torch.zeros(3)}, target)
    else:
        target.write_text("my notes")
    before = target.read_bytes()
    for layout in ("single-file", "diffusers"):
        code, _, err = run(capsys, "convert", str(model_file), str(target), "--layout", layout, "--overwrite")
        assert code == 2 and str(target) in err and "not a model file" in err, err
        assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "src.safetensors"])


def test_convert_overwrite_replaces_a_torch_checkpoint(tmp_path, model_file, capsys):
    target = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, target)
    assert run(capsys, "convert", str(model_file), str(target), "--overwrite")[0] == 0
    assert read_state_dict(target).keys() == read_state_dict(model_file).keys()


def test_convert_overwrite_replaces_a_model(tmp_path, model_file, capsys):
    other = save(load_pipeline("tiny", seed=2), tmp_path / "other.safetensors")
    out = tmp_path / "out"
    assert run(capsys, "convert", str(model_file), str(out), "--layout", "diffusers")[0] == 0
    (out / "unet" / "stale.json").write_text("{}")  # anything inside a model folder goes with it
    assert run(capsys, "convert", str(other), str(out), "--layout", "diffusers")[0] == 2  # no --overwrite
    assert run(capsys, "convert", str(other), str(out), "--layout", "diffusers", "--overwrite")[0] == 0
    assert not (out / "unet" / "stale.json").exists()
    replaced = load_pipeline(out).state_dicts()["unet"]
    expected = load_pipeline(other).state_dicts()["unet"]
    assert all(torch.equal(replaced[k], v) for k, v in expected.items())
    # an empty folder, a model folder by a file, a model file by a folder
    (tmp_path / "empty").mkdir()
    assert (
        run(capsys, "convert", str(model_file), str(tmp_path / "empty"), "--layout", "diffusers", "--overwrite")[0] == 0
    )
    assert (tmp_path / "empty" / "model_index.json").is_file()
    assert run(capsys, "convert", str(model_file), str(out), "--overwrite")[0] == 0
    assert out.is_file() and read_state_dict(out).keys() == read_state_dict(model_file).keys()
    assert run(capsys, "convert", str(model_file), str(out), "--layout", "diffusers", "--overwrite")[0] == 0
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other.safetensors", "out", "src.safetensors"]


def test_failed_overwrite_leaves_the_old_model(tmp_path, model_file, capsys, monkeypatch):
    import stablediff.loading as loading

    out = save(load_pipeline("tiny", seed=3), tmp_path / "out", layout="diffusers")
    before = _tree(out)

    def fail_midway(pipe, sds, folder, meta):
        (folder / "model_index.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(loading, "_write_diffusers", fail_midway)
    code, _, err = run(capsys, "convert", str(model_file), str(out), "--layout", "diffusers", "--overwrite")
    assert code == 2 and "disk full" in err
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.safetensors"]
    monkeypatch.undo()

    # the new folder cannot be moved in: the old one is put back
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == out and not Path(src).name.startswith(".out.old-"):
            raise OSError("rename refused")
        return real_rename(src, dst)

    monkeypatch.setattr(loading.os, "rename", rename)
    code, _, err = run(capsys, "convert", str(model_file), str(out), "--layout", "diffusers", "--overwrite")
    assert code == 2 and "rename refused" in err
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.safetensors"]


# ---------------------------------------------------------------------------------------------
# 3. convert keeps dtype and metadata
def test_convert_keeps_dtype_unless_told(tmp_path, capsys):
    half = save(load_pipeline("tiny", seed=4), tmp_path / "half.safetensors", dtype=torch.float16)
    assert run(capsys, "convert", str(half), str(tmp_path / "d"), "--layout", "diffusers")[0] == 0
    assert run(capsys, "convert", str(tmp_path / "d"), str(tmp_path / "back.safetensors"))[0] == 0
    assert run(capsys, "convert", str(half), str(tmp_path / "full.safetensors"), "--dtype", "fp32")[0] == 0
    src = read_state_dict(half)
    for part in ("unet", "vae"):
        sd = read_state_dict(tmp_path / "d" / part / "diffusion_pytorch_model.safetensors")
        assert {v.dtype for v in sd.values()} == {torch.float16}, part
    back, full = read_state_dict(tmp_path / "back.safetensors"), read_state_dict(tmp_path / "full.safetensors")
    assert back.keys() == src.keys() == full.keys()
    for k, v in src.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
        assert full[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype) and torch.equal(
            full[k], v.float()
        )
    assert os.path.getsize(tmp_path / "back.safetensors") < 0.6 * os.path.getsize(tmp_path / "full.safetensors")


def test_convert_carries_metadata(tmp_path, capsys):
    provenance = {"stablediff.recipe": "base = 'shapes'\n", "stablediff.eval": '{"all_correct": 0.9}', "note": "ours"}
    src = save(load_pipeline("tiny", seed=5), tmp_path / "m.safetensors", metadata=provenance)
    assert run(capsys, "convert", str(src), str(tmp_path / "d"), "--layout", "diffusers")[0] == 0
    assert (
        run(
            capsys, "convert", str(tmp_path / "d"), str(tmp_path / "v.safetensors"), "--prediction-type", "v_prediction"
        )[0]
        == 0
    )
    spec = load_pipeline(src).spec
    for path in (tmp_path / "d" / UNET_FILE, tmp_path / "v.safetensors"):
        meta = read_metadata(path)
        assert {k: meta.get(k) for k in provenance} == provenance, path
    assert model_metadata(tmp_path / "d") == read_metadata(tmp_path / "d" / UNET_FILE)
    # our spec is rewritten for the new file, with its checksum
    written = read_metadata(tmp_path / "v.safetensors")
    assert ModelSpec.from_json(written[SPEC_METADATA_KEY]).prediction_type == "v_prediction"
    assert load_pipeline(tmp_path / "v.safetensors").spec.prediction_type == "v_prediction"
    assert (
        load_pipeline(tmp_path / "d").spec == spec
        and written[SPEC_CHECKSUM_KEY] != read_metadata(src)[SPEC_CHECKSUM_KEY]
    )
    # a foreign file's own metadata travels too (its spec is recognised from the weights)
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(src), foreign, metadata={"modelspec.title": "Shapes", "format": "pt"})
    assert run(capsys, "convert", str(foreign), str(tmp_path / "f.safetensors"))[0] == 0
    meta = read_metadata(tmp_path / "f.safetensors")
    assert meta["modelspec.title"] == "Shapes" and meta["format"] == "pt" and SPEC_METADATA_KEY in meta


def test_save_metadata_cannot_replace_the_spec(tmp_path):
    pipe = load_pipeline("tiny")
    junk = {SPEC_METADATA_KEY: "{}", SPEC_CHECKSUM_KEY: "0" * 64, "stablediff.version": "0.0.0", "kept": "yes"}
    path = save(pipe, tmp_path / "m.safetensors", metadata=junk)
    meta = read_metadata(path)
    assert meta["kept"] == "yes" and meta["stablediff.version"] != "0.0.0"
    assert load_pipeline(path).spec == pipe.spec


# ---------------------------------------------------------------------------------------------
# 4. written files get the umask's mode
@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
        atomic_write_bytes(tmp_path / "b.bin", b"abc")
        pipe = load_pipeline("tiny")
        save(pipe, tmp_path / "m.safetensors")
        folder = save(pipe, tmp_path / "d", layout="diffusers")
        save(pipe, folder, layout="diffusers", overwrite=True)
    finally:
        os.umask(old)
    files = [tmp_path / "w.safetensors", tmp_path / "b.bin", tmp_path / "m.safetensors"]
    files += [p for p in folder.rglob("*") if p.is_file()]
    dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    assert len(files) > 10 and len(dirs) == 6
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {str(p): oct(file_mode) for p in files}
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {str(p): oct(dir_mode) for p in dirs}
