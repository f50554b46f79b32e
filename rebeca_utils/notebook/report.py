"""Paper vs ours: every headline number next to the paper's, and the one-file HTML report of notebook 11."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..evaluate import paper as P
from ..io import atomic_write
from ..steps import folder, path as step_path


def _manifest(root: Path, nb: str) -> dict | None:
    path = root / nb / "manifest.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None


def _row(quantity: str, paper, ours, source: str, note: str = "") -> dict:
    return {"quantity": quantity, "paper": paper, "ours": ours, "source": source, "note": note}


def _missing(quantity: str, nb: str) -> dict:
    return _row(quantity, "", "", nb, f"missing: run {nb} first")


def _table1_rows(root: Path) -> list[dict]:
    nb = folder(1)
    path = root / nb / "table1_inputs.npz"
    if not path.is_file():
        return [_missing("Table 1 (dSprites P@k, R@k)", nb)]
    inputs = dict(np.load(path))
    rows = []
    for denom in ("user", "all_users"):
        t = P.table1(inputs, recall_denominator=denom).set_index(["method", "k"])
        for (method, k), (p, r) in P.PAPER_TABLE1.items():
            if (method, k) not in t.index:
                continue
            ours = t.loc[(method, k)]
            if denom == "user":
                rows.append(_row(f"Table 1 {method} P@{k}", p, float(ours["precision"]), nb))
            rows.append(_row(f"Table 1 {method} R@{k} (recall over {denom.replace('_', ' ')})", r,
                             float(ours["recall"]), nb, "the printed table used all users" if denom == "user" else ""))
    return rows


def _table2_rows(root: Path) -> list[dict]:
    nb = folder(8)
    rows = []
    for definition in ("paper", "reference"):
        path = root / nb / f"table2_{definition}.csv"
        if not path.is_file():
            return [_missing("Table 2 (P/R/F1 @1, @5)", nb)]
        t = pd.read_csv(path, header=[0, 1], index_col=0)
        for label, vals in P.PAPER_TABLE2.items():
            for (k, m), v in zip(P.TABLE2_COLUMNS, vals):
                if m == "F1":
                    continue
                ours = float(t.loc[label, (f"@{k}", m)]) if label in t.index else ""
                rows.append(_row(f"Table 2 {label} {m}@{k} ({definition} definition)", v, ours, nb,
                                 "" if label in t.index else "method not run"))
    return rows


def _verifier_rows(root: Path) -> list[dict]:
    nb = folder(5)
    v = _manifest(root, nb)
    if v is None:
        return [_missing("verifier ROC-AUC", nb)]
    return [_row("verifier ROC-AUC train", "≈ 0.87", v["auc_train"], nb),
            _row("verifier ROC-AUC test", "≈ 0.87", v["auc_test"], nb,
                 f"95 % CI [{v['auc_test_ci'][0]:.3f}, {v['auc_test_ci'][1]:.3f}]")]


def _test_rows(root: Path) -> list[dict]:
    nb = folder(10)
    t = _manifest(root, nb)
    if t is None:
        return [_missing("matching test, Algorithm 2, R²", nb)]
    return [_row("matching test z (Fig 8a)", "≈ 5", t["matching"]["z"], nb),
            _row("matching test p", "< 1e-3", t["matching"]["p_value"], nb,
                 f"B = {t['n_permutations']} permutations: p >= {1 / (t['n_permutations'] + 1):.1e}"),
            _row("Algorithm 2 p", "< 0.05 (H0 rejected)", t["alg2"]["p_value"], nb),
            _row("R² verifier vs LAION (Fig 8b)", 0.32, t["r2"]["r2"], nb,
                 f"95 % CI [{t['r2']['ci_low']:.3f}, {t['r2']['ci_high']:.3f}]")]


def _ablation_rows(root: Path) -> list[dict]:
    nb = folder(9)
    a = _manifest(root, nb)
    if a is None:
        return [_missing("Fig 6 / Fig 7 tests", nb)]
    return [_row(f"Fig {key[3]} {t['metric']}: {t['test']} (Holm-adjusted permutation p)", claim,
                 t.get("p_permutation_holm", ""), nb,
                 f"raw permutation p {t['p_permutation']:.3g}, Friedman p {t['p_friedman']:.3g} (Holm-adjusted "
                 f"{t.get('p_friedman_holm', float('nan')):.3g}); Holm over every test of the figure; {t['users']} users")
            for key, claim in (("fig6_p", "Fig 6: an effect (trade-off)"), ("fig7_p", "no significant effect"))
            for t in a[key]]


def _figure_rows(root: Path) -> list[dict]:
    """The figures whose number is not in a table above: Fig 2's latent separation, Figs 13-15's per-user signal."""
    rows = []
    nb01, nb08 = folder(1), folder(8)
    m01 = _manifest(root, nb01)
    rows.append(_missing("Fig 2 VAE latents", nb01) if m01 is None else
                _row("Fig 2: test images whose nearest VAE-latent neighbour has the same shape-colour pair",
                     "the four pairs separate (UMAP)", m01["vae_nn_pair_agreement"], nb01))
    v_path = root / nb08 / "verifier_per_user.csv"
    if not v_path.is_file():
        return rows + [_missing("Figs 13-15 per-user verifier score", nb08)]
    v = pd.read_csv(v_path)
    m04 = step_path(root, 4, "manifest.json")  # the grid's users: the first grid_users (App M: 12) of 04
    n_shown = json.loads(m04.read_text())["config"]["generation"]["grid_users"] if m04.is_file() else 12
    for fig, omega in zip((13, 14, 15), (5, 7, 9)):
        s = v[v["method"] == P.rebeca_label(omega)].sort_values("user_id")
        if s.empty:
            continue
        shown = s["score"].head(n_shown)
        rows.append(_row(f"Fig {fig}: verifier score of own images (eq. 5), users 1-{len(shown)}, prior CFG {omega}",
                         "samples follow each user's taste", float(shown.mean()), nb08,
                         f"min {shown.min():.3f}, max {shown.max():.3f}; all {len(s)} users {s['score'].mean():.3f}"))
    return rows


SECTIONS = ((_table1_rows, folder(1)), (_table2_rows, folder(8)),
            (_verifier_rows, folder(5)), (_test_rows, folder(10)),
            (_ablation_rows, folder(9)), (_figure_rows, folder(8)))


def comparison(root: str | Path) -> pd.DataFrame:
    """Every headline number: quantity, paper, ours, source notebook, note (missing inputs say what to run)."""
    rows = []
    for section, nb in SECTIONS:
        try:
            rows += section(Path(root))
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # an older or partial output: say so, go on
            rows.append(_row(section.__name__.strip("_").replace("_rows", ""), "", "", nb,
                             f"unreadable ({type(exc).__name__}: {exc}); rerun {nb}"))
    return pd.DataFrame(rows)


def _img(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:100%">'


def write_report(out_dir: str | Path, built: pd.DataFrame, compare: pd.DataFrame, title: str) -> Path:
    """report.html next to the figures: every figure (embedded) with its claim and our number, every table, the
    paper-vs-ours table; one file, no server."""
    out_dir = Path(out_dir)
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Paper vs ours</h2>",
             compare.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="")]
    for r in built.itertuples(index=False):
        parts.append(f"<h2>{html.escape(r.id)}</h2><p><b>Paper:</b> {html.escape(r.claim)}<br><b>Ours:</b> "
                     f"{html.escape(str(r.ours))}<br><small>{html.escape(r.how)} · {html.escape(r.notebook)}</small></p>")
        for f in r.outputs:
            if f.endswith(".png"):
                parts.append(_img(out_dir / f))
            elif f.endswith(".csv"):
                parts.append(pd.read_csv(out_dir / f).to_html(index=False, float_format=lambda x: f"{x:.4g}",
                                                              na_rep=""))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>body{"
            "font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>" + "\n".join(parts) + "</body></html>")
    return atomic_write(out_dir / "report.html", page.encode("utf-8"))
