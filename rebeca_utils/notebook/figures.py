"""Every paper figure and table rebuilt from the notebooks' outputs (notebook 11): the registry, the paper-vs-ours
table, the figures manifest and the one-file HTML report."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from ..baselines.personas import DEFAULT_NEGATIVE, FALLBACK_KEYWORDS, STYLE_SUFFIX
from ..evaluate import paper as P
from ..evaluate.scores import wins_and_ranks
from ..io import sha256
from ..pipeline.decoding import load_images
from ..steps import folder, path as step_path
from . import plots


class Missing(FileNotFoundError):
    """A figure's source output is absent: which notebook to run."""


@dataclass(frozen=True)
class Entry:
    """One paper figure or table: its id, the caption's claim, where its data come from, how it is rebuilt."""

    id: str
    claim: str
    notebook: str
    files: tuple[str, ...]
    build: Callable  # (source folder, profile root) -> (figure | DataFrame, our number as text, how)


def _read(src: Path, name: str) -> Path:
    path = src / name
    if not path.exists():
        raise Missing(f"{path} is missing: run {src.name} first")
    return path


def _metrics(src: Path) -> dict:
    return json.loads(_read(src, "manifest.json").read_text())["metrics"]


def _copied(src: Path, name: str):
    """A figure as its notebook drew it (its data are not saved separately)."""
    img = np.asarray(Image.open(_read(src, name)).convert("RGB"))
    fig, ax = plt.subplots(figsize=(img.shape[1] / 150, img.shape[0] / 150), dpi=150)
    ax.imshow(img), ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1)
    return fig


def _verifier(src, root):
    v = pd.read_csv(_read(src, "verifier_per_user.csv"))
    means = v.groupby("method", sort=False)["score"].mean()
    order = list(dict.fromkeys(v["method"]))
    return plots.verifier_boxplots(v, order=order, title="Fig 4: verifier score per user (eq. 5)"), \
        f"highest mean: {means.idxmax()} ({means.max():.3f}); " + ", ".join(f"{k} {x:.3f}" for k, x in means.items()), \
        "replotted from verifier_per_user.csv"


def _quality(column: str, title: str):
    def build(src, root):
        q = pd.read_csv(_read(src, "quality_per_image.csv"))
        long = q.rename(columns={"label": "method", column: "score"})
        means = q.groupby("label", sort=False)[column].mean()
        return plots.quality_boxplots(long, column, order=list(dict.fromkeys(q["label"])), title=title), \
            f"highest mean: {means.idxmax()} ({means.max():.3f})", "replotted from quality_per_image.csv"
    return build


def _wins(kind: str):
    def build(src, root):
        wr = wins_and_ranks(pd.read_csv(_read(src, "verifier_per_user.csv")))
        wins = wr["win_counts"]
        text = f"{wins.idxmax()} wins {int(wins.max())} of {int(wins.sum())} users with every method"
        fig = plots.verifier_heatmap(wr["matrix"], wr["winner"], "Fig 10: verifier score per user") if kind == "heat" \
            else plots.method_ranks(wr["ranks"], "Fig 11: rank of each method per user")
        return fig, text, "replotted from verifier_per_user.csv"
    return build


