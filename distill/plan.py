"""``distill plan RECIPE --gpus N --gpu-mem GB``: what one GPU holds for a recipe, before renting the GPUs.

The recipe is built on PyTorch's ``meta`` device (shapes, no data: seconds, no GPU memory) by
:func:`distill.plan_meta.build_for_plan`, which makes the roles exactly as ``distill train`` does; the
teacher's weights may be absent for the hub models in :mod:`distill.arch_configs` (built from the embedded
architecture config). Every count below is of the real modules:

* **weights**: unique storages of teacher, student, fake score (+ GAN head), text encoders and VAE, in their
  dtypes (a LoRA run's shared base counted once). Under ``train.parallel=fsdp`` the roles are sharded over
  the N GPUs (text encoders and VAE are not).
* **optimiser states**: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` (2 x 4 bytes per trainable element) plus
  a 4-byte ``step`` per parameter tensor; 8-bit AdamW keeps 2 x 1 byte. Both optimisers' states persist.
* **EMA**: an fp32 shadow of the student's trainable parameters.
* **gradients** and **activations**, per update (generator, critic): one gradient per trainable parameter of
  that update, in its dtype; and the bytes autograd saves for backward in that update at the per-GPU
  micro-batch (``data.batch_size / gpus / grad_accum``), with and without ``train.gradient_checkpointing``.
  Saved tensors are counted once per storage (a tensor saved by several ops, or views of one tensor, hold
  one buffer), parameters excluded. Under ``mixed_precision: bf16`` the meta forward runs under
  :class:`distill.plan_autocast.MetaAutocast`, CUDA autocast's casts re-applied on meta (meta tensors have
  no autocast of their own), so matmul / conv inputs and the trainable weights' bf16 copies are saved at
  2 bytes per element and norms / softmax at 4, as on the GPU. Attention is counted as the fused kernels
  (flash / memory-efficient) save it: q, k, v, output and log-sum-exp, not the ``L x L`` matrix of the
  math kernel that meta tensors would otherwise run. A data-dependent selection (Z-Image's caption mask)
  keeps every element on meta: such captions are planned at their padded length (an upper bound).

**Peak** (the total): the engine runs the generator update and then the critic update, and frees each
update's gradients right after its optimiser step, so one update's gradients and activations coexist with
the weights, both optimisers' states and the EMA, never both updates':

    peak = weights + optimiser + EMA + max over updates (gradients + activations of that update)

The table's gradient and activation rows are those of the update that attains the maximum. The verdict
compares the peak with ``--gpu-mem`` less a 10% reserve for the CUDA context, allocator fragmentation and
temporaries (attention workspaces, FSDP all-gathers, backward's transient input gradients). Checked against
a real run: on CPU (tests/test_plan.py) and on an H200 (README, "distill plan").
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from distill.models.errors import ToolkitError

GiB = 1024**3
RESERVE = 0.10  # CUDA context, allocator fragmentation, transient buffers (collectives, all-gathers)


@dataclass
class UpdateMemory:
    """Bytes per GPU of one update (``generator`` or ``critic``): its gradients and saved activations."""

    gradients: int
    activations_full: int
    activations_checkpointed: int

    def activations(self, checkpointing: bool) -> int:
        return self.activations_checkpointed if checkpointing else self.activations_full


@dataclass
class Plan:
    """Bytes per GPU. ``total`` is the peak (module docstring); ``updates`` keeps both updates' figures."""

    gpus: int
    parallel: str
    weights_sharded: int  # roles (teacher, student, fake score, GAN head), per GPU
    weights_replicated: int  # text encoders, VAE
    optimizer: int
    ema: int
    updates: dict[str, UpdateMemory]
    gradient_checkpointing: bool
    gpu_mem: float  # GiB
    source: str = "disk"  # "embedded": architecture from distill.arch_configs, weights not on disk
    notes: list[str] = field(default_factory=list)

    def _transient(self, name: str) -> int:
        u = self.updates[name]
        return u.gradients + u.activations(self.gradient_checkpointing)

    @property
    def peak_update(self) -> str:
        """The update whose gradients + activations are the larger (it sets the peak)."""
        return max(self.updates, key=self._transient)

    @property
    def gradients(self) -> int:
        return self.updates[self.peak_update].gradients

    @property
    def activations(self) -> int:
        return self.updates[self.peak_update].activations(self.gradient_checkpointing)

    @property
    def activations_full(self) -> int:
        return max(u.activations_full for u in self.updates.values())

    @property
    def activations_checkpointed(self) -> int:
        return max(u.activations_checkpointed for u in self.updates.values())

    @property
    def weights(self) -> int:
        return self.weights_sharded + self.weights_replicated

    @property
    def total(self) -> int:
        """The peak: weights + optimiser + EMA + the larger update's gradients + activations."""
        return self.weights + self.optimizer + self.ema + self.gradients + self.activations

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


