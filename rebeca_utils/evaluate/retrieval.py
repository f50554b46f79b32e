"""Retrieval metrics: cosine nearest neighbours, Precision@k / Recall@k (§3.3, §4.4), one user at a time."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..runtime import seed_sequence

DEFINITIONS = ("paper", "reference", "reference_exact")


def cosine_nn(queries, pool, batch_size: int = 8192) -> np.ndarray:
    """Index of each query's nearest pool item by cosine similarity; queries (..., d), pool (N, d)."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    p = torch.nn.functional.normalize(torch.as_tensor(np.asarray(pool), dtype=torch.float32), dim=-1)
    flat = torch.nn.functional.normalize(q.reshape(-1, q.shape[-1]), dim=-1)
    idx = torch.cat([(flat[s : s + batch_size] @ p.T).argmax(1) for s in range(0, len(flat), batch_size)])
    return idx.reshape(q.shape[:-1]).numpy()


def _check_definition(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"definition={definition!r}: valid definitions are {', '.join(DEFINITIONS)}")


def _unit(x: np.ndarray) -> np.ndarray:
    # float64 so that near-ties in cosine similarity rank the same whatever the input dtype
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def reference_axis_normalise(x) -> np.ndarray:
    """The reference evaluation's L2 normalisation of rows stacked to (N, 1, d) over the size-1 axis: x / max(|x|, 1e-12).

    Every entry is divided by its own absolute value, so a row becomes sign(x) (entries below 1e-12 in magnitude
    are scaled, not signed). The reference applied it to the candidate pool and the baselines' samples.
    """
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.abs(x), 1e-12)


def _f1(p, r):
    p, r = np.asarray(p, dtype=float), np.asarray(r, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0)


def precision_recall_at_k(gen_emb, pool_emb, pool_liked, k: int, definition: str = "paper",
                          gen_exact=False) -> tuple[float, float]:
    """Prec@k(u), Rec@k(u) of one user's m generated embeddings (m, d) against their pool (N, d) with likes (N,).

    paper (§4.4): Prec@k = (1/m) Σ_g 1[Top-k(g,u) ∩ L_u ≠ ∅]; Rec@k = (1/|L_u|) Σ_{ℓ∈L_u} 1[∃g: ℓ ∈ Top-k(g,u)].
    reference: retrieved = ∪_g Top-k(g,u); precision = |retrieved ∩ L_u| / |retrieved|; same recall.
    reference_exact: reference, ranked as the reference notebook ranked (the printed Table 2): the pool and the
    samples where `gen_exact` is False (bool, scalar or per sample) pass `reference_axis_normalise` (rows ->
    sign(x)), samples where it is True (REBECA's) are L2-normalised, and the dot product ranks.
    With k=1 and the first k samples this is also §3.3's P@k/R@k (Table 1). Ties in cosine similarity go to the
    lower pool index. Recall is NaN when the user has no liked pool item.
    """
    _check_definition(definition)
    gen, pool = np.atleast_2d(gen_emb), np.atleast_2d(pool_emb)
    if definition == "reference_exact":
        exact = np.broadcast_to(np.asarray(gen_exact, dtype=bool).reshape(-1), (len(gen),))[:, None]
        gen, pool = np.where(exact, _unit(gen), reference_axis_normalise(gen)), reference_axis_normalise(pool)
    else:
        gen, pool = _unit(gen), _unit(pool)
    liked = np.asarray(pool_liked, dtype=bool).reshape(-1)
    if len(gen) == 0:
        raise ValueError("no generated samples for this user")
    if len(liked) != len(pool) or gen.shape[1] != pool.shape[1]:
        raise ValueError(f"shapes disagree: gen {gen.shape}, pool {pool.shape}, pool_liked {liked.shape}")
    if not 1 <= k <= len(pool):
        raise ValueError(f"k={k} but the user's pool has {len(pool)} items (need 1 <= k <= pool size)")
    sim = gen @ pool.T
    # Top-k(g, u), one row per sample g; argmax (first maximum) breaks ties like the stable sort, without sorting
    # the whole pool for §3.3's k=1
    top = sim.argmax(1)[:, None] if k == 1 else np.argsort(-sim, axis=1, kind="stable")[:, :k]
    retrieved = np.unique(top)
    n_likes = int(liked.sum())
    recall = liked[retrieved].sum() / n_likes if n_likes else float("nan")
    precision = liked[top].any(axis=1).mean() if definition == "paper" else liked[retrieved].mean()
    return float(precision), float(recall)


