"""Ablations (§4.4, App L): dual guidance (prior ω × decoder CFG, Fig 6) and system-prompt levels (Fig 7, L.1)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import AblationConfig, GenerationConfig
from ..evaluate.stats import holm, mean_ci, paired_effect
from ..pipeline.items import WorkItem, make_items
from ..pipeline.sampling import prior_setting

# App L.1, verbatim: level -> (prompt, negative prompt)
PROMPT_LEVELS = {
    0: ("", ""),
    1: ("high quality photo", "bad quality photo, letters"),
    2: ("Realistic image, finely detailed, with balanced composition and harmonious elements. Dynamic yet subtle "
        "tones, versatile style adaptable to diverse themes and aesthetics, prioritizing clarity and authenticity.",
        "deformed, ugly, wrong proportion, frame, watermark, low res, bad anatomy, worst quality, low quality"),
}


@dataclass(frozen=True)
class Cell:
    """One ablation condition: prior ω, decoder CFG, prompt level."""

    omega: float
    decoder_cfg: float
    level: int

    def setting(self, main: GenerationConfig) -> str:
        """Folder name; the main condition (main decoder CFG, level 0) keeps notebook 04's name, so its images are
        the same work items and are found done there."""
        name = prior_setting(self.omega)
        if self.decoder_cfg != main.decoder_cfg:
            name += f"_dcfg{self.decoder_cfg:g}"
        return name + (f"_prompt{self.level}" if self.level else "")


def cells(cfg: AblationConfig, main: GenerationConfig) -> list[Cell]:
    """Fig 6's grid (level 0) and Fig 7's levels (at the main decoder CFG), each condition once."""
    grid = [Cell(w, c, 0) for w in cfg.omegas for c in cfg.decoder_cfgs]
    levels = [Cell(w, main.decoder_cfg, lev) for w in cfg.level_omegas for lev in cfg.levels]
    return list(dict.fromkeys(grid + levels))


def check_levels(levels: Sequence[int]) -> None:
    """One clear error for a prompt level App L.1 does not define."""
    bad = sorted(set(levels) - set(PROMPT_LEVELS))
    if bad:
        raise ValueError(f"prompt levels {bad}: App L.1 defines levels {sorted(PROMPT_LEVELS)}")


def cell_items(cell: Cell, samples: dict, main: GenerationConfig) -> tuple[GenerationConfig, list[WorkItem]]:
    """(generation config with the cell's decoder CFG, work items): App G.3 seeds, the level's prompts."""
    gen = dataclasses.replace(main, decoder_cfg=float(cell.decoder_cfg))
    prompt, negative = PROMPT_LEVELS[cell.level]
    n = len(samples["user_id"])
    items = make_items("rebeca", cell.setting(main), samples["user_id"].tolist(), samples["index"].tolist(), gen,
                       ip_embeddings=samples["img_emb"], prompts=[prompt] * n, negative_prompts=[negative] * n)
    return gen, items


def label_conditions(images: pd.DataFrame, conds: Sequence[Cell], main: GenerationConfig) -> pd.DataFrame:
    """`images` (manifest rows) with omega, decoder_cfg and level columns from their setting."""
    by = {c.setting(main): c for c in conds}
    return images.assign(omega=[by[s].omega for s in images["setting"]],
                         decoder_cfg=[by[s].decoder_cfg for s in images["setting"]],
                         level=[by[s].level for s in images["setting"]])


def level_summary(user_means: pd.DataFrame, metrics: Sequence[str], n_bootstrap: int, seed: int = 0) -> pd.DataFrame:
    """Per (omega, level): each metric's mean over users with a 95 % bootstrap CI (Fig 7's bars)."""
    rows = []
    for (w, lev), g in user_means.groupby(["omega", "level"]):
        row = {"omega": w, "level": lev, "users": len(g)}
        for m in metrics:
            row[f"{m} mean"], row[f"{m} ci_low"], row[f"{m} ci_high"] = mean_ci(g[m].to_numpy(), n_bootstrap, seed)
        rows.append(row)
    return pd.DataFrame(rows)


def p_values(tests: pd.DataFrame) -> list[dict]:
    """One entry per test (metric, factor at a fixed level of the other key): its p-values, raw and Holm-adjusted
    over the table's family, for the manifest."""
    if tests.empty:
        return []
    first = with_holm(tests).groupby(["metric", "test"], sort=False).first().reset_index()
    return [{"metric": r.metric, "test": r.test, "p_permutation": float(r.p_permutation),
             "p_friedman": float(r.p_friedman), "p_permutation_holm": float(r.p_permutation_holm),
             "p_friedman_holm": float(r.p_friedman_holm), "users": int(r.users)}
            for r in first.itertuples(index=False)]


