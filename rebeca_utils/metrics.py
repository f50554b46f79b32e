"""Metrics shared by every study and method: Precision@k / Recall@k (§3.3, §4.4), verifier tests (§4.5, App I-J)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

DEFINITIONS = ("paper", "reference")

# Table 1 of the paper (controlled dSprites study); recall is reported there x 1e-3.
PAPER_TABLE1 = {
    ("REBECA", 1): (0.782, 0.167e-3), ("REBECA", 5): (0.782, 0.835e-3),
    ("REBECA", 10): (0.789, 1.685e-3), ("REBECA", 20): (0.799, 3.409e-3),
    ("Mean", 1): (1.000, 0.214e-3),
    ("Random", 1): (0.290, 0.062e-3), ("Random", 5): (0.282, 0.301e-3),
    ("Random", 10): (0.287, 0.613e-3), ("Random", 20): (0.291, 1.244e-3),
}


def cosine_nn(queries, pool, batch_size: int = 8192) -> np.ndarray:
    """Index of each query's nearest pool item by cosine similarity; queries (..., d), pool (N, d)."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    p = torch.nn.functional.normalize(torch.as_tensor(np.asarray(pool), dtype=torch.float32), dim=-1)
    flat = torch.nn.functional.normalize(q.reshape(-1, q.shape[-1]), dim=-1)
    idx = torch.cat([(flat[s : s + batch_size] @ p.T).argmax(1) for s in range(0, len(flat), batch_size)])
    return idx.reshape(q.shape[:-1]).numpy()


