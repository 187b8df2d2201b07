"""The three kinds of adapter, as torch modules holding trainable parameters.

Each adapter belongs to one ``nn.Linear`` or ``nn.Conv2d`` of the model and computes what it adds
to that module's output for the same input, scaled by ``alpha / rank`` (kohya's and A1111's rule;
PEFT's ``lora_alpha / r`` is the same thing):

- ``LoraAdapter``: ``up(down(x))``, ``down`` with the module's kernel, stride and padding (or a 1x1
  ``down`` then a ``mid`` with the module's kernel: LoCon's CP form), ``up`` 1x1;
- ``LohaAdapter``: ``dW = (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product; with ``t1``/``t2`` each
  factor is a Tucker product instead);
- ``LokrAdapter``: ``dW = kron(w1, w2)``, either factor possibly a low-rank product, ``w2`` possibly
  a Tucker product.

``build_adapter`` checks every tensor's shape against the module before anything is computed, so a
file cannot make us allocate more than its own tensors and one weight-sized delta. Parameters take
the module's dtype and device; the forward pass computes in the input's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.lora.formats import ModuleEntry

__all__ = ["Adapter", "LoraAdapter", "LohaAdapter", "LokrAdapter", "Misfit", "build_adapter"]


class Misfit(ValueError):
    """A file's tensors do not fit the module they name (the message says how)."""


class _Geometry:
    """The adapted module's shape: out/in widths, kernel (None for Linear) and conv arguments."""

    def __init__(self, module: nn.Module):
        w = module.weight
        self.shape = tuple(w.shape)
        self.out, self.inp = self.shape[:2]
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros":
                raise Misfit("grouped or non-zero-padded convolutions cannot take a LoRA")
            self.kernel = tuple(module.kernel_size)
            self.conv_args = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
        else:
            self.kernel, self.conv_args = None, None
        self.fan_in = self.inp * math.prod(self.kernel or (1,))
        self.desc = f"{type(module).__name__} weight {list(self.shape)}"

    def check_rank(self, rank: int, what: str) -> None:
        # A rank above both widths adds nothing a smaller one could not, and only costs memory.
        limit = max(self.out, self.fan_in)
        if not 1 <= rank <= limit:
            raise Misfit(
                f"{what} has rank {rank}; the {self.desc} allows 1 to {limit} "
                "(the larger of its output and input widths)"
            )


class Adapter(nn.Module):
    """What all adapters share: alpha, rank, the scale, and the module geometry."""

    kind = ""
    _suffix = ""  # the file names of LyCORIS tensors: hada_w1_a, lokr_w1, ...

    def __init__(self, geometry: _Geometry, alpha: float | None):
        super().__init__()
        self.shape, self.conv_args = geometry.shape, geometry.conv_args
        self.alpha = alpha  # None: the scale is 1 (kohya, A1111 and diffusers agree)

    @property
    def rank(self) -> int | None:
        raise NotImplementedError

    @property
    def scale(self) -> float:
        rank = self.rank
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * dW``, shaped as the module's weight, computed in ``dtype`` (default: the
        parameters' own)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the module's output for input ``x``."""
        w = self.delta_weight(x.dtype)
        return F.linear(x, w) if self.conv_args is None else F.conv2d(x, w, **self.conv_args)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under their kohya / LyCORIS suffixes (without alpha)."""
        return {self._suffix + role: p for role, p in self.named_parameters(recurse=False)}

    def _add(self, role: str, tensor: torch.Tensor | None, like: torch.Tensor) -> None:
        value = None if tensor is None else nn.Parameter(tensor.to(device=like.device, dtype=like.dtype))
        self.register_parameter(role, value)


