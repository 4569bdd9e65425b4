"""``distill encode-prompts`` for flow-transformer teachers (tiny FLUX): cached embeddings train like prompts.

The cache holds the adapter's text fields per prompt and its unconditional branch; a run on it loads the
pipeline without its text encoders and its first steps' losses equal those of the same run on the prompt file.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse"]
SEQ = 16


@pytest.fixture(scope="module")
def flux_cache(tmp_path_factory, tiny_flux_dir) -> Path:
    root = tmp_path_factory.mktemp("flux_cache")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert cli_main(["encode-prompts", str(root / "prompts.txt"), "--teacher", tiny_flux_dir, "--out",
                     str(root / "emb"), "--shard-size", "2", "--batch-size", "2", "--device", "cpu",
                     "--max-sequence-length", str(SEQ)]) == 0
    return root


def _recipe(root: Path, folder: str, prompts: Path) -> Path:
    config = {"teacher": {"kind": "flux", "path": folder, "resolution": [32, 32], "max_sequence_length": SEQ},
              "student": {"timesteps": [1.0]},
              "method": {"name": "dmd2", "guidance_scale": 1.0, "generator_every": 1},
              "data": {"kind": "prompts", "batch_size": 2, "prompts": str(prompts)},
              "train": {"steps": 2, "log_every": 1, "mixed_precision": "no"},
              "generator_optim": {"lr": 1e-3, "warmup_steps": 0}, "critic_optim": {"lr": 1e-3, "warmup_steps": 0}}
    path = root / f"recipe_{prompts.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "loss" in k}
            for line in (run / "log.jsonl").read_text().splitlines()]


def test_flux_cache_holds_the_adapters_fields(flux_cache):
    from distill.shards import ShardedSet

    emb = ShardedSet(flux_cache / "emb", "prompt-embeddings")
    assert len(emb) == 3 and emb.manifest["model_kind"] == "flux"
    assert emb.manifest["conditioner"] == {"max_sequence_length": SEQ, "negative_prompt": ""}
    assert emb.fields == {"encoder_hidden_states": {"shape": [SEQ, 32], "dtype": "float32"},
                          "pooled_projections": {"shape": [32], "dtype": "float32"}}
    assert set(emb.uncond()) == {"encoder_hidden_states", "pooled_projections"}


def test_training_from_cached_embeddings_equals_training_from_prompts(flux_cache, tiny_flux_dir, tmp_path,
                                                                       monkeypatch):
    from distill.build import build_models, needs_text_encoders
    from distill.config import load_config

    text_recipe = _recipe(tmp_path, tiny_flux_dir, flux_cache / "prompts.txt")
    cached_recipe = _recipe(tmp_path, tiny_flux_dir, flux_cache / "emb")
    assert cli_main(["train", str(text_recipe), "--out", str(tmp_path / "text"), "--no-progress"]) == 0

    # the cached run never constructs a text encoder (CLIP and T5 refuse to load) ...
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was constructed")

    with monkeypatch.context() as m:
        for cls in (transformers.CLIPTextModel, transformers.T5EncoderModel):
            m.setattr(cls, "from_pretrained", refuse)
            m.setattr(cls, "__init__", refuse)
        assert cli_main(["train", str(cached_recipe), "--out", str(tmp_path / "cached"), "--no-progress"]) == 0
        config = load_config(cached_recipe)
        assert not needs_text_encoders(config)
        models = build_models(config, text_encoders=False)
        assert models.pipeline.pipe.text_encoder is None and models.pipeline.pipe.text_encoder_2 is None
        from distill.models.errors import ToolkitError

        with pytest.raises(ToolkitError, match="text encoders were not loaded"):
            models.conditioner(["a new prompt"])

    # ... and its losses are those of the run that encodes the prompts
    text, cached = _losses(tmp_path / "text"), _losses(tmp_path / "cached")
    assert len(text) == 2 and all(r["loss_fake"] > 0 for r in text)
    assert [sorted(r) for r in text] == [sorted(r) for r in cached]
    for a, b in zip(text, cached):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_a_cache_with_another_sequence_length_is_refused(flux_cache, tiny_flux_dir, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_flux_dir, flux_cache / "emb")
    assert cli_main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress",
                     "teacher.max_sequence_length=8"]) == 2
    err = capsys.readouterr().err
    assert "max_sequence_length=16" in err and "max_sequence_length=8" in err


def test_encode_latents_refuses_flow_teachers(tiny_flux_dir, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert cli_main(["encode-latents", str(tmp_path / "images"), "--teacher", tiny_flux_dir, "--out",
                     str(tmp_path / "lat"), "--resolution", "32"]) == 2
    assert "UNet teachers" in capsys.readouterr().err

