"""LoRA baselines' recipe (App G.1-G.2, Tables 3-4): buckets, data, captions, seeds and fingerprints."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import jobs as J
from ..config import LoraBaselineConfig, ModelsConfig, Profile, get_profile
from ..steps import notebook

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA script
ADAPTER_NAME = "rebeca_lora"  # peft name while training ("train" would shadow nn.Module.train)
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights reads
INFO_NAME = "adapter.json"  # fingerprint, spec, data size: written last inside the adapter folder
LOG_NAME = "training_log.json"
CAPTION_MODES = ("empty", "user_token", "llava")
TABLE3_MODES = ("paper", "reference")
FORMAT_VERSION = 2  # 2: crops seeded per sample (streamed data), not per step


@dataclass(frozen=True)
class LoraSpec:
    """One adapter's LoRA shape and schedule: rank r, scaling α, dropout, optimiser steps, warmup steps."""

    r: int
    alpha: int
    dropout: float
    steps: int
    warmup: int


@dataclass(frozen=True)
class Bucket:
    """A Table 3 row: users with n_min <= N_i <= n_max liked training images (n_max None: no upper bound)."""

    n_min: int
    n_max: int | None
    spec: LoraSpec

    @property
    def label(self) -> str:
        if self.n_min == 0:
            return f"N < {self.n_max + 1}"
        return f"N > {self.n_min - 1}" if self.n_max is None else f"{self.n_min} ≤ N ≤ {self.n_max}"


TABLE3 = (Bucket(0, 7, LoraSpec(8, 8, 0.10, 1200, 100)), Bucket(8, 24, LoraSpec(16, 16, 0.07, 1500, 120)),
          Bucket(25, 60, LoraSpec(32, 32, 0.05, 1700, 150)), Bucket(61, 120, LoraSpec(64, 64, 0.05, 2000, 200)),
          Bucket(121, None, LoraSpec(128, 128, 0.05, 2500, 200)))
# the reference code trains the top bucket with r = α = 32 (FLICKR-AES workers have ~920 ratings: a common bucket)
TABLE3_REFERENCE = TABLE3[:-1] + (replace(TABLE3[-1], spec=replace(TABLE3[-1].spec, r=32, alpha=32)),)
TABLE4 = LoraSpec(512, 512, 0.05, 10_000, 1_000)  # the shared adapter (App G.2); LoraBaselineConfig holds it as set


def shared_spec(cfg: LoraBaselineConfig) -> LoraSpec:
    """Table 4 as configured, after the shared_max_steps cap."""
    spec = LoraSpec(cfg.shared_r, cfg.shared_alpha, cfg.shared_dropout, cfg.shared_steps, cfg.shared_warmup)
    return capped(spec, cfg.shared_max_steps)


def lora_config(profile: str, overrides: dict[str, Any] | None = None) -> tuple[Profile, LoraBaselineConfig]:
    """(profile, its LoRA section) with dotted overrides ("lora.table3": "reference", ...), checked."""
    prof = get_profile(profile, overrides)
    check_config(prof.lora)
    return prof, prof.lora


