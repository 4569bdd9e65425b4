"""Mistakes a user makes, each refused with exit code 2, one ``error:`` line, and no file of the run changed.

One tiny run (4 steps, checkpoints at 2 and 4) is trained once; every bad command below is pointed at it
(or at a fresh folder beside it), and the run folder's bytes and mtimes must be the same afterwards.
Covers: typed and range-checked recipe values (the method section included), a run folder resumed with
another recipe, ``--resume none`` into a folder with checkpoints, and CLI options checked before any
slow work (``--out`` a file or under a file, ``--batch-size 0``, devices that do not exist).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from distill.cli import main as cli_main
from distill.config import load_config
from distill.models.errors import ToolkitError
from tests.robust_helpers import RECIPE, TINY, snapshot


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, torch_single_thread):
    run = tmp_path_factory.mktemp("robust") / "run"
    assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *TINY]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    return run


def _refused(capsys, argv: list[str], message: str) -> str:
    code = cli_main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    return err


# (override, text the one error line must contain)
BAD_VALUES = [
    ("train.steps=abc", "train.steps='abc' is not allowed: expected an integer"),
    ("train.steps=-5", "train.steps=-5 is not allowed: expected a value >= 1"),
    ("train.steps=2.5", "train.steps=2.5 is not allowed: expected an integer"),
    ("data.batch_size=0", "data.batch_size=0 is not allowed: expected a value >= 1"),
    ("data.batch_size=-4", "data.batch_size=-4 is not allowed"),
    ("generator_optim.lr=-1", "generator_optim.lr=-1.0 is not allowed: expected a value > 0"),
    ("critic_optim.betas=[0.9,1.5]", "critic_optim.betas=[0.9, 1.5] is not allowed: expected 2 values, each a value in [0, 1)"),
    ("generator_optim.grad_clip=-1", "generator_optim.grad_clip=-1.0 is not allowed: expected a value >= 0"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not allowed: expected one of no, fp16, bf16"),
    ("train.ema_decay=1.5", "train.ema_decay=1.5 is not allowed: expected a value in [0, 1)"),
    ("train.grad_accum=3", "data.batch_size=16 must divide by train.grad_accum=3"),
    ("data.kind=images", "data.kind='images' is not allowed: expected one of toy, prompts"),
    ("teacher.kind=sdxxl", "teacher.kind='sdxxl' is not allowed"),
    ("student.noise_scale=big", "student.noise_scale='big' is not allowed: expected one of unit, sigma"),
    ("student.init=copy", "student.init='copy' is not allowed: expected one of fresh, teacher"),
    ("student.net.hidden=0", "student.net.hidden=0 is not allowed: expected a value >= 1"),
    ("student.net=5", "config section student.net must be a mapping"),
    ("student.warm_start.pairs=-1", "student.warm_start.pairs=-1 is not allowed"),
    # method sections are checked against the method's own dataclass
    ("method.generator_every=0", "method.generator_every=0 is not allowed: expected a value >= 1"),
    ("method.dm_time_range=[0.9,0.1]", "method.dm_time_range=(0.9, 0.1) is not allowed: expected [lo, hi]"),
    ("method.guidance_scale=high", "method.guidance_scale='high' is not allowed: expected a number"),
    ("method.fake_weighting=l1", "method.fake_weighting='l1' is not allowed"),
    ("method.generator_everyy=2", "unknown config key(s) method.generator_everyy"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_recipe_values_are_refused_before_anything_is_written(trained_run, capsys, override, message):
    before = snapshot(trained_run)
    _refused(capsys, ["train", RECIPE, "--out", str(trained_run), "--no-progress", *TINY, override], message)
    assert snapshot(trained_run) == before


def test_method_sections_of_every_method_are_checked():
    for method, override, message in [
        ("{name: sid}", "method.normaliser=max", "method.normaliser='max' is not allowed"),
        ("{name: sim}", "method.huber_c=0", "method.huber_c=0.0 is not allowed: expected a value > 0"),
        ("{name: esd}", "method.entropy_weight=-1", "method.entropy_weight=-1.0 is not allowed"),
        ("{name: consistency, w_max: 3}", "method.w_min=9", "method.w_min=9.0 must not exceed method.w_max=3.0"),
        ("{name: consistency}", "method.loss=l1", "method.loss='l1' is not allowed"),
    ]:
        with pytest.raises(ToolkitError) as info:
            load_config(RECIPE, [f"method={method}", override])
        assert message in str(info.value) and "\n" not in str(info.value)
    # values are typed as their hints say: YAML's 1e3 is an int step count, `no` the string "no"
    config = load_config(RECIPE, ["train.steps=1e3", "train.mixed_precision=no", "generator_optim.lr=1"])
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)
    assert config.train.mixed_precision == "no" and isinstance(config.generator_optim.lr, float)


def test_resuming_with_another_recipe_is_refused(trained_run, capsys):
    before = snapshot(trained_run)
    out = ["train", RECIPE, "--out", str(trained_run), "--no-progress", *TINY]
    _refused(capsys, [*out, "method.name=sid", "method.generator_every=2"],
             "was trained with a different recipe (method.name 'dmd2' -> 'sid'); resuming may change only train.steps")
    _refused(capsys, [*out, "student.net.hidden=32"], "(student.net.hidden 16 -> 32)")
    _refused(capsys, [*out, "generator_optim.lr=0.5", "data.batch_size=32"],
             "(data.batch_size 16 -> 32, generator_optim.lr 0.001 -> 0.5)")
    # a checkpoint of this run passed to another folder is held to the same recipe
    _refused(capsys, ["train", RECIPE, "--out", str(trained_run.parent / "other"), "--resume",
                      str(trained_run / "checkpoints" / "step_00000002"), "--no-progress", *TINY, "train.seed=5"],
             "(train.seed 0 -> 5)")
    assert not (trained_run.parent / "other").exists()
    assert snapshot(trained_run) == before


def test_resume_none_into_a_run_needs_overwrite(trained_run, tmp_path, capsys):
    before = snapshot(trained_run)
    _refused(capsys, ["train", RECIPE, "--out", str(trained_run), "--resume", "none", "--no-progress", *TINY],
             "already holds checkpoints; pass --resume auto to continue that run, or --overwrite")
    assert snapshot(trained_run) == before
    # --overwrite starts over: a different recipe is then fine, and the old checkpoints are gone
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    (copy / "notes.txt").write_text("mine")
    assert cli_main(["train", RECIPE, "--out", str(copy), "--overwrite", "--no-progress", *TINY,
                     "train.steps=1", "train.checkpoint_every=0"]) == 0
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_00000001"]
    assert (copy / "notes.txt").read_text() == "mine"  # files the toolkit did not write are left alone
    assert load_config(copy / "config.yaml").train.steps == 1
    assert len((copy / "log.jsonl").read_text().splitlines()) == 1  # the old log went too


def test_resumable_keys_may_change(trained_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    assert cli_main(["train", RECIPE, "--out", str(copy), "--no-progress", *TINY, "train.steps=6",
                     "train.log_every=3", "train.keep_checkpoints=5", "train.checkpoint_minutes=30"]) == 0
    assert load_config(copy / "config.yaml").train.steps == 6  # the saved config records the new values
    assert [p.name for p in (copy / "checkpoints").iterdir() if p.name.endswith("6")] == ["step_00000006"]


def test_cli_options_are_checked_before_slow_work(trained_run, tmp_path, capsys):
    before = snapshot(trained_run)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(capsys, ["train", RECIPE, "--out", str(afile), *TINY], f"--out {afile} is a file")
    _refused(capsys, ["train", RECIPE, "--out", str(afile / "run"), *TINY], "is a file, so the path cannot be created")
    sample = ["sample", str(trained_run), "--out", str(tmp_path / "x.npy")]
    _refused(capsys, [*sample, "--batch-size", "0"], "--batch-size 0 is out of range: expected a value >= 1")
    _refused(capsys, [*sample, "--n", "-3"], "--n -3 is out of range")
    _refused(capsys, [*sample, "--steps", "0"], "--steps 0 is out of range")
    _refused(capsys, ["sample", str(trained_run), "--out", str(afile / "x.npy")], "cannot be created")
    _refused(capsys, ["export", str(trained_run), "--out", str(afile)], f"--out {afile} is a file")
    images = tmp_path / "images"
    images.mkdir()
    _refused(capsys, ["fid", str(images), str(images), "--device", "cuda:99"], "--device cuda:99")
    if not torch.cuda.is_available():
        _refused(capsys, ["fid", str(images), str(images), "--device", "cuda"], "no CUDA device is available")
    _refused(capsys, ["fid", str(images), str(images), "--device", "gpu0"], "is not a device name")
    _refused(capsys, ["fid", str(images), str(images), "--batch-size", "0"], "--batch-size 0 is out of range")
    _refused(capsys, ["fid", str(tmp_path / "missing"), str(images)], "path not found")
    _refused(capsys, ["fid-stats", str(images), "--out", str(afile / "s.npz")], "cannot be created")
    _refused(capsys, ["clip", str(images), str(tmp_path / "none.txt"), "--workers", "-1"], "--workers -1 is out of range")
    assert snapshot(trained_run) == before


def test_per_process_batch_rule_is_checked_before_building(trained_run, capsys, monkeypatch):
    before = snapshot(trained_run)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it: 16 rows cannot split over 3 processes
    _refused(capsys, ["train", RECIPE, "--out", str(trained_run), "--no-progress", *TINY],
             "data.batch_size=16 must divide by processes x train.grad_accum (3 x 1)")
    assert snapshot(trained_run) == before
