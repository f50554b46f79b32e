"""New users without retraining (beyond the paper; App B names cold start as a limitation): user inversion.

The trained prior stays frozen; a user is one row of its user-embedding table, fitted on that user's ratings with
the prior's own training loss (R = 1 and R = 0 rows, CFG dropout off), like textual inversion for users. Updating
an existing user is the same fit from the user's current row with an L2 pull towards it. Baselines: the null user
(the unconditional prior at R = 1), the mean of the user's liked history ("Mean"), and the nearest seen user.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.func import functional_call

from ..models.prior import RebecaPrior
from ..progress import tqdm
from .diffusion import diffusion_loss

INITS = ("null", "mean")


def row_prior(prior: RebecaPrior, trained_users: Sequence[int], shrink: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, precision) of a Gaussian fitted to the trained users' rows; the covariance is shrunk towards
    its mean variance (·I) by `shrink`, as a few hundred rows do not pin down a full covariance."""
    if len(trained_users) < 2:
        raise ValueError(f"row_prior needs >= 2 trained users, got {len(trained_users)}")
    w = prior.user_emb.weight.detach()[torch.as_tensor(list(trained_users))].double()
    cov = torch.cov(w.T)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    return w.mean(0).float(), torch.linalg.inv(cov).float()


@dataclass
class FitResult:
    """A fitted user row, its loss per step and the seconds it took."""

    row: torch.Tensor
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    at: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> row after that step (fit_user checkpoints)


def initial_row(prior: RebecaPrior, init, trained_users: Sequence[int] = ()) -> torch.Tensor:
    """The starting row: "null" (the null user's row), "mean" (the mean row of `trained_users`) or a given row."""
    w = prior.user_emb.weight.detach()
    if isinstance(init, torch.Tensor):
        return init.detach().clone().float()
    if init == "null":
        return w[prior.null_user].clone()
    if init == "mean":
        if not len(trained_users):
            raise ValueError("init='mean' needs the ids of the users the prior was trained on")
        return w[torch.as_tensor(list(trained_users))].mean(0).clone()
    raise ValueError(f"init={init!r}: valid values are {', '.join(INITS)} or a row tensor")


def fit_user(prior: RebecaPrior, sched, img_emb: torch.Tensor, rating: torch.Tensor, *, init="null",
             trained_users: Sequence[int] = (), steps: int = 200, lr: float = 5e-2, batch_size: int = 64,
             anchor: torch.Tensor | None = None, l2: float = 0.0, gauss: tuple | None = None, gauss_weight: float = 0.0,
             checkpoints: Sequence[int] = (), seed: int = 0, progress: bool = False) -> FitResult:
    """Fit one user row on (img_emb, rating) with the prior's loss; every prior weight stays as it was.

    img_emb are the prior's training inputs (normalised as in notebook 03). `anchor` + `l2` add l2·‖row − anchor‖²
    (updating an existing user); `gauss` = row_prior(...) + `gauss_weight` add w·(row − μ)ᵀP(row − μ)/(n·hidden),
    n the number of ratings, so the pull fades as ratings come in. The row after each step in `checkpoints` is kept
    in `FitResult.at`. Every draw comes from a generator seeded by `seed`: same inputs, same row."""
    if len(img_emb) == 0 or len(img_emb) != len(rating):
        raise ValueError(f"fit_user: {len(img_emb)} embeddings and {len(rating)} ratings (need as many, >= 1)")
    bad = torch.nonzero((rating != 0) & (rating != 1)).flatten()
    if len(bad):
        raise ValueError(f"fit_user: rating {rating[bad[0]].item()!r} at row {int(bad[0])}; ratings are 1 (like) or "
                         f"0 (dislike)")
    bad = torch.nonzero(~torch.isfinite(img_emb).all(1)).flatten()
    if len(bad):
        raise ValueError(f"fit_user: img_emb row {int(bad[0])} is not finite (NaN or inf)")
    dev = prior.user_emb.weight.device
    row = torch.nn.Parameter(initial_row(prior, init, trained_users).to(dev))
    anchor = None if anchor is None else anchor.detach().to(dev)
    mu, prec = (None, None) if gauss is None else (g.to(dev) for g in gauss)
    table = prior.user_emb.weight.detach()
    opt = torch.optim.Adam([row], lr=lr)
    gen = torch.Generator(dev).manual_seed(seed)
    x0, r = img_emb.to(dev).float(), rating.to(dev).long()
    slot = torch.zeros(batch_size, dtype=torch.long, device=dev)  # the row replaces slot 0 in a functional copy
    was_training, grads = prior.training, [q.requires_grad for q in prior.parameters()]
    prior.eval().requires_grad_(False)  # no dropout; backward reaches the row only, not every frozen weight
    res, t0 = FitResult(row.detach()), time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc="fit user", disable=not progress, leave=False):
        idx = torch.randint(0, len(x0), (batch_size,), generator=gen, device=dev)
        weight = torch.cat([row[None], table[1:]])

        def model(x_t, t, user_id, rating_, _w=weight):
            return functional_call(prior, {"user_emb.weight": _w}, (x_t, t, user_id, rating_))

        model.null_user, model.null_rating = prior.null_user, prior.null_rating
        loss = diffusion_loss(model, sched, x0[idx], slot, r[idx], gen)
        if anchor is not None and l2 > 0:
            loss = loss + l2 * (row - anchor).pow(2).sum()
        if mu is not None and gauss_weight > 0:
            loss = loss + gauss_weight * (row - mu) @ prec @ (row - mu) / (len(x0) * len(row))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        res.losses.append(float(loss.detach()))
        if step in checkpoints:
            res.at[step] = row.detach().clone()
    prior.train(was_training)
    for q, g in zip(prior.parameters(), grads):
        q.requires_grad_(g)
    res.row, res.seconds = row.detach().clone(), time.perf_counter() - t0
    return res


def with_rows(prior: RebecaPrior, rows: dict[int, torch.Tensor]) -> RebecaPrior:
    """A copy of `prior` whose user rows `rows` (existing ids) are replaced: it samples through the unchanged path."""
    out = copy.deepcopy(prior)
    with torch.no_grad():
        for u, row in rows.items():
            if not 0 <= int(u) < prior.n_users:
                raise ValueError(f"user_id {u}: the prior has users 0..{prior.n_users - 1}; add_users() first")
            out.user_emb.weight[int(u)] = row.to(out.user_emb.weight)
    return out
