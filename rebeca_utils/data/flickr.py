"""FLICKR-AES ratings: the on-disk format, a validating reader with one-line errors, a summary table."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import list_images

CSV_NAME = "FLICKR-AES_image_labeled_by_each_worker.csv"

SCORE_NAME = "FLICKR-AES_image_score.txt"

IMAGE_DIR = "40K"

CSV_HEADER = "worker, imagePair, score"


class DataError(ValueError):
    """Invalid dataset file; the message is one line, ``<path>:<line>: <what>``."""


def _fail(path: Path, lines: np.ndarray, what: str) -> None:
    extra = f" (and {len(lines) - 1} more such rows)" if len(lines) > 1 else ""
    raise DataError(f"{path}:{int(lines[0])}: {what}{extra}")


def image_names(root: str | os.PathLike) -> list[str]:
    """Sorted file names of the images in `<root>/40K/`; the position in this list is the image id."""
    try:
        return list_images(Path(root) / IMAGE_DIR)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None


def load_ratings(root: str | os.PathLike, like_threshold: int = 4, missing_images: str = "error",
                 duplicates: str = "first") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read and validate the FLICKR-AES ratings under `root`.

    Returns (ratings, report). ratings: one row per (worker, image), sorted by (user_id, image_id), columns
    user_id, worker, image_id, image, score (int), like (bool). Raises DataError ``<csv>:<line>: ...`` (line is
    1-based in the file, header = 1) for a missing column, an empty worker id or image name, a score that is not
    an integer 1-5, a rated image missing from 40K/ (``missing_images="drop"`` drops and counts them instead) and,
    with ``duplicates="error"``, a repeated (worker, image) pair (``"first"``/``"last"`` keep one and count).
    Blank lines are skipped. Nothing is written.
    """
    if missing_images not in ("error", "drop"):
        raise ValueError(f"missing_images={missing_images!r}: valid values are 'error', 'drop'")
    if duplicates not in ("first", "last", "error"):
        raise ValueError(f"duplicates={duplicates!r}: valid values are 'first', 'last', 'error'")
    root = Path(root)
    csv = root / CSV_NAME
    if not csv.is_file():
        raise DataError(f"{csv}: ratings file not found")
    names = image_names(root)

    try:
        raw = pd.read_csv(csv, sep=",", dtype=str, keep_default_na=False, skipinitialspace=True,
                          skip_blank_lines=False, engine="c")
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            raise DataError(f"{csv}:{m.group(2)}: expected {m.group(1)} fields, saw {m.group(3)}") from None
        raise DataError(f"{csv}: cannot parse CSV ({str(e).strip().splitlines()[0]})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv}:1: empty file, expected header '{CSV_HEADER}'") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing_cols = [c for c in ("worker", "imagePair", "score") if c not in raw.columns]
    if missing_cols:
        raise DataError(f"{csv}:1: missing column(s) {', '.join(repr(c) for c in missing_cols)}; "
                        f"header has {', '.join(repr(c) for c in raw.columns)}")
    n_read = len(raw)
    df = pd.DataFrame({"worker": raw["worker"].str.strip(), "image": raw["imagePair"].str.strip(),
                       "score_s": raw["score"].str.strip(), "line": np.arange(n_read, dtype=np.int64) + 2})
    blank = (df["worker"] == "") & (df["image"] == "") & (df["score_s"] == "")
    df = df[~blank]

    bad = df["worker"] == ""
    if bad.any():
        _fail(csv, df["line"][bad].to_numpy(), "empty worker id")
    bad = df["image"] == ""
    if bad.any():
        _fail(csv, df["line"][bad].to_numpy(), "empty imagePair")
    bad = ~df["score_s"].str.fullmatch(r"[1-5](?:\.0*)?")
    if bad.any():
        first = df[bad].iloc[0]
        _fail(csv, df["line"][bad].to_numpy(), f"score {first['score_s']!r} is not an integer 1-5")

    name_index = pd.Index(names)
    image_id = name_index.get_indexer(df["image"])
    miss = image_id < 0
    n_missing_rows = int(miss.sum())
    n_missing_images = int(df["image"][miss].nunique())
    if n_missing_rows:
        if missing_images == "error":
            first = df[miss].iloc[0]
            _fail(csv, df["line"][miss].to_numpy(),
                  f"image {first['image']!r} not found in {root / IMAGE_DIR}")
        df, image_id = df[~miss], image_id[~miss]
    df = df.assign(image_id=image_id.astype(np.int64))

    dup = df.duplicated(["worker", "image"], keep=False)
    n_dup_rows = int(df.duplicated(["worker", "image"], keep="first").sum())
    if n_dup_rows:
        if duplicates == "error":
            later = df.duplicated(["worker", "image"], keep="first")
            first = df[later].iloc[0]
            prev = df[dup & (df["worker"] == first["worker"]) & (df["image"] == first["image"])]["line"].iloc[0]
            _fail(csv, df["line"][later].to_numpy(),
                  f"duplicate rating of {first['image']!r} by worker {first['worker']!r} (first at line {prev})")
        df = df[~df.duplicated(["worker", "image"], keep=duplicates)]

    workers = np.sort(df["worker"].unique())
    out = pd.DataFrame({
        "user_id": pd.Index(workers).get_indexer(df["worker"]).astype(np.int64),
        "worker": df["worker"].to_numpy(dtype=object),
        "image_id": df["image_id"].to_numpy(),
        "image": df["image"].to_numpy(dtype=object),
        "score": df["score_s"].str.slice(0, 1).astype(np.int64).to_numpy(),
    })
    out["like"] = out["score"] >= like_threshold
    out = out.sort_values(["user_id", "image_id"], kind="stable").reset_index(drop=True)
    report = {
        "csv": str(csv), "rows_read": n_read, "blank_lines": int(blank.sum()),
        "users": len(workers), "images_in_folder": len(names), "images_rated": int(out["image_id"].nunique()),
        "ratings": len(out), "like_threshold": like_threshold,
        "like_rate": float(out["like"].mean()) if len(out) else 0.0,
        "missing_image_rows": n_missing_rows, "missing_images": n_missing_images, "missing_policy": missing_images,
        "duplicate_rows": n_dup_rows, "duplicate_policy": duplicates,
    }
    return out, report


