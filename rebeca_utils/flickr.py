"""FLICKR-AES: a synthetic stand-in in the real on-disk format, a validating reader, and per-user splits.

On-disk format (real and synthetic)::

    <root>/40K/farm1_27_96361207_c200595017.jpg ...
    <root>/FLICKR-AES_image_labeled_by_each_worker.csv   header "worker, imagePair, score"; rows "WORKER,image.jpg,3"
    <root>/FLICKR-AES_image_score.txt                    "<image name> <mean score>" per line

Ids are stable: ``user_id`` = index of the worker in sorted worker order (of the validated ratings);
``image_id`` = index in the sorted names of *all* image files in ``40K/`` (so ids do not move when ratings
are filtered). ``like = score >= like_threshold`` (4, the paper's binarisation).
"""
from __future__ import annotations

import colorsys
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CSV_NAME = "FLICKR-AES_image_labeled_by_each_worker.csv"
SCORE_NAME = "FLICKR-AES_image_score.txt"
IMAGE_DIR = "40K"
CSV_HEADER = "worker, imagePair, score"
MARKER_NAME = ".rebeca_synthetic.json"
FIXTURE_VERSION = 1
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

# planted attributes of the synthetic images
HUES = {"red": 0.0, "yellow": 52.0, "green": 125.0, "blue": 220.0}  # degrees
TEXTURES = ("stripes", "dots", "plain")
LAYOUTS = ("centre", "corner")
ATTRIBUTES = {"hue": tuple(HUES), "texture": TEXTURES, "layout": LAYOUTS}

TARGET_LIKE_RATE = 0.335  # real FLICKR-AES: 30-37 % of ratings are >= 4
MIN_RATINGS_PER_WORKER = 30  # 10 test + 10 val + >= 10 train
_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
_SPLIT_COLUMNS = ["user_id", "worker", "image_id", "image", "score", "like", "split", "holdout"]


class DataError(ValueError):
    """Invalid dataset file; the message is one line, ``<path>:<line>: <what>``."""


# ----------------------------------------------------------------------------------------------
# Part 1: synthetic fixture
# ----------------------------------------------------------------------------------------------

def _fixture_params(n_workers: int, n_images: int, image_size: int, ratings_per_image: int, seed: int) -> dict:
    return {"version": FIXTURE_VERSION, "n_workers": int(n_workers), "n_images": int(n_images),
            "image_size": int(image_size), "ratings_per_image": int(ratings_per_image), "seed": int(seed)}


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_synthetic_flickr(root: str | os.PathLike, n_workers: int = 24, n_images: int = 400, image_size: int = 64,
                           ratings_per_image: int = 5, seed: int = 0) -> Path:
    """Write a synthetic FLICKR-AES (same file format) with planted attributes and worker preferences.

    Deterministic for given parameters (byte-identical files). Built in a temp dir next to `root`, then renamed
    into place; if `root` already holds a fixture written with the same parameters, returns at once. A fixture
    with other parameters is replaced; a non-empty folder without the marker is refused.
    """
    root = Path(root)
    params = _fixture_params(n_workers, n_images, image_size, ratings_per_image, seed)
    if n_workers < 1 or n_images < 1 or image_size < 8:
        raise ValueError(f"need n_workers >= 1, n_images >= 1, image_size >= 8 (got {params})")
    if not 1 <= ratings_per_image <= n_workers:
        raise ValueError(f"ratings_per_image={ratings_per_image} must be in 1..n_workers={n_workers}")
    marker = _read_marker(root)
    if marker is not None and marker.get("params") == params:
        return root
    if root.exists() and marker is None and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not a synthetic FLICKR-AES fixture; refusing to overwrite")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _build_fixture(tmp, params)
        if root.exists():  # empty dir or a fixture with other parameters: swap it out
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "x")
            try:
                os.replace(tmp, root)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, root)
            except OSError:  # someone else finished first
                if (_read_marker(root) or {}).get("params") != params:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def synthetic_truth(root: str | os.PathLike) -> dict[str, Any]:
    """Planted ground truth of a synthetic fixture: ``params``, ``attributes`` {image: {hue, texture, layout}},
    ``preferences`` {worker: {attribute: value}} and ``p_like`` {worker: [p_no_match, p_full_match]};
    P(like) = p_no_match + (p_full_match - p_no_match) * f**2, f = fraction of the worker's preferences matched
    (`match_fraction`); squared so a full match stands out from a partial one."""
    marker = _read_marker(Path(root))
    if marker is None:
        raise FileNotFoundError(f"{Path(root) / MARKER_NAME}: not a synthetic FLICKR-AES fixture")
    return marker


