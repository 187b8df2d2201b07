"""The training loop shared by every stage: `train(stage, config, resume, progress) -> exported path`.

Per optimizer step: ``grad_accum`` micro-batches (each the next global batch of the data order,
this process's strided share of it), the stage's loss under bf16 autocast when asked, backward
(DDP synchronises gradients on the last micro-batch only), clipping, AdamW with a warm-up +
cosine LR, EMA. A non-finite loss or gradient norm anywhere stops the run (``nonfinite=stop``,
before anything is saved) or skips the optimizer step on every process (``skip``).

Randomness: the loss of micro-batch ``m`` of step ``s`` on rank ``r`` gets a CPU generator seeded
by (seed, "loss", r, s, m), so it needs no state to resume; the global torch RNG (dropout, ...) is
seeded per rank at the start and carried in checkpoints. Data order: see train/order.py.

Only rank 0 writes: config.json, metrics.jsonl, eval.json, loss.png, samples/, checkpoints/ and
the export; the other processes wait at a barrier around saves, evaluations and samples.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stablediff.seeds import derive_seed
from stablediff.train import checkpoint as ckpt
from stablediff.train import distributed as dist_env
from stablediff.train.checkpoint import NonFiniteError
from stablediff.train.config import TrainConfig
from stablediff.train.exports import EXPORT_DIR
from stablediff.train.optim import EMA, WarmupCosine, make_optimizer
from stablediff.train.order import EpochItems, Position, batch_order
from stablediff.train.runlog import RunLog
from stablediff.train.stage import Stage
from stablediff.train.stages import get_stage

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, dict], None]
StageLike = Stage | Callable[[TrainConfig, torch.device], Stage] | str | None

SAMPLES_DIR = "samples"


def _make_stage(stage: StageLike, config: TrainConfig, device: torch.device) -> Stage:
    if isinstance(stage, Stage):
        return stage
    if stage is None or isinstance(stage, str):
        stage = get_stage(stage or config.stage)
        if not issubclass(stage, Stage):
            raise ValueError(
                f"stage {stage.name!r} is not trained by gradient steps: use {stage.__name__}(config).fit(out_dir)"
            )
    built = stage(config, device)
    if not isinstance(built, Stage):
        raise TypeError(f"the stage factory returned a {type(built).__name__}, not a Stage")
    return built


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 and up); on AVX2 each op is emulated."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _seed(*parts: object) -> int:
    return derive_seed(*parts) % (2**63)  # torch.manual_seed wants a signed 64-bit value


def _rng_states(env: dist_env.DistEnv) -> dict[str, torch.Tensor]:
    """Every process's torch RNG states, as uint8 tensors named `cpu.rank{r}` / `cuda.rank{r}`."""
    out = {f"cpu.rank{r}": s for r, s in enumerate(dist_env.gather_bytes(env, torch.get_rng_state()))}
    if env.device.type == "cuda":
        states = dist_env.gather_bytes(env, torch.cuda.get_rng_state(env.device))
        out.update({f"cuda.rank{r}": s for r, s in enumerate(states)})
    return out


