"""Every SDXL / SD1.5 recipe on the tiny pipelines: train, checkpoint, resume, export, and the export's own card.

For each recipe (``teacher.path`` pointing at a tiny pipeline; the overrides a user has: ``train.steps``,
``data.batch_size``, ``data.prompts``, ``data.real`` from ``distill encode-latents``, ``data.resolution``):
train 2 steps, resume to 3, export with the default format, then load the export in diffusers exactly as the
card's code sample does (parsed from its README.md) and check that the card's call gives the image
``distill sample`` draws from the run, to 1e-4; ``distill sample`` from the exported folder agrees too.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from distill import checkpoint as ckpt
from distill.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse", "a bowl of fruit"]
NEW = ["sdxl_dmd2_4step", "sdxl_dmd2_1step", "sdxl_dmd2_lora", "sd15_dmd2"]
OLDER = ["sdxl_lcm", "sdxl_lcm_lora", "sdxl_sid", "sdxl_sim", "sdxl_esd"]
GUIDANCE = {"sdxl_dmd2_4step": 0.0, "sdxl_dmd2_1step": 0.0, "sdxl_dmd2_lora": 0.0, "sd15_dmd2": 0.0,
            "sdxl_lcm": 8.0, "sdxl_lcm_lora": 1.0, "sdxl_sid": 0.0, "sdxl_sim": 0.0, "sdxl_esd": 0.0}


def write_captioned_images(folder: Path, n: int = 6) -> Path:
    """Random RGB images of several aspect ratios, each with a same-name .txt caption."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 32), (32, 48), (36, 36), (64, 40), (33, 35), (48, 32)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        data = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(data).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"{['a dog', 'a tree', 'a house', 'the sea', 'a bird', 'a cup'][i]}\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_sdxl_dir, tiny_sd15_dir):
    root = tmp_path_factory.mktemp("t2i_data")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    images = write_captioned_images(root / "images")
    real = {}
    for kind, teacher in (("sdxl", tiny_sdxl_dir), ("sd15", tiny_sd15_dir)):
        real[kind] = root / f"real_{kind}"
        assert cli_main(["encode-latents", str(images), "--teacher", teacher, "--out", str(real[kind]),
                         "--resolution", "32", "--shard-size", "4", "--device", "cpu"]) == 0
    return root / "prompts.txt", real


def card_call(folder: Path):
    """Run the README's code sample up to the call, then the call itself with ``output_type="pt"`` added.

    Returns (pipe, keyword arguments as written, images [1, 3, H, W]).
    """
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    tree = ast.parse(code)
    # the statement `image = pipe(...).images[0]`
    call_index = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.Assign)
                      and isinstance(node.value, ast.Subscript) and isinstance(node.value.value, ast.Attribute)
                      and isinstance(node.value.value.value, ast.Call))
    namespace: dict = {}
    exec(compile(ast.Module(tree.body[:call_index], []), "card", "exec"), namespace)
    call = tree.body[call_index].value.value.value
    assert isinstance(call, ast.Call) and call.func.id == "pipe"
    prompt = ast.literal_eval(call.args[0])
    kwargs = {kw.arg: eval(compile(ast.Expression(kw.value), "card", "eval"), namespace) for kw in call.keywords}
    pipe = namespace["pipe"]
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs, pipe(prompt, **kwargs, output_type="pt").images


# the flagship SDXL recipe and SD1.5 in the quick set; the other recipes (~25 s each) with the slow tests
QUICK = ["sdxl_dmd2_4step", "sd15_dmd2"]


@pytest.mark.parametrize("name", QUICK + [pytest.param(n, marks=pytest.mark.slow) for n in NEW + OLDER
                                          if n not in QUICK])
