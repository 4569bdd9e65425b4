"""Tiny Stable Diffusion pipelines with random weights, built offline in seconds (for tests and demos).

:func:`build_tiny_sdxl` and :func:`build_tiny_sd15` write complete diffusers pipeline folders that
``StableDiffusionXLPipeline.from_pretrained(dir)`` / ``StableDiffusionPipeline.from_pretrained(dir)``
load without a network: the real folder layout (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``,
safetensors weights), the real scheduler configs (SD/SDXL ``scaled_linear`` betas 0.00085 -> 0.012,
``steps_offset`` 1, ``leading`` spacing, epsilon prediction) and a CLIP byte-level BPE tokenizer written
here (all 256 byte symbols plus merges for a few hundred common prompt words). Only the sizes are tiny:
UNet channels (32, 64), 32/48-wide two-layer text encoders, a three-level VAE (scale factor 4), so a
whole pipeline is a few MB. Everything is deterministic given ``seed``.

The architecture keeps what distinguishes the real models: SDXL has two text encoders of different
widths (penultimate hidden states concatenated, the second one's projected pooled output), the
``text_time`` added conditioning and linear-projection transformers; SD1.5 has one encoder and conv
projections.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

import torch

#: Words that get whole-word BPE tokens; anything else is spelt out of byte symbols (never unknown).
COMMON_WORDS = """
a an the of in on at with and or to from by for under over near behind above below inside outside
photo photograph picture image painting drawing sketch illustration render portrait landscape closeup
cat cats dog dogs bird birds horse cow sheep fish lion tiger bear fox wolf rabbit mouse owl eagle duck
man woman person people child boy girl baby astronaut robot knight wizard king queen chef artist
car cars bus train plane bike boat ship truck rocket house houses castle city street road bridge tower
tree trees forest flower flowers garden grass field mountain mountains river lake sea ocean beach
sky cloud clouds sun moon star stars night day sunset sunrise rain snow fog storm fire water ice
red green blue yellow orange purple pink black white gray brown gold silver colorful dark bright
big small large tiny old young new beautiful cute happy sad funny scary strange ancient modern
sitting standing running walking flying swimming eating reading playing riding holding wearing
table chair bed window door room kitchen book cup hat shirt dress shoes glasses bag ball box
high quality detailed realistic photorealistic cinematic lighting style art digital oil watercolor
is are was be has have this that it its very one two three
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable unicode symbols (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to one word's symbols."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def tiny_clip_vocab(words: Iterable[str] = COMMON_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: byte symbols, byte symbols + ``</w>``, merge results, then the specials.

    Merges join each word left to right (``c a`` -> ``ca``, ``ca t</w>`` -> ``cat</w>``), with extra merges
    where an earlier word's merge splits a later word, so every listed word becomes one token. The start/end tokens come
    last, as in OpenAI's CLIP (ids 49406 / 49407 there).
    """
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    pending = list(dict.fromkeys(w.lower() for w in words))
    # a merge learnt for one word can split a later one ("t o</w>" inside "photo"): add merges until none does
    while pending:
        for word in pending:
            symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            left = symbols[0]
            for right in symbols[1:]:
                if (left, right) not in ranks:
                    ranks[(left, right)] = len(merges)
                    merges.append(f"{left} {right}")
                    vocab.setdefault(left + right, len(vocab))
                left = left + right
        pending = [w for w in pending if len(_bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)) > 1]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(directory: str, pad_token: str = "<|endoftext|>", model_max_length: int = 77,
                         words: Iterable[str] = COMMON_WORDS) -> int:
    """Write ``vocab.json``, ``merges.txt`` and the configs of a CLIP tokenizer; return the vocabulary size.

    ``pad_token``: ``"<|endoftext|>"`` (SD1.5, SDXL's first tokenizer) or ``"!"`` (SDXL's ``tokenizer_2``).
    """
    os.makedirs(directory, exist_ok=True)
    vocab, merges = tiny_clip_vocab(words)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **specials}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(vocab)


#: The scheduler configs shipped with the real checkpoints (stabilityai/stable-diffusion-xl-base-1.0 and
#: runwayml/stable-diffusion-v1-5), legacy keys included, so loaders see what they will meet in practice.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}

_TEXT_COMMON = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                    layer_norm_eps=1e-5, pad_token_id=1)


def _text_config(vocab_size: int, hidden_size: int, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    # bos / eos are the last two ids (as in CLIP); the pooled output is read at the first eos
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, hidden_act=hidden_act,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, **_TEXT_COMMON, **extra)


def _tiny_vae(scaling_factor: float, sample_size: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(8, 16, 16), norm_num_groups=8, sample_size=sample_size,
                         scaling_factor=scaling_factor)


def _scheduler(config: dict):
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _finish_folder(directory: str, scheduler_config: dict, tokenizers: dict[str, str], vocab_words) -> None:
    """Replace what ``save_pretrained`` wrote for tokenizers and scheduler with the real repos' files."""
    import diffusers

    for name, pad in tokenizers.items():
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        write_clip_tokenizer(os.path.join(directory, name), pad_token=pad, words=vocab_words)
    config = {"_diffusers_version": diffusers.__version__, **scheduler_config}
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def build_tiny_sdxl(directory: str, seed: int = 0, time_cond_proj_dim: int | None = None,
                    sample_size: int = 8) -> str:
    """Write a tiny ``StableDiffusionXLPipeline`` with random weights to ``directory``; return its path.

    Args:
        seed: all weights are drawn from ``torch.manual_seed(seed)`` (the global RNG is left as it was).
        time_cond_proj_dim: passed to the UNet (LCM-style guidance embedding input), None for none.
        sample_size: latent size of the default resolution; images are ``4 * sample_size`` pixels.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    vocab, _ = tiny_clip_vocab(COMMON_WORDS)
    hidden_1, hidden_2, time_dim = 32, 48, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=hidden_1 + hidden_2, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
            time_cond_proj_dim=time_cond_proj_dim, norm_num_groups=32)
        vae = _tiny_vae(0.13025, 4 * sample_size, seed + 1)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(len(vocab), hidden_1, "quick_gelu"))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(vocab), hidden_2, "gelu", hidden_2))
    tmp_tok = os.path.join(directory, "_tokenizer_src")
    write_clip_tokenizer(tmp_tok)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tok)
    shutil.rmtree(tmp_tok)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=_scheduler(SDXL_SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    _finish_folder(directory, SDXL_SCHEDULER_CONFIG, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}, COMMON_WORDS)
    return directory


def build_tiny_sd15(directory: str, seed: int = 0, time_cond_proj_dim: int | None = None,
                    sample_size: int = 8) -> str:
    """Write a tiny ``StableDiffusionPipeline`` (SD1.5 layout, no safety checker) to ``directory``; return its path.

    Arguments as :func:`build_tiny_sdxl`.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    vocab, _ = tiny_clip_vocab(COMMON_WORDS)
    hidden = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
            cross_attention_dim=hidden, time_cond_proj_dim=time_cond_proj_dim, norm_num_groups=32)
        vae = _tiny_vae(0.18215, 4 * sample_size, seed + 1)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(len(vocab), hidden, "quick_gelu"))
    tmp_tok = os.path.join(directory, "_tokenizer_src")
    write_clip_tokenizer(tmp_tok)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tok)
    shutil.rmtree(tmp_tok)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    _finish_folder(directory, SD15_SCHEDULER_CONFIG, {"tokenizer": "<|endoftext|>"}, COMMON_WORDS)
    return directory


