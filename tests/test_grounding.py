"""The grounding loss: regions from shapes captions, token boxes, recorded cross-attention maps,
the loss itself against hand-computed values, and a U-Net run that trains with it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from stablediff.models.unet import UNetModel
from stablediff.nn import attention, attention_with_maps, randomize_
from stablediff.presets import PRESETS
from stablediff.seeds import derive_seed
from stablediff.shapes import Placement, Scene, ShapeObject, ShapesDataset, caption_regions, layout
from stablediff.shapes.captions import object_word_spans
from stablediff.tokenizer import CLIPTokenizer
from stablediff.train.config import TrainConfig
from stablediff.train.data import LatentCacheDataset, encode_latent_cache
from stablediff.train.grounding import box_masks, cross_attention_maps, grounding_loss, token_boxes

TOKENIZER = CLIPTokenizer.default()


def test_object_word_spans_follow_caption_order_and_synonyms():
    text = "against a gray background, a little yellow disc to the right of a blue plus sign"
    spans = object_word_spans(text)
    assert [pair for pair, _ in spans] == [("yellow", "circle"), ("blue", "cross")]
    assert [text[a:b] for a, b in spans[0][1]] == ["little", "yellow", "disc"]
    assert [text[a:b] for a, b in spans[1][1]] == ["blue", "plus sign"]
    with pytest.raises(ValueError, match="unknown words 'mauve'"):
        object_word_spans("a mauve circle")


def test_caption_regions_box_each_object_where_it_was_drawn():
    scene = Scene(
        "white",
        (ShapeObject("circle", "red", "small", "top left"), ShapeObject("square", "blue", "large", "bottom right")),
        "left of",
    )
    placements = layout(scene, 64)  # no jitter: boxes centred on the cells
    text = "a large blue square to the right of a red circle"  # the second object named first
    regions = caption_regions(text, scene, placements, 64)
    words = {text[a:b]: box for a, b, *box in regions}
    assert set(words) == {"large", "blue", "square", "red", "circle"}
    r = 0.08
    assert words["red"] == pytest.approx([1 / 6 - r, 1 / 6 - r, 1 / 6 + r, 1 / 6 + r])
    r = 0.14
    assert words["square"] == pytest.approx([5 / 6 - r, 5 / 6 - r, 5 / 6 + r, 5 / 6 + r])
    with pytest.raises(ValueError, match="names a green circle"):
        caption_regions("a green circle", scene, placements, 64)


def test_shapes_dataset_placements_are_those_of_its_images():
    ds = ShapesDataset(3, seed=5)
    for i in range(3):
        expected = layout(ds.scene(i), 64, random.Random(derive_seed(5, "train", i, "jitter")))
        assert ds.placements(i) == expected and all(isinstance(p, Placement) for p in expected)


def test_token_boxes_ground_the_tokens_of_each_region():
    text = "a red circle above a blue square"
    regions = [[2, 5, 0.0, 0.0, 0.5, 0.5], [26, 32, 0.5, 0.5, 1.0, 1.0]]  # "red", "square"
    boxes, grounded = token_boxes(TOKENIZER, text, regions)
    ids = TOKENIZER(text)
    positions = grounded.nonzero().flatten().tolist()
    assert [ids[p] for p in positions] == TOKENIZER.encode("red") + TOKENIZER.encode("square")
    assert boxes[positions[0]].tolist() == [0.0, 0.0, 0.5, 0.5] and boxes[positions[-1]].tolist() == [0.5, 0.5, 1, 1]
    assert grounded.sum() == len(positions) and not grounded[0]  # BOS never grounded
    with pytest.raises(ValueError, match="word boundaries"):
        token_boxes(TOKENIZER, text, [[3, 5, 0, 0, 1, 1]])  # "ed"
    with pytest.raises(ValueError, match="outside the caption"):
        token_boxes(TOKENIZER, text, [[30, 40, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"\[start, end, x0, y0, x1, y1\]"):
        token_boxes(TOKENIZER, text, [[2, 5, 0, 0]])


def test_box_masks_are_area_coverage():
    masks = box_masks(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.0, 0.75, 0.5], [0.1, 0.1, 0.2, 0.2]]), 4, 4)
    assert masks.shape == (3, 16)
    assert torch.equal(masks[0], torch.ones(16))
    assert masks[1].view(4, 4).tolist() == [[0, 1, 1, 0]] * 2 + [[0, 0, 0, 0]] * 2
    # A box inside one pixel covers its area in pixel units: (0.1 * 4)^2.
    assert masks[2].sum().item() == pytest.approx(0.16) and masks[2][0].item() == pytest.approx(0.16)


def test_attention_with_maps_matches_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 32, generator=g) for n in (16, 7, 7))
    out, maps = attention_with_maps(q, k, v, heads=4)
    diff = (out - attention(q, k, v, heads=4)).abs().max().item()
    print(f"attention_with_maps vs attention: max |diff| {diff:.2e}")
    assert diff < 1e-5
    assert maps.shape == (2, 16, 7) and torch.allclose(maps.sum(-1), torch.ones(2, 16))


def test_cross_attention_maps_records_every_text_attention_layer():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].unet
    unet = randomize_(UNetModel(cfg), torch.Generator().manual_seed(0)).eval()  # no zero-initialised outputs
    x, context = torch.randn(2, cfg.in_channels, 16, 16), torch.randn(2, 77, cfg.context_dim)
    with torch.no_grad():
        plain = unet(x, 10.0, context)
        with cross_attention_maps(unet) as maps:
            recorded = unet(x, 10.0, context)
    print(f"recording vs plain forward: max |diff| {(plain - recorded).abs().max().item():.2e}")
    assert torch.allclose(plain, recorded, atol=1e-5)
    n_layers = sum(name.endswith("attn2") for name, _ in unet.named_modules())
    assert len(maps) == n_layers > 0
    assert all(m.shape[0] == 2 and m.shape[2] == 77 and 256 % m.shape[1] == 0 for m in maps)
    assert all(layer.maps is None for name, layer in unet.named_modules() if name.endswith("attn2"))


def test_grounding_loss_against_hand_computed_values():
    grounded = torch.tensor([[False, True, True], [False, False, False]])
    boxes = torch.zeros(2, 3, 4)
    boxes[0, 1] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # top-left quarter of a 4x4 map
    boxes[0, 2] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    attn = torch.full((2, 16, 3), 1 / 3)  # each pixel spreads its attention evenly over 3 tokens
    loss = grounding_loss([attn], boxes, grounded, (8, 8))  # a 4x4 map of an 8x8 latent
    # token 1: a quarter of its mass in its box -> (1 - 1/4)^2; token 2: all of it -> 0.
    assert loss.tolist() == pytest.approx([(0.75**2 + 0.0) / 2, 0.0])
    inside = torch.zeros(2, 16, 3)
    inside[:, :, 0] = 1.0
    inside[0, [0, 1, 4, 5], 0], inside[0, [0, 1, 4, 5], 1] = 0.0, 1.0  # token 1 only inside its box
    inside[0, :, 2], inside[0, :, 0] = 0.5, inside[0, :, 0] * 0.5
    assert grounding_loss([inside], boxes, grounded, (8, 8))[0].item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="no downsampling"):
        grounding_loss([torch.full((2, 15, 3), 1 / 3)], boxes, grounded, (8, 8))
    attn = attn.clone().requires_grad_(True)
    grounding_loss([attn], boxes, grounded, (8, 8)).sum().backward()
    assert attn.grad is not None and attn.grad[0].abs().sum() > 0 and attn.grad[1].abs().sum() == 0


def test_latent_cache_stores_regions(tmp_path):
    from stablediff.models.vae import AutoencoderKL
    from stablediff.train.data import ShapesPairs
    from stablediff.train.stages.vae import VAE_SIZES

    vae = AutoencoderKL(VAE_SIZES["tiny"])
    pairs = ShapesPairs(3, 0, 32, regions=True)
    encode_latent_cache(pairs, vae, tmp_path / "cache.safetensors")
    cache = LatentCacheDataset(tmp_path / "cache.safetensors", regions=True)
    latent, text, regions = cache[1]
    assert text == pairs[1][1] and regions == json.loads(json.dumps(pairs[1][2])) and len(regions) >= 2
    dropped = LatentCacheDataset(tmp_path / "cache.safetensors", regions=True, caption_dropout=1.0)
    assert dropped[1][1:] == ("", [])
    encode_latent_cache(ShapesPairs(3, 0, 32), vae, tmp_path / "plain.safetensors")
    assert len(LatentCacheDataset(tmp_path / "plain.safetensors")[0]) == 2
    with pytest.raises(ValueError, match="stores no grounding regions"):
        LatentCacheDataset(tmp_path / "plain.safetensors", regions=True)


def test_grounding_options_are_validated():
    with pytest.raises(ValueError, match="grounding_weight is for the unet and finetune stages"):
        TrainConfig(stage="vae", grounding_weight=0.1)
    with pytest.raises(ValueError, match="gradient_checkpointing off"):
        TrainConfig(stage="unet", grounding_weight=0.1, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="grounding_weight must be >= 0"):
        TrainConfig(stage="unet", grounding_weight=-1.0)


def test_grounding_needs_data_with_regions(tmp_path):
    from stablediff.train.stages.unet import UNetStage

    (tmp_path / "a.png").write_bytes(b"")
    config = TrainConfig(stage="unet", data=str(tmp_path), out=str(tmp_path / "run"), grounding_weight=0.1)
    with pytest.raises(ValueError, match="the captioned folder .* has none"):
        UNetStage(config, torch.device("cpu"))


def test_unet_stage_trains_with_the_grounding_loss(tmp_path):
    from stablediff.train.data import CaptionDropout
    from stablediff.train.stages.unet import UNetStage

    config = TrainConfig(
        stage="unet",
        data="shapes",
        out=str(tmp_path),
        shapes_size=8,
        resolution=32,
        batch_size=4,
        eval_size=4,
        caption_dropout=0.5,
        grounding_weight=0.5,
        seed=3,
    )
    stage = UNetStage(config, torch.device("cpu"))
    items = [stage.dataset()[i] for i in range(8)]
    assert isinstance(stage.dataset(), CaptionDropout)
    assert all(len(item) == 3 for item in items) and all(bool(text) == bool(r) for _, text, r in items)
    batch = stage.collate(items)
    assert batch["boxes"].shape == (8, 77, 4) and batch["grounded"].any(1).tolist() == [bool(t) for _, t, _ in items]
    optimizer = torch.optim.Adam(stage.unet.parameters(), lr=1e-3)
    losses = []
    for step in range(12):
        loss, logged = stage.loss(stage.unet, batch, step, torch.Generator().manual_seed(0))
        assert loss.item() == pytest.approx(logged["denoising"] + 0.5 * logged["grounding"], rel=1e-5)
        losses.append(logged["grounding"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"grounding loss over 12 steps on one batch: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    assert "boxes" not in stage.collate([item[:2] for item in items])  # held-out items carry no regions
    scenes = CaptionDropout(ShapesDataset(2, seed=3, size=32), 0.0, 0)  # a Scene as third element is no region
    assert len(scenes[0]) == 2
