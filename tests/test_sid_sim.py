"""SiD and SIM: the losses' algebra, their gradient paths, quality on an analytic teacher, tiny SDXL plumbing.

Full-size quality targets (energy <= 0.005, precision >= 0.95, every mode weight within 0.03, <= 2 min) are
measured by benchmarks/bench_toy_methods.py with the recipes' defaults; the runs here are shorter, with
looser bounds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distill import checkpoint as ckpt
from distill.build import build_run, method_class
from distill.cli import main as cli_main
from distill.config import load_config
from distill.methods.base import pooled_by_time
from distill.methods.sid import SiD, SiDConfig
from distill.methods.sim import SIM, SIMConfig, sim_direction
from distill.toy_eval import evaluate, train_toy

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SID_RECIPE, SIM_RECIPE = "recipes/toy_ring8_sid.yaml", "recipes/toy_ring8_sim.yaml"
SHORT = ["student.warm_start.steps=800", "student.warm_start.pairs=4096", "student.warm_start.ode_steps=100",
         "train.steps=300", "train.log_every=0", "train.ema_decay=0.98", "generator_optim.warmup_steps=100"]


@pytest.fixture(scope="module")
def toy():
    """Models from the SiD toy recipe (no warm start), and the SiD / SIM methods over the same models."""
    config = load_config(SID_RECIPE, ["student.warm_start.steps=0", "data.batch_size=64"])
    models, _, data = build_run(config, warm_start=False)
    return models, data


def _loss_and_grads(method, data, step=3):
    student = method.student
    student.zero_grad(set_to_none=True)
    loss, logs = method.generator_loss(data(step, slice(0, data.global_batch_size), None))
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters() if p.requires_grad]
    return loss.detach(), grads, logs


def test_sim_l2_equals_sid_alpha_one(toy):
    models, data = toy
    sid = SiD(models.teacher, models.student, models.fake_score, SiDConfig(alpha=1.0))
    sim = SIM(models.teacher, models.student, models.fake_score, SIMConfig(distance="l2"))
    loss_sid, grads_sid, _ = _loss_and_grads(sid, data)
    loss_sim, grads_sim, _ = _loss_and_grads(sim, data)
    torch.testing.assert_close(loss_sim, loss_sid, rtol=1e-5, atol=1e-8)
    assert any(g.abs().max() > 0 for g in grads_sid)
    for a, b in zip(grads_sim, grads_sid):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    # and alpha matters: alpha = 1.2 is a different loss
    loss_12, _, _ = _loss_and_grads(SiD(models.teacher, models.student, models.fake_score, SiDConfig()), data)
    assert not torch.allclose(loss_12, loss_sid)


def test_pseudo_huber_limits():
    y = torch.randn(4, 2, 3)
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0])
    c = 1e6  # c -> inf: SiD's direction scaled per sample by 1 / (c sigma^2)
    torch.testing.assert_close(sim_direction(y, sigma, c=c) * (c * sigma**2)[:, None, None], y, rtol=1e-4, atol=1e-6)
    unit = sim_direction(y, sigma, c=0.0)  # c -> 0: unit norm per sample
    torch.testing.assert_close(unit.flatten(1).norm(dim=1), torch.ones(4))


def test_gradient_flows_through_both_networks_inputs(toy):
    """The generator gradient is not DMD's: it also runs through the teacher's and the fake score's inputs."""
    models, data = toy
    method = SiD(models.teacher, models.student, models.fake_score, SiDConfig())
    fake_params = list(models.fake_score.parameters())
    for p in fake_params:
        p.grad = None
    _, grads, logs = _loss_and_grads(method, data)
    # the fake score is frozen in the generator step (no gradient) and trainable again afterwards
    assert all(p.grad is None for p in fake_params) and all(p.requires_grad for p in fake_params)
    assert logs["nan_dropped"] == 0

    class Detached(SiD):  # the same loss with both networks' outputs detached: only the explicit x_g path
        def per_sample_loss(self, x, y_real, y_fake, t):
            return super().per_sample_loss(x, y_real.detach(), y_fake.detach(), t)

    _, grads_detached, _ = _loss_and_grads(Detached(models.teacher, models.student, models.fake_score, SiDConfig()),
                                           data)
    diff = sum(float((a - b).norm()) for a, b in zip(grads, grads_detached))
    assert diff > 1e-3 * sum(float(a.norm()) for a in grads)


def test_nan_samples_are_dropped(toy, monkeypatch):
    models, data = toy
    method = SiD(models.teacher, models.student, models.fake_score, SiDConfig())
    guided = models.fake_score.denoiser.guided

    def poisoned(x_t, t, cond, scale):
        out = guided(x_t, t, cond, scale).clone()
        out[:3] = float("nan")
        return out

    monkeypatch.setattr(models.fake_score.denoiser, "guided", poisoned)
    loss, grads, logs = _loss_and_grads(method, data)
    assert logs["nan_dropped"] == 3 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)


def test_karras_times_follow_sid():
    """u ~ U[0, 0.8] -> sigma in [0.002, 24.4] (SiD's tmax = 800), mapped to the VP timesteps."""
    config = load_config(SID_RECIPE, ["student.warm_start.steps=0"])
    models, method, data = build_run(config, warm_start=False)
    batch = data(0, slice(0, 256), None)
    t = torch.cat([method.generator_times(batch.rng) for _ in range(40)])
    sigma = models.teacher.schedule.edm_sigma(t)
    assert int(t.min()) == 0 and sigma.max() <= 24.5 and sigma.max() > 15
    assert 0.35 < float((sigma < 1.0).double().mean()) < 0.65  # Karras' rho = 7 spacing: median sigma ~ 1