def match_fraction(truth: dict[str, Any], worker: str, image: str) -> float:
    """Fraction of `worker`'s preferred attribute values that `image` carries (0..1)."""
    prefs = truth["preferences"][worker]
    attrs = truth["attributes"][image]
    return sum(attrs[a] == v for a, v in prefs.items()) / len(prefs)


def _unique_strings(make, n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        for s in make(n - len(out)):
            if s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == n:
                    break
    return out


def _worker_ids(rng: np.random.Generator, n: int) -> list[str]:
    # AMT-style: 13 upper-case alphanumerics, starting with 'A'
    return _unique_strings(lambda m: ["A" + "".join(rng.choice(_ID_CHARS, 12)) for _ in range(m)], n)


def _image_names(rng: np.random.Generator, n: int) -> list[str]:
    def make(m):
        farm = rng.integers(1, 10, m)
        server = rng.integers(1, 8000, m)
        photo = rng.integers(10**7, 3 * 10**10, m)
        secret = rng.integers(0, 16**10, m)
        return [f"farm{f}_{s}_{p}_{c:010x}.jpg" for f, s, p, c in zip(farm, server, photo, secret)]
    return _unique_strings(make, n)


def _target_counts(rng: np.random.Generator, n_workers: int, n_images: int, k: int) -> np.ndarray:
    """Ratings per worker: a floor of MIN_RATINGS_PER_WORKER (or the even share if smaller), rest ~ activity."""
    total = n_images * k
    base = min(total // n_workers, MIN_RATINGS_PER_WORKER)
    weights = rng.lognormal(0.0, 0.6, n_workers)
    counts = np.full(n_workers, base, dtype=np.int64)
    rest = total - counts.sum()
    while rest > 0:
        room = n_images - counts
        w = np.where(room > 0, weights, 0.0)
        share = w / w.sum() * rest
        add = np.minimum(np.floor(share).astype(np.int64), room)
        left = rest - add.sum()
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        for j in order:  # largest remainders get the leftover units
            if left == 0:
                break
            if add[j] < room[j]:
                add[j] += 1
                left -= 1
        counts += add
        rest = total - counts.sum()
    return counts


def _assign(rng: np.random.Generator, counts: np.ndarray, n_images: int, k: int) -> np.ndarray:
    """(n_images, k) distinct workers per image with exact per-worker totals `counts` (sum = n_images*k)."""
    q = counts.astype(np.int64).copy()
    out = np.empty((n_images, k), dtype=np.int64)
    idx = np.arange(len(q))
    for i in range(n_images):
        r = n_images - i
        forced = idx[q >= r]  # must rate every remaining image; at most k of them since sum(q) = r*k
        need = k - len(forced)
        picked = forced
        if need:
            cand = idx[(q > 0) & (q < r)]
            p = q[cand] / q[cand].sum()
            picked = np.concatenate([forced, rng.choice(cand, size=need, replace=False, p=p)])
        out[i] = picked
        q[picked] -= 1
    return out


def _draw_image(rng: np.random.Generator, attrs: dict[str, str], size: int) -> np.ndarray:
    """uint8 RGB image: hue-coloured background, texture over it, a white/black object at centre or corner."""
    c = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    hue = (HUES[attrs["hue"]] + rng.uniform(-8, 8)) % 360 / 360
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 0.9), rng.uniform(0.8, 0.95)))
    tex = attrs["texture"]
    if tex == "stripes":
        ang = np.deg2rad(rng.choice([0, 45, 90, 135]) + rng.uniform(-10, 10))
        period = rng.uniform(0.12, 0.18)
        phase = ((xx * np.cos(ang) + yy * np.sin(ang)) / period + rng.uniform()) % 1.0
        shade = np.where(phase < 0.5, 1.0, 0.45)
    elif tex == "dots":
        period = rng.uniform(0.14, 0.2)
        off = rng.uniform(0, period, 2)
        dx = (xx - off[0]) % period - period / 2
        dy = (yy - off[1]) % period - period / 2
        shade = np.where(np.hypot(dx, dy) < 0.28 * period, 0.4, 1.0)
    else:
        ang = rng.uniform(0, 2 * np.pi)
        shade = 0.93 + 0.07 * (xx * np.cos(ang) + yy * np.sin(ang))
    img = base[None, None, :] * shade[..., None]
    rad = rng.uniform(0.13, 0.19)
    if attrs["layout"] == "centre":
        cx, cy = 0.5 + rng.uniform(-0.04, 0.04, 2)
    else:
        m = rad + 0.04
        cx, cy = rng.choice([m, 1 - m], 2)
    if rng.uniform() < 0.5:
        mask = np.hypot(xx - cx, yy - cy) < rad
    else:
        mask = (np.abs(xx - cx) < rad * 0.9) & (np.abs(yy - cy) < rad * 0.9)
    img[mask] = 0.96 if rng.uniform() < 0.6 else 0.06
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _build_fixture(out: Path, params: dict) -> None:
    from PIL import Image

    nw, ni, size, k, seed = (params[x] for x in ("n_workers", "n_images", "image_size", "ratings_per_image", "seed"))
    ss = np.random.SeedSequence([seed, 0x5EBECA])
    r_names, r_attr, r_pref, r_assign, r_rate, r_order, r_pix = (np.random.default_rng(s) for s in ss.spawn(7))

    workers = _worker_ids(r_names, nw)
    images = _image_names(r_names, ni)
    attr_keys = list(ATTRIBUTES)
    attr_idx = np.stack([r_attr.integers(0, len(ATTRIBUTES[a]), ni) for a in attr_keys], axis=1)  # (ni, 3)

    # worker preferences: 1-2 attributes, one preferred value each
    prefs: list[dict[str, int]] = []
    for _ in range(nw):
        n_pref = int(r_pref.integers(1, 3))
        chosen = sorted(r_pref.choice(len(attr_keys), n_pref, replace=False).tolist())
        prefs.append({attr_keys[a]: int(r_pref.integers(0, len(ATTRIBUTES[attr_keys[a]]))) for a in chosen})

    counts = _target_counts(r_assign, nw, ni, k)
    assign = _assign(r_assign, counts, ni, k)  # (ni, k) worker indices
    img_of = np.repeat(np.arange(ni), k)
    wk_of = assign.reshape(-1)

    # (fraction of each worker's preferences matched by each rated image) ** 2
    frac = np.zeros(len(img_of))
    for w in range(nw):
        sel = wk_of == w
        hits = sum((attr_idx[img_of[sel], attr_keys.index(a)] == v).astype(float) for a, v in prefs[w].items())
        frac[sel] = (hits / len(prefs[w])) ** 2  # partial matches count little

    # calibrate per-worker like probabilities: worker target like rates around TARGET_LIKE_RATE
    target = r_rate.uniform(0.2, 0.47, nw)
    target = np.clip(target - (np.sum(target * counts) / counts.sum() - TARGET_LIKE_RATE), 0.1, 0.7)
    p_lo = np.empty(nw)
    p_hi = np.empty(nw)
    for w in range(nw):
        m = frac[wk_of == w].mean()
        lo = min(0.05, target[w] / 2)
        if m <= 0 or m >= 1:
            lo = hi = target[w]
        else:
            hi = lo + (target[w] - lo) / m
            if hi > 0.95:
                hi = 0.95
                lo = max(0.02, (target[w] - hi * m) / (1 - m))
        p_lo[w], p_hi[w] = lo, hi
    p = p_lo[wk_of] + (p_hi[wk_of] - p_lo[wk_of]) * frac
    like = r_rate.uniform(size=len(p)) < p
    score = np.where(like, r_rate.choice([4, 5], len(p), p=[0.65, 0.35]),
                     r_rate.choice([1, 2, 3], len(p), p=[0.12, 0.33, 0.55]))

    # images
    img_dir = out / IMAGE_DIR
    img_dir.mkdir()
    for i, name in enumerate(images):
        attrs = {a: ATTRIBUTES[a][attr_idx[i, j]] for j, a in enumerate(attr_keys)}
        arr = _draw_image(np.random.default_rng([seed, 7, i]), attrs, size)
        Image.fromarray(arr, "RGB").save(img_dir / name, format="JPEG", quality=90, optimize=False,
                                         progressive=False, subsampling=2)

    # ratings CSV, grouped by worker (workers in a random order), like the real file
    worker_order = r_order.permutation(nw)
    row_order = np.concatenate([r_order.permutation(np.flatnonzero(wk_of == w)) for w in worker_order])
    w_arr = np.array(workers, dtype=object)[wk_of[row_order]]
    i_arr = np.array(images, dtype=object)[img_of[row_order]]
    lines = [CSV_HEADER] + [f"{w},{im},{s}" for w, im, s in zip(w_arr, i_arr, score[row_order])]
    (out / CSV_NAME).write_text("\n".join(lines) + "\n")

    means = np.bincount(img_of, weights=score, minlength=ni) / np.bincount(img_of, minlength=ni)
    order = sorted(range(ni), key=images.__getitem__)
    (out / SCORE_NAME).write_text("".join(f"{images[i]} {_fmt_mean(means[i])}\n" for i in order))

    marker = {
        "params": params,
        "attributes": {images[i]: {a: ATTRIBUTES[a][attr_idx[i, j]] for j, a in enumerate(attr_keys)}
                       for i in range(ni)},
        "preferences": {workers[w]: {a: ATTRIBUTES[a][v] for a, v in prefs[w].items()} for w in range(nw)},
        "p_like": {workers[w]: [round(float(p_lo[w]), 6), round(float(p_hi[w]), 6)] for w in range(nw)},
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, sort_keys=True, indent=1) + "\n")  # last: marks completion


