"""Generate N images in batches on every process and score them: the body of ``distill eval``.

Global batch ``b`` holds images ``b*B .. b*B+B-1``; process ``r`` of ``W`` makes batches ``r, r+W, ...``,
so each batch, and hence each image, is the same with 1 or N processes. Nothing is written but
``metrics.json`` and ``grid.png`` (and PNGs when asked).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from distill.metrics._util import check_int
from distill.metrics.eval import Evaluator
from distill.metrics.eval_models import ImageGenerator
from distill.models.errors import ToolkitError

GRID_IMAGES = 64


def process_group() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This process's batches of image indices (global batches ``rank, rank + world_size, ...``)."""
    batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(batches) < world_size:
        raise ToolkitError(f"{n} images in batches of {batch_size} make {len(batches)} batch(es), fewer than the "
                           f"{world_size} processes; raise --n or lower --batch-size")
    return batches[rank::world_size]


def evaluate_model(generate: ImageGenerator, evaluator: Evaluator, prompts: Sequence[str] | None, *, n: int,
                   seed: int = 0, batch_size: int = 16, out_dir: str | Path | None = None, save_images: bool = False,
                   model_info: dict | None = None, prompts_file: str | Path | None = None,
                   progress: bool = True, labels: Sequence[int] | None = None, labels_info: dict | None = None) -> dict:
    """Generate ``n`` images (image ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``), score them,
    write ``out_dir/metrics.json`` and ``out_dir/grid.png``; returns the metrics.json content.

    A class-conditional student takes ``labels`` instead of prompts (image ``i``: ``labels[i mod L]``;
    ``generate(labels, seeds)``, :mod:`metrics.eval_labels`); diversity then groups images by class label,
    ``labels_info`` (spec, file, classes) goes into the protocol, and ``clip`` is refused (no prompts).
    """
    from torchvision.utils import save_image
    from tqdm.auto import tqdm

    check_int(n, "--n", 2)
    check_int(batch_size, "--batch-size", 1)
    check_int(seed, "--seed", 0)
    if labels is not None and prompts:
        raise ToolkitError("pass prompts (text-to-image students) or labels (class-conditional students), not both")
    if labels is None and "accuracy" in evaluator.metrics:
        raise ToolkitError("accuracy needs class labels (a class-conditional student); drop it from --metrics")
    if labels is not None and "clip" in evaluator.metrics:
        raise ToolkitError("clip scores images against prompts; a class-conditional student has labels: drop clip "
                           "from --metrics")
    conditions = list(labels) if labels is not None else prompts
    if not conditions:
        raise ToolkitError("no labels given" if labels is not None else "no prompts given")
    rank, world = process_group()
    mine = shard_batches(n, batch_size, rank, world)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    evaluator.prepare()
    grid: list[torch.Tensor] = []
    started = time.time()
    bar = tqdm(total=sum(len(b) for b in mine), desc="eval", unit="img", disable=not progress or rank != 0)

    def batches():
        for indices in mine:
            batch_conditions = [conditions[i % len(conditions)] for i in indices]
            images = generate(batch_conditions, [seed + i for i in indices])
            if images.shape[0] != len(indices):
                raise ToolkitError(f"the model returned {images.shape[0]} images for a batch of {len(indices)}")
            if rank == 0 and sum(g.shape[0] for g in grid) < GRID_IMAGES:
                grid.append(images[: GRID_IMAGES - sum(g.shape[0] for g in grid)].cpu())
            if save_images and out is not None:
                (out / "images").mkdir(parents=True, exist_ok=True)
                for i, image in zip(indices, images):
                    save_image(image.float() / 255, out / "images" / f"{i:05d}.png")
            bar.update(len(indices))
            yield list(indices), images, (batch_conditions if labels is None else None)

    # diversity groups: a prompt's position in the prompts file; a class label's value
    group = (lambda i: i % len(conditions)) if labels is None else (lambda i: conditions[i % len(conditions)])
    values = evaluator.score(batches(), groups=group,
                             labels=None if labels is None else (lambda i: conditions[i % len(conditions)]))
    bar.close()
    protocol = {"n": n, "seed": seed, "model": model_info or {}, "batch_size": batch_size, "processes": world,
                **evaluator.protocol()}
    if labels is None:
        protocol["seeds"] = f"image i: prompt i mod {len(prompts)}, seed {seed} + i"
        protocol["prompts"] = {"file": str(prompts_file) if prompts_file else None, "count": len(prompts),
                               "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    else:
        protocol["seeds"] = f"image i: class label labels[i mod {len(conditions)}], seed {seed} + i"
        protocol["labels"] = {"count": len(conditions),
                              "sha256": hashlib.sha256(",".join(map(str, conditions)).encode()).hexdigest(),
                              **(labels_info or {})}
        if "diversity" in protocol:
            protocol["diversity"]["groups"] = "images of the same class label (different seeds)"
    result = {"metrics": values, "protocol": protocol, "seconds": round(time.time() - started, 3)}
    if out is not None and rank == 0:
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if grid:
            save_image(torch.cat(grid).float() / 255, out / "grid.png", nrow=8)
    return result
