"""A LoRA's training images streamed from disk: one sample per (step, micro-batch, slot), decoded by DataLoader workers.

Sample k of an adapter (k = (step · grad_accum + micro) · batch_size + slot) is image order[k] of an epoch-wise
permutation seeded by (seed, epoch), its shorter side resized to the training resolution, and a random crop seeded
by (seed, step, k) with its own torch.Generator. Nothing depends on which worker decodes it, so the same seed gives
the same crops in the same order with any num_workers, and memory does not grow with the number of images.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .lora_recipe import sample_seed, step_seed

DEFAULT_WORKERS = 2  # decoding a 512² JPEG takes a few ms: two workers keep ahead of a UNet step


def check_images(paths: Sequence[str | os.PathLike]) -> None:
    """One clear error naming the first missing training image, before any step (a stat per file, no decoding)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: training image not found ({len(missing)} of {len(paths)} missing)")


def load_resized(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """uint8 (3, H, W), the shorter side resized to `resolution` (bilinear); the crop is drawn per sample."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()
    except (OSError, ValueError) as exc:
        raise OSError(f"{path}: cannot read training image ({str(exc).splitlines()[0]})") from None


def random_crop(img: torch.Tensor, res: int, g: torch.Generator) -> torch.Tensor:
    """A random `res` × `res` crop of a uint8 (3, H, W) image as floats in [-1, 1]."""
    top = int(torch.randint(0, img.shape[1] - res + 1, (1,), generator=g))
    left = int(torch.randint(0, img.shape[2] - res + 1, (1,), generator=g))
    return img[:, top:top + res, left:left + res].float() / 127.5 - 1.0


class Order:
    """Sample k's image: an epoch-wise permutation seeded by (seed, epoch), so it needs no saved state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.perms = n, seed, {}

    def __getitem__(self, k: int) -> int:
        e = k // self.n
        if e not in self.perms:  # one epoch cached: memory O(n) indices, never images
            self.perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(step_seed(self.seed, -1 - e)))}
        return int(self.perms[e][k % self.n])


class LoraImages(torch.utils.data.Dataset):
    """Sample k of an adapter's training stream: (crop of image order[k], its caption); read from disk on demand."""

    def __init__(self, paths: Sequence[str | os.PathLike], captions: Sequence[str], resolution: int, seed: int,
                 samples_per_step: int, n_samples: int):
        if len(paths) != len(captions) or not paths:
            raise ValueError(f"{len(paths)} images and {len(captions)} captions (need as many, >= 1)")
        self.paths, self.captions = [str(p) for p in paths], list(captions)
        self.res, self.seed, self.per_step, self.n = resolution, seed, samples_per_step, n_samples
        self.order = Order(len(self.paths), seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> tuple[torch.Tensor, str]:
        i = self.order[k]
        g = torch.Generator().manual_seed(sample_seed(self.seed, k // self.per_step, k))
        return random_crop(load_resized(self.paths[i], self.res), self.res, g), self.captions[i]


def loader(data: LoraImages, batch_size: int, start: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Micro-batches of samples start, start + 1, ... in order (a resumed run starts mid-stream)."""
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, sampler=range(start, len(data)), num_workers=num_workers,
        # a seeded generator: worker seeds are never drawn from (and never advance) the global RNG
        generator=torch.Generator().manual_seed(data.seed), prefetch_factor=2 if num_workers else None,
        persistent_workers=False, pin_memory=False)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
