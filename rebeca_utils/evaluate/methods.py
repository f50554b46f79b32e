"""Method folders (any notebook that decoded a manifest), their re-encoded images, held-out pools, score caches."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..config import ModelsConfig
from ..data.splits import join_embeddings
from ..io import atomic_path, write_json
from ..pipeline.embeddings import embed_images, space_dir
from ..pipeline.plan import MANIFEST_NAME
from ..steps import producers
from .paper import method_label

REENCODE_CHUNK = 4096  # images per embedding chunk when generated images are re-encoded


def reencode(out_dir: str | os.PathLike, manifest, models: ModelsConfig, device: str = "auto",
             spaces: Sequence[str] = ("decoder", "verifier"), progress: bool = True) -> dict:
    """Embed the manifest's finished images in the decoder and verifier spaces under <out_dir>/embeddings/<space>/.

    Cached and resumable like notebook 02; `sources.json` records each image's sha256, and a space whose images
    changed since (e.g. redecoded) is recomputed. Returns space -> store."""

    ok = manifest[manifest["status"] == "ok"].sort_values("path")
    names, sources = ok["path"].tolist(), dict(zip(ok["path"], ok["sha256"]))
    stores = {}
    for space in spaces:
        d = space_dir(Path(out_dir) / "embeddings", space)
        src = d / "sources.json"
        old = json.loads(src.read_text()) if src.is_file() else None
        if d.exists() and (old is None or any(old.get(n, h) != h for n, h in sources.items())):
            shutil.rmtree(d)  # embeddings of images that have since been replaced
        write_json(src, sources)
        store = embed_images(out_dir, names, space, models, Path(out_dir) / "embeddings", device=device,
                             chunk_size=REENCODE_CHUNK, progress=progress)
        store.merge()
        stores[space] = store
    return stores


GENERATORS = producers(MANIFEST_NAME)  # the notebooks that write method folders (04, 06, 07)


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
    rows, img_emb = join_embeddings(splits, (names, emb), split, include_holdout)
    sel = splits.iloc[rows]
    return {"user_id": sel["user_id"].to_numpy().copy(), "liked": sel["like"].to_numpy().astype(bool),
            "img_emb": img_emb, "image": sel["image"].to_numpy().copy()}


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


RANDOM_IMAGES_LABEL = "Random images (other users)"  # Table 2's floor row


def random_images_row(gen_user: Sequence[int], splits: pd.DataFrame, names: Sequence[str], emb: torch.Tensor,
                      seed: int = 0, split: Sequence[str] = ("train",)) -> np.ndarray:
    """Table 2's floor: each generated image of user u replaced by the embedding of a random `split` image that
    other users rated and u never did (seeded, users in sorted order). Rows follow gen_user; (len(gen_user), d)."""
    gen_user = np.asarray(gen_user)
    row = {n: i for i, n in enumerate(names)}
    pool = splits[splits["split"].isin(list(split))]
    candidates = np.array(sorted(set(pool["image"]) & set(row)))
    rated = splits.groupby("user_id")["image"].agg(lambda s: np.array(sorted(set(s))))
    rng = np.random.default_rng([seed, 0x2A])
    out = np.empty((len(gen_user), emb.shape[1]), dtype=np.float32)
    for u in np.unique(gen_user):
        allowed = candidates[~np.isin(candidates, rated.get(u, np.array([], dtype=candidates.dtype)))]
        if len(allowed) == 0:
            raise ValueError(f"random_images_row: no {'/'.join(split)} image left that user {u} has not rated")
        pos = np.flatnonzero(gen_user == u)
        picks = allowed[rng.integers(len(allowed), size=len(pos))]
        out[pos] = emb[[row[n] for n in picks]].numpy()
    return out
