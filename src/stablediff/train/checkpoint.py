"""Checkpoints of a training run: ``RUN/checkpoints/step_XXXXXXX/``, safetensors and JSON only.

A checkpoint folder holds

- ``model.safetensors``: the trainable module's state dict; ``ema.safetensors``: its EMA (if any);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state dict, every tensor stored
  under a flattened key (``state.0.exp_avg``) and the rest as JSON that points at those keys;
- ``rng.safetensors``: torch RNG states as uint8 tensors, one per process (``cpu.rank0``, ...);
- ``state.json``: step, data position, LR schedule, EMA update count, skipped steps, world size;
- ``config.json``: the run's TrainConfig;
- ``COMPLETE``: an empty marker, written last.

Writing is crash-safe: everything goes to ``checkpoints/.tmp-step_XXXXXXX/``, each file fsynced;
the folder is renamed into place, and only then is ``COMPLETE`` written (and fsynced). A folder
without the marker is never used and is deleted at the next successful save, and older
checkpoints are deleted only after a new one is complete. A checkpoint with a non-finite weight
is refused before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stablediff.errors import BadFileError, load_json
from stablediff.train.config import TrainConfig
from stablediff.weights.io import CheckpointError, atomic_write_text, read_state_dict, write_safetensors

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
REQUIRED = (
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "rng.safetensors",
    "state.json",
    "config.json",
)
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
# Test hook: seconds to sleep between the files of a checkpoint, so that a test can kill the
# process while one is being written. Read only when set; never set it outside tests.
SLOW_ENV = "STABLEDIFF_TEST_SLOW_CHECKPOINT"


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or weight; the message names the step."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ---------------------------------------------------------------------------------------------
# Flattening nested state (optimizer state dicts) into tensors + JSON.
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-ready tree, {key: tensor}): tensors are replaced by ``{"__tensor__": key}``, tuples by
    ``{"__tuple__": [...]}`` (JSON has no tuples, and AdamW's ``betas`` is one)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu()
            return {"__tensor__": key}
        if isinstance(value, dict):
            if not all(isinstance(k, (str, int)) for k in value):
                raise TypeError(f"cannot store state with keys {list(value)[:3]} at {key!r}")
            # JSON keys are strings: remember which were ints (optimizer param ids).
            return {"__dict__": [[k, walk(v, f"{key}.{k}" if key else str(k))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {key!r})")

    return walk(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            key = tree["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"optimizer state refers to tensor {key!r}, which is not stored")
            return tensors[key]
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if "__dict__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"]}
    return tree


# ---------------------------------------------------------------------------------------------
# Writing.
def _check_finite(step: int, groups: dict[str, dict[str, torch.Tensor]]) -> None:
    for group, tensors in groups.items():
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(
                    f"refusing to save the checkpoint of step {step}: {group} tensor {name!r} "
                    "has non-finite values (NaN or inf)"
                )


def _pause() -> None:
    delay = os.environ.get(SLOW_ENV)
    if delay:
        time.sleep(float(delay))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, marker first: a crash halfway leaves an incomplete folder, never
    a 'complete' one with missing files."""
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer: dict,
    rng: dict[str, torch.Tensor],
    state: dict,
    config: TrainConfig,
    keep_last: int,
) -> Path:
    """Write the checkpoint of `step` (see the module docstring), then prune; returns its folder."""
    opt_tree, opt_tensors = flatten_state(optimizer, "")
    model = {k: v.detach().cpu() for k, v in model.items()}
    ema = None if ema is None else {k: v.detach().cpu() for k, v in ema.items()}
    _check_finite(step, {"model": model, "ema": ema or {}, "optimizer": opt_tensors})
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing this step
    tmp.mkdir()
    try:
        # Each write is temp file + fsync + rename inside `tmp`.
        atomic_write_text(tmp / "config.json", config.to_json() + "\n")
        atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
        _pause()
        write_safetensors(rng, tmp / "rng.safetensors")
        atomic_write_text(tmp / "optimizer.json", json.dumps(opt_tree) + "\n")
        _pause()
        write_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        _pause()
        if ema is not None:
            write_safetensors(ema, tmp / "ema.safetensors")
            _pause()
        write_safetensors(model, tmp / "model.safetensors")
        _fsync_dir(tmp)
        if final.exists():  # the same step written before (a resumed run repeating it): replace it
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _pause()
        atomic_write_text(final / MARKER, f"step {step}\n")  # fsyncs the file and the folder
    except OSError as err:  # a full disk, a quota, a vanished folder: say where, and what is kept
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else "; no earlier checkpoint exists"
        why = f"could not write the checkpoint of step {step} to {final}: {err.strerror or err}{kept}"
        raise (OSError(err.errno, why) if err.errno else OSError(why)) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep_last)
    logger.info("saved checkpoint %s", final)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every step folder under RUN/checkpoints, by step."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            out.append((int(match.group(1)), path, (path / MARKER).is_file()))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step checkpoint folder that has its COMPLETE marker, or None."""
    complete = [path for _, path, done in list_checkpoints(run_dir) if done]
    return complete[-1] if complete else None


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the `keep_last` newest complete checkpoints; delete older ones, incomplete step folders
    and leftover temporary folders (written by processes that were killed)."""
    entries = list_checkpoints(run_dir)
    complete = [path for _, path, done in entries if done]
    for path in complete[:-keep_last]:
        _remove(path)
    for _, path, done in entries:
        if not done:
            logger.warning("deleting incomplete checkpoint %s (its writer was interrupted)", path)
            _remove(path)
    root = Path(run_dir) / CHECKPOINTS
    for path in root.glob(".tmp-step_*"):
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading.
@dataclass
class Checkpoint:
    path: Path
    config: TrainConfig
    state: dict
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_json(path.read_bytes(), f"checkpoint file {path}")
    except BadFileError as err:
        raise CheckpointError(str(err)) from None


def resolve_checkpoint(run_dir: Path, resume: str | os.PathLike[str]) -> Path:
    """The folder `resume` names: "latest" (the newest complete checkpoint of `run_dir`), a
    checkpoint folder, or a run folder (its latest). Raises CheckpointError."""
    if str(resume) == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"no complete checkpoint to resume from in {Path(run_dir) / CHECKPOINTS}")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    if not (path / MARKER).is_file() and (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint to resume from in {path / CHECKPOINTS}")
        return found
    return path


def check_config(path: Path, config: TrainConfig) -> TrainConfig:
    """The config saved in checkpoint `path`; raises if training `config` from it would not be
    the same run (a field outside TrainConfig.RESUMABLE_CHANGES differs)."""
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {MARKER} marker): it was being written when "
            "its run stopped; resume from an earlier one"
        )
    try:
        saved = TrainConfig.from_json(json.dumps(_read_json(path / "config.json")))
    except (TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path}: config.json is not a valid training config: {err}") from None
    differences = config.differences(saved)
    if differences:
        listed = "\n  ".join(differences)
        raise ValueError(
            f"checkpoint {path} belongs to a different training configuration "
            f"(checkpoint value != this run's):\n  {listed}"
        )
    return saved


def load_checkpoint(path: Path, config: TrainConfig) -> Checkpoint:
    """Read and validate checkpoint folder `path` for a run of `config`. Raises CheckpointError
    (missing or damaged file, no COMPLETE marker) or ValueError (a different configuration)."""
    path = Path(path)
    saved = check_config(path, config)
    for name in REQUIRED:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
    state = _read_json(path / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint file {path / 'state.json'} has no integer 'step'")
    optimizer = unflatten_state(_read_json(path / "optimizer.json"), read_state_dict(path / "optimizer.safetensors"))
    ema_path = path / "ema.safetensors"
    if config.ema_decay > 0 and not ema_path.is_file():
        raise CheckpointError(f"checkpoint {path} is damaged: ema.safetensors is missing")
    return Checkpoint(
        path=path,
        config=saved,
        state=state,
        model=read_state_dict(path / "model.safetensors"),
        ema=read_state_dict(ema_path) if ema_path.is_file() else None,
        optimizer=optimizer,
        rng=read_state_dict(path / "rng.safetensors"),
    )
