"""FSDP2 on two CPU processes (``torchrun --nproc_per_node 2``, gloo) with the tiny SDXL: sharded like a real run,
numerically the same run as one process.

* DMD2 with the GAN head (sharded with the fake score; its tap runs the full forward under FSDP);
* each process holds about half of the student's, the fake score's and the head's parameter and AdamW-state
  elements;
* 5 steps give the losses of one process with the same global batch (1e-4 relative);
* checkpoints are sharded torch.distributed.checkpoint state (a ``dcp/`` folder with one shard file per
  process, in the sha256 manifest); both processes SIGKILLed while the step-4 checkpoint is being written (after
  the shards, before ``state.json``) leave step 3 the newest intact checkpoint, and ``--resume auto`` gives
  step 4-5's losses, with 2 processes and with 1 process resuming the 2-process checkpoint;
* the export (full weights gathered from the shards) loads in ``StableDiffusionXLPipeline`` and matches the
  single-process export;
* SiD: the generator's gradient flows through the frozen, sharded teacher and fake score (losses of one
  process); a sample grid during training (every process runs the student's forwards, rank 0 writes it); one
  process resumes the sharded checkpoint, and the gathered export equals the 1-process one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
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
    hold = int(os.environ.get("DISTILL_TEST_HOLD_AT", "0"))
    if hold:  # stop for good inside the checkpoint of step `hold`, after every shard is written
        import time
        from distill import checkpoint as ckpt
        real_save = ckpt.save_checkpoint

        def held_save(root, step, *args, **kwargs):
            if step == hold:
                with open(os.path.join(sys.argv[1], "holding"), "w") as f:
                    f.write(str(kwargs["tmp"]))
                time.sleep(600)  # SIGKILLed here
            return real_save(root, step, *args, **kwargs)

        ckpt.save_checkpoint = held_save
    with open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w") as f:
        f.write(str(os.getpid()))
    from distill.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, info: Path, args: list[str], **env_extra: str) -> subprocess.Popen:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    info.mkdir(exist_ok=True)
    exe = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1",
           "HF_HUB_OFFLINE": "1", **env_extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [str(exe), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_port()),
           str(driver), str(info), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _torchrun(tmp: Path, info: Path, args: list[str]) -> None:
    proc = _launch(tmp, info, args)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-6000:]


def _torchrun_killed(tmp: Path, info: Path, args: list[str], hold_at: int) -> Path:
    """Run until both processes are inside the checkpoint write of step ``hold_at`` (every shard written, no
    ``state.json`` yet), SIGKILL both; return the temporary folder they were writing."""
    proc = _launch(tmp, info, args, DISTILL_TEST_HOLD_AT=str(hold_at))
    holding = info / "holding"
    try:
        deadline = time.time() + 600
        while not (holding.exists() and holding.read_text()):
            assert proc.poll() is None, f"run ended before step {hold_at}'s checkpoint: {proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, f"never reached step {hold_at}'s checkpoint"
            time.sleep(0.1)
        for rank in (0, 1):
            os.kill(int((info / f"pid{rank}").read_text()), signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    return Path(holding.read_text())


def _losses(run: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if "loss" in k} for r in rows}


def _assert_same_losses(a: dict, b: dict, steps, rel: float = 1e-4) -> None:
    for step in steps:
        assert a[step].keys() == b[step].keys(), step
        for key, value in a[step].items():
            assert abs(value - b[step][key]) <= rel * max(abs(value), 1e-3), (step, key, value, b[step][key])


def _recipe(tmp: Path, tiny_sdxl_dir: str, method: dict, real: bool = False, **student) -> Path:
    from safetensors.torch import save_file

    (tmp / "prompts.txt").write_text("a cat\na dog\na red car\na tree\n")
    data = {"kind": "prompts", "batch_size": 4, "prompts": str(tmp / "prompts.txt")}
    if real:  # real latents with their captions, for the GAN head
        save_file({"latents": torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))},
                  str(tmp / "real.safetensors"))
        (tmp / "real.txt").write_text("a dog\na tree\na house\nthe sea\na bird\na cup\n")
        data["real"] = str(tmp / "real.safetensors")
    config = {
        "teacher": {"kind": "sdxl", "path": tiny_sdxl_dir},  # fp32: bf16 rounding would differ with the batch split
        "student": {"timesteps": [999, 499], **student},
        "method": method,
        "data": data,
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


def _check_sharded_checkpoint(folder: Path) -> None:
    from distill import checkpoint as ckpt

    state = json.loads((folder / "state.json").read_text())
    assert state["format"] == "dcp" and state["world_size"] == 2
    shards = sorted(f for f in state["files"] if f.startswith("dcp/") and f.endswith(".distcp"))
    assert len(shards) == 2 and "dcp/.metadata" in state["files"]  # one shard file per process, in the manifest
    assert not list(folder.glob("*.safetensors"))  # no full copy gathered anywhere
    assert ckpt.verify_checkpoint(folder) is None


def test_fsdp_dmd2_gan_two_processes(tiny_sdxl_dir, tmp_path, torch_single_thread):
    from diffusers import StableDiffusionXLPipeline

    from distill import checkpoint as ckpt

    recipe = _recipe(tmp_path, tiny_sdxl_dir, {"name": "dmd2", "guidance_scale": 8.0, "generator_every": 2,
                                               "gan_generator_weight": 5e-2, "gan_discriminator_weight": 1e-1},
                     real=True)
    common = ["--no-progress"]
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(tmp_path, tmp_path / "info", ["train", str(recipe), "--out", str(two), *common])
    _check_shards(tmp_path / "info")
    _check_sharded_checkpoint(ckpt.list_checkpoints(two / "checkpoints")[-1])
    assert cli_main(["train", str(recipe), "--out", str(one), *common, "train.parallel=ddp"]) == 0
    full = _losses(two)
    assert "loss_d_gan" in full[5] and "loss_g_gan" in full[5]
    _assert_same_losses(_losses(one), full, range(1, 6))

    # SIGKILL to both processes in the middle of writing step 4's checkpoint: step 3 is the newest intact one,
    # and resuming it (2 processes, and 1 process resharding it) reproduces steps 4 and 5
    killed = tmp_path / "killed"
    every = ["train.checkpoint_every=1"]
    partial = _torchrun_killed(tmp_path, tmp_path / "info_killed",
                               ["train", str(recipe), "--out", str(killed), *common, *every], hold_at=4)
    root = killed / "checkpoints"
    assert partial.parent == root and partial.name.startswith(".tmp-step_00000004-")
    assert len(list((partial / "dcp").glob("*.distcp"))) == 2 and not (partial / "state.json").exists()
    assert ckpt.resolve_resume("auto", root) == root / "step_00000003"
    _check_sharded_checkpoint(root / "step_00000003")
    alone = tmp_path / "alone"
    shutil.copytree(killed, alone)
    _torchrun(tmp_path, tmp_path / "info_resume", ["train", str(recipe), "--out", str(killed), *common, *every])
    _assert_same_losses(full, _losses(killed), (4, 5))
    assert not partial.exists()  # the next save cleaned up the leftover
    assert cli_main(["train", str(recipe), "--out", str(alone), *common, *every]) == 0  # fsdp with 1 process
    _assert_same_losses(full, _losses(alone), (4, 5))

    # exports: the 2-process run's weights gathered from its shards against the 1-process run's
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
    # (with a sample grid at step 5: under FSDP both processes run the student's forwards, rank 0 writes it)
    every = ["train.checkpoint_every=3"]
    _torchrun(tmp_path, tmp_path / "info", ["train", str(recipe), "--out", str(two), "--no-progress", *every,
                                            "train.sample_every=5", "train.sample_count=2"])
    _check_shards(tmp_path / "info")
    assert [p.name for p in (two / "samples").iterdir()] == ["step_00000005.png"]
    assert cli_main(["train", str(recipe), "--out", str(one), "--no-progress", *every, "train.parallel=ddp"]) == 0
    _assert_same_losses(_losses(one), _losses(two), range(1, 6))
    # one process resumes the 2-process sharded checkpoint of step 3 and gives steps 4-5 (the teacher and the fake
    # score re-sharded on one process, gradients again through both into the student)
    alone = tmp_path / "alone"
    shutil.copytree(two, alone)
    _check_sharded_checkpoint(alone / "checkpoints" / "step_00000003")
    shutil.rmtree(alone / "checkpoints" / "step_00000005")
    assert cli_main(["train", str(recipe), "--out", str(alone), "--no-progress", *every]) == 0
    _assert_same_losses(_losses(two), _losses(alone), (4, 5))
    # the student gathered from its shards equals the 1-process student
    for run in (two, one):
        assert cli_main(["export", str(run), "--out", str(tmp_path / f"ex_{run.name}"), "--device", "cpu"]) == 0
    w2, w1 = _unet_weights(tmp_path / "ex_two"), _unet_weights(tmp_path / "ex_one")
    assert w2.keys() == w1.keys()
    assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) < 1e-5


def test_fsdp_lora_shared_base_flux_two_processes(tiny_flux_dir, tmp_path, torch_single_thread):
    """recipes/flux_dmd2_lora.yaml as shipped (LoRA student and fake score on the teacher's one bf16 base, FSDP,
    gradient checkpointing) on the tiny FLUX: the shared base is sharded once, each process holds about half of
    every adapter and its AdamW states, the losses are one process's with the same global batch, one process
    resumes the sharded checkpoint, and the export (adapters merged into the transformer) of the 2-process run
    equals the 1-process run's."""
    from safetensors.torch import load_file

    from distill import checkpoint as ckpt

    (tmp_path / "prompts.txt").write_text("a cat\na dog\na red car\na tree\n")
    overrides = [f"teacher.path={tiny_flux_dir}", "teacher.resolution=[32,32]", "teacher.max_sequence_length=16",
                 "teacher.gan_blocks=[0]", f"data.prompts={tmp_path / 'prompts.txt'}", "data.batch_size=4",
                 "train.steps=4", "train.log_every=1", "train.checkpoint_every=2", "train.mixed_precision='no'",
                 "student.lora.rank=4", "fake_score.lora.rank=4", "method.generator_every=2"]
    recipe = str(ROOT / "recipes" / "flux_dmd2_lora.yaml")
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(tmp_path, tmp_path / "info", ["train", recipe, "--out", str(two), "--no-progress", *overrides])
    _check_shards(tmp_path / "info")
    _check_sharded_checkpoint(ckpt.list_checkpoints(two / "checkpoints")[-1])
    assert cli_main(["train", recipe, "--out", str(one), "--no-progress", *overrides, "train.parallel=ddp"]) == 0
    _assert_same_losses(_losses(one), _losses(two), range(1, 5), rel=1e-4)
    # one process resumes the 2-process sharded checkpoint of step 2 and gives steps 3-4
    alone = tmp_path / "alone"
    shutil.copytree(two, alone)
    shutil.rmtree(alone / "checkpoints" / "step_00000004")
    assert cli_main(["train", recipe, "--out", str(alone), "--no-progress", *overrides]) == 0
    _assert_same_losses(_losses(two), _losses(alone), (3, 4), rel=1e-4)
    for run in (two, one):
        assert cli_main(["export", str(run), "--out", str(tmp_path / f"ex_{run.name}"), "--device", "cpu"]) == 0
    w2, w1 = (load_file(str(tmp_path / f"ex_{r}" / "transformer" / "diffusion_pytorch_model.safetensors"))
              for r in ("two", "one"))
    assert w2.keys() == w1.keys()
    assert max(float((w2[k].float() - w1[k].float()).abs().max()) for k in w1) < 1e-5
