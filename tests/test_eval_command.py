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
    ({"--n": "nan"}, "argument --n: invalid int value: 'nan'"),
    ({"--guidance-scale": "inf"}, "--guidance-scale must be a finite number >= 0, got inf"),
    ({"--steps": "3"}, "--steps must be between 1 and 2"),
    ({"--pr-k": "8"}, "precision/recall with --pr-k 8 need more than 8 images"),
    ({"--out": "{file}"}, "is a file; expected a folder"),
    ({"--cache": "{file}"}, "--cache"),
    ({"--inception": "/no/such/inception.pt"}, "Inception weights inception-2015-12-05.pt not found"),
    ({"--dinov2": "/no/such/dinov2"}, "DINOv2 weights"),
    ({"--clip-model": "local-dir:/no/such"}, "expected a folder holding open_clip_config.json"),
    ({"--labels": "0-9"}, "--labels is for class-conditional students"),
    ({"--metrics": "fid,accuracy"}, "accuracy (class accuracy) needs a class-conditional digits student"),
])
def test_bad_eval_inputs_fail_before_any_network(setup, tmp_path, capsys, change, fragment, monkeypatch):
    import importlib

    def fail(*args, **kwargs):
        raise AssertionError("a network was loaded before the inputs were checked")

    monkeypatch.setattr(importlib.import_module("distill.metrics.eval_models"), "open_model", fail)
    _no_weights_elsewhere(monkeypatch, tmp_path)
    args = eval_args(setup, tmp_path / "bad")
    for key, value in change.items():
        value = value.replace("{file}", str(setup / "prompts.txt"))
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    code = cli_main(["eval", *args])
    assert_one_line_error(code, capsys.readouterr().err, fragment)


def _no_weights_elsewhere(monkeypatch, tmp_path: Path) -> None:
    """Weights are looked for only where the options point: not in $DISTILL_INCEPTION_PATH, clean-fid's download
    folder, $DISTILL_DINOV2_PATH or the Hugging Face cache of this machine."""
    import distill.metrics.dinov2 as dinov2
    import distill.metrics.inception as inception

    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(inception, "cleanfid_cache_dirs", lambda: [tmp_path / "no-cleanfid"])
    monkeypatch.setattr(dinov2, "dinov2_candidates", lambda path=None: [Path(path)] if path else [])


