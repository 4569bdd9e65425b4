"""Build a recipe on the ``meta`` device for ``distill plan``: with the weights on disk, or from embedded configs.

:func:`build_for_plan` returns ``(models, method, data, source)`` like :func:`distill.build.build_run` does
for training, on meta, with two differences that make plan independent of files it does not need:

* **Data** are synthetic: noise of the student's input shape, the conditioning the run's conditioner makes
  (its shapes are what matter on meta), and real latents when the method takes real data (DMD2's GAN,
  consistency on real data). The recipe's prompt / latent folders need not exist.
* **Weights**: when ``teacher.path`` is a hub id that is not in the local cache (plan never downloads) and
  :mod:`distill.arch_configs` knows it, the UNet / transformer is built with ``from_config`` on meta from the
  embedded config, and the text encoders and VAE are counted by their published parameter counts
  (``source == "embedded"``). The roles (student / fake score copies, LoRA, casts) are then made by
  distill.build exactly as for training: ``build_models`` takes a ``load_parts`` that returns these meta
  components instead of loading ``teacher.path``.
"""
from __future__ import annotations

import os
import types

import torch

from distill.models.errors import ToolkitError

META = torch.device("meta")
_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


# ------------------------------------------------------------------------------------------ conditioning
class ShapeConditioner:
    """Prompts -> a :class:`Cond` of zeros with the shapes the family's real conditioner produces (meta only)."""

    def __init__(self, shapes: dict, guidance_embedding: float | None = None):
        self.shapes, self.guidance_embedding = shapes, guidance_embedding

    def _tree(self, spec, batch: int):
        if isinstance(spec, dict):
            return {k: self._tree(v, batch) for k, v in spec.items()}
        shape, dtype = spec
        return torch.zeros(batch, *shape, dtype=_DTYPES[dtype], device=META)

    def __call__(self, prompts) -> "Cond":  # noqa: F821
        from distill.models.conditioning import Cond

        n = len(list(prompts))
        return Cond(self._tree(self.shapes, n), self._tree(self.shapes, n))


# ------------------------------------------------------------------------------------------ embedded parts
def weights_on_disk(path: str) -> bool:
    """True when ``path`` is a local path or a hub id whose ``model_index.json`` is in the local cache.

    A cheap look-up (no download, no pipeline import); a cached repo with missing weight files still fails
    the real loader, and :func:`build_for_plan` then falls back to the embedded architecture.
    """
    from huggingface_hub import try_to_load_from_cache

    from distill.models.loading import _hub_cache, is_repo_id

    expanded = os.path.expanduser(str(path))
    if os.path.exists(expanded) or not is_repo_id(expanded):
        return True  # a local path (a missing one fails later with the loader's own one-line error)
    found = try_to_load_from_cache(expanded, "model_index.json", cache_dir=_hub_cache(None))
    return isinstance(found, str)


def _backbone(arch: dict):
    import diffusers

    with torch.device(META):
        return getattr(diffusers, arch["class"]).from_config(arch["config"])


def _unet_components(arch: dict, tcfg, resolution):
    from distill.models.loading import PipelineComponents, denoiser_from_unet
    from distill.arch_configs import cond_shapes

    unet = _backbone(arch)
    return PipelineComponents(kind=arch["family"], path=tcfg.path, unet=unet, vae=None,
                              scheduler_config=dict(arch["scheduler"]),
                              denoiser=denoiser_from_unet(unet, arch["scheduler"]),
                              conditioner=ShapeConditioner(cond_shapes(arch)))


def _flow_components(arch: dict, tcfg):
    from distill.arch_configs import cond_shapes
    from distill.models.backbones.common import (FlowComponents, adapter_module, default_resolution, flow_schedule,
                                                 latent_chw)
    from distill.models.denoiser import Denoiser

    module = adapter_module(arch["family"])
    transformer = _backbone(arch)
    pipe = types.SimpleNamespace(transformer=transformer, vae_scale_factor=arch["vae_scale_factor"],
                                 default_sample_size=arch.get("default_sample_size", 128), vae=None)
    if tcfg.resolution:
        res = tuple(int(r) for r in tcfg.resolution)
    else:
        res = getattr(module, "default_resolution", default_resolution)(pipe)
    chw = getattr(module, "latent_chw", latent_chw)(pipe, res)
    seq = getattr(module, "image_seq_len", lambda c: None)(chw)
    options = {k: v for k, v in (tcfg.schedule or {}).items() if k != "kind"}
    schedule = flow_schedule(arch["scheduler"], seq, **options)
    backbone = module.Backbone(transformer, gan_blocks=getattr(tcfg, "gan_blocks", None))
    guidance = None
    if arch["config"].get("guidance_embeds"):
        guidance = getattr(tcfg, "guidance_embedding", None)
        guidance = getattr(module, "DEFAULT_GUIDANCE", 1.0) if guidance is None else guidance
    conditioner = ShapeConditioner(cond_shapes(arch, getattr(tcfg, "max_sequence_length", None)), guidance)
    return FlowComponents(kind=arch["family"], path=tcfg.path, pipe=pipe, vae=None,
                          scheduler_config=dict(arch["scheduler"]), denoiser=Denoiser(backbone, schedule, "flow"),
                          conditioner=conditioner, chw=chw, resolution=res)