def test_recipe_trains_resumes_exports_and_its_card_reproduces_the_run(name, data, tiny_sdxl_dir, tiny_sd15_dir,
                                                                       tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from distill.commands import load_run
    from distill.config import load_config
    from distill.sample_text import sample_export_images, sample_run_images

    prompts, real = data
    kind = "sd15" if name.startswith("sd15") else "sdxl"
    recipe = RECIPES / f"{name}.yaml"
    assert load_config(recipe).teacher.kind == kind
    overrides = [f"teacher.path={tiny_sd15_dir if kind == 'sd15' else tiny_sdxl_dir}", "teacher.resolution=null",
                 f"data.prompts={prompts}", f"data.real={real[kind]}", "data.resolution=32", "data.batch_size=2",
                 "train.log_every=1", "train.checkpoint_every=0", "train.sample_every=3",
                 # accelerate keeps one precision per process: in-process tests all use "no" (the 2-process
                 # test below runs the recipe's bf16)
                 "train.mixed_precision='no'",
                 # LoRA roles train on the teacher's own base: with the recipes' bf16 base the fp32 pipeline of the card
                 # agrees only to bf16 rounding (~4e-3); an fp32 base makes the comparison exact
                 *(["teacher.dtype=float32"] if "lora" in name else []),
                 # a visible first step (the recipes warm up over 500 steps from 5e-7) and a tiny warm start
                 "generator_optim.lr=1e-3", "generator_optim.warmup_steps=0", "student.warm_start.steps=2",
                 "student.warm_start.ode_steps=2", "student.warm_start.pairs=0"]
    run = tmp_path / "run"
    assert cli_main(["train", str(recipe), "--out", str(run), "--no-progress", "train.steps=2", *overrides]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert cli_main(["train", str(recipe), "--out", str(run), "--no-progress", "train.steps=3", *overrides]) == 0
    assert ckpt.list_checkpoints(run / "checkpoints")[-1].name == "step_00000003"
    # grids of the 4 prompts at the end of each run
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000002.png", "step_00000003.png"]
    from PIL import Image

    assert Image.open(run / "samples" / "step_00000003.png").size == (2 * 32 + 3 * 2,) * 2
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r.get("phase") == "warm_start"] == [1, 2]  # the warm start logs too
    logs = [r for r in lines if "phase" not in r]
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for r in logs for k, v in r.items() if k != "time")

    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    card = json.loads((out / "distill_student.json").read_text())
    config, models = load_run(run)
    assert card["timesteps"] == [int(t) for t in config.student.timesteps]
    assert card["call_kwargs"]["guidance_scale"] == GUIDANCE[name]
    assert card["format"] == ("lora" if config.student.lora else "pipeline")

    pipe, kwargs, image = card_call(out)
    assert type(pipe) is (StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.timesteps.tolist() == card["timesteps"]
    assert "guidance_scale" in kwargs and kwargs["height"] == kwargs["width"] == 32
    if card["format"] == "lora":
        assert any("lora_A" in n for n, _ in pipe.unet.named_parameters())
    ours = sample_run_images(models, PROMPTS[:2], seed=0)
    assert image.shape == (1, 3, 32, 32) and ours[0].std() > 0.01
    assert (image[0] - ours[0]).abs().max().item() < 1e-4
    exported = sample_export_images(out, card, PROMPTS[:2], seed=0)
    assert (exported - ours).abs().max().item() < 1e-4
    assert (ours[1] - ours[0]).abs().max() > 1e-3  # another prompt and seed, another image


@pytest.mark.slow
def test_sdxl_dmd2_4step_runs_with_two_cpu_processes(data, tiny_sdxl_dir, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo) trains the flagship recipe; the checkpoint records 2 processes."""
    import os
    import socket
    import subprocess
    import sys

    prompts, real = data
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = tmp_path / "two"
    cmd = launcher + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                      "-m", "distill.cli", "train", str(RECIPES / "sdxl_dmd2_4step.yaml"), "--out", str(run),
                      "--no-progress", f"teacher.path={tiny_sdxl_dir}", f"data.prompts={prompts}",
                      f"data.real={real['sdxl']}", "data.resolution=32", "data.batch_size=4", "train.steps=3",
                      "train.log_every=1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    weights, _, state = ckpt.load_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1])
    assert state["world_size"] == 2 and state["step"] == 3
    assert set(weights) == {"student", "fake_score", "discriminator"}
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    logs = [r for r in lines if "phase" not in r]
    assert [r["step"] for r in logs] == [1, 2, 3] and "loss_d_gan" in logs[-1]
    assert all(torch.isfinite(torch.tensor(v)) for r in logs for k, v in r.items() if k != "time")


# DMD2's reference settings (METHODS.md Sec. 1-2): method, student and optimiser values each recipe must carry
REFERENCE = {
    "sdxl_dmd2_4step": dict(timesteps=[999, 749, 499, 249], guidance=8.0, ttur=5, lr=5e-7, gan=(5e-3, 1e-2)),
    "sdxl_dmd2_1step": dict(timesteps=[399], guidance=8.0, ttur=5, lr=5e-7, gan=(5e-3, 1e-2)),
    "sdxl_dmd2_lora": dict(timesteps=[999, 749, 499, 249], guidance=8.0, ttur=5, lr=5e-5, gan=(5e-3, 1e-2)),
    "sd15_dmd2": dict(timesteps=[999], guidance=1.75, ttur=10, lr=1e-5, gan=(0.0, 0.0)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_dmd2_recipes_carry_the_reference_settings(name):
    from distill.config import load_config

    ref = REFERENCE[name]
    text = (RECIPES / f"{name}.yaml").read_text()
    config = load_config(RECIPES / f"{name}.yaml")
    method = config.method
    assert method["name"] == "dmd2" and config.student.timesteps == ref["timesteps"]
    assert method["guidance_scale"] == ref["guidance"] and method["generator_every"] == ref["ttur"]
    assert (method["gan_generator_weight"], method["gan_discriminator_weight"]) == ref["gan"]
    assert config.teacher.dtype == "bfloat16" and config.train.ema_decay is None
    for optim in (config.generator_optim, config.critic_optim):
        assert optim.lr == ref["lr"] and tuple(optim.betas) == (0.9, 0.999) and optim.weight_decay == 0.01
        assert optim.warmup_steps == 500 and optim.grad_clip == 10.0
    assert (config.student.lora is not None) == (config.fake_score.lora is not None) == ("lora" in name)
    assert (config.student.warm_start.steps > 0) == (name == "sdxl_dmd2_1step")
    assert config.data.resolution == (512 if name == "sd15_dmd2" else 1024)
    # the header says what it reproduces and how to launch it on 8 GPUs
    header = text.split("\nteacher:")[0]
    assert "8 GPUs" in header and "distill.cli train" in header and "distill export" in header
    for key in ("teacher.path", "train.steps", "data.batch_size", "data.prompts", "data.real", "data.resolution"):
        assert key in header


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    for name in ("ddp_1node.yaml", "fsdp_1node.yaml"):
        config = ClusterConfig.from_yaml_file(str(RECIPES / "accelerate" / name))
        assert config.num_processes == 8 and config.num_machines == 1 and config.mixed_precision == "bf16"
    sbatch = (RECIPES / "accelerate" / "slurm_multinode.sbatch").read_text()
    assert "--rdzv_backend c10d" in sbatch and "-m distill.cli train" in sbatch