def with_holm(tests: pd.DataFrame) -> pd.DataFrame:
    """`tests` with p_permutation_holm and p_friedman_holm: Holm's adjustment over every (metric, test) of the
    table (one family: e.g. Fig 7's ω × metric), each test counted once however many levels it has rows for."""
    if tests.empty:
        return tests.assign(p_permutation_holm=[], p_friedman_holm=[])
    first = tests.groupby(["metric", "test"], sort=False)[["p_permutation", "p_friedman"]].first()
    adj = pd.DataFrame({f"{c}_holm": holm(first[c].to_numpy()) for c in first.columns}, index=first.index)
    return tests.drop(columns=list(adj.columns), errors="ignore").join(adj, on=["metric", "test"])


def main_cell(cfg: AblationConfig, main: GenerationConfig) -> tuple[float, float]:
    """Fig 6's reference cell (ω, decoder CFG): the grid's first ω at the main decoder CFG (else the grid's first)."""
    return cfg.omegas[0], main.decoder_cfg if main.decoder_cfg in cfg.decoder_cfgs else cfg.decoder_cfgs[0]


def cell_effects(user_means: pd.DataFrame, metrics: Sequence[str], reference: tuple[float, float],
                 n_bootstrap: int, seed: int = 0) -> pd.DataFrame:
    """Fig 6's companion: per metric and grid cell (level 0), the mean over users and the paired difference to the
    reference cell (per user, cell − reference), with a 95 % bootstrap CI over the users present in both."""
    grid = user_means[user_means["level"] == 0]
    rows = []
    for m in metrics:
        wide = grid.pivot_table(index="user_id", columns=["omega", "decoder_cfg"], values=m)
        if tuple(reference) not in wide.columns:
            continue
        for cell in wide.columns:
            pair = wide[[cell, tuple(reference)]].dropna()
            d = (pair[cell] - pair[tuple(reference)]).to_numpy()
            diff, lo, hi = mean_ci(d, n_bootstrap, seed) if len(d) else (np.nan,) * 3
            rows.append({"metric": m, "omega": cell[0], "decoder_cfg": cell[1], "mean": float(wide[cell].mean()),
                         "ref_omega": reference[0], "ref_decoder_cfg": reference[1], "diff": diff,
                         "ci_low": lo, "ci_high": hi, "users": len(d)})
    return pd.DataFrame(rows)


def per_user(scores: pd.DataFrame, value: str) -> pd.DataFrame:
    """User-averaged `value` per (omega, decoder_cfg, level, user_id)."""
    keys = ["omega", "decoder_cfg", "level", "user_id"]
    return scores.groupby(keys, as_index=False)[value].mean()


def factor_tests(user_means: pd.DataFrame, value: str, factor: str, within: str, fixed: dict, reference,
                 n_permutations: int, n_bootstrap: int, seed: int = 0) -> pd.DataFrame:
    """For each level of `within`, the effect of `factor` on the per-user means (the other keys fixed as given):
    permutation and Friedman (Wilcoxon) p-values, and each factor level's difference to `reference` with a CI."""
    df = user_means
    for k, v in fixed.items():
        df = df[df[k] == v]
    rows = []
    for w, g in df.groupby(within):
        wide = g.pivot(index="user_id", columns=factor, values=value).dropna()
        if wide.shape[1] < 2 or len(wide) < 2:
            continue
        ref = reference if reference in wide.columns else wide.columns[0]
        eff = paired_effect(wide.to_numpy(), list(wide.columns), ref, n_permutations, n_bootstrap, seed)
        for lev, (d, lo, hi) in eff.diffs.items():
            rows.append({"metric": value, "test": f"{factor} at {within}={w:g}", within: w, factor: lev,
                         "mean": float(wide[lev].mean()),
                         "reference": ref, "diff": d,
                         "ci_low": lo, "ci_high": hi, "p_permutation": eff.p_value, "p_friedman": eff.friedman_p,
                         "users": len(wide)})
    return pd.DataFrame(rows)


def decode_count(cfg: AblationConfig, main: GenerationConfig, n_users: int) -> int:
    """Images the ablation decodes in all (before any is found done)."""
    return len(cells(cfg, main)) * cfg.n_per_user * n_users
