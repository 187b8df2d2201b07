"""The relation reward: a signal about the layout that the model itself samples.

Whether two objects stand in the asked relation is decided over the first sampling steps, and a
per-timestep denoising loss tells the model almost nothing about it (docs/model-card.md, "Why
two-object relations fail"). Here the model samples shapes-world prompts with DDIM and classifier-
free guidance, without gradients, down to a step drawn from the noisy range where the layout is
being decided; at that step its guided prediction of the clean latent is decoded and scored, with
gradients: the colour of every pixel says which named object it belongs to (a softmax over the
palette and the backgrounds), each object's centre of mass follows, and a hinge asks the second
object to lie a cell further along the relation's axis than the first. This is ReFL (Xu et al.
2023, ImageReward) with a differentiable, exact reward instead of a learnt one, drawn at the
noisy steps instead of the last ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from stablediff.train.captions import SceneSpec, caption, parse_caption
from stablediff.train.shapes import BACKGROUNDS, COLORS, sample_scene

# The relation's axis (0: x, 1: y, image coordinates growing right and down) and the sign with
# which the second object's coordinate minus the first's must be positive.
RELATION_AXES: dict[str, tuple[int, float]] = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0),
                                               "below": (1, -1.0)}  # fmt: skip
PALETTE_NAMES: tuple[str, ...] = (*COLORS, *(f"background {b}" for b in BACKGROUNDS))
PALETTE = torch.tensor([*COLORS.values(), *BACKGROUNDS.values()], dtype=torch.float32) / 127.5 - 1  # [-1, 1]
REWARD_SAMPLER_STEPS = 20  # as the evaluation samples
CELL = 1 / 3  # a grid cell, in fractions of the side: the margin the hinge asks for


def relation_prompts(rng: random.Random, n: int) -> tuple[list[str], list[SceneSpec]]:
    """`n` random training captions of two-object scenes whose objects differ in colour (the
    reward tells objects apart by colour), and their specs (objects in caption order)."""
    prompts, specs = [], []
    while len(prompts) < n:
        scene = sample_scene(rng, "train", n_objects=2)
        if scene.objects[0].color == scene.objects[1].color:
            continue
        text = caption(scene, rng)
        prompts.append(text)
        specs.append(parse_caption(text))
    return prompts, specs


def color_masks(images: torch.Tensor, colors: torch.Tensor, sharpness: float = 0.15) -> torch.Tensor:
    """[B, K, H, W]: how much each pixel of `images` [B, 3, H, W] (in [-1, 1]) is of the colour
    `colors` [B, K] (indices into PALETTE): a softmax over the palette and the backgrounds of
    -squared distance / (2 sharpness^2), so every pixel is shared out among the colours it is near."""
    palette = PALETTE.to(images.device)
    distance = (images[:, None] - palette[None, :, :, None, None]).pow(2).sum(2)  # [B, P, H, W]
    share = torch.softmax(-distance / (2 * sharpness**2), dim=1)
    return torch.stack([share[torch.arange(len(images)), colors[:, k]] for k in range(colors.shape[1])], 1)


def centres(masks: torch.Tensor, prior: float = 1.0) -> torch.Tensor:
    """[B, K, 2] (x, y) centres of mass of `masks` [B, K, H, W] in fractions of the side; `prior`
    pixels' worth of mass at the centre keeps an empty mask's centre defined (at 0.5, 0.5)."""
    h, w = masks.shape[-2:]
    ys = (torch.arange(h, device=masks.device, dtype=masks.dtype) + 0.5) / h
    xs = (torch.arange(w, device=masks.device, dtype=masks.dtype) + 0.5) / w
    mass = masks.sum((-2, -1)) + prior
    x = ((masks.sum(-2) * xs).sum(-1) + 0.5 * prior) / mass
    y = ((masks.sum(-1) * ys).sum(-1) + 0.5 * prior) / mass
    return torch.stack([x, y], -1)


def relation_margins(images: torch.Tensor, specs: list[SceneSpec]) -> torch.Tensor:
    """[B]: how far (fractions of the side) the second object's colour lies beyond the first's
    along each spec's relation; > 0 where the relation holds for the centres of mass."""
    colors = torch.tensor([[PALETTE_NAMES.index(o.color) for o in s.objects] for s in specs], device=images.device)
    c = centres(color_masks(images.float(), colors))  # [B, 2, 2]
    axes = torch.tensor([RELATION_AXES[s.relation][0] for s in specs], device=images.device)
    signs = torch.tensor([RELATION_AXES[s.relation][1] for s in specs], device=images.device)
    rows = torch.arange(len(specs), device=images.device)
    return signs * (c[rows, 1, axes] - c[rows, 0, axes])


def relation_reward_loss(images: torch.Tensor, specs: list[SceneSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample hinge [B] max(0, CELL - margin) (0 once the objects are a cell apart in the
    right order) and the margins [B]."""
    margins = relation_margins(images, specs)
    return torch.relu(CELL - margins), margins


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:  # fmt: skip
    """The clean latent a network output implies at x_t (VP frame; `alpha_cumprod` a scalar tensor)."""
    a, s = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    if prediction_type == "eps":
        return (x_t - s * output) / a
    if prediction_type == "v":
        return a * x_t - s * output
    return output


def sample_to_step(guided: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, timesteps: torch.Tensor,
                   stop: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """DDIM (eta 0) from noise `x` through `timesteps` [N] (decreasing) up to index `stop`: x at
    timesteps[stop]. `guided(x, t)`: the guided clean-latent prediction at timestep t."""
    for i in range(stop):
        t, t_next = int(timesteps[i]), int(timesteps[i + 1])
        a, a_next = alphas_cumprod[t], alphas_cumprod[t_next]
        x0 = guided(x, t)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


__all__ = ["CELL", "PALETTE", "PALETTE_NAMES", "RELATION_AXES", "REWARD_SAMPLER_STEPS", "centres", "color_masks",
           "predicted_x0", "relation_margins", "relation_prompts", "relation_reward_loss", "sample_to_step"]
