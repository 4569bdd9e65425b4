"""Public architecture configs of the hub models the shipped recipes name, for ``distill plan`` ONLY.

``distill plan`` builds a recipe on PyTorch's ``meta`` device. When the teacher's weights are on disk it
reads the real pipeline (configs included). When they are not (an offline machine, a model not yet
downloaded) and the teacher is one of the ids below, plan builds the denoiser from the embedded
``config.json`` of its UNet / transformer instead (``from_config`` on meta: exact parameter shapes, no
weights), and counts the frozen text encoders and VAE by their published parameter counts. Nothing here is
used to train, sample or export.

Sources and certainty (the UNet / transformer configs decide almost all of the plan's figures):

* ``config``: the model repo's ``unet/config.json`` / ``transformer/config.json`` fields that change the
  architecture (the rest are the diffusers class defaults, which the repos also use). SDXL base and SD1.5:
  the well-known configs (SDXL: ``transformer_layers_per_block [1, 2, 10]``, ``addition_time_embed_dim 256``,
  ``projection_class_embeddings_input_dim 2816``; SD1.5: ``cross_attention_dim 768``, 8 heads). SD3.5
  medium (24 MMDiT-X layers, dual attention in 0-12, ``qk_norm rms_norm``), FLUX.1-dev (19 + 38 blocks,
  ``guidance_embeds``), Sana 1600M 1024px (the diffusers ``SanaTransformer2DModel`` defaults are this model)
  and Z-Image (the ``ZImageTransformer2DModel`` defaults) as published in the model cards / diffusers code.
  Scheduler values matter only for the time grid, not for memory.
* ``encoders`` / ``vae``: parameter counts ``(name, parameters, source)``. Counted by building the
  transformers / diffusers class from the public config on meta (CLIP ViT-L/14 text 123,060,480; OpenCLIP
  bigG text with projection 694,659,840; T5 v1.1 XXL encoder 4,762,310,656; Gemma-2-2B 2,614,341,888;
  Qwen3-4B base model 4,022,468,096; AutoencoderKL 4-channel 83,653,863, 16-channel 83,819,683). The Sana
  DC-AE (``dc-ae-f32c32-sana-1.0``) count is the model card's ~312 M, rounded: NOT verified here.
"""
from __future__ import annotations

from typing import Any

_VP_SCALED_LINEAR = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                     "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                     "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1}

CLIP_L = ("CLIP ViT-L/14 text encoder", 123_060_480)
CLIP_L_PROJ = ("CLIP ViT-L/14 text encoder with projection", 123_650_304)
CLIP_BIGG = ("OpenCLIP ViT-bigG/14 text encoder with projection", 694_659_840)
T5_XXL = ("T5 v1.1 XXL encoder", 4_762_310_656)
VAE4 = ("AutoencoderKL (4 latent channels)", 83_653_863)
VAE16 = ("AutoencoderKL (16 latent channels)", 83_819_683)

