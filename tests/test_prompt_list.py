"""`stablediff generate --prompts FILE`: text and JSONL lists, defaults, seeds per line, resume, and
the same files from two torchrun processes as from one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stablediff.cli import main
from stablediff.errors import BadFileError
from stablediff.image import read_png_metadata
from stablediff.prompt_list import read_prompt_file, shard

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--model", "tiny", "--steps", "2", "--width", "32", "--height", "32"]


def test_text_lines_with_defaults_and_seeds_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n# a comment\na blue square\n  a green star  \n")
    jobs = read_prompt_file(path, {"steps": 7, "sampler": "euler"}, seed=5)
    assert [j.params.prompt for j in jobs] == ["a red circle", "a blue square", "a green star"]
    assert all(j.params.steps == 7 and j.params.sampler == "euler" for j in jobs)
    assert len({j.params.seed for j in jobs}) == 3
    again = read_prompt_file(path, {"steps": 7}, seed=5)
    assert [j.params.seed for j in again] == [j.params.seed for j in jobs]  # depends on the line only
    assert [j.params.seed for j in read_prompt_file(path, {}, seed=6)] != [j.params.seed for j in jobs]
    assert [j.index for j in shard(jobs, 1, 2)] == [1]


def test_jsonl_lines_override_the_defaults(tmp_path):
    path = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "a", "steps": 3, "seed": 11}, {"prompt": "b", "batch_size": 2, "seed": -1}]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    jobs = read_prompt_file(path, {"steps": 9, "guidance_scale": 3.0}, seed=0)
    assert (jobs[0].params.steps, jobs[0].params.seed, jobs[0].params.guidance_scale) == (3, 11, 3.0)
    assert jobs[1].params.steps == 9 and jobs[1].params.seed != -1
    assert [p.name for p in jobs[1].paths(tmp_path)] == [
        f"00001-0-{jobs[1].params.seed}.png",
        f"00001-1-{jobs[1].params.seed + 1}.png",
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b", "colour": 1}\n', "bad.jsonl:2: unknown fields"),
        ("bad.jsonl", '{"prompt": "a"\n', "bad.jsonl:1"),
        ("bad.jsonl", '["a"]\n', "a JSON object"),
        ("bad.jsonl", '{"prompt": "a", "steps": 0}\n', "bad.jsonl:1: steps"),
        ("empty.txt", "\n# nothing\n", "no prompts"),
    ],
)
def test_a_bad_line_is_named_and_nothing_runs(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BadFileError, match=message):
        read_prompt_file(path, {}, seed=0)
    code = main(["generate", "--prompts", str(path), "--out", str(tmp_path / "out"), *FAST])
    assert code == 2 and not (tmp_path / "out").exists()


def test_generate_writes_every_line_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--seed", "3", *FAST]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == 2 and names[0].startswith("00000-0-") and names[1].startswith("00001-0-")
    record = read_png_metadata(out / names[1])["stablediff"]["params"]
    assert record["prompt"] == "a blue square" and record["steps"] == 2
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    prompts.write_text("a red circle\na blue square\na green star\n")  # one more line
    capsys.readouterr()
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--seed", "3", *FAST]) == 0
    assert "1 of 3 prompts to run" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in names} == before  # the written ones were skipped
    assert len(list(out.glob("*.png"))) == 3


def test_two_torchrun_processes_write_the_same_files_as_one(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a shape number {k}" for k in range(5)))
    args = ["-m", "stablediff", "generate", "--prompts", str(prompts), "--seed", "1", *FAST]
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0"]
    for command in ([*args, "--out", str(tmp_path / "one")], [*torchrun, *args, "--out", str(tmp_path / "two")]):
        # one thread in every process: the same kernels, so the same bits
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, env=ONE_THREAD)
        assert done.returncode == 0, done.stderr[-3000:]
    one = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    two = sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    assert one == two and len(one) == 5
    for name in one:
        a = np.asarray(Image.open(tmp_path / "one" / name))
        b = np.asarray(Image.open(tmp_path / "two" / name))
        assert np.array_equal(a, b), name
