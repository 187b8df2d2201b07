"""The tokenizer, VAE and text stages on tiny configs: BPE training, losses that go down on a fixed
batch, the discriminator kept out of the generator's gradient, evaluation and exports that load."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from stablediff.shapes import ShapesDataset, shapes_captions, write_shapes_folder
from stablediff.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer
from stablediff.train.bpe import MIN_VOCAB_SIZE, count_words, learn_merges, pre_tokenize, train_bpe, word_symbols
from stablediff.train.config import TrainConfig
from stablediff.train.data import caption_corpus, image_text_data
from stablediff.train.exports import TEXT_PART, VAE_PART, load_tokenizer, read_part
from stablediff.train.stages.text import TextStage
from stablediff.train.stages.tokenizer import TokenizerStage
from stablediff.train.stages.vae import VAEStage

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(shapes_captions(400, seed=0))


def _apply_merges(symbols: tuple[str, ...], merges: list[tuple[str, str]]) -> list[str]:
    """Reference BPE application: each merge in training order, over the whole word."""
    word = list(symbols)
    for a, b in merges:
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                out.append(a + b)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


def _naive_merges(counts: dict[str, int], n: int) -> list[tuple[str, str]]:
    """Reference trainer: recount every pair after every merge (same tie-break)."""
    words = {w: list(word_symbols(w)) for w in counts}
    merges = []
    for _ in range(n):
        pairs: Counter = Counter()
        for w, symbols in words.items():
            for p in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[p] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {w: _apply_merges(tuple(s), [best]) for w, s in words.items()}
    return merges


def test_shapes_captions_match_dataset():
    ds = ShapesDataset(50, seed=3)
    assert list(shapes_captions(50, seed=3)) == [ds[i][1] for i in range(50)]


def test_bpe_incremental_counts_equal_recounting(corpus):
    counts = count_words(corpus)
    assert learn_merges(counts, 120) == _naive_merges(counts, 120)


def test_bpe_tokenizer(corpus, tmp_path):
    tok = train_bpe(corpus, 600)
    assert tok.vocab_size == 600 and len(tok.merges) == 600 - MIN_VOCAB_SIZE
    assert tok.encoder[BOS_TOKEN] == 598 and tok.encoder[EOS_TOKEN] == 599  # EOS is the last id, as CLIP
    ids = tok("a red circle")
    assert len(ids) == 77 and ids[0] == tok.bos_id
    n = len(tok.encode("a red circle"))
    assert ids[n + 1] == tok.eos_id and set(ids[n + 1 :]) == {tok.eos_id}  # EOS, then EOS padding
    # Determinism: same corpus, and the same corpus in another order, give the same merges.
    shuffled = corpus[:]
    random.Random(1).shuffle(shuffled)
    assert train_bpe(corpus, 600).merges == tok.merges == train_bpe(shuffled, 600).merges
    # Our CLIPTokenizer applies the learned merges exactly as training did.
    for text in corpus:
        expected = [tok.encoder[s] for w in pre_tokenize(text) for s in _apply_merges(word_symbols(w), tok.merges)]
        assert tok.encode(text) == expected, text
    loaded = CLIPTokenizer.from_folder(tok.save(tmp_path / "tok"))
    assert loaded.encoder == tok.encoder and loaded.merges == tok.merges
    assert [loaded(t) for t in corpus[:50]] == [tok(t) for t in corpus[:50]]


def test_bpe_common_words_and_errors(corpus):
    tok = train_bpe(corpus, 4096)  # more than the corpus allows: stops when every word is one symbol
    assert tok.vocab_size < 4096
    for word in ("circle", "red", "square", "background"):
        assert word + "</w>" in tok.encoder
        assert len(tok.encode(word)) == 1
    assert len(tok.encode("an unseen zebra")) > 3  # byte fallback still encodes anything
    with pytest.raises(ValueError, match="vocab_size must be an int >= 514"):
        train_bpe(corpus, 300)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(["", "   "], 600)


def test_tokenizer_stage(tmp_path):
    config = TrainConfig(stage="tokenizer", data="shapes", shapes_size=300, vocab_size=560)
    folder = TokenizerStage(config).fit(tmp_path)
    assert folder == tmp_path / "tokenizer"
    tok = CLIPTokenizer.from_folder(folder)
    assert tok.vocab_size == 560 and tok.pad_token == EOS_TOKEN


def test_folder_data_holds_out_items(tmp_path):
    folder = write_shapes_folder(tmp_path / "data", 20, seed=1, size=32)
    config = TrainConfig(stage="vae", data=str(folder), resolution=32, eval_size=4, seed=0)
    train, held = image_text_data(config)
    assert (len(train), len(held)) == (18, 2)  # at most a tenth of the folder is held out
    assert set(train.indices).isdisjoint(held.indices)
    image, text = held[0]
    assert image.shape == (3, 32, 32) and text == ShapesDataset(20, seed=1, size=32)[held.indices[0]][1]
    assert caption_corpus(config) == [ShapesDataset(20, seed=1)[i][1] for i in range(20)]


def _fit(stage, batch, steps: int, lr: float) -> tuple[float, float]:
    """A minimal trainer: AdamW on one fixed batch; returns (first loss, last loss)."""
    model = stage.trainable()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss, metrics = stage.loss(model, batch, step, torch.Generator().manual_seed(step))
        assert torch.isfinite(loss) and all(isinstance(v, float) for v in metrics.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def _vae_config(**kw) -> TrainConfig:
    return TrainConfig(
        stage="vae", data="shapes", model="tiny", resolution=32, shapes_size=64, eval_size=8, batch_size=4, seed=0, **kw
    )


def test_vae_stage_learns_and_exports(tmp_path):
    stage = VAEStage(_vae_config(), CPU)
    batch = stage.collate([stage.dataset()[i] for i in range(4)])
    assert batch.shape == (4, 3, 32, 32)
    before = stage.evaluate(stage.trainable())["psnr"]
    first, last = _fit(stage, batch, steps=15, lr=2e-3)
    after = stage.evaluate(stage.trainable())["psnr"]
    print(f"VAE loss {first:.4f} -> {last:.4f}; held-out PSNR {before:.2f} -> {after:.2f} dB")
    assert last < 0.6 * first
    stage.sample(stage.trainable(), tmp_path / "sample.png")
    assert (tmp_path / "sample.png").stat().st_size > 0
    path = stage.export(stage.trainable(), tmp_path)
    assert path == tmp_path / "vae.safetensors"
    vae = read_part(VAE_PART, tmp_path)
    original = stage.trainable()["vae"].state_dict()
    assert vae.state_dict().keys() == original.keys()
    assert all(torch.equal(vae.state_dict()[k], original[k]) for k in original)
    assert vae.config.scaling_factor == pytest.approx(1.0 / stage.latent_std(stage.trainable()["vae"]))
    assert vae.config.ch_mult == (1, 2)
    with torch.no_grad():  # with its measured scale, the exported VAE gives latents of unit std
        z = vae.encode(stage._eval_batch()).sample(torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(1.0, rel=1e-3)


def test_vae_discriminator_terms_reach_only_their_network():
    stage = VAEStage(_vae_config(disc_weight=0.5, disc_start=0), CPU)
    model = stage.trainable()
    batch = stage.collate([stage.dataset()[i] for i in range(4)])
    first, last = _fit(stage, batch, steps=2, lr=1e-3)
    print(f"VAE+disc loss {first:.4f} -> {last:.4f}")
    terms, metrics = stage.loss_terms(model, batch, step=10, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"rec", "kl", "g_adv", "d_hinge"} and "d_loss" in metrics

    def grads(term: torch.Tensor) -> tuple[bool, bool]:
        model.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        touched = {
            name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        return "vae" in touched, "disc" in touched

    assert grads(terms["g_adv"]) == (True, False)  # the generator's term leaves the discriminator alone
    assert grads(terms["d_hinge"]) == (False, True)  # the discriminator's term leaves the VAE alone
    assert grads(terms["rec"]) == (True, False)
    # Before disc_start both adversarial terms are zero, yet computed (every parameter in the graph).
    stage.config.disc_start = 5
    early, _ = stage.loss_terms(model, batch, step=0, generator=torch.Generator().manual_seed(0))
    assert early["g_adv"].item() == 0.0 and early["d_hinge"].item() == 0.0


def test_text_stage_learns_evaluates_and_exports(tmp_path):
    tok_dir = TokenizerStage(TrainConfig(stage="tokenizer", data="shapes", shapes_size=300, vocab_size=600)).fit(
        tmp_path / "tok_run"
    )
    config = TrainConfig(
        stage="text",
        data="shapes",
        model="tiny",
        resolution=32,
        shapes_size=64,
        eval_size=16,
        batch_size=8,
        tokenizer=str(tmp_path / "tok_run"),
    )
    stage = TextStage(config, CPU)
    assert stage.text_config.vocab_size == 600 and stage.tokenizer.encoder == CLIPTokenizer.from_folder(tok_dir).encoder
    images, ids = batch = stage.collate([stage.dataset()[i] for i in range(8)])
    assert images.shape == (8, 3, 32, 32) and ids.shape == (8, 77) and ids.dtype == torch.long
    first, last = _fit(stage, batch, steps=30, lr=2e-3)
    print(f"text contrastive loss {first:.4f} -> {last:.4f}")
    assert last < 0.5 * first
    metrics = stage.evaluate(stage.trainable())
    print("retrieval", metrics)
    assert set(metrics) == {
        "retrieval_i2t",
        "retrieval_t2i",
        "retrieval_i2t_true",
        "retrieval_t2i_true",
        "relation_i2t",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(set(stage._eval_set()[2])) == 16  # distinct held-out scenes
    stage.sample(stage.trainable(), tmp_path / "sims.png")
    path = stage.export(stage.trainable(), tmp_path / "export")
    assert path.name == "text_encoder.safetensors"
    model, tok = read_part(TEXT_PART, tmp_path / "export"), load_tokenizer(tmp_path / "export")
    original = stage.trainable()["text"].state_dict()
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)
    assert model.config == stage.text_config and tok.encoder == stage.tokenizer.encoder
    with torch.no_grad():
        assert torch.equal(model(ids), stage.trainable()["text"].eval()(ids))


def test_foreground_mask_marks_what_stands_out():
    from stablediff.train.stages.vae import foreground_mask

    images = torch.ones(2, 3, 16, 16)  # white
    images[0, :, 4:8, 4:8] = torch.tensor([0.7, -0.7, -0.7])[:, None, None]  # a red square
    images[1] = -1.0  # black, empty
    mask = foreground_mask(images)
    assert mask.shape == (2, 1, 16, 16)
    assert mask[0, 0, 4:8, 4:8].all() and mask[0].sum() == 16 and mask[1].sum() == 0


def test_hard_negatives_are_extra_image_to_text_columns():
    from stablediff.train.stages.text import contrastive_loss

    gen = torch.Generator().manual_seed(0)
    image_emb, text_emb, negative_emb = (
        torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1) for _ in range(3)
    )
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 7, 2]])
    scale = torch.tensor(10.0)
    plain, logits = contrastive_loss(image_emb, text_emb, scale, ids)
    none = torch.zeros_like(ids)  # no false caption for any row: the same loss
    assert torch.equal(contrastive_loss(image_emb, text_emb, scale, ids, (negative_emb, none))[0], plain)
    # Row 0 has a false caption; row 1's false caption is row 2's true one, so image 2 ignores it.
    negative_ids = torch.tensor([[1, 9, 2], [1, 7, 2], [0, 0, 0]])
    loss, _ = contrastive_loss(image_emb, text_emb, scale, ids, (negative_emb, negative_ids))
    i2t = torch.cat([logits, scale * image_emb @ negative_emb.T], 1)  # columns 3-5: the false captions
    i2t[:, 5] = float("-inf")  # row 2 has none
    i2t[2, 4] = float("-inf")  # row 1's false caption is image 2's true one
    target = torch.arange(3)
    cross_entropy = torch.nn.functional.cross_entropy
    expected = 0.5 * (cross_entropy(i2t, target) + cross_entropy(logits.T, target))
    print(f"loss without negatives {plain:.4f}, with {loss:.4f}")
    torch.testing.assert_close(loss, expected)
    assert loss > plain


def test_text_stage_with_hard_negatives_trains_and_reports_relation_accuracy(tmp_path):
    from stablediff.shapes import inverse_relation_caption

    config = TrainConfig(
        stage="text",
        data="shapes",
        model="tiny",
        resolution=32,
        shapes_size=64,
        eval_size=16,
        batch_size=8,
        hard_negatives=True,
    )
    stage = TextStage(config, CPU)
    items = [stage.dataset()[i] for i in range(8)]
    images, ids, negative_ids = batch = stage.collate(items)
    for (_, text), row in zip(items, negative_ids, strict=True):
        inverse = inverse_relation_caption(text)
        want = torch.zeros(77, dtype=torch.long) if inverse is None else torch.tensor(stage.tokenizer([inverse])[0])
        assert torch.equal(row, want), text
    assert 0 < (negative_ids != 0).any(1).sum() < 8  # one- and two-object captions both in the batch
    first, last = _fit(stage, batch, steps=20, lr=2e-3)
    assert last < first
    metrics = stage.evaluate(stage.trainable())
    assert 0.0 <= metrics["relation_i2t"] <= 1.0
    with pytest.raises(ValueError, match="hard_negatives is for the text stage, not 'unet'"):
        TrainConfig(stage="unet", hard_negatives=True)
