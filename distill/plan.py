"""``distill plan RECIPE --gpus N --gpu-mem GB``: what one GPU holds for a recipe, before renting the GPUs.

The recipe is built on PyTorch's ``meta`` device (shapes, no data: seconds, no GPU memory), exactly as
``distill train`` builds it, so every count below is of the real modules:

* **weights**: unique storages of teacher, student, fake score (+ GAN head), text encoders and VAE, in their
  dtypes (a LoRA run's shared base counted once). Under ``train.parallel=fsdp`` the three roles are
  sharded over the N GPUs (text encoders and VAE are not).
* **gradients**: one tensor per trainable parameter, in its dtype (fp32); sharded under FSDP.
* **optimiser states**: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` (2 x 4 bytes per trainable element) plus a
  4-byte ``step`` per parameter tensor; 8-bit AdamW keeps 2 x 1 byte. Sharded under FSDP.
* **EMA**: an fp32 shadow of the student's trainable parameters (sharded under FSDP).
* **activations**: tensors autograd saves for backward in one generator and one critic update at the per-GPU
  micro-batch (``data.batch_size / gpus / grad_accum``), measured on meta with ``saved_tensors_hooks``
  (parameters excluded), with and without ``train.gradient_checkpointing``. The larger update counts.
  Meta has no autocast, so these are fp32 sizes: under ``mixed_precision: bf16`` matmul inputs are saved in
  bf16 and the true figure is lower (an upper bound, not an estimate of the bf16 peak).

The peak adds them (gradients and activations of one update coexist with everything else) and compares
with ``--gpu-mem`` less a 10% reserve for the CUDA context, allocator fragmentation and temporaries.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from distill.models.errors import ToolkitError

GiB = 1024**3
RESERVE = 0.10  # CUDA context, allocator fragmentation, transient buffers (collectives, all-gathers)


@dataclass
class Plan:
    """Bytes per GPU. ``activations`` follows the recipe's gradient_checkpointing; both variants are kept."""

    gpus: int
    parallel: str
    weights_sharded: int  # roles (teacher, student, fake score, GAN head), per GPU
    weights_replicated: int  # text encoders, VAE
    gradients: int
    optimizer: int
    ema: int
    activations_full: int
    activations_checkpointed: int
    gradient_checkpointing: bool
    gpu_mem: float  # GiB

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations_full

    @property
    def total(self) -> int:
        return (self.weights_sharded + self.weights_replicated + self.gradients + self.optimizer + self.ema
                + self.activations)

    @property
    def budget(self) -> float:
        return self.gpu_mem * GiB * (1 - RESERVE)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def _unique_bytes(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _saved_bytes(run, params: set[int]) -> int:
    """Bytes autograd saves for backward while ``run()`` builds the graph (parameters themselves excluded)."""
    total = 0

    def pack(t):
        nonlocal total
        if id(t) not in params and id(getattr(t, "_base", None)) not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def _activations(models, method, data, config, gpus: int) -> tuple[int, int]:
    """Saved-tensor bytes of the larger of one generator and one critic update per GPU, without and with
    gradient checkpointing (the models were built on meta without it; it is switched on for the second)."""
    from distill.build import enable_gradient_checkpointing
    from distill.methods.base import frozen

    per_gpu = max(config.data.batch_size // max(gpus * config.train.grad_accum, 1), 1)
    batch = data(0, slice(0, per_gpu), torch.device("meta"))
    params = {id(p) for m in (models.teacher, models.student, models.fake_score) if m is not None
              for p in m.parameters()}
    out = []
    for checkpointing in (False, True):
        if checkpointing:
            if not _has_diffusers(models):
                out.append(out[0])
                break
            enable_gradient_checkpointing(models)
        worst = 0
        for own, other, loss_fn in ((method.generator_parameters(), method.critic_parameters(),
                                     method.generator_loss),
                                    (method.critic_parameters(), method.generator_parameters(), method.critic_loss)):
            if not own:
                continue

            def run():
                with frozen(*other):
                    return loss_fn(batch)

            worst = max(worst, _saved_bytes(run, params))
        out.append(worst)
    return out[0], out[1]


def make_plan(config, gpus: int, gpu_mem: float) -> Plan:
    """The per-GPU memory plan of ``config`` on ``gpus`` GPUs of ``gpu_mem`` GiB (see the module docstring)."""
    from distill.build import build_run

    if gpus < 1 or gpu_mem <= 0:
        raise ToolkitError("--gpus must be at least 1 and --gpu-mem positive")
    cfg = copy.deepcopy(config)
    cfg.student.warm_start = dataclasses.replace(cfg.student.warm_start, steps=0)
    checkpointing, cfg.train.gradient_checkpointing = cfg.train.gradient_checkpointing, False
    models, method, data = build_run(cfg, device="meta", warm_start=False)
    roles = [models.teacher, models.student, models.fake_score, getattr(method, "discriminator", None)]
    pipeline = models.pipeline
    others = list(getattr(pipeline, "text_encoders", ()) or ()) + [getattr(pipeline, "vae", None)]
    shard = cfg.train.parallel == "fsdp"
    div = gpus if shard else 1
    trainable = {id(p): p for p in [*method.generator_parameters(), *method.critic_parameters()]}.values()
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    per_state = {"adamw": 4, "adamw8bit": 1}
    optimizer = 0
    for params, ocfg in ((method.generator_parameters(), cfg.generator_optim),
                         (method.critic_parameters(), cfg.critic_optim)):
        optimizer += sum(2 * per_state[ocfg.kind] * p.numel() + 4 for p in params)
    ema = 4 * sum(p.numel() for p in method.generator_parameters()) if cfg.train.ema_decay else 0
    act_full, act_ckpt = _activations(models, method, data, cfg, gpus)
    return Plan(gpus=gpus, parallel=cfg.train.parallel, weights_sharded=-(-_unique_bytes(roles) // div),
                weights_replicated=_unique_bytes(others), gradients=-(-grad_bytes // div),
                optimizer=-(-optimizer // div), ema=-(-ema // div),
                activations_full=act_full, activations_checkpointed=act_ckpt,
                gradient_checkpointing=checkpointing, gpu_mem=gpu_mem)


def _has_diffusers(models) -> bool:
    from distill.models.export import unwrap_unet

    return hasattr(unwrap_unet(models.student), "enable_gradient_checkpointing")


def advice(plan: Plan) -> list[str]:
    """What to change when the plan does not fit (most effective first)."""
    if plan.fits:
        return []
    out = []
    if plan.parallel != "fsdp" and plan.gpus > 1:
        out.append("train.parallel=fsdp (shards weights, gradients and optimiser states over the GPUs)")
    if not plan.gradient_checkpointing and plan.activations_checkpointed < plan.activations_full:
        unit, scale = ("GiB", GiB) if plan.activations_full >= GiB else ("MiB", 1024**2)
        out.append("train.gradient_checkpointing=true (activations "
                   f"{plan.activations_full / scale:.1f} -> {plan.activations_checkpointed / scale:.1f} {unit})")
    out.append("a smaller data.batch_size per GPU (or train.grad_accum), more GPUs, or "
               "generator_optim.kind=adamw8bit / critic_optim.kind=adamw8bit")
    return out


def format_plan(plan: Plan, recipe: str) -> str:
    unit, scale = ("GiB", GiB) if plan.total >= GiB else ("MiB", 1024**2)
    gb = lambda b: f"{b / scale:9.2f}"  # noqa: E731
    rows = [
        ("weights (teacher, student, fake score" + (", sharded" if plan.parallel == "fsdp" else "") + ")",
         plan.weights_sharded),
        ("weights (text encoders, VAE)", plan.weights_replicated),
        ("gradients", plan.gradients),
        ("optimiser states", plan.optimizer),
        ("EMA", plan.ema),
        (f"activations ({'checkpointed' if plan.gradient_checkpointing else 'no checkpointing'})", plan.activations),
    ]
    lines = [f"{recipe}: {plan.gpus} GPU(s) x {plan.gpu_mem:g} GiB, train.parallel={plan.parallel}",
             f"{'per GPU':<60}{unit:>9}"]
    lines += [f"{name:<60}{gb(b)}" for name, b in rows]
    lines.append(f"{'  (activations with / without checkpointing)':<60}{gb(plan.activations_checkpointed)} / "
                 f"{plan.activations_full / scale:.2f}")
    lines.append(f"{'total':<60}{gb(plan.total)}")
    lines.append(f"{'usable (GPU memory less a 10% reserve)':<60}{gb(plan.budget)}")
    lines.append("verdict: fits" if plan.fits else "verdict: does NOT fit")
    for item in advice(plan):
        lines.append(f"  try: {item}")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory plan of a recipe (weights, gradients, optimiser, "
                                           "activations) and whether it fits")
    p.add_argument("config", help="recipe YAML")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (e.g. 80)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from distill.config import load_config
    from distill.parallel import check_mixed_precision, check_parallel

    config = load_config(args.config, args.overrides)
    check_mixed_precision(config.train.mixed_precision)
    check_parallel(config.train, args.gpus)
    plan = make_plan(config, args.gpus, args.gpu_mem)
    print(format_plan(plan, args.config))
    return 0