def pr_from_neighbours(nn_idx: np.ndarray, liked: np.ndarray, k: int, definition: str = "paper"):
    """P@k, R@k from neighbour indices nn_idx (..., U, K) and likes (U, N); returns arrays of shape (..., U).

    paper: precision = fraction of the first k samples whose neighbour is liked; recall = fraction of
    liked pool items that are the neighbour of at least one of them.
    reference: precision over the *set* of retrieved items (duplicates counted once); same recall.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"definition={definition!r}: valid definitions are {', '.join(DEFINITIONS)}")
    nn_idx = np.asarray(nn_idx)[..., :k]
    liked = np.asarray(liked, dtype=bool)
    if nn_idx.shape[-1] < k:
        raise ValueError(f"k={k} but only {nn_idx.shape[-1]} samples per user were given")
    U, N = liked.shape
    lead = nn_idx.shape[:-2]
    flat = nn_idx.reshape(-1, U, k)
    retrieved = np.zeros((flat.shape[0], U, N), dtype=bool)
    r_i, u_i = np.meshgrid(np.arange(flat.shape[0]), np.arange(U), indexing="ij")
    retrieved[r_i[..., None], u_i[..., None], flat] = True
    hits = retrieved & liked[None]
    n_liked = np.maximum(liked.sum(1), 1)
    recall = hits.sum(-1) / n_liked
    if definition == "paper":
        precision = np.take_along_axis(np.broadcast_to(liked, (flat.shape[0], U, N)), flat, axis=-1).mean(-1)
    else:
        precision = hits.sum(-1) / np.maximum(retrieved.sum(-1), 1)
    return precision.reshape(*lead, U), recall.reshape(*lead, U)


def table1(inputs: dict, ks=(1, 5, 10, 20)):
    """Table 1 from `table1_inputs.npz` arrays alone: REBECA, Mean (k=1) and Random; mean +- std over reps."""
    import pandas as pd

    pool, liked = inputs["test_latents"], inputs["test_likes"]
    rows = []
    methods = [("REBECA", inputs["rebeca"], ks), ("Mean", inputs["mean"][None, :, None, :], (1,)),
               ("Random", inputs["random"], ks)]
    for name, samples, method_ks in methods:
        nn_idx = cosine_nn(samples, pool)  # (reps, U, K)
        for k in method_ks:
            p, r = pr_from_neighbours(nn_idx, liked, k)
            p_rep, r_rep = p.mean(-1), r.mean(-1)  # average over users, then spread over repetitions
            paper = PAPER_TABLE1.get((name, k), (np.nan, np.nan))
            rows.append(dict(method=name, k=k, precision=p_rep.mean(), precision_std=p_rep.std(),
                             recall=r_rep.mean(), recall_std=r_rep.std(),
                             paper_precision=paper[0], paper_recall=paper[1]))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# §4.4 retrieval: Precision@k / Recall@k of generated images against each user's held-out pool P_u = L_u ∪ D_u
# ---------------------------------------------------------------------------------------------------------------

# Table 2 of the paper (210 users, per-user pool of held-out likes + dislikes, cosine similarity in bigG space).
# Read with care: in every row F1 < 2PR/(P+R) of the printed P and R, and for REBECA P@5 < P@1, which the §4.4
# formula cannot give (1[Top-k ∩ L_u ≠ ∅] only grows with k). Both fit the reference code's definition
# (precision over the set of retrieved items, F1 averaged over users), not the formulas printed in §4.4.
TABLE2_COLUMNS = ((1, "P"), (1, "R"), (1, "F1"), (5, "P"), (5, "R"), (5, "F1"))
PAPER_TABLE2 = {
    "Shared LoRA": (0.455, 0.718, 0.540, 0.471, 0.991, 0.623),
    "Per-user LoRA": (0.485, 0.713, 0.557, 0.470, 0.986, 0.621),
    "VLM Persona": (0.507, 0.685, 0.556, 0.472, 0.983, 0.621),
    "VLM Persona + LoRA": (0.511, 0.673, 0.555, 0.475, 0.986, 0.626),
    "REBECA (CFG=3.0)": (0.524, 0.767, 0.605, 0.478, 0.997, 0.630),
    "REBECA (CFG=5.0)": (0.556, 0.714, 0.605, 0.478, 0.989, 0.629),
    "REBECA (CFG=7.0)": (0.579, 0.647, 0.584, 0.480, 0.976, 0.628),
    "REBECA (CFG=9.0)": (0.605, 0.610, 0.575, 0.484, 0.972, 0.631),
}


def rebeca_label(cfg: float) -> str:
    """Row name of REBECA at prior CFG `cfg` in Table 2, e.g. 'REBECA (CFG=5.0)'."""
    return f"REBECA (CFG={float(cfg):.1f})"


def _check_definition(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"definition={definition!r}: valid definitions are {', '.join(DEFINITIONS)}")


def _unit(x: np.ndarray) -> np.ndarray:
    # float64 so the batched and the one-user paths rank near-ties identically
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _f1(p, r):
    p, r = np.asarray(p, dtype=float), np.asarray(r, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0)


def precision_recall_at_k(gen_emb, pool_emb, pool_liked, k: int, definition: str = "paper") -> tuple[float, float]:
    """Prec@k(u), Rec@k(u) of one user's m generated embeddings (m, d) against their pool (N, d) with likes (N,).

    paper (§4.4): Prec@k = (1/m) Σ_g 1[Top-k(g,u) ∩ L_u ≠ ∅]; Rec@k = (1/|L_u|) Σ_{ℓ∈L_u} 1[∃g: ℓ ∈ Top-k(g,u)].
    reference: retrieved = ∪_g Top-k(g,u); precision = |retrieved ∩ L_u| / |retrieved|; same recall.
    Ties in cosine similarity go to the lower pool index. Recall is NaN when the user has no liked pool item.
    """
    _check_definition(definition)
    gen, pool = _unit(np.atleast_2d(gen_emb)), _unit(np.atleast_2d(pool_emb))
    liked = np.asarray(pool_liked, dtype=bool).reshape(-1)
    if len(gen) == 0:
        raise ValueError("no generated samples for this user")
    if len(liked) != len(pool) or gen.shape[1] != pool.shape[1]:
        raise ValueError(f"shapes disagree: gen {gen.shape}, pool {pool.shape}, pool_liked {liked.shape}")
    if not 1 <= k <= len(pool):
        raise ValueError(f"k={k} but the user's pool has {len(pool)} items (need 1 <= k <= pool size)")
    top = np.argsort(-(gen @ pool.T), axis=1, kind="stable")[:, :k]  # Top-k(g, u), one row per sample g
    retrieved = np.unique(top)
    n_likes = int(liked.sum())
    recall = liked[retrieved].sum() / n_likes if n_likes else float("nan")
    precision = liked[top].any(axis=1).mean() if definition == "paper" else liked[retrieved].mean()
    return float(precision), float(recall)


def _pad(values: np.ndarray, group: np.ndarray, n_groups: int):
    """Rows of `values` grouped by `group` (stable) into (n_groups, max size, ...) with a validity mask."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    counts = np.bincount(g, minlength=n_groups)
    slot = np.arange(len(g)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[g]
    out = np.zeros((n_groups, max(int(counts.max(initial=0)), 1)) + values.shape[1:], dtype=values.dtype)
    mask = np.zeros(out.shape[:2], dtype=bool)
    out[g, slot], mask[g, slot] = values[order], True
    return out, mask


def retrieval_metrics(gen_emb, gen_user, pool_emb, pool_user, pool_liked, ks=(1, 5), definition: str = "paper",
                      min_likes: int = 1):
    """Prec/Rec/F1@k for all users at once -> (per_user, summary) DataFrames; macro-averages over kept users.

    per_user: user_id, k, precision, recall, f1 (per user), n_gen, n_pool, n_likes (kept users only).
    summary: k, precision, recall, f1, users, users_dropped. F1 = 2PR/(P+R) of the macro-averaged P and R for
    definition="paper" (§4.4), the mean of per-user F1 for "reference" (its code). Users seen in gen_user or
    pool_user with no generated sample or fewer than `min_likes` held-out likes are dropped and counted (the
    reference code dropped users with < 3 likes without saying). k larger than a kept user's pool raises.
    """
    import pandas as pd

    _check_definition(definition)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={ks}: need at least one k >= 1")
    if min_likes < 1:
        raise ValueError(f"min_likes={min_likes}: Rec@k divides by |L_u|, so min_likes must be >= 1")
    gen, pool = _unit(np.atleast_2d(gen_emb)), _unit(np.atleast_2d(pool_emb))
    gen_user, pool_user = np.asarray(gen_user).reshape(-1), np.asarray(pool_user).reshape(-1)
    liked = np.asarray(pool_liked, dtype=bool).reshape(-1)
    if len(gen_user) != len(gen) or len(pool_user) != len(pool) or len(liked) != len(pool):
        raise ValueError(f"lengths disagree: gen_emb {len(gen)}, gen_user {len(gen_user)}, pool_emb {len(pool)}, "
                         f"pool_user {len(pool_user)}, pool_liked {len(liked)}")
    if gen.shape[1] != pool.shape[1]:
        raise ValueError(f"embedding dims disagree: gen {gen.shape[1]}, pool {pool.shape[1]}")
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
    U = len(kept)
    if U == 0:
        raise ValueError(f"no user has a generated sample and >= {min_likes} held-out likes")
    remap = np.full(len(users), -1)
    remap[kept] = np.arange(U)
    gsel, psel = keep[g_u], keep[p_u]
    G, gmask = _pad(gen[gsel], remap[g_u[gsel]], U)  # (U, M, d)
    P, pmask = _pad(pool[psel], remap[p_u[psel]], U)  # (U, N, d)
    L, _ = _pad(liked[psel], remap[p_u[psel]], U)  # (U, N)
    sim = np.matmul(G, P.transpose(0, 2, 1))
    sim[~np.broadcast_to(pmask[:, None, :], sim.shape)] = -np.inf  # padding never enters Top-k
    top = np.argsort(-sim, axis=-1, kind="stable")[..., : max(ks)]  # (U, M, kmax)
    hit = np.take_along_axis(np.broadcast_to(L[:, None, :], sim.shape), top, axis=-1)
    rows, summary = [], []
    ng, nl = n_gen[kept], n_likes[kept]
    for k in ks:
        u_idx = np.broadcast_to(np.arange(U)[:, None, None], (U, top.shape[1], k))[gmask]
        retrieved = np.zeros_like(L)
        retrieved[u_idx.reshape(-1), top[..., :k][gmask].reshape(-1)] = True
        tp = (retrieved & L).sum(1)
        recall = tp / nl
        if definition == "paper":
            precision = (hit[..., :k].any(-1) & gmask).sum(1) / ng
        else:
            precision = tp / retrieved.sum(1)
        f1 = _f1(precision, recall)
        rows.append(pd.DataFrame(dict(user_id=users[kept], k=k, precision=precision, recall=recall, f1=f1,
                                      n_gen=ng, n_pool=n_pool[kept], n_likes=nl)))
        P_mac, R_mac = precision.mean(), recall.mean()
        summary.append(dict(k=k, precision=P_mac, recall=R_mac,
                            f1=float(_f1(P_mac, R_mac)) if definition == "paper" else f1.mean(),
                            users=U, users_dropped=int(len(users) - U)))
    return pd.concat(rows, ignore_index=True), pd.DataFrame(summary)


def table2(per_method: dict, ks=(1, 5), with_paper: bool = False):
    """Table 2 layout: rows = method/setting, columns (@k, P/R/F1); with_paper adds a 'paper' column beside 'ours'.

    per_method maps a row name (use PAPER_TABLE2's names, e.g. rebeca_label(5.0)) to a `retrieval_metrics`
    summary. With with_paper=True, the paper's rows we have no result for are listed too (ours = NaN).
    """
    import pandas as pd

    cols = [(f"@{k}", m) for k in ks for m in ("P", "R", "F1")]
    ours = {}
    for name, s in per_method.items():
        s = s.set_index("k")
        missing = [k for k in ks if k not in s.index]
        if missing:
            raise ValueError(f"{name!r}: summary has no k={missing}")
        ours[name] = [s.loc[k, c] for k in ks for c in ("precision", "recall", "f1")]
    names = list(per_method) + ([n for n in PAPER_TABLE2 if n not in per_method] if with_paper else [])
    out = pd.DataFrame([ours.get(n, [np.nan] * len(cols)) for n in names], index=pd.Index(names, name="method"),
                       columns=pd.MultiIndex.from_tuples(cols))
    if not with_paper:
        return out
    lookup = {(f"@{k}", m): i for i, (k, m) in enumerate(TABLE2_COLUMNS)}
    paper = pd.DataFrame([[PAPER_TABLE2[n][lookup[c]] if n in PAPER_TABLE2 and c in lookup else np.nan
                           for c in cols] for n in names], index=out.index, columns=out.columns)
    both = pd.concat({"ours": out, "paper": paper}, axis=1).reorder_levels([1, 2, 0], axis=1)
    return both[[(a, b, s) for a, b in cols for s in ("ours", "paper")]]


# ---------------------------------------------------------------------------------------------------------------
# Verifier scores (eq. 5), wins and ranks (App J), permutation tests (§4.5, App I), R² (§4.5, Figure 8b)
# ---------------------------------------------------------------------------------------------------------------


def user_scores(scores, owner, **labels):
    """Eq. 5 per user: mean verifier score v(u, I) over u's generated images -> DataFrame[user_id, score, n, *labels].

    `labels` become constant columns (e.g. method="REBECA", cfg=5.0) so several methods concatenate into one
    long table for `verifier_boxplots` / `wins_and_ranks`.
    """
    import pandas as pd

    scores, owner = np.asarray(scores, dtype=float).reshape(-1), np.asarray(owner).reshape(-1)
    if len(scores) != len(owner):
        raise ValueError(f"scores has {len(scores)} entries but owner has {len(owner)}")
    out = (pd.DataFrame(dict(user_id=owner, score=scores)).groupby("user_id", sort=True)["score"]
           .agg(score="mean", n="size").reset_index())
    for name, value in labels.items():
        out[name] = value
    return out


def wins_and_ranks(per_user, method: str = "method", value: str = "score", higher_is_better: bool = True) -> dict:
    """Per-user winner and ranks (1 = best, ties share the best rank) over a users x methods matrix (Figs 10/11).

    per_user: a wide DataFrame (index users, columns methods) or a long one with columns user_id, `method`,
    `value` (e.g. `user_scores` outputs concatenated). Users missing any method are dropped and counted.
    Returns dict(matrix, winner, ranks, win_counts, rank_counts, users_dropped).
    """
    import pandas as pd

    if "user_id" in getattr(per_user, "columns", []):
        matrix = per_user.pivot(index="user_id", columns=method, values=value)
        matrix = matrix[list(dict.fromkeys(per_user[method]))]  # keep the order methods were given in
    else:
        matrix = pd.DataFrame(per_user)
    complete = matrix.dropna()
    if complete.empty:
        raise ValueError("no user has a score for every method")
    ranks = complete.rank(axis=1, ascending=not higher_is_better, method="min").astype(int)
    winner = complete.idxmax(axis=1) if higher_is_better else complete.idxmin(axis=1)
    methods = list(complete.columns)
    win_counts = winner.value_counts().reindex(methods, fill_value=0)
    rank_counts = ranks.apply(lambda c: c.value_counts()).reindex(range(1, len(methods) + 1)).fillna(0).astype(int).T
    return dict(matrix=complete, winner=winner, ranks=ranks, win_counts=win_counts, rank_counts=rank_counts,
                users_dropped=int(len(matrix) - len(complete)))


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
