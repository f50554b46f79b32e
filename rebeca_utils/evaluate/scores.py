"""Verifier scores of real or generated images, per-user means (eq. 5), wins and ranks (App J)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..models.nmf import NMFVerifier


def user_scores(scores, owner, **labels):
    """Eq. 5 per user: mean verifier score v(u, I) over u's generated images -> DataFrame[user_id, score, n, *labels].

    `labels` become constant columns (e.g. method="REBECA", cfg=5.0) so several methods concatenate into one
    long table for `verifier_boxplots` / `wins_and_ranks`.
    """
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


def _user_vector(user_ids: Any, n: int) -> torch.Tensor:
    u = (user_ids.detach().cpu() if torch.is_tensor(user_ids) else torch.as_tensor(np.array(user_ids))).long()  # a copy: pandas arrays may be read-only
    if u.ndim == 0:
        return u.expand(n)
    u = u.reshape(-1)
    if len(u) != n:
        raise ValueError(f"user_ids has {len(u)} entries but there are {n} images (pass one id or one per image)")
    return u


@torch.no_grad()
def predict(model: NMFVerifier, user_ids: Any, img_emb: Any, batch_size: int = 4096, device: str = "cpu") -> np.ndarray:
    """P(like) as float64 (N,) for raw verifier-space embeddings (N, d); `user_ids` one id or one per row."""
    x = (img_emb.detach().cpu() if torch.is_tensor(img_emb) else torch.as_tensor(np.asarray(img_emb))).float()
    if x.ndim != 2 or x.shape[1] != model.emb_dim:
        raise ValueError(f"img_emb has shape {tuple(x.shape)}, the model expects (N, {model.emb_dim})")
    u = _user_vector(user_ids, len(x))
    if len(u) and (int(u.min()) < 0 or int(u.max()) >= model.n_users):
        raise ValueError(f"user_ids outside 0..{model.n_users - 1}")
    was_training = model.training
    model.to(device).eval()
    out = [torch.sigmoid(model(u[s:s + batch_size].to(device), x[s:s + batch_size].to(device))).double().cpu()
           for s in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def score_matrix(model: NMFVerifier, user_ids: Any, img_emb: Any, batch_size: int = 4096,
                 device: str = "cpu") -> np.ndarray:
    """(n_users, n_images) float64 verifier scores: row r is P(like) of user user_ids[r] for every embedding."""
    x = (img_emb.detach().cpu() if torch.is_tensor(img_emb) else torch.as_tensor(np.asarray(img_emb))).float()
    users = np.asarray(user_ids.cpu() if torch.is_tensor(user_ids) else user_ids).reshape(-1)
    rows = [predict(model, int(u), x, batch_size, device) for u in users]
    return np.stack(rows) if rows else np.zeros((0, len(x)))


def embed_pil(images: Sequence[Any], encoder, batch_size: int = 64) -> torch.Tensor:
    """(N, encoder.dim) raw embeddings of PIL images or image paths, through a `models.encoders.Encoder`."""
    out = []
    for s in range(0, len(images), batch_size):
        pixels = []
        for im in images[s:s + batch_size]:
            if isinstance(im, (str, os.PathLike)):
                with Image.open(im) as f:
                    im = f.convert("RGB")
            pixels.append(encoder.transform(im.convert("RGB")))
        out.append(encoder.encode(torch.stack(pixels)))
    return torch.cat(out) if out else torch.zeros(0, encoder.dim)


def _is_image(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) or hasattr(x, "convert")  # a path or a PIL image


def score(model: NMFVerifier, user_ids: Any, x: Any, encoder=None, batch_size: int = 64,
          device: str = "cpu") -> np.ndarray:
    """Verifier score v(U, I) (eq. 5) of (N, d) embeddings, or of PIL images / image paths embedded by `encoder`."""
    if isinstance(x, (list, tuple)) and len(x) and _is_image(x[0]):
        if encoder is None:
            raise ValueError("encoder is required to score images (pass models.encoders.build_encoder('verifier', ...))")
        if encoder.dim != model.emb_dim:
            raise ValueError(f"encoder gives {encoder.dim}-d embeddings, the model expects {model.emb_dim}")
        _user_vector(user_ids, len(x))  # length check before the expensive part
        x = embed_pil(x, encoder, batch_size)
    return predict(model, user_ids, x, batch_size=max(batch_size, 4096), device=device)