# ------------------------------------------------------------------------------------------ flow transformers
#: Scheduler configs of the real checkpoints (stabilityai/stable-diffusion-3.5-medium,
#: black-forest-labs/FLUX.1-dev); the tiny Sana uses the flow-matching Euler scheduler with Sana's shift 3.
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                         "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
                         "shift": 3.0, "use_dynamic_shifting": True}
SANA_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _sentencepiece_like(specials: list[str], unk: str, words: Iterable[str]):
    """A ``tokenizers`` Unigram model over whole words (``▁word``) and single characters, lower-cased."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = list(dict.fromkeys(w.lower() for w in words))
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = [(s, 0.0) for s in specials] + [("▁" + w, -1.0) for w in words] + [("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index(unk), byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


def write_t5_tokenizer(directory: str, words: Iterable[str] = COMMON_WORDS, model_max_length: int = 512) -> int:
    """A T5 tokenizer (``T5TokenizerFast``, ``tokenizer.json``): ids 0 pad, 1 ``</s>`` (appended), 2 unk."""
    from tokenizers import processors
    from transformers import T5TokenizerFast

    tok = _sentencepiece_like(["<pad>", "</s>", "<unk>"], "<unk>", words)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=model_max_length)
    fast.save_pretrained(directory)
    return tok.get_vocab_size()


def write_gemma_tokenizer(directory: str, words: Iterable[str] = COMMON_WORDS, model_max_length: int = 300) -> int:
    """A Gemma-style tokenizer (``<bos>`` prepended; pad 0, eos 1, bos 2, unk 3) saved as a fast tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _sentencepiece_like(["<pad>", "<eos>", "<bos>", "<unk>"], "<unk>", words)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=model_max_length)
    fast.save_pretrained(directory)
    return tok.get_vocab_size()


