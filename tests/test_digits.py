"""The digits pieces: metric (classifier, FD, precision/recall), the UNet2DModel teacher loaded through
``from_pretrained``, the labels data source, and a shortened ``distill demo`` that writes the whole report."""
from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory, digits_classifier_file):
    """A private cache (the session's classifier, a teacher) for this module: a clean checkout has none."""
    import os
    import shutil

    path = tmp_path_factory.mktemp("distill_cache")
    shutil.copy(digits_classifier_file, path)
    old = os.environ.get("DISTILL_CACHE")
    os.environ["DISTILL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DISTILL_CACHE")
    else:
        os.environ["DISTILL_CACHE"] = old


@pytest.fixture(scope="module")
def classifier(digits_cache, torch_single_thread):
    from distill.metrics.digits import load_digits_classifier

    return load_digits_classifier()


@pytest.fixture(scope="module")
def tiny_teacher(digits_cache, torch_single_thread):
    """A digits teacher trained for 30 steps (plumbing only; quality is the benchmark's job)."""
    from distill.digits_teacher import DigitsTeacherConfig, ensure_digits_teacher

    return ensure_digits_teacher(digits_cache / "tiny_teacher", DigitsTeacherConfig(steps=30), progress=False)


def test_precision_recall_matches_the_definition():
    from distill.metrics.precision_recall import precision_recall

    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # k=1 radii of real: 1 each; of the four fakes only 0.5 lies inside -> precision 0.25
    fake = torch.tensor([[0.5], [10.0], [10.5], [11.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.25)
    # fake radii (k=1): 9.5, 0.5, 0.5, 0.5 -> real points within 9.5 of 0.5: 0..4 all -> recall 1
    assert recall == pytest.approx(1.0)
    precision, recall = precision_recall(real, torch.tensor([[10.0], [10.5], [11.0], [11.5]]), k=1)
    assert (precision, recall) == (0.0, 0.0)


def test_classifier_and_metric_separate_real_from_broken_digits(classifier):
    from distill.digits_data import load_digits_tensors
    from distill.metrics.digits import digits_report, two_sample_floor

    assert classifier.test_accuracy > 0.88  # held-out 297 digits
    images, labels = load_digits_tensors()
    real = digits_report(images, labels, classifier)
    assert real.fd < 1e-6 and real.accuracy > 0.97 and real.precision == 1.0 and real.recall == 1.0
    floor = two_sample_floor(classifier)
    assert 0 < floor.fd < 5 and floor.recall > 0.85
    # a mode-collapsed generator: every sample is the same digit -> recall collapses, FD and accuracy blow up
    collapsed = digits_report(images[:1].expand(500, -1, -1, -1), labels[:500], classifier)
    assert collapsed.recall < 0.05 and collapsed.fd > 10 * floor.fd and collapsed.accuracy < 0.2
    blurred = digits_report(torch.nn.functional.avg_pool2d(images, 3, 1, 1), labels, classifier)
    assert blurred.fd > 3 * floor.fd
    with pytest.raises(ValueError, match="NaN"):
        digits_report(torch.full((30, 1, 8, 8), float("nan")), None, classifier)


def test_digits_extractor_plugs_into_metrics_fid(classifier):
    from distill import metrics
    from distill.digits_data import load_digits_tensors
    from distill.metrics.digits import DigitsExtractor, digits_features, feature_fd

    images, _ = load_digits_tensors()
    a, b = images[:400], images[400:800]
    direct = feature_fd(digits_features(a, classifier), digits_features(b, classifier))
    via_fid = metrics.fid(a, b, extractor=DigitsExtractor(classifier), value_range=(-1, 1), progress=False,
                          device="cpu")
    # the 8x8 images themselves reach the classifier (no 299 px Inception resize): equal up to uint8 rounding
    assert via_fid == pytest.approx(direct, rel=2e-3)
    assert DigitsExtractor.raw_input


def test_teacher_loads_through_from_pretrained_and_samples_classes(tiny_teacher):
    from diffusers import DDPMPipeline

    from distill.models.conditioning import ClassConditioner
    from distill.models.loading import detect_kind, load_pipeline_components
    from distill.models.roles import Teacher
    from distill.samplers import sample_ddim

    assert detect_kind(str(tiny_teacher)) == "unet2d"
    parts = load_pipeline_components(str(tiny_teacher), kind="auto")
    assert parts.kind == "unet2d" and parts.vae is None and parts.latent_shape(2) == (2, 1, 8, 8)
    assert isinstance(parts.conditioner, ClassConditioner) and parts.conditioner.null_label == 10
    assert parts.denoiser.prediction_type == "v_prediction"
    pipe = DDPMPipeline.from_pretrained(str(tiny_teacher))  # an ordinary diffusers folder
    assert pipe.unet.config.num_class_embeds == 11
    cond = parts.conditioner(torch.tensor([3, 7]))
    x = sample_ddim(Teacher(parts.denoiser), torch.randn(2, 1, 8, 8), cond,
                    parts.denoiser.schedule.inference_timesteps(4, "trailing"), 2.0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_teacher_training_is_deterministic(digits_cache, torch_single_thread):
    from distill.digits_teacher import DigitsTeacherConfig, train_digits_teacher

    cfg = DigitsTeacherConfig(steps=3, batch_size=16)
    a, b = (train_digits_teacher(cfg, progress=False) for _ in range(2))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_label_source_pairs_real_digits_with_their_labels(tiny_teacher, classifier):
    from distill.data import LabelSource, load_labelled_images
    from distill.models.loading import load_pipeline_components

    parts = load_pipeline_components(str(tiny_teacher))
    real = load_labelled_images("digits")
    source = LabelSource(parts.conditioner, 64, (1, 8, 8), seed=0, real=real)
    batch = source(5, slice(0, 64), "cpu")
    assert batch.noise.shape == (64, 1, 8, 8)
    real_labels = batch.real_cond.kwargs["class_labels"]
    assert (classifier(batch.real).argmax(1) == real_labels).float().mean() > 0.95
    assert set(batch.cond.kwargs["class_labels"].tolist()) <= set(range(10))
    # rows of a 2-process split are the rows of the global batch
    half = source(5, slice(32, 64), "cpu")
    assert torch.equal(half.noise, batch.noise[32:]) and torch.equal(half.real, batch.real[32:])


def test_short_demo_writes_the_report_with_every_field(tmp_path, tiny_teacher, classifier, capsys):
    from distill.cli import main

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--teacher", str(tiny_teacher), "--teacher-steps", "30", "--n-eval", "40",
            "--no-progress", "train.steps=4", "student.warm_start.steps=2", "student.warm_start.pairs=32",
            "student.warm_start.ode_steps=4", "data.batch_size=16", "train.log_every=2"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for field in ("digits FD", "class accuracy", "precision", "recall", "NFE / sample", "ms / sample",
                  "speed-up vs teacher 50 steps", "teacher DDIM 50 steps", "teacher DDIM 1 step",
                  "DMD2 student (1 step)", "samples.png", "exported diffusers pipeline", "checkpoint"):
        assert field in report, field
    assert (out / "samples.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names[:3] == ["teacher DDIM 50 steps", "teacher DDIM 4 steps", "teacher DDIM 1 step"]
    for row in results["rows"]:
        assert math.isfinite(row["digits_fd"]) and 0 <= row["precision"] <= 1 and 0 <= row["class_accuracy"] <= 1
    student = results["rows"][-1]
    assert student["nfe"] == 1 and results["rows"][0]["nfe"] == 50
    run = results["runs"]["dmd2"]
    assert (out / "exports" / "dmd2" / "model_index.json").is_file()
    assert run["checkpoint"].endswith("step_00000004")
    # the run samples from the command line like any other (class label required)
    assert main(["sample", run["run"], "--label", "3", "--n", "4", "--out", str(tmp_path / "threes")]) == 0
    assert len(list((tmp_path / "threes").glob("*.png"))) == 4
    assert main(["sample", run["run"], "--n", "4", "--out", str(tmp_path / "x")]) == 2  # no --label: one-line error
    # a rerun with the same --out reuses the finished run and the teacher's rows (the 50-step DDIM is the slow part)
    capsys.readouterr()
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["rows"][:3] == results["rows"][:3]
    assert again["rows"][3]["digits_fd"] == pytest.approx(student["digits_fd"])
