"""The Trainer: everything stateful around a :class:`~distill.methods.base.Method`.

It owns accelerate (devices, processes, mixed precision), the generator and critic optimisers with
linear warm-up, the two time-scale update rule, gradient accumulation, gradient clipping, the NaN
guard, optional EMA of the student, atomic checkpoints with ``resume``, jsonl / tensorboard logs, a
progress bar and periodic sample grids.

Determinism: every random number of step ``s`` derives from ``(seed, s)`` (see ``BatchRNG``), and data
are a function of the step, so a resumed run is bitwise identical to an uninterrupted one on CPU, and N
processes sharing a global batch see the same samples and noise as one process.

Distributed training averages gradients with one all-reduce per optimiser step over the parameters that
optimiser updates, rather than wrapping modules in DDP: the fake score is trainable in the critic step
and frozen in the generator step, which DDP's reducer cannot express without ``no_sync`` juggling.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from distill import checkpoint as ckpt
from distill import interrupt
from distill.config import OptimConfig, TrainConfig
from distill.ema import EMA
from distill.methods.base import Batch, Method, frozen
from distill.models.errors import ToolkitError
from distill.parallel import reshard


class BatchSource(Protocol):
    """Data as a function of the step: ``source(step, rows, device) -> Batch`` for rows of the global batch."""

    global_batch_size: int

    def __call__(self, step: int, rows: slice, device) -> Batch: ...


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, every: int = 1):
    """AdamW (or bitsandbytes' 8-bit AdamW) with a constant LR after a linear warm-up.

    The warm-up counts training iterations, as DMD2 does: an optimiser stepped every ``every`` iterations
    (the generator under TTUR) reaches full LR after ``cfg.warmup_steps`` iterations, not after that many
    of its own steps. Its k-th step (iteration ``k * every``) uses ``lr * min(1, (k * every + 1) / warmup)``.
    """
    if not params:
        return None, None
    kwargs = dict(lr=cfg.lr, betas=tuple(float(b) for b in cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    warmup, every = max(int(cfg.warmup_steps), 0), max(int(every), 1)
    schedule = (lambda s: min(1.0, (s * every + 1) / warmup)) if warmup else (lambda s: 1.0)
    if getattr(cfg, "kind", "adamw") == "adamw8bit":
        from distill.parallel import adamw8bit_class

        opt = adamw8bit_class()(params, **kwargs)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # one fused kernel over all parameters: the per-tensor loop cost ~4x more (2/3 of DMD2's overhead on CPU);
    # devices without a fused kernel (meta, ...) fail only at the first step, so they are excluded up front
    from distill.parallel import is_sharded

    fused = all(p.device.type in ("cpu", "cuda") and not is_sharded(p) for p in params)
    try:
        opt = torch.optim.AdamW(params, fused=fused, **kwargs)
    except (RuntimeError, ValueError):  # a dtype without a fused kernel
        opt = torch.optim.AdamW(params, **kwargs)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


@dataclass
class _Turn:
    """One optimiser with its parameters and settings."""

    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: what changes during training (LoRA: the adapters only)."""
    state = {n: p for n, p in module.named_parameters() if p.requires_grad}
    # non-persistent buffers are not state (a flow student's float timesteps buffer is rebuilt from the config)
    transient = {f"{prefix}.{b}" if prefix else b for prefix, m in module.named_modules()
                 for b in m._non_persistent_buffers_set}
    state.update({n: b for n, b in module.named_buffers()
                  if b is not None and b.is_floating_point() and n not in transient})
    return state


def _load_trainable_state(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    missing = [n for n in _trainable_state(module) if n not in tensors]
    if missing:
        raise ToolkitError(f"checkpoint does not match the model: {len(missing)} tensors missing, e.g. {missing[0]}")
    from distill.parallel import like

    with torch.no_grad():
        for name, value in tensors.items():
            if name in own:
                own[name].copy_(like(value, own[name]))  # a full tensor, or this process's shard of it under FSDP


class Trainer:
    """Runs a method. ``run()`` trains to ``config.steps`` and returns the last logs.

    Args:
        method: the loss object (holds the roles).
        data: a :class:`BatchSource`.
        config: training settings; ``generator_optim`` / ``critic_optim``: optimiser settings.
        out_dir: run folder (checkpoints, logs, samples).
        resume: ``None``, ``"auto"`` (latest checkpoint in ``out_dir`` if any) or a checkpoint path.
        sample_fn: ``sample_fn(step, path_stem)`` writes a sample grid; called every ``sample_every`` steps.
        eval_fn: ``eval_fn(step) -> {metric: value}`` (all processes; distill/train_eval.py); called every
            ``eval_every`` steps with the EMA swapped in. Values go to log.jsonl as ``eval_<metric>``; the
            checkpoint with the lowest FID (else the first ``fd_*``) is kept in ``checkpoints/best/``.
    """

    def __init__(self, method: Method, data: BatchSource, config: TrainConfig, generator_optim: OptimConfig,
                 critic_optim: OptimConfig, out_dir: str | Path, resume: str | None = None,
                 sample_fn: Callable[[int, Path], None] | None = None, accelerator=None, progress: bool = True,
                 eval_fn: Callable[[int], dict] | None = None):
        from distill.parallel import make_accelerator

        self.method, self.data, self.config = method, data, config
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        from distill.parallel import check_parallel

        self.parallel = check_parallel(config, self.world)
        self.sample_fn, self.progress, self.eval_fn = sample_fn, progress, eval_fn
        global_batch = data.global_batch_size
        if global_batch % (self.world * config.grad_accum):
            raise ToolkitError(f"global batch {global_batch} must divide by processes x grad_accum "
                               f"({self.world} x {config.grad_accum})")
        for module in vars(method).values():
            if isinstance(module, nn.Module):
                module.to(self.device)
        self._fsdp_units: list[nn.Module] = []  # FSDP2 units, resharded after each optimiser step
        if self.parallel == "fsdp":
            from distill.parallel import fsdp_units, shard_roles

            sharded = shard_roles(method, config.fsdp, self.device)  # before the optimisers: parameters become shards
            self._fsdp_units = fsdp_units(sharded.values())
        self.turns: dict[str, _Turn] = {}
        for name, params, cfg in (("generator", method.generator_parameters(), generator_optim),
                                  ("critic", method.critic_parameters(), critic_optim)):
            every = method.generator_every if name == "generator" else 1
            opt, sched = build_optimizer(params, cfg, every)
            if opt is not None:
                self.turns[name] = _Turn(name, params, opt, sched, cfg.grad_clip)
        if "generator" not in self.turns:
            raise ToolkitError("the method has no trainable generator parameters")
        student = method.generator_modules()["student"]
        self.ema = EMA(student, config.ema_decay) if config.ema_decay else None
        self.step, self.nan_streak, self.nan_total = 0, 0, 0
        self.checkpoint_root = self.out_dir / "checkpoints"
        self.resumed_from = ckpt.resolve_resume(resume, self.checkpoint_root)
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self._log_file = None
        self._tb = None
        self._last_save = time.monotonic()  # time-based checkpoints count from here (rank 0's clock)

    # ------------------------------------------------------------------ state
    def _modules(self) -> dict[str, nn.Module]:
        return {**self.method.generator_modules(), **self.method.critic_modules()}

    def state_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        weights = {name: _trainable_state(m) for name, m in self._modules().items()}
        if self.ema is not None:
            weights["student_ema"] = self.ema.state_dict()
        extra = self.method.extra_state()
        if extra:
            weights["method_state"] = extra
        return weights

    def _turn_modules(self, name: str) -> dict[str, nn.Module]:
        return self.method.generator_modules() if name == "generator" else self.method.critic_modules()

    def save(self, root: Path | None = None, keep: int | None = None) -> Path | None:
        """Write a checkpoint of the current step to ``root`` (default: the run's checkpoints; ``keep`` the newest
        to keep) from the main process; every process waits for it.

        Under FSDP every process writes its own shards of the weights, EMA and optimiser states
        (torch.distributed.checkpoint, distill/sharded_checkpoint.py): any world size resumes it, and
        ``distill export`` reads it as full weights.
        """
        root = self.checkpoint_root if root is None else root
        keep = self.config.keep_checkpoints if keep is None else keep
        schedulers = {n: t.scheduler.state_dict() for n, t in self.turns.items()}
        state = {"data_position": self.step * self.data.global_batch_size, "nan_total": self.nan_total,
                 "nan_streak": self.nan_streak, "world_size": self.world}
        path = None
        if self.parallel == "fsdp":
            from distill.sharded_checkpoint import save_sharded

            path = save_sharded(root, self.step, self.state_weights(), self._sharded_optimizers(),
                                {"schedulers": schedulers}, state, keep)
        elif self.accelerator.is_main_process:
            training_state = {"optimizers": {n: t.optimizer.state_dict() for n, t in self.turns.items()},
                              "schedulers": schedulers, "rng": ckpt.rng_state()}
            path = ckpt.save_checkpoint(root, self.step, self.state_weights(), training_state, state, keep=keep)
        self.accelerator.wait_for_everyone()
        self._last_save = time.monotonic()
        return path

    def _sharded_optimizers(self) -> dict:
        """Per turn: (its modules by name, its optimiser), as the sharded checkpoint takes them."""
        return {n: (self._turn_modules(n), t.optimizer) for n, t in self.turns.items()}

    def _load_sharded(self, path: Path) -> None:
        """Resume an FSDP run from a sharded checkpoint (all processes; any world size)."""
        from distill.sharded_checkpoint import load_sharded

        state = json.loads((path / "state.json").read_text())
        training_state = load_sharded(path, self.state_weights(), self._sharded_optimizers(),
                                      self.method.load_extra_state)
        for name, turn in self.turns.items():
            turn.scheduler.load_state_dict(training_state["schedulers"][name])
        ckpt.set_rng_state(training_state["rng"])
        self.step = int(state["step"])
        self.nan_total, self.nan_streak = int(state.get("nan_total", 0)), int(state.get("nan_streak", 0))

    def _load(self, path: Path) -> None:
        if self.parallel == "fsdp" and ckpt.is_dcp_checkpoint(path):
            return self._load_sharded(path)
        # otherwise full tensors (a sharded checkpoint read in full: e.g. an FSDP run resumed with ddp)
        weights, training_state, state = ckpt.load_checkpoint(path)
        for name, module in self._modules().items():
            if name not in weights:
                raise ToolkitError(f"checkpoint {path} has no weights for {name}")
            _load_trainable_state(module, weights[name])
        if self.ema is not None and "student_ema" in weights:
            from distill.parallel import like

            self.ema.load_state_dict({n: like(v, self.ema.shadow[n]) if n in self.ema.shadow else v
                                      for n, v in weights["student_ema"].items()})
        if "method_state" in weights:
            self.method.load_extra_state(weights["method_state"])
        for name, turn in self.turns.items():
            if self.parallel == "fsdp" or ckpt.is_dcp_checkpoint(path):  # full states keyed by parameter name
                from distill.parallel import load_full_optimizer_state

                load_full_optimizer_state(self._turn_modules(name), turn.optimizer, training_state["optimizers"][name])
            else:
                turn.optimizer.load_state_dict(training_state["optimizers"][name])
            turn.scheduler.load_state_dict(training_state["schedulers"][name])
        ckpt.set_rng_state(training_state["rng"])
        self.step = int(state["step"])
        self.nan_total, self.nan_streak = int(state.get("nan_total", 0)), int(state.get("nan_streak", 0))

    # ------------------------------------------------------------------ one update
    def _rows(self, micro: int) -> slice:
        per_rank = self.data.global_batch_size // self.world
        per_micro = per_rank // self.config.grad_accum
        start = self.rank * per_rank + micro * per_micro
        return slice(start, start + per_micro)

    def _all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        if self.world == 1 or not dist.is_initialized() or self.parallel == "fsdp":
            return  # FSDP reduce-scatters (averages) the gradients of the shards in its backward hooks
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # one flag per parameter rides along: a parameter no process computed a gradient for keeps grad None,
        # as in a single process (AdamW skips it; a zero gradient would still apply weight decay and momentum)
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=self.device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [present])
        dist.all_reduce(flat)
        present = flat[-len(params):].tolist()
        flat = flat[:-len(params)] / self.world
        offset = 0
        for p, has_grad in zip(params, present):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if has_grad else None
            offset += n

    def _mean_over_processes(self, logs: dict[str, float]) -> dict[str, float]:
        """Losses and logs averaged over processes (one small all-reduce): with equal shares of the global batch,
        the numbers one process would log for the whole batch."""
        if self.world == 1 or not dist.is_initialized() or not logs:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(keys, (values / self.world).tolist()))

    def _all_finite(self, *values: float) -> bool:
        """True when every value is finite in every process: all processes skip the same steps."""
        finite = all(math.isfinite(v) for v in values)
        if self.world > 1 and dist.is_initialized():
            flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item() > 0)
        return finite

    def _update(self, turn: _Turn, loss_fn: Callable[[Batch], tuple[torch.Tensor, dict]],
                batches: list[Batch]) -> dict:
        """Backward over micro-batches, sync, clip, NaN guard, step. Returns logs (floats)."""
        turn.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        # the other optimisers' parameters stay frozen through forward AND backward: gradient checkpointing
        # recomputes forwards during backward, which must see the same requires_grad flags as the forward did
        others = [p for t in self.turns.values() if t is not turn for p in t.params]
        with frozen(*others):
            for batch in batches:
                with self.accelerator.autocast():
                    loss, batch_logs = loss_fn(batch)
                (loss / len(batches)).backward()
                for k, v in {f"{turn.name}_loss": loss, **batch_logs}.items():
                    logs[k] = logs.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / len(batches)
        logs = self._mean_over_processes(logs)
        self._all_reduce_grads(turn.params)
        total = torch.nn.utils.get_total_norm([p.grad for p in turn.params if p.grad is not None], foreach=True)
        # FSDP: a DTensor; its full value is the norm over all shards
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        logs[f"{turn.name}_grad_norm"] = norm
        if not self._all_finite(norm, logs[f"{turn.name}_loss"]):
            turn.optimizer.zero_grad(set_to_none=True)
            logs["skipped"] = 1.0
            return logs
        if 0 < turn.grad_clip < norm:  # scale only when clipping: clip_grad_norm_ multiplies every gradient by 1 too
            torch.nn.utils.clip_grads_with_norm_(turn.params, turn.grad_clip, total, foreach=True)
        turn.optimizer.step()
        # free the gradients now, not at this optimiser's next turn: the student's must not sit in memory
        # through the critic update (and the fake score's through the generator update)
        turn.optimizer.zero_grad(set_to_none=True)
        turn.scheduler.step()
        logs[f"{turn.name}_lr"] = turn.scheduler.get_last_lr()[0]
        return logs

    def train_step(self) -> dict:
        """One iteration: a generator update on TTUR turns, then a critic update."""
        step = self.step
        torch.manual_seed(self.config.seed * 1_000_003 + step)  # anything outside BatchRNG (dropout)
        batches = [self.data(step, self._rows(m), self.device) for m in range(self.config.grad_accum)]
        logs: dict[str, float] = {}
        samples: dict[int, torch.Tensor] = {}
        if step % self.method.generator_every == 0:
            def gen_loss(batch):
                loss, batch_logs = self.method.generator_loss(batch)
                if getattr(self.method, "last_sample", None) is not None:
                    samples[id(batch)] = self.method.last_sample
                return loss, batch_logs
            gen_logs = self._update(self.turns["generator"], gen_loss, batches)
            reshard(self._fsdp_units)  # FSDP: no unit stays gathered past an optimiser step
            if "skipped" not in gen_logs:
                if self.ema is not None:
                    self.ema.update()
                self.method.on_generator_step(step)
            logs.update(gen_logs)
        if "critic" in self.turns:
            critic_logs = self._update(self.turns["critic"],
                                       lambda b: self.method.critic_loss(b, samples.get(id(b))), batches)
            reshard(self._fsdp_units)
            if "skipped" in critic_logs:
                logs["skipped"] = 1.0
            # a name both turns log (a method's shared diagnostic) keeps both values, the critic's prefixed
            logs.update({(f"critic_{k}" if k in logs else k): v for k, v in critic_logs.items() if k != "skipped"})
        if logs.get("skipped"):
            self.nan_streak += 1
            self.nan_total += 1
        else:
            self.nan_streak = 0
        self.step += 1
        if self.nan_streak >= self.config.max_nan_steps:
            last = ckpt.list_checkpoints(self.checkpoint_root)
            raise ToolkitError(f"stopped at step {self.step}: {self.nan_streak} consecutive non-finite losses or "
                               f"gradients; last good checkpoint: {last[-1] if last else 'none'} "
                               f"(lower the learning rate or check the data)")
        return logs

    # ------------------------------------------------------------------ loop
    def _accumulate(self, logs: dict) -> None:
        """Add one step's logs to the interval's sums (each key averaged over the steps that logged it)."""
        for k, v in logs.items():
            total, count = self._interval.get(k, (0.0, 0))
            self._interval[k] = (total + float(v), count + 1)

    def _interval_means(self) -> dict:
        """Mean over the steps since the last log line of every logged value; learning rates: the latest.

        A generator that updates every ``generator_every`` steps is in every line whose interval holds one
        of its steps, whatever ``log_every`` is. ``skipped`` becomes the fraction of skipped steps.
        """
        steps = max(self.step - self._interval_start, 1)
        means = {}
        for k, (total, count) in self._interval.items():
            if k.endswith("_lr"):
                means[k] = self._last_lr.get(k, total / count)
            elif k == "skipped":
                means[k] = total / steps
            else:
                means[k] = total / count
        self._interval, self._interval_start = {}, self.step
        return means

    def _log(self, logs: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        if self._log_file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.out_dir / "log.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tb = None
        record = {"step": self.step, "time": time.time(), **logs}  # (warm-start lines carry "phase": "warm_start")
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tb is not None:
            for k, v in logs.items():
                self._tb.add_scalar(k, v, self.step)

    def _boundary(self) -> tuple[int, bool]:
        """(signal asking to stop, time checkpoint due), the same in every process.

        One all-reduce (MAX) per step: a signal any process received stops all of them at this boundary,
        and the checkpoint clock is rank 0's (the others contribute 0), so every process saves together.
        """
        minutes = self.config.checkpoint_minutes
        due = bool(minutes and minutes > 0 and self.rank == 0 and time.monotonic() - self._last_save >= 60 * minutes)
        signum = interrupt.requested()
        if self.world > 1 and dist.is_initialized():
            flags = torch.tensor([float(signum), float(due)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, due = int(flags[0].item()), bool(flags[1].item() > 0)
        return signum, due

    def run(self) -> dict:
        """Train to ``config.steps``; returns the last step's logs.

        SIGINT / SIGTERM (see :mod:`distill.interrupt`) finish the current step, save a checkpoint in every
        process at once, log the partial interval and raise :class:`~distill.interrupt.Interrupted`.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", dynamic_ncols=True,
                   disable=not (self.progress and self.accelerator.is_main_process))
        logs: dict = {}
        installed = interrupt.install()
        self._last_save = time.monotonic()
        self._interval, self._interval_start, self._last_lr = {}, self.step, {}
        try:
            while self.step < cfg.steps:
                logs = self.train_step()
                self._accumulate(logs)
                self._last_lr.update({k: v for k, v in logs.items() if k.endswith("_lr")})
                bar.update(1)
                signum, due = self._boundary()
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == cfg.steps or signum):
                    means = self._interval_means()
                    self._log(means)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if "loss" in k})
                if signum and self.step < cfg.steps:  # (after the last step, the final save below is the same)
                    path = self.save()
                    raise interrupt.Interrupted(signum, f"checkpoint {path or self.checkpoint_root} at step {self.step}")
                if self.step < cfg.steps and (due or cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save()
                if self.sample_fn and cfg.sample_every and self.step % cfg.sample_every == 0 \
                        and self._samples_here():
                    self.write_samples()
                if self.eval_fn and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
            self.save()
            if self.sample_fn and cfg.sample_every and self._samples_here():
                self.write_samples()
        finally:
            if installed:
                interrupt.uninstall()
            bar.close()
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self._tb is not None:
                self._tb.close()
        return logs

    def evaluate(self) -> dict:
        """Run ``eval_fn`` (EMA swapped in), log ``eval_<metric>``, keep the best checkpoint by FID."""
        if self.ema is not None:
            with self.ema.swapped():
                values = self._resharded(self.eval_fn, self.step)
        else:
            values = self._resharded(self.eval_fn, self.step)
        self._log({f"eval_{k}": float(v) for k, v in values.items()})
        # the best checkpoint by a distance (lower is better): FID, else the first Frechet distance asked for
        key = next((k for k in values if k == "fid"), None) or next((k for k in values if k.startswith("fd_")), None)
        if key is not None:
            value = values[key]
            best_file = self.checkpoint_root / "best" / "best.json"
            if getattr(self, "_best_value", None) is None:  # read once (a resumed run continues its record), so
                # every process decides alike and all enter save() together
                self._best_value = json.loads(best_file.read_text())["value"] if best_file.is_file() else math.inf
            if math.isfinite(value) and value < self._best_value:
                self._best_value = value
                self.save(self.checkpoint_root / "best", keep=1)
                if self.accelerator.is_main_process:
                    best_file.write_text(json.dumps({"step": self.step, "metric": key, "value": value}) + "\n")
                self.accelerator.wait_for_everyone()
        return values

    def _samples_here(self) -> bool:
        """The main process samples; under FSDP every process takes part in the student's forwards."""
        return self.accelerator.is_main_process or self.parallel == "fsdp"

    def _resharded(self, fn, *args):
        """``fn(*args)``, then every FSDP unit resharded: forwards without a backward leave root units gathered,
        and the EMA swap-back and the next step must see the shards (distill.parallel.reshard)."""
        try:
            return fn(*args)
        finally:
            reshard(self._fsdp_units)

    def write_samples(self) -> None:
        (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / "samples" / f"step_{self.step:08d}"
        scratch = None
        if not self.accelerator.is_main_process:  # FSDP: the same grid on every process; only rank 0 keeps it
            import tempfile

            scratch = Path(tempfile.mkdtemp(prefix="distill-samples-"))
            stem = scratch / stem.name
        try:
            if self.ema is not None:
                with self.ema.swapped():
                    self._resharded(self.sample_fn, self.step, stem)
            else:
                self._resharded(self.sample_fn, self.step, stem)
        finally:
            if scratch is not None:
                import shutil

                shutil.rmtree(scratch, ignore_errors=True)