def _flow_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None, sample_size: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(8, 16, 16), norm_num_groups=8, sample_size=sample_size,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False)


def _tiny_t5(vocab_size: int, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _save_flow_pipeline(pipe, directory: str, scheduler_config: dict, clip_tokenizers: dict[str, str],
                        t5_tokenizers: tuple[str, ...] = (), gemma_tokenizers: tuple[str, ...] = ()) -> str:
    import diffusers

    pipe.save_pretrained(directory, safe_serialization=True)
    for name, pad in clip_tokenizers.items():
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        write_clip_tokenizer(os.path.join(directory, name), pad_token=pad)
    for name in t5_tokenizers:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        write_t5_tokenizer(os.path.join(directory, name))
    for name in gemma_tokenizers:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        write_gemma_tokenizer(os.path.join(directory, name))
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_diffusers_version": diffusers.__version__, **scheduler_config}, f, indent=2)
    return directory


def _tokenizer_from(writer, directory: str, cls):
    tmp = os.path.join(directory, "_tokenizer_src")
    writer(tmp)
    tok = cls.from_pretrained(tmp)
    shutil.rmtree(tmp)
    return tok


def build_tiny_sd3(directory: str, seed: int = 0, sample_size: int = 8) -> str:
    """Write a tiny ``StableDiffusion3Pipeline`` (SD3.5 layout: two CLIP encoders with projection, T5, a
    16-channel-style VAE with shift and scale, a 2-block ``SD3Transformer2DModel`` with dual attention and
    RMS qk-norm) to ``directory``; return its path. Latents 8 x ``sample_size`` x ``sample_size``; images
    ``4 * sample_size`` pixels."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    vocab, _ = tiny_clip_vocab(COMMON_WORDS)
    clip_dim, joint_dim = 32, 64
    t5_tok = _tokenizer_from(write_t5_tokenizer, directory, T5TokenizerFast)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=joint_dim, caption_projection_dim=16,
            pooled_projection_dim=2 * clip_dim, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
        vae = _flow_vae(8, 1.5305, 0.0609, 4 * sample_size, seed + 1)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(_text_config(len(vocab), clip_dim, "quick_gelu", clip_dim))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(vocab), clip_dim, "gelu", clip_dim))
        text_encoder_3 = _tiny_t5(len(t5_tok), joint_dim, seed + 4)
    clip_tok = _tokenizer_from(write_clip_tokenizer, directory, CLIPTokenizer)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=_scheduler(SD3_SCHEDULER_CONFIG), vae=vae,
                                    text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2,
                                    tokenizer_2=clip_tok, text_encoder_3=text_encoder_3, tokenizer_3=t5_tok)
    return _save_flow_pipeline(pipe, directory, SD3_SCHEDULER_CONFIG, {"tokenizer": "<|endoftext|>",
                                                                        "tokenizer_2": "!"}, ("tokenizer_3",))


def build_tiny_flux(directory: str, seed: int = 0, guidance_embeds: bool = True) -> str:
    """Write a tiny ``FluxPipeline`` (FLUX.1-dev layout: CLIP + T5 encoders, a 4-channel-latent VAE with shift and
    scale, a ``FluxTransformer2DModel`` with one double and one single block and, by default, the guidance
    embedding) to ``directory``; return its path. Use 32-pixel images (``teacher.resolution: [32, 32]``):
    latents 4 x 8 x 8, 16 packed tokens. FLUX's resolution-dependent shift config is the real one."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    vocab, _ = tiny_clip_vocab(COMMON_WORDS)
    clip_dim, joint_dim = 32, 32
    t5_tok = _tokenizer_from(write_t5_tokenizer, directory, T5TokenizerFast)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_dim,
                                             pooled_projection_dim=clip_dim, guidance_embeds=guidance_embeds,
                                             axes_dims_rope=(4, 4, 8))
        vae = _flow_vae(4, 0.3611, 0.1159, 32, seed + 1)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(len(vocab), clip_dim, "quick_gelu"))
        text_encoder_2 = _tiny_t5(len(t5_tok), joint_dim, seed + 3)
    clip_tok = _tokenizer_from(write_clip_tokenizer, directory, CLIPTokenizer)
    pipe = FluxPipeline(transformer=transformer, scheduler=_scheduler(FLUX_SCHEDULER_CONFIG), vae=vae,
                        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok)
    return _save_flow_pipeline(pipe, directory, FLUX_SCHEDULER_CONFIG, {"tokenizer": "<|endoftext|>"},
                               ("tokenizer_2",))


