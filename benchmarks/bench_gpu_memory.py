"""GPU memory and step time of bf16 DMD2 on a UNet with SDXL's block layout, against ``distill plan``.

Not a test: needs CUDA. The UNet has SDXL's layout (3 resolutions; DownBlock2D then two cross-attention
blocks with 1 / 2 / 10 transformer layers; 2 resnets per block; SDXL's text-time conditioning) at a
reduced width (``--width 0.5``: channels 160 / 320 / 640), with the tiny test text encoders and VAE.
For 1 GPU (``train.parallel=ddp``) and, when 2 GPUs are visible, 2 GPUs under ``train.parallel=fsdp``, it
trains 20 DMD2 steps in bf16 (TTUR 1, full student and fake score, AdamW) and records, per process:
``torch.cuda.max_memory_allocated`` over the run, the median step time after 3 warm-up steps, and
``distill plan``'s estimate for the same recipe. Results: ``benchmarks/results/gpu_memory.json``.

    python benchmarks/bench_gpu_memory.py [--width 0.5] [--latent 64] [--batch 4] [--steps 20]
    python benchmarks/bench_gpu_memory.py --cpu-dry-run   # plumbing check without a GPU (no memory figures)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_memory.json"

DRIVER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from distill import engine

    step = engine.Trainer.train_step
    times = []

    def timed_step(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = step(self)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return out

    engine.Trainer.train_step = timed_step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from distill.cli import main
    rc = main(sys.argv[2:])
    rank = int(os.environ.get("RANK", 0))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"rc": rc, "peak_bytes": peak, "step_seconds": times}, f)
    sys.exit(rc)
""")


def sdxl_layout_unet(width: float, latent: int, cross_dim: int, pooled_dim: int):
    """SDXL's UNet2DConditionModel configuration with every channel count scaled by ``width``."""
    from diffusers import UNet2DConditionModel

    channels = tuple(int(c * width) for c in (320, 640, 1280))
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=cross_dim, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + pooled_dim, norm_num_groups=32)


def make_pipeline(folder: Path, width: float, latent: int) -> Path:
    """The tiny test pipeline (text encoders 32 + 48 wide, small VAE) with an SDXL-layout UNet."""
    from distill.models.testing import build_tiny_sdxl

    build_tiny_sdxl(str(folder), seed=0, sample_size=latent)
    torch.manual_seed(0)
    sdxl_layout_unet(width, latent, cross_dim=32 + 48, pooled_dim=48).save_pretrained(str(folder / "unet"))
    return folder


def run_case(work: Path, name: str, recipe: Path, gpus: int, overrides: list[str]) -> dict:
    from distill.config import load_config
    from distill.plan import make_plan

    info = work / f"info_{name}"
    info.mkdir()
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    args = ["train", str(recipe), "--out", str(work / f"run_{name}"), "--no-progress", *overrides]
    if gpus == 1:
        cmd = [sys.executable, str(driver), str(info), *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(gpus), str(driver),
               str(info), *args]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
    ranks = [json.loads(p.read_text()) for p in sorted(info.glob("rank*.json"))]
    plan = make_plan(load_config(recipe, overrides), gpus=gpus, gpu_mem=80)
    steps = ranks[0]["step_seconds"][3:] or ranks[0]["step_seconds"]
    peaks = [r["peak_bytes"] for r in ranks if r["peak_bytes"] is not None]
    return {"gpus": gpus, "overrides": overrides, "step_seconds_median": statistics.median(steps),
            "peak_gib_per_gpu": [p / 1024**3 for p in peaks],
            "plan_gib_per_gpu": {"weights": (plan.weights_sharded + plan.weights_replicated) / 1024**3,
                                 "gradients": plan.gradients / 1024**3, "optimizer": plan.optimizer / 1024**3,
                                 "activations": plan.activations / 1024**3, "total": plan.total / 1024**3},
            "peak_over_plan": [p / plan.total for p in peaks]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--latent", type=int, default=64, help="latent size (64 = 512 px)")
    parser.add_argument("--batch", type=int, default=4, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny width, 2 steps, CPU, no memory figures")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        args.width, args.latent, args.steps, args.batch = 0.1, 8, 2, 2
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu_memory needs CUDA (or --cpu-dry-run)")
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_memory_"))
    pipe = make_pipeline(work / "pipe", args.width, args.latent)
    (work / "prompts.txt").write_text("a photo of a cat\na red car on a street\nan astronaut riding a horse\n")
    recipe = work / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        teacher: {{kind: sdxl, path: {pipe}, dtype: bfloat16}}
        student: {{timesteps: [999]}}
        method: {{name: dmd2, guidance_scale: 8.0, generator_every: 1}}
        data: {{kind: prompts, prompts: {work / 'prompts.txt'}, batch_size: {args.batch}}}
        train: {{steps: {args.steps}, log_every: 0, mixed_precision: {'no' if args.cpu_dry_run else 'bf16'}}}
        generator_optim: {{lr: 5.0e-7}}
        critic_optim: {{lr: 5.0e-7}}
    """))
    cases = {"1gpu": run_case(work, "1gpu", recipe, 1, [])}
    cases["1gpu_checkpointing"] = run_case(work, "1gpu_ckpt", recipe, 1, ["train.gradient_checkpointing=true"])
    if torch.cuda.device_count() >= 2:
        cases["2gpu_fsdp"] = run_case(work, "2gpu_fsdp", recipe, 2, ["train.parallel=fsdp"])
    result = {"setup": {"width": args.width, "latent": args.latent, "batch": args.batch, "steps": args.steps,
                        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                        "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")},
              "cases": cases}
    print(json.dumps(result, indent=2))
    if not args.cpu_dry_run:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
