"""Controlled dSprites study (§3): data source, procedural renderer, red/blue colouring, four synthetic users.

Data source
-----------
* The official DeepMind dSprites archive (``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``) when a path
  to it is given (``00_setup`` downloads it with :func:`download_dsprites` on a machine with internet and
  checks it with :func:`check_dsprites_npz`).
* Otherwise a vectorised procedural renderer (:func:`render_sprites`) that draws the same factor grid:
  shape (square / ellipse / heart) x 6 scales in [0.5, 1] x 40 orientations in [0, 2*pi] x 32 x 32
  positions, 64x64 binary images. It is *not* pixel-identical to the official images (those were drawn
  by DeepMind's own tool); shapes, factor ranges and ordering follow the dataset's conventions.

Every loader returns a ``source`` string ("official npz: <path>" or "procedural renderer") that the
notebook prints.

Study interpretation (documented choice)
----------------------------------------
``n_images`` (40,000) images are drawn uniformly among the hearts and squares of the factor grid; each
gets a colour, red (1, 0, 0) * mask or blue (0, 0, 1) * mask, uniformly -> four shape-colour pairs,
``pair = 2 * shape + colour`` with shape 0 = square, 1 = heart and colour 0 = red, 1 = blue.
There are four synthetic users; user ``u`` prefers pair ``u``. *Every* image is rated by *every* user,
independently: P(like) = p_both if shape and colour match the user's pair, p_one if exactly one matches,
p_neither otherwise (paper: 0.95 / 0.10 / 0.05; the reference code used 0.01 for "neither", see
:data:`P_LIKE_REFERENCE`, which produced the paper's Table 1 and is notebook 01's default, README). The split is by image, 90 / 10 with a fixed seed, so each user's test pool is
the full test set. Training triplets are (user, rating, image -> VAE latent) for all four users on all
training images (``studies.controlled.study_triplets``).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import download_url, file_digest

DSPRITES_FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"

DSPRITES_URL = "https://github.com/google-deepmind/dsprites-dataset/raw/master/" + DSPRITES_FILENAME

# MD5 of the official npz, as used independently by several public loaders (e.g. the vaetc and
# disentanglement-benchmark loaders); the file is also checked structurally (keys, shapes, dtypes).
DSPRITES_MD5 = "7da33b31b13a06f4b04a70402ce90c2e"

FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")

FACTOR_SIZES = (1, 3, 6, 40, 32, 32)

N_GRID = int(np.prod(FACTOR_SIZES))  # 737,280

SHAPE_NAMES = ("square", "ellipse", "heart")  # dSprites shape classes 0, 1, 2

SCALES = np.linspace(0.5, 1.0, 6)

ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)  # endpoint included, as in dSprites

POSITIONS = np.linspace(0.0, 1.0, 32)

IMG_SIZE = 64

# Renderer geometry (canvas units, canvas = [0, 1]^2): half-size of a scale-1 sprite and the margin
# that maps position 0..1 to sprite centres MARGIN..1-MARGIN; chosen so that no rotated sprite is clipped.
SPRITE_HALF = 0.16

MARGIN = 0.23

# Study constants
STUDY_SHAPES = (0, 2)  # dSprites classes kept: square -> study shape 0, heart -> study shape 1

COLOUR_NAMES = ("red", "blue")

COLOUR_RGB = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.uint8)

PAIR_NAMES = ("red square", "blue square", "red heart", "blue heart")  # pair = 2*shape + colour

N_USERS = 4

P_LIKE_PAPER = (0.95, 0.10, 0.05)  # both / exactly one / neither match (paper)

P_LIKE_REFERENCE = (0.95, 0.10, 0.01)  # the reference code's "neither" probability


# Download / check
def check_dsprites_npz(path: str | os.PathLike, full: bool = True) -> dict:
    """Check a dSprites npz: structure (keys, shapes, dtypes) and, with ``full``, size / MD5 / SHA-256.

    Returns a dict with ``ok`` (bool), ``problems`` (list of str) and the measured size and digests
    (``full`` only). Structural check: ``imgs`` (737280, 64, 64) uint8 and ``latents_classes`` /
    ``latents_values`` (737280, 6).
    """
    path = Path(path)
    out: dict = {"path": str(path), "problems": []}
    if not path.is_file():
        out["problems"].append("file not found")
        out["ok"] = False
        return out
    if full:
        out.update(size=path.stat().st_size, md5=file_digest(path, "md5"))
        if out["md5"] != DSPRITES_MD5:
            out["problems"].append(f"md5 {out['md5']} != expected {DSPRITES_MD5}")
    try:
        shape, dtype = _npz_member_header(path, "imgs")
        if tuple(shape) != (N_GRID, IMG_SIZE, IMG_SIZE) or dtype != np.uint8:
            out["problems"].append(f"imgs is {shape} {dtype}, expected ({N_GRID}, 64, 64) uint8")
        for key in ("latents_classes", "latents_values"):
            shape, _ = _npz_member_header(path, key)
            if tuple(shape) != (N_GRID, 6):
                out["problems"].append(f"{key} is {shape}, expected ({N_GRID}, 6)")
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        out["problems"].append(f"unreadable npz: {e}")
    out["ok"] = not out["problems"]
    return out


def download_dsprites(path: str | os.PathLike, url: str = DSPRITES_URL) -> Path:
    """Download the official npz to ``path`` (temp file + rename) and verify its MD5; kept when already valid."""
    return download_url(url, path, md5=DSPRITES_MD5)


def _npz_member_header(path, key):
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, _, dtype = _read_npy_header(f)
    return shape, dtype


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def read_npz_rows(path, key: str, rows: np.ndarray, chunk_rows: int = 8192) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of array ``key`` in an npz, reading it sequentially."""
    rows = np.asarray(rows, dtype=np.int64)
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, fortran, dtype = _read_npy_header(f)
        if fortran:
            raise ValueError(f"{key} in {path} is Fortran-ordered; not supported")
        n, row_shape = shape[0], tuple(shape[1:])
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row index out of range for {key} with {n} rows")
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        out = np.empty((rows.size,) + row_shape, dtype=dtype)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        start, pos = 0, 0
        last = int(sorted_rows[-1]) if rows.size else -1
        while start <= last:
            stop = min(start + chunk_rows, n)
            buf = f.read((stop - start) * row_bytes)
            block = np.frombuffer(buf, dtype=dtype).reshape((stop - start,) + row_shape)
            end = np.searchsorted(sorted_rows, stop, side="left")
            sel = order[pos:end]
            out[sel] = block[sorted_rows[pos:end] - start]
            pos, start = end, stop
    return out


