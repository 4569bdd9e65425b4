import subprocess
import sys

import numpy as np
import pytest

from distill.cli import main

TINY = ["train.steps=6", "train.log_every=2", "train.sample_every=3", "student.warm_start.steps=3",
        "student.warm_start.pairs=256", "student.net.hidden=32", "fake_score.net.hidden=32", "data.batch_size=32"]


def test_train_then_sample_writes_checkpoints_logs_grids_and_npy(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "recipes/toy_ring8_dmd2.yaml", "--out", str(run), "--no-progress", *TINY]) == 0
    assert (run / "config.yaml").is_file() and (run / "log.jsonl").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006"]
    assert (run / "samples" / "step_00000003.png").is_file()
    out = tmp_path / "x.npy"
    assert main(["sample", str(run), "--n", "50", "--out", str(out), "--seed", "1"]) == 0
    x = np.load(out)
    assert x.shape == (50, 2) and np.isfinite(x).all()
    # the same seed gives the same samples
    assert main(["sample", str(run), "--n", "50", "--out", str(tmp_path / "y.npy"), "--seed", "1"]) == 0
    assert np.array_equal(x, np.load(tmp_path / "y.npy"))


@pytest.mark.parametrize("args,message", [
    (["train", "recipes/nope.yaml", "--out", "{tmp}/r"], "recipe not found"),
    (["train", "recipes/toy_ring8_dmd2.yaml", "--out", "{tmp}/r", "train.stepz=3"], "unknown config key"),
    (["train", "recipes/toy_ring8_dmd2.yaml", "--out", "{tmp}/r", "method.name=nope"], "unknown method"),
    (["train", "recipes/toy_ring8_dmd2.yaml", "--out", "{tmp}/r", "teacher.preset=nope"], "teacher.preset='nope' is not allowed"),
    (["sample", "{tmp}", "--n", "3", "--out", "{tmp}/x.npy"], "not a run folder"),
    # an override after an option that is not key=value: named as such, for the command that took it
    (["train", "recipes/toy_ring8_dmd2.yaml", "--out", "{tmp}/r", "train.steps"],
     "distill train: overrides are key=value pairs, got 'train.steps'"),
    (["train", "recipes/toy_ring8_dmd2.yaml", "--out", "{tmp}/r", "--bogus"], "unrecognized arguments: --bogus"),
    # optional overrides are not listed among the missing arguments
    (["plan"], "the following arguments are required: config, --gpus, --gpu-mem (see"),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_console_script_module_entry(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "train", "recipes/missing.yaml", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "recipe not found" in proc.stderr
