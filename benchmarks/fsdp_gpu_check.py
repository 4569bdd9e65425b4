"""GPU check of FSDP2 on one CUDA device (not a test; CI has no GPU): DMD2 with the GAN head on the tiny SDXL,
``train.parallel=fsdp`` (nccl, a group of one), sharded DCP checkpoints every step, stopped after step 3 and
resumed to step 5, against an uninterrupted ``ddp`` run. Writes the per-step losses and the largest relative
difference to a JSON file.

    python benchmarks/fsdp_gpu_check.py WORK_DIR OUT.json     # (or: bash benchmarks/gpu_check.sh fsdp)

On a CPU (gloo): 30 s, largest relative loss difference 2.7e-6. On an NVIDIA H200 (torch 2.11, nccl): 17.6 s,
largest relative loss difference 1.4e-4 (GPU kernels are not bitwise reproducible across the two runs), checkpoint sharded and
intact.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file


def main(work: str, out: str) -> None:
    from distill import checkpoint as ckpt
    from distill.cli import main as cli
    from distill.models.testing import build_tiny_sdxl

    d = Path(work)
    d.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_sdxl(str(d / "tiny"), seed=0)
    (d / "prompts.txt").write_text("a cat\na dog\na red car\na tree\n")
    save_file({"latents": torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))},
              str(d / "real.safetensors"))
    (d / "real.txt").write_text("a dog\na tree\na house\nthe sea\na bird\na cup\n")
    recipe = {
        "teacher": {"kind": "sdxl", "path": tiny}, "student": {"timesteps": [999, 499]},
        "method": {"name": "dmd2", "guidance_scale": 8.0, "generator_every": 2, "gan_generator_weight": 5e-2,
                   "gan_discriminator_weight": 1e-1},
        "data": {"kind": "prompts", "batch_size": 4, "prompts": str(d / "prompts.txt"),
                 "real": str(d / "real.safetensors")},
        "train": {"steps": 5, "log_every": 1, "ema_decay": 0.9, "parallel": "fsdp", "checkpoint_every": 1},
        "generator_optim": {"lr": 1e-5, "warmup_steps": 2}, "critic_optim": {"lr": 1e-4},
    }
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    start = time.time()
    assert cli(["train", str(path), "--out", str(d / "fsdp"), "--no-progress", "train.steps=3"]) == 0
    assert cli(["train", str(path), "--out", str(d / "fsdp"), "--no-progress"]) == 0
    assert cli(["train", str(path), "--out", str(d / "ddp"), "--no-progress", "train.parallel=ddp"]) == 0

    def losses(run):
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if "loss" in k} for r in rows}

    a, b = losses(d / "fsdp"), losses(d / "ddp")
    rel = max(abs(a[s][k] - b[s][k]) / max(abs(b[s][k]), 1e-3) for s in b for k in b[s])
    last = ckpt.list_checkpoints(d / "fsdp" / "checkpoints")[-1]
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "seconds": time.time() - start,
              "max_rel_loss_diff_fsdp_resumed_vs_ddp": rel, "sharded_checkpoint": ckpt.is_dcp_checkpoint(last),
              "checkpoint_intact": ckpt.verify_checkpoint(last) is None, "fsdp": a, "ddp": b}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("fsdp", "ddp")}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
