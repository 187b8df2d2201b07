"""A list of generations from a file (`stablediff generate --prompts FILE`), split over processes.

The file is text (one prompt per line; blank lines and lines starting with ``#`` are skipped) or
JSONL (``.jsonl``: one JSON object of `GenerationParams` fields per line). The command line's
other options are the defaults each line may override. Line ``i`` (counting the lines that make
a job, from 0) without a seed of its own gets ``derive_seed(seed, "prompts", i)``: its images
depend on the line, never on how many processes share the list. Under torchrun (``RANK`` and
``WORLD_SIZE`` in the environment) process ``r`` of ``N`` takes the lines ``i`` with
``i % N == r``. Image ``k`` of line ``i`` is written as ``NNNNN-K-SEED.png`` (``NNNNN = i``,
``SEED`` its own seed), so a rerun skips the lines whose images are all there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from stablediff.errors import BadFileError, load_json, printable
from stablediff.params import GenerationParams
from stablediff.seeds import derive_seed

MAX_FILE_BYTES = 64 * 1024 * 1024  # a prompt file is read whole: bound what it may make us hold
MAX_LINES = 1_000_000
IMAGE_FIELDS = ("init_image", "mask")  # file paths in a JSONL line are taken as written


@dataclass(frozen=True)
class Job:
    """Line ``index`` of the list: the params it runs with."""

    index: int
    params: GenerationParams

    def paths(self, out: Path) -> list[Path]:
        """Where its images go: one per image of the batch (seeds seed, seed + 1, ...)."""
        return [out / f"{self.index:05d}-{k}-{self.params.seed + k}.png" for k in range(self.params.batch_size)]


def read_prompt_file(path: str | os.PathLike[str], defaults: dict[str, Any], seed: int) -> list[Job]:
    """Every job of the file, validated (the first bad line is a BadFileError naming it); nothing
    is generated for a file with a bad line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {printable(str(path))}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise BadFileError(
            f"{path}: {path.stat().st_size} bytes, more than the {MAX_FILE_BYTES} a prompt file may have"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BadFileError(f"{path}: not UTF-8 text ({err})") from None
    if len(lines) > MAX_LINES:
        raise BadFileError(f"{path}: {len(lines)} lines, more than {MAX_LINES}")
    jsonl = path.suffix.lower() == ".jsonl"
    known = {f.name for f in fields(GenerationParams)} - {"latents"}
    jobs = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        values = dict(defaults)
        values.pop("seed", None)
        if jsonl:
            record = load_json(text, where)
            if not isinstance(record, dict):
                raise BadFileError(f"{where}: a JSON object of GenerationParams fields is needed")
            unknown = sorted(set(record) - known)
            if unknown:
                raise BadFileError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
            values.update(record)
        else:
            values["prompt"] = text
        if values.get("seed") is None or values["seed"] == -1:
            values["seed"] = derive_seed(seed, "prompts", len(jobs)) % 2**32
        try:
            params = GenerationParams(**values).validate()
        except (TypeError, ValueError) as err:
            raise BadFileError(f"{where}: {err}") from None
        jobs.append(Job(len(jobs), params))
    if not jobs:
        raise BadFileError(f"{path}: no prompts (blank lines and # comments only)")
    return jobs


def shard(jobs: list[Job], rank: int, world_size: int) -> list[Job]:
    """The jobs process ``rank`` of ``world_size`` runs: every world_size-th, from ``rank``."""
    return [job for job in jobs if job.index % world_size == rank]


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))
