"""The diagnostic tools run on the bundled model (their figures are quoted in docs/model-card.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_relation_probe_prints_text_similarity_a_row_per_timestep_and_the_suite():
    command = [sys.executable, str(TOOLS / "relation_probe.py"), "--n", "4", "--suite", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum("cosine true vs inverse relation" in line for line in lines) == 2
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [950, 850, 750, 600, 400, 200]
    for row in rows:  # x0 errors are positive and shrink with the noise
        assert all(float(v) > 0 for v in row[2:5])
    assert float(rows[0][2]) > float(rows[-1][2])
    assert lines[-1].startswith("relation suite, first 2 prompts: color ") and "all_correct" in lines[-1]
