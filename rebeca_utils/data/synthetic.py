"""A synthetic FLICKR-AES in the real on-disk format, with planted attributes and worker tastes."""
from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_dir
from ..runtime import seed_sequence
from .flickr import CSV_HEADER, CSV_NAME, IMAGE_DIR, SCORE_NAME

MARKER_NAME = ".rebeca_synthetic.json"

FIXTURE_VERSION = 1

# planted attributes of the synthetic images
HUES = {"red": 0.0, "yellow": 52.0, "green": 125.0, "blue": 220.0}  # degrees

TEXTURES = ("stripes", "dots", "plain")

LAYOUTS = ("centre", "corner")

ATTRIBUTES = {"hue": tuple(HUES), "texture": TEXTURES, "layout": LAYOUTS}

TARGET_LIKE_RATE = 0.335  # real FLICKR-AES: 30-37 % of ratings are >= 4

MIN_RATINGS_PER_WORKER = 30  # 10 test + 10 val + >= 10 train

_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))


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

    with atomic_dir(root) as tmp:  # built aside, then swapped in: a killed build leaves no half fixture
        _build_fixture(tmp, params)
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


def planted_tastes(root: str | os.PathLike, workers: list[str]) -> list[str]:
    """Each worker's planted taste, e.g. 'likes red + corner', for a synthetic fixture at `root`; '' for real data."""
    marker = _read_marker(Path(root))
    if marker is None:
        return [""] * len(workers)
    return ["likes " + " + ".join(marker["preferences"][w].values()) for w in workers]


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

    nw, ni, size, k, seed = (params[x] for x in ("n_workers", "n_images", "image_size", "ratings_per_image", "seed"))
    ss = seed_sequence(seed, "fixture")
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
        arr = _draw_image(np.random.default_rng(seed_sequence(seed, "fixture_images", i)), attrs, size)
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


# ----------------------------------------------------------------------------------------------- read from pixels


def hue_class(images: np.ndarray) -> np.ndarray:
    """Planted hue index (order of HUES) of each (N, H, W, 3) image in [0, 1], from pixels alone: the circular mean
    hue of its saturated pixels (the coloured background; the object is white or black), snapped to the nearest
    planted hue; -1 for a grey image. An encoder-free check of generated images."""
    centres = np.deg2rad(np.array(list(HUES.values())))
    out = []
    for img in np.asarray(images, dtype=np.float32):
        mx, mn = img.max(-1), img.min(-1)
        sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
        mask = (sat > 0.25) & (mx > 0.15)
        if mask.sum() < 4:
            out.append(-1)
            continue
        hsv = np.array([colorsys.rgb_to_hsv(*p)[0] for p in img[mask][:: max(1, int(mask.sum()) // 512)]])
        ang = np.angle(np.exp(2j * np.pi * hsv).mean())
        out.append(int(np.argmin(np.abs(np.angle(np.exp(1j * (centres - ang)))))))
    return np.array(out, dtype=int)


def layout_class(images: np.ndarray) -> np.ndarray:
    """Planted layout index (order of LAYOUTS: 0 centre, 1 corner) of (N, H, W, 3) images in [0, 1], from where the
    unsaturated (white or black object) pixels sit."""
    imgs = np.asarray(images, dtype=np.float32)
    mx, mn = imgs.max(-1), imgs.min(-1)
    obj = ((mx - mn) / np.maximum(mx, 1e-6) < 0.25) | (mx < 0.15)
    h, w = obj.shape[1:]
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    centre = (np.abs(yy - 0.5) < 0.2) & (np.abs(xx - 0.5) < 0.2)
    corner = (np.minimum(yy, 1 - yy) < 0.3) & (np.minimum(xx, 1 - xx) < 0.3)
    return (obj[:, corner].mean(1) > obj[:, centre].mean(1)).astype(int)