def test_pooled_normaliser_averages_neighbours_in_time():
    values = torch.tensor([5.0, 1.0, 3.0, 7.0, 2.0])
    t = torch.tensor([40, 10, 30, 50, 20])  # time order: 1, 2, 3, 5, 7
    torch.testing.assert_close(pooled_by_time(values, t, 1), values)
    torch.testing.assert_close(pooled_by_time(values, t, 3), torch.tensor([5.0, 2.0, 10 / 3, 5.0, 2.0]))
    torch.testing.assert_close(pooled_by_time(values, t, 99), values.mean().expand(5))
    # SiD with the pooled normaliser: the per-sample weight is shared by samples at the same time
    x, y = torch.randn(64, 2), torch.randn(64, 2)
    same_t = torch.full((64,), 500)
    method = SiD.__new__(SiD)
    method.config = SiDConfig(normaliser="sid_pooled", normaliser_pool=64)
    wf = method.normaliser(x, y, same_t)
    torch.testing.assert_close(wf, (x - y).abs().mean().expand(64))


@pytest.mark.parametrize("recipe", [SID_RECIPE, SIM_RECIPE], ids=["sid", "sim"])
def test_ring8_one_step(tmp_path, recipe):
    run = train_toy(recipe, tmp_path, SHORT)
    report = evaluate(run)
    assert report.energy <= 0.01, report
    assert report.precision >= 0.9, report
    assert report.max_weight_error <= 0.05, report
    assert report.coverage == 8
    assert run.trainer.step == 300


# ---------------------------------------------------------------------------------------------- tiny SDXL
PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse", "a bowl of fruit"]


def tiny_sdxl_recipe(src: str, tiny_sdxl_dir: str, folder: Path, method: dict | None = None,
                     student: dict | None = None) -> Path:
    """The SDXL recipe ``src`` on the tiny pipeline: batch 2, fp32, lr 1e-4 (so that 3 steps move the weights)."""
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = yaml.safe_load(Path(src).read_text())
    config["teacher"].update(path=tiny_sdxl_dir, resolution=None)
    config["data"].update(prompts=str(folder / "prompts.txt"), batch_size=2)
    config["train"].update(steps=3, log_every=1, checkpoint_every=0, mixed_precision="no", ema_decay=0.9)
    config["generator_optim"].update(lr=1e-4, warmup_steps=0)
    config["critic_optim"].update(lr=1e-4, warmup_steps=0)
    config["method"].update(method or {})
    config["student"].update(student or {})
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_cli(recipe: Path, out: Path, *args: str) -> None:
    assert cli_main(["train", str(recipe), "--out", str(out), "--no-progress", *args]) == 0


def latest_checkpoint(run: Path):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1])


def assert_resume_matches_straight(tmp_path: Path, recipe: Path, groups: set[str]) -> list[dict]:
    """Train 3 steps (one checkpoint), resume to 4, and compare with 4 steps straight, bit for bit."""
    train_cli(recipe, tmp_path / "resumed")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step_00000003"]
    train_cli(recipe, tmp_path / "resumed", "train.steps=4")
    train_cli(recipe, tmp_path / "straight", "train.steps=4")
    (w_res, _, s_res), (w_str, _, s_str) = latest_checkpoint(tmp_path / "resumed"), latest_checkpoint(tmp_path / "straight")
    assert s_res["step"] == s_str["step"] == 4
    assert set(w_res) == groups
    for group, tensors in w_str.items():
        for key, value in tensors.items():
            assert torch.equal(value, w_res[group][key]), f"{group}.{key} differs after resume"
    logs = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for r in logs for k, v in r.items() if k != "time")
    return logs


def student_moved(run: Path, tiny_sdxl_dir: str) -> float:
    from safetensors.torch import load_file

    teacher = load_file(str(Path(tiny_sdxl_dir) / "unet" / "diffusion_pytorch_model.safetensors"))
    student = latest_checkpoint(run)[0]["student"]
    return max(float((student[f"denoiser.backbone.{k}"] - v).abs().max()) for k, v in teacher.items())


@pytest.mark.parametrize("src", ["recipes/sdxl_sid.yaml", "recipes/sdxl_sim.yaml"], ids=["sid", "sim"])
def test_tiny_sdxl_trains_checkpoints_and_resumes(tiny_sdxl_dir, tmp_path, src):
    recipe = tiny_sdxl_recipe(src, tiny_sdxl_dir, tmp_path)
    config = load_config(recipe)
    assert method_class(config.method["name"]) is (SiD if "sid" in src else SIM)
    assert config.student.timesteps == [625] and config.student.noise_scale == "sigma"
    assert tuple(config.generator_optim.betas) == (0.0, 0.999)
    logs = assert_resume_matches_straight(tmp_path, recipe, {"student", "student_ema", "fake_score"})
    # one generator and one fake-score step every iteration, no NaN samples
    assert all("loss_gen" in r and r["loss_fake"] > 0 and r["nan_dropped"] == 0 for r in logs)
    assert student_moved(tmp_path / "straight", tiny_sdxl_dir) > 1e-6
