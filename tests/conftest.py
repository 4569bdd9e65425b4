"""Shared fixtures: tiny SDXL and SD1.5 pipeline folders (random weights), built once per test session.

Tests run offline: ``HF_HUB_OFFLINE=1`` is set before anything imports huggingface_hub, so a stray
Hub id fails at once with a clear error instead of waiting on the network.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    """Folder of a tiny ``StableDiffusionXLPipeline`` (seed 0; latents 4x8x8, images 32x32). Do not modify it."""
    from distill.models.testing import build_tiny_sdxl

    return build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")), seed=0)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> str:
    """Folder of a tiny ``StableDiffusionPipeline`` (SD1.5 layout, seed 0; latents 4x8x8). Do not modify it."""
    from distill.models.testing import build_tiny_sd15

    return build_tiny_sd15(str(tmp_path_factory.mktemp("tiny_sd15")), seed=0)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model tests on one intra-op thread, then restore the setting.

    Tiny networks gain nothing from a second thread, and on a small shared machine two threads per
    process oversubscribe the cores (the tiny-pipeline tests ran ~5x slower that way).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> str:
    """Folder of a tiny ``FluxPipeline`` (FLUX.1-dev layout with the guidance embedding, seed 0; use 32-pixel
    images: latents 4x8x8). Do not modify it."""
    from distill.models.testing import build_tiny_flux

    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")), seed=0)


@pytest.fixture(scope="session")
def digits_classifier_file(tmp_path_factory):
    """The digits classifier (seed 0, ``digits_classifier_seed0.safetensors``), trained once per session (~15 s);
    fixtures copy it into their own private caches, so none of them trains it again."""
    import torch

    from distill.metrics.digits import load_digits_classifier

    cache = tmp_path_factory.mktemp("digits_classifier")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_digits_classifier(cache)
    finally:
        torch.set_num_threads(previous)
    (path,) = cache.glob("digits_classifier_seed0.safetensors")
    return path