def _storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s buffer (its StorageImpl), shared by views and by every op that saves ``t``; works
    on meta, where data pointers are all 0."""
    return t.untyped_storage()._cdata


def saved_bytes(run, exclude: set[int], autocast: torch.dtype | None = None, stats: dict | None = None) -> int:
    """Bytes of the distinct buffers autograd saves for backward while ``run()`` builds the graph.

    ``exclude``: storage keys (:func:`_storage_key`) not to count (parameters and buffers: they are weights).
    ``autocast``: the autocast dtype (None: fp32); the run is under :class:`~distill.plan_autocast.MetaAutocast`
    (autocast's casts and fused-attention memory on meta tensors; real tensors are only cast).
    Each buffer is counted once, at its storage size (a saved view keeps its whole base alive).
    ``stats["scalars_read"]`` (when given) adds the data-dependent meta scalars taken as 0 (plan_autocast).
    """
    from distill.plan_autocast import MetaAutocast

    seen: dict[int, int] = {}
    keep = []  # saved tensors stay referenced until the count is done, so no storage address is reused

    def pack(t):
        key = _storage_key(t)
        if key not in exclude and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            keep.append(t)
        return t

    mode = MetaAutocast(autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        run()
    if stats is not None:
        stats["scalars_read"] = stats.get("scalars_read", 0) + mode.scalars_read
    return sum(seen.values())


def _weight_storages(modules) -> set[int]:
    return {_storage_key(t) for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]}


def _activations(models, method, data, config, gpus: int, autocast, stats: dict) -> dict[str, tuple[int, int]]:
    """Per update: saved-tensor bytes per GPU without and with gradient checkpointing (the models were built
    on meta without it; it is switched on for the second pass)."""
    from distill.build import enable_gradient_checkpointing
    from distill.methods.base import frozen

    per_gpu = max(config.data.batch_size // max(gpus * config.train.grad_accum, 1), 1)
    batch = data(0, slice(0, per_gpu), torch.device("meta"))
    pipeline = models.pipeline
    frozen_parts = _replicated_modules(pipeline)
    exclude = _weight_storages([models.teacher, models.student, models.fake_score,
                                getattr(method, "discriminator", None), *frozen_parts])
    turns = {"generator": (method.generator_parameters(), method.critic_parameters(), method.generator_loss),
             "critic": (method.critic_parameters(), method.generator_parameters(), method.critic_loss)}
    out: dict[str, list[int]] = {}
    for checkpointing in (False, True):
        if checkpointing:
            if not _has_diffusers(models):
                return {name: (v[0], v[0]) for name, v in out.items()}
            enable_gradient_checkpointing(models)
        for name, (own, other, loss_fn) in turns.items():
            if not own:
                continue

            def run():
                with frozen(*other):
                    return loss_fn(batch)

            out.setdefault(name, []).append(saved_bytes(run, exclude, autocast, stats))
    return {name: (v[0], v[1]) for name, v in out.items()}


def _replicated_modules(pipeline) -> list:
    """Text encoders and VAE of a loaded pipeline (UNet pipelines list ``text_encoders``; flow pipelines keep
    them as ``pipe.text_encoder*`` components)."""
    if pipeline is None:
        return []
    found = list(getattr(pipeline, "text_encoders", ()) or ()) + [getattr(pipeline, "vae", None)]
    components = getattr(getattr(pipeline, "pipe", None), "components", None) or {}
    found += [m for n, m in components.items() if n.startswith("text_encoder") and isinstance(m, torch.nn.Module)]
    return [m for m in found if m is not None]


def make_plan(config, gpus: int, gpu_mem: float) -> Plan:
    """The per-GPU memory plan of ``config`` on ``gpus`` GPUs of ``gpu_mem`` GiB (see the module docstring)."""
    if gpus < 1 or gpu_mem <= 0:
        raise ToolkitError("--gpus must be at least 1 and --gpu-mem positive")
    cfg = copy.deepcopy(config)
    cfg.student.warm_start = dataclasses.replace(cfg.student.warm_start, steps=0)
    checkpointing, cfg.train.gradient_checkpointing = cfg.train.gradient_checkpointing, False
    # meta cannot know a data-dependent selection (Z-Image keeps the caption tokens its mask marks): let it keep
    # every element, i.e. plan captions at their padded length, an upper bound
    from torch.fx.experimental import _config as fx_config

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        return _make_plan(cfg, checkpointing, gpus, gpu_mem)


def _make_plan(cfg, checkpointing: bool, gpus: int, gpu_mem: float) -> Plan:
    from distill.plan_autocast import autocast_dtype
    from distill.plan_meta import build_for_plan

    models, method, data, source, replicated = build_for_plan(cfg)
    roles = [models.teacher, models.student, models.fake_score, getattr(method, "discriminator", None)]
    if replicated is None:
        replicated = _unique_bytes(_replicated_modules(models.pipeline))
    shard = cfg.train.parallel == "fsdp"
    div = gpus if shard else 1
    per_state = {"adamw": 4, "adamw8bit": 1}
    optimizer = 0
    for params, ocfg in ((method.generator_parameters(), cfg.generator_optim),
                         (method.critic_parameters(), cfg.critic_optim)):
        optimizer += sum(2 * per_state[ocfg.kind] * p.numel() + 4 for p in params)
    ema = 4 * sum(p.numel() for p in method.generator_parameters()) if cfg.train.ema_decay else 0
    stats: dict = {}
    acts = _activations(models, method, data, cfg, gpus, autocast_dtype(cfg.train.mixed_precision), stats)
    owners = {"generator": method.generator_parameters(), "critic": method.critic_parameters()}
    updates = {name: UpdateMemory(gradients=-(-sum(p.numel() * p.element_size() for p in owners[name]) // div),
                                  activations_full=full, activations_checkpointed=ckpt)
               for name, (full, ckpt) in acts.items()}
    notes = []
    if stats.get("scalars_read"):
        notes.append(f"{stats['scalars_read']} data-dependent value(s) read in the losses (e.g. counts of non-finite "
                     f"rows) were taken as 0 on meta: the all-finite path is planned")
    if cfg.data.batch_size % (gpus * cfg.train.grad_accum):
        notes.append(f"data.batch_size {cfg.data.batch_size} does not divide by {gpus} GPU(s) x train.grad_accum "
                     f"{cfg.train.grad_accum}: distill train refuses it (planned at "
                     f"{max(cfg.data.batch_size // (gpus * cfg.train.grad_accum), 1)} sample(s) per GPU)")
    return Plan(gpus=gpus, parallel=cfg.train.parallel, weights_sharded=-(-_unique_bytes(roles) // div),
                weights_replicated=replicated, optimizer=-(-optimizer // div), ema=-(-ema // div),
                updates=updates, gradient_checkpointing=checkpointing, gpu_mem=gpu_mem, source=source,
                notes=notes)


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
    """The table ``distill plan`` prints (rows in bytes per GPU, total = the peak)."""
    unit, scale = ("GiB", GiB) if plan.total >= GiB else ("MiB", 1024**2)
    gb = lambda b: f"{b / scale:9.2f}"  # noqa: E731
    peak = plan.peak_update
    ckpt = "checkpointed" if plan.gradient_checkpointing else "no checkpointing"
    rows = [
        ("weights (teacher, student, fake score" + (", sharded" if plan.parallel == "fsdp" else "") + ")",
         plan.weights_sharded),
        ("weights (text encoders, VAE)", plan.weights_replicated),
        ("optimiser states (both optimisers)", plan.optimizer),
        ("EMA", plan.ema),
        (f"gradients ({peak} update)", plan.gradients),
        (f"activations ({peak} update, {ckpt})", plan.activations),
    ]
    lines = [f"{recipe}: {plan.gpus} GPU(s) x {plan.gpu_mem:g} GiB, train.parallel={plan.parallel}"]
    if plan.source == "embedded":
        lines.append("(architecture from the embedded config; weights not on disk)")
    lines.append(f"{'per GPU':<60}{unit:>9}")
    lines += [f"{name:<60}{gb(b)}" for name, b in rows]
    u = plan.updates[peak]
    lines.append(f"{'  (activations with / without checkpointing)':<60}{gb(u.activations_checkpointed)} / "
                 f"{u.activations_full / scale:.2f}")
    for name, other in plan.updates.items():
        if name != peak:
            lines.append(f"{f'  ({name} update: gradients + activations)':<60}"
                         f"{gb(other.gradients + other.activations(plan.gradient_checkpointing))}")
    lines.append(f"{'total (peak: one update at a time, see above)':<60}{gb(plan.total)}")
    lines.append(f"{'usable (GPU memory less a 10% reserve)':<60}{gb(plan.budget)}")
    lines.append("verdict: fits" if plan.fits else "verdict: does NOT fit")
    for item in advice(plan):
        lines.append(f"  try: {item}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory plan of a recipe (weights, gradients, optimiser, "
                                           "activations) and whether it fits (exit 0 fits, 1 does not, 2 error)")
    p.add_argument("config", help="recipe YAML")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (e.g. 80)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from distill.config import load_config
    from distill.parallel import check_mixed_precision, check_parallel

    config = load_config(args.config, args.overrides)
    check_mixed_precision(config.train.mixed_precision)
    check_parallel(config.train, args.gpus)
    plan = make_plan(config, args.gpus, args.gpu_mem)
    print(format_plan(plan, args.config))
    return 0 if plan.fits else 1  # a script can gate a launch on the verdict; errors exit 2

