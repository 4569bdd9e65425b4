"""``distill plan`` against the GPU peaks that ``bench_gpu_memory.py`` measured (CPU only, meta, ~1 min).

Rebuilds the benchmark's recipe (bf16 DMD2, SDXL-layout UNet at ``--width``, latent ``--latent``, global batch
``--batch``, 1 GPU, TTUR 1, no EMA) on meta from the UNet's config, with no weights written to disk: the
config is registered as an embedded architecture for the duration of the script. The benchmark's tiny text
encoders and VAE (a few MB) are counted as 0. Prints plan vs the measured peak for the runs without and
with gradient checkpointing, read from ``--measured`` (bench_gpu_memory.py's JSON).

    python benchmarks/plan_vs_gpu_memory.py --measured /path/to/gpu_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # plan never downloads; the embedded id must not reach the Hub

GiB = 1024**3


def plan_for(width: float, latent: int, batch: int, checkpointing: bool):
    from bench_gpu_memory import sdxl_layout_unet

    from distill import arch_configs
    from distill.config import load_config
    from distill.plan import make_plan

    with torch.device("meta"):
        unet = sdxl_layout_unet(width, latent, cross_dim=32 + 48, pooled_dim=48)
    repo = "bench/sdxl-layout"
    arch = dict(arch_configs.ARCHS["stabilityai/stable-diffusion-xl-base-1.0"], config=dict(unet.config),
                encoders=[("tiny test encoders", 0)], vae=("tiny test VAE", 0))
    arch_configs.ARCHS[repo] = arch
    config = load_config(None, [
        "teacher.kind=sdxl", f"teacher.path={repo}", "teacher.dtype=bfloat16", "student.timesteps=[999]",
        "method.name=dmd2", "method.guidance_scale=8.0", "method.generator_every=1", "data.kind=prompts",
        "data.prompts=unused.txt", f"data.batch_size={batch}", "train.mixed_precision=bf16",
        f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    return make_plan(config, gpus=1, gpu_mem=141)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", required=True, help="gpu_memory.json written by bench_gpu_memory.py")
    args = parser.parse_args(argv)
    measured = json.loads(Path(args.measured).read_text())
    setup = measured["setup"]
    out = {}
    for case, ckpt in (("1gpu", False), ("1gpu_checkpointing", True)):
        plan = plan_for(setup["width"], setup["latent"], setup["batch"], ckpt)
        peak = measured["cases"][case]["peak_gib_per_gpu"][0]
        rows = {"weights": plan.weights / GiB, "optimizer": plan.optimizer / GiB, "ema": plan.ema / GiB,
                "gradients": plan.gradients / GiB, "activations": plan.activations / GiB,
                "peak_update": plan.peak_update, "total": plan.total / GiB, "measured_peak": peak,
                "plan_over_measured": plan.total / GiB / peak}
        for name, u in plan.updates.items():
            rows[f"{name}_gradients"] = u.gradients / GiB
            rows[f"{name}_activations"] = u.activations(ckpt) / GiB
        out[case] = rows
        print(case, json.dumps(rows, indent=1))
    return out


if __name__ == "__main__":
    main()
