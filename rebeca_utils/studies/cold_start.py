"""Notebook 12's study: hold-out users from k of their ratings, each method, measured on their test pool.

Methods: the population (the null user at R = 1), "Mean" (the mean embedding of the liked history, decoded
directly), the nearest seen user (by verifier scores on the history), user inversion with the settings chosen on
seen users (studies.new_users), the history encoder (zero-shot), the encoder's row refined by inversion, and the
prior retrained with the hold-out workers (the upper bound, k = all). Every method of a user shares the prior
noise (seeded by the real user id) and the decoder seeds: paired.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..config import NewUserConfig
from ..data import splits as split_table
from ..evaluate import retrieval, scores
from ..evaluate.stats import mean_ci
from ..models.prior import RebecaPrior
from ..pipeline.items import make_items, png_relpath
from ..progress import tqdm
from ..runtime import seed_sequence
from ..train.diffusion import flickr_triplets, train_prior
from ..train.inversion import fit_user, row_prior
from . import new_users

METHODS = {"null_user": "population: null user (R = 1)", "mean": "Mean (liked history)",
           "nearest": "nearest seen user", "inversion": "inversion", "encoder": "history encoder (zero-shot)",
           "encoder_inversion": "encoder + inversion", "retrain": "retrained prior (upper bound)"}
ROW_METHODS = ("inversion", "encoder", "encoder_inversion")  # a row per history, made by fit_rows


@dataclass(frozen=True)
class History:
    """`size` of a user's training-split ratings (0: all of them), draw d; `rows` index the ratings table."""

    user_id: int
    size: int
    draw: int
    rows: tuple[int, ...]

    @property
    def setting(self) -> str:
        return f"k{self.size or 'all'}_d{self.draw}"


def histories(ratings: pd.DataFrame, users, ks, draws: int, seed: int = 0) -> list[History]:
    """Every user's histories: `draws` random draws of k training ratings per k (one for all; k ≥ n is skipped)."""
    out = []
    for u in users:
        rows = np.flatnonzero(((ratings["user_id"] == u) & (ratings["split"] == "train")).to_numpy())
        for k in ks:
            if k == 0:
                out.append(History(int(u), 0, 0, tuple(rows.tolist())))
                continue
            if k >= len(rows):  # nothing to draw: all of them is the k = all history
                warnings.warn(f"histories: user {u} has {len(rows)} training ratings, fewer than k = {k}; "
                              f"their k = {k} histories are skipped (k = all covers them)", stacklevel=2)
                continue
            for d in range(draws):
                pick = np.random.default_rng(seed_sequence(seed, "new_user_history", u, k, d)).choice(rows, k, False)
                out.append(History(int(u), int(k), d, tuple(np.sort(pick).tolist())))
    return out


def nearest_user(verifier, trained_users, ver_emb: torch.Tensor, like: np.ndarray) -> int:
    """The seen user whose verifier scores best separate the history's likes from its dislikes (or rank likes)."""
    s = scores.score_matrix(verifier, trained_users, ver_emb)  # (users, history)
    like = np.asarray(like, dtype=bool)
    agree = (s[:, like].mean(1) if like.any() else 0) - (s[:, ~like].mean(1) if (~like).any() else 0)
    return int(np.asarray(trained_users)[int(np.argmax(agree))])


