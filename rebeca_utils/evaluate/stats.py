"""Statistical tests: Algorithm 2 permutation test, the matching test (§4.5), bootstrap CIs for AUC and R²."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score


@dataclass
class PermutationResult:
    """Outcome of a user-image permutation test; per-user arrays have one entry per user (NaN if it has no image)."""

    statistic: float  # median over users of each user's `agg` score on their own images
    null: np.ndarray  # (B,) the same statistic after each random reassignment of images to users
    p_value: float  # (1 + #{null >= statistic}) / (B + 1), Algorithm 2
    z: float  # (statistic - mean(null)) / sd(null)
    own: np.ndarray = field(repr=False)  # (U,) per-user score on their own images
    random: np.ndarray = field(repr=False)  # (U,) per-user score averaged over the B reassignments
    gap: np.ndarray = field(repr=False)  # own - random (Figure 8a)
    agg: str = "mean"
    n_permutations: int = 0

def _check_owner(score_matrix: np.ndarray, owner) -> np.ndarray:
    if score_matrix.ndim != 2:
        raise ValueError(f"score_matrix must be (users, images), got shape {score_matrix.shape}")
    owner = np.asarray(owner)
    if owner.ndim != 1 or len(owner) != score_matrix.shape[1]:
        raise ValueError(f"owner has shape {owner.shape} but score_matrix has {score_matrix.shape[1]} images")
    if not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"owner must hold integer user indices (rows of score_matrix), got dtype {owner.dtype}")
    if len(owner) and (owner.min() < 0 or owner.max() >= score_matrix.shape[0]):
        raise ValueError(f"owner values must lie in [0, {score_matrix.shape[0]}), got [{owner.min()}, {owner.max()}]")
    if not np.isfinite(score_matrix).all():
        raise ValueError("score_matrix has non-finite entries")
    return owner.astype(np.int64)

def _permutation_chunks(n: int, n_permutations: int, seed: int, rows: int):
    """Yield (c, n) arrays whose row b is a uniform random permutation of range(n); deterministic given seed."""
    rng = np.random.default_rng(seed)
    base = np.arange(n, dtype=np.int64)
    for s in range(0, n_permutations, rows):
        yield rng.permuted(np.broadcast_to(base, (min(rows, n_permutations - s), n)), axis=1)

def _chunk_rows(n: int) -> int:
    return max(1, 2**22 // max(n, 1))

def _group_agg(vals: np.ndarray, starts: np.ndarray, counts: np.ndarray, slot: np.ndarray, agg: str) -> np.ndarray:
    """Per-group mean or median of (c, n) values laid out in contiguous groups -> (c, G)."""
    if agg == "mean":
        return np.add.reduceat(vals, starts, axis=1) / counts
    grp = np.repeat(np.arange(len(counts)), counts)
    pad = np.full((vals.shape[0], len(counts), int(counts.max())), np.inf)
    pad[:, grp, slot] = vals
    pad.sort(axis=-1)  # +inf padding sorts last, so a group's median sits at (c-1)//2 and c//2
    lo = np.take_along_axis(pad, ((counts - 1) // 2)[None, :, None].repeat(len(vals), 0), axis=-1)[..., 0]
    hi = np.take_along_axis(pad, (counts // 2)[None, :, None].repeat(len(vals), 0), axis=-1)[..., 0]
    return (lo + hi) / 2

def _permutation_core(score_matrix, owner, n_permutations: int, seed: int, agg: str) -> PermutationResult:
    S = np.asarray(score_matrix, dtype=np.float64)
    owner = _check_owner(S, owner)
    if agg not in ("mean", "median"):
        raise ValueError(f"agg={agg!r}: valid values are mean, median")
    if n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations}: need at least 1")
    n_users, n = S.shape
    order = np.argsort(owner, kind="stable")
    slot_owner = owner[order]  # slots sorted by owner: group sizes are fixed by construction
    users, starts, counts = np.unique(slot_owner, return_index=True, return_counts=True)
    if len(users) == 0:
        raise ValueError("no images")
    slot = np.arange(n) - np.repeat(starts, counts)
    flat = S.reshape(-1)

    def per_user(images):  # images[b, j]: the image given to slot j's owner
        return _group_agg(flat[slot_owner * n + images], starts, counts, slot, agg)

    own_u = per_user(order[None, :])[0]
    statistic = float(np.median(own_u))
    rows = _chunk_rows(n) if agg == "mean" else max(1, 2**22 // (len(users) * int(counts.max())))
    rows = min(rows, _chunk_rows(n))  # permutations are drawn in chunks of _chunk_rows(n); sub-chunk if smaller
    null, random_sum = [], np.zeros(len(users))
    for perm in _permutation_chunks(n, n_permutations, seed, _chunk_rows(n)):
        for s in range(0, len(perm), rows):
            per = per_user(perm[s : s + rows])
            null.append(np.median(per, axis=1))
            random_sum += per.sum(0)
    null = np.concatenate(null)
    # ties count against H1 (Algorithm 2's ≤); the tolerance keeps round-off in a different summation order from
    # turning an exact tie into a strict win
    tol = 1e-12 * max(1.0, abs(statistic))
    p_value = (1 + int((null >= statistic - tol).sum())) / (n_permutations + 1)
    sd = null.std(ddof=1) if n_permutations > 1 else 0.0
    z = float((statistic - null.mean()) / sd) if sd > 0 else float("nan")
    own, rand = np.full(n_users, np.nan), np.full(n_users, np.nan)
    own[users], rand[users] = own_u, random_sum / n_permutations
    return PermutationResult(statistic=statistic, null=null, p_value=p_value, z=z, own=own, random=rand,
                             gap=own - rand, agg=agg, n_permutations=n_permutations)

def permutation_test(score_matrix, owner, n_permutations: int = 1000, seed: int = 0) -> PermutationResult:
    """Algorithm 2 (App I): do generated images depend on the user they were generated for? H0: U ⊥ I.

    score_matrix[u, i] = v̂(u, I_i) for every user u and generated image i; owner[i] = the user image i was
    generated for (an index into the rows). Statistic: median over users of eq. 5 (the mean score of their own
    images). Null: images randomly permuted across users, each user keeping their number of images.
    p = (1 + #{b: Score_b >= Score}) / (B + 1). Seeded by `seed` only (np.random.default_rng), never global state.
    """
    return _permutation_core(score_matrix, owner, n_permutations, seed, "mean")

def matching_test(score_matrix, owner, n_permutations: int = 1000, seed: int = 0, agg: str = "median",
                  n_users: int | None = None) -> PermutationResult:
    """§4.5 'user-image matching under randomization' on held-out REAL images; gap = Figure 8a.

    Our reading of §4.5: the columns are held-out (user, image) pairs — owner[j] is the user whose held-out
    image column j is (an image rated by several users is one column per user; which held-out images count
    as a user's own, e.g. their held-out likes, is the caller's choice). For each user u the statistic is the
    median verifier score v̂(u, I) over their own images; the null reassigns the same images to users at
    random (group sizes kept) and recomputes each user's median. Reported: the median over users of the
    per-user medians vs its permutation null (p and z as in Algorithm 2), and per user
    gap_u = own median − mean over reassignments of the median under random reassignment. A purely aesthetic
    (user-agnostic) verifier, v̂(u, I) = f(I), gives gaps near 0.
    `score_matrix` may be a callable fn(user_idx, column_idx) -> scores, evaluated once on the full
    n_users x len(owner) grid (n_users defaults to owner.max() + 1).
    """
    if callable(score_matrix):
        owner_arr = np.asarray(owner)
        n_users = int(owner_arr.max()) + 1 if n_users is None else n_users
        uu, cc = np.meshgrid(np.arange(n_users), np.arange(len(owner_arr)), indexing="ij")
        score_matrix = np.asarray(score_matrix(uu.reshape(-1), cc.reshape(-1)), dtype=float).reshape(uu.shape)
    return _permutation_core(score_matrix, owner, n_permutations, seed, agg)

def r2_bootstrap(x, y, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """R² of the least-squares line y ≈ slope·x + intercept, with a seeded percentile-bootstrap CI (Figure 8b).

    Returns dict(r2, ci_low, ci_high, slope, intercept, samples (B,), n). Resamples pairs (x_i, y_i) with
    replacement; a resample with constant x or y has undefined R² and is left out of the CI.
    """
    x, y = np.asarray(x, dtype=float).reshape(-1), np.asarray(y, dtype=float).reshape(-1)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need paired x and y with at least 3 points, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")

    def fit(xs, ys):  # rows are samples
        xc, yc = xs - xs.mean(-1, keepdims=True), ys - ys.mean(-1, keepdims=True)
        sxx, syy, sxy = (xc * xc).sum(-1), (yc * yc).sum(-1), (xc * yc).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = sxy / sxx
            r2 = np.clip(sxy * sxy / (sxx * syy), 0.0, 1.0)  # = 1 - SS_res/SS_tot for a simple LS line
        return r2, slope, ys.mean(-1) - slope * xs.mean(-1)

    r2, slope, intercept = (float(v) for v in fit(x, y))
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_bootstrap, len(x)))
    samples = fit(x[idx], y[idx])[0]
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(samples, [alpha, 1 - alpha]) if np.isfinite(samples).any() else (np.nan, np.nan)
    return dict(r2=r2, ci_low=float(lo), ci_high=float(hi), slope=slope, intercept=intercept, samples=samples,
                n=len(x))

def roc_auc(y: Any, p: Any) -> float:
    """ROC-AUC of scores `p` for binary labels `y`."""

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("y: ROC-AUC needs both classes")
    return float(roc_auc_score(y, np.asarray(p, dtype=np.float64)))

def _resample_aucs(y: np.ndarray, group: np.ndarray, n_groups: int, idx: np.ndarray) -> np.ndarray:
    """AUC of each resample idx[b] (rows of y); `group` = rank of each score among the distinct scores (ties)."""
    B = len(idx)
    flat = (np.arange(B)[:, None] * n_groups + group[idx]).ravel()
    pos = np.bincount(flat, weights=y[idx].ravel(), minlength=B * n_groups).reshape(B, n_groups)
    neg = np.bincount(flat, weights=~y[idx].ravel(), minlength=B * n_groups).reshape(B, n_groups)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower; ties count half (Mann-Whitney)
    return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))

def bootstrap_auc(y: Any, p: Any, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Bootstrap of the ROC-AUC over rows: auc (full data), se, 95% percentile CI, samples (n_bootstrap,)."""
    y = np.asarray(y).astype(bool).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"y has {len(y)} entries but p has {len(p)}")
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 2")
    auc = roc_auc(y, p)
    n = len(y)
    _, inv = np.unique(p, return_inverse=True)
    inv, m = inv.reshape(-1), int(inv.max()) + 1
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    n_pos = y[idx].sum(axis=1)
    for _ in range(1000):  # a resample with one class has no AUC: redraw it
        redo = np.flatnonzero((n_pos == 0) | (n_pos == n))
        if not len(redo):
            break
        idx[redo] = rng.integers(0, n, size=(len(redo), n))
        n_pos[redo] = y[idx[redo]].sum(axis=1)
    else:
        raise ValueError("y: bootstrap resamples keep containing a single class (too few of one class)")
    step = max(1, 2_000_000 // max(n, m))  # bounds the (block, n) and (block, m) arrays to tens of MB
    samples = np.concatenate([_resample_aucs(y, inv, m, idx[s:s + step]) for s in range(0, n_bootstrap, step)])
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return {"auc": auc, "se": float(samples.std(ddof=1)), "ci_low": float(lo), "ci_high": float(hi),
            "samples": samples}
