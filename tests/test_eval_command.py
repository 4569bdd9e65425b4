"""``distill eval`` on an exported tiny SDXL student: every requested metric in metrics.json, the reference
cache, bad inputs before any network, and (slow) 2 processes giving the values of 1.

Stand-ins: a random TorchScript "Inception" (2048-d), a random tiny Dinov2Model and a random tiny
OpenCLIP model in a ``local-dir:`` folder, all built here, offline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from distill import metrics
from distill.cli import main as cli_main
from distill.metrics.dinov2 import build_tiny_dinov2
from distill.metrics.inception import INCEPTION_FILENAME
from tests.test_clip_score import TINY_CLIP
from tests.test_metrics_cli import _FakeInception, assert_one_line_error

pytestmark = pytest.mark.usefixtures("torch_single_thread")
REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit"]
ALL = "fid,clip,fd_dinov2,pr,kid,diversity"


@pytest.fixture(scope="module")
def setup(tiny_sdxl_dir, tmp_path_factory):
    """An exported 2-step DMD2 student (trained 2 steps), prompts, a reference folder and stand-in weights."""
    d = tmp_path_factory.mktemp("eval")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    recipe = {
        "teacher": {"kind": "sdxl", "path": tiny_sdxl_dir, "uncond": "zeros"},
        "student": {"timesteps": [999, 499]},
        "method": {"name": "dmd2", "guidance_scale": 8.0, "gan_generator_weight": 0.0},
        "data": {"kind": "prompts", "batch_size": 2, "prompts": str(d / "prompts.txt")},
        "train": {"steps": 2, "log_every": 1}, "generator_optim": {"lr": 1e-4}, "critic_optim": {"lr": 1e-4},
    }
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_main(["train", str(d / "recipe.yaml"), "--out", str(d / "run"), "--no-progress"]) == 0
    assert cli_main(["export", str(d / "run"), "--out", str(d / "student")]) == 0
    ref = d / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # half noise, half the student's own images (other seeds): 0 < precision, recall < 1
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i:03d}.png")
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(d / "student"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS[:2] * 3, timesteps=[999, 499], guidance_scale=1.0, output_type="pil",
                  generator=[torch.Generator().manual_seed(100 + i) for i in range(6)]).images
    for i, image in enumerate(images[:5]):
        image.save(ref / f"{5 + i:03d}.png")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_FakeInception()).save(str(d / INCEPTION_FILENAME))
    build_tiny_dinov2(d / "dinov2", seed=0)
    import open_clip

    torch.manual_seed(0)
    (d / "clip").mkdir()
    (d / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), d / "clip" / "open_clip_pytorch_model.bin")
    return d


def eval_args(d: Path, out: Path, *extra: str, model: str = "student") -> list[str]:
    return [str(d / model), "--prompts", str(d / "prompts.txt"), "--ref", str(d / "ref"), "--n", "8",
            "--batch-size", "2", "--metrics", ALL, "--inception", str(d / INCEPTION_FILENAME),
            "--dinov2", str(d / "dinov2"), "--clip-model", f"local-dir:{d / 'clip'}", "--cache", str(d / "cache"),
            "--out", str(out), "--device", "cpu", "--no-progress", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def full_eval(setup, tmp_path_factory):
    """One evaluation with every metric (and --save-images): the folder and its metrics.json."""
    out = tmp_path_factory.mktemp("full_eval") / "one"
    assert cli_main(["eval", *eval_args(setup, out, "--save-images")]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_eval_writes_every_metric_and_caches_the_reference(setup, full_eval, tmp_path):
    out, first = full_eval
    values = first["metrics"]
    assert set(values) == {"fid", "clip", "fd_dinov2", "precision", "recall", "kid", "diversity"}
    assert all(np.isfinite(v) for v in values.values())
    assert values["fid"] > 0 and values["fd_dinov2"] > 0 and values["diversity"] > 0
    assert values["precision"] > 0.5 and 0 < values["recall"] < 1, values  # the noise half of the reference is missed
    protocol = first["protocol"]
    assert protocol["n"] == 8 and protocol["model"]["kind"] == "pipeline" and protocol["model"]["timesteps"] == [999, 499]
    assert protocol["prompts"]["count"] == 3 and len(protocol["prompts"]["sha256"]) == 64
    assert set(protocol["extractors"]) == {"inception", "dinov2"}
    assert all(len(e["weights_sha256"]) == 64 for e in protocol["extractors"].values())
    assert not any(r["from_cache"] for r in protocol["reference"].values())
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 32 and len(list((out / "images").glob("*.png"))) == 8
    # a second run: the reference pass is skipped, the values are the same; no PNGs unless asked
    assert cli_main(["eval", *eval_args(setup, tmp_path / "two")]) == 0
    second = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert all(r["from_cache"] for r in second["protocol"]["reference"].values())
    for key, value in values.items():
        assert second["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert not (tmp_path / "two" / "images").exists()
    # the run folder gives the same images as its export: same metrics
    args = eval_args(setup, tmp_path / "run", model="run")
    args[args.index("--metrics") + 1] = "fid,diversity"
    assert cli_main(["eval", *args]) == 0
    from_run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert from_run["protocol"]["model"]["kind"] == "run"
    assert np.isfinite(from_run["metrics"]["fid"])


def test_eval_against_statistics_files(setup, full_eval, tmp_path):
    """Reference .npz files are matched to extractors by weights hash (FID, FD-DINOv2): same values as the folder."""
    from distill.metrics.dinov2 import load_dinov2
    from distill.metrics.inception import load_inception

    inception = metrics.compute_stats(setup / "ref", inception_path=setup / INCEPTION_FILENAME, device="cpu",
                                      num_workers=0, progress=False).save(tmp_path / "inception.npz")
    dinov2 = metrics.compute_stats(setup / "ref", extractor=load_dinov2(setup / "dinov2"), device="cpu",
                                   num_workers=0, progress=False).save(tmp_path / "dinov2.npz")
    args = eval_args(setup, tmp_path / "npz")
    args[args.index("--ref") + 1:args.index("--ref") + 2] = [str(dinov2), str(inception)]
    args[args.index("--metrics") + 1] = "fid,fd_dinov2"
    assert cli_main(["eval", *args]) == 0
    from_stats = json.loads((tmp_path / "npz" / "metrics.json").read_text())["metrics"]
    from_folder = full_eval[1]["metrics"]
    assert from_stats == pytest.approx({k: from_folder[k] for k in ("fid", "fd_dinov2")}, abs=1e-8)
    assert load_inception(setup / INCEPTION_FILENAME).weights_hash  # the file the statistics name


@pytest.mark.parametrize("change, fragment", [
    ({"--n": "1"}, "--n must be an integer >= 2"),
    ({"--batch-size": "0"}, "--batch-size must be an integer >= 1"),
    ({"--steps": "0"}, "--steps must be an integer >= 1"),
    ({"--workers": "-1"}, "--workers must be an integer >= 0"),
    ({"--metrics": "fid,nonsense"}, "unknown metric 'nonsense'"),
    ({"--prompts": "/no/such/prompts.txt"}, "prompts file not found"),
    ({"--ref": "/no/such/ref"}, "path not found"),
    ({"--pr-features": "vgg"}, "unknown extractor 'vgg'"),
    ({"--pr-k": "0"}, "--pr-k must be an integer >= 1"),
    ({"--n": "3"}, "diversity compares images of the same prompt: --n (3) must exceed the number of prompts (3)"),
])
def test_bad_eval_inputs_fail_before_any_network(setup, tmp_path, capsys, change, fragment, monkeypatch):
    import importlib

    def fail(*args, **kwargs):
        raise AssertionError("a network was loaded before the inputs were checked")

    monkeypatch.setattr(importlib.import_module("distill.metrics.eval_models"), "open_model", fail)
    args = eval_args(setup, tmp_path / "bad")
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    code = cli_main(["eval", *args])
    assert_one_line_error(code, capsys.readouterr().err, fragment)


def test_eval_pr_needs_reference_images(setup, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    args = eval_args(setup, tmp_path / "bad")
    args[args.index("--ref") + 1] = str(tmp_path / "s.npz")
    assert_one_line_error(cli_main(["eval", *args]), capsys.readouterr().err, "pr needs the reference images")
    args = eval_args(setup, tmp_path / "bad", model="nowhere")
    assert_one_line_error(cli_main(["eval", *args]), capsys.readouterr().err, "model not found")


@pytest.mark.slow
def test_two_processes_give_the_values_of_one(setup, tmp_path):
    one = tmp_path / "one"
    assert cli_main(["eval", *eval_args(setup, one, "--cache", "none")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # the arguments travel in a file: torchrun's own parser would take --n for one of its options
    (tmp_path / "argv.json").write_text(json.dumps(["eval", *eval_args(setup, tmp_path / "two", "--cache", "none")]))
    (tmp_path / "driver.py").write_text("import json, sys\nfrom distill.cli import main\n"
                                        "sys.exit(main(json.load(open(sys.argv[1]))))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(tmp_path / "driver.py"), str(tmp_path / "argv.json")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = json.loads((one / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert b["protocol"]["processes"] == 2 and a["protocol"]["processes"] == 1
    assert set(a["metrics"]) == set(b["metrics"])
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


class ColourMoments(torch.nn.Module):
    """A plugged-in extractor: per-channel mean and spread of the uint8 images (6-d)."""

    raw_input = True
    feature_dim = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2) / 255
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def colour_moments():
    return ColourMoments()


def test_plugged_in_extractor(setup, full_eval, tmp_path):
    args = eval_args(setup, tmp_path / "plug", "--extractor", "moments=tests.test_eval_command:colour_moments")
    args[args.index("--metrics") + 1] = "fd_moments,diversity"
    args += ["--diversity-features", "moments"]
    assert cli_main(["eval", *args]) == 0
    result = json.loads((tmp_path / "plug" / "metrics.json").read_text())
    assert set(result["metrics"]) == {"fd_moments", "diversity"}
    assert result["protocol"]["extractors"]["moments"]["feature_dim"] == 6
    # the same value by hand: Frechet distance of the moments of the same images (saved by --save-images)
    # and of the reference folder
    kw = dict(extractor=ColourMoments(), device="cpu", num_workers=0, progress=False)
    ref = metrics.compute_stats(setup / "ref", **kw)
    generated = metrics.compute_stats(full_eval[0] / "images", **kw)
    by_hand = metrics.frechet_distance(generated.mu, generated.sigma, ref.mu, ref.sigma)
    assert result["metrics"]["fd_moments"] == pytest.approx(by_hand, rel=1e-6)


def test_nan_latents_in_distill_sample_are_one_line(setup, tmp_path, capsys, monkeypatch):
    import distill.samplers

    def nan_student(model, noise, *args, **kwargs):
        x = torch.zeros_like(noise)
        x[0, 0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(distill.samplers, "sample_student", nan_student)
    code = cli_main(["sample", str(setup / "run"), "--prompt", "a cat", "--n", "3", "--out", str(tmp_path / "png")])
    err = capsys.readouterr().err  # transformers' weight-loading bars come first: only the error line is ours
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "1 of 3 latents contain NaN or inf" in errors[0]
    assert not list(tmp_path.glob("png/*.png"))


def test_in_training_eval_fn_on_the_sdxl_student(setup, tmp_path, monkeypatch):
    """The Trainer's eval_fn for a text-to-image student: FID and CLIP of in-memory decoded samples."""
    monkeypatch.setenv("DISTILL_EVAL_CACHE", str(tmp_path / "cache"))
    from distill.commands import load_run
    from distill.train_eval import build_eval_fn

    config, models = load_run(setup / "run")
    config.train.eval_every = 1
    eval_cfg = config.train.eval
    eval_cfg.n, eval_cfg.batch_size, eval_cfg.metrics = 4, 2, ["fid", "clip"]
    eval_cfg.ref, eval_cfg.inception = str(setup / "ref"), str(setup / INCEPTION_FILENAME)
    eval_cfg.prompts, eval_cfg.clip_model = str(setup / "prompts.txt"), f"local-dir:{setup / 'clip'}"
    eval_fn = build_eval_fn(config)(models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 4 samples for 2048-d features: rank-deficient, expected
        first, again = eval_fn(0), eval_fn(1)
    assert set(first) == {"fid", "clip"} and all(np.isfinite(v) for v in first.values())
    assert first == again  # the same noise every time: values change only with the model
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the reference folder's statistics, cached
