"""Sharded safetensors sets, read lazily: what ``distill encode-prompts`` and ``distill encode-latents`` write.

A set is a folder::

    manifest.json              kind, count, shard_size, fields {name: {shape, dtype}}, and provenance
    shard-00000.safetensors    items [0, shard_size): one tensor per field, [n, *shape]; captions (when the
    shard-00001.safetensors    set has them) as a JSON list in the safetensors metadata
    ...
    uncond.safetensors         (prompt embeddings) the embedding of "" for the unconditional branch

Item ``i`` lives in shard ``i // shard_size``. Reading opens a shard with ``safetensors.safe_open`` (a memory
map) and slices the rows asked for, so a step touches only the pages of its own rows: a 1M-item set is never
loaded into RAM. At most ``max_open`` shards stay open (least recently used first out).

Writing is per shard and atomic (a temporary file renamed into place), so several processes can each write
their own shards (shard ``s`` by rank ``s % world``), and an interrupted encoding resumes by skipping the
shards already present.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from distill.models.errors import ToolkitError

MANIFEST = "manifest.json"
UNCOND = "uncond.safetensors"
_CAPTIONS_KEY = "captions"


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def num_shards(count: int, shard_size: int) -> int:
    return (count + shard_size - 1) // shard_size


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (every writer process may write the same one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def write_shard(folder: str | Path, index: int, tensors: dict[str, torch.Tensor],
                captions: Sequence[str] | None = None) -> Path:
    """Write one shard atomically: ``tensors`` are ``[n, ...]`` per field; ``captions`` n strings (optional)."""
    from safetensors.torch import save_file

    path = shard_path(folder, index)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    metadata = {"format": "pt"}
    if captions is not None:
        metadata[_CAPTIONS_KEY] = json.dumps(list(captions))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def field_spec(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """``{name: {"shape": per-item shape, "dtype": str}}`` of a batch of tensors."""
    return {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}


def is_sharded_set(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


class ShardedSet:
    """Lazy reader of a sharded set (see the module docstring).

    Args:
        folder: the set's folder. ``kind``: the expected ``manifest["kind"]`` (a clear error otherwise).
        max_open: shards kept open (memory-mapped) at once.

    ``shards_read`` records every shard index opened (tests use it to show what a run touched).
    """

    def __init__(self, folder: str | Path, kind: str | None = None, max_open: int = 4):
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).is_file():
            raise ToolkitError(f"{self.folder} is not a sharded set (no {MANIFEST}); write one with "
                               f"`distill encode-prompts` or `distill encode-latents`")
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        if kind is not None and self.manifest.get("kind") != kind:
            raise ToolkitError(f"{self.folder} holds {self.manifest.get('kind')!r}, expected {kind!r}")
        self.count, self.shard_size = int(self.manifest["count"]), int(self.manifest["shard_size"])
        self.fields = dict(self.manifest["fields"])
        missing = [shard_path(self.folder, s).name for s in range(num_shards(self.count, self.shard_size))
                   if not shard_path(self.folder, s).is_file()]
        if missing:
            raise ToolkitError(f"{self.folder} is incomplete: {len(missing)} shard(s) missing, e.g. {missing[0]} "
                               f"(run the encode command again to finish it)")
        self.max_open = max_open
        self._open: OrderedDict[int, object] = OrderedDict()
        self.shards_read: set[int] = set()

    def __len__(self) -> int:
        return self.count

    def _shard(self, index: int):
        from safetensors import safe_open

        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        handle = safe_open(str(shard_path(self.folder, index)), framework="pt")
        self._open[index] = handle
        self.shards_read.add(index)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    def _runs(self, indices: Sequence[int]):
        """(position in the request, shard, first row, last row + 1) for consecutive rows within one shard."""
        runs, pos = [], 0
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < self.count:
                raise IndexError(f"item {i} out of range for a set of {self.count}")
        while pos < len(indices):
            shard, row = divmod(indices[pos], self.shard_size)
            end = pos + 1
            while end < len(indices) and indices[end] == indices[end - 1] + 1 \
                    and indices[end] // self.shard_size == shard:
                end += 1
            runs.append((pos, shard, row, row + end - pos))
            pos = end
        return runs

    def get(self, indices: Sequence[int], fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Rows ``indices`` of each field (default: all), as tensors ``[len(indices), *shape]``."""
        fields = list(self.fields) if fields is None else list(fields)
        parts: dict[str, list[torch.Tensor]] = {f: [] for f in fields}
        for _, shard, start, stop in self._runs(indices):
            handle = self._shard(shard)
            for f in fields:
                parts[f].append(handle.get_slice(f)[start:stop])
        return {f: torch.cat(v) for f, v in parts.items()}

    def captions(self, indices: Sequence[int]) -> list[str]:
        out: list[str] = []
        for _, shard, start, stop in self._runs(indices):
            meta = self._shard(shard).metadata() or {}
            if _CAPTIONS_KEY not in meta:
                raise ToolkitError(f"{shard_path(self.folder, shard)} has no captions")
            out.extend(json.loads(meta[_CAPTIONS_KEY])[start:stop])
        return out

    def uncond(self) -> dict[str, torch.Tensor] | None:
        """The unconditional embedding stored with a prompt set (batch 1), or None."""
        path = self.folder / UNCOND
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))
