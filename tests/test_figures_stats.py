"""What a reader of notebooks 09 and 11 sees: Holm-adjusted p-values, the paired differences beside Figs 6 and 7,
users numbered from 1, and a measured number in every figure's "ours"."""
import json
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rebeca_utils.evaluate import stats as S
from rebeca_utils.notebook import figures as FIG
from rebeca_utils.notebook import plots as PL
from rebeca_utils.notebook import report as REP

matplotlib.use("Agg")


def test_holm_by_hand():
    # R: p.adjust(c(0.01, 0.02, 0.03, 0.04, 0.05), "holm") = 0.05 0.08 0.09 0.09 0.09
    assert np.allclose(S.holm([0.01, 0.02, 0.03, 0.04, 0.05]), [0.05, 0.08, 0.09, 0.09, 0.09], rtol=0, atol=1e-15)
    # unsorted, a NaN outside the family (m = 4), capped at 1
    out = S.holm([0.04, 0.005, np.nan, 0.03, 0.01])
    assert np.isnan(out[2]) and np.allclose(out[[0, 1, 3, 4]], [0.06, 0.02, 0.06, 0.03], rtol=0, atol=1e-15)
    assert S.holm([0.3, 0.6]).tolist() == [0.6, 0.6] and S.holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"holm: p-values must lie in \[0, 1\], got 0.5 to 1.5"):
        S.holm([0.5, 1.5])