class _Run:
    """One call of `train`: the state of the loop and the pieces it drives."""

    def __init__(
        self,
        stage: StageLike,
        config: TrainConfig,
        resume: str | None,
        progress: Progress | None,
        env: dist_env.DistEnv,
        until: int | None,
    ):
        if not config.out:
            raise ValueError("config.out (the run folder, --out) is required")
        self.config, self.env, self.progress = config, env, progress
        self.run_dir = Path(config.out)
        self.end = config.steps if until is None else min(until, config.steps)
        self.checkpoint = self._find_checkpoint(resume)
        self.stage = _make_stage(stage, config, env.device)
        self.dataset = self.stage.dataset()
        if len(self.dataset) == 0:
            raise ValueError(f"training data {config.data!r} is empty: no examples to train on")
        # examples per epoch of the data order (more than the data set's size with buckets)
        self.epoch_size = self._order(Position()).epoch_size
        self.module = self.stage.trainable().to(env.device)
        for sub in self.module.modules():  # activation checkpointing, for networks that support it
            if hasattr(sub, "gradient_checkpointing"):
                sub.gradient_checkpointing = config.gradient_checkpointing
        self.module.train()
        self.ema = EMA(self.module, config.ema_decay) if config.ema_decay > 0 else None
        self.optimizer = make_optimizer(self.module, config, self.stage.lr_scales())
        self.schedule = WarmupCosine(self.optimizer, config)
        self.step, self.skipped, self.position = 0, 0, Position()
        if config.mixed_precision == "bf16" and env.device.type == "cpu" and not cpu_has_fast_bf16():
            logger.warning(
                "mixed_precision='bf16' on a CPU without bf16 kernels (%s): autocast emulates it, "
                "many times slower than float32; set mixed_precision='no'",
                torch.backends.cpu.get_cpu_capability(),
            )
        if self.checkpoint is not None:
            self._restore(ckpt.load_checkpoint(self.checkpoint, config))
        else:
            torch.manual_seed(_seed(config.seed, "torch", env.rank))
        self.log = RunLog(self.run_dir, env.is_main, self.step if self.checkpoint else None)
        if env.is_main:
            config.save(self.run_dir / "config.json")
        self.model: nn.Module = self.module
        self.manual_sync = False
        if env.distributed:
            if type(self.module).forward is nn.Module.forward:  # a container (ModuleDict): no forward to wrap
                self.manual_sync = True
            else:
                ids = [env.device.index] if env.device.type == "cuda" else None
                self.model = DistributedDataParallel(self.module, device_ids=ids)

    def _find_checkpoint(self, resume: str | None) -> Path | None:
        if resume == "auto":  # continue the run if it has a complete checkpoint, else start it
            resume = "latest" if ckpt.latest_checkpoint(self.run_dir) is not None else None
        if resume is not None:
            path = ckpt.resolve_checkpoint(self.run_dir, resume)
            ckpt.check_config(path, self.config)  # refuse a foreign run before building anything
            return path
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None:
            raise ValueError(
                f"run folder {self.run_dir} already has checkpoints (latest: {latest.name}); "
                "resume it (resume='latest', --resume) or choose another --out"
            )
        return None

    def _restore(self, saved: ckpt.Checkpoint) -> None:
        env = self.env
        self.module.load_state_dict({k: v.to(env.device) for k, v in saved.model.items()}, strict=True)
        if self.ema is not None:
            if saved.ema is None:
                raise ckpt.CheckpointError(f"checkpoint {saved.path} has no EMA weights")
            self.ema.load_state_dict(
                {k: v.to(env.device) for k, v in saved.ema.items()}, int(saved.state.get("ema_updates", 0))
            )
        self.optimizer.load_state_dict(saved.optimizer)
        self.schedule.load_state_dict(saved.state["lr_schedule"])
        self.step, self.skipped = saved.step, int(saved.state.get("skipped_steps", 0))
        size = len(self.dataset)
        position = saved.state["position"]
        if saved.state.get("dataset_size") != size:
            logger.warning(
                "the data set has %d examples, the checkpoint was made with %s: the data order changes",
                size,
                saved.state.get("dataset_size"),
            )
        self.position = Position(int(position["epoch"]), int(position["offset"]) % self.epoch_size)
        if saved.state.get("world_size") != env.world_size:
            logger.warning(
                "resuming a %s-process run with %d processes: the global batch changes",
                saved.state.get("world_size"),
                env.world_size,
            )
        cpu = saved.rng.get(f"cpu.rank{env.rank}")
        if cpu is None:
            torch.manual_seed(_seed(self.config.seed, "torch", env.rank, self.step))
        else:
            torch.set_rng_state(cpu)
        cuda = saved.rng.get(f"cuda.rank{env.rank}")
        if cuda is not None and env.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, env.device)
        logger.info("resumed from %s at step %d", saved.path, self.step)

    # -----------------------------------------------------------------------------------------
    def _order(self, start: Position):
        c, env = self.config, self.env
        return batch_order(self.dataset, c.batch_size, c.seed, env.rank, env.world_size, start)

    def _batches(self):
        c = self.config
        sampler = self._order(self.position)
        loader = torch.utils.data.DataLoader(
            EpochItems(self.dataset), batch_sampler=sampler, collate_fn=self.stage.collate, num_workers=c.num_workers
        )
        return iter(loader)

    def _autocast(self):
        if self.config.mixed_precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _train_step(self, batches) -> dict[str, Any]:
        """One optimizer step (or a skipped one); returns its metrics."""
        c, env = self.config, self.env
        lr = self.schedule.apply(self.step)
        losses, stage_metrics, bad = [], {}, False
        for micro in range(c.grad_accum):
            batch = next(batches)
            self.position = self.position.advance(c.batch_size * env.world_size, self.epoch_size)
            # The same generator on every process: stages draw for the global batch and keep their
            # rows (distributed.rank_rows), so N processes train as one with N times the batch.
            generator = torch.Generator().manual_seed(_seed(c.seed, "loss", self.step, micro))
            with self._autocast():
                loss, stage_metrics = self.stage.loss(self.model, batch, self.step, generator)
            value = float(loss.detach().float().item())
            losses.append(value)
            # Every process must agree before anyone calls backward: DDP's backward is collective.
            if dist_env.any_true(env, not math.isfinite(value)):
                bad = True
                if c.nonfinite == "stop":
                    break
                continue  # `skip`: read the step's remaining micro-batches, so the data order stays put
            # DDP all-reduces gradients in the backward of the last micro-batch only.
            last = micro == c.grad_accum - 1
            ddp = isinstance(self.model, DistributedDataParallel)
            with nullcontext() if last or not ddp else self.model.no_sync():
                (loss / c.grad_accum).backward()
        grad_norm = float("nan")
        if not bad:
            if self.manual_sync:
                dist_env.allreduce_grads(env, self.module)
            clip = c.grad_clip if c.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
            bad = not math.isfinite(grad_norm)  # gradients are synchronised: every rank sees the same
        loss_value = dist_env.mean(env, sum(losses) / len(losses))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if c.nonfinite == "stop":
                # Steps are numbered as in metrics and checkpoints: step n is the n-th (from 1).
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {self.step + 1} (loss {loss_value}, "
                    f"grad norm {grad_norm}); nothing of this step was saved. Lower lr, "
                    "enable grad_clip, or pass nonfinite=skip"
                )
            self.skipped += 1
            logger.warning(
                "step %d: non-finite loss or gradient (loss %s): optimizer step skipped (%d so far)",
                self.step + 1,
                loss_value,
                self.skipped,
            )
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.module)
        self.step += 1
        metrics = {k: float(v) for k, v in stage_metrics.items()}  # the last micro-batch's, this rank's
        return {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_steps": self.skipped,
            "skipped": bad,
            **metrics,
        }

    # -----------------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The model to evaluate, sample and export: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.module

    def _with_eval_model(self, fn: Callable[[nn.Module], Any]) -> Any:
        model = self.eval_model()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model)
        finally:
            model.train(was_training)

    def save(self) -> Path | None:
        dist_env.barrier(self.env)
        rng = _rng_states(self.env)  # collective: every rank takes part
        path = None
        if self.env.is_main:
            c = self.config
            state = {
                "position": {"epoch": self.position.epoch, "offset": self.position.offset},
                "lr_schedule": self.schedule.state_dict(),
                "skipped_steps": self.skipped,
                "ema_updates": self.ema.updates if self.ema else 0,
                "dataset_size": len(self.dataset),
                "world_size": self.env.world_size,
            }
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                model=self.module.state_dict(),
                ema=self.ema.state_dict() if self.ema else None,
                optimizer=self.optimizer.state_dict(),
                rng=rng,
                state=state,
                config=c,
                keep_last=c.keep_last,
            )
            self.log.plot()
        dist_env.barrier(self.env)
        return path

    def evaluate(self) -> None:
        if self.env.is_main:
            metrics = self._with_eval_model(self.stage.evaluate)
            if metrics:
                self.log.log_eval(self.step, metrics)
        dist_env.barrier(self.env)

    def sample(self) -> None:
        if self.env.is_main:
            path = self.run_dir / SAMPLES_DIR / f"step_{self.step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._with_eval_model(lambda model: self.stage.sample(model, path))
        dist_env.barrier(self.env)

    def run(self) -> Path:
        c, env = self.config, self.env
        batches = self._batches()
        saved_at = self.step if self.checkpoint else None
        images_per_step = c.batch_size * c.grad_accum * env.world_size
        busy, timed_steps = 0.0, 0  # time in training steps only (not evaluation, samples, saves)
        while self.step < self.end:
            start = time.perf_counter()
            record = self._train_step(batches)
            busy += time.perf_counter() - start
            timed_steps += 1
            step = self.step
            if env.is_main and self.progress is not None:
                self.progress(step, c.steps, record)
            if step % c.log_every == 0 or step == self.end:
                self.log.log(
                    {"step": step, **record, "images_per_s": images_per_step * timed_steps / busy, "time": time.time()}
                )
                busy, timed_steps = 0.0, 0
            if step == self.end:
                break
            if c.eval_every and step % c.eval_every == 0:
                self.evaluate()
            if c.sample_every and step % c.sample_every == 0:
                self.sample()
            if c.save_every and step % c.save_every == 0:
                self.save()
                saved_at = step
        # Stop DataLoader workers now: left to the garbage collector, their shutdown can wait out
        # DataLoader's 5 s status-check interval.
        del batches
        checkpoint = self.save() if saved_at != self.step else None
        if self.step < c.steps:  # stopped early on purpose (`until`): no final evaluation or export
            return Path(dist_env.broadcast_text(env, str(checkpoint or ckpt.latest_checkpoint(self.run_dir))))
        self.evaluate()
        self.sample()
        exported = None
        if env.is_main:
            self.log.plot()
            exported = str(self._with_eval_model(lambda model: self.stage.export(model, self.run_dir / EXPORT_DIR)))
            logger.info("exported %s", exported)
        return Path(dist_env.broadcast_text(env, exported))


