"""Aesthetics and overall quality (§4.3.2, §4.4, App K): LAION aesthetic predictor and HPSv2, loaded once, batched."""
from __future__ import annotations

import os
import pickle
from typing import Sequence, Union

import numpy as np
import open_clip
import torch
import torchvision.transforms.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import nn
from torchvision import transforms as T

from ..config import ModelsConfig
from ..models.architectures import AESTHETIC_EMB_DIM, tiny_clip_name
from ..models.encoders import build_clip, open_clip_from_repo, quiet_random_init
from ..models.weights import (
    aesthetic_head_entry,
    check_builder,
    clip_config_entry,
    hps_entry,
    require_weights,
)
from ..progress import tqdm
from ..runtime import seeded

ImageLike = Union[Image.Image, str, os.PathLike]

# improved-aesthetic-predictor's MLP: Linear layers at these Sequential indices, Dropouts in between
HEAD_SHAPES = {0: (1024, AESTHETIC_EMB_DIM), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}

HEAD_KEYS = frozenset(f"layers.{i}.{p}" for i in HEAD_SHAPES for p in ("weight", "bias"))

HPS_TINY_SEED_OFFSET = {"v2.0": 0, "v2.1": 1}  # the tiny v2.1 differs from v2.0, as the real checkpoints do


def _rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    with Image.open(image) as im:  # opened per batch, so long lists never hold every file open
        return im.convert("RGB")


def _batches(n: int, batch_size: int, desc: str, progress: bool | None):

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    bar = tqdm(total=n, desc=desc, unit="img", disable=(n <= batch_size) if progress is None else not progress)
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
        bar.update(min(batch_size, n - start))
    bar.close()


def _unit(x: torch.Tensor) -> torch.Tensor:
    # float32 and a zero norm left as is, as the predictor's `normalized` helper (l2[l2 == 0] = 1)
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


class LaionAestheticHead(nn.Module):
    """improved-aesthetic-predictor's MLP (sac+logos+ava1-l14-linearMSE): linear layers, no activations."""

    def __init__(self, input_size: int = AESTHETIC_EMB_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """The raw MLP, (n, 768) -> (n, 1), as the original module."""
        return self.layers(emb)

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """Aesthetic scores (n,) of CLIP image embeddings, L2-normalised first as the predictor was trained."""
        return self.layers(_unit(emb.to(self.layers[0].weight.device)))[:, 0]


def load_aesthetic_head(path: str | os.PathLike) -> LaionAestheticHead:
    """The LAION head from an official-layout checkpoint (keys layers.{0,2,4,6,7}.{weight,bias}), on CPU, eval."""
    # map_location: the official file was saved from CUDA tensors; weights_only: it is a plain state dict
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(state) != HEAD_KEYS:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a LAION aesthetic head checkpoint; expected keys {sorted(HEAD_KEYS)}, "
                         f"found {keys}. Delete it and fetch {ModelsConfig().aesthetic_head_url}")
    bad = [f"layers.{i}.weight {tuple(state[f'layers.{i}.weight'].shape)} != {s}" for i, s in HEAD_SHAPES.items()
           if tuple(state[f"layers.{i}.weight"].shape) != s or tuple(state[f"layers.{i}.bias"].shape) != s[:1]]
    if bad:
        raise ValueError(f"{path}: LAION head shapes differ from 768-1024-128-64-16-1: {'; '.join(bad)}")
    head = LaionAestheticHead()
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval().requires_grad_(False)


def build_aesthetic_head(models: ModelsConfig, head_path: str | os.PathLike | None = None) -> LaionAestheticHead:
    """The official head (hub, or any profile given head_path) or, tiny without head_path, the same MLP seeded."""
    if models.builder == "tiny" and head_path is None:
        # seeded random weights, not the official head: the tiny profile must run with nothing downloaded, and
        # the real head on a random tiny CLIP would only look meaningful
        with seeded(models.seed):
            return LaionAestheticHead().eval().requires_grad_(False)
    check_builder(models)
    # head_path, else $REBECA_AESTHETIC_HEAD, else the kit cache; fetched from its GitHub URL when missing and online
    path = require_weights(aesthetic_head_entry(models, head_path))[0]
    return load_aesthetic_head(path)