def fit_rows(pipe, hists, dec_emb: torch.Tensor, like: np.ndarray, cfg: NewUserConfig, settings: dict,
             encoder=None, ratings: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per (history, method in ROW_METHODS): columns user_id, history, draw, method, row, seconds,
    loss_first/last. settings: method -> {select k: (init, lr, gauss, steps)} (new_users.choose_settings; a history
    uses new_users.setting_for its size); without an encoder only "inversion" is fitted. `ratings` (02's table)
    serves a "nearest" init. The rows are fitted on the pipeline's prior and returned, not added to it."""
    methods = list(ROW_METHODS) if encoder is not None else ["inversion"]
    z, trained = pipe.normalizer.forward(dec_emb), pipe.trained_users
    means = None if ratings is None else new_users.liked_means(ratings, z, trained)
    gauss, recs = row_prior(pipe.prior, trained), []
    for h, method in tqdm([(h, m) for h in hists for m in methods], desc="fit new users"):
        rows, t0 = list(h.rows), time.perf_counter()
        st = new_users.setting_for(settings[method], h.size) if method != "encoder" else {}
        init = "encoder" if method.startswith("encoder") else st["init"]
        start = new_users.start_row(pipe, init, z[rows], like[rows], encoder, means)
        rec = dict(user_id=h.user_id, history=h.size, draw=h.draw, method=method, row=start,
                   seconds=time.perf_counter() - t0, loss_first=np.nan, loss_last=np.nan)
        if method != "encoder":
            res = _fit(pipe, h, z, like, start, st, cfg, gauss, seed)
            rec.update(row=res.row, seconds=rec["seconds"] + res.seconds, loss_first=float(np.mean(res.losses[:5])),
                       loss_last=float(np.mean(res.losses[-5:])))
        recs.append({**rec, "row": rec["row"].detach().cpu()})
    return pd.DataFrame(recs)


def _fit(pipe, h: History, z: torch.Tensor, like: np.ndarray, start, setting: dict, cfg: NewUserConfig, gauss,
         seed: int, steps: int | None = None):
    """Inversion of history h's ratings with a chosen setting (the fit's seed is the history's); `steps` overrides
    the setting's, and the row after the setting's own steps is kept in `.at` then."""
    rows = list(h.rows)
    fit_seed = int(seed_sequence(seed, "new_user_fit", h.user_id, h.size, h.draw).generate_state(1)[0])
    more = steps is not None
    return fit_user(pipe.prior, pipe.scheduler, z[rows], torch.as_tensor(like[rows]).long(), init=start,
                    trained_users=pipe.trained_users, steps=steps if more else setting["steps"], lr=setting["lr"],
                    batch_size=cfg.batch_size, gauss=gauss, gauss_weight=setting["gauss"], seed=fit_seed,
                    checkpoints=(setting["steps"],) if more else ())


def fit_ceiling(pipe, ratings: pd.DataFrame, dec_emb: torch.Tensor, like: np.ndarray, users, settings: dict,
                cfg: NewUserConfig, pool: dict, encoder=None, seed: int = 0) -> pd.DataFrame:
    """How far one row of the frozen prior goes: each user's inversion (the setting chosen for all ratings) on
    their training ratings and, as an oracle, on every rating they gave (the test pool too), after the chosen steps
    and `cfg.ceiling_factor` times as many; long P@k rows in the decoder space (long_metrics), method
    '<ratings>, <steps> steps'. The training-ratings row at the chosen steps is fit_rows' inversion row."""
    if cfg.ceiling_factor < 1:
        raise ValueError(f"new_users.ceiling_factor={cfg.ceiling_factor}: it multiplies the chosen steps; use >= 1")
    z = pipe.normalizer.forward(dec_emb)
    st = new_users.setting_for(settings["inversion"], 0)
    means, gen = new_users.liked_means(ratings, z, pipe.trained_users), {}
    gauss = row_prior(pipe.prior, pipe.trained_users)
    steps = st["steps"] * cfg.ceiling_factor
    for data, splits in (("training ratings", ("train",)), ("every rating (oracle)", ("train", "val", "test"))):
        hists = [History(int(u), 0, 0, tuple(np.flatnonzero(((ratings["user_id"] == u)
                                                             & ratings["split"].isin(splits)).to_numpy()).tolist()))
                 for u in users]
        rows: dict[int, list] = {n: [] for n in dict.fromkeys((st["steps"], steps))}  # one budget when factor 1
        for h in tqdm(hists, desc=f"ceiling: {data}"):
            r = list(h.rows)
            start = new_users.start_row(pipe, st["init"], z[r], like[r], encoder, means)
            res = _fit(pipe, h, z, like, start, st, cfg, gauss, seed, steps)
            for n in rows:
                rows[n].append(res.row if n == steps else res.at[n])
        for n, rs in rows.items():
            gen[f"{data}, {n} steps"] = (hists, row_samples(pipe, torch.stack(rs), [h.user_id for h in hists], cfg,
                                                            seed))
    return long_metrics(gen, pool, (1,), "embedding")


def row_samples(pipe, rows: torch.Tensor, user_ids, cfg: NewUserConfig, seed: int = 0) -> torch.Tensor:
    """(len(rows), n_samples, d) samples of fitted rows on a copy of the pipeline, with user_ids' paired noise."""
    model = pipe.with_rows({})  # a copy with the rows appended (the null row stays last)
    ids = model.add_users(rows, source="fitted")
    return _samples(model, ids, user_ids, cfg, seed)


def _samples(model, ids, user_ids, cfg: NewUserConfig, seed: int) -> torch.Tensor:
    """n_samples at R = 1 for each id; the prior noise is seeded by the real user ids (paired across methods)."""
    n = cfg.n_samples
    u = torch.as_tensor(ids).repeat_interleave(n)
    seed_ids = torch.as_tensor(list(user_ids)).repeat_interleave(n)
    x = model.sample(u, torch.ones_like(u), torch.arange(n).repeat(len(ids)), cfg_scale=cfg.cfg_scale, seed=seed,
                     seed_ids=seed_ids)
    return x.view(len(ids), n, -1)


def method_samples(method: str, pipe, hists, *, cfg: NewUserConfig, fits: pd.DataFrame | None = None,
                   nearest: dict | None = None, dec_emb: torch.Tensor | None = None, like=None, seed: int = 0
                   ) -> torch.Tensor:
    """(len(hists), n_samples, d) decoder-space embeddings of `method` for each history (see METHODS); `pipe` is
    the RebecaPipeline (for "retrain", the retrained one)."""
    n = cfg.n_samples
    needs = {"mean": ("dec_emb", "like"), "nearest": ("nearest",), **{m: ("fits",) for m in ROW_METHODS}}
    given = {"dec_emb": dec_emb, "like": like, "nearest": nearest, "fits": fits}
    missing = [a for a in needs.get(method, ()) if given[a] is None]
    if missing:
        raise ValueError(f"method_samples(method={method!r}) needs {', '.join(missing)}")
    if method == "mean":  # the paper's "Mean": the liked history's mean embedding; no like: the mean of all images
        means = [dec_emb[np.asarray(h.rows)[like[list(h.rows)]]].mean(0) if like[list(h.rows)].any()
                 else dec_emb.mean(0) for h in hists]
        return torch.stack(means)[:, None].expand(-1, n, -1).contiguous()
    users = [h.user_id for h in hists]  # paired noise across methods
    if method == "null_user":
        return _samples(pipe, [pipe.null_user] * len(hists), users, cfg, seed)
    if method == "nearest":
        return _samples(pipe, [nearest[h] for h in hists], users, cfg, seed)
    if method == "retrain":
        return _samples(pipe, users, users, cfg, seed)
    if method in ROW_METHODS:
        key = fits.set_index(["user_id", "history", "draw", "method"])["row"]
        return row_samples(pipe, torch.stack([key[(h.user_id, h.size, h.draw, method)] for h in hists]), users, cfg,
                           seed)
    raise ValueError(f"method={method!r}: valid methods are {', '.join(METHODS)}")


def rated_embeddings(splits: pd.DataFrame, *stores) -> tuple[pd.DataFrame, list[torch.Tensor]]:
    """The ratings whose image has an embedding in every store, and each store's embeddings in that row order."""
    pos = [dict(zip(*split_table.join_embeddings(splits, s))) for s in stores]
    rows = sorted(set.intersection(*(set(p) for p in pos)))
    return splits.iloc[rows].reset_index(drop=True), [torch.stack([p[r] for r in rows]) for p in pos]


def long_metrics(gen: dict[str, tuple[list, torch.Tensor]], pool: dict, ks, space: str) -> pd.DataFrame:
    """Per-user P@k and R@k (§4.4, both definitions) per method and history; gen: method -> (histories, (H, n, d)).

    Long rows: user_id, method, history, draw, metric (e.g. "P@1 image (paper)"), value."""
    out = []
    for method, (hists, emb) in gen.items():
        by_setting: dict[tuple, list[int]] = {}
        for i, h in enumerate(hists):
            by_setting.setdefault((h.size, h.draw), []).append(i)
        for (size, draw), idx in by_setting.items():
            x = emb[idx].reshape(-1, emb.shape[-1]).numpy()
            user = np.repeat([hists[i].user_id for i in idx], emb.shape[1])
            for definition in ("paper", "reference"):
                per_user, _ = retrieval.retrieval_metrics(x, user, pool["img_emb"].numpy(), pool["user_id"],
                                                          pool["liked"], ks=ks, definition=definition)
                for stat, letter in (("precision", "P"), ("recall", "R")):
                    out.append(pd.DataFrame({"user_id": per_user["user_id"], "method": method, "history": size,
                                             "draw": draw, "value": per_user[stat],
                                             "metric": [f"{letter}@{k} {space} ({definition})"
                                                        for k in per_user["k"]]}))
    return pd.concat(out, ignore_index=True)


def verifier_metric(verifier, gen: dict[str, tuple[list, torch.Tensor]]) -> pd.DataFrame:
    """Mean verifier score v(u, I) (eq. 5) of each method's decoded images per history, as long rows."""
    out = []
    for method, (hists, emb) in gen.items():
        for h, e in zip(hists, emb):
            out.append(dict(user_id=h.user_id, method=method, history=h.size, draw=h.draw, metric="verifier score",
                            value=float(np.mean(scores.score(verifier, [h.user_id] * len(e), e)))))
    return pd.DataFrame(out)


def summarise(per_user: pd.DataFrame, value: str = "value", by=("metric", "method", "history"),
              n_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean of `value` over draws per user, then mean and 95 % bootstrap CI over users, per `by`."""
    by = list(by)
    user_means = per_user.groupby(by + ["user_id"], sort=False)[value].mean().reset_index()
    rows = []
    for key, g in user_means.groupby(by, sort=False):
        m, lo, hi = mean_ci(g[value].to_numpy(), n_bootstrap, seed)
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), mean=m, ci_low=lo, ci_high=hi,
                         users=len(g)))
    return pd.DataFrame(rows)


HISTORY_FREE = ("null_user",)  # samples that depend on the user's seed only: one set of images per user
SHARED_SETTING = "every_history"


def image_setting(method: str, h: History) -> str:
    """The folder a history's images of `method` go to: its own, or one shared by the user's histories."""
    return SHARED_SETTING if method in HISTORY_FREE else h.setting


def work_items(gen: dict[str, tuple[list, torch.Tensor]], n_images: int, cfg) -> list:
    """Decoder work items for the first `n_images` samples of each method and history (App G.3 decoder seeds);
    a history-free method's images are decoded once per user, not once per history."""
    out, first = [], {}
    for method, (hists, emb) in gen.items():
        for h, e in zip(hists, emb):
            key = (method, image_setting(method, h), h.user_id)
            if key in first:
                if not torch.equal(first[key], e[:n_images]):
                    raise ValueError(f"{method}: user {h.user_id}'s samples differ between histories; "
                                     f"they were to be decoded once for all of them")
                continue
            first[key] = e[:n_images]
            out += make_items(method, key[1], [h.user_id] * n_images, range(n_images), cfg, ip_embeddings=e[:n_images])
    return out


def decoded_embeddings(store, gen: dict[str, tuple[list, torch.Tensor]], n_images: int) -> dict:
    """The verifier-space embeddings of the decoded images, shaped like `gen`: method -> (histories, (H, n, d))."""
    out = {}
    for method, (hists, _) in gen.items():
        paths = [png_relpath(method, image_setting(method, h), h.user_id, j) for h in hists for j in range(n_images)]
        out[method] = (hists, store.lookup(paths).view(len(hists), n_images, -1))
    return out


@dataclass
class Update:
    """Updating an existing user on a donor's ratings: the fit, P@1 against both pools, the samples."""

    fit: object
    table: pd.DataFrame
    samples: dict


def update_user(pipe, user_id: int, donor_id: int, ratings: pd.DataFrame, dec_emb: torch.Tensor, pool: dict,
                cfg: NewUserConfig, seed: int = 0) -> Update:
    """Refit `user_id`'s row on `donor_id`'s training ratings (a moved taste) from the old row, pulled towards it;
    `pipe` itself is left as it was (the update is made on a copy)."""
    rows = np.flatnonzero(((ratings["user_id"] == donor_id) & (ratings["split"] == "train")).to_numpy())
    like = torch.as_tensor(ratings["like"].to_numpy()[rows]).long()
    after = pipe.with_rows({})
    fit = after.update_user(user_id, dec_emb[rows], like, l2=cfg.update_l2, steps=cfg.steps, lr=cfg.lr,
                            batch_size=cfg.batch_size, seed=seed)
    fit.row = fit.row.cpu()  # the caller compares it with the old row wherever the prior lives
    models = {"before": (pipe, user_id), "after": (after, user_id), "donor": (pipe, donor_id)}
    n, samples, table = cfg.n_samples, {}, []
    for name, (model, u) in models.items():
        samples[name] = model.sample([u] * n, [1] * n, range(n), cfg_scale=cfg.cfg_scale, seed=seed,
                                     seed_ids=[user_id] * n)
        row = {"samples": name}
        for who, target in (("own pool", user_id), ("donor's pool", donor_id)):
            _, summ = retrieval.retrieval_metrics(samples[name].numpy(), [target] * n, pool["img_emb"].numpy(),
                                                  pool["user_id"], pool["liked"], ks=(1,))
            row[f"P@1 vs {who}"] = float(summ["precision"].iloc[0])
        table.append(row)
    donor_mean = samples["donor"].mean(0, keepdim=True)
    for row in table:  # how far the samples moved towards the donor's
        row["cos(mean sample, donor's)"] = float(torch.nn.functional.cosine_similarity(
            samples[row["samples"]].mean(0, keepdim=True), donor_mean))
    return Update(fit, pd.DataFrame(table).set_index("samples"), samples)


def test_pool(ratings: pd.DataFrame, emb: torch.Tensor, split: str = "test") -> dict:
    """Each user's held-out pool P_u (likes ∪ dislikes of `split`, §4.4) in the space of `emb` (rows of ratings)."""
    m = (ratings["split"] == split).to_numpy()
    return {"user_id": ratings["user_id"].to_numpy()[m], "liked": ratings["like"].to_numpy()[m].astype(bool),
            "img_emb": emb[torch.as_tensor(np.flatnonzero(m))]}


def distant_pair(pipe, users, n: int = 8, cfg_scale: float | None = None, seed: int = 0) -> tuple[int, int]:
    """(users[0], the user whose mean prior sample is least like users[0]'s): a taste that moved, and one the prior
    tells apart from the first."""
    x = pipe(users, n, cfg_scale=cfg_scale, seed=seed).mean(1)
    return int(users[0]), int(users[int(torch.nn.functional.cosine_similarity(x[:1], x).argmin())])


def retrain(prior_cfg, sched, ratings: pd.DataFrame, z: torch.Tensor, train_cfg, seed: int = 0,
            device: str = "cpu"):
    """The upper bound: notebook 03's training with the hold-out workers' training ratings in."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # 03's initialisation, without touching the caller's global RNG
        model = RebecaPrior.from_config(prior_cfg)
    train = flickr_triplets(ratings, z, "train", include_holdout=True)
    val = flickr_triplets(ratings, z, "val", include_holdout=True)
    train_prior(model, sched, train, val, train_cfg, seed=seed, device=device)
    return model.eval()


def wide_table(summary: pd.DataFrame, metrics) -> pd.DataFrame:
    """Mean over workers per (metric, method) × history size (k = all last), the README's table."""
    d = summary[summary["metric"].isin(list(metrics))]
    t = d.pivot_table(index=["metric", "method"], columns="history", values="mean", sort=False)
    t = t[sorted(t.columns, key=lambda k: (k == 0, k))]
    t.columns = [f"k={k}" if k else "all" for k in t.columns]
    t.index = t.index.set_levels([t.index.levels[0], [METHODS.get(m, m) for m in t.index.levels[1]]])
    return t.round(3)
