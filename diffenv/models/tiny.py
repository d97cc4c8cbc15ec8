"""Tiny random-weight diffusers pipelines and CLIP models, built offline (tests, docs, smoke runs).

Nothing here is downloaded: tokenizers are built from an in-memory character vocabulary and every
network from a small random config, then saved with `save_pretrained` (safetensors). The saved folders
have the same layout as hub checkpoints, so `load_backend("sd:" + folder, prompts=...)`, the CLIP
rewards and `diffenv ab` exercise their real loading code on them::

    python -m diffenv.models.tiny --family sd --out /tmp/tiny-sd     # also sdxl, sd3, flux, clip

The outputs are noise, of course: these models check plumbing (shapes, embeddings, schedules,
LoRA round trips), never image quality.
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
from pathlib import Path

import torch

FAMILIES = ("sd", "sdxl", "sd3", "flux")
#: token budget of the tiny tokenizers (real CLIP uses 77, T5 256/512)
MAX_LENGTH = 16
_CHARS = list(string.ascii_lowercase) + list(string.digits) + list(".,!?'-")


def tiny_clip_tokenizer(max_length: int = MAX_LENGTH):
    """A `CLIPTokenizer` over single characters (no BPE merges), from an in-memory vocab."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(_CHARS)}
    vocab.update({c + "</w>": len(_CHARS) + i for i, c in enumerate(_CHARS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)
    return tok


def tiny_t5_tokenizer(max_length: int = MAX_LENGTH):
    """A `T5TokenizerFast` over single characters (a unigram model), from an in-memory vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _clip_text_config(vocab_size: int, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=projection_dim,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                          hidden_act="gelu")


def _vae(latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=64, **kwargs)


def _unet(cross_attention_dim: int, **kwargs):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4, **kwargs)


def make_tiny_pipeline(family: str, seed: int = 0):
    """A tiny random pipeline of `family` ("sd", "sdxl", "sd3", "flux"): 32×32×4 latents, 64×64 images."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    text_config = _clip_text_config(len(tok))
    if family == "sd":
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(text_config), tokenizer=tok,
                                       unet=_unet(32), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
        unet = _unet(64, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=8 * 6 + 32, transformer_layers_per_block=1)
        return StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(text_config), tokenizer=tok,
                                         text_encoder_2=CLIPTextModelWithProjection(text_config),
                                         tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler)
    if family == "sd3":
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, out_channels=4,
                                            num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                            joint_attention_dim=64, caption_projection_dim=32,
                                            pooled_projection_dim=64, pos_embed_max_size=32)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=CLIPTextModelWithProjection(text_config), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None)
    t5_tok = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler,
                        vae=_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                 use_post_quant_conv=False),
                        text_encoder=CLIPTextModel(text_config), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok)


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny pipeline (safetensors) to `path`; returns the folder."""
    path = Path(path)
    make_tiny_pipeline(family, seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_clip(path: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny `CLIPModel` + tokenizer + image processor (224→32 px) saved to `path` (safetensors)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=projection_dim, hidden_act="gelu")
    config = CLIPConfig(text_config=_clip_text_config(len(tok), projection_dim=projection_dim).to_dict(),
                        vision_config=vision.to_dict(), projection_dim=projection_dim)
    path = Path(path)
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, choices=[*FAMILIES, "clip"])
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = save_tiny_clip(a.out, a.seed) if a.family == "clip" else save_tiny_pipeline(a.family, a.out, a.seed)
    print(f"wrote tiny {a.family} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
