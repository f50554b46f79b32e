"""Zero-shot new users (beyond the paper; §6 names history encoders as future work): a set encoder.

A user's history of (img_emb, rating) pairs becomes a row of the frozen prior's user table in one forward pass.
The encoder mixes the seen users' rows by how alike their tastes are (attention), corrected by a DeepSets term
(phi embeds each pair, the set is mean-pooled, order-free and of any size, rho maps the pool and log k). It trains
on the seen users only, with the prior frozen: each step draws users and a random sub-history of k = 1 … all-but-one
of a user's ratings; the loss is the prior's own diffusion loss on that user's other ratings through the encoded
row, plus `regress`·mean‖row − the user's learned row‖².
A history never attends to its own user while training (leave one out), as a new user is never among the seen.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.func import functional_call

from ..models.prior import RebecaPrior
from ..progress import tqdm
from ..runtime import seed_sequence, seeded
from .diffusion import diffusion_loss


def taste(img_emb: torch.Tensor, rating: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, d): the mean liked embedding minus the mean disliked one of each history (either may be absent)."""
    m = mask.to(img_emb)
    liked, disliked = m * rating.to(img_emb), m * (1 - rating.to(img_emb))
    mean = lambda w: (w[..., None] * img_emb).sum(1) / w.sum(1, keepdim=True).clamp(min=1)  # noqa: E731
    return mean(liked) - mean(disliked)


