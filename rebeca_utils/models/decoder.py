"""SD-1.5 + IP-Adapter decoder: tiny SD-1.5-shaped builder or Hub weights, one loading path, per-image embeddings."""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from ..config import GenerationConfig, ModelsConfig
from ..io import atomic_write
from ..runtime import kit_cache_dir, resolve_dtype, seeded
from .architectures import tiny_text_config, tiny_unet_config, tiny_vae_config
from .encoders import build_tokenizer
from .tiny_weights import component_dir, pretrained
from .weights import (
    check_builder,
    hf_cache,
    ip_adapter_entry,
    load_pretrained,
    quiet_libraries,
    require_weights,
    sd_entry,
)


def _world_component(models: ModelsConfig, name: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """The smoke world's folder of component `name` when `models` asks for pretrained tiny weights, else None."""
    return component_dir(models, name, cache_dir) if pretrained(models) else None


def tiny_sd_components(models: ModelsConfig, cache_dir: str | os.PathLike | None) -> dict:
    """SD-1.5's components at tiny widths: the smoke world's trained ones (from_pretrained), or seeded at random."""
    trained = _world_component(models, "decoder", cache_dir)
    if trained is not None:
        unet = load_pretrained(UNet2DConditionModel, trained / "unet")
        vae = load_pretrained(AutoencoderKL, _world_component(models, "vae", cache_dir))
        text_encoder = load_pretrained(CLIPTextModel, trained / "text_encoder")
    else:
        with seeded(models.seed):
            unet = UNet2DConditionModel(**tiny_unet_config())
        with seeded(models.seed):
            vae = AutoencoderKL(**tiny_vae_config())
        with seeded(models.seed):
            text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))  # full BPE vocab, 77 positions
    # SD-1.5's scheduler constants, with DDIM as the sampler
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(cache_dir),
                scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False)


