"""DMD2 iteration time against the sum of its essential forward and backward passes (engine overhead).

One DMD2 iteration with ``generator_every=1`` (a one-step student) must run at least

* the student's forward and backward (generator step),
* the teacher's CFG forward, batched ``[uncond; cond]`` (generator step, no grad),
* the fake score's forward (generator step, no grad),
* the fake score's forward and backward (critic step, denoising loss);

everything else (noise, schedule conversions, conditioning copies, the loss, gradient clipping, the
optimiser steps, the NaN guard, logging) is overhead. This script times ``Trainer.train_step`` and each
essential pass on the same tiny SDXL UNet, shapes and thread count, interleaved repetition by repetition
so that machine noise hits both alike, and reports ``median(iteration) / sum(median(essential))``
(target <= 1.10, issue 11). Results go to ``benchmarks/results/dmd2_overhead.json``.

``--fsdp-processes 2`` adds the same ratio for ``train.parallel=fsdp`` on 2 CPU processes (gloo): the
2-process iteration (each process half of the global batch, sharded student / fake score / teacher) against
the essential passes of one unsharded process at that half batch. What FSDP adds beyond them (all-gathers,
reduce-scatters, the hooks) is its overhead; on CPU with gloo it is a lower bound on nothing, only a check
that the sharded engine stays in proportion.

    python benchmarks/bench_dmd2_overhead.py [--latent 16] [--batch 4] [--reps 30] [--threads 1] [--fsdp-processes 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "dmd2_overhead.json"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _setup(args, batch: int, work: Path, parallel: str = "ddp", accelerator=None):
    from distill.build import build_run
    from distill.config import load_config
    from distill.engine import Trainer
    from distill.models.testing import build_tiny_sdxl

    pipe_dir = work / "pipe"
    if not (pipe_dir / "model_index.json").is_file():
        build_tiny_sdxl(str(pipe_dir), seed=0, sample_size=args.latent)
    prompts = work / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a street\nan astronaut riding a horse\na bowl of fruit\n")
    config = load_config(None, [
        "teacher.kind=sdxl", f"teacher.path={pipe_dir}", "student.timesteps=[999]", "method.name=dmd2",
        f"method.guidance_scale={args.guidance}", "method.generator_every=1", "data.kind=prompts",
        f"data.prompts={prompts}", f"data.batch_size={batch}", "train.log_every=0", f"train.parallel={parallel}",
        f"train.steps={args.warmup + args.reps + 10}"])
    device = accelerator.device if accelerator is not None else None
    models, method, data = build_run(config, device=device)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, work / f"run_{parallel}",
                      progress=False, accelerator=accelerator)
    return models, data, trainer


def _fsdp_worker(args) -> None:
    """One process of the 2-process FSDP timing (launched by torchrun); rank 0 writes the iteration times."""
    import torch.distributed as dist

    from distill.config import TrainConfig
    from distill.parallel import make_accelerator

    accelerator = make_accelerator(TrainConfig())
    _, _, trainer = _setup(args, args.batch, Path(args.work), "fsdp", accelerator)
    times = []
    for rep in range(args.warmup + args.reps):
        dist.barrier()
        it = _timed(trainer.train_step)
        if rep >= args.warmup:
            times.append(it)
    if trainer.rank == 0:
        Path(args.work, "fsdp_times.json").write_text(json.dumps(times))


def _fsdp_ratio(args, work: Path) -> dict:
    """Launch the 2-process FSDP timing and compare with one process's essential passes at the per-process batch."""
    import os
    import subprocess
    import sys

    n = args.fsdp_processes
    if args.batch % n:
        raise SystemExit(f"--batch must divide by --fsdp-processes ({n})")
    essentials = _essential_medians(args, args.batch // n, work)
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe), "--nproc_per_node", str(n), __file__, "--fsdp-worker", "--work", str(work),
           "--latent", str(args.latent), "--batch", str(args.batch), "--reps", str(args.reps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--guidance", str(args.guidance)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env)
    times = json.loads((work / "fsdp_times.json").read_text())
    iteration = statistics.median(times)
    essential_sum = sum(essentials.values())
    return {"processes": n, "ratio": iteration / essential_sum, "iteration_ms": 1e3 * iteration,
            "essential_sum_ms_per_process": 1e3 * essential_sum, "per_process_batch": args.batch // n}


def _essential_medians(args, batch: int, work: Path) -> dict[str, float]:
    """Median seconds of each essential pass (unsharded, one process) at ``batch``."""
    _, essentials = _essentials(args, batch, work)
    times = {k: [] for k in essentials}
    for rep in range(args.warmup + args.reps):
        for k, fn in essentials.items():
            t = _timed(fn)
            if rep >= args.warmup:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def _essentials(args, batch_size: int, work: Path):
    from distill.methods.base import denoising_loss

    models, data, trainer = _setup(args, batch_size, work)
    student, teacher, fake = models.student, models.teacher, models.fake_score
    batch = data(0, slice(0, batch_size), trainer.device)
    cond, z = batch.cond, batch.noise
    t_star = student.times(0, batch_size, z.device)
    t = torch.full((batch_size,), 500, device=z.device)
    x_t = teacher.schedule.add_noise(z, torch.randn_like(z), t)

    def student_fwd_bwd():
        x = student.denoiser(student.input_from_noise(z), t_star, cond)
        x.float().square().mean().backward()
        student.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher_cfg_fwd():
        teacher(x_t, t, cond, args.guidance)

    @torch.no_grad()
    def fake_fwd():
        fake(x_t, t, cond)

    def fake_fwd_bwd():
        denoising_loss(fake.denoiser, z, t, z, cond).backward()
        fake.zero_grad(set_to_none=True)

    return trainer, {"student_fwd_bwd": student_fwd_bwd, "teacher_cfg_fwd": teacher_cfg_fwd, "fake_fwd": fake_fwd,
                     "fake_fwd_bwd": fake_fwd_bwd}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=16, help="latent height/width of the tiny SDXL UNet")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--fsdp-processes", type=int, default=0, help="also time train.parallel=fsdp on N processes")
    parser.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fsdp_worker:
        _fsdp_worker(args)
        return {}

    work = Path(tempfile.mkdtemp(prefix="bench_dmd2_"))
    trainer, essentials = _essentials(args, args.batch, work)
    student = trainer.method.student
    times: dict[str, list[float]] = {"iteration": [], **{k: [] for k in essentials}}
    for rep in range(args.warmup + args.reps):
        it = _timed(trainer.train_step)
        parts = {k: _timed(fn) for k, fn in essentials.items()}
        if rep >= args.warmup:
            times["iteration"].append(it)
            for k, v in parts.items():
                times[k].append(v)

    median = {k: statistics.median(v) for k, v in times.items()}
    essential_sum = sum(median[k] for k in essentials)
    ratio = median["iteration"] / essential_sum
    result = {
        "ratio": ratio, "target": 1.10, "meets_target": ratio <= 1.10,
        "iteration_ms": 1e3 * median["iteration"], "essential_sum_ms": 1e3 * essential_sum,
        "essential_ms": {k: 1e3 * median[k] for k in essentials},
        "iteration_ms_p10_p90": [1e3 * statistics.quantiles(times["iteration"], n=10)[i] for i in (0, -1)],
        "setup": {"latent": args.latent, "batch": args.batch, "guidance": args.guidance, "reps": args.reps,
                  "threads": args.threads, "device": str(trainer.device), "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(),
                  "unet_params": sum(p.numel() for p in student.parameters())},
    }
    if args.fsdp_processes:
        result["fsdp"] = _fsdp_ratio(args, work)
        print(f"FSDP x{args.fsdp_processes}: iteration {result['fsdp']['iteration_ms']:.1f} ms vs essential passes "
              f"{result['fsdp']['essential_sum_ms_per_process']:.1f} ms per process -> ratio {result['fsdp']['ratio']:.3f}")
    print(f"DMD2 iteration {result['iteration_ms']:.1f} ms vs essential passes {result['essential_sum_ms']:.1f} ms "
          f"-> ratio {ratio:.3f} (target <= 1.10)")
    for k in essentials:
        print(f"  {k:16s} {result['essential_ms'][k]:.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
