"""Diffusion core shared by every study: schedules, the training loop (eq. 3) and CFG sampling (eq. 4)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from .config import DiffusionConfig, TrainConfig
from .early_stopping import EarlyStopping

SAMPLERS = ("ddpm", "ddim", "dpmsolver")


def make_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training schedule: DDPMScheduler(1000, squaredcos_cap_v2, clip_sample=False, prediction_type=sample)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        clip_sample=False,
        prediction_type=cfg.prediction_type,
    )


def make_sampler(train_sched: DDPMScheduler, sampler: str, steps: int):
    """A sampling scheduler sharing the training betas; 'ddpm' is the paper's ancestral sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: valid samplers are {', '.join(SAMPLERS)}")
    betas = train_sched.betas.numpy()  # trained_betas: the fast samplers reuse the exact schedule (incl. laplace)
    if sampler == "ddpm":
        sched = DDPMScheduler.from_config(train_sched.config)
        sched.set_timesteps(steps)
        return sched
    common = dict(trained_betas=betas, timestep_spacing="trailing")  # trailing: the first step starts at pure noise
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(train_sched.config, **common, set_alpha_to_one=True)
    else:
        sched = DPMSolverMultistepScheduler.from_config(
            train_sched.config, **common, algorithm_type="dpmsolver++", solver_order=2
        )
    sched.set_timesteps(steps)
    return sched


def diffusion_target(sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses: x0 (eq. 3), epsilon, or v."""
    kind = sched.config.prediction_type
    if kind == "sample":
        return x0
    if kind == "epsilon":
        return noise
    return sched.get_velocity(x0, noise, t)


# ----------------------------------------------------------------------------- data in memory


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
            res.stopped_early = True
            break
    res.epochs, res.best_val_loss, res.best_epoch = len(res.history), stopper.best, stopper.best_epoch
    res.wall_time_s = time.perf_counter() - t0
    stopper.restore(model)
    model.eval()
    return res


# ----------------------------------------------------------------------------- sampling


def sample_seed(seed: int, user_id: int, index: int) -> int:
    """Per-sample seed from (seed, user, sample index): independent of batching and of other users."""
    return int(np.random.SeedSequence([seed, user_id, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generators(seed, user_ids, indices, device):
    return [torch.Generator(device).manual_seed(sample_seed(seed, int(u), int(j))) for u, j in zip(user_ids, indices)]


@torch.no_grad()
def _sample_batch(model, sched, user_id, rating, gens, cfg_scale):
    device = user_id.device
    x = torch.stack([torch.randn(model.emb_dim, generator=g, device=device) for g in gens])
    x = x * sched.init_noise_sigma
    guided = cfg_scale != 1.0  # at omega = 1, eq. 4 is the conditional branch alone
    if guided:
        u_in = torch.cat([user_id, torch.full_like(user_id, model.null_user)])
        r_in = torch.cat([rating, torch.full_like(rating, model.null_rating)])
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        tt = torch.full((len(x),), int(t), device=device, dtype=torch.long)
        if guided:
            cond, uncond = model(torch.cat([x_in, x_in]), torch.cat([tt, tt]), u_in, r_in).chunk(2)
            out = uncond + cfg_scale * (cond - uncond)  # eq. 4, both branches in one forward
        else:
            out = model(x_in, tt, user_id, rating)
        x = sched.step(out, t, x, generator=gens).prev_sample
    return x


@torch.no_grad()
def sample_prior(model, train_sched: DDPMScheduler, user_ids, ratings, indices, *, cfg_scale: float = 1.0,
                 sampler: str = "ddim", steps: int = 50, seed: int = 0, batch_size: int = 512,
                 device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """Sample embeddings for items (user_ids[i], ratings[i], indices[i]); each item has its own generator."""
    user_ids, ratings, indices = (torch.as_tensor(a).long().reshape(-1) for a in (user_ids, ratings, indices))
    if not (len(user_ids) == len(ratings) == len(indices)):
        raise ValueError("sample_prior: user_ids, ratings and indices must have the same length")
    if sampler == "ddpm":
        steps = train_sched.config.num_train_timesteps  # the paper's full ancestral chain
    model.to(device).eval()
    out = []
    n_batches = (len(user_ids) + batch_size - 1) // batch_size
    for s in tqdm(range(0, len(user_ids), batch_size), total=n_batches, desc=f"sample {sampler}", disable=not progress):
        sched = make_sampler(train_sched, sampler, steps)  # fresh state per batch (multistep solvers keep history)
        u, r = user_ids[s : s + batch_size].to(device), ratings[s : s + batch_size].to(device)
        gens = _generators(seed, u.tolist(), indices[s : s + batch_size].tolist(), device)
        out.append(_sample_batch(model, sched, u, r, gens, cfg_scale).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.emb_dim)


def sample_users(model, train_sched, users, n_per_user: int, rating: int = 1, **kw) -> torch.Tensor:
    """(len(users), n_per_user, d) samples with R = rating, sample j of user u seeded by (seed, u, j)."""
    users = torch.as_tensor(users).long()
    u = users.repeat_interleave(n_per_user)
    j = torch.arange(n_per_user).repeat(len(users))
    x = sample_prior(model, train_sched, u, torch.full_like(u, rating), j, **kw)
    return x.view(len(users), n_per_user, -1)