class LoraAdapter(Adapter):
    kind = "lora"

    def __init__(self, geometry: _Geometry, down, up, mid, alpha, like: torch.Tensor):
        super().__init__(geometry, alpha)
        self._add("down", down, like)
        self._add("up", up, like)
        self._add("mid", mid, like)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv_args is None:
            return F.linear(F.linear(x, down), up) * self.scale
        if self.mid is None:
            h = F.conv2d(x, down, **self.conv_args)
        else:
            h = F.conv2d(F.conv2d(x, down), self.mid.to(x.dtype), **self.conv_args)
        return F.conv2d(h, up) * self.scale

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.down.dtype
        up, down = self.up.to(dtype).flatten(1), self.down.to(dtype).flatten(1)
        if self.mid is None:
            delta = up @ down
        else:
            delta = torch.einsum("nmhw,in,mj->ijhw", self.mid.to(dtype), up, down)
        return delta.reshape(self.shape) * self.scale

    def file_tensors(self) -> dict[str, torch.Tensor]:
        names = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}
        return {names[role]: p for role, p in self.named_parameters(recurse=False)}


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker product: core t [r, r', kh, kw], wa [r, out], wb [r', in] -> [out, in, kh, kw]."""
    return torch.einsum("ijhw,ip,jr->prhw", t, wa, wb)


class LohaAdapter(Adapter):
    kind = "loha"
    _suffix = "hada_"

    def __init__(self, geometry: _Geometry, tensors: dict, alpha, like: torch.Tensor):
        super().__init__(geometry, alpha)
        for role in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"):
            self._add(role, tensors.get(role), like)

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.w1_a.dtype
        w = {role: p.to(dtype) for role, p in self.named_parameters(recurse=False)}
        if "t1" in w:
            delta = _tucker(w["t1"], w["w1_a"], w["w1_b"]) * _tucker(w["t2"], w["w2_a"], w["w2_b"])
        else:
            delta = (w["w1_a"] @ w["w1_b"].flatten(1)) * (w["w2_a"] @ w["w2_b"].flatten(1))
        return delta.reshape(self.shape) * self.scale


class LokrAdapter(Adapter):
    kind = "lokr"
    _suffix = "lokr_"

    def __init__(self, geometry: _Geometry, tensors: dict, alpha, like: torch.Tensor):
        super().__init__(geometry, alpha)
        for role in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"):
            self._add(role, tensors.get(role), like)

    @property
    def rank(self) -> int | None:
        # A1111's rule: the rank of a low-rank w2, else of w1; both full: no rank, scale 1.
        for p in (self.w2_b, self.w1_b):
            if p is not None:
                return p.shape[0]
        return None

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or next(self.parameters()).dtype
        w = {role: p.to(dtype) for role, p in self.named_parameters(recurse=False)}
        w1 = w["w1"] if "w1" in w else w["w1_a"] @ w["w1_b"]
        if "w2" in w:
            w2 = w["w2"]
        elif "t2" in w:
            w2 = _tucker(w["t2"], w["w2_a"], w["w2_b"])
        else:
            w2 = w["w2_a"] @ w["w2_b"]
        if len(self.shape) == 4:  # w2 carries the kernel: [b, d, kh, kw]
            w2 = w2.reshape(w2.shape[0], -1, *self.shape[2:])
            w1 = w1[:, :, None, None]
        # torch.kron views its inputs, and an einsum result may not be contiguous
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(self.shape) * self.scale


# ---------------------------------------------------------------------------------------------
# Building from a file's entry, shapes first.


def build_adapter(entry: ModuleEntry, module: nn.Module) -> Adapter:
    """The adapter for ``entry`` on ``module``; raises Misfit naming both shapes when they do not fit."""
    g = _Geometry(module)
    t = entry.tensors
    if entry.kind == "lora":
        down, up, mid = _lora_shapes(t["down"], t["up"], t.get("mid"), g)
        alpha = entry.alpha
        if alpha is not None and entry.rslora:  # alpha / sqrt(r) == (alpha * sqrt(r)) / r
            alpha *= math.sqrt(down.shape[0])
        return LoraAdapter(g, down, up, mid, alpha, module.weight)
    if entry.kind == "loha":
        _loha_shapes(t, g)
        return LohaAdapter(g, t, entry.alpha, module.weight)
    _lokr_shapes(t, g)
    return LokrAdapter(g, t, entry.alpha, module.weight)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _expect(ok: bool, what: str, t: torch.Tensor, g: _Geometry, expected: str) -> None:
    if not ok:
        raise Misfit(f"{what} has shape {_shape(t)}, which does not fit the {g.desc}: expected {expected}")


def _lora_shapes(down, up, mid, g: _Geometry):
    """down, up, mid reshaped to the module's kind: 2-D for Linear, 4-D for Conv2d."""
    rank = down.shape[0] if down.ndim else 0
    g.check_rank(rank, "lora_down")
    if g.kernel is None:
        if mid is not None:
            raise Misfit(f"lora_mid (LoCon's CP form) is for convolutions, not a {g.desc}")
        _expect(_is_matrix(down, (rank, g.inp)), "lora_down", down, g, f"[{rank}, {g.inp}]")
        _expect(_is_matrix(up, (g.out, rank)), "lora_up", up, g, f"[{g.out}, {rank}]")
        return down.reshape(rank, g.inp), up.reshape(g.out, rank), None
    if mid is not None:
        inner = mid.shape[0] if mid.ndim == 4 else 0
        _expect(_is_matrix(down, (rank, g.inp)), "lora_down", down, g, f"[{rank}, {g.inp}, 1, 1] with lora_mid")
        g.check_rank(inner, "lora_mid")
        _expect(tuple(mid.shape) == (inner, rank, *g.kernel), "lora_mid", mid, g, f"[rank, {rank}, {g.kernel}]")
        _expect(_is_matrix(up, (g.out, inner)), "lora_up", up, g, f"[{g.out}, {inner}, 1, 1]")
        return down.reshape(rank, g.inp, 1, 1), up.reshape(g.out, inner, 1, 1), mid
    if g.kernel == (1, 1):
        _expect(_is_matrix(down, (rank, g.inp)), "lora_down", down, g, f"[{rank}, {g.inp}, 1, 1]")
    else:
        _expect(tuple(down.shape) == (rank, g.inp, *g.kernel), "lora_down", down, g, f"[{rank}, {g.inp}, {g.kernel}]")
    _expect(_is_matrix(up, (g.out, rank)), "lora_up", up, g, f"[{g.out}, {rank}, 1, 1]")
    return down.reshape(rank, g.inp, *g.kernel), up.reshape(g.out, rank, 1, 1), None


