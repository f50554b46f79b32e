"""Figures shared by the notebooks (each saved as PNG + PDF through `Run.savefig`)."""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from sklearn.metrics import roc_auc_score, roc_curve

from ..runtime import torch_threads


def umap_scatter(emb: np.ndarray, labels: np.ndarray, names, seed: int = 0, title: str = ""):
    """2-D UMAP of embeddings coloured by a categorical label (Figure 2)."""
    import umap  # lazy: heavy, only this path needs it

    with torch_threads():  # numba's OpenMP layer would leave torch on every core (spinning beside other work)
        xy = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=seed).fit_transform(emb)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    palette = ["#d62728", "#1f77b4", "#ff9896", "#aec7e8", "#2ca02c", "#9467bd"]
    for i, name in enumerate(names):
        m = labels == i
        ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, color=palette[i % len(palette)], label=name)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title)
    ax.legend(markerscale=4, frameon=False, fontsize=8)
    return fig


def user_rows(rows: list[np.ndarray], row_labels: list[str], title: str = ""):
    """Grid of images, one row per entry of `rows` (each (n, H, W, 3) in [0, 1]); Figure 3 / App M style."""

    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.1 * n_cols + 1.2, 1.15 * len(rows)), squeeze=False)
    for i, (imgs, label) in enumerate(zip(rows, row_labels)):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(imgs):
                ax.imshow(np.clip(imgs[j], 0, 1))
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_curves(history: list[dict], title: str = "", logy: bool = True):
    """Train/validation loss per epoch, with learning-rate drops marked."""

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(ep, [h["train_loss"] for h in history], label="train")
    ax.plot(ep, [h["val_loss"] for h in history], label="validation")
    lrs = [h["lr"] for h in history]
    for e, (a, b) in zip(ep[1:], zip(lrs, lrs[1:])):
        if b < a:
            ax.axvline(e, color="grey", lw=0.8, ls=":")
    best = int(np.argmin([h["val_loss"] for h in history]))
    ax.scatter([ep[best]], [history[best]["val_loss"]], color="k", zorder=3, s=15, label="best")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def precision_bars(df, title: str = ""):
    """P@k per method and k with std error bars (Table 1 as a figure)."""

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    methods = list(dict.fromkeys(df["method"]))
    ks = sorted(set(df["k"]))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        d = df[df["method"] == m].set_index("k").reindex(ks)
        ax.bar(np.arange(len(ks)) + i * w, d["precision"], w, yerr=d["precision_std"], label=m)
    ax.set_xticks(np.arange(len(ks)) + w * (len(methods) - 1) / 2, [f"k={k}" for k in ks])
    ax.set_ylabel("Precision@k"), ax.set_ylim(0, 1.05), ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def ratings_overview(splits):
    """Ratings per user and like rate per user (FLICKR-AES report figure)."""

    per_user = splits.groupby("user_id").agg(ratings=("like", "size"), like_rate=("like", "mean"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    sns.histplot(per_user["ratings"], ax=axes[0], bins=30)
    axes[0].set_title("ratings per user")
    sns.histplot(per_user["like_rate"], ax=axes[1], bins=20)
    axes[1].set_title("like rate per user (score >= threshold)")
    sns.countplot(x=splits["score"], ax=axes[2], color="C0")
    axes[2].set_title("score distribution")
    fig.tight_layout()
    return fig


def grid_results(df, score: str = "best_val_loss"):
    """App E grid: one point per configuration, by objective and schedule."""

    ok = df[df["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(ok):
        sns.stripplot(data=ok, x="prediction_type", y=score, hue="beta_schedule", dodge=True, ax=ax)
    ax.set_title(f"App E grid: {score} ({(df['status'] != 'ok').sum()} failed)")
    fig.tight_layout()
    return fig


def verifier_boxplots(per_user, method: str = "method", value: str = "score", order=None, title: str = ""):
    """Figure 4: distribution over users of the per-user verifier score (eq. 5) for each method/setting."""

    order = order or list(dict.fromkeys(per_user[method]))
    fig, ax = plt.subplots(figsize=(1.1 * len(order) + 2, 3.8))
    sns.boxplot(data=per_user, x=method, y=value, order=order, ax=ax, color="C0", fliersize=0, width=0.6)
    sns.stripplot(data=per_user, x=method, y=value, order=order, ax=ax, color="k", size=2, alpha=0.35)
    ax.set_xlabel(""), ax.set_ylabel("verifier score (per-user mean)"), ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def verifier_heatmap(matrix, winner=None, title: str = ""):
    """Figure 10: users x methods verifier scores (methods as rows), each user's winning method marked."""

    m = matrix.T  # methods x users: 210 users read better along the x axis
    fig, ax = plt.subplots(figsize=(min(2 + 0.06 * m.shape[1], 16), 0.45 * m.shape[0] + 1.4))
    im = ax.imshow(m.values, aspect="auto", cmap="viridis", interpolation="nearest")
    best = m.values.argmax(0) if winner is None else [list(m.index).index(w) for w in winner.reindex(m.columns)]
    ax.scatter(np.arange(m.shape[1]), best, marker="o", s=6, color="w", edgecolor="k", linewidth=0.3, label="winner")
    ax.set_yticks(range(m.shape[0]), m.index)
    ax.set_xlabel(f"user ({m.shape[1]})"), ax.set_xticks([])
    fig.colorbar(im, ax=ax, label="verifier score", fraction=0.03, pad=0.01)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def method_ranks(ranks, title: str = ""):
    """Figure 11: share of users giving each method rank 1 (best), 2, ... as stacked horizontal bars."""

    n_methods = ranks.shape[1]
    share = ranks.apply(lambda c: c.value_counts(normalize=True)).reindex(range(1, n_methods + 1)).fillna(0).T
    share = share.sort_values(1, ascending=True)  # best method on top
    fig, ax = plt.subplots(figsize=(7, 0.45 * n_methods + 1.4))
    colors = plt.get_cmap("RdYlGn_r")(np.linspace(0.05, 0.95, n_methods))
    left = np.zeros(n_methods)
    for r in share.columns:
        ax.barh(share.index, share[r], left=left, color=colors[r - 1], label=f"rank {r}")
        left += share[r].values
    ax.set_xlim(0, 1), ax.set_xlabel(f"share of users ({len(ranks)})"), ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, ncol=min(n_methods, 5), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    return fig


def quality_boxplots(long_df, metric_name: str, method: str = "method", value: str = "score", order=None,
                     title: str = ""):
    """Figures 5 / 12: LAION aesthetic or HPSv2 score per method/setting (one row per image or per user)."""

    order = order or list(dict.fromkeys(long_df[method]))
    fig, ax = plt.subplots(figsize=(1.1 * len(order) + 2, 3.8))
    sns.boxplot(data=long_df, x=method, y=value, order=order, ax=ax, color="C1", fliersize=1, width=0.6)
    ax.set_xlabel(""), ax.set_ylabel(metric_name), ax.set_title(title or metric_name)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def permutation_figure(result, gaps=None, title: str = "", observed: str = "correct matching"):
    """Figure 8a: permutation null of the median user score with the observed value and z; per-user gaps."""

    gaps = result.gap if gaps is None else np.asarray(gaps)
    gaps = gaps[np.isfinite(gaps)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    ax.hist(result.null, bins=40, color="grey", alpha=0.8, label=f"null (B={len(result.null)})")
    ax.axvline(result.statistic, color="C3", lw=2, label=observed)
    ax.set_xlabel(f"median over users of per-user {result.agg} score")
    ax.set_title(f"z = {result.z:.1f}, p = {result.p_value:.2g}")
    ax.legend(frameon=False, fontsize=8)
    ax = axes[1]
    ax.hist(gaps, bins=30, color="C0", alpha=0.8)
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("per-user gap (correct − random)")
    ax.set_title(f"{(gaps > 0).mean():.0%} of {len(gaps)} users above 0")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def r2_scatter(x, y, fit: dict, xlabel: str = "LAION aesthetic score", ylabel: str = "verifier score",
               title: str = ""):
    """Figure 8b: per-user verifier vs aesthetic score with the least-squares line and R² [bootstrap CI]."""

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    fig, ax = plt.subplots(figsize=(4.8, 4))
    ax.scatter(x, y, s=8, alpha=0.6)
    xs = np.linspace(x.min(), x.max(), 50)
    ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="C3")
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    ax.set_title(title or f"R² = {fit['r2']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]")
    fig.tight_layout()
    return fig


def table2_figure(df, title: str = "Table 2"):
    """Table 2 (from `evaluate.paper.table2`) rendered as a figure; the best value of each column in bold."""

    cols = [" ".join(str(c) for c in (col if isinstance(col, tuple) else (col,))) for col in df.columns]
    cells = [[f"{v:.3f}" if np.isfinite(v) else "–" for v in row] for row in df.values.astype(float)]
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.32 * len(df) + 0.9))
    ax.axis("off")
    tab = ax.table(cellText=cells, rowLabels=list(df.index), colLabels=cols, loc="center", cellLoc="center")
    tab.auto_set_font_size(False), tab.set_fontsize(8)
    vals = df.values.astype(float)
    for j in range(vals.shape[1]):
        if np.isfinite(vals[:, j]).any():
            tab[int(np.nanargmax(vals[:, j])) + 1, j].get_text().set_fontweight("bold")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def verifier_diagnostics(y_train, p_train, y_test, p_test, boot: dict):
    """Figure 9 (App H): ROC curves train vs test; bootstrap test ROC-AUCs with the train AUC and the 95% CI."""

    fig, (ax_roc, ax_boot) = plt.subplots(1, 2, figsize=(10, 4))
    aucs = {}
    for name, y, p in (("train", y_train, p_train), ("test", y_test, p_test)):
        fpr, tpr, _ = roc_curve(np.asarray(y).astype(bool), p)
        aucs[name] = roc_auc_score(np.asarray(y).astype(bool), p)
        ax_roc.plot(fpr, tpr, label=f"{name} (AUC = {aucs[name]:.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax_roc.set_xlabel("false positive rate"), ax_roc.set_ylabel("true positive rate")
    ax_roc.set_title("ROC curves"), ax_roc.legend(frameon=False, loc="lower right")

    ax_boot.hist(boot["samples"], bins=40, color="C1", alpha=0.7, label=f"bootstrap test AUC (n={len(boot['samples'])})")
    ax_boot.axvspan(boot["ci_low"], boot["ci_high"], color="C1", alpha=0.15,
                    label=f"95% CI [{boot['ci_low']:.3f}, {boot['ci_high']:.3f}]")
    ax_boot.axvline(aucs["train"], color="C0", lw=2, label=f"train AUC = {aucs['train']:.3f}")
    z = (aucs["train"] - boot["auc"]) / boot["se"] if boot["se"] > 0 else float("nan")
    ax_boot.set_xlabel("test ROC-AUC"), ax_boot.set_ylabel("resamples")
    ax_boot.set_title(f"train - test = {z:+.2f} bootstrap SE")
    ax_boot.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def captioned_images(images, captions, title: str = "", ncols: int = 4):
    """Images with a wrapped caption under each (e.g. an image and its tags)."""
    n = len(images)
    rows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(rows, ncols, figsize=(3.0 * ncols, 3.4 * rows), squeeze=False)
    for ax, i in zip(axes.flat, range(rows * ncols)):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            ax.set_title("\n".join(textwrap.wrap(captions[i], 34)[:6]), fontsize=7, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _cell_text(mean: float, eff) -> str:
    """A Fig 6 cell: the mean, then the paired difference to the reference cell with its CI (if known)."""
    if eff is None or not np.isfinite(eff["diff"]):
        return f"{mean:.4g}"
    if (eff["omega"], eff["decoder_cfg"]) == (eff["ref_omega"], eff["ref_decoder_cfg"]):
        return f"{mean:.4g}\nreference"
    return f"{mean:.4g}\nΔ {eff['diff']:+.3g}\n[{eff['ci_low']:+.2g}, {eff['ci_high']:+.2g}]"


def dual_guidance_heatmaps(cells, value_cols=("verifier", "LAION aesthetic"), title: str = "", effects=None):
    """Fig 6: user-averaged scores by prior ω (rows) × decoder CFG (columns), one panel per metric, own scale;
    with `effects` (ablations.cell_effects) each cell also shows Δ = its paired difference to the reference cell
    (per user, cell − reference) and the 95 % bootstrap CI over users."""
    cols = [c for c in value_cols if c in cells.columns]
    fig, axes = plt.subplots(1, len(cols), figsize=(5.6 * len(cols), 4.4 if effects is not None else 3.8),
                             squeeze=False)
    for ax, col in zip(axes[0], cols):
        grid = cells.pivot(index="omega", columns="decoder_cfg", values=col).sort_index(ascending=False)
        eff = {} if effects is None else {(r.omega, r.decoder_cfg): r._asdict() for r in
                                          effects[effects["metric"] == col].itertuples(index=False)}
        text = np.array([[_cell_text(grid.loc[w, c], eff.get((w, c)) if effects is not None else None)
                          for c in grid.columns] for w in grid.index])
        sns.heatmap(grid, annot=text, fmt="", cmap="viridis", ax=ax, cbar_kws={"label": col},
                    annot_kws={"fontsize": 7 if effects is not None else 9})
        ax.set_xlabel("decoder (SD) CFG"), ax.set_ylabel("prior CFG ω")
        ref = next(iter(eff.values()), None)
        ax.set_title(f"user-averaged {col}" + (f"\nΔ: paired difference to ω={ref['ref_omega']:g}, CFG "
                                                f"{ref['ref_decoder_cfg']:g}, 95 % CI over users" if ref else ""),
                     fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _level_means(ax, summary, m: str, levels, omegas) -> None:
    width = 0.8 / max(len(levels), 1)
    for i, lev in enumerate(levels):
        s = summary[summary["level"] == lev].set_index("omega").reindex(omegas)
        x = np.arange(len(omegas)) + (i - (len(levels) - 1) / 2) * width
        err = np.vstack([s[f"{m} mean"] - s[f"{m} ci_low"], s[f"{m} ci_high"] - s[f"{m} mean"]])
        ax.errorbar(x, s[f"{m} mean"], yerr=err, fmt="o", capsize=3, label=f"level {lev}")
    ax.set_xticks(np.arange(len(omegas)), [f"ω={w:g}" for w in omegas])
    ax.set_ylabel(f"mean {m}\n(95 % CI between users)", fontsize=9)
    ax.legend(frameon=False, fontsize=8)


def _level_diffs(ax, tests, m: str, levels, omegas) -> None:
    """Paired differences (level − reference level, per user) with their bootstrap CIs; Holm-adjusted p per ω."""
    t = tests[tests["metric"] == m]
    others = [lev for lev in levels if lev not in set(t["reference"])]
    width = 0.8 / max(len(others), 1)
    for i, lev in enumerate(others):
        s = t[t["level"] == lev].set_index("omega").reindex(omegas)
        x = np.arange(len(omegas)) + (i - (len(others) - 1) / 2) * width
        err = np.vstack([s["diff"] - s["ci_low"], s["ci_high"] - s["diff"]])
        ax.errorbar(x, s["diff"], yerr=err, fmt="s", capsize=3, color=f"C{levels.index(lev)}",
                    label=f"level {lev} − level {t['reference'].iloc[0]:g}")
    ax.axhline(0, color="k", lw=0.8, ls=":")
    p = t.groupby("omega")["p_permutation_holm"].first().reindex(omegas) if "p_permutation_holm" in t else None
    labels = [f"ω={w:g}" + ("" if p is None else f"\nHolm-adj. p={p[w]:.2g}") for w in omegas]
    ax.set_xticks(np.arange(len(omegas)), labels, fontsize=8)
    ax.set_ylabel(f"paired Δ {m}\n(95 % bootstrap CI)", fontsize=9)
    ax.legend(frameon=False, fontsize=8)


def prompt_levels_figure(summary, metrics=("verifier", "LAION aesthetic"), title: str = "", tests=None):
    """Fig 7: per prompt level and prior ω the mean over users with its between-user 95 % CI (top); with `tests`
    (ablations.factor_tests, Holm columns) the paired differences to the reference level per user with their
    bootstrap CIs and the Holm-adjusted permutation p (bottom): the comparison the test is about."""
    cols = [m for m in metrics if f"{m} mean" in summary.columns]
    rows = 1 if tests is None or tests.empty else 2
    fig, axes = plt.subplots(rows, len(cols), figsize=(5.0 * len(cols), 3.6 * rows), squeeze=False)
    levels, omegas = sorted(summary["level"].unique()), sorted(summary["omega"].unique())
    for k, m in enumerate(cols):
        _level_means(axes[0, k], summary, m, levels, omegas)
        if rows == 2:
            _level_diffs(axes[1, k], tests, m, levels, omegas)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def new_user_curves(summary, panels: dict, labels: dict, title: str = "", x: str = "history",
                    xlabel: str = "ratings in the history (k)"):
    """Metric vs history size k per method, 95 % CI over users (notebook 12); `panels`: metric column -> title.

    summary rows: metric, method, history (k; 0 = all ratings), mean, ci_low, ci_high. k = all is the last tick.
    Another `x` column (e.g. feedback rounds) is plotted as it is."""
    summary = summary.rename(columns={x: "history"}) if x != "history" else summary
    every = x == "history"
    ks = sorted({int(k) for k in summary["history"]}, key=lambda k: (every and k == 0, k))
    pos = {k: i for i, k in enumerate(ks)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (metric, name) in zip(axes[0], panels.items()):
        for i, (method, label) in enumerate(labels.items()):
            d = summary[(summary["metric"] == metric) & (summary["method"] == method)]
            if d.empty:
                continue
            d = d.assign(x=d["history"].map(pos) + 0.04 * (i - len(labels) / 2)).sort_values("x")
            yerr = np.vstack([d["mean"] - d["ci_low"], d["ci_high"] - d["mean"]])
            ax.errorbar(d["x"], d["mean"], yerr=yerr, marker="o", ms=4, capsize=3, label=label)
        ax.set_xticks(range(len(ks)), [str(k) if k or not every else "all" for k in ks])
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, frameon=False, loc="lower center", ncol=len(names))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
