"""Image encoders of the two CLIP spaces (decoder = IP-Adapter's ViT-H/14, verifier = bigG), tiny or paper weights."""
from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import open_clip
import open_clip.tokenizer as oct
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..config import ModelsConfig
from ..io import atomic_write
from ..runtime import kit_cache_dir, seeded
from .architectures import tiny_clip_name, tiny_image_encoder_config
from .tiny_weights import component_dir, pretrained, weights_tag
from .weights import (
    CLIP_ROLES,
    OPEN_CLIP_CONFIG,
    check_builder,
    clip_entry,
    hf_cache,
    image_encoder_entry,
    load_pretrained,
    require_weights,
)


def _random_init_warning(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init():
    """The tiny stand-ins are random by design: drop open_clip's "No pretrained weights loaded" warning."""
    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(_random_init_warning)
    try:
        yield
    finally:
        root.removeFilter(_random_init_warning)


VERIFIER_WEIGHTS = "open_clip_model.safetensors"  # the smoke world's file, named as open_clip's Hub checkpoints


# an open_clip CLIP's text half: an image encoder needs none of it (bigG's is 0.7 B parameters, 2.8 GB in fp32)
TEXT_PARTS = ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection", "attn_mask")


def drop_text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The model without TEXT_PARTS (encode_text then fails; encode_image is unchanged)."""
    for name in TEXT_PARTS:
        if hasattr(model, name):
            delattr(model, name)
    return model


def build_clip(models: ModelsConfig, role: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               vision_only: bool = False):
    """(model, preprocess, tokenizer) from open_clip for role verifier | aesthetic | decoder; `vision_only` builds
    and loads the image half alone (the paper's weights never hold the text half in memory)."""

    if role not in CLIP_ROLES:
        raise ValueError(f"role={role!r}: valid roles are {', '.join(CLIP_ROLES)}")
    if check_builder(models) == "tiny":
        name = tiny_clip_name(models, role)
        if role == "verifier" and pretrained(models):  # the smoke world's verifier-space encoder
            path = component_dir(models, "verifier_encoder") / VERIFIER_WEIGHTS
            with seeded(models.seed):  # init before loading: keep the caller's RNG stream untouched
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
        else:
            with seeded(models.seed), quiet_random_init():
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        model = drop_text_tower(model) if vision_only else model
    else:
        name, tag = getattr(models, f"{role}_clip")
        entry = clip_entry(models, role)
        weights, config = require_weights(entry)
        # the repo's architecture, with the tag's preprocessing and activation as open_clip's registry gives them
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        model, preprocess = open_clip_from_repo(
            config, device, dtype, force_quick_gelu=pcfg.get("quick_gelu", False), image_mean=pcfg.get("mean"),
            image_std=pcfg.get("std"), image_interpolation=pcfg.get("interpolation"),
            image_resize_mode=pcfg.get("resize_mode"), vision_only=vision_only)
        stream_state_dict(model, weights, skip=TEXT_PARTS if vision_only else ())
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(name)


def open_clip_from_repo(config: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        vision_only: bool = False, **kwargs):
    """(model, preprocess) of the architecture in a Hub repo's open_clip_config.json, made on `device` in `dtype`
    without weights: no second copy of the model (bigG in fp32 is 10 GB) exists before stream_state_dict fills it.
    `vision_only`: made on the meta device, its text half dropped, then given memory: that half is never allocated."""
    folder, where = Path(config).parent, "meta" if vision_only else device
    with torch.device(where), default_dtype(dtype), quiet_random_init():
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{folder}", load_weights=False, device=where, **kwargs)
    if vision_only:  # the image half has no buffers that the checkpoint does not fill (a test checks every key)
        return drop_text_tower(model).to_empty(device=device), preprocess
    return model.to(device=device, dtype=dtype), preprocess


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default floating dtype set to `dtype` (a floating type) inside the block."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def stream_state_dict(model: torch.nn.Module, path: str | os.PathLike, skip: tuple[str, ...] = ()
                      ) -> torch.nn.Module:
    """Copy a checkpoint into `model` one tensor at a time (safetensors, or a memory-mapped torch file), so host RAM
    holds one tensor of it at a time, not a second copy of the model; the same keys (less those under a `skip`
    prefix, which are not read), or one line naming the file."""
    own = model.state_dict()

    def wanted(key: str) -> bool:
        return key.split(".")[0] not in skip
    if str(path).endswith(".safetensors"):
        header = {k: v for k, v in _safetensors_header(path).items() if wanted(k)}
        _check_keys(path, own, set(header) - {"__metadata__"})
        with open(path, "rb") as f:
            for k, tensor in _safetensors_tensors(f, header):
                own[k].copy_(tensor)
        return model
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in ("attn_mask", "module.attn_mask")}
    state = {k: v for k, v in state.items() if wanted(k)}
    _check_keys(path, own, set(state))
    for k, v in state.items():
        own[k].copy_(v)
    return model


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _safetensors_header(path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header)."""
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def _safetensors_tensors(f, header: dict):
    """(name, tensor) of a safetensors file, read one at a time with plain reads: a memory map's touched pages would
    count as this process's resident memory, a second copy of the model in its peak RSS (bigG: +9.5 GB)."""
    f.seek(0)
    base = 8 + int.from_bytes(f.read(8), "little")  # the tensors' offsets count from the end of the header
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        f.seek(base + start)
        data = bytearray(f.read(end - start))
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        yield name, (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(info["shape"])


def _check_keys(path, own: dict, keys: set) -> None:
    missing, unexpected = sorted(set(own) - keys), sorted(keys - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the architecture of its repo's {OPEN_CLIP_CONFIG}: "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def build_image_encoder(models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor): the IP-Adapter's encoder; image_embeds in decoder space."""

    if check_builder(models) == "tiny" and pretrained(models):  # the smoke world's decoder-space encoder
        encoder = load_pretrained(CLIPVisionModelWithProjection, component_dir(models, "decoder_encoder"),
                                  dtype=dtype)
    elif check_builder(models) == "tiny":
        with seeded(models.seed):
            encoder = CLIPVisionModelWithProjection(tiny_image_encoder_config(models))
    else:
        require_weights(image_encoder_entry(models))
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            models.ip_adapter_id, subfolder=models.image_encoder_subfolder, dtype=dtype,
            cache_dir=hf_cache(), local_files_only=True)
    size = encoder.config.image_size
    # the processor diffusers' load_ip_adapter builds for this encoder (h94 ships no preprocessor config)
    processor = CLIPImageProcessor(size=size, crop_size=size)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False), processor


def tiny_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A CLIPTokenizer folder (vocab.json, merges.txt) written from the BPE vocabulary shipped inside open_clip."""

    folder = Path(cache_dir or kit_cache_dir()) / "tiny-clip-tokenizer"
    names = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
    if all((folder / n).is_file() for n in names):
        return folder
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # the slice open_clip and OpenAI CLIP use
    units = list(oct.bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # ids 49406, 49407 as in openai/clip-vit-large-patch14
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                             "do_lower_case": True, **special}),
        "special_tokens_map.json": json.dumps(special),
    }
    for name in names:  # content is deterministic, so per-file atomic writes are enough
        atomic_write(folder / name, files[name].encode("utf-8"))
    return folder