def check_config(cfg: LoraBaselineConfig) -> None:
    """One clear error for a setting outside its valid values."""
    if cfg.table3 not in TABLE3_MODES:
        raise ValueError(f"lora.table3={cfg.table3!r}: valid values are {', '.join(TABLE3_MODES)}")
    if cfg.caption not in CAPTION_MODES:
        raise ValueError(f"lora.caption={cfg.caption!r}: valid values are {', '.join(CAPTION_MODES)}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError(f"lora.batch_size={cfg.batch_size} and lora.grad_accum={cfg.grad_accum} must be >= 1")


# ----------------------------------------------------------------------------------------------- buckets + data


def table3(mode: str = "paper") -> tuple[Bucket, ...]:
    """Table 3's buckets: the paper's, or the reference code's (r = α = 32 for N > 120)."""
    if mode not in TABLE3_MODES:
        raise ValueError(f"table3={mode!r}: valid values are {', '.join(TABLE3_MODES)}")
    return TABLE3 if mode == "paper" else TABLE3_REFERENCE


def bucket_for(n_images: int, mode: str = "paper") -> Bucket:
    """The Table 3 bucket of a user with `n_images` liked training images."""
    if n_images < 1:
        raise ValueError(f"a per-user LoRA needs at least one liked training image, got {n_images}")
    return next(b for b in table3(mode) if n_images >= b.n_min and (b.n_max is None or n_images <= b.n_max))


def capped(spec: LoraSpec, max_steps: int) -> LoraSpec:
    """`spec` with at most `max_steps` steps (0: unchanged), warmup scaled by the same factor (the schedule's shape)."""
    if max_steps <= 0 or max_steps >= spec.steps:
        return spec
    return replace(spec, steps=max_steps, warmup=round(spec.warmup * max_steps / spec.steps))


def bucket_counts(n_images: Sequence[int], mode: str = "paper"):
    """Table 3 with the number of users falling into each bucket (and their mean N_i)."""

    n = np.asarray(n_images)
    rows = []
    for b in table3(mode):
        inside = (n >= b.n_min) & (n <= (b.n_max if b.n_max is not None else np.inf))
        rows.append({"N_i range": b.label, "LoRA r": b.spec.r, "LoRA α": b.spec.alpha, "Dropout": b.spec.dropout,
                     "Steps": b.spec.steps, "Warmup": b.spec.warmup, "users": int(inside.sum()),
                     "mean N_i": float(n[inside].mean()) if inside.any() else float("nan")})
    return pd.DataFrame(rows)


def liked_training_rows(splits, user_ids: Sequence[int] | None = None):
    """(user_id, image) of the liked training-split ratings (R = 1; never validation or test), sorted."""
    sel = splits[(splits["split"] == "train") & splits["like"].astype(bool)]
    if user_ids is not None:
        sel = sel[sel["user_id"].isin([int(u) for u in user_ids])]
    return sel[["user_id", "image"]].sort_values(["user_id", "image"]).reset_index(drop=True)


def user_prompt(user_id: int) -> str:
    """The reference code's user-token prompt (the token is plain BPE text: the text encoder stays frozen)."""
    return f"<u{int(user_id)}> liked image."


def training_captions(rows, mode: str, captions_path: str | os.PathLike | None = None) -> list[str]:
    """One caption per (user_id, image) row: "" (empty), the user token, or the notebook-07 caption of the image."""
    if mode == "empty":
        return [""] * len(rows)
    if mode == "user_token":
        return [user_prompt(u) for u in rows["user_id"]]
    if mode != "llava":
        raise ValueError(f"caption={mode!r}: valid values are {', '.join(CAPTION_MODES)}")

    if captions_path is None or not Path(captions_path).is_file():
        raise FileNotFoundError(f"{captions_path}: caption='llava' needs the image captions of {notebook(7)}, "
                                f"a table with columns image and caption; run it first or use caption='empty'")
    table = pd.read_parquet(captions_path)
    if not {"image", "caption"} <= set(table.columns):
        raise ValueError(f"{captions_path}: expected columns image, caption; found {', '.join(table.columns)}")
    known = dict(zip(table["image"], table["caption"]))
    missing = sorted(set(rows["image"]) - set(known))
    if missing:
        raise ValueError(f"{captions_path}: no caption for {len(missing)} training image(s), e.g. {missing[0]}")
    return [str(known[i]) for i in rows["image"]]


def generation_prompt(user_id: int, mode: str) -> str:
    """Prompt at generation: empty for every method (§4.3), the user token only with caption='user_token'."""
    return user_prompt(user_id) if mode == "user_token" else ""


def adapter_seed(seed: int, user_id: int | None) -> int:
    """Seed of one adapter from (seed, user_id); user_id None is the shared adapter."""
    key = f"rebeca-lora:{int(seed)}:{'shared' if user_id is None else int(user_id)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")


def step_seed(seed: int, step: int) -> int:
    """Seed of optimiser step `step` of an adapter seeded `seed`: every draw of that step is keyed by it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:7], "big")


def sample_seed(seed: int, step: int, k: int) -> int:
    """Seed of the crop of training sample k (in optimiser step `step`): the same in any DataLoader worker."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:crop:{k}".encode()).digest()[:7], "big")


def models_id(models: ModelsConfig) -> dict:
    """The base model's identity in fingerprints (the tiny builder's seed fixes its weights)."""
    return {"builder": models.builder, "sd_id": models.sd_id, **({"seed": models.seed} if models.builder == "tiny" else {})}


def fingerprint(images: Sequence[str], captions: Sequence[str], spec: LoraSpec, cfg: LoraBaselineConfig,
                models: ModelsConfig, seed: int, resolution: int) -> str:
    """Hash of what determines an adapter: data rows, spec, recipe, base model, seed (not the device or dtype)."""
    recipe = {k: getattr(cfg, k) for k in ("lr", "weight_decay", "lr_scheduler", "batch_size", "grad_accum",
                                           "max_grad_norm", "caption")}
    payload = {"version": FORMAT_VERSION, "rows": sorted(zip(images, captions)), "spec": dataclasses.asdict(spec),
               "recipe": recipe, "resolution": resolution, "targets": TARGET_MODULES, "models": models_id(models),
               "seed": int(seed)}
    return J.fingerprint(payload)
