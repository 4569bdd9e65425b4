"""Regression warm start: fit the student to the teacher's ODE map before distribution matching.

DMD (Yin et al. 2023, Sec. 3.3, Eq. 9) regresses the one-step generator onto noise -> image pairs from
the teacher's deterministic sampler; DMD2 drops it in general but keeps "a short regression warm start"
for its one-step SDXL model (DMD2 Sec. 5.3). Here the pairs are made on the fly from the run's own
batch source (same noise, same conditioning) with the teacher's DDIM sampler and guidance, and the loss
is MSE in x0 space (DMD used LPIPS on decoded images).

With a run folder, the warm start keeps its progress like training does: a checkpoint in
``RUN/checkpoints/warm_start/step_*`` (student weights, Adam state, iteration; ``state.json`` has
``"phase": "warm_start"`` and ``"done"``) every ``train.checkpoint_minutes``, on SIGINT / SIGTERM and at the
end; a restarted run continues from it bitwise (the pairs are a function of the iteration). Its loss goes
to ``RUN/log.jsonl`` with ``"phase": "warm_start"`` (mean over each ``train.log_every`` iterations). Under N
processes each regresses its rows of the global batch with gradients summed; all agree on stopping for a
signal and on the time-based checkpoint, and rank 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from distill import checkpoint as ckpt
from distill import interrupt
from distill.config import TrainConfig, WarmStartConfig
from distill.models.errors import ToolkitError
from distill.samplers import sample_ddim

WARM_START_DIR = ckpt.WARM_START_DIR  # under RUN/checkpoints


def _ode_from(teacher, x: torch.Tensor, t_start, timesteps: torch.Tensor, cond, guidance: float) -> torch.Tensor:
    """Teacher DDIM from ``x`` at ``t_start`` down to clean data, over the grid points below ``t_start``."""
    t_start = torch.as_tensor(t_start, dtype=timesteps.dtype).reshape(1)
    return sample_ddim(teacher, x, cond, torch.cat([t_start, timesteps[timesteps < t_start]]), guidance)


def _make_pairs(student, teacher, batch, timesteps, guidance: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) for every student step: step 0 maps the noise to the teacher's ODE sample; step k > 0
    maps that sample re-noised to ``t_k`` (fresh noise, as in multi-step sampling) to the ODE from ``t_k``."""
    x0 = sample_ddim(teacher, batch.noise, batch.cond, timesteps, guidance)
    pairs = [(student.input_from_noise(batch.noise), x0)]
    for k in range(1, student.num_steps):
        t_k = student.timestep_values[k]  # a python number: it selects the teacher's grid points on the host
        x_t = teacher.schedule.add_noise(x0, batch.rng.fork(2000 + k).randn_like(x0),
                                         student.times(k, x0.shape[0], x0.device))
        pairs.append((x_t, _ode_from(teacher, x_t, t_k, timesteps, batch.cond, guidance)))
    return pairs


def _process_share(global_batch: int) -> tuple[slice, int]:
    """This process's rows of the global batch and the number of processes sharing it (N processes regress
    their own rows and sum gradients; a batch that does not divide by N is regressed whole by every process)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1 or global_batch % world:
        return slice(0, global_batch), 1
    per = global_batch // world
    rank = dist.get_rank()
    return slice(rank * per, (rank + 1) * per), world


def _sum_grads(params: list[torch.Tensor]) -> None:
    """All-reduce (sum) the gradients: each process's loss is its share of the global mean."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


