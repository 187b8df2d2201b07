"""A new LoRA to train: which modules it adapts, and kohya's / PEFT's initialisation.

Targets are module names of a ``ModuleTable`` (our LDM names), chosen by what they belong to:

- U-Net ``"attention"``: ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every self- and
  cross-attention (the default of PEFT and of diffusers' LoRA training scripts);
- U-Net ``"transformer"``: every Linear and 1x1 convolution of the transformer blocks, i.e. the
  attention projections, the feed-forward (``ff.net.0.proj``, ``ff.net.2``), ``proj_in`` and
  ``proj_out`` (kohya's default);
- ``conv=True`` (LoCon, kohya's ``conv_dim``): also every module of the residual blocks and of the
  down- and up-samplers: 3x3 convolutions take the conv rank, the rest (1x1 skips, the time
  embedding's projection) the linear rank, as kohya does;
- ``text=True``: the text encoder's ``q/k/v/out_proj`` and ``fc1``/``fc2`` in every layer (SDXL
  base: in both text encoders, as kohya's ``sdxl_train_network``).

The input and output convolutions and the time embedding MLP are never adapted (nor by kohya).

Initialisation: ``down`` kaiming-uniform with a = sqrt(5) (torch's Linear default, which kohya and
PEFT use), ``up`` zeros: the network adds exactly nothing until it trains. Every draw comes from one
generator seeded by ``seed``, in target order, so every process builds the same network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from stablediff.lora.adapters import build_adapter
from stablediff.lora.formats import ModuleEntry
from stablediff.lora.names import ModuleTable
from stablediff.lora.network import LoraNetwork

__all__ = ["UNET_TARGETS", "lora_targets", "new_lora_network"]

UNET_TARGETS = {
    "attention": re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "transformer": re.compile(r"(\.transformer_blocks\.\d+\..+|\.proj_in|\.proj_out)$"),
}
# residual blocks (in_layers.2, out_layers.3, emb_layers.1, skip_connection) and the samplers (op, conv)
_CONV = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)$")
_TEXT = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def lora_targets(
    table: ModuleTable, unet: str = "attention", text: bool = False, conv: bool = False
) -> list[tuple[str, str]]:
    """(part, module name) of every module a new LoRA adapts, in the table's (model) order."""
    if unet not in UNET_TARGETS:
        raise ValueError(f"LoRA targets {unet!r} is not one of {tuple(UNET_TARGETS)}")
    chosen = [("unet", n) for n in table.modules["unet"] if UNET_TARGETS[unet].search(n) or (conv and _CONV.search(n))]
    if text:
        chosen += [(part, n) for part in ("text", "text_2") for n in table.modules.get(part, ()) if _TEXT.search(n)]
    return chosen


def new_lora_network(
    table: ModuleTable,
    name: str,
    targets: Iterable[tuple[str, str]],
    rank: int,
    alpha: float,
    conv_rank: int = 0,
    conv_alpha: float | None = None,
    seed: int = 0,
) -> LoraNetwork:
    """A LoRA adding nothing yet to each target module of ``table``'s model (not attached).

    Linear and 1x1 modules get ``rank`` and ``alpha``, larger convolutions ``conv_rank`` and
    ``conv_alpha`` (default: ``alpha``); the scale of each is alpha / rank. Shapes and ranks are
    checked by the same code that checks LoRA files (``adapters.build_adapter``)."""
    generator = torch.Generator().manual_seed(seed)
    network = LoraNetwork(name)
    for part, module_name in targets:
        module = table.modules[part][module_name]
        spatial = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        r, a = (conv_rank, alpha if conv_alpha is None else conv_alpha) if spatial else (rank, alpha)
        if spatial and r < 1:
            raise ValueError(
                f"{part} module {module_name} is a {tuple(module.kernel_size)} convolution: give a conv rank"
            )
        # kohya's shapes: Linear [r, in] / [out, r]; Conv2d [r, in, kh, kw] / [out, r, 1, 1]
        conv = isinstance(module, nn.Conv2d)
        down = torch.empty(r, module.weight.shape[1], *(module.kernel_size if conv else ()))
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        up = torch.zeros(module.weight.shape[0], r, *((1, 1) if conv else ()))
        entry = ModuleEntry(part, module_name, False, module_name, "lora", {"down": down, "up": up}, alpha=float(a))
        network.add(part, module_name, build_adapter(entry, module))
    if not network.adapters:
        raise ValueError("the LoRA adapts no module: the model has none of the chosen targets")
    return network
