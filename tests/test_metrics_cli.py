"""`distill fid`, `distill fid-stats` and `distill clip`: bad inputs give one line and exit 2, good ones a number.

The Inception weights cannot be downloaded here: a small random TorchScript module with the same
interface (a ``layers`` trunk giving 2048 features) stands in for ``inception-2015-12-05.pt``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from distill import metrics
from distill.cli import main
from distill.metrics.inception import INCEPTION_ENV, INCEPTION_FILENAME, INCEPTION_URL

# Correctness tests: one intra-op thread (conftest); on a small shared machine two threads per
# process oversubscribe the cores and make LAPACK and small resizes many times slower.
pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parents[1]
inception_module = sys.modules["distill.metrics.inception"]


class _FakeInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 13, stride=13), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2048)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No Inception weights anywhere: the env var names a missing file, clean-fid's folder is empty."""
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "no-such" / INCEPTION_FILENAME))
    monkeypatch.setattr(inception_module, "cleanfid_cache_dirs", lambda: [tmp_path / "cleanfid-tmp"])
    return tmp_path


@pytest.fixture
def fake_inception(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "weights" / INCEPTION_FILENAME
    path.parent.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_FakeInception()).save(str(path))
    return path


def write_images(folder: Path, count: int, seed: int, modes=("RGB",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        rgb = Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8))
        rgb.convert(modes[i % len(modes)]).save(folder / f"{i:03d}.png")
    return folder


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    good = write_images(tmp / "good", 3, seed=0)
    (tmp / "empty").mkdir()
    write_images(tmp / "single", 1, seed=1)
    corrupt = write_images(tmp / "corrupt", 3, seed=2)
    (corrupt / "001.png").write_bytes(b"not a png at all")
    (tmp / "notes.txt").write_text("hello")
    np.savez(tmp / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp / "stats32.npz", mu=np.zeros(32), sigma=np.eye(32))
    np.savez(tmp / "junk.npz", weights=np.zeros(3))
    (tmp / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    return {
        "missing path": (["fid", tmp / "missing", good], "path not found"),
        "empty folder": (["fid", good, tmp / "empty"], "no images"),
        "single image": (["fid", tmp / "single", good], "holds 1 image"),
        "corrupt file": (["fid", good, corrupt], "cannot read image"),
        "not a folder": (["fid", good, tmp / "notes.txt"], "neither an image folder nor an .npz"),
        "stats dim vs inception": (["fid", good, tmp / "stats64.npz"], "64-d statistics but Inception has 2048-d"),
        "stats dims differ": (["fid", tmp / "stats64.npz", tmp / "stats32.npz"], "32-d statistics but"),
        "npz without stats": (["fid", good, tmp / "junk.npz"], "no FID statistics"),
        "broken npz": (["fid", good, tmp / "broken.npz"], "cannot read"),
        "fid-stats empty": (["fid-stats", tmp / "empty", "--out", tmp / "o.npz"], "no images"),
        "not a number": (["fid", good, good, "--batch-size", "nan"], "argument --batch-size: invalid int value: 'nan'"),
        "fid-stats workers": (["fid-stats", good, "--out", tmp / "o.npz", "--workers", "x"], "invalid int value: 'x'"),
        "clip convention": (["clip", good, tmp / "notes.txt", "--convention", "nope"], "invalid choice: 'nope'"),
        "clip batch size": (["clip", good, tmp / "notes.txt", "--batch-size", "-1"], "--batch-size -1 is out of range"),
        "missing option": (["fid-stats", good], "the following arguments are required: --out"),
    }


BAD_CASES = [
    "missing path", "empty folder", "single image", "corrupt file", "not a folder", "stats dim vs inception",
    "stats dims differ", "npz without stats", "broken npz", "fid-stats empty", "not a number", "fid-stats workers",
    "clip convention", "clip batch size", "missing option",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_fail_with_one_line_before_any_network(case, offline, capsys):
    argv, fragment = _bad_inputs(offline)[case]
    code, out, err = run(argv, capsys)
    assert_one_line_error(code, err, fragment)
    assert INCEPTION_FILENAME not in err  # the input was rejected before the weights were looked for


def test_missing_inception_weights_offline(offline, capsys):
    a, b = write_images(offline / "a", 3, seed=0), write_images(offline / "b", 3, seed=1)
    code, out, err = run(["fid", a, b], capsys)
    assert_one_line_error(code, err, INCEPTION_FILENAME, INCEPTION_URL, str(offline / "no-such"), str(offline / "cleanfid-tmp"))


def test_fid_and_fid_stats_commands(offline, fake_inception, capsys):
    mixed = write_images(offline / "mixed", 12, seed=3, modes=("RGB", "L", "RGBA", "P"))
    as_rgb = offline / "as_rgb"
    as_rgb.mkdir()
    for file in sorted(mixed.iterdir()):
        Image.open(file).convert("RGB").save(as_rgb / file.name)
    other = write_images(offline / "other", 10, seed=4)
    flags = ["--inception", fake_inception, "--workers", "0", "--no-progress", "--json"]

    code, out, err = run(["fid", mixed, other, *flags], capsys)
    assert code == 0, err
    value = json.loads(out)["fid"]
    assert np.isfinite(value) and value > 0
    assert all(line.startswith("warning: ") for line in err.splitlines())  # rank-deficient: 12 < 2048
    code, out, _ = run(["fid", as_rgb, other, *flags], capsys)
    assert json.loads(out)["fid"] == pytest.approx(value, rel=1e-9)  # grey, RGBA, palette are read as RGB

    code, out, err = run(["fid-stats", other, "--out", offline / "other_stats.npz", *flags], capsys)
    assert code == 0, err
    assert json.loads(out) == {"out": str(offline / "other_stats.npz"), "n": 10, "dim": 2048}
    manifest = metrics.Stats.load(offline / "other_stats.npz").manifest
    assert manifest["count"] == 10 and manifest["weights_sha256"] and manifest["extractor"] == INCEPTION_FILENAME
    code, out, _ = run(["fid", mixed, offline / "other_stats.npz", *flags], capsys)
    assert json.loads(out)["fid"] == pytest.approx(value, rel=1e-9)
    # two statistics files need no network at all (the weights are missing here)
    code, out, err = run(["fid", offline / "other_stats.npz", offline / "other_stats.npz", "--json"], capsys)
    assert code == 0 and abs(json.loads(out)["fid"]) < 1e-6, err
    code, out, _ = run(["fid", mixed, other, "--inception", fake_inception, "--workers", "0", "--no-progress"], capsys)
    assert out.startswith("FID: ")


def test_real_subprocess_prints_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", INCEPTION_ENV: str(tmp_path / "none.pt"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", "fid", str(tmp_path / "gen"), str(tmp_path / "ref")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: path not found: {tmp_path / 'gen'}"


def test_clip_command(tmp_path, capsys):
    from tests.test_clip_score import TINY_CLIP, hand_computed, tiny_clip
    from tests.test_clip_score import write_images as write_clip_images

    clip = tiny_clip(seed=5)
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.save(clip.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    images = write_clip_images(tmp_path / "imgs", 3)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na bird\n")
    model = ["--model", f"local-dir:{folder}", "--device", "cpu", "--no-progress"]

    code, out, err = run(["clip", tmp_path / "imgs", tmp_path / "prompts.txt", *model, "--json", "--prefix", "A photo depicts "], capsys)
    assert code == 0, err
    expected = hand_computed(clip, images, ["a cat", "a dog", "a bird"], prefix="A photo depicts ").mean()
    assert json.loads(out)["clip_score"] == pytest.approx(expected, abs=1e-6)
    code, out, err = run(["clip", tmp_path / "imgs", tmp_path / "prompts.txt", *model, "--convention", "torchmetrics"], capsys)
    assert code == 0 and out.startswith("CLIP score (torchmetrics"), err

    (tmp_path / "two.txt").write_text("a cat\na dog\n")
    code, _, err = run(["clip", tmp_path / "imgs", tmp_path / "two.txt", *model], capsys)
    assert_one_line_error(code, err, "3 images but 2 captions")
    code, _, err = run(["clip", tmp_path / "imgs", tmp_path / "prompts.txt", "--pretrained", tmp_path / "none.bin"], capsys)
    assert_one_line_error(code, err, "CLIP weights file not found")
    code, _, err = run(["clip", tmp_path / "nowhere", tmp_path / "prompts.txt"], capsys)
    assert_one_line_error(code, err, "path not found")