def ratings_report(ratings: pd.DataFrame) -> pd.DataFrame:
    """Summary table (index = metric, column ``value``): users, images, ratings, like rate overall and per user
    (min/median/max), ratings per user (min/median/mean/max); with a ``split`` column also split sizes, users kept
    wholly in train, and hold-out workers."""
    per_user = ratings.groupby("user_id")
    n = per_user.size()
    lr = per_user["like"].mean()
    rows: list[tuple[str, Any]] = [
        ("users", int(ratings["user_id"].nunique())),
        ("images", int(ratings["image_id"].nunique())),
        ("ratings", len(ratings)),
        ("like rate", round(float(ratings["like"].mean()), 4)),
        ("like rate per user (min)", round(float(lr.min()), 4)),
        ("like rate per user (median)", round(float(lr.median()), 4)),
        ("like rate per user (max)", round(float(lr.max()), 4)),
        ("ratings per user (min)", int(n.min())),
        ("ratings per user (median)", float(n.median())),
        ("ratings per user (mean)", round(float(n.mean()), 2)),
        ("ratings per user (max)", int(n.max())),
    ]
    if "split" in ratings.columns:
        for s in ("train", "val", "test"):
            rows.append((f"ratings ({s})", int((ratings["split"] == s).sum())))
        has_test = ratings.groupby("user_id")["split"].apply(lambda x: (x == "test").any())
        rows.append(("users wholly in train (too few ratings)", int((~has_test).sum())))
    if "holdout" in ratings.columns:
        rows.append(("hold-out workers", int(ratings.loc[ratings["holdout"], "user_id"].nunique())))
    values = pd.Series([v for _, v in rows], dtype=object).to_numpy()
    return pd.DataFrame({"value": values}, index=pd.Index([k for k, _ in rows], name="metric"))