def build_tiny_sana(directory: str, seed: int = 0, sample_size: int = 16) -> str:
    """Write a tiny ``SanaPipeline`` (Gemma-2 text encoder with a Gemma-style tokenizer, a DC-AE VAE, a 2-block
    ``SanaTransformer2DModel`` with linear attention, patch size 1) to ``directory``; return its path. Latents
    4 x ``sample_size`` x ``sample_size``; images ``2 * sample_size`` pixels (a two-level DC-AE)."""
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tok = _tokenizer_from(write_gemma_tokenizer, directory, PreTrainedTokenizerFast)
    hidden = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                             num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                             cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=hidden,
                                             sample_size=sample_size)
        torch.manual_seed(seed + 1)
        vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                            encoder_block_types=("ResBlock", "EfficientViTBlock"),
                            decoder_block_types=("ResBlock", "EfficientViTBlock"),
                            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                            downsample_block_type="conv", upsample_block_type="interpolate",
                            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
        torch.manual_seed(seed + 2)
        text_encoder = Gemma2Model(Gemma2Config(head_dim=8, hidden_size=hidden, intermediate_size=32,
                                                max_position_embeddings=1024, num_attention_heads=2,
                                                num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tok),
                                                pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                                attn_implementation="eager"))
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=_scheduler(SANA_SCHEDULER_CONFIG))
    return _save_flow_pipeline(pipe, directory, SANA_SCHEDULER_CONFIG, {}, (), ("tokenizer",))


#: Tongyi-MAI/Z-Image-Turbo's scheduler: flow-matching Euler with a static shift 3
ZIMAGE_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                           "use_dynamic_shifting": False}
#: a minimal Qwen3-style chat template (user turn, then the assistant prefix), enough for encode_prompt
_QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_zimage(directory: str, seed: int = 0) -> str:
    """Write a tiny ``ZImagePipeline`` (Qwen3 text encoder with a chat-template tokenizer, a 4-channel VAE with
    shift and scale, a ``ZImageTransformer2DModel`` with one refiner and two main layers) to ``directory``;
    return its path. Use 32-pixel images: latents 4 x 8 x 8."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tok = _tokenizer_from(write_gemma_tokenizer, directory, PreTrainedTokenizerFast)
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    hidden = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                               n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True,
                                               cap_feat_dim=hidden, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
        vae = _flow_vae(4, 0.3611, 0.1159, 32, seed + 1)
        torch.manual_seed(seed + 2)
        text_encoder = Qwen3Model(Qwen3Config(hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                              vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=0))
    pipe = ZImagePipeline(scheduler=_scheduler(ZIMAGE_SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
                          tokenizer=tok, transformer=transformer)
    return _save_flow_pipeline(pipe, directory, ZIMAGE_SCHEDULER_CONFIG, {})
