"""``distill encode-prompts`` and ``distill encode-latents``: precompute what a run reads, in sharded safetensors.

* ``encode-prompts PROMPTS --teacher PIPE --out DIR``: every text embedding the teacher's UNet needs (SDXL:
  ``prompt_embeds`` [77, 2048] and ``pooled_prompt_embeds`` [1280]; SD1.5: ``prompt_embeds`` [77, 768]) plus
  the embedding of ``""`` (``uncond.safetensors``). A run with ``data.prompts=DIR`` trains without
  constructing the text encoders. SDXL's ``add_time_ids`` are not stored: they follow ``data.resolution``.
  Flow-transformer teachers (SD3, FLUX, Sana, Z-Image: ``distill.models.backbones``) store their adapter's
  ``fields`` (the transformer's text inputs, e.g. FLUX's ``encoder_hidden_states`` [L, D] and
  ``pooled_projections``; masks as they are) and their unconditional branch; ``--max-sequence-length`` must be
  the recipe's ``teacher.max_sequence_length`` (the manifest records it and a run checks it).
* ``encode-latents IMAGES --teacher PIPE --out DIR --resolution R``: VAE latents (posterior mean times the
  VAE's scaling factor) of a folder of images with same-name ``.txt`` captions, each resized to cover R with
  its aspect ratio kept and centre-cropped; the captions go with them, and their embeddings too (so a GAN
  run needs no text encoder either).

Both run in several processes (``torchrun --nproc_per_node N -m distill.cli encode-latents ...``): process
``r`` of ``N`` writes shards ``r, r + N, ...``; shards already present are skipped, so an interrupted
encoding resumes. Reading is lazy (:mod:`distill.shards`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

from distill.models.errors import ToolkitError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(subparsers) -> None:
    p = subparsers.add_parser("encode-prompts", help="cache text embeddings in sharded safetensors",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", help="prompt file (.txt, .jsonl, .csv, .parquet)")
    _common(p)
    p.add_argument("--caption-column", default=None, help="column of .jsonl / .csv / .parquet files")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="flow-transformer teachers: text tokens per prompt (the recipe's teacher.max_sequence_length; "
                        "default: the adapter's)")
    p.set_defaults(func=cmd_encode_prompts)

    p = subparsers.add_parser("encode-latents", help="VAE latents of captioned images in sharded safetensors",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="folder of images with same-name .txt captions")
    _common(p)
    p.add_argument("--resolution", required=True, help="image size in pixels: R or HxW (e.g. 1024 or 768x1344)")
    p.add_argument("--no-caption-embeddings", action="store_true",
                   help="store captions only (runs then encode them with the text encoders)")
    p.set_defaults(func=cmd_encode_latents)


def _common(p) -> None:
    p.add_argument("--teacher", required=True, help="the teacher pipeline (folder or cached Hub id) of the run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="items per shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                   help="stored dtype (float16 / bfloat16 halve the disk; float32 is exact)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _device(arg: str | None) -> str:
    if arg:
        return arg
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _check(args) -> None:
    if args.shard_size <= 0 or args.batch_size <= 0:
        raise ToolkitError("--shard-size and --batch-size must be positive")


def _parse_resolution(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise ToolkitError(f"--resolution must look like 1024 or 768x1344, got {text!r}")
    return (values[0], values[-1])


def _write_sets(out: Path, count: int, shard_size: int, make_shard, manifest: dict) -> int:
    """Write this process's missing shards; ``make_shard(start, stop) -> (tensors, captions)``. Returns shards written."""
    from distill.shards import MANIFEST, num_shards, shard_path, write_manifest, write_shard

    rank, world = _rank_world()
    existing = out / MANIFEST
    if existing.is_file():  # resuming is only safe into the same set: shards already there are skipped
        old = json.loads(existing.read_text())
        keys = ("kind", "teacher", "count", "shard_size", "fields", "source_sha256", "resolution", "conditioner")
        changed = [k for k in keys if old.get(k) != manifest.get(k)]
        if changed:
            raise ToolkitError(f"{out} already holds another set (different {', '.join(changed)}); choose another "
                               f"--out or delete it")
    write_manifest(out, manifest)
    written = 0
    for shard in range(rank, num_shards(count, shard_size), world):
        if shard_path(out, shard).is_file():
            continue
        start, stop = shard * shard_size, min(count, (shard + 1) * shard_size)
        tensors, captions = make_shard(start, stop)
        write_shard(out, shard, tensors, captions)
        written += 1
    return written


def _sha256(items: list[str]) -> str:
    """Identity of a set's sources (prompts, or image paths and captions), to refuse mixing two sets."""
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to the stored dtype; masks (bool / integer, Sana's and Z-Image's) stay as they are."""
    return x.to(dtype) if x.is_floating_point() else x


def _embed(conditioner, texts: list[str], batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(texts), batch_size):
        for k, v in conditioner.embed(texts[i:i + batch_size]).items():
            parts.setdefault(k, []).append(_cast(v, dtype).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _write_uncond(out: Path, conditioner, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    rank, _ = _rank_world()
    if rank == 0:
        tmp = out / f".uncond.{os.getpid()}"
        from distill.datasets import uncond_embedding

        uncond = uncond_embedding(conditioner)
        save_file({k: _cast(v, dtype).contiguous().cpu() for k, v in uncond.items()}, str(tmp))
        os.replace(tmp, out / "uncond.safetensors")


def _flow_kind(teacher: str) -> str | None:
    """The flow-transformer adapter of a teacher pipeline (SD3, FLUX, Sana, Z-Image, ...), or None for a UNet."""
    from distill.models.backbones.common import detect_flow_kind
    from distill.models.loading import _model_index, resolve_pipeline_dir

    folder = resolve_pipeline_dir(teacher)
    return detect_flow_kind(str(_model_index(folder).get("_class_name", "")))


def _load_teacher(teacher: str, device: str, max_sequence_length: int | None = None):
    """The teacher's components without its VAE: its conditioner encodes the prompts (UNet or flow adapter)."""
    from distill.models.loading import load_pipeline_components, resolve_pipeline_dir

    kind = _flow_kind(teacher)
    if kind is None:
        if max_sequence_length is not None:
            raise ToolkitError("--max-sequence-length applies to flow-transformer teachers; UNet teachers use 77 tokens")
        return load_pipeline_components(teacher, device=device, load_vae=False)
    from distill.models.backbones.common import load_flow_components

    options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    return load_flow_components(resolve_pipeline_dir(teacher), kind, device=device, load_vae=False,
                                conditioner_options=options)