class _PairBatches:
    """``pairs(it) -> (batch, pairs per step)`` for warm-start iteration ``it``: a function of ``it`` alone (so a
    resumed warm start sees what an uninterrupted one would), from a fixed pool of ``config.pairs`` pairs made
    once and cycled, or fresh pairs each iteration."""

    def __init__(self, student, teacher, data, config: WarmStartConfig, timesteps, device, rows: slice):
        self.student, self.teacher, self.data, self.config = student, teacher, data, config
        self.timesteps, self.device = timesteps, device
        self.rows = rows  # this process's rows of the global batch
        self.pool = None

    def _make(self, index: int):
        # negative steps keep warm-start batches apart from the training batches of the same run
        batch = self.data(-1 - index, self.rows, self.device)
        return batch, _make_pairs(self.student, self.teacher, batch, self.timesteps, self.config.guidance_scale)

    def __call__(self, it: int):
        if self.config.pairs <= 0:
            return self._make(it)
        if self.pool is None:
            size = -(-self.config.pairs // max(self.data.global_batch_size, 1))
            self.pool = [self._make(i) for i in range(size)]
            if not self.pool:  # cannot happen with checked configs; never cycle over nothing
                raise ToolkitError("student.warm_start.pairs made no pairs; check data.batch_size")
        return self.pool[it % len(self.pool)]


class _Progress:
    """The warm start's checkpoints and log lines in a run folder (rank 0 writes; every rank may load)."""

    def __init__(self, run_dir: str | Path | None, train: TrainConfig | None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.root = self.run_dir / "checkpoints" / WARM_START_DIR if self.run_dir is not None else None
        self.main = os.environ.get("RANK", "0") == "0"
        self.minutes = train.checkpoint_minutes if train is not None else 0
        self.log_every = train.log_every if train is not None else 0
        self.last_save = time.monotonic()
        self.losses: list[torch.Tensor] = []

    def load(self, student, opt) -> tuple[int, dict]:
        """(iteration to start from, state.json) from the newest intact warm-start checkpoint, or (0, {})."""
        if self.root is None:
            return 0, {}
        path = ckpt.newest_intact(self.root)
        if path is None:
            return 0, {}
        from distill.engine import _load_trainable_state

        weights, training_state, state = ckpt.load_checkpoint(path)
        _load_trainable_state(student, weights["student"])
        opt.load_state_dict(training_state["optimizer"])
        if self.main:
            print(f"warm start: resuming from {path} (iteration {state['step']})")
        return int(state["step"]), state

    def save(self, student, opt, it: int, loss: torch.Tensor, done: bool) -> None:
        """Write a warm-start checkpoint (rank 0, with a run folder only: the loss is read back only then)."""
        self.last_save = time.monotonic()
        if self.root is None or not self.main:
            return
        loss = float(loss)
        from distill.engine import _trainable_state

        ckpt.save_checkpoint(self.root, it, {"student": _trainable_state(student)}, {"optimizer": opt.state_dict()},
                             {"phase": "warm_start", "done": done, "loss": loss}, keep=1)

    def due(self) -> bool:
        return bool(self.minutes and self.minutes > 0 and time.monotonic() - self.last_save >= 60 * self.minutes)

    def log(self, it: int, loss: torch.Tensor, flush: bool, world: int) -> None:
        """Record iteration ``it``'s loss (this process's share of the global mean, a 0-dim tensor: read back
        only when a line is written); every ``log_every`` iterations (or ``flush``) write the interval's mean.
        Every process calls this at the same iterations (the shares are summed across processes)."""
        self.losses.append(loss.detach())
        if self.run_dir is None or not self.log_every or (it % self.log_every and not flush):
            return
        mean = torch.stack(self.losses).float().mean()
        self.losses = []
        if world > 1:
            dist.all_reduce(mean)
        if not self.main:
            return
        record = {"step": it, "time": time.time(), "phase": "warm_start", "warm_start_loss": float(mean)}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _stop_requested(world: int, device: torch.device) -> int:
    """The signal any process received (0: none), the same in every process (the flag lives on the run's
    device: NCCL reduces only CUDA tensors)."""
    signum = interrupt.requested()
    if world > 1:
        flag = torch.tensor([float(signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


def regression_warm_start(student, teacher, data, config: WarmStartConfig, device=None, progress: bool = True,
                          run_dir: str | Path | None = None, train: TrainConfig | None = None,
                          mixed_precision: str = "no") -> torch.Tensor:
    """Train ``student`` to reproduce ``teacher``'s DDIM output, at each of its steps.

    Noise and conditioning come from the run's batch source ``data(step, rows, device)``. With
    ``config.pairs > 0`` a fixed set of noise -> sample pairs is made once and cycled over (DMD's
    precomputed regression dataset); otherwise every step makes fresh pairs. Multi-step students regress
    every step (each iteration trains all of them, each on a K-th of the batch): the step at ``t_k`` sees a
    teacher sample re-noised to ``t_k`` and learns the teacher's ODE from there. ``device``: the run's
    device (batches are made there). The student's forward runs under bf16 autocast when the run's
    ``mixed_precision`` is bf16; gradients are clipped to ``config.grad_clip`` (default: 1 for diffusers
    UNets, none for toy nets). Returns the last loss, a 0-dim tensor.

    ``run_dir`` (and ``train`` for its checkpoint / log cadence): keep progress there and resume from it (see
    the module docstring); raises :class:`~distill.interrupt.Interrupted` after saving on SIGINT / SIGTERM.
    """
    if config.steps <= 0:
        return torch.tensor(float("nan"))
    schedule = teacher.schedule
    spacing = {"spacing": "trailing"} if schedule.discrete else {}
    timesteps = schedule.inference_timesteps(config.ode_steps, **spacing)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    keeper = _Progress(run_dir, train)
    start, state = keeper.load(student, opt)
    if state.get("done"):
        return torch.tensor(float(state.get("loss", float("nan"))))
    clip = config.grad_clip
    if clip is None:
        from distill.models.export import unwrap_unet

        clip = 1.0 if hasattr(unwrap_unet(student), "enable_gradient_checkpointing") else 0.0
    dev = torch.device(device) if device is not None else torch.device("cpu")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if mixed_precision == "bf16" and dev.type in (
        "cuda", "cpu") else contextlib.nullcontext()
    global_batch = data.global_batch_size
    share, world = _process_share(global_batch)
    pairs = _PairBatches(student, teacher, data, config, timesteps, device, share)
    loss = torch.tensor(float("nan"))
    for it in tqdm(range(start, config.steps), desc="warm start", disable=not progress, initial=start,
                   total=config.steps):
        batch, per_step = pairs(it)
        # a K-step student trains each step on its own K-th of the batch's rows (rotating with the iteration,
        # so a cycled pool's rows reach every step), all steps in one forward: an iteration costs what a
        # one-step student's does. Batches smaller than K give every step all rows.
        # Rows are chosen by their index in the GLOBAL batch, so N processes regress exactly the rows one would.
        steps = len(per_step)
        stride = steps if global_batch >= steps else 1
        rows = [torch.tensor([j for j in range(batch.size) if (share.start + j - k - it) % stride == 0],
                             dtype=torch.long) for k in range(steps)]
        selected = sum(len(range((k + it) % stride, global_batch, stride)) for k in range(steps))  # global rows
        x_in = torch.cat([x[rows[k].to(x.device)] for k, (x, _) in enumerate(per_step)])
        target = torch.cat([y[rows[k].to(y.device)] for k, (_, y) in enumerate(per_step)])
        times = torch.cat([student.times(k, batch.size, x_in.device)[rows[k].to(x_in.device)] for k in range(steps)])
        cond = batch.cond
        if cond is not None and steps > 1:
            cond = cond.map(lambda c: torch.cat([c[r.to(c.device)] for r in rows]))
        # this process's share of the global mean squared error (the shares add up to it)
        with autocast:
            pred = student.denoiser(x_in, times, cond)
        loss = ((pred.float() - target.float()) ** 2).sum() / (selected * target[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _sum_grads(params)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        signum = _stop_requested(world, dev)
        keeper.log(it + 1, loss, flush=bool(signum) or it + 1 == config.steps, world=world)
        if signum:
            keeper.save(student, opt, it + 1, loss.detach(), done=False)
            raise interrupt.Interrupted(signum, f"warm start saved at iteration {it + 1} of {config.steps}")
        if keeper.due() and it + 1 < config.steps:
            keeper.save(student, opt, it + 1, loss.detach(), done=False)
    keeper.save(student, opt, config.steps, loss.detach(), done=True)
    return loss.detach()
