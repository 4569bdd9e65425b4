"""LoRA roles hold ONE copy of the base weights: a LoRA student and a LoRA fake score are adapters on the
teacher's frozen (bf16) base, and the teacher is that base with adapters off."""
from __future__ import annotations

import pytest
import torch

from distill.build import build_run
from distill.config import load_config


def _config(tiny_sdxl_dir, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    return load_config(None, [f"teacher.kind=sdxl", f"teacher.path={tiny_sdxl_dir}", "teacher.dtype=bfloat16",
                              "student.lora.rank=4", "fake_score.lora.rank=4", "method.name=dmd2",
                              "method.generator_every=1", "data.kind=prompts", f"data.prompts={prompts}",
                              "data.batch_size=2", "train.mixed_precision=bf16", *extra])


def _storages(*modules) -> dict[int, tuple[int, torch.dtype]]:
    out = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            out[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
    return out


def test_lora_dmd2_holds_one_base(tiny_sdxl_dir, tmp_path, torch_single_thread):
    from distill.models.loading import load_unet

    models, method, data = build_run(_config(tiny_sdxl_dir, tmp_path), warm_start=False)
    teacher, student, fake = models.teacher, models.student, models.fake_score
    unet = load_unet(tiny_sdxl_dir)
    base_elements = sum(p.numel() for p in unet.parameters())
    base_bytes_bf16 = base_elements * 2

    adapters = {"student": [p for p in student.parameters()], "fake": [p for p in fake.parameters()]}
    # each adapter role owns only its adapter (trainable, fp32), nothing of the base or of the other adapter
    for role, params in adapters.items():
        assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params), role
    assert not {id(p) for p in adapters["student"]} & {id(p) for p in adapters["fake"]}
    adapter_bytes = sum(p.numel() * 4 for ps in adapters.values() for p in ps)

    storages = _storages(teacher, student, fake)
    total = sum(n for n, _ in storages.values())
    bf16 = sum(n for n, d in storages.values() if d == torch.bfloat16)
    assert bf16 == base_bytes_bf16  # the base exactly once, in bf16
    small = sum(b.numel() * b.element_size() for m in (teacher, student, fake) for b in m.buffers())
    assert small == 8  # the only buffer: the student's timesteps ([999], int64)
    assert total == base_bytes_bf16 + adapter_bytes + small  # ... plus the two adapters, and nothing else
    # the shared tensors are the teacher's own: no other copy of the UNet exists
    teacher_ptrs = {p.untyped_storage().data_ptr() for n, p in teacher.named_parameters() if "lora_" not in n}
    assert len(teacher_ptrs) == sum(1 for n, _ in unet.named_parameters())


def test_roles_compute_with_their_own_adapter(tiny_sdxl_dir, tmp_path, torch_single_thread):
    """Teacher = base with adapters off; student / fake score = base + their adapter; grads reach only theirs."""
    models, method, data = build_run(_config(tiny_sdxl_dir, tmp_path, "teacher.dtype=float32"), warm_start=False)
    teacher, student, fake = models.teacher, models.student, models.fake_score
    batch = data(0, slice(0, 2), None)
    x = torch.randn(2, *models.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 700])
    with torch.no_grad():
        for p in [*student.parameters(), *fake.parameters()]:  # move the adapters away from identity
            p.add_(0.05 * torch.randn_like(p))
        y_teacher = teacher(x, t, batch.cond, 1.0)
        y_student = student.denoiser(x, t, batch.cond)
        y_fake = fake(x, t, batch.cond)
        y_teacher_again = teacher(x, t, batch.cond, 1.0)
    assert torch.equal(y_teacher, y_teacher_again)  # switching adapters leaves the teacher untouched
    assert (y_student - y_teacher).abs().max() > 1e-4 and (y_fake - y_teacher).abs().max() > 1e-4
    assert (y_student - y_fake).abs().max() > 1e-4
    fake(x, t, batch.cond).square().mean().backward()
    assert all(p.grad is None for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is None for n, p in teacher.named_parameters() if "lora_" not in n)


