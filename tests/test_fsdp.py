"""FSDP2 on two CPU processes (``torchrun --nproc_per_node 2``, gloo) with the tiny SDXL: sharded like a real run,
numerically the same run as one process.

* each process holds about half of the student's and the fake score's parameter and AdamW-state elements;
* 5 steps give the losses of one process with the same global batch (1e-4 relative);
* a run stopped after step 3 and resumed (``--resume auto``) gives step 4-5's losses, with 2 processes and
  with 1 process resuming the 2-process checkpoint;
* the export loads in ``StableDiffusionXLPipeline`` and matches the single-process export;
* SiD: the generator's gradient flows through the frozen, sharded teacher and fake score.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import main as cli_main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from distill import engine
    from distill.parallel import local_elements

    run = engine.Trainer.run

    def counting_run(self):  # after training: elements this process holds, per optimiser
        out = run(self)
        info = {}
        for name, turn in self.turns.items():
            states = [v for s in turn.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
            info[name] = {"local": local_elements(turn.params), "full": sum(p.numel() for p in turn.params),
                          "optim_local": local_elements(states), "optim_full": sum(v.numel() for v in states)}
        with open(os.path.join(sys.argv[1], f"rank{self.rank}.json"), "w") as f:
            json.dump(info, f)
        return out

    engine.Trainer.run = counting_run
    from distill.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp: Path, info: Path, args: list[str]) -> None:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    info.mkdir(exist_ok=True)
    exe = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [str(exe), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_port()),
           str(driver), str(info), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _losses(run: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if "loss" in k} for r in rows}


def _assert_same_losses(a: dict, b: dict, steps, rel: float = 1e-4) -> None:
    for step in steps:
        assert a[step].keys() == b[step].keys(), step
        for key, value in a[step].items():
            assert abs(value - b[step][key]) <= rel * max(abs(value), 1e-3), (step, key, value, b[step][key])


def _recipe(tmp: Path, tiny_sdxl_dir: str, method: dict, **student) -> Path:
    (tmp / "prompts.txt").write_text("a cat\na dog\na red car\na tree\n")
    config = {
        "teacher": {"kind": "sdxl", "path": tiny_sdxl_dir},  # fp32: bf16 rounding would differ with the batch split
        "student": {"timesteps": [999, 499], **student},
        "method": method,
        "data": {"kind": "prompts", "batch_size": 4, "prompts": str(tmp / "prompts.txt")},
        "train": {"steps": 5, "log_every": 1, "ema_decay": 0.9, "parallel": "fsdp"},
        "generator_optim": {"lr": 1e-5, "warmup_steps": 2}, "critic_optim": {"lr": 1e-4},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _check_shards(info: Path) -> None:
    ranks = [json.loads((info / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("generator", "critic"):
        full, optim_full = ranks[0][name]["full"], ranks[0][name]["optim_full"]
        assert sum(r[name]["local"] for r in ranks) == full  # the shards partition the parameters
        assert sum(r[name]["optim_local"] for r in ranks) == optim_full == 2 * full  # AdamW: two states each
        for r in ranks:
            assert 0.4 * full <= r[name]["local"] <= 0.6 * full, (name, r[name], full)
            assert 0.4 * optim_full <= r[name]["optim_local"] <= 0.6 * optim_full, (name, r[name])


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_fsdp_dmd2_two_processes(tiny_sdxl_dir, tmp_path, torch_single_thread):
    from diffusers import StableDiffusionXLPipeline

    recipe = _recipe(tmp_path, tiny_sdxl_dir, {"name": "dmd2", "guidance_scale": 8.0, "generator_every": 2})
    common = ["--no-progress"]
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(tmp_path, tmp_path / "info", ["train", str(recipe), "--out", str(two), *common])
    _check_shards(tmp_path / "info")
    assert cli_main(["train", str(recipe), "--out", str(one), *common, "train.parallel=ddp"]) == 0
    full = _losses(two)
    _assert_same_losses(_losses(one), full, range(1, 6))

    # stopped after step 3 (a kill between checkpoints loses no more than this), resumed with 2 and with 1 process
    part = tmp_path / "part"
    _torchrun(tmp_path, tmp_path / "info_part", ["train", str(recipe), "--out", str(part), *common, "train.steps=3"])
    one_more = tmp_path / "resume1"
    import shutil

    shutil.copytree(part, one_more)
    _torchrun(tmp_path, tmp_path / "info_resume", ["train", str(recipe), "--out", str(part), *common])
    _assert_same_losses(full, _losses(part), (4, 5))
    assert cli_main(["train", str(recipe), "--out", str(one_more), *common]) == 0  # 1 process, fsdp, world 1
    _assert_same_losses(full, _losses(one_more), (4, 5))

    # exports: the 2-process run's gathered weights against the 1-process run's
    assert cli_main(["export", str(two), "--out", str(tmp_path / "ex2"), "--device", "cpu"]) == 0
    assert cli_main(["export", str(one), "--out", str(tmp_path / "ex1"), "--device", "cpu"]) == 0
    w2, w1 = _unet_weights(tmp_path / "ex2"), _unet_weights(tmp_path / "ex1")
    assert w2.keys() == w1.keys()
    assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) < 1e-5
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "ex2"))
    assert all(torch.equal(p, w2[n]) for n, p in pipe.unet.state_dict().items())


def test_fsdp_sid_two_processes(tiny_sdxl_dir, tmp_path, torch_single_thread):
    recipe = _recipe(tmp_path, tiny_sdxl_dir, {"name": "sid", "guidance_scale": 4.5, "alpha": 1.0},
                     timesteps=[625], noise_scale="sigma")
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(tmp_path, tmp_path / "info", ["train", str(recipe), "--out", str(two), "--no-progress"])
    _check_shards(tmp_path / "info")
    assert cli_main(["train", str(recipe), "--out", str(one), "--no-progress", "train.parallel=ddp"]) == 0
    _assert_same_losses(_losses(one), _losses(two), range(1, 6))
