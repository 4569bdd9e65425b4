"""Every recipe builds, warm-starts, sizes its GAN head, trains and samples on the run's device.

PyTorch's ``meta`` device stands in for a GPU: a meta tensor has a shape and no data, so the whole build is
cheap, and an operation that mixes a CPU tensor into device maths fails there exactly as it would on CUDA
(``cuda + cpu``). On top of that a dispatch guard records every ATen operation: one whose tensor arguments
sit on two devices (beyond the 0-dim CPU scalars CUDA accepts too), or a compute kernel (matmul,
convolution, attention, norm) that runs on the CPU, means work that would silently stay on the CPU.

What meta cannot run: the Trainer's per-step logging and NaN guard read values (``float(loss)``), and a
value-dependent branch cannot be taken on data that does not exist. So the training step is the method's
losses, backward and an AdamW step, driven here as the Trainer drives them; the Trainer's placement itself
is covered by its use of the same ``build_run(device=...)``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill.build import build_run, example_batch, method_config
from distill.config import load_config
from distill.engine import build_optimizer
from distill.methods.base import frozen

#: Z-Image's own ``encode_prompt`` keeps each caption's tokens by boolean-mask indexing (a data-dependent shape,
#: which meta cannot compute; on CUDA it is a host sync, not a device error), so its recipe is built on the CPU
#: by tests/test_flow_backbones.py instead.
_META_UNSUPPORTED = {"zimage_dmd2"}
#: ``DISTILL_TEST_DEVICE=cuda`` runs the same checks for real on a GPU (benchmarks/gpu_check.sh does)
META = torch.device(os.environ.get("DISTILL_TEST_DEVICE", "meta"))
if META.type == "cuda" and META.index is None:
    META = torch.device("cuda", 0)  # tensors report cuda:0; compare like with like
RECIPES = sorted(r for r in Path(__file__).resolve().parents[1].glob("recipes/*.yaml")
                 if META.type != "meta" or r.stem not in _META_UNSUPPORTED)
#: kernels that do the real work of a network: none of them may run on the CPU in a device run
_COMPUTE = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product", "native_group_norm",
            "native_layer_norm", "linear", "matmul")


class DeviceGuard(TorchDispatchMode):
    """Records mixed-device operations and CPU compute kernels while active."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []
        self.cpu_compute: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
        name = str(func.overloadpacket.__name__)
        if len(devices) > 1 and "copy" not in name and name not in ("_to_copy", "to", "lift_fresh"):
            self.mixed.append(f"{name} on {sorted(devices)}")
        if devices == {"cpu"} and any(name == k or name.startswith(k) for k in _COMPUTE):
            self.cpu_compute.append(name)
        return func(*args, **(kwargs or {}))


#: flow-transformer teacher kinds -> their tiny offline builder (distill.models.testing)
_FLOW_BUILDERS = {"sd3": "build_tiny_sd3", "flux": "build_tiny_flux", "sana": "build_tiny_sana",
                  "zimage": "build_tiny_zimage"}


def _tiny_teacher(config, tiny_dirs: dict, tmp: Path) -> str:
    """A tiny offline stand-in for the recipe's teacher: the SDXL / SD1.5 fixtures, a tiny flow transformer
    pipeline, or (``data.kind: labels``) a digits UNet2DModel pipeline trained for 2 steps."""
    import distill.models.testing as testing

    kind = config.teacher.kind
    if config.data.kind == "labels":
        from distill.digits_teacher import DigitsTeacherConfig, ensure_digits_teacher

        return str(ensure_digits_teacher(tmp / "digits_teacher", DigitsTeacherConfig(steps=2, batch_size=8),
                                         progress=False))
    if kind in _FLOW_BUILDERS:  # (its 2 blocks: the recipe's gan_blocks give way to the default middle block)
        return getattr(testing, _FLOW_BUILDERS[kind])(str(tmp / f"tiny_{kind}"))
    return tiny_dirs["sd15" if kind == "sd15" else "sdxl"]


def _overrides(recipe: Path, tiny_dirs: dict, tmp: Path) -> list[str]:
    config = load_config(recipe)
    out = ["train.seed=0"]
    if config.student.warm_start.steps > 0:
        out += ["student.warm_start.steps=2", "student.warm_start.ode_steps=3", "student.warm_start.pairs=0"]
    if config.teacher.kind != "gmm":
        out += [f"teacher.path={_tiny_teacher(config, tiny_dirs, tmp)}", "teacher.resolution=null",
                "data.resolution=null", "data.batch_size=2"]
        if config.teacher.kind in _FLOW_BUILDERS:  # tiny transformers' RoPE tables cover 32 px, not 1024
            out += ["teacher.gan_blocks=null", "teacher.resolution=[32,32]", "teacher.max_sequence_length=16"]
            if config.method["name"] in ("dmd2", "esd"):  # (no real latents of these shapes here)
                out += ["method.gan_generator_weight=0", "method.gan_discriminator_weight=0"]
        if config.data.kind == "prompts":
            prompts = tmp / "prompts.txt"
            prompts.write_text("a cat\na dog\n")
            out += [f"data.prompts={prompts}", "data.real=null"]
        if config.fake_score.lora is not None or config.student.lora is not None:
            out += [f"{role}.lora.rank=2" for role in ("student", "fake_score")
                    if getattr(config, role).lora is not None]
    else:
        out += ["data.batch_size=8"]
    return out