def build_tokenizer(cache_dir: str | os.PathLike | None = None):
    """SD-1.5's CLIPTokenizer, built offline (transformers 5 ignores vocab_file=, so load the folder)."""

    return CLIPTokenizer.from_pretrained(str(tiny_tokenizer_dir(cache_dir)))


SPACES = ("decoder", "verifier")


class EmbeddingError(RuntimeError):
    """An image cannot be read, an embedding is malformed (wrong dim, NaN/inf), or a store is incomplete."""


def expected_dim(space: str, models: ModelsConfig) -> int:
    """Embedding width of `space` under `models` (decoder_emb_dim or verifier_emb_dim)."""
    check_space(space)
    return models.decoder_emb_dim if space == "decoder" else models.verifier_emb_dim


def fingerprint(space: str, models: ModelsConfig) -> dict[str, Any]:
    """What determines the embeddings of `space` (model identity and width); chunks made otherwise are recomputed.
    Device and dtype are not part of it: a store made on a GPU in fp16 is reused on a CPU."""
    check_space(space)
    if space == "decoder":
        model = f"{models.ip_adapter_id}/{models.image_encoder_subfolder}"
    else:
        model = "/".join(models.verifier_clip)
    fp: dict[str, Any] = {"space": space, "builder": models.builder, "dim": expected_dim(space, models)}
    if models.builder == "tiny":
        fp["seed"] = models.seed
        fp["weights"] = weights_tag(models)  # random, or which pretrained smoke world
    else:
        fp["model"] = model
    return fp


class Encoder:
    """Images -> embeddings of one space. `transform` (picklable, PIL image -> (3, H, W) float tensor) runs in
    the data loader; `encode` (batched pixels -> (B, dim) float32 on CPU) runs the model."""

    space: str
    dim: int
    fingerprint: dict[str, Any]
    transform: Callable[[Any], torch.Tensor]
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._forward(pixels.to(device=self.device, dtype=self.dtype, non_blocking=True))
        return out.float().cpu()

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _HFTransform:
    """CLIPImageProcessor applied to one image (module-level class, so DataLoader workers can pickle it)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt").pixel_values[0]


class DecoderEncoder(Encoder):
    """IP-Adapter image encoder (CLIPVisionModelWithProjection) + its CLIPImageProcessor; output `.image_embeds`."""

    space = "decoder"

    def __init__(self, models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):

        self.model, processor = build_image_encoder(models, device=device, dtype=dtype)
        self.transform = _HFTransform(processor)
        self.dim, self.fingerprint = models.decoder_emb_dim, fingerprint("decoder", models)
        self.device, self.dtype = device, dtype
        got = self.model.config.projection_dim
        if got != self.dim:
            raise EmbeddingError(f"decoder space: the image encoder projects to {got} dims, but "
                                 f"models.decoder_emb_dim={self.dim}")

    def _forward(self, pixels):
        return self.model(pixel_values=pixels).image_embeds


class VerifierEncoder(Encoder):
    """open_clip verifier (ViT-bigG-14 in the paper) with its own preprocess; raw `encode_image`, not normalised."""

    space = "verifier"

    def __init__(self, models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):

        self.model, self.transform, _ = build_clip(models, "verifier", device=device, dtype=dtype, vision_only=True)
        self.dim, self.fingerprint = models.verifier_emb_dim, fingerprint("verifier", models)
        self.device, self.dtype = device, dtype

    def _forward(self, pixels):
        return self.model.encode_image(pixels, normalize=False)


def build_encoder(space: str, models: ModelsConfig, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Encoder:
    """The encoder of `space` ("decoder" | "verifier") built from `models` (tiny or Hub weights)."""
    check_space(space)
    return (DecoderEncoder if space == "decoder" else VerifierEncoder)(models, device, dtype)


def check_space(space: str) -> None:
    """Refuse a space other than "decoder" and "verifier"."""
    if space not in SPACES:
        raise ValueError(f"space={space!r}: valid spaces are {', '.join(SPACES)}")
