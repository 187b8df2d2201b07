"""CLIP text transformer (Radford et al. 2021): the text tower that conditions Stable Diffusion.

SD 1.x uses OpenAI's ViT-L/14 text tower (quick_gelu, last layer); SD 2.x uses OpenCLIP's
ViT-H/14 text tower (gelu, penultimate layer); SDXL uses both ViT-L/14 and OpenCLIP's ViT-bigG/14
(with its `text_projection`, for the pooled embedding), each read at the penultimate layer without
the final layer norm. All are this one class; module names follow transformers' `CLIPTextModel`
(without its `text_model.` prefix) and `CLIPTextModelWithProjection` (`text_projection`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.limits import config_from_dict
from stablediff.nn import attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults are OpenAI CLIP ViT-L/14's text tower (SD 1.x)."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    max_positions: int = 77
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # How many final layers the context skips by default: 0 = last layer (SD 1.x),
    # 1 = penultimate (SD 2.x, SDXL).
    skip_layers: int = 0
    # Whether the context passes through the final layer norm: SD 1.x/2.x yes; SDXL no (diffusers
    # reads transformers' raw `hidden_states[-2]`). The pooled output is always normed.
    context_norm: bool = True
    # Width of `text_projection` (a bias-free linear map of the pooled output: OpenCLIP bigG's in
    # SDXL, 1280); None: no projection, the pooled output is the normed EOS state itself.
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(ACTIVATIONS)}")
        if not 0 <= self.skip_layers < self.layers:
            raise ValueError(f"skip_layers {self.skip_layers} must be in [0, {self.layers - 1}]")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "CLIPTextConfig") -> CLIPTextConfig:
        """From JSON data, checked (types, LIMITS); BadFileError naming ``where`` otherwise."""
        return config_from_dict(cls, d, where)


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token plus position embeddings; ``token_embeds`` [B, L, width], when given, stands in for
        ``token_embedding(ids)`` (textual-inversion vectors placed among the token rows)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        if token_embeds is None:
            token_embeds = self.token_embedding(ids)
        elif token_embeds.shape != (*ids.shape, self.token_embedding.embedding_dim):
            raise ValueError(
                f"token_embeds has shape {list(token_embeds.shape)}, expected "
                f"{[*ids.shape, self.token_embedding.embedding_dim]} for ids of shape {list(ids.shape)}"
            )
        return token_embeds + self.position_embedding(positions)[None]


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Causal: a token sees only the tokens before it (CLIP's text tower is autoregressive-masked).
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    """`text_encoder(ids) -> context`; `text_encoder.encode_pooled(ids) -> (context, pooled)`.

    ids: [B, L] int64 token ids, L <= max_positions. The context is [B, L, width]: the hidden state
    `skip_layers` layers before the last (config default when None), through the final layer norm
    when `config.context_norm`. `token_embeds` [B, L, width] replaces the token-embedding lookup of
    `ids` (see `Embeddings`).
    """

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(
        self, ids: torch.Tensor, skip_layers: int | None = None, token_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._run(ids, skip_layers, token_embeds, pooled=False)[0]

    def encode_pooled(
        self, ids: torch.Tensor, skip_layers: int | None = None, token_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled): the context as `forward` gives it, and the pooled embedding [B, D]
        (D = projection_dim, else width): the last layer's final-normed state at the EOS position,
        through `text_projection` when there is one. All layers run whatever `skip_layers` says.

        The EOS position is the argmax of each row's ids, as OpenCLIP and transformers (for configs
        with the legacy `eos_token_id` 2, SDXL's among them) take it: EOS has the largest id of the
        CLIP vocabulary and comes before any padding, and our textual-inversion placeholders are 0.
        """
        context, last = self._run(ids, skip_layers, token_embeds, pooled=True)
        pooled = last[torch.arange(last.shape[0], device=last.device), ids.argmax(dim=-1)]
        if self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return context, pooled

    def _run(
        self, ids: torch.Tensor, skip_layers: int | None, token_embeds: torch.Tensor | None, pooled: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, the last layer's final-normed states or None when not ``pooled``)."""
        cfg = self.config
        skip = cfg.skip_layers if skip_layers is None else skip_layers
        if not 0 <= skip < cfg.layers:
            raise ValueError(f"skip_layers {skip} must be in [0, {cfg.layers - 1}]")
        if ids.shape[1] > cfg.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens exceed the {cfg.max_positions} positions")
        keep = cfg.layers - skip
        x = self.embeddings(ids, token_embeds)
        for layer in self.encoder.layers[:keep]:
            x = layer(x)
        context = self.final_layer_norm(x) if cfg.context_norm else x
        if not pooled:
            return context, None
        for layer in self.encoder.layers[keep:]:  # the pooled output always reads the last layer
            x = layer(x)
        last = context if skip == 0 and cfg.context_norm else self.final_layer_norm(x)
        return context, last
