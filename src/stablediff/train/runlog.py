"""What a run writes about itself besides checkpoints: ``metrics.jsonl``, ``eval.json``, ``loss.png``.

Only the main process (rank 0) creates a RunLog that writes; on other ranks every method is a
no-op. ``metrics.jsonl`` is one JSON object per logged step, appended and flushed as it goes; a
resumed run first drops the lines after the checkpoint's step (they were written by the
interrupted run after its last save and will be logged again), so the file reads as one run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from stablediff.weights.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
EVAL = "eval.json"
PLOT = "loss.png"


def _jsonable(value: Any) -> Any:
    """Floats as JSON accepts them: NaN and inf (a skipped step's loss) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl (a torn last line, from a killed process, is ignored)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.metrics_path = self.run_dir / METRICS
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.evals: list[dict] = []
        eval_path = self.run_dir / EVAL
        if resume_step is not None and eval_path.is_file():
            try:
                self.evals = [e for e in json.loads(eval_path.read_text())["history"] if e["step"] <= resume_step]
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("ignoring unreadable %s", eval_path)

    def log(self, record: dict) -> None:
        """Append one record (its floats may be NaN/inf: they are written as strings)."""
        if not self.enabled:
            return
        line = json.dumps({k: _jsonable(v) for k, v in record.items()})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Add held-out metrics of `step` to eval.json (the whole history) and to metrics.jsonl."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(float(v)) for k, v in metrics.items()}}
        self.evals = [e for e in self.evals if e["step"] != step] + [record]
        atomic_write_text(self.run_dir / EVAL, json.dumps({"latest": record, "history": self.evals}, indent=2) + "\n")
        self.log({"step": step, "event": "eval", **{f"eval/{k}": v for k, v in metrics.items()}})

    def plot(self) -> Path | None:
        """Draw the loss curve of metrics.jsonl (and eval metrics) to RUN/loss.png; None without
        matplotlib (an optional dependency) or without data."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")  # no display: render to a file only
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib is not installed: no %s", PLOT)
            return None
        records = read_metrics(self.run_dir)
        train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
        if not train:
            return None
        import io

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        try:
            ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
            for key in sorted({k for r in records for k in r if k.startswith("eval/") and k.endswith("loss")}):
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                ax.plot(*zip(*points, strict=True), "o-", label=key, markersize=3)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            if all(v > 0 for _, v in train):
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
        finally:
            plt.close(fig)
        path = self.run_dir / PLOT
        atomic_write_bytes(path, buffer.getvalue())
        return path
