"""Retrieval metrics shared by every study: nearest-neighbour Precision@k / Recall@k (§3.3, §4.4)."""
from __future__ import annotations

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


def precision_recall_at_k(gen_emb, pool_emb, pool_liked, k: int, definition: str = "paper"):
    """P@k and R@k for one user: generated embeddings (K, d) against the user's pool (N, d) and likes (N,)."""
    nn_idx = cosine_nn(np.asarray(gen_emb)[:k], pool_emb)
    p, r = pr_from_neighbours(nn_idx[None], np.asarray(pool_liked, dtype=bool)[None], k, definition)
    return float(p[0]), float(r[0])


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
