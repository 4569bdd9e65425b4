"""Text-to-image data: prompt file formats, ``encode-prompts`` / ``encode-latents`` caches, lazy shards.

* Prompt files: .txt, .jsonl, .csv (caption column), .parquet (or a clear error without pyarrow).
* Training from cached embeddings and cached latents gives the losses of training from the text encoders and
  in-memory latents (1e-5), and never constructs a text encoder.
* Images are resized to cover the target with their aspect ratio kept and centre-cropped; an image folder
  used as ``data.real`` gives the latents ``encode-latents`` stored; several writer processes share the shards.
* A 20,000-item prompt set and latent set: starting a run touches only the shards it needs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main as cli_main
from distill.models.errors import ToolkitError
from tests.test_recipes_t2i import write_captioned_images

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse", "a bowl of fruit",
           "a castle on a mountain"]
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sdxl_dmd2_4step.yaml"


# ------------------------------------------------------------------------------------------ prompt files
def test_prompt_file_formats(tmp_path):
    from distill.prompt_files import read_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    (tmp_path / "p.jsonl").write_text('{"id": 1, "caption": "a cat"}\n\n{"id": 2, "caption": "a dog"}\n')
    (tmp_path / "p.csv").write_text('id,text\n1,"a cat"\n2,"a dog, running"\n')
    (tmp_path / "q.jsonl").write_text('{"id": 1, "title": "a cat"}\n')
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.csv") == ["a cat", "a dog, running"]
    assert read_prompts(tmp_path / "q.jsonl", column="title") == ["a cat"]
    with pytest.raises(ToolkitError, match="no caption column: expected one of caption, prompt, text"):
        read_prompts(tmp_path / "q.jsonl")
    with pytest.raises(ToolkitError, match="unknown prompt file type '.tsv'"):
        (tmp_path / "p.tsv").write_text("x")
        read_prompts(tmp_path / "p.tsv")
    pq = pytest.importorskip("pyarrow.parquet")  # a dev dependency
    import pyarrow as pa

    pq.write_table(pa.table({"id": [1, 2], "caption": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["a cat", "a dog"]
    with pytest.MonkeyPatch.context() as mp:  # without pyarrow: one clear line
        mp.setitem(sys.modules, "pyarrow", None)
        mp.setitem(sys.modules, "pyarrow.parquet", None)
        with pytest.raises(ToolkitError, match="needs pyarrow"):
            read_prompts(tmp_path / "p.parquet")


def test_load_image_keeps_aspect_and_centre_crops(tmp_path):
    from PIL import Image

    from distill.datasets import load_image

    data = torch.zeros(32, 96, 3, dtype=torch.uint8)  # 96 wide, 32 high: thirds red, green, blue
    data[:, :32, 0], data[:, 32:64, 1], data[:, 64:, 2] = 255, 255, 255
    Image.fromarray(data.numpy()).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", (16, 16))  # scale 1/2 -> 48 x 16, keep the middle 16 columns
    assert image.shape == (3, 16, 16)
    assert image[1, :, 3:13].min() > 0.9 and image[0, :, 3:13].max() < -0.9 and image[2, :, 3:13].max() < -0.9
    tall = load_image(tmp_path / "wide.png", (64, 16))  # covers 64 high: 192 x 64, middle 16 columns green
    assert tall.shape == (3, 64, 16) and tall[1].mean() > 0.9


# ------------------------------------------------------------------------------------------ caches
@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_sdxl_dir):
    root = tmp_path_factory.mktemp("caches")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    images = write_captioned_images(root / "images")
    assert cli_main(["encode-prompts", str(root / "prompts.txt"), "--teacher", tiny_sdxl_dir, "--out",
                     str(root / "emb"), "--shard-size", "2", "--batch-size", "3", "--device", "cpu"]) == 0
    assert cli_main(["encode-latents", str(images), "--teacher", tiny_sdxl_dir, "--out", str(root / "lat"),
                     "--resolution", "32", "--shard-size", "4", "--device", "cpu"]) == 0
    return root, images


def _losses(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "loss" in k}
            for line in (run / "log.jsonl").read_text().splitlines()]


def test_cached_embeddings_and_latents_train_like_text_encoders_and_memory(caches, tiny_sdxl_dir, tmp_path,
                                                                            monkeypatch):
    from safetensors.torch import save_file

    from distill.shards import ShardedSet

    root, _ = caches
    emb = ShardedSet(root / "emb", "prompt-embeddings")
    assert len(emb) == 5 and emb.manifest["model_kind"] == "sdxl"
    assert emb.fields == {"prompt_embeds": {"shape": [77, 80], "dtype": "float32"},
                          "pooled_prompt_embeds": {"shape": [48], "dtype": "float32"}}
    lat = ShardedSet(root / "lat", "latents")
    assert len(lat) == 6 and set(lat.fields) == {"latents", "prompt_embeds", "pooled_prompt_embeds"}
    # the same latents in memory: a .safetensors file with the captions beside it
    save_file({"latents": lat.get(range(6), ["latents"])["latents"]}, str(tmp_path / "real.safetensors"))
    (tmp_path / "real.txt").write_text("\n".join(lat.captions(range(6))) + "\n")

    common = [f"teacher.path={tiny_sdxl_dir}", "teacher.dtype=float32", "data.resolution=32", "data.batch_size=2",
              "train.steps=3", "train.log_every=1", "train.mixed_precision='no'", "method.generator_every=2",
              "generator_optim.lr=1e-3", "generator_optim.warmup_steps=0", "critic_optim.warmup_steps=0"]
    assert cli_main(["train", str(RECIPE), "--out", str(tmp_path / "text"), "--no-progress", *common,
                     f"data.prompts={root / 'prompts.txt'}", f"data.real={tmp_path / 'real.safetensors'}"]) == 0

    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was constructed")

    for cls in (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, transformers.CLIPTokenizer):
        monkeypatch.setattr(cls, "__init__", refuse)
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    assert cli_main(["train", str(RECIPE), "--out", str(tmp_path / "cached"), "--no-progress", *common,
                     f"data.prompts={root / 'emb'}", f"data.real={root / 'lat'}"]) == 0
    text, cached = _losses(tmp_path / "text"), _losses(tmp_path / "cached")
    assert len(text) == 3 and all(r["loss_fake"] > 0 and "loss_d_gan" in r for r in text)
    assert [sorted(r) for r in text] == [sorted(r) for r in cached]
    for a, b in zip(text, cached):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_image_folder_as_real_equals_encoded_latents(caches, tiny_sdxl_dir):
    from distill.datasets import ImageFolderLatents, ShardedLatents
    from distill.models.loading import load_pipeline_components

    root, images = caches
    parts = load_pipeline_components(tiny_sdxl_dir)
    folder = ImageFolderLatents(images, parts.vae, (32, 32), parts.conditioner)
    sharded = ShardedLatents(root / "lat", parts.conditioner)
    idx = [3, 4, 5, 0]  # across a shard boundary (shard size 4) and wrapping
    a, cond_a = folder.get(idx)
    b, cond_b = sharded.get(idx)
    assert a.shape == (4, 4, 8, 8) and (a - b).abs().max().item() < 1e-5
    emb_a, emb_b = cond_a.kwargs["encoder_hidden_states"], cond_b.kwargs["encoder_hidden_states"]
    assert (emb_a - emb_b).abs().max().item() < 1e-5 and sharded.set.shards_read == {0, 1}
    assert sharded.set.captions(idx) == ["the sea", "a bird", "a cup", "a dog"]


def test_parallel_writers_share_shards_and_incomplete_sets_are_refused(caches, tiny_sdxl_dir, tmp_path,
                                                                         monkeypatch):
    from distill.encode import encode_prompts
    from distill.shards import ShardedSet

    root, _ = caches
    out = tmp_path / "emb2"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    encode_prompts(PROMPTS, tiny_sdxl_dir, out, shard_size=2)  # rank 1 of 2: shard 1 only
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.safetensors"]
    with pytest.raises(ToolkitError, match="incomplete: 2 shard\\(s\\) missing, e.g. shard-00000"):
        ShardedSet(out)
    monkeypatch.setenv("RANK", "0")
    encode_prompts(PROMPTS, tiny_sdxl_dir, out, shard_size=2)  # rank 0: shards 0 and 2
    whole, reference = ShardedSet(out), ShardedSet(root / "emb")
    assert torch.equal(whole.get(range(5))["prompt_embeds"], reference.get(range(5))["prompt_embeds"])
    with pytest.raises(ToolkitError, match="already holds another set \\(different source_sha256\\)"):
        encode_prompts(PROMPTS[::-1], tiny_sdxl_dir, out, shard_size=2)  # would skip the shards written above


# ------------------------------------------------------------------------------------------ lazy at scale
_PROBE = r"""
import json, resource, sys
import distill.shards as shards
opened = {}
original = shards.ShardedSet._shard
def record(self, index):
    opened.setdefault(self.manifest["kind"], set()).add(index)
    return original(self, index)
