"""The CPU speedrun's record (docs/speedrun.md): add a finished run to it, and draw it.

    .venv/bin/python benchmarks/speedrun/speedrun.py record RUN --change "what changed" --recipe FILE
    .venv/bin/python benchmarks/speedrun/speedrun.py plot

A run is `stablediff train recipe FILE --out RUN --package RUN/model.safetensors` on the 2-core
machine, evaluated by the recipe's [eval] table (the package step does it). `record` reads the
run folder: each stage's training time from its metrics log, the wall time from the run folder's
creation to the half-precision export written after the last stage (latent caches and stage
start-up included, the evaluation not), and the four scores of RUN/eval/eval.json; it appends a row
to benchmarks/results/speedrun.json. `plot` draws the scores of every row against its wall time
(docs/images/speedrun.png) and prints the table for docs/speedrun.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from datetime import date
from pathlib import Path

import torch

from stablediff.train.recipe import training_seconds

RECORD = Path("benchmarks/results/speedrun.json")
PLOT = Path("docs/images/speedrun.png")
# The four targets: (suite, metric) in eval.json, and the share required.
SCORES = {
    "single colour+shape": ("single", "color_shape", 0.85),
    "held-out colour+shape": ("heldout", "color_shape", 0.80),
    "position": ("single", "position", 0.90),
    "two objects + relation": ("relation", "all_correct", 0.50),
}


def wall_seconds(run: Path) -> float:
    """From the run folder's creation (the tokenizer, fitted in its first seconds) to the export."""
    start = min(p.stat().st_mtime for p in (run / "tokenizer").rglob("*"))
    return (run / "model-fp16.safetensors").stat().st_mtime - start


def machine() -> str:
    """Cores, architecture and the vector ISA torch uses: rows from an AVX2 and an AVX-512 machine differ."""
    return f"{os.cpu_count()} cores, {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def record(run: Path, change: str, recipe: str) -> dict:
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    stages = {p.name: training_seconds(p) for p in sorted(run.iterdir()) if (p / "metrics.jsonl").is_file()}
    row = {
        "date": date.today().isoformat(),
        "change": change,
        "command": f"stablediff train recipe {recipe} --out {run} --package {run}/model.safetensors",
        "commit": _commit(),
        "machine": machine(),
        "wall_minutes": round(wall_seconds(run) / 60, 1),
        "stage_minutes": {k: round(v / 60, 1) for k, v in stages.items() if v is not None},
        "scores": {name: evaluation["suites"][suite][metric] for name, (suite, metric, _) in SCORES.items()},
    }
    rows = json.loads(RECORD.read_text()) if RECORD.is_file() else []
    rows.append(row)
    tmp = RECORD.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(RECORD)
    return row


def table(rows: list[dict]) -> str:
    head = ["date", "machine", "change", "wall time", *SCORES, "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scores = [f"{100 * r['scores'][name]:.1f}%" for name in SCORES]
        cells = [r["date"], r["machine"], r["change"], f"{r['wall_minutes']} min", *scores]
        lines.append("| " + " | ".join(cells) + f" | `{r['command']}` |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    minutes = [r["wall_minutes"] for r in rows]
    for i, (name, (_, _, target)) in enumerate(SCORES.items()):
        colour = f"C{i}"
        # rows are different recipes, not points of one run: markers, no line
        ax.plot(minutes, [100 * r["scores"][name] for r in rows], "o", color=colour, label=name)
        ax.axhline(100 * target, color=colour, linestyle=":", linewidth=1)
    for k, r in enumerate(rows):
        ax.annotate(f"row {k + 1}", (r["wall_minutes"], 2), fontsize=8, ha="center")  # row 0 has no run
    ax.axvline(120, color="grey", linewidth=1)
    ax.set(xlabel="wall time of the recipe (minutes, 2-core CPU)", ylabel="% of 200 prompts right", ylim=(0, 100))
    ax.set_title("CPU speedrun: each row's scores (dotted: targets; grey: the 2-hour budget)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("run", type=Path)
    rec.add_argument("--change", required=True)
    rec.add_argument("--recipe", required=True)
    sub.add_parser("plot")
    args = parser.parse_args()
    if args.command == "record":
        print(json.dumps(record(args.run, args.change, args.recipe), indent=1))
    rows = json.loads(RECORD.read_text())
    plot(rows)
    print(table(rows))
    print(f"wrote {PLOT}")


if __name__ == "__main__":
    main()
