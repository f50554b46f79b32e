"""The paper's printed numbers and row names, and Tables 1-2 built from our results."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .retrieval import DEFINITIONS, precision_recall_at_k, retrieval_metrics

# paper row names of the baselines (Table 2), by (method, setting) as the baseline notebooks name them
LABELS = {("lora", "shared"): "Shared LoRA", ("lora", "per_user"): "Per-user LoRA",
          ("persona", "vlm"): "VLM Persona", ("persona", "vlm_lora"): "VLM Persona + LoRA"}


def method_label(method: str, setting: str) -> str:
    """Row name of (method, setting): the paper's where it has one (e.g. 'REBECA (CFG=5.0)'), else 'method/setting'."""
    m = re.fullmatch(r"prior_cfg(\d+(?:\.\d+)?)", setting)
    if method == "rebeca" and m:
        return rebeca_label(float(m.group(1)))
    return LABELS.get((method, setting), f"{method}/{setting}")


# Table 1 of the paper (controlled dSprites study); recall is reported there x 1e-3.
PAPER_TABLE1 = {
    ("REBECA", 1): (0.782, 0.167e-3), ("REBECA", 5): (0.782, 0.835e-3),
    ("REBECA", 10): (0.789, 1.685e-3), ("REBECA", 20): (0.799, 3.409e-3),
    ("Mean", 1): (1.000, 0.214e-3),
    ("Random", 1): (0.290, 0.062e-3), ("Random", 5): (0.282, 0.301e-3),
    ("Random", 10): (0.287, 0.613e-3), ("Random", 20): (0.291, 1.244e-3),
}


RECALL_DENOMINATORS = ("user", "all_users")

NN_SPACES = ("latent", "standardized")


def section33_pr(samples, pool, likes, k: int, recall_denominator: str = "user"):
    """§3.3 P@k, R@k -> two (reps, U) arrays: each user's first k of K samples (reps, U, K, d), one neighbour each.

    recall_denominator "user": R@k(u) divides by u's liked pool items; "all_users": by the liked pool rows of all
    users together (what the paper's Table 1 did: its recall is k·P/≈4,682 in every row).
    """
    if recall_denominator not in RECALL_DENOMINATORS:
        raise ValueError(f"recall_denominator={recall_denominator!r}: valid values are {', '.join(RECALL_DENOMINATORS)}")
    samples, likes = np.asarray(samples), np.asarray(likes, dtype=bool)
    if samples.ndim != 4 or not 1 <= k <= samples.shape[2]:
        raise ValueError(f"k={k}: need samples of shape (reps, U, K >= k, d), got {samples.shape}")
    pr = np.array([[precision_recall_at_k(x[:k], pool, likes[u], 1) for u, x in enumerate(rep)] for rep in samples])
    recall = pr[..., 1]
    if recall_denominator == "all_users":
        recall = recall * likes[: samples.shape[1]].sum(1) / likes.sum()
    return pr[..., 0], recall


def standardize(x, mean, std) -> np.ndarray:
    """Per-dimension z-scores (x - mean) / std: the space the dSprites prior works in."""
    return (np.asarray(x, dtype=np.float64) - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)


def table1(inputs: dict, ks=(1, 5, 10, 20), recall_denominator: str = "user", space: str = "latent"):
    """Table 1 from `table1_inputs.npz` arrays alone: REBECA, Oracle, Mean (k=1), Random; mean +- std over reps.

    Oracle (when the inputs have it) draws uniformly from the user's liked training latents: the ceiling of any
    sampler of p(latent | user, like). space "latent": cosine neighbours between VAE means (default);
    "standardized": between per-dimension z-scores with the training latents' `latent_mean` / `latent_std` (a
    reading of §3.3 checked for the paper's Mean P@1 = 1.0; it does not give it, README).
    recall_denominator: see `section33_pr`.
    """
    if space not in NN_SPACES:
        raise ValueError(f"space={space!r}: valid values are {', '.join(NN_SPACES)}")

    def to_space(x):
        return standardize(x, inputs["latent_mean"], inputs["latent_std"]) if space == "standardized" else x

    pool, liked = to_space(inputs["test_latents"]), inputs["test_likes"]
    rows = []
    methods = [("REBECA", inputs["rebeca"], ks), ("Oracle", inputs.get("oracle"), ks),
               ("Mean", inputs["mean"][None, :, None, :], (1,)), ("Random", inputs["random"], ks)]
    for name, samples, method_ks in methods:
        if samples is None:
            continue
        for k in method_ks:
            p, r = section33_pr(to_space(samples), pool, liked, k, recall_denominator)
            p_rep, r_rep = p.mean(-1), r.mean(-1)  # average over users, then spread over repetitions
            paper = PAPER_TABLE1.get((name, k), (np.nan, np.nan))
            rows.append(dict(method=name, k=k, precision=p_rep.mean(), precision_std=p_rep.std(),
                             recall=r_rep.mean(), recall_std=r_rep.std(),
                             paper_precision=paper[0], paper_recall=paper[1]))
    return pd.DataFrame(rows)