def _fmt_mean(x: float) -> str:
    s = f"{x:.6f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


# ----------------------------------------------------------------------------------------------
# Part 2: reader / validator
# ----------------------------------------------------------------------------------------------

def _fail(path: Path, lines: np.ndarray, what: str) -> None:
    extra = f" (and {len(lines) - 1} more such rows)" if len(lines) > 1 else ""
    raise DataError(f"{path}:{int(lines[0])}: {what}{extra}")


def list_images(root: str | os.PathLike) -> list[str]:
    """Sorted file names of the images in `<root>/40K/`; the position in this list is the image id."""
    d = Path(root) / IMAGE_DIR
    if not d.is_dir():
        raise DataError(f"{d}: image folder not found")
    with os.scandir(d) as it:
        return sorted(e.name for e in it if e.name.lower().endswith(IMAGE_EXTS) and e.is_file())


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
    names = list_images(root)

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


# ----------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------

def make_splits(ratings: pd.DataFrame, n_test: int = 10, n_val: int = 10, n_holdout_workers: int = 37,
                seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Per user, `n_test` test and `n_val` validation ratings at random (seeded), the rest train.

    Users with fewer than n_test + n_val + 1 ratings go wholly to train (counted by `ratings_report`). Also picks
    `n_holdout_workers` hold-out workers (seeded, among users with enough ratings), returned as a sorted list and
    flagged in a ``holdout`` column; they keep their own split labels and are not excluded here — drop them
    (``df[~df.holdout]``) when training the main prior. Independent of the row order of `ratings`.
    """
    df = ratings.sort_values(["user_id", "image_id"], kind="stable").reset_index(drop=True)
    key = np.random.default_rng([seed, 1]).random(len(df))
    rank = pd.Series(key).groupby(df["user_id"].to_numpy()).rank(method="first").to_numpy() - 1
    size = df.groupby("user_id")["user_id"].transform("size").to_numpy()
    eligible = size >= n_test + n_val + 1
    split = np.where(rank < n_test, "test", np.where(rank < n_test + n_val, "val", "train"))
    df["split"] = np.where(eligible, split, "train")

    workers = np.sort(df.loc[eligible, "worker"].unique())
    if n_holdout_workers > len(workers):
        raise ValueError(f"n_holdout_workers={n_holdout_workers} but only {len(workers)} workers have "
                         f">= {n_test + n_val + 1} ratings")
    pick = np.random.default_rng([seed, 2]).choice(len(workers), n_holdout_workers, replace=False)
    holdout = sorted(workers[pick].tolist())
    df["holdout"] = df["worker"].isin(holdout)
    return df, holdout


def save_splits(df: pd.DataFrame, holdout: list[str], path: str | os.PathLike,
                meta: dict[str, Any] | None = None) -> Path:
    """Write the split table to parquet atomically (temp file + os.replace); byte-identical for equal input.
    `holdout` is stored as the ``holdout`` column; `meta` (JSON-able, e.g. the split parameters) in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_splits(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """Read a table written by `save_splits`: (ratings with split/holdout columns, sorted hold-out workers)."""
    import pyarrow.parquet as pq

    df = pq.read_table(path).to_pandas()
    missing = [c for c in _SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a split table (missing column(s) {missing})")
    return df, sorted(df.loc[df["holdout"], "worker"].unique().tolist())


def split_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta` dict stored by `save_splits`."""
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(b"rebeca_splits", b"{}"))


def prepare_flickr(cfg, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, seed: int = 0,
                   overwrite: bool = False, missing_images: str = "error",
                   duplicates: str = "first") -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """Notebook entry point: data (``cfg.synthetic``: the fixture under `out_dir`/flickr_synthetic; else the real
    dataset under `data_dir`/FLICKR-AES) -> validated ratings -> splits saved at `out_dir`/flickr_splits.parquet,
    reused when present with the same parameters (else an error unless `overwrite`). `cfg` is a FlickrConfig.
    Returns (splits, holdout, report table). Nothing is written when validation fails."""
    out_dir = Path(out_dir)
    if cfg.synthetic:
        root = write_synthetic_flickr(out_dir / "flickr_synthetic", cfg.n_workers, cfg.n_images, cfg.image_size,
                                      cfg.ratings_per_image, seed)
    elif data_dir is None:
        raise ValueError("flickr.synthetic=False needs data_dir (the folder holding FLICKR-AES/)")
    else:
        root = Path(data_dir) / "FLICKR-AES"
    meta = {"data": str(root), "like_threshold": cfg.like_threshold, "n_test": cfg.n_test, "n_val": cfg.n_val,
            "n_holdout_workers": cfg.n_holdout_workers, "seed": seed, "missing_images": missing_images,
            "duplicates": duplicates}
    path = out_dir / "flickr_splits.parquet"
    if path.exists() and not overwrite:
        old = split_meta(path)
        if old != meta:
            raise ValueError(f"{path} was made with {old}, not {meta}; delete it or pass overwrite=True")
        df, holdout = load_splits(path)
    else:
        ratings, _ = load_ratings(root, like_threshold=cfg.like_threshold, missing_images=missing_images,
                                  duplicates=duplicates)
        df, holdout = make_splits(ratings, cfg.n_test, cfg.n_val, cfg.n_holdout_workers, seed)
        save_splits(df, holdout, path, meta)
    return df, holdout, ratings_report(df)