def _is_matrix(t: torch.Tensor, shape: tuple[int, int]) -> bool:
    """``t`` is ``shape``, or ``shape`` + (1, 1) (a 1x1 convolution's weight)."""
    return tuple(t.shape) in (shape, (*shape, 1, 1))


def _loha_shapes(t: dict, g: _Geometry) -> None:
    for n in ("1", "2"):
        a, b = t[f"w{n}_a"], t[f"w{n}_b"]
        core = t.get(f"t{n}")
        if core is None:
            rank = b.shape[0] if b.ndim else 0
            g.check_rank(rank, f"hada_w{n}_b")
            _expect(tuple(a.shape) == (g.out, rank), f"hada_w{n}_a", a, g, f"[{g.out}, {rank}]")
            ok = tuple(b.shape) == (rank, g.fan_in) or (b.ndim == 4 and tuple(b.shape) == (rank, *g.shape[1:]))
            _expect(ok, f"hada_w{n}_b", b, g, f"[{rank}, {g.fan_in}]")
            continue
        if g.kernel is None or core.ndim != 4:
            raise Misfit(f"hada_t{n} has shape {_shape(core)}: a Tucker core is [r, r, kh, kw], for convolutions")
        r1, r2 = core.shape[:2]
        g.check_rank(max(r1, r2), f"hada_t{n}")
        _expect(tuple(core.shape[2:]) == g.kernel, f"hada_t{n}", core, g, f"[{r1}, {r2}, {g.kernel}]")
        _expect(tuple(a.shape) == (r1, g.out), f"hada_w{n}_a", a, g, f"[{r1}, {g.out}] with hada_t{n}")
        _expect(tuple(b.shape) == (r2, g.inp), f"hada_w{n}_b", b, g, f"[{r2}, {g.inp}] with hada_t{n}")


def _lokr_shapes(t: dict, g: _Geometry) -> None:
    """w1 [a, c] and w2 [b, d(, kh, kw)] with a * b = out and c * d = in, checked factor by factor."""
    if "w1" in t:
        w1 = t["w1"]
        if w1.ndim != 2:
            raise Misfit(f"lokr_w1 has shape {_shape(w1)}; it must be a matrix")
        a, c = w1.shape
    else:
        w1a, w1b = t["w1_a"], t["w1_b"]
        if w1a.ndim != 2 or w1b.ndim != 2 or w1a.shape[1] != w1b.shape[0]:
            raise Misfit(f"lokr_w1_a {_shape(w1a)} and lokr_w1_b {_shape(w1b)} do not multiply")
        g.check_rank(w1b.shape[0], "lokr_w1_b")
        a, c = w1a.shape[0], w1b.shape[1]
    if a < 1 or c < 1 or g.out % a or g.inp % c:
        raise Misfit(f"LoKr's first factor is [{a}, {c}], which does not divide the {g.desc}")
    b, d = g.out // a, g.inp // c
    kernel = g.kernel or ()
    if "w2" in t:
        w2 = t["w2"]
        ok = tuple(w2.shape) == (b, d, *kernel) or (g.kernel == (1, 1) and tuple(w2.shape) == (b, d))
        _expect(ok, "lokr_w2", w2, g, f"[{b}, {d}{''.join(f', {k}' for k in kernel)}] (the weight over [{a}, {c}])")
        return
    w2a, w2b, core = t["w2_a"], t["w2_b"], t.get("t2")
    rank = w2b.shape[0] if w2b.ndim else 0
    g.check_rank(rank, "lokr_w2_b")
    if core is None:
        _expect(tuple(w2a.shape) == (b, rank), "lokr_w2_a", w2a, g, f"[{b}, {rank}]")
        fan = d * math.prod(kernel)
        _expect(tuple(w2b.shape) == (rank, fan), "lokr_w2_b", w2b, g, f"[{rank}, {fan}]")
        return
    if g.kernel is None or core.ndim != 4:
        raise Misfit(f"lokr_t2 has shape {_shape(core)}: a Tucker core is [r, r, kh, kw], for convolutions")
    _expect(tuple(core.shape[2:]) == g.kernel, "lokr_t2", core, g, f"[r, r, {g.kernel}]")
    g.check_rank(core.shape[0], "lokr_t2")
    _expect(tuple(w2a.shape) == (core.shape[0], b), "lokr_w2_a", w2a, g, f"[{core.shape[0]}, {b}] with lokr_t2")
    _expect(tuple(w2b.shape) == (core.shape[1], d), "lokr_w2_b", w2b, g, f"[{core.shape[1]}, {d}] with lokr_t2")