def train(
    stage: StageLike,
    config: TrainConfig,
    resume: str | None = None,
    progress: Progress | None = None,
    *,
    device: torch.device | str | None = None,
    until: int | None = None,
) -> Path:
    """Train `stage` as `config` says; returns the path the stage exported (RUN/export/...).

    stage: a Stage, a factory ``(config, device) -> Stage`` (a Stage subclass is one), a stage
        name from ``stablediff.train.stages.STAGES``, or None for ``config.stage``. A factory is
        preferred: it is called after the device (and, under torchrun, the process group) is set.
    resume: None (a fresh run; refused when RUN already has checkpoints), "latest", "auto"
        ("latest" when RUN has a complete checkpoint, else a fresh run: for jobs that may be
        restarted), or a checkpoint folder (or a run folder: its latest). Refused when the
        checkpoint's config differs from `config` in a field that changes what is trained.
    progress: ``progress(step, total_steps, metrics)`` after every optimizer step, on rank 0.
    device: default ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    until: stop after this step (with a checkpoint), as if interrupted: returns the checkpoint
        folder instead of an export. The LR schedule still runs to ``config.steps``.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set, world size > 1) the process group is created
    here (gloo on CPU, nccl on CUDA) and destroyed on return.
    """
    if until is not None and until < 1:
        raise ValueError(f"until must be >= 1, got {until}")
    env = dist_env.setup(device)
    try:
        return _Run(stage, config, resume, progress, env, until).run()
    finally:
        if env.owns_group:
            # The DDP wrapper holds the process group through reference cycles: collect it now, or
            # gloo's threads may be torn down at interpreter exit, which aborts the process.
            gc.collect()
        dist_env.teardown(env)


__all__ = ["NonFiniteError", "train"]