def _embedded_parts_loader(arch: dict):
    """A ``load_parts`` for :func:`distill.build.build_models` that returns the embedded meta components."""
    def load_parts(tcfg, device, load_text_encoders, resolution):
        if arch["family"] in ("sdxl", "sd15"):
            return _unet_components(arch, tcfg, resolution)
        return _flow_components(arch, tcfg)

    return load_parts


def embedded_replicated_bytes(arch: dict, config, text_encoders: bool) -> int:
    """Bytes of the frozen text encoders and VAE as the run loads them: UNet pipelines keep both in fp32;
    flow pipelines cast the text encoders to the teacher's dtype and keep the VAE in fp32
    (distill.models.loading, distill.models.backbones.common.load_flow_teacher)."""
    unet_family = arch["family"] in ("sdxl", "sd15")
    te_bytes = 4 if unet_family or str(config.teacher.dtype) in ("float32", "fp32") else 2
    encoders = sum(n for _, n in arch["encoders"]) * te_bytes if text_encoders else 0
    return encoders + arch["vae"][1] * 4


# ------------------------------------------------------------------------------------------ data
class SyntheticSource:
    """``data(step, rows, device) -> Batch`` with meta tensors of the run's shapes (see the module docstring)."""

    def __init__(self, conditioner, batch_size: int, sample_shape, seed: int, with_real: bool,
                 labels: bool = False):
        self.conditioner, self.global_batch_size = conditioner, batch_size
        self.sample_shape, self.seed, self.with_real, self.labels = tuple(sample_shape), seed, with_real, labels

    def _cond(self, n: int):
        if self.conditioner is None:
            return None
        if self.labels:  # class-conditional: labels 0
            return self.conditioner(torch.zeros(n, dtype=torch.long)).to(META)
        return self.conditioner(["a photo"] * n).to(META)

    def __call__(self, step: int, rows: slice, device=None):
        from distill.methods.base import Batch, BatchRNG

        rng = BatchRNG(self.seed, step, self.global_batch_size, rows, META)
        noise = rng.randn(*self.sample_shape)
        cond = self._cond(noise.shape[0])
        real = torch.zeros_like(noise) if self.with_real else None
        return Batch(noise=noise, cond=cond, rng=rng, real=real, real_cond=cond if self.with_real else None)


# ------------------------------------------------------------------------------------------ build
def build_for_plan(config):
    """``(models, method, data, source, replicated_bytes)`` of ``config`` on meta (see the module docstring).

    ``source``: ``"disk"`` or ``"embedded"``. ``replicated_bytes``: text encoders and VAE for the embedded
    build (None: count the loaded modules). Raises ToolkitError when the weights are missing and no
    architecture is embedded for ``teacher.path``.
    """
    from distill.arch_configs import arch_for
    from distill.build import build_data, build_models, method_class, method_config, needs_text_encoders

    cls = method_class(config.method["name"])
    mcfg = method_config(config)
    needs_fake = getattr(cls, "needs_fake_score", True)
    text_encoders = needs_text_encoders(config)
    tcfg = config.teacher
    source, replicated = "disk", None
    arch = arch_for(tcfg.path) if tcfg.kind != "gmm" and tcfg.path else None
    models = None
    if arch is None or weights_on_disk(tcfg.path):
        try:
            models = build_models(config, need_fake_score=needs_fake, device=META, text_encoders=text_encoders)
        except ToolkitError:
            if arch is None:
                raise
    if models is None:  # the weights are not here (plan never downloads): build from the embedded config
        models = build_models(config, need_fake_score=needs_fake, device=META, text_encoders=text_encoders,
                              load_parts=_embedded_parts_loader(arch))
        source, replicated = "embedded", embedded_replicated_bytes(arch, config, text_encoders)
    with_real = getattr(mcfg, "gan_discriminator_weight", 0) > 0 or getattr(mcfg, "data_source", None) == "real"
    if config.data.kind == "prompts":
        data = SyntheticSource(models.conditioner, config.data.batch_size, models.sample_shape, config.train.seed,
                               with_real)
    elif config.data.kind == "labels" and with_real:  # real labelled images may be files: synthesise them
        data = SyntheticSource(models.conditioner, config.data.batch_size, models.sample_shape, config.train.seed,
                               with_real, labels=True)
    else:  # toy and label sources draw from the teacher itself: no files
        data = build_data(config, models, with_real=with_real)
    method = cls.from_models(models, mcfg, data(0, slice(0, min(2, data.global_batch_size)), META))
    return models, method, data, source, replicated