shards.ShardedSet._shard = record
from distill.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "opened": {k: sorted(v) for k, v in opened.items()}}))
"""


def _synthetic_sets(folder: Path, count: int, shard_size: int) -> int:
    """A prompt-embedding set and a latent set of ``count`` items for the tiny SDXL (float16); returns shard bytes."""
    from distill.shards import num_shards, write_manifest, write_shard

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(shard_size, 77, 80, generator=g).half()
    pooled = torch.randn(shard_size, 48, generator=g).half()
    latents = torch.randn(shard_size, 4, 8, 8, generator=g).half()
    for kind, tensors in (("prompt-embeddings", {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}),
                          ("latents", {"latents": latents})):
        out = folder / kind
        write_manifest(out, {"kind": kind, "model_kind": "sdxl", "count": count, "shard_size": shard_size,
                             "fields": {k: {"shape": list(v.shape[1:]), "dtype": "float16"} for k, v in tensors.items()}})
        for s in range(num_shards(count, shard_size)):
            n = min(shard_size, count - s * shard_size)
            write_shard(out, s, {k: v[:n] for k, v in tensors.items()},
                        captions=[f"a photo of a cat {s * shard_size + i}" for i in range(n)] if kind == "latents"
                        else None)
    return (emb.numel() + pooled.numel()) * 2


@pytest.mark.slow  # two subprocesses and ~270 MB of shards
def test_starting_a_run_on_20000_items_touches_only_its_shards(tiny_sdxl_dir, tmp_path):
    shard_size = 2000
    sizes = {}
    for count in (2000, 20000):
        folder = tmp_path / str(count)
        shard_bytes = _synthetic_sets(folder, count, shard_size)
        args = ["train", str(RECIPE), "--out", str(folder / "run"), "--no-progress", f"teacher.path={tiny_sdxl_dir}",
                "teacher.dtype=float32", f"data.prompts={folder / 'prompt-embeddings'}",
                f"data.real={folder / 'latents'}", "data.resolution=32", "data.batch_size=4", "train.steps=2",
                "train.mixed_precision='no'", "train.log_every=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300,
                              env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        sizes[count] = json.loads(done.stdout.strip().splitlines()[-1])
        assert sizes[count]["code"] == 0
        # steps 0 and 1 read items 0..7: the first shard of each set, nothing else
        assert sizes[count]["opened"] == {"prompt-embeddings": [0], "latents": [0]}
    growth = (sizes[20000]["maxrss_kb"] - sizes[2000]["maxrss_kb"]) * 1024
    whole = 10 * shard_bytes  # the prompt set alone, were it loaded: ~246 MB
    print(f"peak RSS 2,000 items {sizes[2000]['maxrss_kb'] / 1024:.0f} MB, 20,000 items "
          f"{sizes[20000]['maxrss_kb'] / 1024:.0f} MB; one shard {shard_bytes / 2**20:.1f} MB")
    assert growth < 2 * shard_bytes and whole == 10 * shard_bytes


def _cond_tensors(cond) -> dict:
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value
    walk("cond", cond.kwargs)
    walk("uncond", cond.uncond)
    return out


@pytest.mark.parametrize("family", ["sdxl", "sdxl-empty", "sd15", "flux"])
def test_text_prompts_encode_each_prompt_once(family, request):
    """A prompt file's Cond built from each prompt's kept embedding equals the conditioner's own batch encoding
    (both branches); each prompt is encoded once; past the byte bound nothing more is kept and batches are
    encoded as before."""
    from unittest import mock

    from distill.datasets import TextPrompts
    from distill.models.backbones.common import load_flow_components
    from distill.models.loading import load_pipeline_components

    if family == "flux":
        conditioner = load_flow_components(request.getfixturevalue("tiny_flux_dir"), "flux", resolution=32,
                                           load_vae=False, conditioner_options={"max_sequence_length": 16}).conditioner
    else:
        folder = request.getfixturevalue("tiny_sd15_dir" if family == "sd15" else "tiny_sdxl_dir")
        uncond = {"uncond": "empty"} if family == "sdxl-empty" else {}
        conditioner = load_pipeline_components(folder, load_vae=False, **uncond).conditioner
    prompts = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse", "a bowl of fruit"]
    kept = TextPrompts(prompts, conditioner)
    encoded, embed = [], conditioner.embed

    def counting_embed(texts):
        encoded.extend(texts)
        return embed(texts)

    with mock.patch.object(conditioner, "embed", counting_embed):
        for indices in ([0, 1], [1, 2, 3, 0], [3, 3], [2, 0]):
            got, want = _cond_tensors(kept.cond(indices)), _cond_tensors(conditioner([prompts[i] for i in indices]))
            assert got.keys() == want.keys()
            for key, value in want.items():
                torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
    assert sorted(p for p in encoded if p) == sorted(prompts)  # each prompt once (and "" for the uncond branch)
    one = sum(v.numel() * v.element_size() for v in kept._kept[0].values())
    bounded = TextPrompts(prompts, conditioner, cache_bytes=2 * one)
    for indices in ([0, 1], [2, 3], [1, 2]):
        got, want = _cond_tensors(bounded.cond(indices)), _cond_tensors(conditioner([prompts[i] for i in indices]))
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
    assert sorted(bounded._kept) == [0, 1]
