"""Checkpoints record the size and sha256 of their files; a damaged newest one is skipped with one warning.

Truncating any file of the newest checkpoint (weights, EMA, optimiser state, state.json) makes
``train --resume auto`` warn in one line and resume from the previous checkpoint, finishing with exactly the
weights of an uninterrupted run; ``distill sample`` falls back the same way; when every checkpoint is
damaged, the error names each one and nothing in the run folder changes.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distill import checkpoint as ckpt
from distill.cli import main as cli_main
from tests.robust_helpers import RECIPE, TINY, assert_same_weights, final_weights, snapshot


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torch_single_thread):
    root = tmp_path_factory.mktemp("ckpt")
    straight = root / "straight"
    assert cli_main(["train", RECIPE, "--out", str(straight), "--no-progress", *TINY]) == 0
    return root, straight


def _truncate(path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def test_state_json_records_size_and_hash_of_every_file(runs):
    _, straight = runs
    newest = ckpt.list_checkpoints(straight / "checkpoints")[-1]
    state = json.loads((newest / "state.json").read_text())
    on_disk = {p.name for p in newest.iterdir() if p.name != "state.json"}
    assert set(state["files"]) == on_disk == {"student.safetensors", "fake_score.safetensors",
                                              "student_ema.safetensors", "training_state.pt"}
    for name, meta in state["files"].items():
        assert meta["size"] == (newest / name).stat().st_size and len(meta["sha256"]) == 64
    assert ckpt.verify_checkpoint(newest) is None
    # one flipped byte, same size: caught by the hash
    copy = runs[0] / "flipped"
    shutil.copytree(newest, copy)
    data = bytearray((copy / "student.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "student.safetensors").write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(copy) == "student.safetensors sha256 mismatch"


@pytest.mark.parametrize("victim", ["student.safetensors", "student_ema.safetensors", "fake_score.safetensors",
                                    "training_state.pt", "state.json"])
def test_truncated_newest_checkpoint_resumes_from_previous(runs, capsys, victim):
    root, straight = runs
    run = root / f"damaged_{victim}"
    shutil.copytree(straight, run)
    _truncate(run / "checkpoints" / "step_00000004" / victim)
    capsys.readouterr()
    assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *TINY]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err
    assert f"step_00000004 is damaged ({victim}" in warnings[0] or \
        (victim == "state.json" and "step_00000004 is damaged (state.json unreadable" in warnings[0])
    assert warnings[0].endswith("using " + str(run / "checkpoints" / "step_00000002"))
    assert f"resuming from {run / 'checkpoints' / 'step_00000002'}" in captured.out
    # steps 3 and 4 trained again: the same weights, optimiser state and all, as the uninterrupted run
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000004") is None
    assert_same_weights(final_weights(run)[0], final_weights(straight)[0])


def test_sample_falls_back_and_all_damaged_is_an_error_naming_them(runs, capsys):
    root, straight = runs
    run = root / "sample_fallback"
    shutil.copytree(straight, run)
    _truncate(run / "checkpoints" / "step_00000004" / "student_ema.safetensors")
    capsys.readouterr()
    assert cli_main(["sample", str(run), "--n", "8", "--out", str(root / "fallback.npy")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "step_00000004 is damaged" in err
    # the samples are those of the previous checkpoint: a run folder holding only that one gives the same
    only_previous = root / "only_previous"
    shutil.copytree(straight, only_previous)
    shutil.rmtree(only_previous / "checkpoints" / "step_00000004")
    assert cli_main(["sample", str(only_previous), "--n", "8", "--out", str(root / "previous.npy")]) == 0
    assert np.array_equal(np.load(root / "fallback.npy"), np.load(root / "previous.npy"))

    _truncate(run / "checkpoints" / "step_00000002" / "training_state.pt", keep=10)
    before = snapshot(run)
    for argv in (["train", RECIPE, "--out", str(run), "--no-progress", *TINY],
                 ["sample", str(run), "--n", "8", "--out", str(root / "never.npy")]):
        code = cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: every checkpoint in") and "\n" not in err, err
        assert "step_00000004: student_ema.safetensors has" in err and "step_00000002: training_state.pt has 10 bytes" in err
    assert snapshot(run) == before and not (root / "never.npy").exists()
