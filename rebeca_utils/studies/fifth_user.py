"""dSprites' fifth user (beyond the paper; notebook 01, method of 12): a taste none of the four had, without retraining.

User 4 likes every red sprite, squares and hearts alike (P(like) 0.95 red, 0.05 blue); each of the four trained users
prefers one shape-colour pair. From k of their ratings of training images: user inversion on the frozen four-user
prior, the history encoder (trained on the four users' ratings) and its row refined by inversion, the null user,
Mean (the liked history's mean latent), the nearest of the four (whose own ratings of the same images agree best), a
prior retrained with five users, and the Oracle (draws from all their liked training latents).
"""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import pandas as pd
import torch

from ..config import NewUserConfig
from ..data.dsprites import DSpritesStudy
from ..evaluate.retrieval import precision_recall_at_k
from ..runtime import seed_sequence
from ..train.history_encoder import train_encoder

FIFTH_P_LIKE = (0.95, 0.05)  # P(like) of a red, of a blue sprite
FIFTH_USER = 4  # its id in the retrained five-user prior


def fifth_user_likes(study: DSpritesStudy, seed: int = 0, p_like=FIFTH_P_LIKE) -> np.ndarray:
    """The fifth user's rating of every image (bool (n,)): likes red sprites."""
    rng = np.random.default_rng(seed_sequence(seed, "dsprites_fifth"))
    return rng.random(study.n_images) < np.where(study.colour == 0, p_like[0], p_like[1])


def with_fifth_user(study: DSpritesStudy, likes: np.ndarray) -> DSpritesStudy:
    """The study with the fifth user's ratings as a fifth row (to retrain a five-user prior)."""
    return dataclasses.replace(study, likes=np.vstack([study.likes, likes[None]]))


def warm_start(prior):
    """A five-user prior that starts as the four-user one: the fifth row is the null row's copy (the retrain's start;
    every weight then trains, unlike inversion)."""
    five = copy.deepcopy(prior)
    five.add_users(prior.user_emb.weight[prior.null_user].detach()[None])
    return five.train()


def four_user_encoder(pipe, study: DSpritesStudy, latents: torch.Tensor, cfg: NewUserConfig, steps: int,
                      seed: int = 0):
    """The history encoder trained `steps` steps on the four users' ratings of the training images (prior frozen)."""
    train = torch.as_tensor(study.train_idx)
    z = pipe.normalizer.forward(latents[train]).repeat(study.n_users, 1)
    rating = torch.as_tensor(study.likes[:, study.train_idx]).reshape(-1).long()
    user_id = torch.arange(study.n_users).repeat_interleave(len(train))
    return train_encoder(pipe.prior, pipe.scheduler, z, rating, user_id, steps=steps, lr=cfg.encoder_lr,
                         batch_users=study.n_users, regress=cfg.encoder_regress, seed=seed, progress=False)


def fifth_user_table(pipe, study: DSpritesStudy, latents: torch.Tensor, likes: np.ndarray, ks, draws: int,
                     cfg: NewUserConfig, n_samples: int, retrained=None, seed: int = 0, cfg_scale: float = 1.0
                     ) -> pd.DataFrame:
    """P@n_samples (one neighbour each, §3.3) on the test pool per method, history size k and draw; `pipe` (and
    `retrained`, the five-user upper bound) are RebecaPipelines over the four-user prior; with `pipe.encoder`, the
    encoder and encoder + inversion too."""
    pool, pool_likes = latents[study.test_idx].numpy(), likes[study.test_idx]
    train = study.train_idx
    n = n_samples

    def sample(p, user):  # every method's j-th sample shares its noise (seed id = the fifth user's)
        return p.sample([user] * n, [1] * n, range(n), cfg_scale=cfg_scale, seed=seed,
                        seed_ids=[FIFTH_USER] * n).numpy()

    rows, oracle_rng = [], np.random.default_rng(seed_sequence(seed, "dsprites_fifth_history", 0))
    liked_train = train[likes[train]]
    rows.append(dict(method="Oracle", k=0, draw=0, precision=precision_recall_at_k(
        latents[oracle_rng.choice(liked_train, n)].numpy(), pool, pool_likes, 1)[0]))
    for k in ks:
        for d in range(1 if k == 0 else draws):
            rng = np.random.default_rng(seed_sequence(seed, "dsprites_fifth_history", k, d))
            hist = train if k == 0 else np.sort(rng.choice(train, k, replace=False))
            like_h = likes[hist]
            ext = pipe.with_rows({})  # a copy: the new rows are added to it, not to `pipe`
            fit_seed, r = int(rng.integers(2**31)), torch.as_tensor(like_h).long()
            new_id = ext.fit_user(latents[hist], r, init="null", steps=cfg.steps, lr=cfg.lr,
                                  batch_size=cfg.batch_size, seed=fit_seed)
            seconds = {"inversion": ext.last_fit.seconds}
            if pipe.encoder is not None:
                t0 = time.perf_counter()
                enc_id = ext.encode_user(latents[hist], r)
                seconds["encoder"] = time.perf_counter() - t0
                refined_id = ext.encode_user(latents[hist], r, refine_steps=cfg.steps, lr=cfg.lr,
                                             batch_size=cfg.batch_size, seed=fit_seed)
                seconds["encoder + inversion"] = seconds["encoder"] + ext.last_fit.seconds
            nearest = int(np.argmax([(study.likes[u, hist] == like_h).mean() for u in range(study.n_users)]))
            mean = latents[hist[like_h] if like_h.any() else hist].mean(0).numpy()
            got = {"inversion": sample(ext, new_id), "null user": sample(pipe, pipe.null_user),
                   "nearest of the four": sample(pipe, nearest), "Mean": np.repeat(mean[None], n, 0)}
            if pipe.encoder is not None:
                got.update({"encoder": sample(ext, enc_id), "encoder + inversion": sample(ext, refined_id)})
            if retrained is not None and k == 0:
                got["retrained (5 users)"] = sample(retrained, FIFTH_USER)
            for method, x in got.items():
                rows.append(dict(method=method, k=k, draw=d, precision=precision_recall_at_k(x, pool, pool_likes,
                                                                                             1)[0],
                                 seconds=seconds.get(method, np.nan)))
    return pd.DataFrame(rows)


def wide(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean P@n per method × history size (k = all last), from the (method, k) -> mean, std summary."""
    t = summary["mean"].unstack("k")
    t = t[sorted(t.columns, key=lambda k: (k == 0, k))]
    t.columns = [f"k={k}" if k else "all" for k in t.columns]
    return t
