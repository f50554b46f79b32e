"""Evaluation inputs shared by notebooks 08 and 10: every method's generated images, their embeddings, held-out
pools and cached per-image scores. A "method folder" is any notebook output folder holding a decoding
`generation_manifest.csv` (notebook 04 for REBECA; the LoRA and persona notebooks write the same layout)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .artifacts import atomic_path
from .config import ModelsConfig
from .decoding import MANIFEST_NAME, reencode
from .metrics import rebeca_label

GENERATORS = ("04_generate_images", "06_lora_baselines", "07_vlm_personas")  # notebooks that write method folders
# paper row names of the baselines (Table 2), by (method, setting) as the baseline notebooks name them
LABELS = {("lora", "shared"): "Shared LoRA", ("lora", "per_user"): "Per-user LoRA",
          ("persona", "vlm"): "VLM Persona", ("persona", "vlm_lora"): "VLM Persona + LoRA"}


def method_label(method: str, setting: str) -> str:
    """Row name of (method, setting): the paper's where it has one (e.g. 'REBECA (CFG=5.0)'), else 'method/setting'."""
    if method == "rebeca" and setting.startswith("prior_cfg"):
        return rebeca_label(float(setting[len("prior_cfg"):]))
    return LABELS.get((method, setting), f"{method}/{setting}")


def find_generated(profile_root: str | os.PathLike, folders: Sequence[str] = GENERATORS) -> tuple[pd.DataFrame, list[str]]:
    """(finished images of every method folder that exists, folders not found). Columns: folder, method, setting,
    label, user_id, index, seed, path (relative to the folder), file (absolute), sha256."""
    root = Path(profile_root)
    frames, missing = [], []
    for folder in folders:
        path = root / folder / MANIFEST_NAME
        if not path.is_file():
            missing.append(folder)
            continue
        df = pd.read_csv(path, keep_default_na=False)
        df = df[df["status"] == "ok"].copy()
        df.insert(0, "folder", folder)
        df["label"] = [method_label(m, s) for m, s in zip(df["method"], df["setting"])]
        df["file"] = [str(root / folder / p) for p in df["path"]]
        frames.append(df)
    cols = ["folder", "method", "setting", "label", "user_id", "index", "seed", "path", "file", "sha256"]
    images = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    return images, missing


def generated_embeddings(images: pd.DataFrame, profile_root: str | os.PathLike, space: str, models: ModelsConfig,
                         device: str = "auto") -> torch.Tensor:
    """(len(images), d) embeddings of `images` in `space`, from each folder's cached store (computed if absent)."""
    out = torch.empty(len(images), 0)
    folders = images["folder"].to_numpy()
    for folder in dict.fromkeys(folders):
        pos = np.flatnonzero(folders == folder)  # positions, whatever the DataFrame's index
        manifest = pd.read_csv(Path(profile_root) / folder / MANIFEST_NAME, keep_default_na=False)
        store = reencode(Path(profile_root) / folder, manifest, models, device, spaces=(space,), progress=False)[space]
        emb = store.lookup(images["path"].to_numpy()[pos].tolist())
        if out.shape[1] == 0:
            out = torch.empty(len(images), emb.shape[1])
        out[torch.as_tensor(pos)] = emb
    return out


def heldout_pool(splits: pd.DataFrame, names: Sequence[str], emb: torch.Tensor, split: Sequence[str] = ("test",),
                 include_holdout: bool = False) -> dict:
    """Per-user held-out pools P_u = likes ∪ dislikes (§4.4): {"user_id", "liked", "img_emb", "image"} rows."""
    row = {n: i for i, n in enumerate(names)}
    keep = splits["split"].isin(split).to_numpy().copy() & splits["image"].map(row).notna().to_numpy()
    if not include_holdout:
        keep &= ~splits["holdout"].to_numpy()
    sel = splits[keep]
    idx = torch.as_tensor(sel["image"].map(row).to_numpy(dtype=np.int64).copy())
    return {"user_id": sel["user_id"].to_numpy().copy(), "liked": sel["like"].to_numpy().astype(bool),
            "img_emb": emb[idx], "image": sel["image"].to_numpy().copy()}


def cached_scores(cache: str | os.PathLike, keys: Sequence[str], files: Sequence[str],
                  score_fn: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Scores of `files` keyed by content (`keys`, e.g. sha256): read from the parquet `cache`, the rest computed
    with score_fn(list of files) and added (atomic), so reruns and new methods only score new images."""
    cache = Path(cache)
    known = pd.read_parquet(cache) if cache.is_file() else pd.DataFrame({"key": [], "score": []})
    have = dict(zip(known["key"], known["score"]))
    todo = sorted({k: f for k, f in zip(keys, files) if k not in have}.items())
    if todo:
        new = np.asarray(score_fn([f for _, f in todo]), dtype=float).reshape(-1)
        if len(new) != len(todo):
            raise ValueError(f"score_fn returned {len(new)} scores for {len(todo)} images")
        have.update(zip([k for k, _ in todo], new))
        with atomic_path(cache) as tmp:
            pd.DataFrame({"key": list(have), "score": list(have.values())}).to_parquet(tmp, index=False)
    return np.array([have[k] for k in keys], dtype=float)
