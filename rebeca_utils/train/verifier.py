"""Training the NMF verifier: interactions from the split table, BCE (optionally user-weighted), early stopping."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ..config import VerifierConfig
from ..data.splits import join_embeddings, split_mask
from ..models.nmf import NMFVerifier
from ..progress import tqdm
from .early_stopping import EarlyStopping

log = logging.getLogger(__name__)


USER_WEIGHTINGS = ("none", "inverse_frequency")

SPLITS = ("train", "val", "test")


@dataclass
class Interactions:
    """(user_id, img_emb, like) rows; `rows` indexes the split table, `n_dropped` counts rows without embedding."""

    user_id: torch.Tensor  # (N,) long
    img_emb: torch.Tensor  # (N, d) float32, raw
    like: torch.Tensor  # (N,) float32 in {0, 1}
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    n_dropped: int = 0

    def __len__(self) -> int:
        return len(self.user_id)

    def to(self, device: str) -> "Interactions":
        return Interactions(self.user_id.to(device), self.img_emb.to(device), self.like.to(device), self.rows,
                            self.n_dropped)


def interactions(splits: pd.DataFrame, store: Any, split: str | tuple[str, ...],
                 include_holdout: bool = False) -> Interactions:
    """Rows of `split` (one name or several) of the FLICKR split table, with verifier-space embeddings.

    `store`: (names, (N, d) embeddings) as `load_embeddings` returns, or an `EmbeddingStore`. Rows whose image has
    no embedding are dropped, counted in `n_dropped` and logged. Hold-out workers are left out unless `include_holdout`.
    """
    wanted = (split,) if isinstance(split, str) else tuple(split)
    bad = [s for s in wanted if s not in SPLITS]
    if bad or not wanted:
        raise ValueError(f"split={split!r}: valid splits are {', '.join(SPLITS)} (or a tuple of them)")
    missing = [c for c in ("user_id", "image", "like", "split", "holdout") if c not in splits.columns]
    if missing:
        raise ValueError(f"splits lacks column(s) {missing}")
    rows, img_emb = join_embeddings(splits, store, wanted, include_holdout)
    n_dropped = int(split_mask(splits, wanted, include_holdout).sum()) - len(rows)
    if n_dropped:
        log.warning("interactions(%s): dropped %d rows whose image has no embedding", "+".join(wanted), n_dropped)
    return Interactions(
        user_id=torch.as_tensor(splits["user_id"].to_numpy()[rows].astype(np.int64)),
        img_emb=img_emb.float().contiguous(),
        like=torch.as_tensor(splits["like"].to_numpy()[rows].astype(np.float32)),
        rows=rows.astype(np.int64), n_dropped=n_dropped)


@dataclass
class VerifierResult:
    """History and summary of one verifier training run."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = float("inf")
    best_val_auc: float = float("nan")
    epochs: int = 0
    stopped_early: bool = False
    wall_time_s: float = 0.0

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def user_weights(user_id: torch.Tensor, user_weighting: str) -> torch.Tensor:
    """Per-row loss weights with mean 1: all ones ("none") or 1/(the user's interactions), rescaled."""
    if user_weighting not in USER_WEIGHTINGS:
        raise ValueError(f"user_weighting={user_weighting!r}: valid values are {', '.join(USER_WEIGHTINGS)}")
    if user_weighting == "none":
        return torch.ones(len(user_id), device=user_id.device)
    counts = torch.bincount(user_id)
    w = 1.0 / counts[user_id].float()
    return w * (len(w) / w.sum())  # mean 1, so losses stay on the plain-BCE scale


def _check_data(model: NMFVerifier, data: Interactions, name: str) -> None:
    if len(data) == 0:
        raise ValueError(f"{name}: no interactions")
    if data.img_emb.ndim != 2 or data.img_emb.shape[1] != model.emb_dim:
        raise ValueError(f"{name}: img_emb has shape {tuple(data.img_emb.shape)}, the model expects "
                         f"(N, {model.emb_dim})")
    if int(data.user_id.min()) < 0 or int(data.user_id.max()) >= model.n_users:
        raise ValueError(f"{name}: user_id outside 0..{model.n_users - 1} (max {int(data.user_id.max())})")


@torch.no_grad()
def _eval_loss_auc(model: NMFVerifier, data: Interactions, w: torch.Tensor, batch_size: int) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(data.user_id[s:s + batch_size], data.img_emb[s:s + batch_size])
                        for s in range(0, len(data), batch_size)])
    loss = F.binary_cross_entropy_with_logits(logits, data.like, weight=w, reduction="sum") / w.sum()
    model.train()
    y = data.like.cpu().numpy()
    auc = float(roc_auc_score(y, logits.cpu().numpy())) if 0 < y.sum() < len(y) else float("nan")
    return float(loss), auc


