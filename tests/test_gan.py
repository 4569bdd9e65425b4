"""DMD2's GAN head on an image-space toy: the ``image4`` mixture (4 modes of 1x8x8 images) with tiny diffusers
``UNet2DModel`` students and fake scores (``net.kind: unet2d``).

The head sits on the fake score's bottleneck (``mid_block``, tapped by a forward hook that stops the
forward there; DMD2 Sec. 4.2). The tests show

* the discriminator loss trains the head *and* the fake score's encoder and mid block, and nothing after
  the tap (the decoder is never run);
* in the generator step no fake-score or head parameter receives a gradient, while the GAN term does
  reach the student (through the frozen critic's input);
* trained inside the Trainer, the head learns to separate real from generated images.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.build import build_run
from distill.config import load_config
from distill.engine import Trainer
from distill.gan import discriminator_gan_loss
from distill.methods.base import generate

# A frozen toy DMD2 recipe (ring8 teacher): recipes/*.yaml are tuned by hand and must not change what
# these tests measure (a warm start there would also cost minutes).
RECIPE = str(Path(__file__).resolve().parent / "recipes" / "toy_dmd2_frozen.yaml")
IMAGE_TOY = ["teacher.preset=image4", "student.net.kind=unet2d", "fake_score.net.kind=unet2d",
             "student.net.channels=[16,32]", "fake_score.net.channels=[16,32]", "data.batch_size=32",
             "method.generator_every=5", "method.gan_generator_weight=0.01", "method.gan_discriminator_weight=1.0",
             "train.log_every=0", "critic_optim.lr=1e-3", "generator_optim.lr=1e-4", "critic_optim.warmup_steps=0"]


def _build(extra=()):
    config = load_config(RECIPE, IMAGE_TOY + list(extra))
    models, method, data = build_run(config)
    return config, models, method, data


def _unet(method):
    """The fake score's UNet2DModel (inside TeacherResidual.net, the toy analogue of a teacher copy)."""
    return method.fake_score.denoiser.backbone.net.unet


def _grad_norm(module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0


def test_image_toy_builds_unet2d_with_head_on_mid_block(torch_single_thread):
    from diffusers import UNet2DModel

    _, models, method, _ = _build()
    assert models.sample_shape == (1, 8, 8)
    assert isinstance(models.student.denoiser.backbone.unet, UNet2DModel)
    assert isinstance(_unet(method), UNet2DModel)
    assert method.discriminator.feature_module == "net.unet.mid_block"
    # the fake score starts as the teacher (zero-initialised residual UNet)
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 300, 600, 900])
    assert torch.equal(method.fake_score(x_t, t), models.teacher(x_t, t))


def test_discriminator_loss_trains_encoder_mid_block_and_head_only(torch_single_thread):
    _, models, method, data = _build()
    batch = data(0, slice(0, 16), None)
    assert batch.real is not None and batch.real.shape == (16, 1, 8, 8)
    x = generate(models.student, batch, grad=False)
    schedule = models.teacher.schedule
    t = torch.full((16,), 200)
    fake_logits = method.discriminator(schedule.add_noise(x, torch.randn_like(x), t), t, None)
    real_logits = method.discriminator(schedule.add_noise(batch.real, torch.randn_like(x), t), t, None)
    discriminator_gan_loss(fake_logits, real_logits).backward()

    unet = _unet(method)
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        assert _grad_norm(getattr(unet, name)) > 1e-8, f"fake score {name} got no gradient from the D loss"
    for name in ("up_blocks", "conv_norm_out", "conv_out"):  # after the tap: never run
        assert all(p.grad is None for p in getattr(unet, name).parameters()), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.discriminator.head.parameters())
    assert all(p.grad is None for p in models.student.parameters())
    assert all(p.grad is None for p in models.teacher.parameters())
    # the head's parameters are the discriminator's own; the fake score is not registered inside it
    assert {id(p) for p in method.discriminator.parameters()} == {id(p) for p in method.discriminator.head.parameters()}


