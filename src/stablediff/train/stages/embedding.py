"""The embedding stage: textual inversion (Gal et al. 2022) of a new word for the frozen model
``--base``.

What trains is `EmbeddingVectors`: ``num_vectors`` vectors as wide as the text encoder's token
embeddings, starting as ``init_word``'s token embeddings (cycled when it has fewer tokens). Each
training caption becomes ``embedding_template`` with ``{token}`` and ``{caption}`` filled in (just
the token when the caption is empty), and is tokenized as a prompt is at generation: the token's
positions hold placeholders (`prompts.tokenize_prompt` with an `EmbeddingTable`), whose token
embeddings the vectors replace (`embeddings.embed_tokens`, the encoder's ``token_embeds``). The
loss is the U-Net stage's, through the frozen text encoder and U-Net, so only the vectors learn.

Export: ``TOKEN.safetensors`` (the token's filename-safe characters) in A1111's format
(``emb_params``), which A1111, ``pipe.load_embedding`` and diffusers' ``load_textual_inversion``
read; A1111 calls an embedding by its file name, and the metadata keeps the token itself.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablediff.embeddings import Embedding, EmbeddingTable, check_token, embed_tokens, save_embedding
from stablediff.models.clip import CLIPTextModel
from stablediff.models.unet import UNetModel
from stablediff.prompts import tokenize_prompt
from stablediff.train.config import TrainConfig
from stablediff.train.data.stage_data import captions_of
from stablediff.train.distributed import unwrap
from stablediff.train.exports import TRAIN_CONFIG_KEY
from stablediff.train.stages.unet import AddonStage

logger = logging.getLogger(__name__)


class EmbeddingVectors(nn.Module):
    """The embedding stage's trainable module: the token's vectors [num_vectors, width]."""

    def __init__(self, token: str, vectors: torch.Tensor):
        super().__init__()
        self.token = token
        self.vectors = nn.Parameter(vectors)

    def forward(self, text_encoder: CLIPTextModel, ids: torch.Tensor, fixes: list[list[int]]) -> torch.Tensor:
        """The text encoder's context for token ids [B, L], with the vectors at each of row b's
        positions ``fixes[b]`` (as the pipeline places a loaded embedding)."""
        embedding = Embedding(self.token, self.vectors, "", "training")
        table = text_encoder.embeddings.token_embedding
        rows = [embed_tokens(table, ids[b : b + 1], [(p, embedding) for p in at]) for b, at in enumerate(fixes)]
        return text_encoder(ids, token_embeds=torch.cat(rows))


def _escaped(caption: str) -> str:
    """A caption as literal prompt text: brackets and backslashes are not emphasis syntax here."""
    return re.sub(r"[()\[\]\\]", lambda m: "\\" + m.group(0), caption)


class EmbeddingStage(AddonStage):
    name = "embedding"

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        # The token must stand in the first 75 tokens of every training text: fail now, not in the
        # middle of a run. Only a caption before it can push it out; else one text shows where it is.
        captions = captions_of(getattr(self._train, "dataset", self._train))
        if "{caption}" not in config.embedding_template.split("{token}")[0]:
            captions = captions[:1]
        for caption in dict.fromkeys(captions):
            self.encode(self.caption_text(caption))

    def make_addon(self, unet: UNetModel) -> EmbeddingVectors:
        c = self.config
        if self.sdxl is not None:
            raise ValueError(
                f"the embedding stage does not train SDXL embeddings yet (--base {Path(c.base).name!r} is SDXL); "
                "SDXL embeddings made elsewhere load with pipe.load_embedding"
            )
        check_token(c.token, self.tokenizer)  # ValueError: an ordinary word, brackets, spaces...
        ids = self.tokenizer.encode(c.init_word)
        if not ids:
            raise ValueError(f"--init-word {c.init_word!r} gives no tokens")
        weight = self.text_encoder.embeddings.token_embedding.weight
        start = weight[[ids[i % len(ids)] for i in range(c.num_vectors)]].detach().clone().float()
        # At tokenization only the count of vectors matters: these placeholders stand for them.
        self.names = EmbeddingTable()
        self.names.add(Embedding(c.token, torch.zeros_like(start).cpu(), "", "training"))
        return EmbeddingVectors(c.token, start)

    # -----------------------------------------------------------------------------------------
    def caption_text(self, caption: str) -> str:
        """The training text of a data caption: the template filled in, or the token alone for an
        empty caption."""
        c = self.config
        return c.embedding_template.format(token=c.token, caption=_escaped(caption)) if caption else c.token

    def encode(self, text: str) -> tuple[tuple[int, ...], list[int]]:
        """(token ids of the first 75-token chunk, the positions of the token's vectors in it)."""
        chunk = tokenize_prompt(self.tokenizer, text, embeddings=self.names)[0]
        if not chunk.fixes:
            raise ValueError(
                f"the training text {text!r} puts {self.config.token!r} beyond the first 75 tokens: "
                "put {token} earlier in --embedding_template"
            )
        return chunk.ids, [position for position, _ in chunk.fixes]

    def collate(self, items: list[tuple[Any, ...]]) -> dict[str, Any]:
        """Items -> {"x": [B, ...], "ids": [B, L], "fixes": the vectors' positions of each row}."""
        encoded = [self.encode(self.caption_text(item[1])) for item in items]
        return {
            "x": torch.stack([item[0] for item in items]),
            "ids": torch.tensor([ids for ids, _ in encoded], dtype=torch.long),
            "fixes": [at for _, at in encoded],
        }

    def _condition(self, batch: dict) -> Any:
        return batch["ids"].to(self.device, non_blocking=True), batch["fixes"]

    def _predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        return self.unet(x_t, t, model(self.text_encoder, *condition))

    # -----------------------------------------------------------------------------------------
    def grid_prompts(self) -> list[str]:
        return [self.caption_text(prompt) for prompt in super().grid_prompts()]

    def pipeline(self, model: nn.Module):
        """The base model with `model`'s vectors loaded as an embedding (through a file, as a user would)."""
        pipe = self.base_pipeline()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "embedding.safetensors"
            save_embedding(path, unwrap(model).vectors, self.config.token)
            pipe.load_embedding(path, self.config.token)
        return pipe

    def export(self, model: nn.Module, out_dir: Path) -> Path:
        """`out_dir/TOKEN.safetensors` (A1111's format); returns it."""
        c = self.config
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '', c.token).strip('.') or 'embedding'}.safetensors"
        metadata = {"sd_checkpoint_name": Path(c.base).name, TRAIN_CONFIG_KEY: self.shared_config()}
        save_embedding(path, unwrap(model).vectors, c.token, step=c.steps, metadata=metadata)
        logger.info("embedding %r exported to %s", c.token, path)
        return path


__all__ = ["EmbeddingStage", "EmbeddingVectors"]
