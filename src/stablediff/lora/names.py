"""Which module of the model a LoRA file means, decided against the model's real module names.

kohya's names replace every dot of a module path with an underscore, and module names contain
underscores themselves (``to_q``, ``proj_in``, ``transformer_blocks``), so a name cannot be split
back by rule. Instead every adaptable module (each ``nn.Linear`` and ``nn.Conv2d``) is listed under
every spelling a file may use, and a file's name is looked up:

- U-Net: our (LDM) name and diffusers' name, each dotted and underscored
  (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``, ``down_blocks_0_attentions_0_...``);
- text encoder: our (transformers) name, with and without ``text_model.``, dotted and underscored.

SDXL has two text encoders (parts ``text`` and ``text_2``); its U-Net modules are named in files as
the original (SGM) checkpoint names them, which are our names (kohya's ``sdxl_train_network``
writes ``lora_unet_input_blocks_4_1_...``), or as diffusers names them. The refiner's only text
encoder (our ``text``) is bigG, which files call ``text_encoder_2`` / ``lora_te2_``.

A spelling that two modules share would be ambiguous; it is left out of the table and reported.
"""

from __future__ import annotations

from torch import nn

from stablediff.weights import convert

__all__ = ["ModuleTable", "PARTS"]

PARTS = ("unet", "text", "text_2")
_TEXT_PREFIX = convert.TEXT_PREFIX  # "text_model."
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}
# kohya's prefix of each text part: SD 1.x/2.x have one text encoder, SDXL two.
_KOHYA_TEXT = {("sd", "text"): "lora_te_", ("sdxl", "text"): "lora_te1_", ("sdxl", "text_2"): "lora_te2_"}


def _underscored(name: str) -> str:
    return name.replace(".", "_")


class ModuleTable:
    """The adaptable modules of one U-Net and its text encoder(s), under every spelling a file may use."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None):
        nets = {"unet": unet, "text": text_encoder, "text_2": text_encoder_2}
        self.modules: dict[str, dict[str, nn.Module]] = {
            part: {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
            for part, net in nets.items()
            if net is not None
        }
        cfg = unet.config
        self.diffusers = convert.unet_module_names_to_diffusers(
            self.modules["unet"], cfg.channel_mult, cfg.num_res_blocks, cfg.attention_levels
        )
        self.context_width = cfg.context_dim
        self.text_widths = {part: net.config.width for part, net in nets.items() if part != "unet" and net is not None}
        self.sdxl = cfg.adm_in_channels is not None  # an SDXL U-Net takes the added conditioning `y`
        self.family = "sdxl" if self.sdxl else "sd"
        self.refiner = self.sdxl and text_encoder_2 is None  # its one text encoder is bigG
        # SD 2.x conditions on OpenCLIP's text tower (gelu), SD 1.x on OpenAI's (quick_gelu).
        self.sd2 = not self.sdxl and (text_encoder.config.activation == "gelu" or cfg.context_dim == 1024)
        self._lookup: dict[tuple[str, bool], dict[str, str | None]] = {}
        for part, names in self.modules.items():
            for ours in names:
                aliases = (ours, self.diffusers[ours]) if part == "unet" else (ours, _TEXT_PREFIX + ours)
                for alias in aliases:
                    self._add(part, False, alias, ours)
                    self._add(part, True, _underscored(alias), ours)

    def part(self, file_part: str) -> tuple[str | None, str | None]:
        """(our part, None) for a part as a file names it ("unet", "text", "text_2"), or (None, why
        this model has none)."""
        if self.refiner and file_part != "unet":  # the refiner's bigG is SDXL base's second encoder
            if file_part == "text_2":
                return "text", None
            return None, "the SDXL refiner has no first text encoder (its one text encoder is SDXL's second, bigG)"
        if file_part not in self.modules:
            return None, "this model has one text encoder; a second text encoder's keys are for SDXL"
        return file_part, None

    def _add(self, part: str, underscored: bool, alias: str, ours: str) -> None:
        table = self._lookup.setdefault((part, underscored), {})
        if table.get(alias, ours) != ours:
            table[alias] = None  # two modules share this spelling
        else:
            table[alias] = ours

    @property
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version`` for this model: "sd_v1", "sd_v2", "sdxl_base_v1-0" (the
        value kohya's SDXL trainer writes) or "sdxl_refiner_v1-0"."""
        if self.sdxl:
            return "sdxl_refiner_v1-0" if self.refiner else "sdxl_base_v1-0"
        return "sd_v2" if self.sd2 else "sd_v1"

    def resolve(self, part: str, name: str, underscored: bool) -> tuple[str | None, str | None]:
        """(our module name, None) or (None, the reason there is none); ``part`` is ours."""
        ours = self._lookup[(part, underscored)].get(name, "")
        if ours is None:
            return None, f"the name {name!r} fits several modules of the {_where(part)}"
        if not ours:
            return None, f"no module {name!r} in this model's {_where(part)}{self._unknown_hint(part, name)}"
        return ours, None

    def _unknown_hint(self, part: str, name: str) -> str:
        if part == "unet" and not self.sdxl and ("label_emb" in name or "add_embedding" in name):
            return " (an SDXL LoRA?)"
        return ""

    def kohya_name(self, part: str, ours: str) -> str:
        """The name kohya's trainer gives this module: diffusers' spelling for SD 1.x/2.x, the
        original (SGM, our) spelling for SDXL (``sdxl_train_network``); ``lora_te1_`` / ``lora_te2_``
        for SDXL's text encoders (the refiner's bigG is ``lora_te2_``)."""
        if part == "unet":
            return "lora_unet_" + _underscored(ours if self.sdxl else self.diffusers[ours])
        text_part = "text_2" if self.refiner else part
        return _KOHYA_TEXT[(self.family, text_part)] + _underscored(_TEXT_PREFIX + ours)

    def family_hint(self, part: str, ours: str, in_width: int) -> str:
        """Why a cross-attention or text-encoder input width may differ: the LoRA's model family."""
        cross = part == "unet" and ours.endswith(("attn2.to_k", "attn2.to_v"))
        if part == "unet" and not cross:
            return ""
        mine = self.context_width if cross else self.text_widths[part]
        theirs = _FAMILIES.get(in_width)
        if in_width == mine or theirs is None:
            return ""
        return (
            f"; the LoRA was made for a model with {in_width}-wide text features ({theirs}), "
            f"this model's are {mine} wide ({_FAMILIES.get(mine, 'another model')})"
        )


def _where(part: str) -> str:
    return {"unet": "U-Net", "text": "text encoder", "text_2": "second text encoder"}[part]