@pytest.mark.slow
def test_lora_dmd2_trains_saves_and_exports(tiny_sdxl_dir, tmp_path, torch_single_thread):
    """A few steps through the CLI with the shared base, resume, and the LoRA export that diffusers loads."""
    from diffusers import StableDiffusionXLPipeline

    from distill.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    common = [f"teacher.path={tiny_sdxl_dir}", "train.steps=2", "train.log_every=1", "data.batch_size=2",
              f"data.prompts={prompts}"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {kind: sdxl}\nstudent: {lora: {rank: 4}}\nfake_score: {lora: {rank: 4}}\n"
                      "method: {name: dmd2, generator_every: 1}\ndata: {kind: prompts}\n")
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress", *common]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "lora"), "--device", "cpu"]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_gradient_checkpointing_on_the_shared_base_recomputes_with_the_roles_adapter(tiny_sdxl_dir, tmp_path,
                                                                                    torch_single_thread):
    """Checkpointed blocks recompute in backward, after other roles switched the shared layers to their adapter
    (or off): each block gets its forward-time adapter back, so the losses and the trained adapters equal a run
    without checkpointing (without that, autograd raises: other tensors are saved in the recomputation)."""
    import json

    from distill import checkpoint as ckpt
    from distill.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {kind: sdxl}\nstudent: {lora: {rank: 4}}\nfake_score: {lora: {rank: 4}}\n"
                      "method: {name: dmd2, generator_every: 1}\ndata: {kind: prompts}\n")
    runs = []
    for flag in ("false", "true"):
        run = tmp_path / f"run_{flag}"
        assert main(["train", str(recipe), "--out", str(run), "--no-progress", f"teacher.path={tiny_sdxl_dir}",
                     "train.steps=2", "train.log_every=1", "data.batch_size=2", f"data.prompts={prompts}",
                     f"train.gradient_checkpointing={flag}"]) == 0
        logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        weights, _, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1])
        runs.append((logs, weights))
    (logs_a, w_a), (logs_b, w_b) = runs
    for a, b in zip(logs_a, logs_b):
        for k in ("loss_dm", "loss_fake"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), k
    for role in w_a:
        for name, t in w_a[role].items():
            torch.testing.assert_close(w_b[role][name], t, rtol=1e-5, atol=1e-7)

def test_lora_dmd2_on_flux_holds_one_base(tiny_flux_dir, tmp_path, torch_single_thread):
    """The same on the tiny FLUX (a flow transformer behind its adapter): every parameter and buffer storage of
    teacher, student and fake score together is one bf16 copy of the transformer plus the two fp32 adapters."""
    from diffusers import FluxTransformer2DModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    lora = "{rank: 4, target_modules: [to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, proj_mlp]}"
    config = load_config(None, ["teacher.kind=flux", f"teacher.path={tiny_flux_dir}", "teacher.dtype=bfloat16",
                                "teacher.resolution=[32,32]", "teacher.max_sequence_length=16",
                                "student.timesteps=[1.0]", f"student.lora={lora}", f"fake_score.lora={lora}",
                                "method.name=dmd2", "method.generator_every=1", "data.kind=prompts",
                                f"data.prompts={prompts}", "data.batch_size=2", "train.mixed_precision=bf16"])
    models, method, data = build_run(config, warm_start=False)
    teacher, student, fake = models.teacher, models.student, models.fake_score
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    base_bytes_bf16 = sum(p.numel() for p in transformer.parameters()) * 2
    # the teacher's cast to bf16 casts floating buffers too (FLUX's transformer has none; counted in case)
    base_buffer_bytes = sum(b.numel() * (2 if b.is_floating_point() else b.element_size()) for b in transformer.buffers())

    adapters = {"student": list(student.parameters()), "fake": list(fake.parameters())}
    for role, params in adapters.items():
        assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params), role
    assert not {id(p) for p in adapters["student"]} & {id(p) for p in adapters["fake"]}
    adapter_bytes = sum(p.numel() * 4 for ps in adapters.values() for p in ps)
    student_buffers = sum(b.numel() * b.element_size() for b in student.buffers())  # its timesteps

    storages = _storages(teacher, student, fake)
    total = sum(n for n, _ in storages.values())
    bf16 = sum(n for n, d in storages.values() if d == torch.bfloat16)
    floating_buffers = sum(b.numel() * 2 for b in transformer.buffers() if b.is_floating_point())
    assert bf16 == base_bytes_bf16 + floating_buffers  # the base exactly once, in bf16
    assert total == base_bytes_bf16 + base_buffer_bytes + adapter_bytes + student_buffers  # and nothing else
    # the base parameters are the teacher's own tensors, one storage each: no second copy of the transformer
    teacher_ptrs = {p.untyped_storage().data_ptr() for n, p in teacher.named_parameters() if "lora_" not in n}
    assert len(teacher_ptrs) == sum(1 for _ in transformer.parameters())
    assert 0 < adapter_bytes < base_bytes_bf16  # a real base and real adapters were counted