def own_scores(root: Path, omega: float, users) -> str:
    """Per-user signal of a samples figure: eq. 5 (verifier score of the user's own images, notebook 08) for the
    shown users, against all users; and, at notebook 10's setting, how many shown users' images score higher for
    them than for other users (Algorithm 2's per-user gap)."""
    v_path = step_path(root, 8, "verifier_per_user.csv")
    if not v_path.is_file():
        return f"verifier scores: run {folder(8)} first"
    v = pd.read_csv(v_path)
    v = v[v["method"] == P.method_label("rebeca", f"prior_cfg{omega:g}")]
    shown = v[v["user_id"].isin(users)]["score"]
    if shown.empty:
        return f"no verifier scores at ω = {omega:g} in {folder(8)}"
    text = (f"verifier score of own images (eq. 5), users 1-{len(users)}: mean {shown.mean():.3f} "
            f"(min {shown.min():.3f}, max {shown.max():.3f}); all {len(v)} users {v['score'].mean():.3f}")
    gap_path, m10 = step_path(root, 10, "per_user.csv"), step_path(root, 10, "manifest.json")
    if gap_path.is_file() and m10.is_file() and \
            json.loads(m10.read_text()).get("parameters", {}).get("setting") == f"prior_cfg{omega:g}":
        gap = pd.read_csv(gap_path).set_index("user_id")["gap_generated"].reindex(users)
        text += f"; own − other users' score > 0 for {int((gap > 0).sum())} of {len(users)} (Algorithm 2 gap)"
    return text


def _samples(omega: float, fig_id: str):
    def build(src, root):
        m = pd.read_csv(_read(src, "generation_manifest.csv"), keep_default_na=False)
        cfg = json.loads(_read(src, "manifest.json").read_text())["config"]["generation"]
        setting = f"prior_cfg{omega:g}"
        users = sorted(m.loc[m["setting"] == setting, "user_id"].unique())[: cfg["grid_users"]]
        if not users:
            raise Missing(f"{src}: no images of {setting}; run {folder(4)} with ω = {omega:g}")
        n = min(cfg["grid_images"], cfg["n_per_user"])
        rows = [load_images(src, "rebeca", setting, int(u), n) for u in users]
        # users are numbered from 1 wherever people read them (notebook 04's Figs 13-15 too)
        fig = plots.user_rows(rows, [f"user {u + 1}" for u in users],
                              f"{fig_id}: users 1-{len(users)}, prior CFG {omega:g}")
        return fig, own_scores(Path(root), omega, [int(u) for u in users]), f"redrawn from {src.name}'s PNGs"
    return build


def _table1(src, root):
    t = P.table1(dict(np.load(_read(src, "table1_inputs.npz"))))
    r = t[(t["method"] == "REBECA") & (t["k"] == 1)].iloc[0]
    return t, f"REBECA P@1 {r['precision']:.3f} (paper 0.782)", "recomputed from table1_inputs.npz"


def _table2(src, root):
    t = pd.read_csv(_read(src, "table2_paper.csv"), header=[0, 1], index_col=0)
    label = P.rebeca_label(5.0)
    ours = f"{label} P@1 {t.loc[label, ('@1', 'P')]:.3f}" if label in t.index else "no REBECA (CFG=5.0) row"
    return t, ours + " (paper 0.556)", "from table2_paper.csv"


def _csv(name: str, what: str):
    def build(src, root):
        t = pd.read_csv(_read(src, name))
        return t, what.format(n=len(t)), f"from {name}"
    return build


def _table5(src, root):
    vlm = json.loads(_read(src, "manifest.json").read_text())["config"]["vlm"]
    t = pd.DataFrame({"Type": ["Positive keywords", "Style suffix", "Negative prompt"],
                      "Default values": [", ".join(FALLBACK_KEYWORDS), STYLE_SUFFIX, ", ".join(DEFAULT_NEGATIVE)]})
    return t, f"negative prompt used: {vlm['negative']}; fallback rate {_metrics(src)['fallback_rate']:.0%}", \
        f"rendered from the constants {src.name} used"


def _image(name: str, number: Callable[[dict], str]):
    def build(src, root):
        return _copied(src, name), number(_metrics(src)), f"as drawn by {src.name} ({name})"
    return build


