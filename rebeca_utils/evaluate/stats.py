"""Statistical tests: Algorithm 2 permutation test, the matching test (§4.5), bootstrap CIs for AUC and R²."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap, rankdata
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


def _r2_line(x, y, axis: int = -1):
    """R², slope and intercept of the least-squares line y ≈ slope·x + intercept along `axis` (NaN if flat)."""
    xc, yc = x - x.mean(axis, keepdims=True), y - y.mean(axis, keepdims=True)
    sxx, syy, sxy = (xc * xc).sum(axis), (yc * yc).sum(axis), (xc * yc).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = sxy / sxx
        r2 = np.clip(sxy * sxy / (sxx * syy), 0.0, 1.0)  # = 1 - SS_res/SS_tot for a simple LS line
    return r2, slope, y.mean(axis) - slope * x.mean(axis)


def _percentile_ci(stat, data, n_bootstrap: int, seed: int, level: float, batch: int | None = None) -> dict:
    """Paired percentile bootstrap (scipy.stats.bootstrap) of a vectorised statistic that is NaN where undefined."""
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 2")
    # scipy warns that its interval is degenerate when a resample is NaN or all agree; ours is computed below
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(data, stat, n_resamples=n_bootstrap, batch=batch, vectorized=True, paired=True,
                        confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    samples = res.bootstrap_distribution
    samples = samples[np.isfinite(samples)]
    if len(samples) < 2:  # e.g. x constant in every resample: no interval to give
        return dict(ci_low=np.nan, ci_high=np.nan, se=np.nan, samples=samples)
    alpha = (1 - level) / 2
    # scipy's own interval is NaN as soon as one resample is; over the defined ones it is this same percentile
    lo, hi = np.percentile(samples, [100 * alpha, 100 * (1 - alpha)])
    return dict(ci_low=float(lo), ci_high=float(hi), se=float(samples.std(ddof=1)), samples=samples)


def mean_ci(x, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of x (e.g. one value per user) with a seeded percentile-bootstrap CI."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        return (np.nan,) * 3
    if len(x) == 1:  # one user (e.g. a rehearsal's single held-out worker): a mean, but no interval to resample
        return float(x[0]), np.nan, np.nan
    boot = _percentile_ci(lambda xs, axis=-1: xs.mean(axis), (x,), n_bootstrap, seed, level)
    return float(x.mean()), boot["ci_low"], boot["ci_high"]


def r2_bootstrap(x, y, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """R² of the least-squares line y ≈ slope·x + intercept, with a seeded percentile-bootstrap CI (Figure 8b).

    Returns dict(r2, ci_low, ci_high, slope, intercept, samples, n). scipy.stats.bootstrap resamples pairs
    (x_i, y_i) with replacement; a resample with constant x or y has no R² and is left out of `samples` and CI
    (NaN when fewer than two resamples have one).
    """
    x, y = np.asarray(x, dtype=float).reshape(-1), np.asarray(y, dtype=float).reshape(-1)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need paired x and y with at least 3 points, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    r2, slope, intercept = (float(v) for v in _r2_line(x, y))
    boot = _percentile_ci(lambda xs, ys, axis=-1: _r2_line(xs, ys, axis)[0], (x, y), n_bootstrap, seed, level)
    return dict(r2=r2, ci_low=boot["ci_low"], ci_high=boot["ci_high"], slope=slope, intercept=intercept,
                samples=boot["samples"], n=len(x))


def roc_auc(y: Any, p: Any) -> float:
    """ROC-AUC of scores `p` for binary labels `y`."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("y: ROC-AUC needs both classes")
    return float(roc_auc_score(y, np.asarray(p, dtype=np.float64)))


def mann_whitney_auc(y: Any, p: Any, axis: int = -1) -> np.ndarray:
    """ROC-AUC along `axis` as the Mann-Whitney statistic (ties count half, as sklearn's); NaN for a single class."""
    y = np.asarray(y).astype(bool)
    ranks = rankdata(np.asarray(p, dtype=np.float64), axis=axis)  # midranks: a tie between classes counts 1/2
    n_pos, n = y.sum(axis), y.shape[axis]
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis) - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))


