"""The COCO zero-shot text-to-image protocol (GigaGAN, Kang et al. 2023; DMD2, Yin et al. 2024): prompts and
reference images from a user's COCO captions file and image folder.

DMD2 and GigaGAN report zero-shot FID on MS-COCO 2014 val with 10k or 30k captions: the model makes one
image per caption; the reference is the captioned real images, centre-cropped to a square and resized
with PIL's LANCZOS filter to the evaluation resolution (512 for SD1.5-class, 1024 or 512 for SDXL
students), then both sets go through clean-fid's pipeline (:mod:`metrics.fid`). Here:

1. images with at least one caption are listed in the captions file's order and ``n`` of them drawn
   with a seeded permutation (``numpy.random.default_rng(seed)``); each keeps its first caption;
2. each image is ``convert("RGB")``-ed, centre-cropped to ``min(w, h)`` and resized to ``resolution``
   with ``Image.LANCZOS``, and saved as ``OUT/images/00000.png, ...`` (PNG: lossless);
3. ``OUT/prompts.txt`` holds caption ``i`` on line ``i`` (newlines inside a caption become spaces);
4. ``OUT/coco_protocol.json`` records the choices and hashes; ``OUT/ref_inception.npz`` the Inception
   statistics (unless ``--no-stats``).

Then ``distill eval MODEL --prompts OUT/prompts.txt --ref OUT/images --n N`` (image ``i`` uses prompt
``i``). Captions file: COCO's ``captions_val2014.json`` (``images`` and ``annotations``), or a TSV of
``file_name<TAB>caption`` lines. The COCO files are not downloaded here: bring them.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from distill.metrics._util import check_int, first_line
from distill.models.errors import ToolkitError

PROTOCOL = ("COCO zero-shot (GigaGAN / DMD2): n captioned images drawn with a seeded permutation, first caption "
            "each; reference = centre crop to a square, PIL LANCZOS resize to the eval resolution, PNG; then clean-fid")


def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(file_name, caption)`` pairs, one per captioned image, in the file's order (first caption of each image)."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"captions file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            names = {image["id"]: image["file_name"] for image in data["images"]}
            pairs: dict[str, str] = {}
            for ann in data["annotations"]:
                pairs.setdefault(names[ann["image_id"]], ann["caption"])
        except (ValueError, KeyError, TypeError) as err:
            raise ToolkitError(f"{path} is not a COCO captions file (images, annotations): {first_line(err)}") from None
        items = list(pairs.items())
    else:
        items, seen = [], set()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            name, tab, caption = line.partition("\t")
            if not tab:
                raise ToolkitError(f"{path}:{number}: expected file_name<TAB>caption")
            if name not in seen:
                seen.add(name)
                items.append((name, caption))
    if not items:
        raise ToolkitError(f"{path} holds no captions")
    return [(name, " ".join(caption.split())) for name, caption in items]


def centre_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """RGB, centre crop to a square of the shorter side, LANCZOS resize to ``resolution``."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)


def make_coco_reference(captions: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                        n: int = 10000, resolution: int = 512, seed: int = 0, workers: int = 4,
                        stats: bool = True, inception_path=None, device=None, progress: bool = True) -> dict:
    """Write ``out/prompts.txt``, ``out/images/``, ``out/coco_protocol.json`` (and ``out/ref_inception.npz``)."""
    check_int(n, "--n", 2)
    check_int(resolution, "--resolution", 16)
    check_int(seed, "--seed", 0)
    check_int(workers, "--workers", 1)
    pairs = read_captions(captions)
    folder = Path(images)
    if not folder.is_dir():
        raise ToolkitError(f"image folder not found: {folder}")
    if n > len(pairs):
        raise ToolkitError(f"--n {n} is more than the {len(pairs)} captioned images in {captions}")
    chosen = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))[:n]]
    missing = [name for name, _ in chosen if not (folder / name).is_file()]
    if missing:
        raise ToolkitError(f"{len(missing)} of {n} chosen images are not in {folder}, e.g. {missing[0]}")
    if stats:  # the weights are looked for before the slow conversion, not after it
        from distill.metrics.inception import find_inception_weights

        find_inception_weights(inception_path)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    def convert(item: tuple[int, str]) -> None:
        index, name = item
        try:
            with Image.open(folder / name) as image:
                centre_crop_resize(image, resolution).save(out / "images" / f"{index:05d}.png")
        except OSError as err:
            raise ToolkitError(f"cannot read image {folder / name}: {first_line(err)}") from None

    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding and resizing
        list(pool.map(convert, enumerate(name for name, _ in chosen)))
    prompts = [caption for _, caption in chosen]
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    protocol = {"protocol": PROTOCOL, "n": n, "resolution": resolution, "seed": seed, "captions": str(captions),
                "images": str(folder), "files": [name for name, _ in chosen],
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    if stats:
        from distill.metrics.fid import compute_stats

        path = compute_stats(out / "images", inception_path=inception_path, device=device,
                             progress=progress).save(out / "ref_inception.npz")
        protocol["reference_statistics"] = str(path)
    (out / "coco_protocol.json").write_text(json.dumps(protocol, indent=1) + "\n")
    return protocol