def train_verifier(model: NMFVerifier, train: Interactions, val: Interactions, cfg: VerifierConfig, seed: int = 0,
                   device: str = "cpu", progress: bool = True) -> VerifierResult:
    """AdamW on (weighted) BCE; early stopping on validation loss, the best state restored; deterministic per seed.

    The model's embedding standardiser is set from `train` first. `cfg.user_weighting`: "none" (plain BCE, the
    paper) or "inverse_frequency" (each row weighted 1 / that user's rows, so users weigh equally; reference code).
    """

    if cfg.user_weighting not in USER_WEIGHTINGS:
        raise ValueError(f"user_weighting={cfg.user_weighting!r}: valid values are {', '.join(USER_WEIGHTINGS)}")
    _check_data(model, train, "train")
    _check_data(model, val, "val")
    model.to(device).train()
    train, val = train.to(device), val.to(device)
    model.fit_standardizer(train.img_emb)
    w_train = user_weights(train.user_id, cfg.user_weighting)
    w_val = user_weights(val.user_id, cfg.user_weighting)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device).manual_seed(seed)
    res, stopper, t0 = VerifierResult(), EarlyStopping(cfg.patience), time.perf_counter()
    dev = torch.device(device)
    # dropout draws from the global RNG: fork and seed it, so a run is reproducible and leaves the caller's RNG alone
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        bar = tqdm(range(cfg.max_epochs), desc="train verifier", disable=not progress)
        for epoch in bar:
            perm = torch.randperm(len(train), generator=gen, device=device)
            loss_sum = torch.zeros((), device=device)
            for s in range(0, len(perm), cfg.batch_size):
                b = perm[s:s + cfg.batch_size]
                logits = model(train.user_id[b], train.img_emb[b])
                loss = (w_train[b] * F.binary_cross_entropy_with_logits(logits, train.like[b], reduction="none")).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(b)  # stays on device: one host sync per epoch
            row = {"epoch": epoch, "train_loss": float(loss_sum) / len(train), "lr": opt.param_groups[0]["lr"]}
            row["val_loss"], row["val_auc"] = _eval_loss_auc(model, val, w_val, max(cfg.batch_size, 4096))
            res.history.append(row)
            if stopper.step(model, epoch, row["val_loss"]):
                res.best_val_auc = row["val_auc"]
            bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}",
                            auc=f"{row['val_auc']:.3f}")
            if stopper.stop:
                break
    return stopper.finish(model, res, t0)


def fit_on_splits(splits: pd.DataFrame, store: Any, cfg: VerifierConfig, include_holdout: bool = False,
                  seed: int = 0, device: str = "cpu") -> tuple[NMFVerifier, VerifierResult, dict[str, Interactions]]:
    """Notebook 05's fit: interactions of train / val / test, an NMF verifier over every user id, early-stopped on val.

    `include_holdout` also trains on the hold-out workers' training ratings (notebook 12's measuring instrument)."""
    data = {s: interactions(splits, store, s, include_holdout) for s in SPLITS}
    n_users = int(splits["user_id"].max()) + 1
    model = NMFVerifier.from_config(cfg, n_users, data["train"].img_emb.shape[1])
    return model, train_verifier(model, data["train"], data["val"], cfg, seed=seed, device=device), data



def fit_user_row(model: NMFVerifier, img_emb: torch.Tensor, like: torch.Tensor, steps: int = 200, lr: float = 0.05,
                 l2: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A new user's (gmf, mlp, bias) rows fitted on their ratings with every verifier weight frozen (full-batch
    logistic loss, l2 towards the trained users' mean rows, no dropout); append them with model.add_users."""
    if len(img_emb) == 0 or len(img_emb) != len(like):
        raise ValueError(f"fit_user_row: {len(img_emb)} embeddings and {len(like)} ratings (need as many, >= 1)")
    dev = model.item_proj.weight.device
    means = [t.weight.detach().mean(0, keepdim=True) for t in (model.user_gmf, model.user_mlp, model.user_bias)]
    rows = [torch.nn.Parameter(m.clone()) for m in means]
    x, y = img_emb.to(dev).float(), like.to(dev).float()
    was_training, grads = model.training, [q.requires_grad for q in model.parameters()]
    model.eval().requires_grad_(False)
    opt = torch.optim.Adam(rows, lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model.with_rows(x, *rows), y)
        loss = loss + l2 * sum((r - m).pow(2).sum() for r, m in zip(rows, means))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.train(was_training)
    for q, g in zip(model.parameters(), grads):
        q.requires_grad_(g)
    return tuple(r.detach() for r in rows)
