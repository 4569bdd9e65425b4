"""``distill plan``: weights, gradients, optimiser and EMA bytes equal a real run's exactly; activations and the
peak are within 25% of a real CPU run's measured live memory; hub models plan from embedded configs."""
from __future__ import annotations

import weakref

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill.build import build_run
from distill.cli import main
from distill.config import load_config
from distill.engine import Trainer
from distill.plan import format_plan, make_plan


def _recipe(tmp_path, tiny_sdxl_dir, *extra):
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    return load_config(None, ["teacher.kind=sdxl", f"teacher.path={tiny_sdxl_dir}", "method.name=dmd2",
                              "method.generator_every=1", "data.kind=prompts", f"data.prompts={tmp_path / 'p.txt'}",
                              "data.batch_size=2", "train.ema_decay=0.9", "train.log_every=0", *extra])


def _storage_bytes(modules) -> int:
    storages = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of the buffers allocated while the mode is on and still alive: ``now`` and its running ``peak``.

    Every op's outputs are registered by storage (views and in-place results of an input are not new
    buffers); a weak reference on the storage subtracts its bytes when it is freed. This is the CPU
    counterpart of ``torch.cuda.max_memory_allocated`` minus what existed before (weights, optimiser states).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def _measure_step(trainer, method):
    """One training step under :class:`LiveBytes`: per update, the bytes its forward left alive (what autograd
    keeps for backward, plus the loss) and the gradients at its optimiser step; and the step's peak."""
    fwd, grads = {}, {}
    tracker = LiveBytes()
    for name, loss_name in (("generator", "generator_loss"), ("critic", "critic_loss")):
        loss_fn = getattr(method, loss_name)

        def wrapped(*a, _fn=loss_fn, _name=name, **k):
            before = tracker.now
            out = _fn(*a, **k)
            fwd[_name] = tracker.now - before
            return out

        setattr(method, loss_name, wrapped)
    for name, turn in trainer.turns.items():  # gradient bytes at the moment each optimiser steps
        step = turn.optimizer.step

        def spy(*a, _name=name, _turn=turn, _step=step, **k):
            grads[_name] = sum(p.grad.numel() * p.grad.element_size() for p in _turn.params if p.grad is not None)
            return _step(*a, **k)

        turn.optimizer.step = spy
    with tracker:
        trainer.train_step()
    return fwd, grads, tracker.peak


def test_plan_matches_a_real_run(tiny_sdxl_dir, tmp_path, torch_single_thread):
    # 64 px images (16x16 latents) so that activations are not lost among the tiny model's fixed costs
    config = _recipe(tmp_path, tiny_sdxl_dir, "data.resolution=64", "data.batch_size=4")
    plan = make_plan(config, gpus=1, gpu_mem=80)

    models, method, data = build_run(config, warm_start=False)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, tmp_path / "run",
                      progress=False)
    trainer.train_step()  # the first step creates the optimiser states: measure the second, as on a GPU
    fwd, grads, peak = _measure_step(trainer, method)
    pipeline = models.pipeline
    weights = _storage_bytes([models.teacher, models.student, models.fake_score, *pipeline.text_encoders,
                              pipeline.vae])
    optimizer = sum(v.numel() * v.element_size() for t in trainer.turns.values()
                    for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    ema = sum(v.numel() * v.element_size() for v in trainer.ema.shadow.values())
    assert plan.weights_sharded + plan.weights_replicated == weights
    assert plan.optimizer == optimizer
    assert plan.ema == ema
    for name in ("generator", "critic"):  # each update's own gradients, exactly
        assert plan.updates[name].gradients == grads[name]
        ratio = plan.updates[name].activations_full / fwd[name]
        assert 0.75 <= ratio <= 1.25, (name, plan.updates[name].activations_full, fwd[name])
    measured_peak = weights + optimizer + ema + peak
    assert 0.75 <= plan.total / measured_peak <= 1.25, (plan.total, measured_peak)
    assert plan.activations_checkpointed < plan.activations_full  # checkpointing saves less for backward

    sharded = make_plan(_recipe(tmp_path, tiny_sdxl_dir, "train.parallel=fsdp"), gpus=4, gpu_mem=80)
    small = make_plan(_recipe(tmp_path, tiny_sdxl_dir), gpus=1, gpu_mem=80)
    for name in ("generator", "critic"):
        assert sharded.updates[name].gradients == -(-small.updates[name].gradients // 4)
    assert sharded.optimizer == -(-small.optimizer // 4)
    assert sharded.weights_replicated == small.weights_replicated  # text encoders and VAE are not sharded


def test_plan_bf16_saves_fewer_bytes_than_fp32(tiny_sdxl_dir, tmp_path, torch_single_thread):
    """Under bf16 autocast the matmul / conv inputs are saved in 2 bytes (distill/plan_autocast.py)."""
    fp32 = make_plan(_recipe(tmp_path, tiny_sdxl_dir, "data.resolution=64"), gpus=1, gpu_mem=80)
    bf16 = make_plan(_recipe(tmp_path, tiny_sdxl_dir, "data.resolution=64", "train.mixed_precision=bf16"),
                     gpus=1, gpu_mem=80)
    for name in ("generator", "critic"):
        ratio = bf16.updates[name].activations_full / fp32.updates[name].activations_full
        assert 0.4 < ratio < 0.9, (name, ratio)
        assert bf16.updates[name].gradients == fp32.updates[name].gradients  # gradients stay fp32


def test_plan_from_embedded_config_without_weights(tmp_path, torch_single_thread):
    """SD1.5 is not on disk here: plan builds its UNet from the embedded config on meta."""
    from distill.arch_configs import ARCHS

    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert repo in ARCHS
    (tmp_path / "p.txt").write_text("a cat\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher": {"kind": "sd15", "path": repo, "dtype": "bfloat16"}, "method": {"name": "dmd2"},
        "data": {"kind": "prompts", "prompts": str(tmp_path / "p.txt"), "batch_size": 8, "resolution": 256},
        "train": {"mixed_precision": "bf16"}}))
    plan = make_plan(load_config(recipe, []), gpus=8, gpu_mem=80)
    unet = 859_520_964  # SD1.5 UNet parameters (the published count)
    assert plan.source == "embedded"
    # bf16 teacher, fp32 student and fake score, and the roles' few small buffers (the student's timesteps)
    assert 0 <= plan.weights_sharded - unet * (2 + 4 + 4) < 1024
    assert plan.updates["generator"].gradients == unet * 4 and plan.updates["critic"].gradients == unet * 4
    import diffusers

    with torch.device("meta"):
        tensors = len(list(diffusers.UNet2DConditionModel.from_config(ARCHS[repo]["config"]).parameters()))
    assert plan.optimizer == 2 * (8 * unet + 4 * tensors)  # AdamW of student and of fake score
    out = format_plan(plan, str(recipe))
    assert "(architecture from the embedded config; weights not on disk)" in out and "verdict: fits" in out


@pytest.mark.slow
def test_plan_cli_verdict_and_advice(tiny_sdxl_dir, tmp_path, capsys, torch_single_thread):
    config = _recipe(tmp_path, tiny_sdxl_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(config.to_dict()))
    total = make_plan(config, gpus=2, gpu_mem=80).total
    tight = f"{total / 1024**3 / 0.9 * 0.99:.6f}"  # just below what the replicated run needs
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu-mem", tight]) == 1  # the verdict is the exit status
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "train.parallel=fsdp" in out
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu-mem", tight, "train.parallel=fsdp"]) == 0
    assert "verdict: fits" in capsys.readouterr().out
