"""The lora stage: a LoRA (kohya's LoRA, or LoCon with ``lora_conv_rank``) for the frozen model
``--base``.

Everything of the base stays frozen (`AddonStage`); what trains is a `HookedLora`, which holds the
new `LoraNetwork` and nothing else, so checkpoints, the optimizer, the EMA and DDP see only the
adapters. Its forward takes the frozen networks as arguments and runs them with its adapters hooked
on (`LoraSlot`), so the loss, held-out evaluation and sample grids are the U-Net stage's own code.
The network starts adding exactly nothing (``up`` = 0, `lora.build`), seeded from ``config.seed``.
Text-encoder layers the model never reads (those a text encoder's ``skip_layers`` leaves out, when
its pooled output is not used either: SD 2.x's, SDXL's CLIP-L last layer) are not adapted: a LoRA
there could neither learn nor change an image.

SDXL base: the U-Net is conditioned as `train.sdxl` says; ``lora_text_encoder`` adapts both text
encoders, and the file has kohya's SDXL names (``lora_unet_input_blocks_...``, ``lora_te1_``,
``lora_te2_``, ``ss_base_model_version`` = ``sdxl_base_v1-0``).

Export: ``lora.safetensors`` in kohya's format (`save_lora_kohya`: what A1111, ComfyUI, diffusers'
``load_lora_weights`` and ``pipe.load_lora`` read), float32, with kohya's ``ss_*`` metadata, the
base model's name and the training config (paths reduced to their last part).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablediff.lora import LoraNetwork, ModuleTable, lora_targets, new_lora_network, save_lora_kohya
from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetModel
from stablediff.seeds import derive_seed
from stablediff.train.distributed import unwrap
from stablediff.train.exports import TRAIN_CONFIG_KEY
from stablediff.train.stages.unet import AddonStage

logger = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"


class LoraSlot:
    """The one LoRA hooked onto the frozen networks at a time.

    The training copy stays hooked on after its forward, because backward (and, with activation
    checkpointing, the forward recomputed in it) must see the same network; evaluation, sample
    grids and export put the EMA copy in its place, and the next training step takes it back."""

    def __init__(self, table: ModuleTable):
        self.table = table
        self.network: LoraNetwork | None = None

    def use(self, network: LoraNetwork) -> None:
        if self.network is network:
            return
        if self.network is not None:
            self.network.detach()
            self.network = None
        network.attach(self.table)
        self.network = network


class HookedLora(nn.Module):
    """The lora stage's trainable module: one LoraNetwork, and a forward through the frozen networks
    (passed in, never held: they must not be trained, averaged or checkpointed) with it hooked on."""

    def __init__(self, network: LoraNetwork):
        super().__init__()
        self.network = network

    def forward(
        self,
        slot: LoraSlot,
        unet: UNetModel,
        text_encoder: Any,
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: Any,
    ) -> torch.Tensor:
        """``unet(x_t, t, context)`` with this LoRA; ``condition`` is the context, or the token ids
        when the LoRA adapts the text encoder too. SDXL: ``text_encoder`` is the `SDXLText`
        conditioner and ``condition`` a dict, the U-Net's keyword arguments or its inputs."""
        slot.use(self.network)
        if isinstance(condition, dict):
            return unet(x_t, t, **(text_encoder(condition) if "ids" in condition else condition))
        context = condition if condition.is_floating_point() else text_encoder(condition)
        return unet(x_t, t, context)


class LoraStage(AddonStage):
    name = "lora"

    def make_addon(self, unet: UNetModel) -> HookedLora:
        c = self.config
        self.table = ModuleTable(unet, self.text_encoder, self.text_encoder_2)
        self.slot = LoraSlot(self.table)
        targets = lora_targets(self.table, c.lora_targets, text=c.lora_text_encoder, conv=c.lora_conv_rank > 0)
        targets = [(part, name) for part, name in targets if self._read_by_model(part, name)]
        network = new_lora_network(
            self.table,
            Path(c.out).name or "lora",
            targets,
            rank=c.lora_rank,
            alpha=c.lora_alpha or c.lora_rank,  # 0: the rank
            conv_rank=c.lora_conv_rank,
            conv_alpha=c.lora_conv_alpha or c.lora_conv_rank,
            seed=derive_seed(c.seed, "lora"),
        )
        count = sum(p.numel() for p in network.parameters())
        logger.info("LoRA: %d modules, %d parameters", len(network.adapters), count)
        return HookedLora(network)

    def _read_by_model(self, part: str, name: str) -> bool:
        """False for a text-encoder module in a layer whose output the model never reads."""
        if part == "unet" or not name.startswith("encoder.layers."):
            return True
        encoder: CLIPTextModel = self.text_encoder if part == "text" else self.text_encoder_2
        pooled = encoder is self.text_encoder_2  # SDXL's bigG: its pooled output reads the last layer
        cfg = encoder.config
        return pooled or int(name.split(".")[2]) < cfg.layers - cfg.skip_layers

    def _condition(self, batch: dict) -> Any:
        if self.sdxl is not None:  # the token ids (and time ids) when the text encoders are adapted
            inputs = self._sdxl_inputs(batch)
            return inputs if self.config.lora_text_encoder else self.sdxl(inputs)
        ids = batch["ids"].to(self.device, non_blocking=True)
        return ids if self.config.lora_text_encoder else self.text_encoder(ids)

    def _predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        text = self.text_encoder if self.sdxl is None else self.sdxl
        return model(self.slot, self.unet, text, x_t, t, condition)

    def pipeline(self, model: nn.Module):
        """The base model with `model`'s LoRA hooked on (until the next training step)."""
        self.slot.use(unwrap(model).network)
        return self.base_pipeline()

    def export(self, model: nn.Module, out_dir: Path) -> Path:
        """`out_dir/lora.safetensors`, kohya's format; returns it."""
        c = self.config
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metadata = {
            "ss_output_name": Path(c.out).name,
            "ss_sd_model_name": Path(c.base).name,  # a name, never a path of this machine
            "ss_resolution": f"({c.resolution}, {c.resolution})",
            "ss_max_train_steps": str(c.steps),
            "ss_learning_rate": str(c.lr),
            "ss_seed": str(c.seed),
            "ss_text_encoder_lr": str(c.lr if c.lora_text_encoder else 0.0),
            TRAIN_CONFIG_KEY: self.shared_config(),
        }
        if c.lora_conv_rank:
            conv_alpha = c.lora_conv_alpha or c.lora_conv_rank
            metadata["ss_network_args"] = json.dumps({"conv_dim": str(c.lora_conv_rank), "conv_alpha": str(conv_alpha)})
        path = out_dir / LORA_FILE
        save_lora_kohya(unwrap(model).network, path, self.table, torch.float32, metadata)
        logger.info("LoRA exported to %s", path)
        return path


__all__ = ["LORA_FILE", "HookedLora", "LoraSlot", "LoraStage"]