def tiny_ip_adapter_state_dict(unet, image_embed_dim: int, seed: int = 0) -> dict:
    """IP-Adapter weights in the original ip-adapter_sd15.bin layout for `unet`: image_proj + ip_adapter."""
    cross = unet.config.cross_attention_dim
    with seeded(seed):
        proj = torch.nn.Linear(image_embed_dim, 4 * cross)  # 4 image tokens, as IP-Adapter SD1.5
    image_proj = {"proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone(),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}  # LayerNorm's own init
    ip_adapter = {}
    # keys index unet.attn_processors, as the original's ModuleList(attn_processors.values()) did: 1, 3, ..., 31;
    # to_k_ip / to_v_ip start as copies of to_k / to_v, which is how IP-Adapter initialises them for training
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            ip_adapter[f"{i}.to_k_ip.weight"] = attn.to_k.weight.detach().float().clone()
            ip_adapter[f"{i}.to_v_ip.weight"] = attn.to_v.weight.detach().float().clone()
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        isinstance(a[k], dict) and isinstance(b[k], dict) and _same_state(a[k], b[k])
        or isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor)
        and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def write_tiny_ip_adapter(models: ModelsConfig, unet, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the tiny IP-Adapter checkpoint to <cache>/tiny-ip-adapter/<subfolder>/<weight>; returns the folder."""
    folder = Path(cache_dir or kit_cache_dir()) / "tiny-ip-adapter"
    path = folder / models.ip_adapter_subfolder / models.ip_adapter_weight
    state = tiny_ip_adapter_state_dict(unet, models.decoder_emb_dim, models.seed)
    if path.is_file():
        try:
            if _same_state(torch.load(path, map_location="cpu", weights_only=True), state):
                return folder  # present and identical to what this config produces
        except Exception:  # unreadable or truncated: rewrite below
            pass
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())
    return folder


def build_sd_pipeline(models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      ip_adapter: bool = True, cache_dir: str | os.PathLike | None = None):
    """StableDiffusionPipeline (DDIM, safety_checker=None), IP-Adapter loaded by the paper's load_ip_adapter call."""

    if check_builder(models) == "tiny":
        pipe = StableDiffusionPipeline(**tiny_sd_components(models, cache_dir))
        # the smoke world's trained IP-Adapter (same file layout), else IP-Adapter's init from the fp32 weights
        source = (_world_component(models, "decoder", cache_dir) or write_tiny_ip_adapter(models, pipe.unet, cache_dir)
                  if ip_adapter else None)
        if dtype != torch.float32:  # (a float32 .to() only earns diffusers warnings)
            pipe = pipe.to(dtype=dtype)
    else:
        require_weights(sd_entry(models))
        if ip_adapter:
            require_weights(ip_adapter_entry(models))
        pipe = StableDiffusionPipeline.from_pretrained(
            models.sd_id, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            cache_dir=hf_cache(), local_files_only=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        source = models.ip_adapter_id
    for frozen in (pipe.unet, pipe.vae, pipe.text_encoder):  # dropout off: the same seed gives the same image
        frozen.eval().requires_grad_(False)
    if ip_adapter:
        # one loading path for both profiles: only the first argument (local folder or Hub repo) differs
        with quiet_libraries():  # its note that no image encoder is loaded: we pass embeddings, by design
            pipe.load_ip_adapter(str(source), subfolder=models.ip_adapter_subfolder,
                                 weight_name=models.ip_adapter_weight, image_encoder_folder=None,
                                 cache_dir=hf_cache(), local_files_only=True)
    return pipe.to(device)


class RebecaDecoderPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline that gives every image of a batch its own IP-Adapter embedding.

    Stock diffusers repeats `ip_adapter_image_embeds` once per image of the batch, so B distinct embeddings mix
    into every image (huggingface/diffusers#9813, open); here row i of the embeddings belongs to image i."""

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device,
                                        num_images_per_prompt, do_classifier_free_guidance):
        # diffusers repeats the given embeddings `batch` times (made for one embedding shared by the batch), so a
        # batch of B distinct embeddings would give every image all B images' tokens; ours hold one row per image
        if ip_adapter_image_embeds is None:
            raise ValueError("RebecaDecoderPipeline takes ip_adapter_image_embeds (one row per image), not images")
        rows = num_images_per_prompt * (2 if do_classifier_free_guidance else 1)
        for e in ip_adapter_image_embeds:
            if e.shape[0] != rows:
                raise ValueError(f"ip_adapter_image_embeds has {e.shape[0]} rows; expected {rows} "
                                 f"({num_images_per_prompt} images{', negatives first' if rows > num_images_per_prompt else ''})")
        return [e.to(device) for e in ip_adapter_image_embeds]


def ip_adapter_embeds(img_emb: torch.Tensor, decoder_cfg: float) -> list[torch.Tensor]:
    """`ip_adapter_image_embeds` for (B, d) embeddings: [cat([zeros, emb])] as (2B, 1, d) when CFG > 1, else [(B, 1, d)].

    The reference code passed the concatenated pair at CFG 1 too, which doubles the image tokens of each image."""
    if img_emb.ndim != 2:
        raise ValueError(f"img_emb must be (batch, dim), got shape {tuple(img_emb.shape)}")
    pos = img_emb[:, None, :]
    return [torch.cat([torch.zeros_like(pos), pos])] if decoder_cfg > 1 else [pos]


def build_decoder(models: ModelsConfig, cfg: GenerationConfig, device: str = "cpu", ip_adapter: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> RebecaDecoderPipeline:
    """SD-1.5 (+ IP-Adapter at cfg.ip_adapter_scale) as a RebecaDecoderPipeline; fp16 on CUDA unless cfg.dtype='fp32'."""

    dtype = resolve_dtype(device, cfg.dtype)
    base = build_sd_pipeline(models, device, dtype, ip_adapter, cache_dir)
    # the same modules (IP-Adapter already in the UNet) under our class; from_pipe would cast them to fp32
    pipe = RebecaDecoderPipeline(**base.components, requires_safety_checker=False)
    if pipe.unet.dtype != dtype:
        raise RuntimeError(f"decoder UNet is {pipe.unet.dtype}, expected {dtype}")
    if ip_adapter:
        pipe.set_ip_adapter_scale(cfg.ip_adapter_scale)
    pipe.set_progress_bar_config(disable=True)  # one bar over items instead of one per call
    return pipe
