"""Sharded checkpoints under FSDP2: ``torch.distributed.checkpoint`` (DCP) state, written and read by all processes.

Every process writes only its own shards of the weights, the EMA and the AdamW states (no full gather on one
process, which for full-UNet SDXL DMD2 would be ~31 GB of CPU memory on rank 0 at every save) into the
checkpoint's temporary folder; rank 0 then adds ``training_state.pt`` (LR schedulers, every process's RNG
state), the sha256 manifest and ``state.json``, and renames the folder into place (distill/checkpoint.py), so
a process killed at any moment leaves the previous checkpoint the newest intact one.

Loading reshards: DCP reads, for each process, the parts of the saved tensors its shards cover, so a
checkpoint written by N processes resumes on M (``M = 1`` included). ``distill export`` and
:func:`distill.checkpoint.load_checkpoint` read it as full tensors in one process.

State layout (nested dict, as DCP flattens it): ``{"weights": {stem: {name: tensor}}, "optimizers": {turn:
optimizer state dict keyed by parameter name}}`` where ``stem`` is as the unsharded format's file stems
(``student``, ``fake_score``, ``discriminator``, ``student_ema``, ``method_state``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from distill import checkpoint as ckpt
from distill.models.errors import ToolkitError


def _optimizer_states(optimizers: dict[str, tuple[dict[str, nn.Module], torch.optim.Optimizer]]) -> dict:
    """Per turn: the optimiser's state keyed by parameter name, its tensors this process's shards (DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {name: get_optimizer_state_dict(nn.ModuleDict(modules), optimizer)
            for name, (modules, optimizer) in optimizers.items()}


def save_sharded(root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]],
                 optimizers: dict[str, tuple[dict[str, nn.Module], torch.optim.Optimizer]], training_state: dict,
                 state: dict, keep: int) -> Path | None:
    """Write ``root/step_{step}`` with every process's shards (a collective: all processes call it).

    Args:
        weights: stem -> {name: tensor (DTensor shard or replicated tensor)}, as ``Trainer.state_weights``.
        optimizers: turn -> (its modules by name, its optimiser).
        training_state: picklable extras (schedulers); the RNG states of all processes are added here.
        state: ``state.json`` fields. ``keep``: checkpoints to keep.
    Returns the checkpoint's path on rank 0, None elsewhere.
    """
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    owner = [os.getpid()]
    dist.broadcast_object_list(owner, src=0)  # one temporary folder for all: named after rank 0, which renames it
    tmp = ckpt.temporary_folder(root, step, owner[0])
    if rank == 0:
        ckpt.fresh_folder(tmp)
    dist.barrier()
    dcp.save({"weights": weights, "optimizers": _optimizer_states(optimizers)}, checkpoint_id=str(tmp / ckpt.DCP_DIR))
    rngs: list = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, ckpt.rng_state())
    path = None
    if rank == 0:
        training_state = {**training_state, "rng": rngs[0], "rng_per_rank": rngs}
        path = ckpt.save_checkpoint(root, step, {}, training_state, {**state, "format": "dcp"}, keep=keep, tmp=tmp)
    dist.barrier()  # nobody goes on (or exits) before the checkpoint is in place
    return path


def load_sharded(path: Path, weights: dict[str, dict[str, torch.Tensor]],
                 optimizers: dict[str, tuple[dict[str, nn.Module], torch.optim.Optimizer]],
                 load_extra: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict:
    """Load checkpoint ``path``'s shards into ``weights`` (in place: the modules' own parameters, buffers and
    EMA tensors) and the optimisers (a collective). Returns the training state with this process's RNG
    state as ``rng`` (rank 0's when the checkpoint had fewer processes).

    ``weights`` must hold every stem the run checkpoints; ``method_state`` (copies) is handed to ``load_extra``.
    Raises ToolkitError when the checkpoint does not match the model.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    target = {"weights": weights, "optimizers": _optimizer_states(optimizers)}
    try:
        dcp.load(target, checkpoint_id=str(Path(path) / ckpt.DCP_DIR))
    except Exception as err:  # DCP wraps a missing key or a shape mismatch into CheckpointException
        reason = str(err).strip().splitlines()
        raise ToolkitError(f"checkpoint {path} does not match the model: {reason[-1] if reason else err}") from None
    for name, (modules, optimizer) in optimizers.items():
        set_optimizer_state_dict(nn.ModuleDict(modules), optimizer, target["optimizers"][name])
    if load_extra is not None and "method_state" in weights:
        load_extra(target["weights"]["method_state"])
    training_state = torch.load(Path(path) / "training_state.pt", map_location="cpu", weights_only=False)
    per_rank = training_state.get("rng_per_rank") or [training_state["rng"]]
    rank = dist.get_rank() if dist.is_initialized() else 0
    training_state["rng"] = per_rank[rank] if rank < len(per_rank) else per_rank[0]
    return training_state
