"""Per-user train/val/test splits and hold-out workers, saved and reused; splits joined to embeddings."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..io import atomic_path
from ..runtime import seed_sequence
from .flickr import DataError, data_fingerprint, load_ratings, ratings_report
from .synthetic import write_synthetic_flickr

_SPLIT_COLUMNS = ["user_id", "worker", "image_id", "image", "score", "like", "split", "holdout"]


def make_splits(ratings: pd.DataFrame, n_test: int = 10, n_val: int = 10, n_holdout_workers: int = 37,
                seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Per user, `n_test` test and `n_val` validation ratings at random (seeded), the rest train.

    Users with fewer than n_test + n_val + 1 ratings go wholly to train (counted by `ratings_report`). Also picks
    `n_holdout_workers` hold-out workers (seeded, among users with enough ratings), returned as a sorted list and
    flagged in a ``holdout`` column; they keep their own split labels and are not excluded here — drop them
    (``df[~df.holdout]``) when training the main prior. Independent of the row order of `ratings`.
    """
    df = ratings.sort_values(["user_id", "image_id"], kind="stable").reset_index(drop=True)
    key = np.random.default_rng(seed_sequence(seed, "split_order")).random(len(df))
    rank = pd.Series(key).groupby(df["user_id"].to_numpy()).rank(method="first").to_numpy() - 1
    size = df.groupby("user_id")["user_id"].transform("size").to_numpy()
    eligible = size >= n_test + n_val + 1
    split = np.where(rank < n_test, "test", np.where(rank < n_test + n_val, "val", "train"))
    df["split"] = np.where(eligible, split, "train")

    workers = np.sort(df.loc[eligible, "worker"].unique())
    if n_holdout_workers > len(workers):  # e.g. the paper's 37 on a subset of FLICKR-AES
        n = len(workers)
        raise ValueError(f"{n_holdout_workers} hold-out workers asked but only {n} worker(s) are eligible (>= "
                         f"{n_test + n_val + 1} ratings: {n_test} test + {n_val} val + 1 train); set "
                         f"flickr.n_holdout_workers to at most {n} (runner: -p "
                         f"'overrides={{\"flickr.n_holdout_workers\": {n}}}')")
    pick = np.random.default_rng(seed_sequence(seed, "holdout_workers")).choice(len(workers), n_holdout_workers, replace=False)
    holdout = sorted(workers[pick].tolist())
    df["holdout"] = df["worker"].isin(holdout)
    return df, holdout


