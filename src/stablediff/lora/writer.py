"""LoRA files out, in kohya's format (what AUTOMATIC1111, ComfyUI and diffusers all read).

Keys are kohya's: ``lora_unet_<diffusers module path with _>`` (the spelling kohya's trainer uses
for SD 1.x/2.x, and the one diffusers' converter understands) and ``lora_te_text_model_<...>``;
for SDXL, as kohya's ``sdxl_train_network`` writes them, ``lora_unet_<original (SGM) module path>``
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), ``lora_te1_`` and ``lora_te2_``;
each with ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` (LoHa and LoKr adapters keep their
LyCORIS tensor names). The metadata is kohya's minimum: ``ss_network_module``, ``ss_network_dim``,
``ss_network_alpha``, ``ss_base_model_version``, ``ss_v2`` (how A1111 tells SD 2.x LoRAs apart)
and ``sshs_model_hash`` (the hash A1111 shows). The file is written atomically.
"""

from __future__ import annotations

import os
from collections import Counter

import safetensors.torch
import torch

from stablediff.lora.hashes import data_hash
from stablediff.lora.names import ModuleTable
from stablediff.lora.network import LoraNetwork
from stablediff.weights.io import atomic_write_bytes

__all__ = ["kohya_state_dict", "save_lora_kohya"]


def kohya_state_dict(network: LoraNetwork, table: ModuleTable, dtype: torch.dtype | None = None) -> dict:
    """The network's tensors under kohya's names, on the CPU, in ``dtype`` (default: as they are)."""
    out = {}
    for (part, module), adapter in network.items():
        stem = table.kohya_name(part, module)
        for suffix, tensor in adapter.file_tensors().items():
            out[f"{stem}.{suffix}"] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        alpha = adapter.alpha if adapter.alpha is not None else adapter.rank
        if alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def save_lora_kohya(
    network: LoraNetwork,
    path: str | os.PathLike,
    table: ModuleTable,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``network`` as a kohya-format safetensors file for ``table``'s model."""
    tensors = kohya_state_dict(network, table, dtype)
    adapters = [adapter for _, adapter in network.items()]
    ranks = Counter(a.rank for a in adapters if a.rank is not None)
    alphas = Counter(a.alpha if a.alpha is not None else a.rank for a in adapters)
    meta = {
        "ss_network_module": "networks.lora" if all(a.kind == "lora" for a in adapters) else "lycoris.kohya",
        "ss_network_dim": str(ranks.most_common(1)[0][0] if ranks else 1),
        "ss_network_alpha": str(float(alphas.most_common(1)[0][0] or 1)),
        "ss_base_model_version": table.base_model_version,
        "ss_v2": str(table.base_model_version == "sd_v2"),
        **(metadata or {}),
    }
    # The data section does not depend on the header, so its hash can go into the header.
    meta["sshs_model_hash"] = data_hash(safetensors.torch.save(tensors, metadata=meta))
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))
