"""Prior training on FLICKR-AES (notebook 03): triplets from the saved splits, a personalization score, the App E grid."""
from __future__ import annotations

import itertools
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .artifacts import write_json
from .config import Profile
from .diffusion import Triplets, make_scheduler, sample_users, train_prior
from .metrics import cosine_nn
from .prior import RebecaPrior, count_parameters

GRID_AXES = {  # App E.1
    "n_layers": (6, 8, 12),
    "n_heads": (4, 8),
    "hidden_dim": (128, 256),
    "n_tokens": (16, 32),
    "prediction_type": ("epsilon", "sample", "v_prediction"),
    "beta_schedule": ("laplace", "squaredcos_cap_v2"),
}


def flickr_triplets(splits: pd.DataFrame, img_emb: torch.Tensor, split: str, include_holdout: bool = False) -> Triplets:
    """(img_emb, user_id, like) rows of one split; `img_emb` is indexed by the splits' row order."""
    keep = (splits["split"] == split).to_numpy().copy()  # pandas 3 hands out read-only views
    if not include_holdout:
        keep &= ~splits["holdout"].to_numpy()
    rows = np.flatnonzero(keep)
    return Triplets(img_emb[rows].float(), torch.as_tensor(splits["user_id"].to_numpy()[rows]),
                    torch.as_tensor(splits["like"].to_numpy()[rows].astype(np.int64)))


def personalization_score(prior, sched, splits: pd.DataFrame, pool_emb: torch.Tensor, train_emb: torch.Tensor,
                          users, n_samples: int = 10, pool_split=("val",), cfg_scale: float = 3.0,
                          normalizer=None, seed: int = 0, **sample_kw) -> dict:
    """Precision@1-style signal: how often a sample's nearest held-out item is one the user liked, vs random draws.

    Comparable across objectives (unlike validation losses). `pool_emb` is indexed like `splits` (any space in
    which samples live); random draws come from `train_emb`.
    """
    users = [int(u) for u in users]
    x = sample_users(prior, sched, users, n_samples, rating=1, cfg_scale=cfg_scale, seed=seed, **sample_kw)
    if normalizer is not None:
        x = normalizer.inverse(x)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 303]))
    rand = train_emb[rng.integers(0, len(train_emb), size=(len(users), n_samples))]
    prec, prec_rand, n_pool = [], [], []
    for i, u in enumerate(users):
        rows = np.flatnonzero((splits["user_id"].to_numpy() == u) & splits["split"].isin(pool_split).to_numpy())
        if len(rows) == 0:
            continue
        liked = splits["like"].to_numpy()[rows]
        pool = pool_emb[rows].numpy()
        prec.append(liked[cosine_nn(x[i].numpy(), pool)].mean())
        prec_rand.append(liked[cosine_nn(rand[i].numpy(), pool)].mean())
        n_pool.append(len(rows))
    return {"precision": float(np.mean(prec)), "random_precision": float(np.mean(prec_rand)),
            "users": len(prec), "pool_size": float(np.mean(n_pool))}


def grid_configs(**axes) -> list[dict]:
    """Cartesian product over the App E.1 axes; each axis defaults to the paper's list, any subset by keyword."""
    unknown = set(axes) - set(GRID_AXES)
    if unknown:
        raise KeyError(f"unknown grid axis {sorted(unknown)}; valid axes: {', '.join(GRID_AXES)}")
    values = {k: tuple(axes.get(k, v)) for k, v in GRID_AXES.items()}
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def config_name(c: dict) -> str:
    """Readable, file-safe name of one grid point."""
    return "_".join(f"{k}{v}" for k, v in c.items())


def run_grid(configs: list[dict], profile: Profile, train: Triplets, val: Triplets, folder: Path,
             score_fn=None, seed: int = 0, device: str = "cpu") -> pd.DataFrame:
    """Train every configuration; a failure is recorded with its error (never swallowed); finished ones are skipped."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in tqdm(configs, desc="grid"):
        out = folder / f"{config_name(c)}.json"
        if out.exists():
            rows.append(json.loads(out.read_text()))
            continue
        row = {**c, "status": "ok", "error": ""}
        t0 = time.perf_counter()
        try:
            prior_cfg = replace(profile.prior, **{k: c[k] for k in ("n_layers", "n_heads", "hidden_dim", "n_tokens")})
            diff_cfg = replace(profile.diffusion, prediction_type=c["prediction_type"], beta_schedule=c["beta_schedule"])
            torch.manual_seed(seed)
            model = RebecaPrior.from_config(prior_cfg)
            sched = make_scheduler(diff_cfg)
            res = train_prior(model, sched, train, val, profile.train, seed=seed, device=device, progress=False)
            row.update(params=count_parameters(model), epochs=res.epochs, best_val_loss=res.best_val_loss)
            if score_fn is not None:
                row.update({f"score_{k}": v for k, v in score_fn(model, sched).items()})
        except Exception as err:  # recorded, shown in the table and printed: the reference grid hid these
            row.update(status="failed", error=f"{type(err).__name__}: {err}")
            print(f"grid point {config_name(c)} FAILED:\n{traceback.format_exc()}")
        row["wall_time_s"] = time.perf_counter() - t0
        if row["status"] == "ok":
            write_json(out, row)  # only successes are cached: a failed point is retried on the next run
        rows.append(row)
    return pd.DataFrame(rows)


def training_log(result, model, extra: dict | None = None) -> dict:
    """What notebook 03 records about a run: epochs, wall time, best val loss, params, learning-rate drops."""
    return {**result.summary(), "params": count_parameters(model), "config": getattr(model, "_hub_mixin_config", None),
            **(extra or {})}