def encode_prompts(prompts: list[str], teacher: str, out: str | Path, shard_size: int = 1000, batch_size: int = 32,
                   dtype: torch.dtype = torch.float32, device: str = "cpu",
                   max_sequence_length: int | None = None) -> Path:
    """Write the embedding set of ``prompts`` for ``teacher`` to ``out`` (this process's shards)."""
    from distill.datasets import PROMPT_SET
    from distill.shards import field_spec

    parts = _load_teacher(teacher, device, max_sequence_length)
    conditioner, out = parts.conditioner, Path(out)
    spec = field_spec(_embed(conditioner, prompts[:1], 1, dtype))
    manifest = {"kind": PROMPT_SET, "model_kind": parts.kind, "teacher": os.fspath(teacher), "count": len(prompts),
                "shard_size": shard_size, "fields": spec, "source_sha256": _sha256(prompts)}
    if hasattr(conditioner, "cache_settings"):  # what else shaped the embeddings (a run must use the same)
        manifest["conditioner"] = conditioner.cache_settings()
    _write_sets(out, len(prompts), shard_size,
                lambda a, b: (_embed(conditioner, prompts[a:b], batch_size, dtype), prompts[a:b]), manifest)
    _write_uncond(out, conditioner, dtype)
    return out


def encode_latents(images: str | Path, teacher: str, out: str | Path, resolution: tuple[int, int],
                   shard_size: int = 1000, batch_size: int = 32, dtype: torch.dtype = torch.float32,
                   device: str = "cpu", caption_embeddings: bool = True) -> Path:
    """Write the latent set of the captioned images under ``images`` to ``out`` (this process's shards)."""
    from distill.datasets import LATENT_SET, caption_of, encode_images, image_files, load_image
    from distill.models.loading import load_pipeline_components
    from distill.shards import field_spec

    if _flow_kind(teacher) is not None:  # not wired (loading, manifest) nor tested for them yet
        raise ToolkitError("encode-latents supports UNet teachers (SDXL, SD1.5) only; for flow-transformer teachers "
                           "cache the prompts with encode-prompts")
    files = image_files(images)
    if not files:
        raise ToolkitError(f"no images under {images} (png, jpg, jpeg, webp, bmp with same-name .txt captions)")
    captions = [caption_of(f) for f in files]  # every caption is checked before the models load
    parts = load_pipeline_components(teacher, device=device, load_text_encoders=caption_embeddings)
    vae, conditioner, out = parts.vae, parts.conditioner, Path(out)
    factor = parts.vae_scale_factor
    if resolution[0] % factor or resolution[1] % factor:
        raise ToolkitError(f"--resolution {resolution[0]}x{resolution[1]} must divide by the VAE's scale factor "
                           f"{factor}")

    def make_shard(start: int, stop: int):
        latents = []
        for i in range(start, stop, batch_size):
            batch = torch.stack([load_image(f, resolution) for f in files[i:min(stop, i + batch_size)]])
            latents.append(encode_images(vae, batch).to(dtype).cpu())
        tensors = {"latents": torch.cat(latents)}
        if caption_embeddings:
            tensors.update(_embed(conditioner, captions[start:stop], batch_size, dtype))
        return tensors, captions[start:stop]

    first, _ = make_shard(0, 1)
    manifest = {"kind": LATENT_SET, "model_kind": parts.kind, "teacher": os.fspath(teacher),
                "count": len(files), "shard_size": shard_size, "fields": field_spec(first),
                "resolution": list(resolution), "scaling_factor": parts.scaling_factor,
                "source_sha256": _sha256([f"{f.relative_to(images)}\t{c}" for f, c in zip(files, captions)]),
                "transform": "resize to cover (bicubic, aspect kept), centre crop, VAE posterior mean x scaling_factor"}
    _write_sets(out, len(files), shard_size, make_shard, manifest)
    if caption_embeddings:
        _write_uncond(out, conditioner, dtype)
    return out


def cmd_encode_prompts(args: argparse.Namespace) -> int:
    from distill.prompt_files import read_prompts

    _check(args)
    prompts = read_prompts(args.prompts, args.caption_column)
    out = encode_prompts(prompts, args.teacher, args.out, args.shard_size, args.batch_size, _DTYPES[args.dtype],
                         _device(args.device), args.max_sequence_length)
    print(f"encoded {len(prompts)} prompts into {out}")
    return 0


def cmd_encode_latents(args: argparse.Namespace) -> int:
    _check(args)
    resolution = _parse_resolution(args.resolution)
    if not Path(args.images).is_dir():
        raise ToolkitError(f"image folder not found: {args.images}")
    out = encode_latents(args.images, args.teacher, args.out, resolution, args.shard_size, args.batch_size,
                         _DTYPES[args.dtype], _device(args.device), not args.no_caption_embeddings)
    print(f"encoded the images of {args.images} into {out}")
    return 0