def _ablation(name: str, fig: str):
    def build(src, root):
        data = pd.read_csv(_read(src, name))
        tests = _metrics(src)["fig6_p" if fig == "6" else "fig7_p"]
        low = min((t.get("p_permutation_holm", np.nan) for t in tests), default=np.nan)
        cols = [c for c in ("verifier", "LAION aesthetic") if c in data.columns or f"{c} mean" in data.columns]
        extra = src / ("fig6_effects.csv" if fig == "6" else "fig7_tests.csv")
        extra = pd.read_csv(extra) if extra.is_file() else None  # older 09 runs: the plain figure
        if fig == "6":
            out = plots.dual_guidance_heatmaps(data, cols, "Fig 6: user-averaged scores by SD × prior CFG", extra)
        else:
            out = plots.prompt_levels_figure(data, cols, "Fig 7: scores by system-prompt level", extra)
        return out, f"{len(tests)} paired tests, smallest Holm-adjusted permutation p {low:.3g}", \
            f"replotted from {name}" + (f" and {extra_name(fig)}" if extra is not None else "")
    return build


def extra_name(fig: str) -> str:
    """The companion file of Fig 6 (paired effects per cell) or Fig 7 (paired tests)."""
    return "fig6_effects.csv" if fig == "6" else "fig7_tests.csv"


def _dsprites_fig2(m: dict) -> str:
    return f"test images whose nearest VAE-latent neighbour has the same shape-colour pair: {m['vae_nn_pair_agreement']:.3f}"


def _dsprites_fig3(m: dict) -> str:
    p, r, land = m["rebeca_precision"], m["random_precision"], m["landing_own_pair"]
    k = min(p, key=int)
    return (f"REBECA P@{k} {p[k]:.3f} vs Random {r[k]:.3f} (Table 1); samples landing on the user's own pair: "
            f"REBECA {land['REBECA']:.3f}, Oracle {land['Oracle']:.3f}, Random {land['Random']:.3f}")


REGISTRY = [
    Entry("Fig 2", "the VAE latent space separates the four shape-colour pairs", folder(1),
          ("fig2_umap_vae.png", "manifest.json"), _image("fig2_umap_vae.png", _dsprites_fig2)),
    Entry("Fig 3", "REBECA's samples follow each dSprites user's taste", folder(1),
          ("fig3_users.png", "manifest.json"), _image("fig3_users.png", _dsprites_fig3)),
    Entry("Fig 4", "REBECA achieves the highest personalization scores", folder(8),
          ("verifier_per_user.csv",), _verifier),
    Entry("Fig 5a", "LAION aesthetic: REBECA best", folder(8), ("quality_per_image.csv",),
          _quality("LAION aesthetic", "Fig 5a: LAION aesthetic score")),
    Entry("Fig 5b", "HPSv2 (generic prompt): REBECA best", folder(8), ("quality_per_image.csv",),
          _quality("HPSv2 (generic prompt)", "Fig 5b: HPSv2, generic prompt")),
    Entry("Fig 6", "higher prior CFG: more personalization; higher SD CFG: aesthetics up, personalization down",
          folder(9), ("fig6_grid.csv", "fig6_effects.csv", "manifest.json"), _ablation("fig6_grid.csv", "6")),
    Entry("Fig 7", "no significant effect of the prompt level at any prior CFG", folder(9),
          ("fig7_summary.csv", "fig7_tests.csv", "manifest.json"), _ablation("fig7_summary.csv", "7")),
    Entry("Fig 8a", "correct matches score ~5 SD above random, p < 1e-3", folder(10),
          ("fig8a_matching_permutation.png", "manifest.json"),
          _image("fig8a_matching_permutation.png", lambda m: f"z {m['matching']['z']:.2f}, "
                                                             f"p {m['matching']['p_value']:.3g}")),
    Entry("Fig 8b", "aesthetics explains part of the verifier signal: R² = 0.32", folder(10),
          ("fig8b_verifier_vs_aesthetic.png", "manifest.json"),
          _image("fig8b_verifier_vs_aesthetic.png", lambda m: f"R² {m['r2']['r2']:.3f} "
                                                              f"[{m['r2']['ci_low']:.3f}, {m['r2']['ci_high']:.3f}]")),
    Entry("Fig 9", "verifier ROC-AUC ≈ 0.87 on train and test, no significant gap", folder(5),
          ("fig9_verifier_roc.png", "manifest.json"),
          _image("fig9_verifier_roc.png", lambda m: f"AUC train {m['auc_train']:.3f}, test {m['auc_test']:.3f} "
                                                    f"[{m['auc_test_ci'][0]:.3f}, {m['auc_test_ci'][1]:.3f}]")),
    Entry("Fig 10", "REBECA achieves the highest scores for most users", folder(8),
          ("verifier_per_user.csv",), _wins("heat")),
    Entry("Fig 11", "REBECA ranks highest for the majority of users", folder(8),
          ("verifier_per_user.csv",), _wins("ranks")),
    Entry("Fig 12", "HPSv2, empty prompt: all methods similar", folder(8), ("quality_per_image.csv",),
          _quality("HPSv2 (empty prompt)", "Fig 12: HPSv2, empty prompt")),
    *(Entry(f"Fig {13 + i}", f"samples for users 1-12 at prior CFG {w:g}", folder(4),
            ("generation_manifest.csv", "manifest.json", f"../{folder(8)}/verifier_per_user.csv"),
            _samples(w, f"Fig {13 + i}")) for i, w in enumerate((5, 7, 9))),
    Entry("Table 1", "dSprites: REBECA P@1 0.782, Random 0.290", folder(1), ("table1_inputs.npz",),
          _table1),
    Entry("Table 2", "REBECA beats every baseline on P@1", folder(8), ("table2_paper.csv",), _table2),
    Entry("Table 3", "per-user LoRA recipe by N_i", folder(6), ("table3_bucket_counts.csv",),
          _csv("table3_bucket_counts.csv", "{n} buckets, users counted per bucket")),
    Entry("Table 4", "shared LoRA recipe", folder(6), ("table4_shared.csv",),
          _csv("table4_shared.csv", "as configured")),
    Entry("Table 5", "fallback prompt components", folder(7), ("manifest.json",), _table5),
    Entry("Algorithm 2", "personalization: H0 rejected", folder(10), ("manifest.json",),
          lambda src, root: (pd.DataFrame([_metrics(src)["alg2"]]), "p {p_value:.3g}, z {z:.2f}".format(
              **_metrics(src)["alg2"]), f"from {src.name}'s manifest")),
]