def test_holm_rejects_exactly_what_the_step_down_procedure_rejects():
    """Holm's procedure: reject H_(1..i) while p_(j) <= alpha / (m - j + 1); adjusted p <= alpha says the same."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = rng.uniform(0, 0.2, rng.integers(1, 9)) ** rng.uniform(1, 3)
        for alpha in (0.01, 0.05, 0.1):
            order = np.argsort(p)
            ok = p[order] <= alpha / (len(p) - np.arange(len(p)))
            n_rejected = len(p) if ok.all() else int(np.argmin(ok))
            rejected = np.zeros(len(p), bool)
            rejected[order[:n_rejected]] = True
            assert ((S.holm(p) <= alpha) == rejected).all()


def _fig7_tables():
    summary = pd.DataFrame([{"omega": w, "level": lev, "users": 12, "verifier mean": 0.5 + 0.01 * lev,
                             "verifier ci_low": 0.3, "verifier ci_high": 0.7} for w in (5.0, 9.0) for lev in (0, 2)])
    tests = pd.DataFrame([{"metric": "verifier", "test": f"level at omega={w:g}", "omega": w, "level": lev,
                           "reference": 0, "diff": 0.01 * lev, "ci_low": 0.01 * lev - 0.005,
                           "ci_high": 0.01 * lev + 0.005, "p_permutation": p, "p_friedman": p,
                           "p_permutation_holm": min(1, 2 * p), "p_friedman_holm": min(1, 2 * p)}
                          for w, p in ((5.0, 0.004), (9.0, 0.3)) for lev in (0, 2)])
    return summary, tests


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in (*ax.texts, *ax.get_xticklabels(), ax.yaxis.label, ax.title)]


def test_fig7_shows_the_paired_differences_and_holm_adjusted_p():
    summary, tests = _fig7_tables()
    fig = PL.prompt_levels_figure(summary, ["verifier"], "Fig 7", tests)
    texts = _texts(fig)
    assert len(fig.axes) == 2  # level means (between-user CI) above, paired differences below
    assert "ω=5\nHolm-adj. p=0.008" in texts and "ω=9\nHolm-adj. p=0.6" in texts
    assert "paired Δ verifier\n(95 % bootstrap CI)" in texts
    diffs = fig.axes[1].lines[0].get_ydata()  # level 2 − level 0 at ω 5, 9
    assert np.allclose(diffs, [0.02, 0.02])


def test_fig6_cells_carry_the_paired_difference_and_its_ci():
    grid = pd.DataFrame([{"omega": w, "decoder_cfg": c, "verifier": 0.5 + 0.1 * (w == 9.0)}
                         for w in (3.0, 9.0) for c in (1.0, 5.0)])
    eff = pd.DataFrame([{"metric": "verifier", "omega": w, "decoder_cfg": c, "mean": 0.5,
                         "ref_omega": 3.0, "ref_decoder_cfg": 5.0, "diff": 0.0 if (w, c) == (3.0, 5.0) else 0.1,
                         "ci_low": 0.0 if (w, c) == (3.0, 5.0) else 0.05, "ci_high": 0.0 if (w, c) == (3.0, 5.0)
                         else 0.15, "users": 12} for w in (3.0, 9.0) for c in (1.0, 5.0)])
    texts = _texts(PL.dual_guidance_heatmaps(grid, ["verifier"], "Fig 6", eff))
    assert "0.5\nreference" in texts and "0.6\nΔ +0.1\n[+0.05, +0.15]" in texts
    assert any("Δ: paired difference to ω=3, CFG 5, 95 % CI over users" in t for t in texts)


def _fake_04(root, users=(0, 1, 2)):
    d = root / "04_generate_images"
    rows = []
    for u in users:
        p = d / "rebeca" / "prior_cfg5" / f"u{u:03d}" / "00.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * u, np.uint8)).save(p)
        rows.append({"method": "rebeca", "setting": "prior_cfg5", "user_id": u, "index": 0, "path": str(p)})
    pd.DataFrame(rows).to_csv(d / "generation_manifest.csv", index=False)
    gen = {"grid_users": 3, "grid_images": 1, "n_per_user": 1}
    (d / "manifest.json").write_text(json.dumps({"config": {"generation": gen}, "metrics": {}}))
    v = pd.DataFrame({"method": ["REBECA (CFG=5.0)"] * 4 + ["REBECA (CFG=7.0)"] * 4, "user_id": [0, 1, 2, 3] * 2,
                      "score": [0.6, 0.7, 0.8, 0.1, 0.1, 0.1, 0.1, 0.5], "n": 1})  # user 4 (id 3) is not shown
    (root / "08_evaluate_methods").mkdir()
    v.to_csv(root / "08_evaluate_methods" / "verifier_per_user.csv", index=False)
    return d


def test_samples_figure_numbers_users_from_1_and_reports_their_signal(tmp_path):
    src = _fake_04(tmp_path)
    entry = next(e for e in FIG.REGISTRY if e.id == "Fig 13")
    fig, ours, _ = entry.build(src, tmp_path)
    labels = [ax.yaxis.label.get_text() for ax in fig.axes if ax.yaxis.label.get_text()]
    assert labels == ["user 1", "user 2", "user 3"]
    assert ours == ("verifier score of own images (eq. 5), users 1-3: mean 0.700 (min 0.600, max 0.800); "
                    "all 4 users 0.550")
    rows = REP.comparison(tmp_path).set_index("quantity")
    assert rows.loc["Fig 13: verifier score of own images (eq. 5), users 1-3, prior CFG 5", "ours"] == pytest.approx(0.7)
    assert rows.loc["Fig 14: verifier score of own images (eq. 5), users 1-3, prior CFG 7", "ours"] == pytest.approx(0.1)


def test_dsprites_figures_report_measured_numbers(tmp_path):
    d = tmp_path / "01_simulate_dsprites"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "fig3_users.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "fig2_umap_vae.png")
    m = {"vae_nn_pair_agreement": 0.987, "rebeca_precision": {"1": 0.78, "5": 0.79}, "random_precision": {"1": 0.29},
         "landing_own_pair": {"REBECA": 0.61, "Oracle": 0.77, "Random": 0.25}}
    (d / "manifest.json").write_text(json.dumps({"metrics": m}))
    ours = {e.id: e.build(d, tmp_path)[1] for e in FIG.REGISTRY if e.id in ("Fig 2", "Fig 3")}
    assert ours == {"Fig 2": "test images whose nearest VAE-latent neighbour has the same shape-colour pair: 0.987",
                    "Fig 3": "REBECA P@1 0.780 vs Random 0.290 (Table 1); samples landing on the user's own pair: "
                             "REBECA 0.610, Oracle 0.770, Random 0.250"}


def test_ablation_rows_give_holm_adjusted_p(tmp_path):
    d = tmp_path / "09_run_ablations"
    d.mkdir()
    t = {"metric": "verifier", "test": "level at omega=5", "p_permutation": 0.004, "p_friedman": 0.01,
         "p_permutation_holm": 0.024, "p_friedman_holm": 0.05, "users": 12}
    (d / "manifest.json").write_text(json.dumps({"metrics": {"fig6_p": [], "fig7_p": [t]}}))
    row = REP.comparison(tmp_path).set_index("quantity").loc["Fig 7 verifier: level at omega=5 (Holm-adjusted "
                                                             "permutation p)"]
    assert row["ours"] == 0.024 and row["note"].startswith("raw permutation p 0.004, Friedman p 0.01 (Holm-adjusted "
                                                           "0.05)")


def test_mean_ci_of_one_user_is_its_value_without_an_interval():
    # a rehearsal holds out a single worker: the mean is defined, the bootstrap interval is not (no crash)
    mean, lo, hi = S.mean_ci([0.25])
    assert mean == 0.25 and np.isnan(lo) and np.isnan(hi)
    mean, lo, hi = S.mean_ci([0.0, 1.0, 0.5, 0.5], n_bootstrap=200)
    assert mean == 0.5 and 0.0 <= lo <= mean <= hi <= 1.0


@pytest.mark.slow  # a fresh process compiles UMAP's numba code (~30 s)
def test_umap_figure_leaves_torch_on_its_thread_count():
    # numba's OpenMP layer (UMAP) shares torch's libgomp and set it to every core: with one thread asked for,
    # notebook 01 then ran two spinning threads beside the other pytest worker (639 s in make test, 195 s alone)
    # the kernels get their one thread from OMP_NUM_THREADS, as here (an explicit set_num_threads would pin it)
    code = ("import numpy as np, torch; from rebeca_utils.notebook import plots; "
            "plots.umap_scatter(np.random.default_rng(0).random((40, 4), dtype=np.float32), np.arange(40) % 2, "
            "['a', 'b']); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"
