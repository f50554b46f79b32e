"""Figures shared by the notebooks (each saved as PNG + PDF through `Run.savefig`)."""
from __future__ import annotations

import numpy as np


def umap_scatter(emb: np.ndarray, labels: np.ndarray, names, seed: int = 0, title: str = ""):
    """2-D UMAP of embeddings coloured by a categorical label (Figure 2)."""
    import matplotlib.pyplot as plt
    import umap

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt
    import seaborn as sns

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
    import matplotlib.pyplot as plt
    import seaborn as sns

    ok = df[df["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(ok):
        sns.stripplot(data=ok, x="prediction_type", y=score, hue="beta_schedule", dodge=True, ax=ax)
    ax.set_title(f"App E grid: {score} ({(df['status'] != 'ok').sum()} failed)")
    fig.tight_layout()
    return fig