def build_all(root: str | Path, savefig: Callable, path: Callable, progress=lambda e: None) -> pd.DataFrame:
    """Rebuild every entry whose sources exist (figures through savefig(fig, name), tables to path(name)); one row
    each: id, status built | missing, the paper's claim, our number, how, source digests, output files."""
    root = Path(root)
    rows = []
    for e in REGISTRY:
        progress(e)
        src = root / e.notebook
        slug = e.id.lower().replace(" ", "")
        try:
            obj, ours, how = e.build(src, root)
        except Exception as exc:  # noqa: BLE001 - a partial or older run: this entry says why, the rest go on
            missing = isinstance(exc, Missing)
            why = str(exc) if missing else f"{type(exc).__name__}: {exc}; rerun {e.notebook}".splitlines()[0]
            rows.append({"id": e.id, "status": "missing" if missing else "failed", "claim": e.claim, "ours": "",
                         "how": why, "notebook": e.notebook, "sources": {}, "outputs": []})
            continue
        if isinstance(obj, pd.DataFrame):
            obj.to_csv(path(f"{slug}.csv"))
            outputs = [f"{slug}.csv"]
        else:
            savefig(obj, slug)
            plt.close(obj)
            outputs = [f"{slug}.png", f"{slug}.pdf"]
        sources = {f: sha256(src / f) for f in e.files if (src / f).is_file()}
        rows.append({"id": e.id, "status": "built", "claim": e.claim, "ours": ours, "how": how,
                     "notebook": e.notebook, "sources": sources, "outputs": outputs})
    return pd.DataFrame(rows)