def retrieval_metrics(gen_emb, gen_user, pool_emb, pool_user, pool_liked, ks=(1, 5), definition: str = "paper",
                      min_likes: int = 1, gen_exact=False):
    """Prec/Rec/F1@k for all users -> (per_user, summary) DataFrames; macro-averages over kept users.

    per_user: user_id, k, precision, recall, f1 (per user), n_gen, n_pool, n_likes (kept users only).
    summary: k, precision, recall, f1, users, users_dropped. F1 = 2PR/(P+R) of the macro-averaged P and R for
    definition="paper" (§4.4), the mean of per-user F1 for "reference" and "reference_exact" (its code).
    `gen_exact` (bool, scalar or per generated sample) is used by "reference_exact" only (see
    `precision_recall_at_k`). Users seen in gen_user or
    pool_user with no generated sample or fewer than `min_likes` held-out likes are dropped and counted (the
    reference code dropped users with < 3 likes without saying). k larger than a kept user's pool raises.
    Each user is scored by `precision_recall_at_k`.
    """
    _check_definition(definition)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={ks}: need at least one k >= 1")
    if min_likes < 1:
        raise ValueError(f"min_likes={min_likes}: Rec@k divides by |L_u|, so min_likes must be >= 1")
    gen, pool = np.atleast_2d(np.asarray(gen_emb)), np.atleast_2d(np.asarray(pool_emb))
    gen_user, pool_user = np.asarray(gen_user).reshape(-1), np.asarray(pool_user).reshape(-1)
    liked = np.asarray(pool_liked, dtype=bool).reshape(-1)
    if len(gen_user) != len(gen) or len(pool_user) != len(pool) or len(liked) != len(pool):
        raise ValueError(f"lengths disagree: gen_emb {len(gen)}, gen_user {len(gen_user)}, pool_emb {len(pool)}, "
                         f"pool_user {len(pool_user)}, pool_liked {len(liked)}")
    if gen.shape[1] != pool.shape[1]:
        raise ValueError(f"embedding dims disagree: gen {gen.shape[1]}, pool {pool.shape[1]}")
    exact = np.broadcast_to(np.asarray(gen_exact, dtype=bool).reshape(-1), (len(gen),))
    users, inv = np.unique(np.concatenate([gen_user, pool_user]), return_inverse=True)
    g_u, p_u = inv[: len(gen)], inv[len(gen):]
    n_gen = np.bincount(g_u, minlength=len(users))
    n_pool = np.bincount(p_u, minlength=len(users))
    n_likes = np.bincount(p_u, weights=liked, minlength=len(users)).astype(int)
    keep = (n_gen > 0) & (n_likes >= min_likes)
    small = keep & (n_pool < max(ks))
    if small.any():
        raise ValueError(f"k={max(ks)} exceeds the pool of {small.sum()} user(s), e.g. user {users[small][0]!r} "
                         f"has {n_pool[small][0]} pool items")
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise ValueError(f"no user has a generated sample and >= {min_likes} held-out likes")
    # row indices of each user's samples and pool items, grouped once instead of one mask per user
    g_rows = np.split(np.argsort(g_u, kind="stable"), np.cumsum(n_gen)[:-1])
    p_rows = np.split(np.argsort(p_u, kind="stable"), np.cumsum(n_pool)[:-1])
    pr = np.array([[precision_recall_at_k(gen[g_rows[u]], pool[p_rows[u]], liked[p_rows[u]], k, definition,
                                          exact[g_rows[u]]) for u in kept] for k in ks])  # (len(ks), U, 2)
    rows, summary = [], []
    for k, (precision, recall) in zip(ks, pr.transpose(0, 2, 1)):
        f1 = _f1(precision, recall)
        rows.append(pd.DataFrame(dict(user_id=users[kept], k=k, precision=precision, recall=recall, f1=f1,
                                      n_gen=n_gen[kept], n_pool=n_pool[kept], n_likes=n_likes[kept])))
        P_mac, R_mac = precision.mean(), recall.mean()
        summary.append(dict(k=k, precision=P_mac, recall=R_mac,
                            f1=float(_f1(P_mac, R_mac)) if definition == "paper" else f1.mean(),
                            users=len(kept), users_dropped=int(len(users) - len(kept))))
    return pd.concat(rows, ignore_index=True), pd.DataFrame(summary)


def personalization_score(pipe, splits: pd.DataFrame, pool_emb: torch.Tensor, train_emb: torch.Tensor,
                          users, n_samples: int = 10, pool_split=("val",), cfg_scale: float = 3.0, seed: int = 0
                          ) -> dict:
    """Precision@1-style signal: how often a sample's nearest held-out item is one the user liked, vs random draws.

    Comparable across objectives (unlike validation losses). `pool_emb` is indexed like `splits` (any space in
    which samples live); random draws come from `train_emb`.
    """
    users = [int(u) for u in users]
    x = pipe(users, n_samples, rating=1, cfg_scale=cfg_scale, seed=seed)  # a RebecaPipeline: decoder space
    rng = np.random.default_rng(seed_sequence(seed, "random_draws"))
    rand = train_emb[rng.integers(0, len(train_emb), size=(len(users), n_samples))]
    prec, prec_rand, n_pool = [], [], []
    for i, u in enumerate(users):
        rows = np.flatnonzero((splits["user_id"].to_numpy() == u) & splits["split"].isin(pool_split).to_numpy())
        if len(rows) == 0:
            continue
        liked = splits["like"].to_numpy()[rows]
        pool = pool_emb[rows].numpy()
        prec.append(liked[cosine_nn(x[i].numpy(), pool)].mean())
        prec_rand.append(liked[cosine_nn(rand[i].numpy(), pool)].mean())
        n_pool.append(len(rows))
    return {"precision": float(np.mean(prec)), "random_precision": float(np.mean(prec_rand)),
            "users": len(prec), "pool_size": float(np.mean(n_pool))}


@torch.no_grad()
def nn_label_agreement(z, labels, metric: str = "cosine", batch_size: int = 2048) -> float:
    """Fraction of points whose nearest other point (cosine or euclidean) has the same label."""
    z = torch.as_tensor(np.asarray(z)).float()
    labels = torch.as_tensor(np.asarray(labels))
    if metric == "cosine":
        z = F.normalize(z, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    hits = 0
    for s in range(0, z.shape[0], batch_size):
        q = z[s:s + batch_size]
        d = -(q @ z.T) if metric == "cosine" else torch.cdist(q, z)
        d[torch.arange(q.shape[0]), torch.arange(s, s + q.shape[0])] = float("inf")
        hits += int((labels[d.argmin(1)] == labels[s:s + q.shape[0]]).sum())
    return hits / max(1, z.shape[0])