def save_splits(df: pd.DataFrame, holdout: list[str], path: str | os.PathLike,
                meta: dict[str, Any] | None = None) -> Path:
    """Write the split table to parquet atomically (temp file + os.replace); byte-identical for equal input.
    `holdout` is stored as the ``holdout`` column; `meta` (JSON-able, e.g. the split parameters) in the schema."""

    path = Path(path)
    missing = [c for c in _SPLIT_COLUMNS if c not in df.columns and c != "holdout"]
    if missing:
        raise ValueError(f"split table lacks column(s) {missing}")
    out = df.copy()
    out["holdout"] = out["worker"].isin(set(holdout))
    out = out[_SPLIT_COLUMNS].sort_values(["user_id", "image_id"], kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(out, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"rebeca_splits": json.dumps(meta or {}, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def load_splits(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """Read a table written by `save_splits`: (ratings with split/holdout columns, sorted hold-out workers)."""

    df = pq.read_table(path).to_pandas()
    missing = [c for c in _SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a split table (missing column(s) {missing})")
    return df, sorted(df.loc[df["holdout"], "worker"].unique().tolist())


def split_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta` dict stored by `save_splits`."""

    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(b"rebeca_splits", b"{}"))


def dataset_root(cfg, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """Where the FLICKR-AES files are: the fixture in notebook 02's folder (`cfg.synthetic`), else
    `data_dir`/FLICKR-AES. Derived, never stored, so a moved outputs/ or data/ folder keeps working."""
    if cfg.synthetic:
        return Path(out_dir) / "flickr_synthetic"
    if data_dir is None:
        raise ValueError("flickr.synthetic=False needs data_dir (the folder holding FLICKR-AES/)")
    return Path(data_dir) / "FLICKR-AES"


def prepare_flickr(cfg, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, seed: int = 0,
                   overwrite: bool = False, missing_images: str = "error",
                   duplicates: str = "auto") -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """Notebook entry point: data (``cfg.synthetic``: the fixture under `out_dir`/flickr_synthetic; else the real
    dataset under `data_dir`/FLICKR-AES) -> validated ratings -> splits saved at `out_dir`/flickr_splits.parquet.

    A saved table is reused only when it was made with the same parameters from the same data (sha256 of the
    ratings CSV and of the image-name list); otherwise DataError says what changed, unless `overwrite`. `cfg` is
    a FlickrConfig. Returns (splits, holdout, report table incl. duplicate and dropped-row counts). Nothing is
    written when validation fails."""
    out_dir = Path(out_dir)
    root = dataset_root(cfg, out_dir, data_dir)
    if cfg.synthetic:
        write_synthetic_flickr(root, cfg.n_workers, cfg.n_images, cfg.image_size, cfg.ratings_per_image, seed)
    params = {"like_threshold": cfg.like_threshold, "n_test": cfg.n_test, "n_val": cfg.n_val,
              "n_holdout_workers": cfg.n_holdout_workers, "seed": seed, "missing_images": missing_images,
              "duplicates": duplicates}
    inputs = data_fingerprint(root)
    path = out_dir / "flickr_splits.parquet"
    old = split_meta(path) if path.exists() and not overwrite else None
    if old is not None:
        _check_reuse(path, old, params, inputs)
        df, holdout = load_splits(path)
        loaded = old["ratings"]
    else:
        ratings, loaded = load_ratings(root, like_threshold=cfg.like_threshold, missing_images=missing_images,
                                       duplicates=duplicates)
        df, holdout = make_splits(ratings, cfg.n_test, cfg.n_val, cfg.n_holdout_workers, seed)
        keep = ("rows_read", "blank_lines", "duplicate_rows", "conflicting_duplicate_rows", "missing_image_rows",
                "missing_images")
        loaded = {k: loaded[k] for k in keep}
        save_splits(df, holdout, path, {"params": params, "inputs": inputs, "ratings": loaded})
    extra = pd.DataFrame({"value": pd.Series([loaded[k] for k in _LOAD_ROWS], dtype=object).to_numpy()},
                         index=pd.Index(list(_LOAD_ROWS.values()), name="metric"))
    return df, holdout, pd.concat([ratings_report(df), extra])


_LOAD_ROWS = {"duplicate_rows": "duplicate rows dropped", "conflicting_duplicate_rows": "of which conflicting",
              "missing_image_rows": "rows of missing images dropped"}


def _check_reuse(path: Path, old: dict[str, Any], params: dict[str, Any], inputs: dict[str, str]) -> None:
    """Refuse a saved split table made from other data or parameters, saying which and how to redo it."""
    redo = "rerun with overwrite=True (runner: -p overwrite=True) or delete it"
    if set(old) != {"params", "inputs", "ratings"}:
        raise DataError(f"{path}: made by an older version of the kit; {redo}")
    changed = [f"{k} {old['inputs'].get(k, '?')[:12]} -> {v[:12]}" for k, v in inputs.items()
               if old["inputs"].get(k) != v]
    if changed:
        raise DataError(f"{path} was made from other data ({'; '.join(changed)}, sha256); {redo}")
    diff = [f"{k}={old['params'].get(k)!r} -> {v!r}" for k, v in params.items() if old["params"].get(k) != v]
    if diff:
        raise DataError(f"{path} was made with other parameters ({', '.join(diff)}); {redo}")


def split_mask(splits: pd.DataFrame, split: str | Sequence[str] | None = None, include_holdout: bool = True) -> np.ndarray:
    """Boolean mask of the rows of `split` (a name, several, or None = all), hold-out workers unless excluded."""
    keep = np.ones(len(splits), dtype=bool)
    if split is not None:
        keep &= splits["split"].isin((split,) if isinstance(split, str) else tuple(split)).to_numpy()
    if not include_holdout:
        keep &= ~splits["holdout"].to_numpy(dtype=bool)
    return keep


def join_embeddings(splits: pd.DataFrame, store: Any, split: str | Sequence[str] | None = None,
                    include_holdout: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """(positions of the selected rows of `splits` whose image has an embedding, their (n, d) embeddings in order).

    `store`: a (names, (N, d) embeddings) pair as `load_embeddings` returns, or an object whose `.load()` does.
    Rows whose image has no embedding (e.g. it could not be read) are left out; compare with `split_mask` to count."""
    names, emb = store.load() if hasattr(store, "load") else store
    if len(names) != len(emb):
        raise ValueError(f"store has {len(names)} names but {len(emb)} embedding rows")
    row = pd.Index(names).get_indexer(splits["image"])
    pos = np.flatnonzero(split_mask(splits, split, include_holdout) & (row >= 0))
    return pos, torch.as_tensor(emb)[torch.as_tensor(row[pos], dtype=torch.long)]
