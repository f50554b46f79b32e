"""Diffusion core shared by every study: the training schedule, objectives and the prior's training loop (eq. 3)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..config import DiffusionConfig, TrainConfig
from ..data.splits import split_mask
from ..models.prior import count_parameters
from ..progress import tqdm
from .early_stopping import EarlyStopping


def make_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training schedule: DDPMScheduler(1000, squaredcos_cap_v2, clip_sample=False, prediction_type=sample)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        clip_sample=False,
        prediction_type=cfg.prediction_type,
    )


def diffusion_target(sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses: x0 (eq. 3), epsilon, or v."""
    kind = sched.config.prediction_type
    if kind == "sample":
        return x0
    if kind == "epsilon":
        return noise
    return sched.get_velocity(x0, noise, t)


@dataclass
class Triplets:
    """(img_emb, user_id, rating) rows held as tensors; rows are sorted by user for O(1) per-user draws."""

    img_emb: torch.Tensor
    user_id: torch.Tensor
    rating: torch.Tensor

    def __post_init__(self):
        n = len(self.img_emb)
        if not (len(self.user_id) == len(self.rating) == n):
            raise ValueError(f"Triplets: lengths differ (img_emb {n}, user_id {len(self.user_id)}, rating {len(self.rating)})")
        if not torch.isfinite(self.img_emb).all():
            raise ValueError("Triplets: img_emb contains NaN or inf")
        order = torch.argsort(self.user_id, stable=True)
        self.img_emb, self.user_id, self.rating = self.img_emb[order], self.user_id[order].long(), self.rating[order].long()

    def __len__(self) -> int:
        return len(self.img_emb)

    def to(self, device) -> "Triplets":
        return Triplets(self.img_emb.to(device), self.user_id.to(device), self.rating.to(device))


def epoch_indices(data: Triplets, samples_per_user: int, gen: torch.Generator) -> torch.Tensor:
    """An epoch: `samples_per_user` rows drawn uniformly (with replacement) per user, shuffled."""
    users, counts = torch.unique_consecutive(data.user_id, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    u = torch.arange(len(users), device=counts.device).repeat_interleave(samples_per_user)
    offs = (torch.rand(len(u), generator=gen, device=counts.device) * counts[u]).long()
    idx = starts[u] + offs
    return idx[torch.randperm(len(idx), generator=gen, device=counts.device)]


def drop_conditioning(user_id, rating, model, cfg: TrainConfig, gen: torch.Generator):
    """Classifier-free-guidance dropout: joint drop with p_uncond, plus independent user/rating drops."""
    B = len(user_id)
    r = torch.rand(3, B, generator=gen, device=user_id.device)
    joint = r[0] < cfg.p_uncond
    drop_u = joint | (r[1] < cfg.p_drop_user)
    drop_r = joint | (r[2] < cfg.p_drop_rating)
    return user_id.masked_fill(drop_u, model.null_user), rating.masked_fill(drop_r, model.null_rating)


def diffusion_loss(model, sched, x0, user_id, rating, gen: torch.Generator) -> torch.Tensor:
    """MSE between the network output and the objective's target at uniform t (eq. 3 for `sample`)."""
    B = x0.shape[0]
    t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen, device=x0.device)
    noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    x_t = sched.add_noise(x0, noise, t)
    return F.mse_loss(model(x_t, t, user_id, rating), diffusion_target(sched, x0, noise, t))


@torch.no_grad()
def validation_loss(model, sched, data: Triplets, batch_size: int = 1024, seed: int = 1234) -> float:
    """Mean loss on `data` with fixed t and noise (same seed each call), so epochs are comparable."""
    model.eval()
    gen = torch.Generator(data.img_emb.device).manual_seed(seed)
    total = torch.zeros((), device=data.img_emb.device)
    for s in range(0, len(data), batch_size):
        sl = slice(s, s + batch_size)
        loss = diffusion_loss(model, sched, data.img_emb[sl], data.user_id[sl], data.rating[sl], gen)
        total += loss * len(data.img_emb[sl])
    model.train()
    return float(total) / len(data)


@dataclass
class TrainResult:
    """History and summary of one training run."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = float("inf")
    epochs: int = 0
    wall_time_s: float = 0.0
    lr_drops: list[int] = field(default_factory=list)
    stopped_early: bool = False

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def train_prior(model, sched, train: Triplets, val: Triplets, cfg: TrainConfig, seed: int = 0,
                device: str = "cpu", progress: bool = True) -> TrainResult:
    """AdamW + ReduceLROnPlateau + early stopping on validation loss; the best state is restored."""
    model.to(device).train()
    train, val = train.to(device), val.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    gen = torch.Generator(device).manual_seed(seed)
    res, stopper, t0 = TrainResult(), EarlyStopping(cfg.patience), time.perf_counter()
    bar = tqdm(range(cfg.max_epochs), desc="train prior", disable=not progress)
    for epoch in bar:
        idx = epoch_indices(train, cfg.samples_per_user, gen)
        loss_sum = torch.zeros((), device=device)
        for s in range(0, len(idx), cfg.batch_size):
            b = idx[s : s + cfg.batch_size]
            u, r = drop_conditioning(train.user_id[b], train.rating[b], model, cfg, gen)
            loss = diffusion_loss(model, sched, train.img_emb[b], u, r, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(b)  # stays on device: one host sync per epoch
        row = {"epoch": epoch, "train_loss": float(loss_sum) / len(idx), "lr": opt.param_groups[0]["lr"]}
        row["val_loss"] = validation_loss(model, sched, val)
        row["time_s"] = time.perf_counter() - t0
        res.history.append(row)
        plateau.step(row["val_loss"])
        if opt.param_groups[0]["lr"] < row["lr"]:
            res.lr_drops.append(epoch)
        stopper.step(model, epoch, row["val_loss"])
        bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}")
        if stopper.stop:
            break
    return stopper.finish(model, res, t0)


def flickr_triplets(splits: pd.DataFrame, img_emb: torch.Tensor, split: str, include_holdout: bool = False) -> Triplets:
    """(img_emb, user_id, like) rows of one split; `img_emb` is aligned with the rows of `splits` (join_embeddings)."""
    rows = np.flatnonzero(split_mask(splits, split, include_holdout))
    return Triplets(img_emb[rows].float(), torch.as_tensor(splits["user_id"].to_numpy()[rows]),
                    torch.as_tensor(splits["like"].to_numpy()[rows].astype(np.int64)))


def training_log(result, model, extra: dict | None = None) -> dict:
    """What notebook 03 records about a run: epochs, wall time, best val loss, params, learning-rate drops."""
    return {**result.summary(), "params": count_parameters(model), "config": model.init_config(),
            **(extra or {})}
