"""The relation contrast: the loss against hand-computed values, the inverse captions a batch
carries, validation, and a U-Net run that learns to tell a caption from its inverse with it."""

from __future__ import annotations

import math

import pytest
import torch

from stablediff.train.captions import inverse_relation_caption
from stablediff.train.config import TrainConfig
from stablediff.train.contrast import relation_contrast_loss


def test_relation_contrast_loss_against_hand_computed_values():
    true = torch.tensor([0.1, 0.1, 0.2], requires_grad=True)
    inverse = torch.tensor([0.1, 0.2, 0.1], requires_grad=True)
    loss = relation_contrast_loss(true, inverse, scale=0.5)
    r = math.log(2) / 0.5
    expected = [math.log(2), math.log1p(math.exp(-r)), math.log1p(math.exp(r))]
    print(f"contrast loss {loss.tolist()} expected {expected}")
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()  # lowering the true error and raising the inverse one both help
    assert (true.grad > 0).all() and (inverse.grad < 0).all()
    with pytest.raises(ValueError, match="scale must be > 0, got 0"):
        relation_contrast_loss(true, inverse, scale=0.0)


def test_relation_contrast_options_are_validated(tmp_path):
    from stablediff.train.stages.unet import UNetStage

    with pytest.raises(ValueError, match="relation_contrast is for the unet and finetune stages"):
        TrainConfig(stage="vae", relation_contrast=0.1)
    with pytest.raises(ValueError, match="relation_contrast must be >= 0"):
        TrainConfig(stage="unet", relation_contrast=-1.0)
    with pytest.raises(ValueError, match="relation_contrast_scale must be > 0"):
        TrainConfig(stage="unet", relation_contrast=0.1, relation_contrast_scale=0.0)
    config = TrainConfig(stage="unet", data="shapes", out=str(tmp_path), shapes_size=4, resolution=32, eval_size=4,
                         relation_contrast=0.1, relation_contrast_from=1000)  # fmt: skip
    with pytest.raises(ValueError, match="below the schedule's 1000 timesteps, got 1000"):
        UNetStage(config, torch.device("cpu"))


def _stage(tmp_path, **options):
    from stablediff.train.stages.unet import UNetStage

    config = TrainConfig(stage="unet", data="shapes", out=str(tmp_path), shapes_size=16, resolution=32, batch_size=8,
                         eval_size=4, caption_dropout=0.0, relation_contrast=1.0, relation_contrast_from=0, seed=3,
                         **options)  # fmt: skip
    return UNetStage(config, torch.device("cpu"))


def test_batches_carry_the_inverse_captions(tmp_path):
    stage = _stage(tmp_path)
    items = [stage.dataset()[i] for i in range(16)]
    batch = stage.collate(items)
    inverse = [inverse_relation_caption(text) for _, text, *_ in items]
    assert batch["has_inverse"].tolist() == [t is not None for t in inverse]
    assert 0 < sum(batch["has_inverse"].tolist()) < 16  # the shapes data mixes one and two objects
    for k, (_, text, *_) in enumerate(items):
        expected = stage.tokenizer([inverse[k] or text])[0]
        assert batch["inverse_ids"][k].tolist() == expected
        assert (batch["inverse_ids"][k] != batch["ids"][k]).any().item() == (inverse[k] is not None)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_unet_stage_learns_to_tell_a_caption_from_its_inverse(tmp_path, train_text_encoder):
    stage = _stage(tmp_path, train_text_encoder=train_text_encoder)
    items = [stage.dataset()[i] for i in range(16)]
    batch = stage.collate([item for item in items if inverse_relation_caption(item[1])][:8])
    model = stage.trainable()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    contrasts = []
    for step in range(40):
        loss, logged = stage.loss(model, batch, step, torch.Generator().manual_seed(0))
        assert loss.item() == pytest.approx(logged["denoising"] + logged["contrast"], rel=1e-5)
        contrasts.append(logged["contrast"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"contrast loss over 40 steps on one batch: {contrasts[0]:.3f} -> {contrasts[-1]:.3f}; "
          f"told apart at the end {logged['told_apart']:.2f}")
    assert contrasts[-1] < 0.75 * contrasts[0]  # stays at log 2 if the captions make no difference
    assert logged["told_apart"] > 0.5
