"""The diagnostic tools run on the bundled model (their figures are quoted in docs/model-card.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_relation_probe_prints_text_similarity_a_row_per_timestep_and_the_suite():
    command = [sys.executable, str(TOOLS / "relation_probe.py"), "--n", "4", "--suite", "2"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum("cosine true vs inverse relation" in line for line in lines) == 4
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [950, 850, 750, 600, 400, 200]
    for row in rows:  # x0 errors are positive and shrink with the noise; the grounding loss is in [0, 1]
        assert all(float(v) > 0 for v in row[2:6]) and all(0 < float(v) < 1 for v in row[8:10])
    assert float(rows[0][2]) > float(rows[-1][2])
    assert lines[-1].startswith("relation suite, first 2 prompts: color ") and "all_correct" in lines[-1]


def test_relation_probe_of_a_text_export_measures_the_same_states(tmp_path):
    """The bundled model's text encoder written as a text stage export: the same similarities and
    linear probes."""
    from stablediff import load_pipeline
    from stablediff.train.exports import TEXT_PART, TOKENIZER_DIR
    from stablediff.weights.io import write_safetensors

    pipe = load_pipeline()
    write_safetensors(
        pipe.text_encoder.state_dict(),
        tmp_path / TEXT_PART.file,
        {TEXT_PART.config_key: json.dumps(pipe.text_encoder.config.to_dict())},
    )
    pipe.tokenizer.save(tmp_path / TOKENIZER_DIR)
    outputs = []
    for extra in ([], ["--text", str(tmp_path)]):
        command = [sys.executable, str(TOOLS / "relation_probe.py"), "--n", "4", "--decode", "300", *extra]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append([line for line in done.stdout.splitlines() if "cosine" in line or "decodable" in line])
    assert len(outputs[0]) == 7 and outputs[0] == outputs[1]
    assert "x0 error" not in done.stdout  # a text export alone has no U-Net to probe
    # The second object's shape word follows its colour word: its colour is there (chance: 12.5%).
    shape_word = next(line for line in outputs[0] if line.startswith("decodable from the second object's shape"))
    assert float(shape_word.split("second object's colour ")[1]) > 50, shape_word


def test_grounding_bound_knowing_the_relation_lowers_the_loss():
    command = [sys.executable, str(TOOLS / "grounding_bound.py"), "--n", "400"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["8x8", "4x4"]
    for line in lines:
        uniform, prior, given, peak = (float(part.split()[-1]) for part in line.split(","))
        # Uniform attention on a 64x64 image keeps about 10% inside a box; the relation says where to look.
        assert 0.85 < uniform < 0.95 and given < prior <= uniform and peak < prior