def _gan_overrides(recipe: Path, tmp: Path) -> list[str] | None:
    """A GAN head on the fake score for DMD2-family recipes (sized from an example batch on the device).

    Flow transformers' GAN taps are covered by tests/test_flow_backbones.py (their latent shapes differ)."""
    config = load_config(recipe)
    if config.method["name"] not in ("dmd2", "esd") or config.teacher.kind in _FLOW_BUILDERS:
        return None
    out = ["method.gan_generator_weight=0.005", "method.gan_discriminator_weight=0.01"]
    if config.data.kind == "prompts":
        from safetensors.torch import save_file

        save_file({"latents": torch.randn(2, 4, 8, 8)}, str(tmp / "real.safetensors"))
        out.append(f"data.real={tmp / 'real.safetensors'}")
    return out


def _assert_on(module: torch.nn.Module, device: torch.device, what: str) -> None:
    wrong = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device != device]
    assert not wrong, f"{what}: {len(wrong)} tensors off {device}, e.g. {wrong[:3]}"


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _run_on(config, device: torch.device) -> None:
    from distill.samplers import sample_student

    guard = DeviceGuard()
    with guard:
        models, method, data = build_run(config, device=device, progress=False)  # warm start + GAN sizing inside
        for name in ("teacher", "student", "fake_score"):
            module = getattr(models, name)
            if module is not None:
                _assert_on(module, device, name)
        for encoder in getattr(models.pipeline, "text_encoders", ()) or ():
            _assert_on(encoder, device, "text encoder")
        if getattr(models.pipeline, "vae", None) is not None:
            _assert_on(models.pipeline.vae, device, "vae")
        disc = getattr(method, "discriminator", None)
        if disc is not None:
            _assert_on(disc, device, "discriminator head")
        batch = example_batch(data, device)
        assert all(t.device == device for t in _tensors((batch.noise, batch.cond, batch.real, batch.real_cond)))
        # one training iteration as the Trainer runs it: generator update, then critic update
        for params, others, loss_fn in (
                (method.generator_parameters(), method.critic_parameters(), method.generator_loss),
                (method.critic_parameters(), method.generator_parameters(), method.critic_loss)):
            if not params:
                continue
            with frozen(*others):  # through forward AND backward, as Trainer._update (checkpoint recompute)
                out = loss_fn(batch)
                if out is None:
                    continue
                loss, logs = out
                assert loss.device == device and all(t.device == device for t in _tensors(logs))
                opt, _ = build_optimizer(params, config.generator_optim)
                loss.backward()
            assert all(p.grad is None or p.grad.device == device for p in params)
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert all(p.device == device for p in params)
        z = torch.randn(2, *models.sample_shape).to(device)
        cond = batch.cond[slice(0, 2)] if batch.cond is not None else None
        x = sample_student(models.student, z, cond, generator=torch.Generator().manual_seed(0))
        assert x.device == device and x.shape == z.shape
    assert not guard.mixed, f"mixed-device operations: {guard.mixed[:5]}"
    if device.type != "cpu":  # (DISTILL_TEST_DEVICE=cpu: the same checks with real values, for debugging)
        assert not guard.cpu_compute, f"network compute on the CPU: {sorted(set(guard.cpu_compute))[:5]}"


@pytest.fixture(autouse=True)
def _no_nan_row_dropping(monkeypatch):
    """SiD/SIM drop non-finite rows: which rows is a value-dependent decision that meta cannot take. Every row
    is kept here (as on finite data), so the rest of their generator step runs on the device."""
    import distill.methods.score_implicit as si

    monkeypatch.setattr(si, "finite_rows", lambda *tensors: torch.ones(tensors[0].shape[0], dtype=torch.bool))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_on_the_device(recipe, tiny_sdxl_dir, tiny_sd15_dir, tmp_path, torch_single_thread):
    """Build (+ warm start), GAN head sizing for DMD2-family recipes, one training iteration and sampling."""
    tiny_dirs = {"sdxl": tiny_sdxl_dir, "sd15": tiny_sd15_dir}
    overrides = _overrides(recipe, tiny_dirs, tmp_path) + (_gan_overrides(recipe, tmp_path) or [])
    config = load_config(recipe, overrides)
    method_config(config)  # the recipe is valid
    _run_on(config, META)


def test_guard_catches_a_cpu_tensor_in_device_maths():
    """The guard (and meta itself) fail on exactly what CUDA would reject."""
    guard = DeviceGuard()
    with pytest.raises(RuntimeError), guard:
        torch.ones(3, device=META) + torch.ones(3)
    guard = DeviceGuard()
    with guard:
        torch.nn.Linear(3, 3)(torch.ones(2, 3))
    assert guard.cpu_compute
