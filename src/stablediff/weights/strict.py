"""Strict loading of a state dict into a module built on the meta device.

Every key must be present with the right shape: the first problem is reported by name with both
shapes. Tensors are moved into the module with `assign=True`, one at a time, so loading never
holds two copies of the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from stablediff.errors import BadFileError


class WeightMismatchError(BadFileError):
    """The weights do not fit the model: names the first bad key and both shapes (or dtypes)."""


def check_state_dict(
    expected: dict[str, torch.Tensor],
    given: dict[str, torch.Tensor],
    what: str,
) -> None:
    """Keys a format stores but the model does not have (such as `position_ids`) are dropped by
    that format's converter in convert.py, explicitly; anything else is an error here."""
    for key, ref in expected.items():
        if key not in given:
            raise WeightMismatchError(f"{what}: key {key!r} (shape {tuple(ref.shape)}) is missing from the checkpoint")
        if tuple(given[key].shape) != tuple(ref.shape):
            raise WeightMismatchError(
                f"{what}: key {key!r} has shape {tuple(given[key].shape)} in the checkpoint "
                f"but {tuple(ref.shape)} in the model"
            )
        if given[key].is_floating_point() != ref.is_floating_point():  # an integer tensor for a weight
            raise WeightMismatchError(
                f"{what}: key {key!r} has dtype {given[key].dtype} in the checkpoint but the model needs "
                f"{'a floating-point' if ref.is_floating_point() else 'a non-floating'} dtype like {ref.dtype}"
            )
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightMismatchError(
            f"{what}: unexpected key {unexpected[0]!r} (shape {tuple(given[unexpected[0]].shape)}){more} "
            "is not part of the model"
        )


def load_strict(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    what: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill `module` (usually on the meta device) from `state_dict`, consuming the dict.

    Floating tensors are cast to `dtype` when given. Raises WeightMismatchError naming the first
    missing, unexpected or wrongly shaped key.
    """
    expected = module.state_dict()
    check_state_dict(expected, state_dict, what)
    for key in list(state_dict):
        # pop-then-convert: the source tensor is released as soon as its copy exists.
        t = state_dict.pop(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state_dict[key] = t.to(device)
    module.load_state_dict(state_dict, strict=True, assign=True)
    state_dict.clear()
    return module
