"""LoRA files in: each format's key grammar, read into one list of per-module entries.

Formats are told apart by key names, never by the file name:

- **kohya / AUTOMATIC1111** (and LyCORIS, which writes the same names): ``lora_unet_<module>.<tensor>``
  and ``lora_te_<module>.<tensor>``, the module path with its dots turned into underscores. Tensors:
  ``lora_down.weight``, ``lora_up.weight``, ``lora_mid.weight`` (LoCon's CP middle), ``alpha``;
  LoHa's ``hada_w1_a`` ... ``hada_t2``; LoKr's ``lokr_w1`` ... ``lokr_t2``. SDXL files (kohya's
  ``sdxl_train_network``) have ``lora_te1_`` / ``lora_te2_`` for the two text encoders and name
  U-Net modules as the original (SGM) checkpoint does (``lora_unet_input_blocks_4_1_...``).
- **diffusers / PEFT**: ``unet.<diffusers module>.lora_A.weight`` / ``lora_B.weight``,
  ``text_encoder.<transformers module>...`` and, for SDXL, ``text_encoder_2.``. Alphas come from the
  safetensors metadata ``lora_adapter_metadata`` (PEFT's ``LoraConfig``: ``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``); without it the scale is 1, as diffusers loads such a file.
- **diffusers before PEFT**: ``...attn1.processor.to_q_lora.down.weight``, ``...lora.down.weight``,
  ``...self_attn.to_q_lora.down.weight``, ``...mlp.fc1.lora_linear_layer.down.weight``.

The result names modules as the file spells them; ``names.py`` matches them to the model.
Nothing here computes with the tensors beyond checking that they are usable numbers. What the file
says of its model family (``file_family``: SDXL's text-encoder prefixes, SD 1.x's ``lora_te_``,
kohya's ``ss_base_model_version``) is checked against the model by ``load.py``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from stablediff.errors import BadFileError, load_json, printable
from stablediff.weights import convert
from stablediff.weights.io import read_metadata, read_state_dict

__all__ = ["LoraFileError", "ModuleEntry", "ParsedLora", "parse_lora", "read_lora"]


class LoraFileError(BadFileError):
    """A LoRA file does not fit the model: it names the keys and why (see ``load.py``)."""


# kohya tensor suffix -> (kind, role). "alpha" belongs to every kind.
_KOHYA_ROLES = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    **{f"hada_{r}": ("loha", r) for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{r}": ("lokr", r) for r in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "alpha": (None, "alpha"),
}
# diffusers tails (longest first, so `lora.down.weight` is not read as `down.weight`).
_DIFFUSERS_ROLES = {
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "alpha": "alpha",
}
# Keys we recognise but cannot apply, with the reason given.
_UNSUPPORTED = {
    "dora_scale": "DoRA (dora_scale) is not supported",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector) is not supported",
    "lora_B.bias": "a LoRA bias (lora_bias) is not supported",
    "lora_up.bias": "a LoRA bias is not supported",
    "bias": "a LoRA bias is not supported",
    "scale": "a stored per-module scale is not supported",
    "lokr_t1": "lokr_t1 is not part of LoKr as LyCORIS writes it",
}
_OTHER_NETWORKS = "LyCORIS full, IA3, OFT, GLoRA and norm networks are not supported (LoRA, LoCon, LoHa and LoKr are)"
# File prefix -> the part it adapts as the file means it: "text_2" is SDXL's second text encoder.
_PARTS = {"lora_unet_": "unet", "lora_te_": "text", "lora_te1_": "text", "lora_te2_": "text_2"}
_DIFFUSERS_PARTS = {"unet.": "unet", "text_encoder.": "text", "text_encoder_2.": "text_2"}
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_SD_PREFIXES = ("lora_te_",)  # kohya's one text encoder: SD 1.x / 2.x
# Old `unet.save_attn_procs` files carry no `unet.` prefix.
_BARE_UNET = ("down_blocks.", "mid_block.", "up_blocks.")
_NEEDS = {
    "lora": ({"down", "up"}, "lora_down and lora_up"),
    "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"}, "hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"),
}
_KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


@dataclass
class ModuleEntry:
    """One adapted module as the file spells it, with its tensors by role (``down``, ``w1_a``...)."""

    part: str  # "unet" | "text" | "text_2", as the file means it (names.py maps it to the model)
    name: str  # the module as the file names it, without the part prefix
    underscored: bool  # kohya spelling: the module path's dots became underscores
    label: str  # the module as written in the file (with its prefix), for messages
    kind: str | None = None  # "lora" | "loha" | "lokr"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    alpha: float | None = None
    rslora: bool = False  # PEFT's rank-stabilised scale alpha / sqrt(rank)


@dataclass
class ParsedLora:
    entries: list[ModuleEntry]
    problems: list[tuple[str, str]]  # (file key or module, reason)
    unusable_keys: int  # the keys behind those problems
    total_keys: int
    metadata: dict[str, str]
    family: str | None = None  # "sdxl" | "sd" (SD 1.x/2.x) when the file says, else None
    family_evidence: str = ""  # what says so, for messages


def read_lora(path: str | os.PathLike) -> ParsedLora:
    """Read ``path`` (safetensors; ``.pt``/``.ckpt`` through the restricted unpickler) and parse it."""
    tensors = read_state_dict(path)
    return parse_lora(tensors, read_metadata(path), os.fspath(path))


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> ParsedLora:
    """Group ``tensors`` by module; every key lands in an entry or in ``problems`` with a reason."""
    entries: dict[tuple[str, str], ModuleEntry] = {}
    problems: list[tuple[str, str]] = []
    for key, tensor in tensors.items():
        found = _split_key(key)
        if isinstance(found, str):
            problems.append((key, found))
            continue
        part, name, underscored, label, kind, role = found
        entry = entries.setdefault((part, label), ModuleEntry(part, name, underscored, label))
        if role != "alpha" and entry.kind not in (None, kind):
            problems.append((key, f"mixes {_KIND_NAMES[entry.kind]} and {_KIND_NAMES[kind]} tensors in one module"))
            continue
        entry.keys.append(key)
        entry.tensors[role] = tensor
        if role != "alpha":
            entry.kind = kind
    peft = _peft_configs(metadata, where)
    good, unusable = [], len(problems)
    for entry in entries.values():
        reason = _check_entry(entry, peft)
        if reason:
            problems.append((entry.label, reason))
            unusable += len(entry.keys)
        else:
            good.append(entry)
    return ParsedLora(good, problems, unusable, len(tensors), dict(metadata), *file_family(tensors, metadata))


def file_family(tensors: dict, metadata: dict[str, str]) -> tuple[str | None, str]:
    """("sdxl" | "sd" | None, the evidence): the model family a file names. Key prefixes decide
    first (SDXL's ``lora_te1_`` / ``lora_te2_`` / ``text_encoder_2.``, SD's ``lora_te_``), kohya's
    ``ss_base_model_version`` second; U-Net keys alone do not tell (both families use the names)."""
    for family, prefixes in (("sdxl", _SDXL_PREFIXES), ("sd", _SD_PREFIXES)):
        key = next((k for k in tensors if k.startswith(prefixes)), None)
        if key is not None:
            return family, f"keys such as {printable(key)[:100]!r}"
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl", f"ss_base_model_version = {printable(version)[:40]!r}"
    if version.startswith(("sd_v1", "sd_v2")):
        return "sd", f"ss_base_model_version = {printable(version)[:40]!r}"
    return None, ""


def _split_key(key: str):
    """(part, module name, underscored, label, kind, role), or the reason the key fits no format."""
    for prefix, part in _PARTS.items():
        if key.startswith(prefix):
            module, _, suffix = key[len(prefix) :].partition(".")
            if suffix in _KOHYA_ROLES:
                kind, role = _KOHYA_ROLES[suffix]
                return part, module, True, prefix + module, kind or "lora", role
            return _unsupported(suffix)
    for prefix, part in _DIFFUSERS_PARTS.items():
        if key.startswith(prefix):
            return _split_diffusers(key, key[len(prefix) :], part, prefix)
    if key.startswith(_BARE_UNET):
        return _split_diffusers(key, key, "unet", "")
    return (
        "not a LoRA key: known formats start with lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ (kohya, A1111) "
        "or unet. / text_encoder. / text_encoder_2. (diffusers)"
    )


def _split_diffusers(key: str, rest: str, part: str, prefix: str):
    for tail, role in _DIFFUSERS_ROLES.items():
        if rest.endswith("." + tail):
            module = rest[: -len(tail) - 1]
            return part, module, False, prefix + module, "lora", role
    for tail, role in ((".down.weight", "down"), (".up.weight", "up")):
        if rest.endswith(tail):  # before PEFT: `...processor.to_q_lora.down.weight`
            module = _legacy_module(rest[: -len(tail)], part)
            if module is not None:
                return part, module, False, prefix + rest[: -len(tail)], "lora", role
    suffix = next((s for s in _UNSUPPORTED if rest.endswith("." + s) or f".{s}." in rest), None)
    return _unsupported(suffix or rest.rpartition(".")[2])


def _legacy_module(name: str, part: str) -> str | None:
    table = convert.LORA_LEGACY_UNET_MODULES if part == "unet" else convert.LORA_LEGACY_TEXT_MODULES
    for old, new in table.items():
        if name.endswith("." + old):
            return name[: -len(old)] + new
    return None


def _unsupported(suffix: str) -> str:
    for known, reason in _UNSUPPORTED.items():
        if suffix == known or suffix.startswith(known + "."):
            return reason
    return f"unsupported tensor kind {suffix!r}: {_OTHER_NETWORKS}"


def _check_entry(entry: ModuleEntry, peft: dict[str, dict]) -> str | None:
    """The reason ``entry`` is unusable, or None; sets its alpha."""
    for role, t in entry.tensors.items():
        if not t.is_floating_point():
            return f"{_tensor_name(entry.kind, role)} has dtype {t.dtype}, not a floating-point type"
        if not torch.isfinite(t).all():
            return f"{_tensor_name(entry.kind, role)} holds NaN or inf"
    alpha = entry.tensors.pop("alpha", None)
    if entry.kind is None or not entry.tensors:
        return "an alpha without LoRA tensors"
    missing = _missing(entry)
    if missing:
        return missing
    if alpha is not None:
        if alpha.numel() != 1:
            return f"alpha has shape {list(alpha.shape)}; it must be a single number"
        entry.alpha = float(alpha.reshape(()))
    elif not entry.underscored and entry.part in peft:
        entry.alpha, entry.rslora = _peft_alpha(peft[entry.part], entry.name)
    return None


def _tensor_name(kind: str | None, role: str) -> str:
    """A role as the file names the tensor: lora_down, hada_w1_a, lokr_t2, alpha."""
    prefix = {"lora": "lora_", "loha": "hada_", "lokr": "lokr_"}.get(kind or "", "")
    return role if role == "alpha" else prefix + role


def _missing(entry: ModuleEntry) -> str | None:
    have = set(entry.tensors)
    if entry.kind in _NEEDS:
        need, names = _NEEDS[entry.kind]
        if not need <= have:
            found = ", ".join(_tensor_name(entry.kind, r) for r in sorted(have))
            return f"incomplete {_KIND_NAMES[entry.kind]}: needs {names}, has {found}"
        if entry.kind == "loha" and len(have & {"t1", "t2"}) == 1:
            return "incomplete LoHa: hada_t1 and hada_t2 come together"
        return None
    has_1 = "w1" in have or {"w1_a", "w1_b"} <= have
    has_2 = "w2" in have or {"w2_a", "w2_b"} <= have
    if not (has_1 and has_2):
        found = ", ".join(_tensor_name("lokr", r) for r in sorted(have))
        return f"incomplete LoKr: needs lokr_w1 (or lokr_w1_a and _b) and lokr_w2 (or lokr_w2_a and _b), has {found}"
    if "t2" in have and "w2" in have:
        return "LoKr: lokr_t2 goes with lokr_w2_a / lokr_w2_b, not with lokr_w2"
    return None


# ---------------------------------------------------------------------------------------------
# PEFT's LoraConfig in the metadata, as diffusers' save_lora_weights writes it.
_PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default lora_alpha, used by diffusers when the field is absent
_LITERAL = re.compile(r"\^?[\w.]+")


def _peft_configs(metadata: dict[str, str], where: str) -> dict[str, dict]:
    """{"unet" | "text": the part's LoraConfig fields}, from ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    data = load_json(raw, f"{where}: metadata lora_adapter_metadata")
    if not isinstance(data, dict):
        raise LoraFileError(f"{where}: metadata lora_adapter_metadata is not a JSON object")
    configs: dict[str, dict] = {}
    for prefix, part in _DIFFUSERS_PARTS.items():
        fields = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
        if not fields:
            continue
        if fields.get("use_dora"):
            raise LoraFileError(f"{where}: a DoRA adapter (use_dora in lora_adapter_metadata) is not supported")
        alpha = fields.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
        pattern = fields.get("alpha_pattern") or {}
        if not _is_number(alpha) or not isinstance(pattern, dict) or not all(map(_is_number, pattern.values())):
            raise LoraFileError(f"{where}: lora_adapter_metadata: {prefix}lora_alpha / alpha_pattern must be numbers")
        odd = [k for k in pattern if not _LITERAL.fullmatch(k)]
        if odd:  # a stranger's regular expression could take exponential time to match
            raise LoraFileError(
                f"{where}: lora_adapter_metadata: alpha_pattern key {odd[0]!r:.80} is a regular expression; "
                "only module names are supported"
            )
        configs[part] = {"alpha": float(alpha), "pattern": pattern, "rslora": fields.get("use_rslora") is True}
    return configs


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _peft_alpha(config: dict, module: str) -> tuple[float, bool]:
    """PEFT's rule: the first alpha_pattern key that names ``module`` or a suffix of it wins."""
    for key, alpha in config["pattern"].items():
        name = key.removeprefix("^")
        if module == name or (not key.startswith("^") and module.endswith("." + name)):
            return float(alpha), config["rslora"]
    return config["alpha"], config["rslora"]
