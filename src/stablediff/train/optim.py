"""What the trainer optimises with: AdamW parameter groups, the warm-up + cosine LR schedule, EMA.

The LR schedule is a pure function of the optimizer-step index (no hidden state beyond it), so a
resumed run recomputes exactly the learning rates the uninterrupted run would have used.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from stablediff.train.config import TrainConfig


def param_groups(module: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: matrices and convolution kernels decay; biases, norm scales and other 1-D
    parameters do not (decaying a norm's scale towards 0 only fights the normalisation). A parameter
    whose name starts with a key of `lr_scales` learns at that multiple of the run's lr (its group's
    "lr_scale"); the unscaled groups come first, in the order older checkpoints saved them."""
    scales = {1.0: None, **{s: None for s in (lr_scales or {}).values()}}
    groups = {(scale, decay): [] for scale in scales for decay in (True, False)}
    for name, param in module.named_parameters():
        if param.requires_grad:
            scale = next((s for prefix, s in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
            groups[scale, param.ndim >= 2].append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (scale, decay), params in groups.items()
        if params
    ]


def make_optimizer(
    module: nn.Module, config: TrainConfig, lr_scales: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `module` with the run's lr, betas and weight decay
    (`param_groups` says what `lr_scales` does)."""
    groups = param_groups(module, config.weight_decay, lr_scales)
    if not groups:
        raise ValueError("the stage's trainable module has no parameters that require gradients")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up from lr / warmup_steps to lr
    over `warmup_steps`, then a half cosine from lr down to lr * lr_min_ratio at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr_min_ratio
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class WarmupCosine:
    """Sets each param group's lr from `lr_at(step)`; its state is the step it is at."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig):
        self.optimizer, self.config = optimizer, config
        self.step_index = 0

    def apply(self, step: int) -> float:
        """Set the learning rate for optimizer step `step` (times each group's "lr_scale"); returns it."""
        self.step_index = step
        lr = lr_at(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"kind": "warmup_cosine", "step": self.step_index, "lr": lr_at(self.step_index, self.config)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "warmup_cosine":
            raise ValueError(f"LR schedule state of kind {state.get('kind')!r}, expected 'warmup_cosine'")
        self.apply(int(state["step"]))


class EMA:
    """An exponential moving average of a module's parameters, kept as an fp32 copy in eval mode.

    ``ema = d * ema + (1 - d) * param`` after every optimizer step, with the warm-up of diffusers'
    EMAModel: ``d = min(decay, (1 + n) / (10 + n))`` for the n-th update, so early weights (random
    at n = 0) are forgotten quickly in short runs. Buffers are copied, not averaged.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach().float() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)  # ema += (1 - d) * (param - ema)
        for ema_buf, buf in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_buf.copy_(buf)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state, strict=True)
        self.updates = updates
