"""The text stage: train a CLIP text tower contrastively against a small image tower (Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision", section 2.3).

Each batch of N (image, caption) pairs gives an N x N matrix of cosine similarities between
L2-normalised image and text embeddings, times a learned logit scale (initialised to
1 / init_temperature, clamped at 100 as in CLIP); the loss is the mean of the cross-entropies
over rows (image -> text) and columns (text -> image), with the matching pair as the target.
The text embedding is the final-layer-norm hidden state at the first EOS token, projected.

One departure: pairs in a batch with identical captions are masked out of each other's softmax
(neither positive nor negative). On shapes, short captions such as "a red circle" repeat often,
and CLIP's loss would push apart an image and a caption that is true of it. With
``hard_negatives``, each image is also scored against its own caption with the relation turned
round (``inverse_relation_caption``), an extra column of the image -> text softmax (NegCLIP,
Yuksekgonul et al. 2023): a bag of words cannot tell the two apart.

Only the text tower is exported (the U-Net cross-attends to its full sequence of hidden states,
as SD does with CLIP's); the image tower exists to train it.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from stablediff.image import image_to_tensor
from stablediff.models.clip import CLIPTextConfig, CLIPTextModel
from stablediff.shapes import Scene, ShapesDataset, inverse_relation_caption, parse_caption
from stablediff.train.config import TrainConfig
from stablediff.train.data.stage_data import EVAL_SEED_OFFSET, image_text_data
from stablediff.train.distributed import gather_batch, unwrap
from stablediff.train.exports import TEXT_PART, TOKENIZER_DIR, load_tokenizer, write_part
from stablediff.train.stage import Stage
from stablediff.weights.io import atomic_write_bytes

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) here to keep training stable


@dataclass(frozen=True)
class TextSize:
    """A text tower (its vocab_size is replaced by the tokenizer's) and the image tower it trains with:
    stride-2 conv stages of `image_channels`, and the shared embedding width `embed_dim`."""

    text: CLIPTextConfig
    image_channels: tuple[int, ...]
    embed_dim: int


TEXT_SIZES: dict[str, TextSize] = {
    "tiny": TextSize(CLIPTextConfig(width=32, layers=2, heads=4), (16, 32), 32),
    # shapes: a ~60-word language and captions under 40 tokens; 256 wide (the U-Net's context_dim)
    # with 4 heads of 64, 4 layers: enough to bind colours to shapes and relations to objects.
    # the bundled model: a 128-wide, 4-layer text tower (0.9M parameters with a 667-token vocabulary)
    "shapes-small": TextSize(CLIPTextConfig(width=128, layers=4, heads=4), (32, 64, 128, 128), 128),
}


class ImageTower(nn.Module):
    """[B, 3, H, W] in [-1, 1] -> [B, embed_dim] (not normalised).

    A stem conv, then per entry of `channels` a stride-2 conv and a conv (GroupNorm + SiLU), then
    average pooling to a 4x4 grid and a linear projection of the flattened grid: pooling to one
    vector would throw away where things are, and captions name positions ("top left", "above").
    """

    def __init__(self, channels: tuple[int, ...], embed_dim: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        prev = channels[0]
        for ch in channels:
            groups = math.gcd(8, ch)
            layers += [
                nn.Conv2d(prev, ch, 3, stride=2, padding=1),
                nn.GroupNorm(groups, ch),
                nn.SiLU(),
                nn.Conv2d(ch, ch, 3, padding=1),
                nn.GroupNorm(groups, ch),
                nn.SiLU(),
            ]
            prev = ch
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(prev * 16, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.convs(images), 4)
        return self.proj(h.flatten(1))  # [B, C, 4, 4] -> [B, 16 C] -> [B, E]


class LogitScale(nn.Module):
    """The learned log of the inverse softmax temperature (a module so it can sit in a ModuleDict)."""

    def __init__(self, init_temperature: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self) -> torch.Tensor:
        return self.value.exp().clamp(max=MAX_LOGIT_SCALE)


class ContrastiveModel(nn.ModuleDict):
    """{"text", "image", "text_proj", "logit_scale"}; `forward(images, ids, eos_id)` ->
    (image embeddings [B, E], text embeddings [B, E], both unit length; logit scale, scalar)."""

    def forward(self, images: torch.Tensor, ids: torch.Tensor, eos_id: int, negative_ids: torch.Tensor | None = None):
        """With `negative_ids`, also their text embeddings, last (inside forward, so DDP sees them)."""
        out = (self.embed_images(images), self.embed_texts(ids, eos_id), self["logit_scale"]())
        return out if negative_ids is None else (*out, self.embed_texts(negative_ids, eos_id))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self["image"](images).float(), dim=-1)

    def embed_texts(self, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        hidden = self["text"](ids)  # [B, L, W]
        # The first EOS of each row (the padding may be EOS too): argmax returns the first maximum.
        eos = (ids == eos_id).int().argmax(dim=1)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), eos]
        return F.normalize(self["text_proj"](pooled).float(), dim=-1)


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor,
    ids: torch.Tensor | None = None,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE: (loss, logits [B, B], images in rows). With `ids`, pairs whose token ids
    are identical are masked out of each other's softmax (see the module docstring). `negatives`:
    (embeddings [B, E] of false captions, their token ids [B, L]), extra columns of the image ->
    text softmax; a row of ids that equals a caption of the batch is masked for that caption's
    image, and rows without a false caption are passed as all-zero ids (masked everywhere)."""
    logits = scale * image_emb @ text_emb.T
    if ids is not None:
        same = (ids[:, None, :] == ids[None, :, :]).all(-1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    image_to_text = logits
    if negatives is not None:
        negative_emb, negative_ids = negatives
        extra = scale * image_emb @ negative_emb.T
        unusable = (negative_ids == 0).all(-1)[None, :]
        if ids is not None:
            unusable = unusable | (ids[:, None, :] == negative_ids[None, :, :]).all(-1)
        image_to_text = torch.cat([logits, extra.masked_fill(unusable, float("-inf"))], dim=1)
    return 0.5 * (F.cross_entropy(image_to_text, target) + F.cross_entropy(logits.T, target)), logits


def text_size(name: str) -> TextSize:
    if name not in TEXT_SIZES:
        raise ValueError(f"unknown text model size {name!r}; choose one of {sorted(TEXT_SIZES)}")
    return TEXT_SIZES[name]


class TextStage(Stage):
    name = "text"

    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__(config, device)
        if config.init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {config.init_temperature}")
        self.tokenizer = load_tokenizer(config.tokenizer)
        size = text_size(config.model)
        self.text_config = replace(
            size.text, vocab_size=self.tokenizer.vocab_size, max_positions=self.tokenizer.max_length
        )
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global generator
            torch.manual_seed(config.seed)
            self.model = ContrastiveModel(
                {
                    "text": CLIPTextModel(self.text_config),
                    "image": ImageTower(size.image_channels, size.embed_dim),
                    "text_proj": nn.Linear(self.text_config.width, size.embed_dim, bias=False),
                    "logit_scale": LogitScale(config.init_temperature),
                }
            ).to(device)
        self._train, self._held = image_text_data(config)
        self._eval: tuple[torch.Tensor, list[str], list[Scene] | None] | None = None

    def trainable(self) -> nn.Module:
        return self.model

    def dataset(self) -> Dataset:
        return self._train

    def collate(self, items: list) -> tuple[torch.Tensor, ...]:
        """(image, caption) items -> (images [B, 3, S, S], token ids [B, 77] int64), and with
        `hard_negatives` the ids of the inverse-relation captions (all zeros where there is none)."""
        images = torch.stack([image for image, _ in items])
        texts = [text for _, text in items]
        ids = torch.tensor(self.tokenizer(texts), dtype=torch.long)
        if not self.config.hard_negatives:
            return images, ids
        negatives = [inverse_relation_caption(text) for text in texts]
        negative_ids = torch.tensor(self.tokenizer([n or "" for n in negatives]), dtype=torch.long)
        negative_ids[[n is None for n in negatives]] = 0
        return images, ids, negative_ids

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        images, ids, *negative_ids = (t.to(self.device, non_blocking=True) for t in batch)
        image_emb, text_emb, scale, *negative_emb = model(images, ids, self.tokenizer.eos_id, *negative_ids)
        # Under torchrun every process scores its pairs against the whole global batch (CLIP's
        # negatives), so N processes train as one process with N times the batch.
        image_emb, text_emb, ids = gather_batch(image_emb), gather_batch(text_emb), gather_batch(ids)
        negatives = (gather_batch(negative_emb[0]), gather_batch(negative_ids[0])) if negative_ids else None
        loss, logits = contrastive_loss(image_emb, text_emb, scale, ids, negatives)
        target = torch.arange(len(ids), device=ids.device)
        accuracy = (logits.argmax(1) == target).float().mean().item()
        return loss, {"loss": loss.item(), "batch_i2t": accuracy, "temperature": 1.0 / scale.item()}

    def _eval_set(self) -> tuple[torch.Tensor, list[str], list[Scene] | None]:
        """Held-out (images, captions, scenes or None), built once. Shapes: `eval_size` distinct scenes."""
        if self._eval is None:
            n = max(1, self.config.eval_size)
            if self.config.data == "shapes":
                shapes = ShapesDataset(50 * n, self.config.seed + EVAL_SEED_OFFSET, "train", self.config.resolution)
                seen: dict[Scene, int] = {}
                for index in range(len(shapes)):
                    seen.setdefault(shapes.scene(index), index)
                    if len(seen) == n:
                        break
                items = [shapes[i] for i in seen.values()]
                self._eval = (
                    torch.cat([image_to_tensor(img) for img, _, _ in items]),
                    [text for _, text, _ in items],
                    [scene for _, _, scene in items],
                )
            else:
                items = [self._held[i] for i in range(min(n, len(self._held)))]
                self._eval = torch.stack([img for img, _ in items]), [text for _, text in items], None
        return self._eval

    @torch.no_grad()
    def _embeddings(self, model: nn.Module, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(held-out image embeddings [N, E], embeddings of `texts` [M, E]), on the CPU."""
        net = unwrap(model)
        images, _, _ = self._eval_set()
        was_training = net.training
        net.eval()
        try:
            bs = self.config.batch_size
            image_emb = [net.embed_images(images[i : i + bs].to(self.device)) for i in range(0, len(images), bs)]
            text_emb = []
            for i in range(0, len(texts), bs):
                ids = torch.tensor(self.tokenizer(texts[i : i + bs]), dtype=torch.long, device=self.device)
                text_emb.append(net.embed_texts(ids, self.tokenizer.eos_id))
        finally:
            net.train(was_training)
        return torch.cat(image_emb).cpu(), torch.cat(text_emb).cpu()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 retrieval accuracy on the held-out pairs, both ways, in [0, 1].

        "retrieval_i2t": for each image, the caption with the highest similarity is a hit when its
        text equals the image's own caption; "retrieval_t2i": for each caption, the retrieved
        image's caption equals it. Text equality, not index equality: two held-out items may share
        a caption (different shapes scenes can be described alike), and retrieving either one is
        right. On shapes, "*_true" also counts a hit whenever the caption is TRUE of the scene
        (`parse_caption(...).matches(scene)`), the semantic measure, and "relation_i2t" is the
        share of two-object images more similar to their caption than to the same caption with the
        relation turned round (0.5: the relation is not seen).
        """
        if self.config.eval_size < 1:
            return {}
        _, texts, scenes = self._eval_set()
        n = len(texts)
        # Shapes only: each two-object caption with its relation turned round, embedded in the same pass.
        inverse = {} if scenes is None else {i: t for i, c in enumerate(texts) if (t := inverse_relation_caption(c))}
        image_emb, text_emb = self._embeddings(model, texts + list(inverse.values()))
        sims = image_emb @ text_emb[:n].T
        i2t, t2i = sims.argmax(1).tolist(), sims.argmax(0).tolist()
        out = {
            "retrieval_i2t": sum(texts[j] == texts[i] for i, j in enumerate(i2t)) / n,
            "retrieval_t2i": sum(texts[j] == texts[i] for i, j in enumerate(t2i)) / n,
        }
        if scenes is not None:
            specs = [parse_caption(t) for t in texts]
            out["retrieval_i2t_true"] = sum(specs[j].matches(scenes[i]) for i, j in enumerate(i2t)) / n
            out["retrieval_t2i_true"] = sum(specs[i].matches(scenes[j]) for i, j in enumerate(t2i)) / n
            rows = list(inverse)
            if rows:  # does each image prefer its caption to the one with the relation turned round?
                wrong = (image_emb[rows] * text_emb[n:]).sum(1)
                out["relation_i2t"] = (sims[rows, rows] > wrong).float().mean().item()
        return out

    def sample(self, model: nn.Module, path: Path) -> None:
        """A PNG heat map of image->text softmax probabilities on up to 32 held-out pairs (row =
        image, column = caption; a bright diagonal is a trained model), 8 px per cell."""
        image_emb, text_emb = self._embeddings(model, self._eval_set()[1])
        sims = image_emb @ text_emb.T
        k = min(32, len(sims))
        probs = (unwrap(model)["logit_scale"]().detach().cpu() * sims[:k, :k]).softmax(1)
        pixels = (probs / probs.max(1, keepdim=True).values * 255).round().to(torch.uint8)
        image = Image.fromarray(pixels.numpy()).resize((8 * k, 8 * k), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())

    def export(self, model: nn.Module, out_dir: Path) -> Path:
        """`out_dir/text_encoder.safetensors` (CLIPTextModel key names; metadata
        {"stablediff.text_config": JSON of the CLIPTextConfig}) and `out_dir/tokenizer/`."""
        self.tokenizer.save(Path(out_dir) / TOKENIZER_DIR)  # first: the weights are useless without it
        out = write_part(TEXT_PART, unwrap(model)["text"], out_dir)
        logger.info("text encoder exported to %s", out)
        return out


__all__ = ["TEXT_SIZES", "ContrastiveModel", "ImageTower", "LogitScale", "TextSize", "TextStage", "contrastive_loss"]
