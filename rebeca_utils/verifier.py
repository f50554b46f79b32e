"""Personalization verifier (§4.3.2, App H): Neural Matrix Factorization (He et al., 2017) for P(like | user, image).

v(U, I) = g(U, CLIP(I)): a trainable user embedding and a FROZEN verifier-space image embedding (OpenCLIP
ViT-bigG-14 in the paper, stored raw). Reads top to bottom: the model -> interactions from the split table ->
training (BCE, early stopping) -> prediction / scoring of real or generated images -> ROC-AUC with a bootstrap
(Figure 9) -> save / load.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .config import VerifierConfig
from .early_stopping import EarlyStopping

USER_WEIGHTINGS = ("none", "inverse_frequency")
SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- model


class NMFVerifier(nn.Module, PyTorchModelHubMixin, library_name="rebeca-kit", repo_url=None):
    """NeuMF over (user id, image embedding): GMF and MLP branches fused into one like-logit, plus biases."""

    def __init__(self, n_users: int, emb_dim: int, factor_dim: int = 64, mlp_dims: Sequence[int] = (256, 128, 64),
                 dropout: float = 0.1):
        super().__init__()
        if n_users < 1 or emb_dim < 1 or factor_dim < 1:
            raise ValueError(f"n_users, emb_dim, factor_dim must be >= 1 (got {n_users}, {emb_dim}, {factor_dim})")
        self.n_users, self.emb_dim, self.factor_dim = int(n_users), int(emb_dim), int(factor_dim)
        self.mlp_dims = tuple(int(h) for h in mlp_dims)  # config.json stores a list; keep one type

        # items are embeddings, not ids, so that generated images (never seen in training) can be scored
        self.item_proj = nn.Linear(emb_dim, factor_dim)
        self.user_gmf = nn.Embedding(n_users, factor_dim)
        self.user_mlp = nn.Embedding(n_users, factor_dim)
        layers: list[nn.Module] = []
        width = 2 * factor_dim
        for h in self.mlp_dims:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.fuse = nn.Linear(factor_dim + width, 1)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Linear(emb_dim, 1)
        nn.init.zeros_(self.user_bias.weight)
        # user factors keep PyTorch's N(0, 1), not He et al.'s N(0, 0.01): with a few thousand interactions the tiny
        # init lingers on the GMF saddle (user x item factor ~ 0) until early stopping fires; on the smoke fixture
        # N(0, 1) lifts the within-user test AUC by ~0.04 (3 fixtures x 3 seeds)
        self.register_buffer("emb_mean", torch.zeros(emb_dim))  # set from the training embeddings, see forward
        self.register_buffer("emb_std", torch.ones(emb_dim))

    @torch.no_grad()
    def fit_standardizer(self, img_emb: torch.Tensor) -> None:
        """Set the per-dimension mean / std of the L2-normalised embeddings from (training) data."""
        x = F.normalize(img_emb.float(), dim=-1)
        self.emb_mean.copy_(x.mean(0))
        self.emb_std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.emb_mean))

    def forward(self, user_id: torch.Tensor, img_emb: torch.Tensor) -> torch.Tensor:
        """Like-logits (B,) for user ids (B,) and raw verifier-space embeddings (B, emb_dim)."""
        # raw bigG embeddings differ in norm from image to image; only the direction should carry taste
        x = F.normalize(img_emb.float(), dim=-1)
        # CLIP directions share a large common component (mean cosine 0.82 for the tiny encoder); what tells images
        # apart is small. Standardising is an affine reparametrisation of the Linear layers below (same function
        # class) that puts that signal on a unit scale for the optimiser (smoke fixture: within-user AUC +0.03)
        x = (x - self.emb_mean) / self.emb_std
        v = self.item_proj(x)
        gmf = self.user_gmf(user_id) * v
        mlp = self.mlp(torch.cat([self.user_mlp(user_id), v], dim=-1))
        logit = self.fuse(torch.cat([gmf, mlp], dim=-1)) + self.user_bias(user_id) + self.item_bias(x)
        return logit.squeeze(-1)

    @classmethod
    def from_config(cls, cfg: VerifierConfig, n_users: int, emb_dim: int) -> "NMFVerifier":
        """Build from a `rebeca_utils.config.VerifierConfig` (training fields are ignored here)."""
        return cls(n_users=n_users, emb_dim=emb_dim, factor_dim=cfg.factor_dim, mlp_dims=cfg.mlp_dims,
                   dropout=cfg.dropout)


# ----------------------------------------------------------------------------------------------- data


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


EmbLookup = Callable[[list[str]], torch.Tensor] | tuple[Sequence[str], torch.Tensor]


def _embed_names(emb_lookup: EmbLookup, names: list[str]) -> tuple[torch.Tensor, list[bool]]:
    """(embeddings of the names found, found-mask) for unique `names`."""
    if isinstance(emb_lookup, tuple):
        all_names, emb = emb_lookup
        if len(all_names) != len(emb):
            raise ValueError(f"emb_lookup: {len(all_names)} names but {len(emb)} embedding rows")
        index = {n: i for i, n in enumerate(all_names)}
        found = [n in index for n in names]
        rows = [index[n] for n in names if n in index]
        return torch.as_tensor(emb)[torch.tensor(rows, dtype=torch.long)], found
    if not callable(emb_lookup):
        raise TypeError("emb_lookup must be a callable(list[str]) -> tensor or a tuple (names, embeddings)")
    try:
        return torch.as_tensor(emb_lookup(names)), [True] * len(names)
    except KeyError:  # some names have no embedding: find which, one by one
        found, embs = [], []
        for n in names:
            try:
                embs.append(torch.as_tensor(emb_lookup([n])))
                found.append(True)
            except KeyError:
                found.append(False)
        return (torch.cat(embs) if embs else torch.zeros(0, 0)), found


def interactions(splits: pd.DataFrame, emb_lookup: EmbLookup, split: str | tuple[str, ...],
                 include_holdout: bool = False) -> Interactions:
    """Rows of `split` (one name or several) of the FLICKR split table, with verifier-space embeddings.

    `emb_lookup`: a callable(list of image names) -> (n, d) tensor (e.g. `EmbeddingStore.lookup`), or a tuple
    (names, (N, d) embeddings) as returned by `embeddings.load_embeddings`. Rows whose image has no embedding are
    dropped, counted in `n_dropped` and logged. Hold-out workers are left out unless `include_holdout`.
    """
    wanted = (split,) if isinstance(split, str) else tuple(split)
    bad = [s for s in wanted if s not in SPLITS]
    if bad or not wanted:
        raise ValueError(f"split={split!r}: valid splits are {', '.join(SPLITS)} (or a tuple of them)")
    missing = [c for c in ("user_id", "image", "like", "split", "holdout") if c not in splits.columns]
    if missing:
        raise ValueError(f"splits lacks column(s) {missing}")
    keep = splits["split"].isin(wanted).to_numpy().copy()  # pandas 3 hands out read-only views
    if not include_holdout:
        keep &= ~splits["holdout"].to_numpy(dtype=bool)
    rows = np.flatnonzero(keep)
    images = splits["image"].to_numpy()[rows]
    names = list(dict.fromkeys(images.tolist()))
    emb, found = _embed_names(emb_lookup, names)
    pos = {n: i for i, n in enumerate(n for n, f in zip(names, found) if f)}
    has = np.fromiter((im in pos for im in images), dtype=bool, count=len(images))
    n_dropped = int((~has).sum())
    if n_dropped:
        log.warning("interactions(%s): dropped %d of %d rows whose image has no embedding (%d images)",
                    "+".join(wanted), n_dropped, len(rows), len(names) - len(pos))
    rows, images = rows[has], images[has]
    take = torch.tensor([pos[im] for im in images], dtype=torch.long)
    img_emb = emb[take].float() if len(take) else torch.zeros(0, emb.shape[-1] if emb.ndim == 2 else 0)
    return Interactions(
        user_id=torch.as_tensor(splits["user_id"].to_numpy()[rows].astype(np.int64)),
        img_emb=img_emb.contiguous(),
        like=torch.as_tensor(splits["like"].to_numpy()[rows].astype(np.float32)),
        rows=rows.astype(np.int64), n_dropped=n_dropped)


# ----------------------------------------------------------------------------------------------- training


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
    auc = roc_auc(y, logits.cpu().numpy()) if 0 < y.sum() < len(y) else float("nan")
    return float(loss), auc


def train_verifier(model: NMFVerifier, train: Interactions, val: Interactions, cfg: VerifierConfig, seed: int = 0,
                   device: str = "cpu", progress: bool = True) -> VerifierResult:
    """AdamW on (weighted) BCE; early stopping on validation loss, the best state restored; deterministic per seed.

    The model's embedding standardiser is set from `train` first. `cfg.user_weighting`: "none" (plain BCE, the
    paper) or "inverse_frequency" (each row weighted 1 / that user's rows, so users weigh equally; reference code).
    """
    from tqdm.auto import tqdm

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
                res.stopped_early = True
                break
    res.epochs, res.best_val_loss, res.best_epoch = len(res.history), stopper.best, stopper.best_epoch
    res.wall_time_s = time.perf_counter() - t0
    stopper.restore(model)
    model.eval()
    return res


# ----------------------------------------------------------------------------------------------- scoring


def _user_vector(user_ids: Any, n: int) -> torch.Tensor:
    u = (user_ids.detach().cpu() if torch.is_tensor(user_ids) else torch.as_tensor(np.asarray(user_ids))).long()
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


def embed_pil(images: Sequence[Any], encoder, batch_size: int = 64) -> torch.Tensor:
    """(N, encoder.dim) raw embeddings of PIL images or image paths, through an `embeddings.Encoder`."""
    from PIL import Image

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
            raise ValueError("encoder is required to score images (pass embeddings.build_encoder('verifier', ...))")
        if encoder.dim != model.emb_dim:
            raise ValueError(f"encoder gives {encoder.dim}-d embeddings, the model expects {model.emb_dim}")
        _user_vector(user_ids, len(x))  # length check before the expensive part
        x = embed_pil(x, encoder, batch_size)
    return predict(model, user_ids, x, batch_size=max(batch_size, 4096), device=device)


# ----------------------------------------------------------------------------------------------- ROC-AUC


def roc_auc(y: Any, p: Any) -> float:
    """ROC-AUC of scores `p` for binary labels `y`."""
    from sklearn.metrics import roc_auc_score

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


# ----------------------------------------------------------------------------------------------- persistence


def save_verifier(model: NMFVerifier, folder: str | os.PathLike) -> Path:
    """`save_pretrained` into a temp folder next to `folder`, then renamed into place (no half-written model)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        if folder.exists():  # swap: move the previous model aside, put the new one in, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "x")
        try:
            os.replace(tmp, folder)
        except OSError:
            if old is not None:
                os.replace(old / "x", folder)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_verifier(folder: str | os.PathLike, device: str = "cpu") -> NMFVerifier:
    """A verifier saved by `save_verifier`, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no saved verifier (config.json missing)")
    return NMFVerifier.from_pretrained(folder).to(device).eval()