class AestheticScorer:
    """LAION aesthetic predictor: OpenAI CLIP ViT-L/14 image embedding, L2-normalised, through the linear MLP."""

    def __init__(self, clip: nn.Module, preprocess, head: LaionAestheticHead, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.clip, self.preprocess, self.device, self.dtype = clip, preprocess, device, dtype
        self.head = head  # float32 on CPU, as the original runs it on float embeddings; it costs nothing there

    @classmethod
    def from_models(cls, models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    head_path: str | os.PathLike | None = None) -> "AestheticScorer":
        """Builds CLIP (models.aesthetic_clip, or the tiny 768-d one) and the head once."""
        head = build_aesthetic_head(models, head_path)  # first: a missing 4 MB head fails before a 1.7 GB CLIP loads
        clip, preprocess, _ = build_clip(models, "aesthetic", device=device, dtype=dtype)
        return cls(clip, preprocess, head, device, dtype)

    def embed(self, images: Sequence[ImageLike], batch_size: int = 32, progress: bool | None = None) -> torch.Tensor:
        """Raw (unnormalised) CLIP image embeddings (n, 768), float32 on CPU."""
        out = []
        with torch.inference_mode():
            for sl in _batches(len(images), batch_size, "LAION aesthetic", progress):
                pixels = torch.stack([self.preprocess(_rgb(im)) for im in images[sl]])
                out.append(self.clip.encode_image(pixels.to(self.device, self.dtype)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, AESTHETIC_EMB_DIM)

    def score_embeddings(self, emb: torch.Tensor) -> np.ndarray:
        """Scores of precomputed CLIP ViT-L/14 image embeddings (normalised here)."""
        with torch.inference_mode():
            return self.head.score(torch.as_tensor(emb)).cpu().numpy().astype(np.float32)

    def score(self, images: Sequence[ImageLike], batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        """Aesthetic scores (n,) of PIL images or image paths; progress None = a bar when there is more than a batch."""
        return self.score_embeddings(self.embed(list(images), batch_size, progress))


class _ResizeMaxSize(nn.Module):
    # HPSv2's eval resize (hpsv2/src/open_clip/transform.py ResizeMaxSize): longest side to `size` (bicubic, on the
    # tensor, antialiased as current torchvision does by default), then zero-pad to a square; unlike the original it
    # also pads when the longest side already equals `size`, where the original would return a non-square tensor
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:

        h, w = img.shape[-2:]
        scale = self.size / max(h, w)
        if scale != 1.0:
            h, w = round(h * scale), round(w * scale)
            img = F.resize(img, [h, w], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = self.size - h, self.size - w
        return F.pad(img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)


def hps_transform(image_size: int):
    """HPSv2's preprocess_val: RGB, ToTensor, longest side to image_size + zero pad, OpenAI mean/std."""

    return T.Compose([_rgb, T.ToTensor(), _ResizeMaxSize(image_size),
                      T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


def load_hps_state(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads an HPS checkpoint ({"state_dict": ...}, keys optionally "module."-prefixed) into an open_clip CLIP."""

    try:  # memory-mapped: host RAM holds the model, not a second copy of the 2 GB checkpoint
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # hpsv2 itself loads with full pickle; fall back only for a file that is not plain tensors and containers
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an HPS checkpoint (no state_dict)")
    # a checkpoint saved from the DDP-wrapped model carries "module." on every key
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state.pop("attn_mask", None)  # a buffer older open_clip versions saved; the model rebuilds it
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: HPS checkpoint does not fit {type(model).__name__}: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    return model


def build_hps(models: ModelsConfig, version: str = "v2.0", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, preprocess, tokenizer): HPS's fine-tuned OpenCLIP (hub) or a seeded tiny one, with HPS's transform."""

    entry = hps_entry(models, version)  # validates version
    if check_builder(models) == "tiny":
        name = tiny_clip_name(models, "hps")
        with seeded(models.seed + HPS_TINY_SEED_OFFSET[version]), quiet_random_init():
            model = open_clip.create_model(name, pretrained=None)
    else:
        name = models.hps_clip[0]
        path = require_weights(entry)[0]
        # the architecture only, from the open_clip_config.json of the repo HPS fine-tuned (the checkpoint holds
        # both towers, so the base weights are not read); made on the device in the dtype, then filled
        config = require_weights(clip_config_entry(models.hps_clip))[0]
        model, _ = open_clip_from_repo(config, device, dtype)
        load_hps_state(model, path)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, hps_transform(model.visual.image_size[0]), open_clip.get_tokenizer(name)


class HPSScorer:
    """HPSv2: 100 x cosine(image features, prompt features) of HPS's fine-tuned OpenCLIP ViT-H-14."""

    # The hpsv2 package is not used: its score() reloads the 2 GB checkpoint on every call, scores one image at a
    # time, and its wheel ships without the tokenizer's BPE file; open_clip has the same architecture and BPE.

    def __init__(self, model: nn.Module, preprocess, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 version: str = "v2.0"):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.dtype, self.version = device, dtype, version

    @classmethod
    def from_models(cls, models: ModelsConfig, version: str = "v2.0", device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "HPSScorer":
        """Builds the HPS model (v2.0 or v2.1) once."""
        return cls(*build_hps(models, version, device, dtype), device=device, dtype=dtype, version=version)

    def encode_text(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text features (n, d), float32 on the model's device."""
        with torch.inference_mode():
            tokens = [self.tokenizer(list(prompts[i:i + batch_size])) for i in range(0, len(prompts), batch_size)]
            return torch.cat([_unit(self.model.encode_text(t.to(self.device))) for t in tokens])

    def score(self, images: Sequence[ImageLike], prompt: str | Sequence[str], batch_size: int = 32,
              progress: bool | None = None) -> np.ndarray:
        """HPS (n,) of PIL images or paths for one prompt or one prompt per image; hpsv2.score() returns this / 100."""
        images = list(images)
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt or one per image")
        unique = list(dict.fromkeys(prompts))  # each distinct prompt is encoded once
        text = self.encode_text(unique) if unique else None
        row = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([row[p] for p in prompts], dtype=torch.long, device=self.device)
        out = []
        with torch.inference_mode():
            for sl in _batches(len(images), batch_size, f"HPS{self.version}", progress):
                pixels = torch.stack([self.preprocess(im) for im in images[sl]])
                img = _unit(self.model.encode_image(pixels.to(self.device, self.dtype)))
                out.append((100.0 * (img * text[index[sl]]).sum(-1)).cpu())
        return torch.cat(out).numpy().astype(np.float32) if out else np.empty(0, np.float32)
