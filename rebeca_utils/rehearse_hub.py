"""Random-weight checkpoints of every model the paper profile loads, from their published configurations, written
into a Hugging Face cache laid out like the Hub's (models--ORG--NAME/refs/main + snapshots/<rev>/): the rehearsal's
stand-in for the ~30 GB of paper weights. `ci` keeps every interface dimension and cuts depth (and the widths
behind the interfaces) to stay under 2 GB; `full` is every architecture at its published size (LLaVA's language
model cut in depth only)."""
from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from .config import ModelsConfig
from .io import atomic_write
from .models.architectures import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, VIT_H14_VISION_CONFIG
from .models.decoder import tiny_ip_adapter_state_dict
from .models.encoders import tiny_tokenizer_dir
from .models.vlm import LLAVA_CHAT_TEMPLATE
from .models.weights import HPS_FILES, OPEN_CLIP_CONFIG, quiet_libraries
from .runtime import seeded

SIZES = ("ci", "full")

# what `ci` cuts: depth to one block per stage, and the widths no other model sees (UNet, VAE and LLaVA's language
# model); every interface keeps its published value (768-d cross-attention, 1024-d IP-Adapter embeddings, 1280-d
# verifier space, 4-channel 64² latents of 512² images, 576 image tokens, the 32k vocabulary, 77-token prompts)
# at 64² latents SD's first level attends over 4,096 tokens (5.6 s a step on one CPU thread): in `ci` that level
# keeps its resnets and loses its transformer, the VAE its mid-block attention (0.9 s a step, 1.3 s a decode)
CI_UNET = dict(layers_per_block=1, block_out_channels=(32, 64, 64, 64),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
CI_VAE = dict(layers_per_block=1, block_out_channels=(8, 16, 32, 32), norm_num_groups=8,
              mid_block_add_attention=False)
CI_TEXT = dict(num_hidden_layers=1)
CI_VISION = dict(num_hidden_layers=1)
CI_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4)
FULL_LLAMA_LAYERS = 2  # 7B in fp32 (28 GB) does not fit a 23 GB machine; the depth is the only cut in `full`

# llava-hf/llava-1.5-7b-hf's config.json (text: Llama-2-7B's shape with LLaVA's 32,064-token embedding)
LLAVA_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
LLAVA_TEXT = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAVA_VOCAB = 32000
# stable-diffusion-v1-5's scheduler/scheduler_config.json
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None}  # the Llama tokenizer's pieces; <image> is 32000 and <pad> 32001 in the real tokenizer


