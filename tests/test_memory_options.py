"""Memory and precision settings: fp16 refused, 8-bit AdamW gated, warm-up in iterations, gradients freed after
each optimiser step, DMD2's fake score in fp32 outside autocast, gradient checkpointing on diffusers backbones."""
from __future__ import annotations

import pytest
import torch

from distill.build import build_run
from distill.cli import main
from distill.config import OptimConfig, load_config
from distill.engine import Trainer, build_optimizer
from distill.methods.base import frozen

TOY = ["student.warm_start.steps=0", "student.net.hidden=16", "fake_score.net.hidden=16", "data.batch_size=8",
       "train.log_every=0"]


@pytest.mark.parametrize("override,message", [
    ("train.mixed_precision=fp16", "fp16 is not supported"),
    ("generator_optim.kind=adamw8bit", "adamw8bit"),
    ("critic_optim.kind=sgd", "critic_optim.kind must be one of"),
    ("train.parallel=zero3", "train.parallel must be one of"),
])
def test_unhonoured_settings_are_refused_before_building(tmp_path, capsys, monkeypatch, override, message):
    import distill.build as build

    monkeypatch.setattr(build, "build_run", lambda *a, **k: pytest.fail("built before refusing"))
    code = main(["train", "recipes/toy_ring8_dmd2.yaml", "--out", str(tmp_path / "r"), override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_warmup_counts_iterations_under_ttur():
    """Generator every 5 iterations, warm-up 10 iterations: its updates at iterations 0, 5, 10 use 1/10, 6/10, 1."""
    p = torch.nn.Parameter(torch.zeros(3))
    def lrs(every: int, n: int) -> list[float]:
        opt, sched = build_optimizer([p], OptimConfig(lr=1.0, warmup_steps=10), every=every)
        out = []
        for _ in range(n):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert lrs(5, 4) == pytest.approx([0.1, 0.6, 1.0, 1.0])
    assert lrs(1, 3) == pytest.approx([0.1, 0.2, 0.3])  # the critic steps every iteration


def test_gradients_are_freed_after_each_update_and_fake_score_runs_fp32(tmp_path, monkeypatch):
    config = load_config("recipes/toy_ring8_dmd2.yaml", TOY + ["train.mixed_precision=bf16", "train.steps=2",
                                                               "method.generator_every=1"])
    models, method, data = build_run(config)
    seen = []
    forward = type(models.fake_score).forward

    def spy(self, x_t, t, cond=None):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), x_t.dtype))
        return forward(self, x_t, t, cond)

    monkeypatch.setattr(type(models.fake_score), "forward", spy)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, tmp_path,
                      progress=False)
    critic_grads = {}

    def after_generator(step):  # the generator update is over: the student's gradients must be gone already
        critic_grads["student"] = [p.grad for p in method.generator_parameters()]

    method.on_generator_step = after_generator
    trainer.train_step()
    assert critic_grads["student"] and all(g is None for g in critic_grads["student"])
    assert all(p.grad is None for p in method.critic_parameters())
    dm_calls = [s for s in seen if not s[0]]  # the DM term's fake-score call runs under no_grad
    assert dm_calls and all(not autocast and dtype == torch.float32 for _, autocast, dtype in dm_calls)


def test_gradient_checkpointing_same_gradient(tiny_sdxl_dir, tmp_path, torch_single_thread):
    from distill.models.export import unwrap_unet

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    common = ["teacher.kind=sdxl", f"teacher.path={tiny_sdxl_dir}", "method.name=sid", "data.kind=prompts",
              f"data.prompts={prompts}", "data.batch_size=2", "student.timesteps=[625]"]
    grads = []
    for flag in (False, True):
        config = load_config(None, common + [f"train.gradient_checkpointing={str(flag).lower()}"])
        models, method, data = build_run(config, warm_start=False)
        unets = [unwrap_unet(r) for r in (models.teacher, models.student, models.fake_score)]
        assert all(u.is_gradient_checkpointing == flag for u in unets)
        with frozen(models.fake_score):  # as the Trainer does: frozen through forward and backward (recompute)
            loss, _ = method.generator_loss(data(0, slice(0, 2), None))
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in method.generator_parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_needs_a_diffusers_backbone(tmp_path, capsys):
    code = main(["train", "recipes/toy_ring8_dmd2.yaml", "--out", str(tmp_path / "r"), *TOY,
                 "train.gradient_checkpointing=true"])
    assert code == 2 and "needs a diffusers backbone" in capsys.readouterr().err