# Table 2 of the paper (210 users, per-user pool of held-out likes + dislikes, cosine similarity in bigG space).
# Read with care: in every row F1 < 2PR/(P+R) of the printed P and R, and for REBECA P@5 < P@1, which the §4.4
# formula cannot give (1[Top-k ∩ L_u ≠ ∅] only grows with k). Both fit the reference code's definition
# (precision over the set of retrieved items, F1 averaged over users), not the formulas printed in §4.4.
TABLE2_COLUMNS = ((1, "P"), (1, "R"), (1, "F1"), (5, "P"), (5, "R"), (5, "F1"))

PAPER_TABLE2 = {
    "Shared LoRA": (0.455, 0.718, 0.540, 0.471, 0.991, 0.623),
    "Per-user LoRA": (0.485, 0.713, 0.557, 0.470, 0.986, 0.621),
    "VLM Persona": (0.507, 0.685, 0.556, 0.472, 0.983, 0.621),
    "VLM Persona + LoRA": (0.511, 0.673, 0.555, 0.475, 0.986, 0.626),
    "REBECA (CFG=3.0)": (0.524, 0.767, 0.605, 0.478, 0.997, 0.630),
    "REBECA (CFG=5.0)": (0.556, 0.714, 0.605, 0.478, 0.989, 0.629),
    "REBECA (CFG=7.0)": (0.579, 0.647, 0.584, 0.480, 0.976, 0.628),
    "REBECA (CFG=9.0)": (0.605, 0.610, 0.575, 0.484, 0.972, 0.631),
}


def rebeca_label(cfg: float) -> str:
    """Row name of REBECA at prior CFG `cfg` in Table 2, e.g. 'REBECA (CFG=5.0)'."""
    return f"REBECA (CFG={float(cfg):.1f})"


def table2(per_method: dict, ks=(1, 5), with_paper: bool = False):
    """Table 2 layout: rows = method/setting, columns (@k, P/R/F1); with_paper adds a 'paper' column beside 'ours'.

    per_method maps a row name (use PAPER_TABLE2's names, e.g. rebeca_label(5.0)) to a `retrieval_metrics`
    summary. With with_paper=True, the paper's rows we have no result for are listed too (ours = NaN).
    """
    cols = [(f"@{k}", m) for k in ks for m in ("P", "R", "F1")]
    ours = {}
    for name, s in per_method.items():
        s = s.set_index("k")
        missing = [k for k in ks if k not in s.index]
        if missing:
            raise ValueError(f"{name!r}: summary has no k={missing}")
        ours[name] = [s.loc[k, c] for k in ks for c in ("precision", "recall", "f1")]
    names = list(per_method) + ([n for n in PAPER_TABLE2 if n not in per_method] if with_paper else [])
    out = pd.DataFrame([ours.get(n, [np.nan] * len(cols)) for n in names], index=pd.Index(names, name="method"),
                       columns=pd.MultiIndex.from_tuples(cols))
    if not with_paper:
        return out
    lookup = {(f"@{k}", m): i for i, (k, m) in enumerate(TABLE2_COLUMNS)}
    paper = pd.DataFrame([[PAPER_TABLE2[n][lookup[c]] if n in PAPER_TABLE2 and c in lookup else np.nan
                           for c in cols] for n in names], index=out.index, columns=out.columns)
    both = pd.concat({"ours": out, "paper": paper}, axis=1).reorder_levels([1, 2, 0], axis=1)
    return both[[(a, b, s) for a, b in cols for s in ("ours", "paper")]]


def reference_normalised_correctly(label: str) -> bool:
    """Whether the reference evaluation L2-normalised a row's samples correctly: REBECA's only (README, deviations)."""
    return str(label).startswith("REBECA")


def table2_both(gen_emb, gen_user, gen_label, pool_emb, pool_user, pool_liked, ks=(1, 5), min_likes: int = 1,
                with_paper: bool = False):
    """Table 2 under every P/R definition -> (tables {definition: table2}, per_user, summary) for every label.

    gen_label[i] names the row (method) of generated sample i; rows keep the labels' order of first appearance.
    per_user and summary are the `retrieval_metrics` frames of every (definition, label), with those two columns
    added, definition-major. "reference_exact" ranks as the reference notebook did: REBECA rows
    (`reference_normalised_correctly`) L2-normalised, the pool and the other rows reduced to sign(x).
    """
    gen_emb, gen_user, gen_label = np.asarray(gen_emb), np.asarray(gen_user), np.asarray(gen_label)
    if len(gen_label) != len(gen_emb):
        raise ValueError(f"gen_label has {len(gen_label)} entries but gen_emb has {len(gen_emb)}")
    labels = list(dict.fromkeys(gen_label.tolist()))
    tables, per_user, summary = {}, [], []
    for definition in DEFINITIONS:
        per_label = {}
        for label in labels:
            m = gen_label == label
            rows, per_label[label] = retrieval_metrics(gen_emb[m], gen_user[m], pool_emb, pool_user, pool_liked,
                                                       ks=ks, definition=definition, min_likes=min_likes,
                                                       gen_exact=reference_normalised_correctly(label))
            per_user.append(rows.assign(label=label, definition=definition))
            summary.append(per_label[label].assign(label=label, definition=definition))
        tables[definition] = table2(per_label, ks, with_paper=with_paper)
    return tables, pd.concat(per_user, ignore_index=True), pd.concat(summary, ignore_index=True)
