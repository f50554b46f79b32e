"""Notebook 12 beyond inversion: settings chosen on seen users, the history encoder, feedback from generated images.

Nothing here reads a hold-out worker. The seen users are split once: most train the history encoder, the rest
choose inversion's init, learning rate, row prior and steps. Each of those users fits a row from k of their
training ratings, and the fit is scored by the prior's loss on their validation ratings. The feedback loop then
runs a user forward: generate, have the images answered (like / dislike), add the answers to the history, and update.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

from ..config import NewUserConfig
from ..evaluate import retrieval, scores
from ..pipeline import decoding
from ..pipeline.items import make_items
from ..evaluate.stats import mean_ci, within_user_permutation
from ..progress import tqdm
from ..runtime import seed_sequence
from ..train.diffusion import diffusion_loss
from ..train.history_encoder import train_encoder
from ..train.inversion import fit_user, initial_row, row_prior

SELECT_INITS = ("null", "mean", "nearest", "encoder")


def split_seen(trained_users: Sequence[int], select_frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(encoder users, selection users): a seeded split of the seen users; the selection users train nothing."""
    users = np.asarray(sorted(int(u) for u in trained_users))
    n_sel = max(1, int(round(select_frac * len(users))))
    pick = np.random.default_rng(seed_sequence(seed, "select_users")).choice(len(users), n_sel, replace=False)
    sel = set(users[pick].tolist())
    return [int(u) for u in users if u not in sel], sorted(int(u) for u in sel)


def liked_means(ratings: pd.DataFrame, z: torch.Tensor, users: Sequence[int]) -> torch.Tensor:
    """(len(users), d): each user's mean training-split liked embedding (all rated ones if none is liked)."""
    out = []
    for u in users:
        m = ((ratings["user_id"] == u) & (ratings["split"] == "train")).to_numpy()
        liked = m & ratings["like"].to_numpy().astype(bool)
        out.append(z[torch.as_tensor(np.flatnonzero(liked if liked.any() else m))].mean(0))
    return torch.stack(out)


def nearest_by_likes(means: torch.Tensor, users: Sequence[int], z: torch.Tensor, like: np.ndarray) -> int:
    """The seen user whose mean liked embedding is closest (cosine) to the history's likes minus its dislikes."""
    like = np.asarray(like, dtype=bool)
    q = (z[like].mean(0) if like.any() else 0) - (z[~like].mean(0) if (~like).any() else 0)
    if not torch.is_tensor(q):
        raise ValueError("nearest_by_likes: an empty history")
    return int(users[int(torch.nn.functional.cosine_similarity(means, q[None]).argmax())])


@torch.no_grad()
def heldout_loss(prior, sched, row: torch.Tensor, z: torch.Tensor, rating: torch.Tensor, repeats: int = 8,
                 seed: int = 1234) -> float:
    """The prior's loss on (z, rating) through `row` in slot 0, at fixed t and noise (same seed, same draws)."""
    dev = prior.user_emb.weight.device
    weight = torch.cat([row[None].to(dev), prior.user_emb.weight.detach()[1:]])

    def model(x_t, t, user_id, rating_):
        return functional_call(prior, {"user_emb.weight": weight}, (x_t, t, user_id, rating_))

    model.null_user, model.null_rating = prior.null_user, prior.null_rating
    x0, r = z.to(dev).float().repeat(repeats, 1), rating.to(dev).long().repeat(repeats)
    gen = torch.Generator(dev).manual_seed(seed)
    return float(diffusion_loss(model, sched, x0, torch.zeros_like(r), r, gen))


def start_row(pipe, name: str, z, like, encoder=None, means=None, others=None) -> torch.Tensor | str:
    """Where a fit starts, by name: "nearest" (the seen user among `others`, default every trained user, with the
    closest liked-embedding mean `means`), "encoder" (the encoded history), or "null" / "mean" (fit_user's own)."""
    if name == "nearest":
        if means is None:
            raise ValueError("a 'nearest' init needs the seen users' liked embeddings (liked_means of 02's ratings)")
        others = pipe.trained_users if others is None else others
        return pipe.prior.user_emb.weight.detach()[nearest_by_likes(means, others, z, like)]
    if name == "encoder":
        return encoder.encode(z, torch.as_tensor(like).long())
    return name


