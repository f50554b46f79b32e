"""The App E.1 grid: every configuration trained, failures recorded, finished points skipped."""
from __future__ import annotations

import itertools
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from ..config import Profile
from ..io import write_json
from ..models.prior import RebecaPrior, count_parameters
from ..progress import tqdm
from .diffusion import Triplets, make_scheduler, train_prior

GRID_AXES = {  # App E.1
    "n_layers": (6, 8, 12),
    "n_heads": (4, 8),
    "hidden_dim": (128, 256),
    "n_tokens": (16, 32),
    "prediction_type": ("epsilon", "sample", "v_prediction"),
    "beta_schedule": ("laplace", "squaredcos_cap_v2"),
}


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