class HistoryEncoder(nn.Module, PyTorchModelHubMixin):
    """(img_emb, rating) pairs of one or more histories -> prior user rows (B, hidden_dim).

    Attention over the seen users: the history's taste (liked minus disliked mean), projected, is compared with
    each seen user's taste (cosine / temperature), and the row is the attention-weighted mix of their learned rows,
    plus a DeepSets correction (phi per pair, mean pool, rho; it starts at zero). So an encoded row starts on the
    seen users' manifold, as a soft nearest seen user."""

    def __init__(self, emb_dim: int, hidden_dim: int, n_seen: int, width: int = 256):
        super().__init__()
        self.emb_dim, self.hidden_dim, self.width = emb_dim, hidden_dim, width
        self.query = nn.Linear(emb_dim, emb_dim)
        nn.init.eye_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        self.log_temp = nn.Parameter(torch.tensor(-2.0))  # temperature e^-2 ≈ 0.14 on cosines
        self.register_buffer("seen_taste", torch.zeros(n_seen, emb_dim))  # set_memory() fills these
        self.register_buffer("seen_rows", torch.zeros(n_seen, hidden_dim))
        self.phi = nn.Sequential(nn.Linear(emb_dim + 2, width), nn.SiLU(), nn.Linear(width, width))
        self.rho = nn.Sequential(nn.SiLU(), nn.Linear(width + 1, width), nn.SiLU(), nn.Linear(width, hidden_dim))
        nn.init.zeros_(self.rho[-1].weight)
        nn.init.zeros_(self.rho[-1].bias)

    def set_memory(self, seen_taste: torch.Tensor, seen_rows: torch.Tensor) -> None:
        """The seen users' tastes (n_seen, d) and their rows in the prior (n_seen, hidden_dim)."""
        self.seen_taste.copy_(seen_taste)
        self.seen_rows.copy_(seen_rows)

    def forward(self, img_emb: torch.Tensor, rating: torch.Tensor, mask: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        """img_emb (B, K, d) normalised as the prior's inputs, rating (B, K) in {0, 1}, mask (B, K) True = rated;
        `exclude` (B,) the seen-user slot each history may not attend to (training: itself), -1 for none."""
        q = F.normalize(self.query(taste(img_emb, rating, mask)), dim=-1)
        logits = q @ F.normalize(self.seen_taste, dim=-1).T / self.log_temp.exp()
        if exclude is not None:
            logits = logits.masked_fill(F.one_hot(exclude.clamp(min=0), len(self.seen_rows)).bool()
                                        & (exclude >= 0)[:, None], float("-inf"))
        x = torch.cat([img_emb, F.one_hot(rating.long().clamp(0, 1), 2).to(img_emb)], -1)
        m = mask.to(img_emb)[..., None]
        k = m.sum(1).clamp(min=1)
        pooled = (self.phi(x) * m).sum(1) / k
        return logits.softmax(-1) @ self.seen_rows + self.rho(torch.cat([pooled, k.log()], -1))

    @torch.no_grad()
    def encode(self, img_emb: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
        """One history (K, d), (K,) -> its row (hidden_dim,)."""
        if len(img_emb) == 0 or len(img_emb) != len(rating):
            raise ValueError(f"encode: {len(img_emb)} embeddings and {len(rating)} ratings (need as many, >= 1)")
        dev = self.seen_rows.device
        mask = torch.ones(1, len(img_emb), dtype=torch.bool, device=dev)
        return self(img_emb[None].to(dev).float(), torch.as_tensor(rating)[None].to(dev), mask)[0]


@dataclass
class EncoderResult:
    """The trained encoder, its loss per step and the seconds it took."""

    encoder: HistoryEncoder
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    at: dict[int, dict] = field(default_factory=dict)  # step -> the encoder's state_dict after it (0: untrained)


def sub_histories(per_user: dict[int, np.ndarray], users: Sequence[int], rng: np.random.Generator, k_max: int,
                  n_target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each user: a random sub-history of k ∈ [1, min(n − 1, k_max)] rating rows (padded with -1) and
    `n_target` target rows drawn from the user's other ratings. Returns (context (B, K), mask, target (B, T))."""
    ctx, tgt = [], []
    for u in users:
        rows = rng.permutation(per_user[int(u)])
        k = int(rng.integers(1, min(len(rows) - 1, k_max) + 1))
        ctx.append(rows[:k])
        tgt.append(rng.choice(rows[k:], n_target, replace=True))
    K = max(len(c) for c in ctx)
    context = np.full((len(ctx), K), -1)
    for i, c in enumerate(ctx):
        context[i, : len(c)] = c
    return context, context >= 0, np.stack(tgt)


def train_encoder(prior: RebecaPrior, sched, img_emb: torch.Tensor, rating: torch.Tensor, user_id: torch.Tensor,
                  *, steps: int = 500, lr: float = 1e-3, batch_users: int = 16, n_target: int = 8, k_max: int = 64,
                  regress: float = 1.0, width: int = 256, checkpoints: Sequence[int] = (),
                  seed: int = 0, progress: bool = True) -> EncoderResult:
    """Train a HistoryEncoder on these users' ratings (the seen users; the prior stays frozen, bit for bit).

    img_emb are the prior's inputs (normalised); every user here needs a trained row and >= 2 ratings."""
    dev = prior.user_emb.weight.device
    uid = user_id.cpu().numpy()
    per_user = {int(u): np.flatnonzero(uid == u) for u in np.unique(uid)}
    few = [u for u, r in per_user.items() if len(r) < 2]
    if few:
        raise ValueError(f"train_encoder: users {few[:5]} have fewer than 2 ratings (one to encode, one to fit)")
    users = np.asarray(sorted(per_user))
    table = prior.user_emb.weight.detach()
    with seeded(int(seed_sequence(seed, "encoder_init").generate_state(1)[0])):  # phi/rho's init, seeded
        enc = HistoryEncoder(img_emb.shape[1], prior.hidden_dim, len(users), width).to(dev)
    x0, r = img_emb.to(dev).float(), rating.to(dev).long()
    full = [torch.as_tensor(per_user[int(u)], device=dev) for u in users]
    with torch.no_grad():
        enc.set_memory(torch.cat([taste(x0[i][None], r[i][None], torch.ones_like(r[i][None]).bool()) for i in full]),
                       table[torch.as_tensor(users, device=dev)])
    slot_of = {int(u): i for i, u in enumerate(users)}
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    rng, gen = np.random.default_rng(seed_sequence(seed, "encoder_batches")), torch.Generator(dev).manual_seed(seed)
    B = min(batch_users, prior.n_users)  # encoded rows go into slots 0..B-1 of a functional copy of the table
    slots = torch.arange(B, device=dev)
    was_training, grads = prior.training, [q.requires_grad for q in prior.parameters()]
    prior.eval().requires_grad_(False)
    res, t0 = EncoderResult(enc), time.perf_counter()
    keep = lambda: {k: v.detach().clone() for k, v in enc.state_dict().items()}  # noqa: E731
    if 0 in checkpoints:
        res.at[0] = keep()
    for step in tqdm(range(1, steps + 1), desc="train history encoder", disable=not progress):
        batch = rng.choice(users, B, replace=len(users) < B)
        context, mask, target = (torch.as_tensor(a, device=dev) for a in sub_histories(per_user, batch, rng, k_max,
                                                                                        n_target))
        c = context.clamp(min=0)
        rows = enc(x0[c], r[c], mask, exclude=torch.as_tensor([slot_of[int(u)] for u in batch], device=dev))
        weight = table.index_put((slots,), rows)
        tgt = target.reshape(-1)

        def model(x_t, t, user_id_, rating_, _w=weight):
            return functional_call(prior, {"user_emb.weight": _w}, (x_t, t, user_id_, rating_))

        model.null_user, model.null_rating = prior.null_user, prior.null_rating
        loss = diffusion_loss(model, sched, x0[tgt], slots.repeat_interleave(n_target), r[tgt], gen)
        if regress > 0:
            loss = loss + regress * (rows - table[torch.as_tensor(batch, device=dev)]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        res.losses.append(float(loss.detach()))
        if step in checkpoints:
            res.at[step] = keep()
    prior.train(was_training)
    for q, g in zip(prior.parameters(), grads):
        q.requires_grad_(g)
    res.seconds = time.perf_counter() - t0
    enc.eval()
    return res
