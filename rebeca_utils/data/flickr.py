"""FLICKR-AES ratings: the on-disk format, a validating reader with one-line errors, a summary table."""
from __future__ import annotations

import csv as csvlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import list_images, sha256

CSV_NAME = "FLICKR-AES_image_labeled_by_each_worker.csv"

SCORE_NAME = "FLICKR-AES_image_score.txt"

IMAGE_DIR = "40K"

CSV_HEADER = "worker, imagePair, score"

COLUMNS = ("worker", "imagePair", "score")

DUPLICATES = ("auto", "first", "last", "error")  # auto: drop exact repeats (keep the first), refuse conflicting ones


class DataError(ValueError):
    """Invalid dataset file; the message is one line, ``<path>:<line>: <what>``."""


def _fail(path: Path, lines: np.ndarray, what: str) -> None:
    extra = f" (and {len(lines) - 1} more such rows)" if len(lines) > 1 else ""
    raise DataError(f"{path}:{int(lines[0])}: {what}{extra}")


def _text_lines(path: Path) -> list[str]:
    """The file's lines (UTF-8, an optional BOM, LF or CRLF); a non-UTF-8 byte is a one-line error with its line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[start]:02x} at column {col}); "
                        "save the file as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _split_line(path: Path, n: int, line: str) -> list[str]:
    """Fields of one CSV line, stripped; a quote left open at the end of the line is an error (fields never span lines)."""
    if '"' not in line:  # the real file has no quotes: the fast path
        return [f.strip() for f in line.split(",")]
    try:
        return [f.strip() for f in next(csvlib.reader([line], strict=True, skipinitialspace=True))]
    except csvlib.Error as e:
        why = "an unclosed quote (a field cannot span lines)" if "end of data" in str(e) else f"bad quoting ({e})"
        raise DataError(f"{path}:{n}: {why}") from None


def _read_table(path: Path) -> tuple[list[str], pd.DataFrame, int]:
    """(header, rows as worker/image/score_s/line, blank lines skipped) of the ratings CSV, every field checked."""
    lines = _text_lines(path)
    if not lines or not lines[0].strip():
        raise DataError(f"{path}:1: empty file, expected header '{CSV_HEADER}'")
    header = _split_line(path, 1, lines[0])
    if "" in header:
        raise DataError(f"{path}:1: empty column name in the header (a trailing comma?)")
    repeated = [c for c in dict.fromkeys(header) if header.count(c) > 1]
    if repeated:  # which of two 'score' columns holds the scores is a guess: refuse it
        n = header.count(repeated[0])
        raise DataError(f"{path}:1: column {repeated[0]!r} appears {'twice' if n == 2 else f'{n} times'} "
                        "in the header")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(repr(c) for c in missing)}; "
                        f"header has {', '.join(repr(c) for c in header)}")
    pos = [header.index(c) for c in COLUMNS]
    rows, line_no, blank = [], [], 0
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            blank += 1
            continue
        f = _split_line(path, n, line)
        if len(f) != len(header):
            hint = " (a trailing comma?)" if len(f) == len(header) + 1 and f[-1] == "" else ""
            raise DataError(f"{path}:{n}: expected {len(header)} fields, saw {len(f)}{hint}")
        rows.append([f[i] for i in pos])
        line_no.append(n)
    if not rows:
        raise DataError(f"{path}:1: no ratings after the header")
    df = pd.DataFrame(rows, columns=["worker", "image", "score_s"], dtype=object)
    return header, df.assign(line=np.asarray(line_no, dtype=np.int64)), blank


_BAD_CHARS = r"[\x00-\x1f\x7f/\\]"  # control characters and path separators

_IMAGE_NAME = re.compile(r"[^\x00-\x1f\x7f/\\]+\.(?:jpe?g|png)", re.IGNORECASE)


def _check_fields(path: Path, df: pd.DataFrame) -> None:
    """Worker ids, image names and scores, each failure as `path:line: what (and N more such rows)`."""
    checks = [
        (df["worker"] == "", lambda r: "empty worker id"),
        (df["worker"].str.contains(_BAD_CHARS), lambda r: f"worker id {r['worker']!r} contains a control character "
                                                           "or path separator"),
        (df["image"] == "", lambda r: "empty imagePair"),
        (~df["image"].str.fullmatch(_IMAGE_NAME.pattern, case=False),
         lambda r: f"imagePair {r['image']!r} is not an image file name in {IMAGE_DIR}/ (name.jpg, no folders)"),
        (~df["score_s"].str.fullmatch(r"[1-5]"), lambda r: f"score {r['score_s']!r} is not an integer 1-5"),
    ]
    for bad, what in checks:
        if bad.any():
            _fail(path, df["line"][bad].to_numpy(), what(df[bad].iloc[0]))


def _dedupe(path: Path, df: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, int, int]:
    """Drop repeated (worker, image) rows by `policy`; (rows kept, duplicate rows, of which conflicting)."""
    key = ["worker", "image"]
    later = df.duplicated(key, keep="first")
    if not later.any():
        return df, 0, 0
    conflict = later & (df["score_s"] != df.groupby(key)["score_s"].transform("first"))  # differs from the first
    n_dup, n_conflict = int(later.sum()), int(conflict.sum())
    bad = conflict if policy == "auto" else later if policy == "error" else None
    if bad is not None and bad.any():
        r = df[bad].iloc[0]
        prev = df[~later & (df["worker"] == r["worker"]) & (df["image"] == r["image"])].iloc[0]
        what = (f"worker {r['worker']!r} rated {r['image']!r} {r['score_s']} here and {prev['score_s']} at line "
                f"{prev['line']}; choose duplicates='first' or 'last' to keep one" if policy == "auto" else
                f"duplicate rating of {r['image']!r} by worker {r['worker']!r} (first at line {prev['line']})")
        _fail(path, df["line"][bad].to_numpy(), what)
    keep = "first" if policy in ("auto", "error") else policy
    return df[~df.duplicated(key, keep=keep)], n_dup, n_conflict


def image_names(root: str | os.PathLike) -> list[str]:
    """Sorted file names of the images in `<root>/40K/`; the position in this list is the image id."""
    try:
        return list_images(Path(root) / IMAGE_DIR)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None


def data_fingerprint(root: str | os.PathLike) -> dict[str, str]:
    """What the ratings table depends on: sha256 of the ratings CSV and of the sorted image-name list of 40K/."""
    root = Path(root)
    names = "\n".join(image_names(root)).encode()
    return {CSV_NAME: sha256(root / CSV_NAME), f"{IMAGE_DIR}/ (file names)": hashlib.sha256(names).hexdigest()}


def load_ratings(root: str | os.PathLike, like_threshold: int = 4, missing_images: str = "error",
                 duplicates: str = "auto") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read and validate the FLICKR-AES ratings under `root`.

    Returns (ratings, report). ratings: one row per (worker, image), sorted by (user_id, image_id), columns
    user_id, worker, image_id, image, score (int), like (bool). Raises DataError ``<csv>:<line>: ...`` (line is
    1-based in the file, header = 1) for bytes that are not UTF-8, a quote left open, a wrong field count, a
    missing column, an empty or malformed worker id or image name, a score that is not one of 1-5 (``3.0`` is
    refused too: the real file has integers), a rated image missing from 40K/ (``missing_images="drop"`` drops
    and counts them instead) and a repeated (worker, image) pair with a different score (``duplicates="auto"``;
    exact repeats are dropped and counted; ``"first"``/``"last"`` keep one of any repeat, ``"error"`` refuses
    every repeat). Blank lines are skipped. Nothing is written.
    """
    if missing_images not in ("error", "drop"):
        raise ValueError(f"missing_images={missing_images!r}: valid values are 'error', 'drop'")
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates={duplicates!r}: valid values are {', '.join(map(repr, DUPLICATES))}")
    root = Path(root)
    csv = root / CSV_NAME
    if not csv.is_file():
        raise DataError(f"{csv}: ratings file not found")
    names = image_names(root)

    _, df, blank = _read_table(csv)
    n_read = len(df)
    _check_fields(csv, df)

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
    df, n_dup_rows, n_conflicts = _dedupe(csv, df, duplicates)

    workers = np.sort(df["worker"].unique())
    out = pd.DataFrame({
        "user_id": pd.Index(workers).get_indexer(df["worker"]).astype(np.int64),
        "worker": df["worker"].to_numpy(dtype=object),
        "image_id": df["image_id"].to_numpy(),
        "image": df["image"].to_numpy(dtype=object),
        "score": df["score_s"].astype(np.int64).to_numpy(),
    })
    out["like"] = out["score"] >= like_threshold
    out = out.sort_values(["user_id", "image_id"], kind="stable").reset_index(drop=True)
    report = {
        "csv": str(csv), "rows_read": n_read, "blank_lines": blank,
        "users": len(workers), "images_in_folder": len(names), "images_rated": int(out["image_id"].nunique()),
        "ratings": len(out), "like_threshold": like_threshold,
        "like_rate": float(out["like"].mean()) if len(out) else 0.0,
        "missing_image_rows": n_missing_rows, "missing_images": n_missing_images, "missing_policy": missing_images,
        "duplicate_rows": n_dup_rows, "conflicting_duplicate_rows": n_conflicts, "duplicate_policy": duplicates,
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