#: model id -> what plan needs to build it on meta. ``family``: ``sdxl`` / ``sd15`` (UNet pipelines) or a flow
#: adapter name (models/backbones); ``class``: the diffusers model class of ``config``.
ARCHS: dict[str, dict[str, Any]] = {
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "family": "sdxl", "class": "UNet2DConditionModel", "vae_scale_factor": 8,
        "config": {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                   "block_out_channels": [320, 640, 1280],
                   "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                   "use_linear_projection": True, "cross_attention_dim": 2048,
                   "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                   "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32},
        "scheduler": _VP_SCALED_LINEAR,
        "encoders": [CLIP_L, CLIP_BIGG], "vae": VAE4,
    },
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        "family": "sd15", "class": "UNet2DConditionModel", "vae_scale_factor": 8,
        "config": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                   "block_out_channels": [320, 640, 1280, 1280],
                   "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                        "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                      "CrossAttnUpBlock2D"],
                   "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32},
        "scheduler": {**_VP_SCALED_LINEAR, "_class_name": "PNDMScheduler"},
        "encoders": [CLIP_L], "vae": VAE4,
    },
    "stabilityai/stable-diffusion-3.5-medium": {
        "family": "sd3", "class": "SD3Transformer2DModel", "vae_scale_factor": 8,
        "config": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                   "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                   "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        "encoders": [CLIP_L_PROJ, CLIP_BIGG, T5_XXL], "vae": VAE16,
    },
    "black-forest-labs/FLUX.1-dev": {
        "family": "flux", "class": "FluxTransformer2DModel", "vae_scale_factor": 8, "default_sample_size": 128,
        "config": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                      "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096},
        "encoders": [CLIP_L, T5_XXL], "vae": VAE16,
    },
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": {
        "family": "sana", "class": "SanaTransformer2DModel", "vae_scale_factor": 32,
        "config": {"in_channels": 32, "out_channels": 32, "num_attention_heads": 70, "attention_head_dim": 32,
                   "num_layers": 20, "num_cross_attention_heads": 20, "cross_attention_head_dim": 112,
                   "cross_attention_dim": 2240, "caption_channels": 2304, "mlp_ratio": 2.5, "sample_size": 32,
                   "patch_size": 1},
        "scheduler": {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "flow_shift": 3.0},
        "encoders": [("Gemma-2-2B", 2_614_341_888)], "vae": ("DC-AE f32c32 (model card, ~312 M, unverified)",
                                                            312_000_000),
    },
    "Tongyi-MAI/Z-Image": {
        "family": "zimage", "class": "ZImageTransformer2DModel", "vae_scale_factor": 8,
        "config": {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
                   "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560,
                   "axes_dims": [32, 48, 48], "axes_lens": [1024, 512, 512]},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        "encoders": [("Qwen3-4B", 4_022_468_096)], "vae": VAE16,
    },
}

#: default text lengths of each family's conditioner (models/conditioning.py, models/backbones/*)
_TEXT_TOKENS = {"sdxl": 77, "sd15": 77, "sd3": 256, "flux": 512, "sana": 300, "zimage": 512}


def arch_for(path: str) -> dict[str, Any] | None:
    """The embedded architecture for a teacher path (a hub id), or None."""
    return ARCHS.get(str(path).strip().rstrip("/"))


def cond_shapes(arch: dict[str, Any], max_sequence_length: int | None = None) -> dict[str, Any]:
    """Per-sample shapes (and dtypes) of the conditioning each family's conditioner produces.

    Returns a (nested) dict ``key -> (shape, dtype name)``: what models/conditioning.py (SDXL, SD1.5) and
    models/backbones/*.py ``Conditioner`` put into a :class:`~distill.models.conditioning.Cond`, derived from
    the backbone config (text widths) and the text length (``teacher.max_sequence_length`` or the default).
    """
    family, cfg = arch["family"], arch["config"]
    tokens = int(max_sequence_length or _TEXT_TOKENS[family])
    if family == "sdxl":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        return {"encoder_hidden_states": ((77, cfg["cross_attention_dim"]), "float32"),
                "added_cond_kwargs": {"text_embeds": ((pooled,), "float32"), "time_ids": ((6,), "float32")}}
    if family == "sd15":
        return {"encoder_hidden_states": ((77, cfg["cross_attention_dim"]), "float32")}
    if family == "sd3":  # CLIP tokens (77) then T5 tokens
        return {"encoder_hidden_states": ((77 + tokens, cfg["joint_attention_dim"]), "float32"),
                "pooled_projections": ((cfg["pooled_projection_dim"],), "float32")}
    if family == "flux":
        out = {"encoder_hidden_states": ((tokens, cfg["joint_attention_dim"]), "float32"),
               "pooled_projections": ((cfg["pooled_projection_dim"],), "float32")}
        if cfg.get("guidance_embeds"):
            out["guidance"] = ((), "float32")
        return out
    if family == "sana":
        return {"encoder_hidden_states": ((tokens, cfg["caption_channels"]), "float32"),
                "encoder_attention_mask": ((tokens,), "int64")}
    if family == "zimage":
        return {"caption_features": ((tokens, cfg["cap_feat_dim"]), "float32"),
                "caption_mask": ((tokens,), "bool")}
    raise ValueError(f"unknown family {family!r}")
