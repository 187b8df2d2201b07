"""A LoRA file -> a ``LoraNetwork`` for one model, strictly.

Strict (the default) means every key of the file is used: each one must belong to a module entry
(``formats.py``) that names a real module of the model (``names.py``) with tensors of fitting
shapes (``adapters.py``). Otherwise a ``LoraFileError`` lists the first ten unusable keys, each with
its reason, and how many there are; nothing is applied. ``strict=False`` applies what fits and keeps
the rest in ``network.skipped``. A file in which nothing fits is an error either way, and so is a
file that names another model family than the model's (``formats.file_family``: an SDXL LoRA on
SD 1.x/2.x, or the other way round), with one message.
"""

from __future__ import annotations

import os

from stablediff.lora.adapters import Misfit, build_adapter
from stablediff.lora.formats import LoraFileError, ParsedLora, read_lora
from stablediff.lora.hashes import lora_hash
from stablediff.lora.names import ModuleTable
from stablediff.lora.network import LoraNetwork

__all__ = ["load_lora_network", "network_from_parsed"]

_SHOWN = 10


def load_lora_network(
    path: str | os.PathLike, table: ModuleTable, name: str, multiplier: float = 1.0, strict: bool = True
) -> LoraNetwork:
    """Read ``path`` and build its network for ``table``'s model (not yet attached)."""
    where = os.fspath(path)
    network = network_from_parsed(read_lora(where), table, name, multiplier, strict, where)
    network.path, network.hash = where, lora_hash(where)
    return network


def network_from_parsed(
    parsed: ParsedLora, table: ModuleTable, name: str, multiplier: float, strict: bool, where: str
) -> LoraNetwork:
    _check_family(parsed, table, where)
    network = LoraNetwork(name, multiplier)
    problems, unusable = list(parsed.problems), parsed.unusable_keys
    for entry in parsed.entries:
        part, reason = table.part(entry.part)
        ours = None
        if part is not None:
            ours, reason = table.resolve(part, entry.name, entry.underscored)
        if ours is not None:
            module = table.modules[part][ours]
            try:
                network.add(part, ours, build_adapter(entry, module))
                continue
            except Misfit as err:
                in_width = _input_width(entry)
                reason = f"{err}{table.family_hint(part, ours, in_width) if in_width else ''}"
        problems.append((entry.label, reason))
        unusable += len(entry.keys)
    total = parsed.total_keys
    if not network.adapters:
        if not problems:
            raise LoraFileError(f"{where}: no LoRA tensors in the file ({total} keys)")
        raise LoraFileError(_message(f"{where}: nothing in this file fits the model", problems, unusable, total))
    if problems and strict:
        head = f"{where}: strict loading applies all of a LoRA or nothing (strict=False applies what fits)"
        raise LoraFileError(_message(head, problems, unusable, total))
    network.skipped = problems
    return network


_FAMILY_NAMES = {"sdxl": "SDXL", "sd": "SD 1.x/2.x"}


def _check_family(parsed: ParsedLora, table: ModuleTable, where: str) -> None:
    """One clear error (rather than a problem per key) for a LoRA of the other model family."""
    if parsed.family is None or parsed.family == table.family:
        return
    theirs, mine = _FAMILY_NAMES[parsed.family], _FAMILY_NAMES[table.family]
    raise LoraFileError(
        f"{where}: an {theirs} LoRA ({parsed.family_evidence}); this model is {mine}: "
        f"an {theirs} LoRA applies to {theirs} models only"
    )


def _input_width(entry) -> int | None:
    """The input width a plain LoRA's down projection expects (for the family hint)."""
    down = entry.tensors.get("down")
    return int(down.shape[1]) if down is not None and down.ndim >= 2 else None


def _message(head: str, problems: list, unusable: int, total: int) -> str:
    lines = [f"  {key}: {reason}" for key, reason in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        lines.append(f"  ... and {len(problems) - _SHOWN} more")
    return f"{head}; {unusable} of {total} keys do not fit:\n" + "\n".join(lines)