# Procedural renderer
def dsprites_factor_grid() -> np.ndarray:
    """All 737,280 factor combinations, int64 (N, 6), in the official order (posY varies fastest)."""
    return np.indices(FACTOR_SIZES).reshape(6, -1).T.astype(np.int64)


def _inside(shape: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Implicit-function test in sprite coordinates (unit box [-1, 1]^2, y pointing down)."""
    if shape == 0:  # square
        return np.maximum(np.abs(x), np.abs(y)) <= 1.0
    if shape == 1:  # ellipse, axes 1 x 0.5
        return x * x + 4.0 * y * y <= 1.0
    if shape == 2:  # heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up; rescaled into the unit box
        X = 1.15 * x
        Y = -1.15 * y + 0.13
        r = X * X + Y * Y - 1.0
        return r * r * r - X * X * Y * Y * Y <= 0.0
    raise ValueError(f"shape must be 0 (square), 1 (ellipse) or 2 (heart), got {shape}")


def render_sprites(shape, scale_idx, orient_idx, posx_idx, posy_idx, chunk: int = 8192) -> np.ndarray:
    """Render dSprites-style binary images, uint8 (n, 64, 64) with values {0, 1}.

    Arguments are dSprites class indices (scalars or length-n arrays, broadcast together): shape
    0 square / 1 ellipse / 2 heart, scale_idx in 0..5 (scale linspace(0.5, 1, 6)), orient_idx in 0..39
    (angle linspace(0, 2*pi, 40), counter-clockwise), posx_idx / posy_idx in 0..31 (position
    linspace(0, 1, 32) -> centre MARGIN..1-MARGIN of the canvas; posX = column, posY = row, downward).
    Pixels are tested at their centres; only a window around each sprite is evaluated.
    """
    shape, scale_idx, orient_idx, posx_idx, posy_idx = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(a, dtype=np.int64)) for a in (shape, scale_idx, orient_idx, posx_idx, posy_idx)))
    n = shape.size
    if (shape < 0).any() or (shape > 2).any():
        raise ValueError("shape indices must be in 0..2")
    for arr, size, name in ((scale_idx, 6, "scale_idx"), (orient_idx, 40, "orient_idx"),
                            (posx_idx, 32, "posx_idx"), (posy_idx, 32, "posy_idx")):
        if (arr < 0).any() or (arr >= size).any():
            raise ValueError(f"{name} must be in 0..{size - 1}")
    out = np.zeros((n, IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    S = IMG_SIZE
    win = int(np.ceil(2 * SPRITE_HALF * np.sqrt(2) * S)) + 4  # covers any rotated sprite
    ar = np.arange(win)
    for s in np.unique(shape):
        idx_all = np.flatnonzero(shape == s)
        for c0 in range(0, idx_all.size, chunk):
            idx = idx_all[c0:c0 + chunk]
            half = (SPRITE_HALF * SCALES[scale_idx[idx]] * S).astype(np.float32)[:, None, None]
            theta = ORIENTATIONS[orient_idx[idx]]
            cos = np.cos(theta).astype(np.float32)[:, None, None]
            sin = np.sin(theta).astype(np.float32)[:, None, None]
            cx = (MARGIN + (1 - 2 * MARGIN) * POSITIONS[posx_idx[idx]]) * S  # pixel units
            cy = (MARGIN + (1 - 2 * MARGIN) * POSITIONS[posy_idx[idx]]) * S
            x0 = np.clip(np.floor(cx).astype(np.int64) - win // 2, 0, S - win)
            y0 = np.clip(np.floor(cy).astype(np.int64) - win // 2, 0, S - win)
            cols = x0[:, None] + ar  # (m, win)
            rows = y0[:, None] + ar
            dx = ((cols + 0.5 - cx[:, None]).astype(np.float32))[:, None, :] / half  # (m, 1, win)
            dy = ((rows + 0.5 - cy[:, None]).astype(np.float32))[:, :, None] / half  # (m, win, 1)
            # rotate the sprite by +theta (counter-clockwise on screen, y down) == rotate pixels by -theta
            x = cos * dx - sin * dy
            y = sin * dx + cos * dy
            mask = _inside(int(s), x, y)
            out[idx[:, None, None], rows[:, :, None], cols[:, None, :]] = mask
    return out


def render_from_factors(factors: np.ndarray) -> np.ndarray:
    """Render images for factor-class rows (N, 6) laid out like ``latents_classes``."""
    f = np.asarray(factors)
    return render_sprites(f[:, 1], f[:, 2], f[:, 3], f[:, 4], f[:, 5])


# Loading
def load_factor_table(npz_path: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """Factor classes of every image of the source, int64 (N, 6), and the source string."""
    if npz_path is None:
        return dsprites_factor_grid(), "procedural renderer"
    npz_path = Path(npz_path)
    with np.load(npz_path, allow_pickle=False) as z:
        missing = {"imgs", "latents_classes"} - set(z.files)
        if missing:
            raise KeyError(f"{npz_path} lacks {sorted(missing)} (has {z.files})")
        classes = np.asarray(z["latents_classes"]).astype(np.int64)
    if classes.ndim != 2 or classes.shape[1] != 6:
        raise ValueError(f"latents_classes in {npz_path} has shape {classes.shape}, expected (N, 6)")
    return classes, f"official npz: {npz_path}"


def load_dsprites(npz_path: str | os.PathLike | None = None, rows=None) -> tuple[np.ndarray, np.ndarray, str]:
    """dSprites images uint8 (n, 64, 64) in {0, 1}, factor classes int64 (n, 6) and the source string.

    ``npz_path`` given: the npz's images (``rows`` selects rows; the npz is streamed, not loaded whole).
    ``npz_path`` None: the procedural renderer on the official grid; ``rows`` indexes that grid. With
    ``rows=None`` this renders all 737,280 images (~3 GB) -- pass ``rows`` for a subset.
    """
    classes, source = load_factor_table(npz_path)
    if rows is None:
        rows = np.arange(len(classes))
    rows = np.asarray(rows, dtype=np.int64)
    factors = classes[rows]
    if npz_path is None:
        imgs = render_from_factors(factors)
    else:
        imgs = read_npz_rows(npz_path, "imgs", rows).astype(np.uint8, copy=False)
        if imgs.shape[1:] != (IMG_SIZE, IMG_SIZE):
            raise ValueError(f"imgs in {npz_path} have shape {imgs.shape[1:]}, expected (64, 64)")
        imgs = (imgs > 0).astype(np.uint8)
    return imgs, factors, source


def colourise(masks: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Binary masks (n, 64, 64) and colours (n,) 0=red / 1=blue -> uint8 RGB (n, 3, 64, 64), values {0, 255}."""
    masks = (np.asarray(masks) > 0).astype(np.uint8) * np.uint8(255)
    rgb = COLOUR_RGB[np.asarray(colour, dtype=np.int64)]  # (n, 3)
    return masks[:, None, :, :] * rgb[:, :, None, None]


def like_probability(pair, user: int, p_like=P_LIKE_PAPER) -> np.ndarray:
    """P(like) of user ``user`` (who prefers pair ``user``) for images of pair id(s) ``pair``."""
    pair = np.asarray(pair, dtype=np.int64)
    match_shape = (pair // 2) == (user // 2)
    match_colour = (pair % 2) == (user % 2)
    n_match = match_shape.astype(int) + match_colour.astype(int)
    return np.asarray(p_like, dtype=np.float64)[2 - n_match]


@dataclass
class DSpritesStudy:
    """The controlled study's data (see the module docstring for the interpretation)."""

    images: np.ndarray  # uint8 (n, 3, 64, 64), values {0, 255}; red = (1,0,0)*mask, blue = (0,0,1)*mask
    shape: np.ndarray  # int64 (n,), 0 = square, 1 = heart
    colour: np.ndarray  # int64 (n,), 0 = red, 1 = blue
    pair: np.ndarray  # int64 (n,), 2*shape + colour (see PAIR_NAMES); user u prefers pair u
    factors: np.ndarray  # int64 (n, 6), dSprites factor classes of each image (latents_classes layout)
    rows: np.ndarray  # int64 (n,), row of each image in the source (npz row or grid index)
    likes: np.ndarray  # bool (4, n): likes[u, i] = user u liked image i
    train_idx: np.ndarray  # int64, sorted image indices of the 90% training split
    test_idx: np.ndarray  # int64, sorted image indices of the 10% test split (every user's test pool)
    p_like: tuple[float, float, float]
    seed: int
    source: str

    @property
    def n_images(self) -> int:
        return len(self.pair)

    @property
    def n_users(self) -> int:
        return self.likes.shape[0]

    def like_rates(self) -> np.ndarray:
        """Empirical like rate (4 users x 4 pairs): rows users, columns pairs."""
        return np.array([[self.likes[u, self.pair == p].mean() if (self.pair == p).any() else np.nan
                          for p in range(4)] for u in range(self.n_users)])


def make_study(n_images: int = 40_000, test_frac: float = 0.1, p_like=P_LIKE_PAPER, seed: int = 0,
               npz_path: str | os.PathLike | None = None) -> DSpritesStudy:
    """Build the study: sample images, colour them, let the 4 users rate every image, split by image.

    Images are drawn uniformly (without replacement when the source has enough) among the source's
    squares and hearts, i.e. uniform over shape, scale, orientation and position; colour is uniform
    red / blue. Independent child generators of ``seed`` drive images, colours, ratings and the split,
    so changing ``p_like`` (e.g. to :data:`P_LIKE_REFERENCE`) changes only the ratings.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    p_like = tuple(float(p) for p in p_like)
    if len(p_like) != 3 or not all(0.0 <= p <= 1.0 for p in p_like):
        raise ValueError(f"p_like must be three probabilities (both, one, neither), got {p_like}")
    g_img, g_col, g_like, g_split = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))

    table, source = load_factor_table(npz_path)
    cand = np.flatnonzero(np.isin(table[:, 1], STUDY_SHAPES))
    if cand.size == 0:
        raise ValueError(f"{source}: no squares or hearts in the factor table")
    rows = g_img.choice(cand, size=n_images, replace=n_images > cand.size)
    masks, factors, source = load_dsprites(npz_path, rows=rows)
    shape = (factors[:, 1] == 2).astype(np.int64)
    colour = g_col.integers(0, 2, size=n_images).astype(np.int64)
    pair = 2 * shape + colour
    images = colourise(masks, colour)
    del masks

    likes = np.empty((N_USERS, n_images), dtype=bool)
    for u in range(N_USERS):
        likes[u] = g_like.random(n_images) < like_probability(pair, u, p_like)

    n_test = int(round(n_images * test_frac))
    perm = g_split.permutation(n_images)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return DSpritesStudy(images=images, shape=shape, colour=colour, pair=pair, factors=factors,
                         rows=rows.astype(np.int64), likes=likes, train_idx=train_idx, test_idx=test_idx,
                         p_like=p_like, seed=seed, source=source)
