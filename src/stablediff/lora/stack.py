"""The LoRAs applied to one model, by name: what ``StableDiffusion.load_lora`` and friends use.

Several LoRAs apply at once, each with its own scale; each adds its own hook output, so their
effects sum. ``fuse`` merges every loaded LoRA into the weights (faster sampling: no hooks run),
keeping a copy of each weight it changes; ``unfuse`` copies those back, bit-exact. A change while
fused (load, unload, a new scale) unfuses, makes the change and fuses again. Fusing computes
``weight + sum(scale * delta)`` in float32 and rounds once to the weight's dtype.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from stablediff.lora.load import load_lora_network
from stablediff.lora.names import ModuleTable
from stablediff.lora.network import LoraNetwork, check_multiplier

__all__ = ["LoraInfo", "LoraStack"]


class LoraInfo(NamedTuple):
    path: str | None
    scale: float
    hash: str | None  # A1111's short hash (lora_hash)


class LoraStack:
    """The named LoRAs of one U-Net and its text encoder(s) (SDXL base: two)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None):
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2
        self.networks: dict[str, LoraNetwork] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}  # weights as they were before fusing
        self._table: ModuleTable | None = None

    @property
    def table(self) -> ModuleTable:
        if self._table is None:
            self._table = ModuleTable(self.unet, self.text_encoder, self.text_encoder_2)
        return self._table

    @property
    def fused(self) -> bool:
        return bool(self._originals)

    def info(self) -> dict[str, LoraInfo]:
        return {name: LoraInfo(n.path, n.multiplier, n.hash) for name, n in self.networks.items()}

    def load(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None, strict: bool = True) -> str:
        """Read a LoRA file and apply it; returns its name (default: the file's stem)."""
        name = Path(path).stem if name is None else name
        self._free_name(name)
        return self.add(load_lora_network(path, self.table, name, check_multiplier(scale), strict))

    def add(self, network: LoraNetwork) -> str:
        """Apply a network built elsewhere (e.g. by training) under its own name."""
        self._free_name(network.name)
        with self._refused():
            network.attach(self.table)
            self.networks[network.name] = network
        return network.name

    def set_scale(self, name: str, scale: float, text_scale: float | None = None) -> None:
        """The LoRA's weight; ``text_scale``: another one for its text-encoder adapters (None: the same)."""
        network = self.get(name)
        with self._refused():
            network.multiplier = check_multiplier(scale)
            network.text_multiplier = None if text_scale is None else check_multiplier(text_scale)

    def unload(self, name: str | None = None) -> None:
        """Remove one LoRA (or all, for None); the model computes exactly as before it was loaded."""
        names = list(self.networks) if name is None else [self.get(name).name]
        with self._refused():
            for n in names:
                self.networks.pop(n).detach()

    def fuse(self) -> None:
        """Merge every loaded LoRA into the weights it adapts."""
        deltas: dict[tuple[str, str], torch.Tensor] = {}
        for network in self.networks.values():
            for target, adapter in network.items():
                weight = self.table.modules[target[0]][target[1]].weight
                delta = adapter.delta_weight(torch.float32).to(weight.device) * network.multiplier_for(target[0])
                deltas[target] = deltas[target] + delta if target in deltas else delta
        with torch.no_grad():
            for target, delta in deltas.items():
                weight = self.table.modules[target[0]][target[1]].weight
                original = self._originals.setdefault(target, weight.detach().clone())
                weight.copy_((original.float() + delta).to(weight.dtype))
        for network in self.networks.values():
            network.fused = True

    def unfuse(self) -> None:
        """Put back every weight ``fuse`` changed, bit-exact; the hooks apply the LoRAs again."""
        with torch.no_grad():
            for (part, module), original in self._originals.items():
                self.table.modules[part][module].weight.copy_(original)
        self._originals.clear()
        for network in self.networks.values():
            network.fused = False

    def get(self, name: str) -> LoraNetwork:
        """The loaded network ``name`` (KeyError naming the loaded ones otherwise)."""
        if name not in self.networks:
            loaded = ", ".join(map(repr, self.networks)) or "none"
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return self.networks[name]

    def _free_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA name must be a non-empty string, got {name!r}")
        if name in self.networks:
            raise ValueError(f"a LoRA named {name!r} is already loaded: unload it first, or pass another name")

    def _refused(self):
        return _Refuse(self)


class _Refuse:
    """Unfuse before a change and fuse again after it, when the stack was fused."""

    def __init__(self, stack: LoraStack):
        self.stack, self.was = stack, stack.fused

    def __enter__(self) -> None:
        if self.was:
            self.stack.unfuse()

    def __exit__(self, *exc) -> None:
        if self.was and self.stack.networks:
            self.stack.fuse()
