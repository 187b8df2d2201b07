"""torch.distributed for the trainer: launch detection, process group, and the few collectives it needs.

A run is distributed when it was started by ``torchrun`` (RANK, WORLD_SIZE and LOCAL_RANK in the
environment) with more than one process. Then the process group is created here with gloo on the
CPU or nccl on CUDA, and destroyed at the end. Every collective below is a no-op for a single
process, so the trainer's code is the same either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """Where this process sits in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # whether `setup` created the process group (and `teardown` destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched() -> tuple[int, int, int] | None:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(n in os.environ for n in names):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def setup(device: torch.device | str | None = None) -> DistEnv:
    """Detect a torchrun launch and join its process group.

    device: where to train; default: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    launch = _launched()
    rank, world_size, local_rank = launch or (0, 1, 0)
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    env = DistEnv(rank, world_size, local_rank, device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        env.owns_group = True
        logger.info("joined process group: rank %d of %d (%s, %s)", rank, world_size, backend, device)
    return env


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if env.device.type == "cuda" else torch.device("cpu")  # nccl needs CUDA tensors


def mean(env: DistEnv, value: float) -> float:
    """The mean of `value` over all processes."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def any_true(env: DistEnv, flag: bool) -> bool:
    """Whether `flag` is true on any process (every process gets the same answer)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_bytes(env: DistEnv, data: torch.Tensor) -> list[torch.Tensor]:
    """Every process's uint8 tensor `data` (all of the same length), in rank order, on the CPU."""
    if not env.distributed:
        return [data]
    local = data.to(_comm_device(env))
    out = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def broadcast_text(env: DistEnv, text: str | None) -> str:
    """Rank 0's `text` on every process."""
    if not env.distributed:
        return text or ""
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0] or ""


def allreduce_grads(env: DistEnv, module: torch.nn.Module) -> None:
    """Average gradients over processes, for a trainable module DDP cannot wrap (one without its own
    `forward`, e.g. an nn.ModuleDict of networks whose members the stage calls directly)."""
    if not env.distributed:
        return
    for param in module.parameters():
        if param.requires_grad:
            if param.grad is None:  # unused here; may be used on another rank: take part with zeros
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad.div_(env.world_size)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each process the summed gradient of its own rows
    (an all-reduce, which gloo has, then a slice: the reduce-scatter that gloo lacks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` (equal shapes), concatenated in rank order; `x` itself outside torchrun.

    Gradients flow back to each process's own rows, summed over the processes' losses; since DDP
    then averages over processes, a loss computed identically on every process from the gathered
    batch trains exactly as one process would on the whole batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(x)


def rank_rows(draw: Callable[[int], torch.Tensor], rows: int) -> torch.Tensor:
    """This process's `rows` rows of a random draw for the whole global batch.

    `draw(n)` draws n rows from the trainer's step generator, which is the same on every process;
    process r keeps rows r, r + W, ... (the rows of the global batch it holds, see RankBatches).
    So the noise of every example is what one process with the whole batch would draw for it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return draw(rows)
    world = dist.get_world_size()
    return draw(rows * world)[dist.get_rank() :: world]


def rank_randn(generator: torch.Generator, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of `shape` (this process's rows first): `rank_rows` of a float32 draw."""
    return rank_rows(lambda n: torch.randn((n, *shape[1:]), generator=generator), shape[0])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(model, "module", model)