def snapshot(cache: str | os.PathLike, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hub-layout cache (created, refs/main pointing at it)."""
    rev = hashlib.sha1(repo_id.encode()).hexdigest()  # a fixed 40-hex revision per repo, as the Hub's commits
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    folder = repo / "snapshots" / rev
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cut(config: dict, size: str, ci: dict) -> dict:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: valid sizes are {', '.join(SIZES)}")
    return {**config, **ci} if size == "ci" else dict(config)


def write_sd(cache, models: ModelsConfig, size: str) -> UNet2DConditionModel:
    """stable-diffusion-v1-5: model_index.json, unet, vae, text_encoder, tokenizer, scheduler, feature_extractor."""
    snap = snapshot(cache, models.sd_id)
    with seeded(0):
        unet = UNet2DConditionModel(**_cut(SD15_UNET_CONFIG, size, CI_UNET))
        vae = AutoencoderKL(**_cut(SD15_VAE_CONFIG, size, CI_VAE))
        text = CLIPTextModel(CLIPTextConfig(**_cut(SD15_TEXT_CONFIG, size, CI_TEXT)))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        module.save_pretrained(snap / name)
    tok = snap / "tokenizer"
    tok.mkdir(exist_ok=True)
    for f in tiny_tokenizer_dir(Path(cache) / ".kit").iterdir():  # the real BPE vocabulary (open_clip ships it)
        (tok / f.name).write_bytes(f.read_bytes())
    (snap / "scheduler").mkdir(exist_ok=True)
    atomic_write(snap / "scheduler" / "scheduler_config.json", json.dumps(SD15_SCHEDULER, indent=2).encode())
    CLIPImageProcessor(crop_size=224, size=224).save_pretrained(snap / "feature_extractor")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    atomic_write(snap / "model_index.json", json.dumps(index, indent=2).encode())
    return unet


def write_ip_adapter(cache, models: ModelsConfig, unet, size: str) -> None:
    """h94/IP-Adapter: models/ip-adapter_sd15.bin in the original key layout, models/image_encoder (ViT-H/14)."""
    snap = snapshot(cache, models.ip_adapter_id)
    path = snap / models.ip_adapter_subfolder / models.ip_adapter_weight
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_ip_adapter_state_dict(unet, models.decoder_emb_dim), path)
    with seeded(0):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_cut(VIT_H14_VISION_CONFIG, size, CI_VISION)))
    encoder.save_pretrained(snap / models.image_encoder_subfolder)


def _open_clip_cfg(arch: str, size: str) -> dict:
    cfg = open_clip.get_model_config(arch)
    if size == "ci":
        cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 1
    return cfg


def _open_clip_state(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with seeded(seed):
        model = open_clip.CLIP(**cfg)
    return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def write_open_clip(cache, arch_tag: tuple[str, str], size: str, seed: int = 0) -> Path:
    """An open_clip repo as the registry names it: open_clip_config.json + the weights file (fp16 in `ci`)."""
    pcfg = open_clip.get_pretrained_cfg(*arch_tag)
    org, name, filename = (pcfg["hf_hub"].split("/", 2) + [""])[:3]
    snap = snapshot(cache, f"{org}/{name}")
    cfg = _open_clip_cfg(arch_tag[0], size)
    preprocess = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
    atomic_write(snap / OPEN_CLIP_CONFIG, json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}).encode())
    state = _open_clip_state(cfg, seed, torch.float16 if size == "ci" else torch.float32)
    save_file(state, str(snap / (filename or "open_clip_model.safetensors")))
    return snap


def write_hps(cache, models: ModelsConfig, size: str) -> None:
    """xswu/HPSv2: HPS_v2_compressed.pt, {"state_dict": ...} of the fine-tuned ViT-H-14 in fp16."""
    state = _open_clip_state(_open_clip_cfg(models.hps_clip[0], size), 1, torch.float16)
    torch.save({"epoch": 1, "name": "hps", "state_dict": state}, snapshot(cache, models.hps_id) / HPS_FILES["v2.0"])


def llama_tokenizer() -> LlamaTokenizer:
    """A Llama-style byte-fallback BPE tokenizer with the real vocabulary size (32,000 pieces) and LLaVA's added
    <image> (32000) and <pad> (32001): the interfaces of llava-1.5's tokenizer, not its pieces."""
    chars = ["▁", *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    merges = []
    pairs = [(a, b) for a in chars for b in chars]
    for a, b in pairs + [(a + b, c) for a, b in pairs for c in chars]:
        if len(vocab) == LLAVA_VOCAB:
            break
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def write_llava(cache, models: ModelsConfig, size: str) -> None:
    """llava-hf/llava-1.5-7b-hf: config, sharded safetensors + index, processor, tokenizer and chat template."""
    snap = snapshot(cache, models.vlm_id)
    tok = llama_tokenizer()
    text = {**LLAVA_TEXT, **(CI_LLAMA if size == "ci" else {"num_hidden_layers": FULL_LLAMA_LAYERS})}
    config = LlavaConfig(vision_config=CLIPVisionConfig(**_cut(LLAVA_VISION, size, CI_VISION)),
                         text_config=LlamaConfig(**text), image_token_index=tok.convert_tokens_to_ids("<image>"),
                         pad_token_id=tok.pad_token_id, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=576)
    with seeded(0):
        model = LlavaForConditionalGeneration(config)
    # several shards named by an index, as the real repo (3 shards of ~5 GB)
    model.save_pretrained(snap, max_shard_size="20MB" if size == "ci" else "2GB")  # always an index, as the repo
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1).save_pretrained(snap)


def build_cache(cache: str | os.PathLike, size: str = "ci", models: ModelsConfig | None = None) -> Path:
    """Every paper checkpoint with random weights in `cache` (a Hub-layout folder for HF_HUB_CACHE); returns it."""
    models = models or ModelsConfig()
    cache = Path(cache)
    with quiet_libraries():  # their "Writing model shards" bars, once per model
        _build(cache, models, size)
    return cache


def _build(cache: Path, models: ModelsConfig, size: str) -> None:
    unet = write_sd(cache, models, size)
    write_ip_adapter(cache, models, unet, size)
    del unet
    for seed, arch_tag in enumerate((models.decoder_clip, models.verifier_clip, models.aesthetic_clip)):
        write_open_clip(cache, arch_tag, size, seed)
    write_hps(cache, models, size)
    write_llava(cache, models, size)