def test_eval_pr_needs_reference_images(setup, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    args = eval_args(setup, tmp_path / "bad")
    args[args.index("--ref") + 1] = str(tmp_path / "s.npz")
    assert_one_line_error(cli_main(["eval", *args]), capsys.readouterr().err, "pr needs the reference images")
    args = eval_args(setup, tmp_path / "bad", model="nowhere")
    assert_one_line_error(cli_main(["eval", *args]), capsys.readouterr().err, "model not found")


@pytest.mark.slow
def test_two_processes_give_the_values_of_one(setup, digits_setup, tmp_path):
    """The SDXL export (prompts; Inception, DINOv2, CLIP stand-ins) and the digits export (labels; the digits
    classifier, the real digits) under torchrun with 2 processes: the values of 1 process (one torchrun for both)."""
    cases = {"sdxl": lambda out: eval_args(setup, out, "--cache", "none"),
             "digits": lambda out: digits_args(digits_setup, out, "--batch-size", "4")}
    for name, make in cases.items():
        assert cli_main(["eval", *make(tmp_path / name / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # the arguments travel in a file: torchrun's own parser would take --n for one of its options
    (tmp_path / "argv.json").write_text(json.dumps([["eval", *make(tmp_path / name / "two")]
                                                    for name, make in cases.items()]))
    (tmp_path / "driver.py").write_text("import json, sys\nfrom distill.cli import main\n"
                                        "for argv in json.load(open(sys.argv[1])):\n"
                                        "    code = main(argv)\n"
                                        "    if code:\n"
                                        "        sys.exit(code)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(tmp_path / "driver.py"), str(tmp_path / "argv.json")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in cases:
        a = json.loads((tmp_path / name / "one" / "metrics.json").read_text())
        b = json.loads((tmp_path / name / "two" / "metrics.json").read_text())
        assert b["protocol"]["processes"] == 2 and a["protocol"]["processes"] == 1
        assert set(a["metrics"]) == set(b["metrics"]) and len(a["metrics"]) >= 6, name
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, key)


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


# ------------------------------------------------------------------------------------------ digits students
@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    """A class-conditional digits student (teacher trained 2 steps, DMD2 run of 2 steps, timesteps [999, 499]), its
    run folder and export, and a stand-in digits classifier (one epoch, ~1 s) where ``distill eval`` finds it."""
    from safetensors.torch import save_file

    from distill.digits_teacher import DigitsTeacherConfig, ensure_digits_teacher
    from distill.metrics.digits import train_digits_classifier

    d = tmp_path_factory.mktemp("eval_digits")
    old = os.environ.get("DISTILL_CACHE")
    os.environ["DISTILL_CACHE"] = str(d / "cache")  # inherited by the 2-process test's torchrun
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    classifier, accuracy = train_digits_classifier(seed=0, epochs=1)
    (d / "cache").mkdir()
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    save_file({**state, "test_accuracy": torch.tensor(accuracy)}, str(d / "cache" / "digits_classifier_seed0.safetensors"))
    teacher = ensure_digits_teacher(d / "teacher", DigitsTeacherConfig(steps=2, batch_size=8), progress=False)
    recipe = {
        "teacher": {"kind": "auto", "path": str(teacher)},
        "student": {"timesteps": [999, 499]},
        "method": {"name": "dmd2", "guidance_scale": 1.0},
        "data": {"kind": "labels", "batch_size": 4},
        "train": {"steps": 2, "log_every": 1, "eval_every": 2,  # in-training digits FD against the real digits
                  "eval": {"n": 20, "batch_size": 10, "ref": "sklearn-digits", "features": "digits",
                           "metrics": ["fid", "accuracy"]}},
        "generator_optim": {"lr": 1e-3}, "critic_optim": {"lr": 1e-3},
    }
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_main(["train", str(d / "recipe.yaml"), "--out", str(d / "run"), "--no-progress"]) == 0
    assert cli_main(["export", str(d / "run"), "--out", str(d / "student")]) == 0
    yield d
    torch.set_num_threads(previous_threads)
    if old is None:
        os.environ.pop("DISTILL_CACHE")
    else:
        os.environ["DISTILL_CACHE"] = old


DIGITS_METRICS = "fid,pr,kid,diversity,fd_digits,accuracy"


def digits_args(d: Path, out: Path, *extra: str, model: str = "student") -> list[str]:
    return [str(d / model), "--ref", "sklearn-digits", "--n", "30", "--batch-size", "8", "--metrics", DIGITS_METRICS,
            "--out", str(out), "--device", "cpu", "--no-progress", "--workers", "0", *extra]


def test_eval_of_a_digits_student(digits_setup, tmp_path):
    """Labels instead of prompts (default: every class), the digits classifier's features for fid / pr / kid /
    diversity, the real digits as reference; the FD equals one computed by hand from the saved images, and the
    run folder gives the values of its export (the same images)."""
    from distill.digits_data import load_digits_tensors
    from distill.metrics.digits import feature_fd, load_digits_classifier

    d = digits_setup
    assert cli_main(["eval", *digits_args(d, tmp_path / "export", "--save-images")]) == 0
    result = json.loads((tmp_path / "export" / "metrics.json").read_text())
    values, protocol = result["metrics"], result["protocol"]
    assert set(values) == {"fid", "fd_digits", "precision", "recall", "kid", "diversity", "accuracy"}
    assert all(np.isfinite(v) for v in values.values()) and values["fid"] > 0 and values["diversity"] > 0
    assert 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1
    assert values["fid"] == values["fd_digits"]  # fid's extractor is the digits classifier here
    assert set(protocol["extractors"]) == {"digits"} and protocol["extractors"]["digits"]["feature_dim"] == 64
    assert protocol["labels"]["count"] == 10 and protocol["labels"]["classes"] == 10 and "prompts" not in protocol
    reference = protocol["reference"]["digits"]
    assert reference["count"] == 1797 and "sklearn-digits" in reference["origin"]
    assert protocol["model"]["kind"] == "pipeline" and protocol["model"]["timesteps"] == [999, 499]
    assert protocol["diversity"]["groups"].startswith("images of the same class label")
    # by hand: the classifier's features of the saved 8x8 PNGs and of the real digits, both quantised to uint8
    pngs = sorted((tmp_path / "export" / "images").glob("*.png"))
    assert len(pngs) == 30 and Image.open(pngs[0]).size == (8, 8)
    generated = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("L"))) for p in pngs]).float()[:, None]
    real = ((load_digits_tensors()[0] + 1) * 127.5).round()
    classifier = load_digits_classifier()
    fd = feature_fd(classifier.features(generated / 127.5 - 1).double(), classifier.features(real / 127.5 - 1).double())
    assert values["fid"] == pytest.approx(fd, rel=1e-6)
    predicted = classifier(generated / 127.5 - 1).argmax(1)  # image i was generated for label i mod 10
    assert values["accuracy"] == pytest.approx((predicted == torch.arange(30) % 10).double().mean().item())
    # the run folder: the toolkit's sampler instead of diffusers' LCMScheduler loop, the same images
    assert cli_main(["eval", *digits_args(d, tmp_path / "run", model="run")]) == 0
    from_run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert from_run["protocol"]["model"]["kind"] == "run"
    for key, value in values.items():
        assert from_run["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # in-training evaluation of the same run: the digits FD in log.jsonl at step 2, the best checkpoint kept
    rows = [json.loads(line) for line in (d / "run" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_fid" in r]
    assert [r["step"] for r in evals] == [2] and np.isfinite(evals[0]["eval_fid"]) and evals[0]["eval_fid"] > 0
    assert 0 <= evals[0]["eval_accuracy"] <= 1
    assert list((d / "run" / "checkpoints" / "best").glob("step_*"))
    # a labels file and one step: only the classes asked for
    (tmp_path / "labels.txt").write_text("3\n7-8\n")
    assert cli_main(["eval", *digits_args(d, tmp_path / "some", "--labels", str(tmp_path / "labels.txt"),
                                          "--steps", "1", "--n", "12")]) == 0
    some = json.loads((tmp_path / "some" / "metrics.json").read_text())["protocol"]
    assert some["labels"]["file"] == str(tmp_path / "labels.txt") and some["labels"]["count"] == 3
    assert some["model"]["timesteps"] == [999] and some["n"] == 12


@pytest.mark.parametrize("change, fragment", [
    ({"--labels": "10"}, "label(s) [10] out of range; this student has classes 0..9"),
    ({"--labels": "5-2"}, "the range 5-2 is empty"),
    ({"--labels": "three"}, "'three' (not a file either) is not a class label"),
    ({"--prompts": "prompts.txt"}, "is class-conditional (10 classes): pass --labels"),
    ({"--metrics": "fid,clip"}, "clip scores images against prompts"),
    ({"--steps": "3"}, "--steps must be between 1 and 2"),
    ({"--guidance-scale": "nan"}, "--guidance-scale must be a finite number >= 0, got nan"),
    ({"--guidance-scale": "-1"}, "--guidance-scale must be a finite number >= 0"),
    ({"--n": "ten"}, "argument --n: invalid int value: 'ten'"),
    ({"--pr-k": "30"}, "precision/recall with --pr-k 30 need more than 30 images"),
    ({"--n": "10"}, "--n (10) must exceed the number of labels (10)"),
    ({"--ref": "/no/such/ref"}, "path not found"),
    ({"--features": "inception", "--inception": "/no/such/inception.pt", "--metrics": "fid,pr"},
     "Inception weights inception-2015-12-05.pt"),
    ({"--features": "inception"}, "accuracy (class accuracy) needs a class-conditional digits student and --features digits"),
])
def test_bad_digits_eval_inputs_fail_before_any_network(digits_setup, tmp_path, capsys, change, fragment, monkeypatch):
    import importlib

    def fail(*args, **kwargs):
        raise AssertionError("a network was loaded before the inputs were checked")

    monkeypatch.setattr(importlib.import_module("distill.metrics.eval_labels"), "open_class_model", fail)
    _no_weights_elsewhere(monkeypatch, tmp_path)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    monkeypatch.chdir(tmp_path)
    args = digits_args(digits_setup, tmp_path / "bad")
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    assert_one_line_error(cli_main(["eval", *args]), capsys.readouterr().err, fragment)