def test_full_forward_tap_gives_the_early_stop_logits_and_gradients(torch_single_thread):
    """Under FSDP2 the tap runs the whole forward (``stop_early = False``): same logits, same gradients, and the
    decoder, although run, gets none."""
    _, models, method, data = _build()
    batch = data(0, slice(0, 8), None)
    t = torch.full((8,), 300)
    x_t = models.teacher.schedule.add_noise(batch.real, torch.randn_like(batch.real), t)
    unet = _unet(method)
    runs = []
    for stop in (True, False):
        method.discriminator.stop_early = stop
        ran = []
        handle = unet.conv_out.register_forward_hook(lambda *_: ran.append(1))
        logits = method.discriminator(x_t, t, None)
        handle.remove()
        logits.sum().backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        unet.zero_grad(set_to_none=True)
        method.discriminator.zero_grad(set_to_none=True)
        runs.append((logits.detach(), grads, bool(ran)))
    (early, g_early, ran_early), (full, g_full, ran_full) = runs
    assert not ran_early and ran_full  # the decoder ran only without the early stop
    assert torch.equal(early, full)
    assert g_early.keys() == g_full.keys() and g_early  # no decoder parameter got a gradient either way
    assert not any(n.startswith(("up_blocks", "conv_out", "conv_norm_out")) for n in g_full)
    assert all(torch.allclose(g_early[n], g_full[n], rtol=1e-6, atol=0) for n in g_early)


def test_generator_step_leaves_fake_score_and_head_without_gradients(torch_single_thread):
    _, models, method, data = _build()
    batch = data(0, slice(0, 16), None)
    loss, logs = method.generator_loss(batch)
    assert "loss_g_gan" in logs and torch.isfinite(loss)
    loss.backward()
    for name, p in list(method.fake_score.named_parameters()) + list(method.discriminator.named_parameters()):
        assert p.grad is None, f"{name} received a gradient in the generator step"
    # frozen only for the step: the critic stays trainable afterwards
    assert all(p.requires_grad for p in method.discriminator.parameters())
    assert all(p.requires_grad for p in _unet(method).parameters())
    with_gan = {n: p.grad.clone() for n, p in models.student.named_parameters()}
    assert sum(float(g.norm()) for g in with_gan.values()) > 0

    # the GAN term does reach the student through the frozen critic: switching it off changes the gradient
    models.student.zero_grad(set_to_none=True)
    method.config.gan_generator_weight = 0.0
    batch = data(0, slice(0, 16), None)
    method.generator_loss(batch)[0].backward()
    diff = max(float((p.grad - with_gan[n]).abs().max()) for n, p in models.student.named_parameters())
    assert diff > 1e-9


def test_head_learns_to_separate_real_from_fake(tmp_path, torch_single_thread):
    config, models, method, data = _build(["train.steps=30"])
    g = torch.Generator().manual_seed(5)
    real = models.mixture.sample(128, generator=g)
    z, eps = torch.randn(128, 1, 8, 8, generator=g), torch.randn(128, 1, 8, 8, generator=g)
    schedule = models.teacher.schedule

    @torch.no_grad()
    def evaluate(t_value: int = 50):
        fake = models.student(z)
        t = torch.full((128,), t_value)
        real_logits = method.discriminator(schedule.add_noise(real, eps, t), t, None)
        fake_logits = method.discriminator(schedule.add_noise(fake, eps, t), t, None)
        accuracy = float(((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2)
        return float(discriminator_gan_loss(fake_logits, real_logits)), accuracy

    loss_before, acc_before = evaluate()
    assert loss_before > 1.2 and acc_before < 0.75  # an untrained head is near chance (2 log 2 = 1.386)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, tmp_path,
                      progress=False)
    logs = trainer.run()
    assert "loss_d_gan" in logs and trainer.nan_total == 0
    loss_after, acc_after = evaluate()
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)
    assert acc_after > 0.85, acc_after
    # the checkpoint holds the head next to the fake score
    from distill import checkpoint as ckpt

    weights, _, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "checkpoints")[-1])
    assert {"student", "fake_score", "discriminator"} <= set(weights)