def bootstrap_auc(y: Any, p: Any, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Percentile bootstrap (scipy.stats.bootstrap, rows resampled in pairs) of the ROC-AUC: auc, se, 95% CI, samples.

    A resample holding a single class has no AUC: it is left out of `samples`, se and the CI (so `samples` can
    be shorter than n_bootstrap on tiny data) rather than redrawn.
    """
    y = np.asarray(y).astype(bool).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"y has {len(y)} entries but p has {len(p)}")
    auc = roc_auc(y, p)
    # bounds the (batch, n) resample arrays to tens of MB
    boot = _percentile_ci(lambda ys, ps, axis=-1: mann_whitney_auc(ys, ps, axis), (y, p), n_bootstrap, seed, 0.95,
                          batch=max(1, 2_000_000 // len(y)))
    return {"auc": auc, "se": boot["se"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"],
            "samples": boot["samples"]}


@dataclass
class PairedEffect:
    """A factor's effect on per-user scores (users x levels, the same users and seeds at every level)."""

    levels: list
    means: np.ndarray  # (L,) mean over users per level
    statistic: float  # variance of the level means (the permutation test's statistic)
    p_value: float  # within-user permutation of the level labels: (1 + #{null >= statistic}) / (B + 1)
    friedman_p: float  # scipy's Friedman test (L >= 3), or the Wilcoxon signed-rank test (L = 2)
    diffs: dict  # level -> (mean difference to the reference level, CI low, CI high), bootstrap over users


def within_user_permutation(matrix, n_permutations: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(variance of the column means, p-value) with the level labels permuted within each user (row)."""
    x = np.asarray(matrix, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2 or not np.isfinite(x).all():
        raise ValueError(f"need a finite (users, levels >= 2) matrix, got shape {x.shape}")
    stat = float(np.var(x.mean(0)))
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    for s in range(0, n_permutations, 256):
        b = min(256, n_permutations - s)
        perm = rng.permuted(np.broadcast_to(np.arange(x.shape[1]), (b, *x.shape)), axis=2)
        null[s:s + b] = np.var(np.take_along_axis(np.broadcast_to(x, perm.shape), perm, 2).mean(1), axis=1)
    return stat, float((1 + np.sum(null >= stat - 1e-12)) / (n_permutations + 1))


def paired_effect(matrix, levels, reference=None, n_permutations: int = 1000, n_bootstrap: int = 1000,
                  seed: int = 0) -> PairedEffect:
    """Test a factor on per-user scores: within-user permutation p, Friedman (Wilcoxon for 2 levels) p, and each
    level's mean difference to `reference` (default: the first level) with a 95 % bootstrap CI over users."""
    from scipy.stats import friedmanchisquare, wilcoxon  # noqa: I001 - only this test needs them

    x = np.asarray(matrix, dtype=np.float64)
    stat, p = within_user_permutation(x, n_permutations, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties / tiny samples: scipy warns, the p-value stands
        fp = (friedmanchisquare(*x.T).pvalue if x.shape[1] >= 3 else wilcoxon(x[:, 0], x[:, 1]).pvalue) \
            if x.shape[0] >= 2 and np.ptp(x) > 0 else 1.0
    ref = list(levels).index(reference) if reference is not None else 0
    # one seed for every level: the same resamples of users, so the differences stay paired
    diffs = {lev: mean_ci(x[:, i] - x[:, ref], n_bootstrap, seed) for i, lev in enumerate(levels)}
    return PairedEffect(list(levels), x.mean(0), stat, p, float(fp), diffs)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order; NaNs stay NaN, outside the family.

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)) (Holm 1979; statsmodels'
    multipletests(method="holm") gives the same)."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise ValueError(f"holm: p-values must lie in [0, 1], got {p[ok].min():.3g} to {p[ok].max():.3g}")
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out
