"""Regression warm start: fit the student to the teacher's ODE map before distribution matching.

DMD (Yin et al. 2023, Sec. 3.3, Eq. 9) regresses the one-step generator onto noise -> image pairs from
the teacher's deterministic sampler; DMD2 drops it in general but keeps "a short regression warm start"
for its one-step SDXL model (DMD2 Sec. 5.3). Here the pairs are made on the fly from the run's own
batch source (same noise, same conditioning) with the teacher's DDIM sampler and guidance, and the loss
is MSE in x0 space (DMD used LPIPS on decoded images).
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from distill.config import WarmStartConfig
from distill.samplers import sample_ddim


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


def _pair_batches(student, teacher, data, config: WarmStartConfig, timesteps, device, rows: slice):
    """Yield (batch, pairs per step) forever: from a fixed pool of ``config.pairs`` pairs, or fresh pairs each step."""
    if config.pairs <= 0:
        step = 0
        while True:
            # negative steps keep warm-start batches apart from the training batches of the same run
            batch = data(-1 - step, rows, device)
            yield batch, _make_pairs(student, teacher, batch, timesteps, config.guidance_scale)
            step += 1
    pool = []
    for i in range(-(-config.pairs // data.global_batch_size)):
        batch = data(-1 - i, rows, device)
        pool.append((batch, _make_pairs(student, teacher, batch, timesteps, config.guidance_scale)))
    while True:
        yield from pool


def regression_warm_start(student, teacher, data, config: WarmStartConfig, device=None,
                          progress: bool = True, mixed_precision: str = "no") -> torch.Tensor:
    """Train ``student`` to reproduce ``teacher``'s DDIM output, at each of its steps.

    Noise and conditioning come from the run's batch source ``data(step, rows, device)``. With
    ``config.pairs > 0`` a fixed set of noise -> sample pairs is made once and cycled over (DMD's
    precomputed regression dataset); otherwise every step makes fresh pairs. Multi-step students regress
    every step (each iteration trains all of them, each on a K-th of the batch): the step at ``t_k`` sees a
    teacher sample re-noised to ``t_k`` and learns the teacher's ODE from there. ``device``: the run's
    device (batches are made there). The student's forward runs under bf16 autocast when the run's
    ``mixed_precision`` is bf16; gradients are clipped to ``config.grad_clip`` (default: 1 for diffusers
    UNets, none for toy nets). Returns the last loss, a 0-dim tensor on that device (never read
    back here: reading it would synchronise the device every step).
    """
    if config.steps <= 0:
        return torch.tensor(float("nan"))
    schedule = teacher.schedule
    spacing = {"spacing": "trailing"} if schedule.discrete else {}
    timesteps = schedule.inference_timesteps(config.ode_steps, **spacing)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    clip = config.grad_clip
    if clip is None:
        from distill.models.export import unwrap_unet

        clip = 1.0 if hasattr(unwrap_unet(student), "enable_gradient_checkpointing") else 0.0
    dev = torch.device(device) if device is not None else torch.device("cpu")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if mixed_precision == "bf16" and dev.type in (
        "cuda", "cpu") else contextlib.nullcontext()
    global_batch = data.global_batch_size
    share, world = _process_share(global_batch)
    pairs = _pair_batches(student, teacher, data, config, timesteps, device, share)
    loss = torch.tensor(float("nan"))
    for it in tqdm(range(config.steps), desc="warm start", disable=not progress):
        batch, per_step = next(pairs)
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
    return loss.detach()
