"""The relation reward: colour masks and centres on rendered scenes, margins and hinges against
the scenes' true relations, the x0 and DDIM algebra against closed forms, and a U-Net stage
whose reward falls as it trains."""

from __future__ import annotations

import random

import pytest
import torch

from stablediff.diffusion import NoiseSchedule, ScheduleConfig, q_sample, training_target
from stablediff.image import image_to_tensor
from stablediff.train.captions import SceneSpec, parse_caption
from stablediff.train.config import TrainConfig
from stablediff.train.reward import (
    CELL,
    PALETTE,
    PALETTE_NAMES,
    centres,
    color_masks,
    predicted_x0,
    relation_margins,
    relation_prompts,
    relation_reward_loss,
    sample_to_step,
)
from stablediff.train.shapes import INVERSE_RELATION, Scene, ShapeObject, layout, render

SCENE = Scene("gray", (ShapeObject("circle", "red", "large", "top left"),
                       ShapeObject("square", "blue", "small", "bottom")), "above")  # fmt: skip


def _spec(scene: Scene, relation: str) -> SceneSpec:
    return parse_caption(f"a {scene.objects[0].color} {scene.objects[0].shape} {relation} "
                         f"a {scene.objects[1].color} {scene.objects[1].shape}")  # fmt: skip


def test_colour_masks_find_each_object_and_its_centre():
    image = image_to_tensor(render(SCENE, 64))
    colors = torch.tensor([[PALETTE_NAMES.index("red"), PALETTE_NAMES.index("blue")]])
    masks = color_masks(image, colors)
    assert masks.shape == (1, 2, 64, 64) and 0 <= masks.min() and masks.max() <= 1
    found = centres(masks, prior=0.0)[0] * 64  # pixels
    expected = torch.tensor([[p.cx, p.cy] for p in layout(SCENE, 64)])
    print(f"centres {found.tolist()} expected {expected.tolist()}")
    assert torch.allclose(found, expected, atol=0.5)
    # each soft mask holds the pixels of exactly its colour, and about those nearest to it
    # (anti-aliased edge pixels are shared with the background)
    distance = (image[:, None] - PALETTE[None, :, :, None, None]).pow(2).sum(2)  # [1, P, H, W]
    for k in range(2):
        exact = float((distance[0, colors[0, k]] < 1e-6).sum())
        nearest = float((distance.argmin(1) == colors[0, k]).sum())
        print(f"mask {k}: {exact:.0f} pixels of its colour <= area {float(masks[0, k].sum()):.1f} <= {nearest:.0f}")
        assert exact > 20 and exact <= masks[0, k].sum() <= 1.05 * nearest
    empty = color_masks(image, torch.tensor([[PALETTE_NAMES.index("green")]]))
    assert empty.sum() < 1 and centres(empty)[0, 0].tolist() == pytest.approx([0.5, 0.5], abs=0.02)


def test_margins_and_hinges_follow_the_true_relation():
    image = image_to_tensor(render(SCENE, 64)).requires_grad_(True)
    specs = [_spec(SCENE, r) for r in ("above", "below", "left of", "right of")]
    margins = relation_margins(image.expand(4, -1, -1, -1), specs)
    print(f"margins above / below / left of / right of: {margins.tolist()}")
    # the circle is 2 cells above and one cell left of the square (cell centres 1/3 apart)
    assert margins.tolist() == pytest.approx([2 * CELL, -2 * CELL, CELL, -CELL], abs=0.01)
    hinges, _ = relation_reward_loss(image.expand(2, -1, -1, -1), specs[:2])
    assert float(hinges[0]) == 0 and float(hinges[1]) == pytest.approx(3 * CELL, abs=0.01)
    hinges[1].backward()
    assert image.grad.abs().sum() > 0  # the reward reaches the pixels


def test_relation_prompts_are_two_object_captions_with_distinct_colours():
    prompts, specs = relation_prompts(random.Random(0), 40)
    assert len(prompts) == len(specs) == 40 and len(set(prompts)) > 30
    for text, spec in zip(prompts, specs, strict=True):
        assert parse_caption(text) == spec and spec.relation in INVERSE_RELATION
        assert len(spec.objects) == 2 and spec.objects[0].color != spec.objects[1].color


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_predicted_x0_inverts_the_forward_process(prediction_type):
    ac = NoiseSchedule(ScheduleConfig()).alphas_cumprod.float()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([700, 700, 700])
    x_t = q_sample(x0, t, noise, ac)
    target = training_target(prediction_type, x0, noise, t, ac)  # a perfect network's output
    assert torch.allclose(predicted_x0(target, x_t, ac[700], prediction_type), x0, atol=1e-4)


def test_ddim_with_a_perfect_prediction_follows_the_closed_form():
    ac = NoiseSchedule(ScheduleConfig()).alphas_cumprod.float()
    timesteps = torch.linspace(999, 0, 20).round().long()
    x0, start = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x = sample_to_step(lambda x, t: x0, start, timesteps, 5, ac)
    # DDIM keeps the implied noise: x_k = sqrt(a_k) x0 + sqrt(1 - a_k) eps_0
    eps0 = (start - ac[999].sqrt() * x0) / (1 - ac[999]).sqrt()
    t5 = int(timesteps[5])
    assert torch.allclose(x, ac[t5].sqrt() * x0 + (1 - ac[t5]).sqrt() * eps0, atol=1e-4)
    assert sample_to_step(lambda x, t: x0, start, timesteps, 0, ac) is start


def test_relation_reward_options_are_validated(tmp_path):
    from stablediff.train.stages.unet import UNetStage

    with pytest.raises(ValueError, match="relation_reward is for the unet and finetune stages"):
        TrainConfig(stage="text", relation_reward=0.1)
    with pytest.raises(ValueError, match="relation_reward_batch must be >= 1"):
        TrainConfig(stage="unet", relation_reward=0.1, relation_reward_batch=0)
    with pytest.raises(ValueError, match="0 <= from <= to, got 900 and 600"):
        TrainConfig(stage="unet", relation_reward=0.1, relation_reward_from=900, relation_reward_to=600)
    config = TrainConfig(stage="unet", data="shapes", out=str(tmp_path), shapes_size=4, resolution=32, eval_size=4,
                         relation_reward=0.1, relation_reward_from=960, relation_reward_to=990)  # fmt: skip
    with pytest.raises(ValueError, match=r"no step of the relation reward's 20-step sampler lies in \[960, 990\]"):
        UNetStage(config, torch.device("cpu"))


def test_unet_stage_lowers_the_relation_hinge(tmp_path):
    from stablediff.train.stages.unet import UNetStage

    config = TrainConfig(stage="unet", data="shapes", out=str(tmp_path), shapes_size=8, resolution=32, batch_size=4,
                         eval_size=4, relation_reward=1.0, relation_reward_batch=4, relation_reward_from=700,
                         relation_reward_to=999, seed=3)  # fmt: skip
    stage = UNetStage(config, torch.device("cpu"))
    batch = stage.collate([stage.dataset()[i] for i in range(4)])
    optimizer = torch.optim.Adam(stage.unet.parameters(), lr=1e-3)
    hinges = []
    for step in range(15):
        loss, logged = stage.loss(stage.unet, batch, step, torch.Generator().manual_seed(0))
        assert loss.item() == pytest.approx(logged["denoising"] + logged["reward_hinge"], rel=1e-5)
        hinges.append(logged["reward_hinge"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"relation hinge over 15 steps on fixed prompts and noise: {hinges[0]:.3f} -> {hinges[-1]:.3f}")
    assert hinges[-1] < 0.7 * hinges[0]
