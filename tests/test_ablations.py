"""Ablations (notebook 09): conditions and their names, the prompts reaching the decoder, reuse of done images,
and the paired tests under a simulated null and a planted effect."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from rebeca_utils import io as KIO
from rebeca_utils.config import get_profile
from rebeca_utils.evaluate import stats as S
from rebeca_utils.models import decoder as DEC
from rebeca_utils.pipeline import decoding as D
from rebeca_utils.pipeline.items import make_items
from rebeca_utils.studies import ablations as A

pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread
PROF = get_profile("smoke")
MAIN = PROF.generation


def test_condition_names_keep_04s_for_the_main_setting_and_appear_once():
    assert A.Cell(9.0, MAIN.decoder_cfg, 0).setting(MAIN) == "prior_cfg9"
    assert A.Cell(9.0, 1.0, 0).setting(MAIN) == "prior_cfg9_dcfg1"
    assert A.Cell(7.5, MAIN.decoder_cfg, 2).setting(MAIN) == "prior_cfg7.5_prompt2"
    conds = A.cells(PROF.ablation, MAIN)  # smoke: ω {3, 9} × CFG {1, 5} and levels {0, 2} at ω {3, 9}
    assert len(conds) == 6 and len({c.setting(MAIN) for c in conds}) == 6
    assert A.decode_count(PROF.ablation, MAIN, 12) == 6 * 2 * 12
    with pytest.raises(ValueError, match=r"prompt levels \[3\]: App L.1 defines levels \[0, 1, 2\]"):
        A.check_levels([0, 3])


def test_l1_prompts_verbatim():
    assert A.PROMPT_LEVELS[1] == ("high quality photo", "bad quality photo, letters")
    assert A.PROMPT_LEVELS[2][0].startswith("Realistic image, finely detailed") and A.PROMPT_LEVELS[2][0].endswith(
        "prioritizing clarity and authenticity.")
    assert A.PROMPT_LEVELS[2][1].endswith("bad anatomy, worst quality, low quality")


@pytest.fixture(scope="module")
def pipe():
    p = DEC.build_decoder(PROF.models, MAIN)
    p.set_progress_bar_config(disable=True)
    return p


def _samples(n=2, dim=None):
    g = torch.Generator().manual_seed(0)
    return {"user_id": torch.tensor([3] * n), "index": torch.arange(n),
            "img_emb": torch.randn(n, dim or PROF.models.decoder_emb_dim, generator=g)}


def test_prompt_levels_reach_the_decoder(pipe):
    states = []
    for level in (0, 1, 2):
        prompt, negative = A.PROMPT_LEVELS[level]
        pos, neg = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
        states.append(torch.cat([pos, neg]))
    assert all(not torch.equal(states[a], states[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    images = []
    for level in (0, 2):  # the same embedding and seed: only the prompts differ
        gen, items = A.cell_items(A.Cell(9.0, MAIN.decoder_cfg, level), _samples(1), MAIN)
        assert (items[0].prompt, items[0].negative_prompt) == A.PROMPT_LEVELS[level]
        images.append(D.run_batch(pipe, items, gen))
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_done_images_are_adopted_not_decoded_again(pipe, tmp_path):
    gen, items = A.cell_items(A.Cell(9.0, MAIN.decoder_cfg, 0), _samples(2), MAIN)
    first = D.decode(pipe, items, tmp_path / "04", gen, models=PROF.models, progress=False)
    assert first.written == 2
    assert D.adopt_done(items, tmp_path / "09", [tmp_path / "04"], gen, PROF.models) == 2
    again = D.decode(pipe, items, tmp_path / "09", gen, models=PROF.models, progress=False)
    assert (again.written, again.skipped) == (0, 2)
    assert (tmp_path / "09" / items[0].relpath).read_bytes() == (tmp_path / "04" / items[0].relpath).read_bytes()
    # another decoder CFG or prompt: other inputs, nothing adopted
    other, moved = A.cell_items(A.Cell(9.0, 1.0, 0), _samples(2), MAIN)
    renamed = [replace(it, setting="prior_cfg9") for it in moved]  # same path, other fingerprint
    assert D.adopt_done(renamed, tmp_path / "x", [tmp_path / "04"], other, PROF.models) == 0
    level2 = make_items("rebeca", "prior_cfg9", [3, 3], [0, 1], gen, ip_embeddings=_samples(2)["img_emb"],
                        prompts=[A.PROMPT_LEVELS[2][0]] * 2)
    assert D.adopt_done(level2, tmp_path / "y", [tmp_path / "04"], gen, PROF.models) == 0


def test_paired_tests_calibrated_under_the_null_and_find_a_planted_effect():
    rng = np.random.default_rng(0)
    perm, fried = [], []
    for s in range(200):  # users differ (block effect), levels do not
        x = rng.normal(size=(12, 3)) + rng.normal(0, 2, size=(12, 1))
        eff = S.paired_effect(x, [0, 1, 2], n_permutations=200, n_bootstrap=100, seed=s)
        perm.append(eff.p_value), fried.append(eff.friedman_p)
    assert kstest(perm, "uniform").pvalue > 0.01 and kstest(fried, "uniform").pvalue > 0.001
    assert 0.02 < np.mean(np.array(perm) <= 0.05) < 0.1
    x = rng.normal(size=(12, 3)) + rng.normal(0, 2, size=(12, 1))
    x[:, 2] += 1.5  # level 2 raises every user's score
    eff = S.paired_effect(x, [0, 1, 2], n_permutations=1000, n_bootstrap=500)
    assert eff.p_value < 0.01 and eff.friedman_p < 0.01
    d, lo, hi = eff.diffs[2]
    assert lo > 0 and lo < d < hi and abs(d - 1.5) < 0.8 and eff.diffs[0] == (0.0, 0.0, 0.0)
    two = S.paired_effect(x[:, [0, 2]], [0, 2], n_permutations=500, n_bootstrap=100)
    assert two.p_value < 0.01 and two.friedman_p < 0.01  # two levels: Wilcoxon


def test_factor_tests_on_a_long_table():
    import pandas as pd

    rng = np.random.default_rng(1)
    rows = [{"omega": w, "decoder_cfg": c, "level": 0, "user_id": u, "verifier": rng.normal() + 0.5 * (c == 10.0)}
            for w in (3.0, 9.0) for c in (1.0, 5.0, 10.0) for u in range(20)]
    t = A.factor_tests(pd.DataFrame(rows), "verifier", "decoder_cfg", "omega", {"level": 0}, 5.0, 500, 200)
    assert set(t["test"]) == {"decoder_cfg at omega=3", "decoder_cfg at omega=9"} and (t["users"] == 20).all()
    ref = t[t["decoder_cfg"] == 5.0]
    assert (ref["diff"] == 0).all() and len(A.p_values(t)) == 2


def test_adopted_count_is_the_reused_images_on_a_rerun_too(pipe, tmp_path):
    gen, items = A.cell_items(A.Cell(9.0, MAIN.decoder_cfg, 0), _samples(2), MAIN)
    D.decode(pipe, items, tmp_path / "04", gen, models=PROF.models, progress=False)
    assert D.adopt_done(items, tmp_path / "09", [tmp_path / "04"], gen, PROF.models) == 2
    # a rerun of 09 reports the same reuse (the manifest's number does not drop to 0 once the copies exist)
    assert D.adopt_done(items, tmp_path / "09", [tmp_path / "04"], gen, PROF.models) == 2
    assert D.pending(items, tmp_path / "09", gen, PROF.models) == []
    assert D.pending(items, tmp_path / "09", gen, PROF.models, overwrite=True) == items


def test_09_takes_04s_samples_so_last_bit_differences_do_not_redo_its_images(pipe, tmp_path):
    """04 sampled 4 per user (on a GPU, say, whose batch gave other last bits); 09 needs 2 per user at the same ω:
    it takes 04's stored samples, so its work items are 04's and every image is adopted, none decoded again."""
    from rebeca_utils.models.prior import RebecaPrior
    from rebeca_utils.pipeline import sampling as SAMPLE
    from rebeca_utils.pipeline.rebeca import RebecaPipeline
    from rebeca_utils.train.diffusion import make_scheduler

    torch.manual_seed(0)
    prior = RebecaPrior.from_config(replace(PROF.prior, n_users=4))
    with torch.no_grad():  # away from the zero init (its samples are all zero)
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rebeca = RebecaPipeline(prior, make_scheduler(PROF.diffusion), sampler="dpmsolver", steps=4,
                            users={u: {} for u in range(4)})
    kw = dict(cfg_scale=9.0, seed=0, progress=False)
    src = tmp_path / "04" / "rebeca" / "prior_cfg9" / "embeddings.safetensors"
    first = rebeca.embeddings([0, 2], 4, path=src, **kw)
    tensors, meta = KIO.read_safetensors(src, "x")
    bumped = torch.nextafter(first["img_emb"], torch.full_like(first["img_emb"], np.inf))  # one ulp each
    KIO.save_safetensors({**tensors, "img_emb": bumped}, src, meta)
    s04 = rebeca.embeddings([0, 2], 4, path=src, **kw)
    assert torch.equal(s04["img_emb"], bumped)  # 04's own cache, as stored
    items04 = SAMPLE.rebeca_items(s04, "prior_cfg9", MAIN)
    assert D.decode(pipe, items04, tmp_path / "04", MAIN, models=PROF.models, progress=False).written == 8
    fresh = rebeca.embeddings([0, 2], 2, path=tmp_path / "fresh.safetensors", **kw)
    s09 = rebeca.embeddings([0, 2], 2, path=tmp_path / "09" / "e.safetensors", reuse=[src], **kw)
    assert not torch.equal(fresh["img_emb"], bumped[[0, 1, 4, 5]])  # a redraw differs in the last bits
    assert torch.equal(s09["img_emb"], bumped[[0, 1, 4, 5]])
    gen, items = A.cell_items(A.Cell(9.0, MAIN.decoder_cfg, 0), s09, MAIN)
    assert D.adopt_done(items, tmp_path / "09", [tmp_path / "04"], gen, PROF.models) == 4
    assert D.pending(items, tmp_path / "09", gen, PROF.models) == []
    # another ω, another prior or another seed is another sample: nothing taken from 04
    other = rebeca.embeddings([0, 2], 2, path=tmp_path / "09" / "o.safetensors", reuse=[src], **{**kw, "seed": 1})
    assert not torch.equal(other["img_emb"], bumped[[0, 1, 4, 5]])


def test_holm_over_a_figures_tests_counts_each_test_once():
    import pandas as pd

    rows = [{"metric": m, "test": f"level at omega={w}", "level": lev, "p_permutation": p, "p_friedman": p / 2,
             "users": 12} for m, ps in (("verifier", (0.01, 0.04)), ("LAION aesthetic", (0.03, 0.005)))
            for w, p in zip((5, 9), ps) for lev in (0, 1, 2)]
    t = A.with_holm(pd.DataFrame(rows))
    first = t.groupby(["metric", "test"], sort=False).first()
    # m = 4 tests (not 12 rows): 0.005*4, 0.01*3, 0.03*2, max(0.04*1, 0.06)
    assert first["p_permutation_holm"].round(12).tolist() == [0.03, 0.06, 0.06, 0.02]
    assert (t.groupby(["metric", "test"])["p_permutation_holm"].nunique() == 1).all()
    assert [round(p["p_permutation_holm"], 12) for p in A.p_values(t)] == [0.03, 0.06, 0.06, 0.02]


def test_cell_effects_are_paired_differences_to_the_reference_cell():
    import pandas as pd

    rng = np.random.default_rng(3)
    base = rng.normal(0, 2, 30)  # users differ a lot: the between-user spread hides what pairing shows
    rows = [{"omega": w, "decoder_cfg": c, "level": 0, "user_id": u,
             "verifier": base[u] + 0.3 * (w == 9.0 and c == 1.0) + rng.normal(0, 0.05)}
            for w in (3.0, 9.0) for c in (1.0, 5.0) for u in range(30)]
    e = A.cell_effects(pd.DataFrame(rows), ["verifier"], (3.0, 5.0), 500).set_index(["omega", "decoder_cfg"])
    assert e.loc[(3.0, 5.0), ["diff", "ci_low", "ci_high"]].tolist() == [0.0, 0.0, 0.0]
    planted = e.loc[(9.0, 1.0)]
    assert 0.2 < planted["ci_low"] < planted["diff"] < planted["ci_high"] < 0.4 and planted["users"] == 30
    assert e.loc[(9.0, 5.0), "ci_low"] < 0 < e.loc[(9.0, 5.0), "ci_high"]
    assert A.main_cell(PROF.ablation, MAIN) == (PROF.ablation.omegas[0], MAIN.decoder_cfg)
