"""CLIP score (Hessel et al. 2021) against a hand computation with the same random-weight OpenCLIP model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill import metrics
from distill.metrics.clip_score import ClipModel, resolve_model
from distill.models.errors import ToolkitError

# Correctness tests: one intra-op thread (conftest); on a small shared machine two threads per
# process oversubscribe the cores and make LAPACK and small resizes many times slower.
pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)
CAPTIONS = ["a red square", "a photo of a cat", "noise", "two dogs on a beach", "", "a very long caption " * 20]


def tiny_clip(seed: int = 0) -> ClipModel:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    return ClipModel(model, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32"), "tiny")


def write_images(folder: Path, count: int, seed: int = 0) -> list[Image.Image]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        h, w = [(40, 40), (64, 33), (20, 50)][i % 3]
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(folder / f"{i:05d}.png")
        images.append(image)
    return images


def hand_computed(clip: ClipModel, images: list[Image.Image], captions: list[str], prefix: str = "") -> np.ndarray:
    with torch.no_grad():
        pixels = torch.stack([clip.preprocess(im.convert("RGB")) for im in images])
        image_features = clip.model.encode_image(pixels)
        text_features = clip.model.encode_text(clip.tokenizer([prefix + c for c in captions]))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (image_features * text_features).sum(-1).double().numpy()


def test_clip_score_equals_hand_computation(tmp_path):
    clip = tiny_clip()
    images = write_images(tmp_path / "imgs", len(CAPTIONS))
    cosines = hand_computed(clip, images, CAPTIONS)
    kw = dict(clip_model=clip, batch_size=4, progress=False)
    assert metrics.clip_score(tmp_path / "imgs", CAPTIONS, **kw) == pytest.approx(cosines.mean(), abs=1e-6)
    torchmetrics = np.maximum(100 * cosines, 0).mean()
    assert metrics.clip_score(images, CAPTIONS, convention="torchmetrics", **kw) == pytest.approx(torchmetrics, abs=1e-6)
    with_prefix = hand_computed(clip, images, CAPTIONS, prefix=metrics.DMD2_PREFIX)
    mean, scores = metrics.clip_score(images, CAPTIONS, prefix=metrics.DMD2_PREFIX, return_scores=True, **kw)
    np.testing.assert_allclose(scores.numpy(), with_prefix, atol=1e-6)
    assert mean == pytest.approx(with_prefix.mean(), abs=1e-6)


def test_prompts_file_and_tensor_images(tmp_path):
    clip = tiny_clip()
    images = write_images(tmp_path / "imgs", 3, seed=1)
    squares = [im.resize((40, 40)) for im in images]
    tensor = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in squares])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n\n", encoding="utf-8")
    expected = hand_computed(clip, squares, ["one", "two", "three"]).mean()
    kw = dict(clip_model=clip, progress=False)
    assert metrics.clip_score(tensor, prompts, **kw) == pytest.approx(expected, abs=1e-6)
    as_float = tensor.float() / 255
    assert metrics.clip_score(as_float, prompts, value_range=(0, 1), **kw) == pytest.approx(expected, abs=1e-6)


def test_inputs_checked_before_the_model_loads(tmp_path, monkeypatch):
    clip_module = sys.modules["distill.metrics.clip_score"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(clip_module, "load_clip", no_model)
    write_images(tmp_path / "imgs", 3)
    with pytest.raises(ToolkitError, match="3 images but 2 captions"):
        metrics.clip_score(tmp_path / "imgs", ["a", "b"])
    with pytest.raises(ToolkitError, match="prompts file not found"):
        metrics.clip_score(tmp_path / "imgs", tmp_path / "missing.txt")
    with pytest.raises(ToolkitError, match="convention"):
        metrics.clip_score(tmp_path / "imgs", ["a", "b", "c"], convention="clip100")


def test_model_and_weights_resolution():
    with pytest.warns(UserWarning, match="QuickGELU"):
        assert resolve_model("ViT-B-32", "openai") == ("ViT-B-32-quickgelu", False)
    assert resolve_model("ViT-B-32-quickgelu", "openai") == ("ViT-B-32-quickgelu", False)
    assert resolve_model("ViT-g-14", "laion2b_s12b_b42k") == ("ViT-g-14", False)
    with pytest.raises(ToolkitError, match="unknown pretrained tag"):
        resolve_model("ViT-g-14", "laion5b")
    with pytest.raises(ToolkitError, match="weights file not found"):
        resolve_model("ViT-g-14", "/nowhere/open_clip_pytorch_model.bin")
    with pytest.raises(ToolkitError, match="unknown OpenCLIP model"):
        resolve_model("ViT-Q-99", None)


def test_local_dir_model_and_missing_weights(tmp_path):
    """An OpenCLIP ``local-dir:`` folder loads offline; a tag with no cached weights is one line."""
    clip = tiny_clip(seed=3)
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.save(clip.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    loaded = metrics.load_clip(f"local-dir:{folder}", None, device="cpu")
    images = write_images(tmp_path / "imgs", 2)
    kw = dict(progress=False)
    assert metrics.clip_score(images, ["x", "y"], clip_model=loaded, **kw) == pytest.approx(
        hand_computed(clip, images, ["x", "y"]).mean(), abs=1e-6
    )
    # no network, empty Hugging Face cache: a one-line error naming the way out
    code = "import metrics; metrics.load_clip('ViT-B-32', 'laion2b_s34b_b79k', device='cpu')"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ToolkitError: CLIP weights ViT-B-32 / laion2b_s34b_b79k are not available offline" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in last and "HF_HUB_OFFLINE=1" in last
