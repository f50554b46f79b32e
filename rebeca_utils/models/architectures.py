"""The paper's architectures (SD-1.5, IP-Adapter's ViT-H/14) and the tiny stand-ins' copies of them, shrunk."""
from __future__ import annotations

import json

import open_clip
from transformers import CLIPVisionConfig

from ..config import ModelsConfig
from ..io import atomic_write
from ..runtime import kit_cache_dir

# The paper's architectures (config.json of h94/IP-Adapter models/image_encoder and of SD-1.5's unet, vae,
# text_encoder); the tiny builders reuse them with only widths, depths and sizes shrunk.
VIT_H14_VISION_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                             image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")

SD15_UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                       block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       scaling_factor=0.18215)

SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def tiny_unet_config() -> dict:
    """SD-1.5's UNet layout (4 levels, cross-attention in the first three, 16 attn2 layers) at tiny widths."""
    # 8 groups: SD's 32 groups on 32-channel blocks is instance norm, which strips each channel's mean (the colour)
    return {**SD15_UNET_CONFIG, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32,
            "norm_num_groups": 8}


def tiny_vae_config() -> dict:
    """SD-1.5's VAE (4 levels: 8x downsampling, 4 latent channels) at tiny widths: 64 px images, 8x8 latents."""
    return {**SD15_VAE_CONFIG, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64,
            "norm_num_groups": 8}  # 8 groups, as the UNet


def tiny_text_config() -> dict:
    """SD-1.5's CLIPTextConfig at tiny widths; hidden size = the UNet's cross_attention_dim (768 = 768 in SD-1.5)."""
    return {**SD15_TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "projection_dim": 32}


AESTHETIC_EMB_DIM = 768  # the LAION aesthetic head reads ViT-L/14 embeddings; the tiny analog keeps that width

TINY_HPS_EMB_DIM = 64


def tiny_clip_name(models: ModelsConfig, role: str) -> str:
    """Register (once) and name the tiny open_clip config of `role`, widths from `models`."""
    emb = {"verifier": models.verifier_emb_dim, "aesthetic": AESTHETIC_EMB_DIM,
           "decoder": models.decoder_emb_dim, "hps": TINY_HPS_EMB_DIM}[role]
    name = f"rebeca-tiny-{role}-{emb}"
    if name not in open_clip.list_models():
        # same config schema as open_clip's ViT-*.json, tiny widths; text keeps the real BPE vocab and 77 tokens
        cfg = {"embed_dim": emb,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
        if role == "aesthetic":
            cfg["quick_gelu"] = True  # as OpenAI's ViT-L/14
        path = kit_cache_dir() / "open_clip_configs" / f"{name}.json"
        atomic_write(path, json.dumps(cfg, indent=1).encode())
        open_clip.add_model_config(path)
    return name


def tiny_image_encoder_config(models: ModelsConfig):
    """ViT-H/14's CLIPVisionConfig shrunk, projecting to models.decoder_emb_dim."""
    return CLIPVisionConfig(**{**VIT_H14_VISION_CONFIG, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                               "projection_dim": models.decoder_emb_dim})
