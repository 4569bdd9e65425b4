"""In-training evaluation: the ``eval_fn(step) -> metrics`` the Trainer calls every ``train.eval_every`` steps.

The student (its EMA, when there is one: the Trainer swaps it in) draws ``train.eval.n`` samples in
memory, the same noise every time (seeded by ``train.eval.seed``) so that successive values differ by
the model, not the draw; :class:`distill.metrics.eval.Evaluator` scores them against ``train.eval.ref``.
Every process makes its share. Image students are decoded and quantised as ``distill eval`` does;
toy students' vectors go straight to the extractor (``features: identity`` makes FID the Frechet
distance of the samples themselves).
"""
from __future__ import annotations

from typing import Callable

import torch

from distill.config import Config
from distill.models.errors import ToolkitError

EvalFn = Callable[[int], dict]


def build_eval_fn(config: Config) -> Callable[[object], EvalFn] | None:
    """``make(models) -> eval_fn`` for the Trainer, or None when ``train.eval_every`` is 0.

    Call it before the models are built: everything is checked here (the reference file, metric names,
    numbers, prompts), so a mistake fails before any slow work. The networks (Inception, CLIP) load
    at the first evaluation.
    """
    from distill.metrics._util import check_int
    from distill.metrics.clip_score import read_prompts
    from distill.metrics.eval import Evaluator

    train = config.train
    cfg = train.eval
    check_int(train.eval_every, "train.eval_every", 0)
    if not train.eval_every:
        return None
    check_int(cfg.n, "train.eval.n", 2)
    check_int(cfg.batch_size, "train.eval.batch_size", 1)
    if not cfg.ref:
        raise ToolkitError("train.eval_every is set but train.eval.ref is not: give reference statistics (.npz) "
                           "or an image folder")
    prompts = None
    image_student = config.teacher.kind != "gmm"
    if image_student and config.data.kind != "labels":  # class-conditional pixel students (digits) draw uniform labels
        prompts = read_prompts(cfg.prompts or config.data.prompts or "")
        if "diversity" in cfg.metrics and cfg.n <= len(prompts):
            raise ToolkitError(f"train.eval.metrics: diversity needs train.eval.n ({cfg.n}) above the number of "
                               f"prompts ({len(prompts)}): several seeds per prompt")
    elif "clip" in cfg.metrics:
        raise ToolkitError("train.eval.metrics: clip needs a text-to-image student (prompts)")
    if "accuracy" in cfg.metrics and config.data.kind != "labels":
        raise ToolkitError("train.eval.metrics: accuracy needs a class-conditional student (data.kind labels)")
    evaluator = Evaluator(list(cfg.metrics), cfg.ref, inception=cfg.inception, fid_features=cfg.features,
                          clip_name=cfg.clip_model, clip_pretrained=cfg.clip_pretrained, batch_size=cfg.batch_size,
                          cache_dir="default", progress=False)

    return lambda models: _eval_fn(models, evaluator, cfg, prompts, image_student)


def _eval_fn(models, evaluator, cfg, prompts, image_student: bool) -> EvalFn:
    def eval_fn(step: int) -> dict:
        from distill.metrics.eval_loop import process_group, shard_batches
        from distill.metrics.sources import as_rgb_nchw, to_uint8
        from distill.sample_grids import decode_to_images
        from distill.samplers import sample_student

        student = models.student
        device = next(student.parameters()).device
        evaluator.device = device
        rank, world = process_group()
        was_training = student.training
        student.eval()

        def batches():
            for indices in shard_batches(cfg.n, cfg.batch_size, rank, world):
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + indices[0])
                z = torch.randn(len(indices), *models.sample_shape, generator=g).to(device)
                batch_prompts = None
                if prompts is not None:
                    batch_prompts = [prompts[i % len(prompts)] for i in indices]
                    cond = models.conditioner(batch_prompts).to(device)
                elif models.mixture is not None and models.conditioner is not None:
                    cond = models.conditioner(torch.tensor(list(indices)) % models.mixture.num_classes).to(device)
                elif getattr(models.conditioner, "num_classes", None):  # a class-conditional UNet2DModel (digits)
                    cond = models.conditioner(torch.tensor(list(indices)) % models.conditioner.num_classes).to(device)
                else:
                    cond = None
                x = sample_student(student, z, cond, generator=torch.Generator(device).manual_seed(indices[0]))
                samples = x.float()
                if image_student:  # quantised as `distill eval` does; grey (digits) repeated to RGB
                    samples = as_rgb_nchw(to_uint8(decode_to_images(samples, models), (0, 1)))
                yield list(indices), samples, batch_prompts

        num_classes = getattr(models.conditioner, "num_classes", None) if prompts is None else None
        labels = (lambda i: i % num_classes) if num_classes else None  # sample i is drawn for class i mod K
        try:
            with torch.no_grad():
                return evaluator.score(batches(), labels=labels)
        finally:
            student.train(was_training)

    return eval_fn