def selection_history(ratings: pd.DataFrame, user_id: int, k: int, seed: int = 0) -> np.ndarray:
    """The k training ratings (row numbers; k = 0: all) a selection user fits from, the same for every setting."""
    train = np.flatnonzero(((ratings["user_id"] == user_id) & (ratings["split"] == "train")).to_numpy())
    rng = np.random.default_rng(seed_sequence(seed, "select_history", user_id, k))
    return train if k == 0 or k >= len(train) else np.sort(rng.choice(train, k, replace=False))


def _selection_fits(pipe, ratings, z, users, cfg, encoder, seed, progress) -> tuple[list[dict], list]:
    """Every (user, k, init, lr, row-prior weight) fit from k ∈ `cfg.select_ks` training ratings; a record and a
    row per checkpoint (steps 0 = the init itself)."""
    like_all = ratings["like"].to_numpy().astype(bool)
    trained = pipe.trained_users
    means, gauss = liked_means(ratings, z, trained), row_prior(pipe.prior, trained)
    inits = [i for i in SELECT_INITS if i != "encoder" or encoder is not None]
    checkpoints = sorted({max(1, cfg.steps // 4), max(1, cfg.steps // 2), cfg.steps})
    jobs = [(u, k, i, lr, w) for u in users for k in cfg.select_ks for i in inits for lr in cfg.select_lrs
            for w in cfg.select_gauss]
    recs, rows = [], []
    for u, k, init, lr, w in tqdm(jobs, desc="choose inversion settings", disable=not progress):
        h = selection_history(ratings, u, k, seed)
        others = [v for v in trained if v != u]  # the user's own row is what is being recovered
        start = start_row(pipe, init, z[h], like_all[h], encoder, means[[trained.index(v) for v in others]], others)
        res = fit_user(pipe.prior, pipe.scheduler, z[h], torch.as_tensor(like_all[h]).long(), init=start,
                       trained_users=trained, steps=cfg.steps, lr=lr, batch_size=cfg.batch_size, gauss=gauss,
                       gauss_weight=w, checkpoints=checkpoints, seed=seed)
        for steps, row in [(0, initial_row(pipe.prior, start, trained)), *res.at.items()]:
            recs.append(dict(user_id=int(u), k=k, init=init, lr=lr, gauss=w, steps=steps))
            rows.append(row)
    return recs, rows


def validation_scores(pipe, ratings: pd.DataFrame, z: torch.Tensor, recs: list[dict], rows: list, cfg, seed: int = 0
                      ) -> pd.DataFrame:
    """`recs` (each with a user_id) as a table with each row's validation P@1 (§4.4, `cfg.select_samples` prior
    samples against the user's validation pool, decoder space) and the prior's loss on those ratings."""
    model = pipe.with_rows({})
    ids = model.add_users(torch.stack([r.to(model.prior.user_emb.weight) for r in rows]), source="selection")
    n, who = cfg.select_samples, torch.as_tensor([r["user_id"] for r in recs])
    u = torch.as_tensor(ids).repeat_interleave(n)
    x = model.sample(u, torch.ones_like(u), torch.arange(n).repeat(len(ids)), cfg_scale=cfg.cfg_scale, seed=seed,
                     seed_ids=who.repeat_interleave(n)).view(len(ids), n, -1)
    val = (ratings["split"] == "val").to_numpy()
    pool = (pipe.normalizer.inverse(z[torch.as_tensor(np.flatnonzero(val))]).numpy(),
            ratings["user_id"].to_numpy()[val], ratings["like"].to_numpy()[val].astype(bool))
    like = torch.as_tensor(ratings["like"].to_numpy(dtype=np.int64))
    out, with_likes = [], set(pool[1][pool[2]].tolist())
    for rec, row, xs in zip(recs, rows, x):
        p1 = float("nan")  # a user without a liked validation image has no P@1 (§4.4 drops such users)
        if rec["user_id"] in with_likes:
            per, _ = retrieval.retrieval_metrics(xs.numpy(), [rec["user_id"]] * n, *pool, ks=(1,))
            p1 = float(per["precision"].iloc[0])
        m = torch.as_tensor(np.flatnonzero(val & (ratings["user_id"] == rec["user_id"]).to_numpy()))
        out.append({**rec, "P@1 val": p1, "loss val": heldout_loss(pipe.prior, pipe.scheduler, row, z[m], like[m])})
    return pd.DataFrame(out)


def select_inversion(pipe, ratings: pd.DataFrame, z: torch.Tensor, users: Sequence[int], cfg: NewUserConfig,
                     encoder=None, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """How each (init, lr, row-prior weight, steps) does on the selection `users`: a row fitted from k ∈
    `cfg.select_ks` training ratings, judged on the user's validation ratings (validation_scores)."""
    recs, rows = _selection_fits(pipe, ratings, z, users, cfg, encoder, seed, progress)
    return validation_scores(pipe, ratings, z, recs, rows, cfg, seed)


def select_encoder(pipe, ratings: pd.DataFrame, z: torch.Tensor, users: Sequence[int], cfg: NewUserConfig, result,
                   seed: int = 0) -> pd.DataFrame:
    """The encoder after each of its checkpoints (result.at), encoding each selection user's k ∈ `cfg.select_ks`
    ratings zero-shot, judged on their validation ratings (validation_scores); the caller keeps the best."""
    like = torch.as_tensor(ratings["like"].to_numpy(dtype=np.int64))
    enc, recs, rows = copy.deepcopy(result.encoder), [], []
    for step, state in sorted(result.at.items()):
        enc.load_state_dict(state)
        for u in users:
            for k in cfg.select_ks:
                h = selection_history(ratings, u, k, seed)
                recs.append(dict(user_id=int(u), k=k, init="encoder", lr=cfg.encoder_lr, gauss=0.0, steps=0,
                                 encoder_steps=step))
                rows.append(enc.encode(z[h], like[h]))
    return validation_scores(pipe, ratings, z, recs, rows, cfg, seed)


def best_setting(table: pd.DataFrame, inits: Sequence[str], k: int) -> dict:
    """The (init, lr, gauss, steps) among `inits` with the highest mean validation P@1 from k ratings; ties (and
    choosing users without a liked validation image, whose P@1 is NaN): the lowest loss."""
    d = table[table["init"].isin(list(inits)) & (table["steps"] > 0) & (table["k"] == k)]
    if d.empty:
        raise ValueError(f"best_setting: no selection rows for inits {list(inits)} at k={k}")
    mean = d.groupby(["init", "lr", "gauss", "steps"])[["P@1 val", "loss val"]].mean()
    best = mean.assign(neg=-mean["loss val"]).sort_values(["P@1 val", "neg"], ascending=False).index[0]
    init, lr, gauss, steps = best
    return {"init": init, "lr": float(lr), "gauss": float(gauss), "steps": int(steps),
            **{k: float(v) for k, v in mean.loc[best].items()}}


def choose_settings(table: pd.DataFrame, select_ks: Sequence[int]) -> dict:
    """{"inversion": {k: setting}, "encoder_inversion": {k: setting}} for each k in select_ks (best_setting)."""
    return {"inversion": {k: best_setting(table, ["null", "mean", "nearest"], k) for k in select_ks},
            "encoder_inversion": {k: best_setting(table, ["encoder"], k) for k in select_ks}}


def setting_for(per_k: dict, size: int) -> dict:
    """The setting chosen at the select k nearest to a history of `size` ratings: all (0) for all, else the
    nearest nonzero k on a log scale (all when there is none)."""
    ks = [k for k in per_k if k]
    if size == 0 or not ks:
        return per_k[0] if 0 in per_k else per_k[max(ks)]
    return per_k[min(ks, key=lambda k: abs(np.log(k) - np.log(size)))]


def paired_tests(per_user: pd.DataFrame, metric: str, history: int, reference: str, methods: Sequence[str],
                 n_permutations: int = 2000, n_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """`reference` minus each method on one metric and history: mean difference over workers, 95 % CI and the
    within-worker (sign-flip) permutation p-value, on the workers both methods have."""
    d = per_user[(per_user["metric"] == metric) & (per_user["history"] == history)]
    wide = d.groupby(["user_id", "method"])["value"].mean().unstack()
    rows = []
    for m in methods:
        if m == reference or m not in wide or reference not in wide:
            continue
        pair = wide[[reference, m]].dropna().to_numpy()
        diff, lo, hi = mean_ci(pair[:, 0] - pair[:, 1], n_bootstrap, seed)
        p = within_user_permutation(pair, n_permutations, seed)[1] if len(pair) >= 2 else float("nan")
        rows.append(dict(metric=metric, history=history, method=reference, versus=m, diff=diff, ci_low=lo,
                         ci_high=hi, p_value=p, workers=len(pair)))
    return pd.DataFrame(rows)


def feedback_loop(pipe, user_id: int, img_emb: torch.Tensor, like: np.ndarray, answer: Callable, *, rounds: int,
                  per_round: int, steps: int, seed: int = 0, seed_id: int | None = None) -> pd.DataFrame:
    """Generate `per_round` embeddings for `user_id`; `answer(img_emb, round, arm)` -> (liked (n,), the images'
    re-encoded decoder-space embeddings, a dict of measurements) judges them; the answers join the history
    (decoder space) and the user is updated, `rounds` times. Round r uses sample indices r·n … (r+1)·n − 1, as does
    the copy that gets no feedback; one row per (round, arm) with the measurements."""
    live, frozen = pipe.with_rows({}), pipe.with_rows({})
    hist, hl, recs = img_emb.clone(), np.asarray(like, dtype=bool), []
    sid = user_id if seed_id is None else seed_id
    for r in range(rounds + 1):
        idx = list(range(r * per_round, (r + 1) * per_round))
        for arm, model in (("feedback", live), ("no feedback", frozen)):
            if r == 0 and arm == "no feedback":  # before any answer both are one user: the same images, once
                recs.append({**recs[-1], "arm": arm})
                continue
            x = model.sample([user_id] * per_round, [1] * per_round, idx, seed=seed, seed_ids=[sid] * per_round)
            liked, seen, measured = answer(x, r, arm)
            recs.append(dict(round=r, arm=arm, likes=int(np.sum(liked)), **measured))
            if arm == "feedback" and r < rounds:
                hist, hl = torch.cat([hist, seen]), np.concatenate([hl, np.asarray(liked, dtype=bool)])
                live.update_user(user_id, hist, torch.as_tensor(hl).long(), steps=steps, seed=seed + r)
    return pd.DataFrame(recs)


def feedback_study(pipe, starts: dict, dec_emb: torch.Tensor, like: np.ndarray, answer_for: Callable,
                   cfg: NewUserConfig, seed: int = 0) -> pd.DataFrame:
    """feedback_loop for each worker: starts maps (user_id, history rows) -> the starting row; answer_for(user_id)
    gives that worker's `answer`. One row per (worker, round, arm)."""
    out = []
    for (u, rows), row in tqdm(starts.items(), desc="feedback rounds"):
        p = pipe.with_rows({})
        [uid] = p.add_users(row[None], source="inversion")
        t = feedback_loop(p, uid, dec_emb[list(rows)], like[list(rows)], answer_for(u), rounds=cfg.feedback_rounds,
                          per_round=cfg.feedback_per_round, steps=cfg.feedback_steps, seed=seed, seed_id=u)
        out.append(t.assign(user_id=u))
    return pd.concat(out, ignore_index=True)


def verifier_answer(user_id: int, sd, run_dir, gen_cfg, models, verifier, encoders: dict, threshold: float
                    ) -> Callable:
    """`answer` for feedback_loop: decode the embeddings into <run_dir>/feedback/r<round>_<arm>/, re-encode them,
    and like what `verifier` scores above `threshold` for `user_id` (a stand-in for the person's click)."""
    def answer(x: torch.Tensor, r: int, arm: str):
        items = make_items("feedback", f"r{r}_{arm.replace(' ', '_')}", [user_id] * len(x), range(len(x)), gen_cfg,
                           ip_embeddings=x)
        decoding.decode(sd, items, run_dir, gen_cfg, models=models, progress=False)
        paths = [Path(run_dir) / it.relpath for it in items]
        ver = scores.embed_pil(paths, encoders["verifier"])
        s = scores.score(verifier, [user_id] * len(x), ver)
        return s > threshold, scores.embed_pil(paths, encoders["decoder"]), {"verifier score": float(s.mean()),
                                                                              "ver_emb": ver}
    return answer


def median_score(verifier, ratings: pd.DataFrame, ver_emb: torch.Tensor, user_id: int) -> float:
    """The verifier's median score for `user_id` on the images of their training ratings: a like threshold."""
    m = np.flatnonzero(((ratings["user_id"] == user_id) & (ratings["split"] == "train")).to_numpy())
    return float(np.median(scores.score(verifier, [user_id] * len(m), ver_emb[torch.as_tensor(m)])))


def feedback_metrics(fb: pd.DataFrame, pool: dict) -> pd.DataFrame:
    """feedback_loop's rows (with user_id) as long rows for cold_start.summarise(by=(metric, method, round));
    the verifier score and P@1 of the round's images against the worker's test pool (§4.4, verifier space)."""
    out, with_likes = [], set(np.asarray(pool["user_id"])[np.asarray(pool["liked"])].tolist())
    for rec in fb.to_dict("records"):
        base = dict(user_id=rec["user_id"], method=rec["arm"], round=rec["round"], draw=0)
        out.append({**base, "metric": "verifier score", "value": rec["verifier score"]})
        out.append({**base, "metric": "likes", "value": rec["likes"]})
        if rec["user_id"] in with_likes:  # P@k needs a like in the test pool (§4.4 drops such users too)
            per, _ = retrieval.retrieval_metrics(rec["ver_emb"].numpy(), [rec["user_id"]] * len(rec["ver_emb"]),
                                                 pool["img_emb"].numpy(), pool["user_id"], pool["liked"], ks=(1,))
            out.append({**base, "metric": "P@1 image (paper)", "value": float(per["precision"].iloc[0])})
    return pd.DataFrame(out)


def fit_encoder(pipe, ratings: pd.DataFrame, z: torch.Tensor, encoder_users: Sequence[int],
                selection_users: Sequence[int], cfg: NewUserConfig, seed: int = 0, progress: bool = True):
    """Train the history encoder on `encoder_users`' training ratings; keep the checkpoint (0 … encoder_steps)
    with the best validation P@1 on `selection_users`. Returns (encoder, its selection table, seconds, kept step)."""
    m = (ratings["user_id"].isin(list(encoder_users)) & (ratings["split"] == "train")).to_numpy()
    idx = torch.as_tensor(np.flatnonzero(m))
    s = cfg.encoder_steps
    res = train_encoder(pipe.prior, pipe.scheduler, z[idx], torch.as_tensor(ratings["like"].to_numpy()[m]).long(),
                        torch.as_tensor(ratings["user_id"].to_numpy()[m]), steps=s, lr=cfg.encoder_lr,
                        batch_users=cfg.encoder_batch_users, regress=cfg.encoder_regress,
                        checkpoints=sorted({0, s // 4, s // 2, s}), seed=seed, progress=progress)
    table = select_encoder(pipe, ratings, z, selection_users, cfg, res, seed)
    mean = table.groupby("encoder_steps")["P@1 val"].mean().fillna(-1.0)  # no P@1 anywhere: the first checkpoint
    best = int(mean.idxmax())
    res.encoder.load_state_dict(res.at[best])
    return res.encoder.eval(), table, res.seconds, best
