"""The add-ons of a loaded model: LoRAs (stablediff.lora) and textual-inversion embeddings
(stablediff.embeddings), mixed into `StableDiffusion`.

LoRAs loaded with `load_lora` apply to every generation; a prompt's ``<lora:name:w>`` tags apply to
that generation only (looked up in ``lora_dir``, or a loaded LoRA of that name given that weight
for the run). Embeddings loaded with `load_embedding` are read wherever their token stands in a
prompt; those in ``embeddings_dir`` are loaded the first time a prompt names them. After each run
``last_loras`` and ``last_embeddings`` say what was used, with A1111's hashes, for the PNG.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from stablediff.compiled import is_compiled
from stablediff.embeddings import Embedding, EmbeddingTable
from stablediff.lora import LoraInfo, LoraStack, save_lora_kohya
from stablediff.lora.tags import find_lora, parse_lora_tags

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


class AddOns:
    """LoRA and embedding methods of a pipeline with ``unet``, ``text_encoder`` and ``tokenizer`` (and
    SDXL base's ``text_encoder_2``)."""

    lora_dir: str | os.PathLike[str] | None = None
    embeddings_dir: str | os.PathLike[str] | None = None
    # what the last run used: [{name, unet, text, hash, in_prompt}] and {token: hash}
    last_loras: list[dict[str, Any]] = []
    last_embeddings: dict[str, str | None] = {}

    # --- embeddings -----------------------------------------------------------------------------

    @property
    def _embedding_table(self) -> EmbeddingTable:
        return self.__dict__.setdefault("_embeddings", EmbeddingTable())

    def load_embedding(self, path: str | os.PathLike[str], token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds;
        on SDXL base, an SDXL file with clip_l and clip_g vectors) and return the token that calls it
        in prompts: `token` if given, else the token a diffusers file stores, else the file's stem
        (as A1111). Its vectors must be as wide as this model's token embeddings; the text
        encoders' weights are not changed."""
        second = getattr(self, "text_encoder_2", None)
        if second is None and self.unet.config.adm_in_channels is not None:
            raise ValueError(
                "textual-inversion embeddings on an SDXL refiner are not supported yet (SDXL base models take "
                f"SDXL embeddings); cannot load {os.fspath(path)}"
            )
        width = self.text_encoder.embeddings.token_embedding.embedding_dim
        width_2 = None if second is None else second.embeddings.token_embedding.embedding_dim
        return self._embedding_table.load(path, token, tokenizer=self.tokenizer, width=width, width_2=width_2).token

    def unload_embedding(self, token: str | None = None) -> None:
        """Unload the embedding called `token`, or every embedding when None."""
        self._embedding_table.remove(token)

    @property
    def embeddings(self) -> Mapping[str, Embedding]:
        """The loaded embeddings, token -> `Embedding` (vectors, path, format, step); read-only."""
        return self._embedding_table.mapping()

    # --- LoRAs: applied by hooks, the weights untouched unless fused -----------------------------

    def _loras(self) -> LoraStack:
        stack = self.__dict__.get("_lora_stack")
        if stack is None:  # made on first use: it indexes the networks' modules
            stack = LoraStack(self.unet, self.text_encoder, getattr(self, "text_encoder_2", None))
            self.__dict__["_lora_stack"] = stack
        return stack

    @property
    def loras(self) -> dict[str, LoraInfo]:
        """The loaded LoRAs: name -> (path, scale, hash), the hash as A1111 shows it."""
        return self._loras().info()

    def load_lora(
        self, path: str | os.PathLike[str], scale: float = 1.0, name: str | None = None, strict: bool = True
    ) -> str:
        """Apply a LoRA file (kohya/A1111, LyCORIS LoHa/LoKr, diffusers/PEFT; SD 1.x/2.x or SDXL, as the
        model is) with `scale`; returns its name (default: the file's stem). Strict: a key that fits no
        module is a BadFileError naming it, and nothing is applied; strict=False applies what fits."""
        self._refuse_if_compiled(path)
        return self._loras().load(path, scale, name, strict)

    def _refuse_if_compiled(self, lora: object) -> None:
        if is_compiled(self.unet):
            raise ValueError(f"cannot apply LoRA {str(lora)!r}: the U-Net is compiled (compile()), its weights frozen")

    def set_lora_scale(self, name: str, scale: float, text_scale: float | None = None) -> None:
        """The LoRA's weight (`text_scale`: another one for its text-encoder part, as A1111's te=)."""
        self._loras().set_scale(name, scale, text_scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA `name`, or every LoRA when None: outputs are again exactly those without."""
        self._loras().unload(name)

    def fuse_lora(self) -> None:
        """Merge the loaded LoRAs into the weights (faster); `unfuse_lora` restores them bit-exact."""
        self._loras().fuse()

    def unfuse_lora(self) -> None:
        self._loras().unfuse()

    def save_lora(self, name: str, path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> None:
        """Write the loaded (or trained) LoRA `name` as a kohya-format safetensors file."""
        stack = self._loras()
        save_lora_kohya(stack.get(name), path, stack.table, dtype)

    # --- one run's add-ons ----------------------------------------------------------------------

    @contextlib.contextmanager
    def prompt_addons(self, prompt: str, negative_prompt: str) -> Iterator[str]:
        """Within the block the prompt's LoRA tags apply and the embeddings it names (from
        ``embeddings_dir``) are loaded; yields the prompt without its tags, and sets ``last_loras``
        and ``last_embeddings``. LoRAs loaded for a tag are unloaded after, others get back their weight."""
        clean, tags = parse_lora_tags(prompt)
        self._load_named_embeddings(clean + "\n" + negative_prompt)
        stack = self._loras() if tags or "_lora_stack" in self.__dict__ else None
        added, previous = [], {}
        try:
            for tag in tags:
                if tag.name in stack.networks:
                    network = stack.get(tag.name)
                    previous[tag.name] = (network.multiplier, network.text_multiplier)
                else:
                    self._refuse_if_compiled(tag.name)
                    added.append(stack.load(find_lora(tag.name, self.lora_dir), tag.unet, tag.name))
                stack.set_scale(tag.name, tag.unet, tag.text)
            named = {tag.name for tag in tags}
            self.last_loras = [
                {"name": n, "unet": net.multiplier, "text": net.multiplier_for("text"), "hash": net.hash}
                | {"in_prompt": n in named}
                for n, net in (stack.networks.items() if stack else ())
            ]
            used = [p for text in (clean, negative_prompt) for p in self._embedding_table.split(text)]
            self.last_embeddings = {e.token: _short_hash(e.path) for e in used if isinstance(e, Embedding)}
            yield clean
        finally:
            for name in added:
                stack.unload(name)
            for name, (unet, text) in previous.items():
                stack.set_scale(name, unet, text)

    def _load_named_embeddings(self, text: str) -> None:
        """Load the embeddings of ``embeddings_dir`` whose names stand in ``text`` as words."""
        if self.embeddings_dir is None:
            return
        root = Path(self.embeddings_dir)
        if not root.is_dir():
            raise ValueError(f"embeddings folder {root} does not exist")
        loaded = {token.lower() for token in self.embeddings}
        for path in sorted(root.rglob("*")):
            stem = path.stem
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or stem.lower() in loaded or not path.is_file():
                continue
            if re.search(rf"(?<!\w){re.escape(stem)}(?!\w)", text, re.IGNORECASE):
                self.load_embedding(path)
                loaded.add(stem.lower())


_HASHES: dict[tuple[str, int, int], str] = {}


def _short_hash(path: str | os.PathLike[str] | None) -> str | None:
    """A1111's short hash of an embedding file: the first 12 hex digits of its SHA-256."""
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:12]
    return _HASHES[key]
