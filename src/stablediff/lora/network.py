"""One LoRA as a torch module, applied to the model through forward hooks.

A ``LoraNetwork`` holds its adapters (trainable parameters, so a training stage can train these
very objects and save them with ``save_lora_kohya``), the module each one adapts, and its
multiplier. ``attach`` registers a forward hook on each adapted module that returns
``output + multiplier * adapter(input)``; the module's own weight is never touched, so ``detach``
gives back bit-identical outputs. A multiplier of 0 skips the adapters entirely.

Devices and dtypes: adapters are created on their module's device in its dtype. If the model
moves to another device later, an adapter follows its input the first time it runs there; the
computation is in the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stablediff.lora.adapters import Adapter
from stablediff.lora.names import PARTS, ModuleTable

__all__ = ["LoraNetwork"]


def _key(part: str, module: str) -> str:
    # nn.ModuleDict keys may not contain dots.
    return f"{part}:{module.replace('.', '/')}"


def _target(key: str) -> tuple[str, str]:
    part, _, module = key.partition(":")
    return part, module.replace("/", ".")


class LoraNetwork(nn.Module):
    """A named set of adapters, one per adapted module, with one multiplier (the LoRA's weight)."""

    def __init__(self, name: str, multiplier: float = 1.0):
        super().__init__()
        self.name = name
        self.multiplier = check_multiplier(multiplier)
        # A1111's `<lora:name:te:unet>` gives the text encoder its own weight; None: `multiplier`
        self.text_multiplier: float | None = None
        self.adapters = nn.ModuleDict()
        self.fused = False  # while True the hooks add nothing: the deltas are in the weights
        self.path: str | None = None
        self.hash: str | None = None
        self.skipped: list[tuple[str, str]] = []  # (key, reason) left out by a non-strict load
        self._handles: list = []

    def add(self, part: str, module: str, adapter: Adapter) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.adapters[_key(part, module)] = adapter

    def items(self):
        """((part, our module name), adapter) for each adapter."""
        return [(_target(key), adapter) for key, adapter in self.adapters.items()]

    def multiplier_for(self, part: str) -> float:
        """The weight of the adapters on ``part`` ("unet", "text" or SDXL's "text_2": both text
        encoders take ``text_multiplier``)."""
        return self.text_multiplier if part != "unet" and self.text_multiplier is not None else self.multiplier

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, table: ModuleTable) -> None:
        """Hook every adapter onto its module of ``table``'s model."""
        if self._handles:
            raise RuntimeError(f"LoRA {self.name!r} is already attached")
        for (part, module), adapter in self.items():
            self._handles.append(table.modules[part][module].register_forward_hook(_Hook(self, adapter, part)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Hook:
    """The forward hook of one adapted module: ``output + multiplier * adapter(input)``."""

    def __init__(self, network: LoraNetwork, adapter: Adapter, part: str):
        self.network, self.adapter, self.part = network, adapter, part

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        net = self.network
        multiplier = net.multiplier_for(self.part)
        if net.fused or multiplier == 0:
            return None  # the output as it is
        x = args[0]
        if next(self.adapter.parameters()).device != x.device:
            self.adapter.to(x.device)  # the model moved; the adapter follows, once
        return output + multiplier * self.adapter(x)


def check_multiplier(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"a LoRA scale must be a finite number, got {value!r}")
    return float(value)
