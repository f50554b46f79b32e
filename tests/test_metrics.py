"""Retrieval metrics (§3.3 Table 1, §4.4 Table 2), verifier scores, permutation tests and R² on hand cases."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from rebeca_utils.evaluate.paper import (
    PAPER_TABLE1,
    PAPER_TABLE2,
    rebeca_label,
    section33_pr,
    standardize,
    table1,
    table2,
    table2_both,
)
from rebeca_utils.evaluate.retrieval import (
    cosine_nn,
    precision_recall_at_k,
    reference_axis_normalise,
    retrieval_metrics,
)
from rebeca_utils.evaluate.scores import user_scores, wins_and_ranks
from rebeca_utils.evaluate.stats import matching_test, permutation_test, r2_bootstrap
from rebeca_utils.train.normalize import fit_normalizer

POOL = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)  # four directions
LIKED = np.array([True, True, False, False])
GEN = np.array([[2, 0.1], [1, 0.2], [-1, 0.1]], dtype=np.float32)


def test_cosine_nn_ignores_norm():
    q = np.array([[10, 0.1], [0.01, 3], [-0.2, -5]], dtype=np.float32)
    assert cosine_nn(q, POOL).tolist() == [0, 1, 3]


# --- §3.3 (Table 1): k = the first k samples, one nearest neighbour each ----------------------------------------

def test_section33_by_hand():
    # NN of GEN: 0 (liked), 0 (liked), 2 (disliked); one repetition, one user
    p, r = section33_pr(GEN[None, None], POOL, LIKED[None], k=3)
    assert p.shape == r.shape == (1, 1)
    assert p[0, 0] == pytest.approx(2 / 3) and r[0, 0] == pytest.approx(1 / 2)
    p1, r1 = section33_pr(GEN[None, None], POOL, LIKED[None], k=1)
    assert (p1[0, 0], r1[0, 0]) == (1.0, 0.5)
    with pytest.raises(ValueError, match="k=4: need samples of shape"):
        section33_pr(GEN[None, None], POOL, LIKED[None], k=4)


def test_section33_equals_nearest_neighbour_counts():
    # §3.3 from cosine_nn directly: precision = liked share of the first k neighbours, recall = liked neighbours / |L_u|
    rng = np.random.default_rng(0)
    pool, liked = rng.normal(size=(50, 8)).astype(np.float32), rng.random((3, 50)) < 0.3
    gen = rng.normal(size=(2, 3, 6, 8)).astype(np.float32)
    nn = cosine_nn(gen, pool)  # (2, 3, 6)
    for k in (1, 4, 6):
        p, r = section33_pr(gen, pool, liked, k)
        for rep in range(2):
            for u in range(3):
                first = nn[rep, u, :k]
                assert p[rep, u] == pytest.approx(liked[u, first].mean())
                assert r[rep, u] == pytest.approx(liked[u, np.unique(first)].sum() / liked[u].sum())


def test_table1_perfect_and_random():
    # pool: 4 clusters; user u likes cluster u; REBECA samples sit on the user's cluster
    rng = np.random.default_rng(1)
    centres = np.eye(4, 8, dtype=np.float32) * 5
    lab = np.repeat(np.arange(4), 25)
    pool = centres[lab] + rng.normal(scale=0.1, size=(100, 8)).astype(np.float32)
    likes = np.stack([lab == u for u in range(4)])
    rebeca = np.broadcast_to(centres[None, :, None, :], (3, 4, 20, 8)).astype(np.float32)
    rebeca = rebeca + rng.normal(scale=0.1, size=rebeca.shape).astype(np.float32)
    random = pool[rng.integers(0, 100, size=(3, 4, 20))]
    t = table1(dict(test_latents=pool, test_likes=likes, rebeca=rebeca, random=random, mean=centres[:4])).set_index(["method", "k"])
    assert t.loc[("REBECA", 20), "precision"] == 1.0 and t.loc[("Mean", 1), "precision"] == 1.0
    assert t.loc[("Mean", 1), "recall"] == pytest.approx(1 / 25)
    assert 0.1 < t.loc[("Random", 20), "precision"] < 0.45  # the paper's column: tests/test_paper_numbers.py


def test_section33_recall_denominator_all_users():
    # the paper's Table 1 divides every user's retrieved likes by the liked pool rows of all users together
    rng = np.random.default_rng(4)
    pool, liked = rng.normal(size=(40, 6)).astype(np.float32), rng.random((3, 40)) < 0.3
    gen = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    nn = cosine_nn(gen, pool)
    p_u, r_u = section33_pr(gen, pool, liked, 5)
    p_a, r_a = section33_pr(gen, pool, liked, 5, recall_denominator="all_users")
    np.testing.assert_array_equal(p_u, p_a)
    for rep in range(2):
        for u in range(3):
            assert r_a[rep, u] == pytest.approx(liked[u, np.unique(nn[rep, u])].sum() / liked.sum())
    with pytest.raises(ValueError, match="valid values are user, all_users"):
        section33_pr(gen, pool, liked, 5, recall_denominator="pooled")


def test_table1_all_users_recall_is_k_p_over_all_likes():
    # distinct neighbours: R@k = k * P@k / (liked rows of all users), the relation every row of the paper's Table 1
    # satisfies with ~4,682 (e.g. REBECA k=20: 20 * 0.799 / 4,682 = 3.41e-3)
    pool = np.eye(12, dtype=np.float32)
    liked = np.zeros((2, 12), bool)
    liked[0, :3] = liked[1, 3:8] = True
    x = np.stack([np.stack([pool[[0, 1, 9, 10]], pool[[3, 4, 5, 11]]])])  # (1 rep, 2 users, 4, 12)
    inputs = dict(test_latents=pool, test_likes=liked, rebeca=x, random=x, mean=x[0, :, 0])
    t = table1(inputs, ks=(4,), recall_denominator="all_users").set_index(["method", "k"])
    assert t.loc[("REBECA", 4), "precision"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert t.loc[("REBECA", 4), "recall"] == pytest.approx(4 * t.loc[("REBECA", 4), "precision"] / 8)
    per_user = table1(inputs, ks=(4,)).set_index(["method", "k"])
    assert per_user.loc[("REBECA", 4), "recall"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    for (name, k), (p, r) in PAPER_TABLE1.items():  # the printed table: R = k P / N with N = 4,682 +- 1 %
        assert k * p / r == pytest.approx(4682, rel=0.012), (name, k)


def test_table1_oracle_row_and_standardized_space():
    rng = np.random.default_rng(5)
    pool = rng.normal(size=(60, 4)).astype(np.float32) + np.array([8, 0, 0, 0], np.float32)  # an offset, as the VAE's
    liked = rng.random((2, 60)) < 0.4
    x = rng.normal(size=(3, 2, 5, 4)).astype(np.float32) + np.array([8, 0, 0, 0], np.float32)
    mu, sd = pool.mean(0), pool.std(0)
    inputs = dict(test_latents=pool, test_likes=liked, rebeca=x, random=x[::-1], mean=x[0, :, 0], oracle=x[:, ::-1],
                  latent_mean=mu, latent_std=sd)
    t = table1(inputs, ks=(1, 5))
    assert t["method"].tolist() == ["REBECA", "REBECA", "Oracle", "Oracle", "Mean", "Random", "Random"]
    oracle = t.set_index(["method", "k"]).loc[("Oracle", 5), "precision"]
    assert oracle == pytest.approx(section33_pr(x[:, ::-1], pool, liked, 5)[0].mean())
    # standardized: the same table on z-scores of every array
    z = {k: standardize(v, mu, sd) if k in ("test_latents", "rebeca", "random", "mean", "oracle") else v
         for k, v in inputs.items()}
    pd.testing.assert_frame_equal(table1(inputs, ks=(1, 5), space="standardized"), table1(z, ks=(1, 5)))
    assert not table1(inputs, ks=(1, 5), space="standardized").equals(t)  # the offset dominates raw cosines
    with pytest.raises(ValueError, match="valid values are latent, standardized"):
        table1(inputs, space="whitened")
    no_oracle = {k: v for k, v in inputs.items() if k != "oracle"}  # older inputs files: no Oracle row
    assert "Oracle" not in set(table1(no_oracle, ks=(1,))["method"])


# --- §4.4 (Table 2): Top-k pool items of every generated sample -------------------------------------------------
# User A = (GEN, POOL, LIKED), L_A = {0, 1}. Cosine ranks of the pool:
#   g1 = (2, .1): 0, 1, 3, 2     g2 = (1, .2): 0, 1, 3, 2     g3 = (-1, .1): 2, 1, 3, 0
# k=1: Top-1 = {0}, {0}, {2}  (item 0 retrieved twice)
#   paper:     P = (1 + 1 + 0)/3 = 2/3;  R = |{0}|/2 = 1/2;  F1 = 2(2/3)(1/2)/(7/6) = 4/7
#   reference: retrieved {0, 2}: P = 1/2;  R = 1/2;  F1 = 1/2
# k=2: Top-2 = {0, 1}, {0, 1}, {2, 1}
#   paper:     P = 3/3 = 1;  R = 2/2 = 1
#   reference: retrieved {0, 1, 2}: P = 2/3;  R = 1;  F1 = 4/5
# User B: pool (1,1) liked, (-1,-1), (-1,1) disliked; one sample (1, 1.1) ranks them 0, 2, 1.
#   k=1: both definitions P = R = 1.   k=2: paper P = 1, R = 1; reference retrieved {0, 2}: P = 1/2, R = 1, F1 = 2/3
# User C: two disliked pool items only (0 likes) -> dropped. User D: a sample but no pool -> dropped.
POOL_B = np.array([[1, 1], [-1, -1], [-1, 1]], dtype=np.float32)
HAND = dict(
    gen_emb=np.concatenate([GEN, [[1, 1.1]], [[1, 0]], [[0, 1]]]).astype(np.float32),
    gen_user=np.array([10, 10, 10, 20, 30, 40]),
    pool_emb=np.concatenate([POOL, POOL_B, [[1, 0], [0, 1]]]).astype(np.float32),
    pool_user=np.array([10] * 4 + [20] * 3 + [30] * 2),
    pool_liked=np.array([1, 1, 0, 0, 1, 0, 0, 0, 0], dtype=bool),
)


@pytest.mark.parametrize("definition,k,expected", [
    ("paper", 1, (2 / 3, 1 / 2)), ("paper", 2, (1.0, 1.0)),
    ("reference", 1, (1 / 2, 1 / 2)), ("reference", 2, (2 / 3, 1.0)),
])
def test_single_user_by_hand(definition, k, expected):
    assert precision_recall_at_k(GEN, POOL, LIKED, k, definition) == pytest.approx(expected)


def test_reference_axis_normalise_is_the_reference_bug():
    # rows stacked to (N, 1, d) and L2-normalised over the size-1 axis: each entry divided by its own |x| -> sign(x)
    x = np.array([[3.0, -0.5, 2.0], [-1e-3, 4.0, -7.0]], dtype=np.float32)
    bug = torch.nn.functional.normalize(torch.as_tensor(x)[:, None, :], dim=1)[:, 0].numpy()
    np.testing.assert_allclose(reference_axis_normalise(x), bug, rtol=1e-6)
    np.testing.assert_array_equal(reference_axis_normalise(x), np.sign(x))


def test_reference_exact_ranks_like_the_reference_notebook():
    # pool a = (1, .05) liked, b = (.9, -.5) disliked; sample g = (1, -.01): cosine NN a, but sign(g) . sign(b) = 2
    pool, liked, g = np.array([[1, 0.05], [0.9, -0.5]]), np.array([True, False]), np.array([[1, -0.01]])
    assert precision_recall_at_k(g, pool, liked, 1, "reference") == (1.0, 1.0)
    assert precision_recall_at_k(g, pool, liked, 1, "reference_exact") == (0.0, 0.0)
    # REBECA's samples were normalised correctly, the pool was not: unit(g) . sign(p) ranks
    g2 = np.array([[1, 0.3]])  # unit(g2) . (1, 1) = 1.245 > unit(g2) . (1, -1) = 0.67
    assert precision_recall_at_k(g2, pool, liked, 1, "reference_exact", gen_exact=True) == (1.0, 1.0)
    # in general: reference on sign(pool) and sign(gen) (gen_exact False) or unit(gen) (True), dot-product ranking
    rng = np.random.default_rng(3)
    pool, gen, liked = rng.normal(size=(30, 8)), rng.normal(size=(6, 8)), rng.random(30) < 0.4
    exact = np.array([True, False] * 3)
    for k in (1, 3, 5):
        got = precision_recall_at_k(gen, pool, liked, k, "reference_exact", exact)
        sim = np.where(exact[:, None], gen / np.linalg.norm(gen, axis=1, keepdims=True), np.sign(gen)) @ np.sign(pool).T
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        retrieved = np.unique(top)
        assert got == pytest.approx((liked[retrieved].mean(), liked[retrieved].sum() / liked.sum()))
    with pytest.raises(ValueError):
        precision_recall_at_k(gen, pool, liked, 1, "reference_exact", exact[:4])  # one flag per sample


def test_single_user_errors():
    with pytest.raises(ValueError, match="k=5 but the user's pool has 4 items"):
        precision_recall_at_k(GEN, POOL, LIKED, 5)
    with pytest.raises(ValueError, match="valid definitions are paper, reference"):
        precision_recall_at_k(GEN, POOL, LIKED, 1, definition="nope")
    assert np.isnan(precision_recall_at_k(GEN, POOL, np.zeros(4, bool), 1)[1])  # Rec@k needs |L_u| > 0


def test_all_users_by_hand_paper():
    per_user, summary = retrieval_metrics(**HAND, ks=(1, 2))
    s = summary.set_index("k")
    # k=1: P = (2/3 + 1)/2 = 5/6, R = (1/2 + 1)/2 = 3/4, F1 from the macro averages = 2(5/6)(3/4)/(19/12) = 15/19
    assert s.loc[1, ["precision", "recall", "f1"]].tolist() == pytest.approx([5 / 6, 3 / 4, 15 / 19])
    assert s.loc[2, ["precision", "recall", "f1"]].tolist() == pytest.approx([1, 1, 1])
    assert s["users"].tolist() == [2, 2] and s["users_dropped"].tolist() == [2, 2]  # C (no likes), D (no pool)
    a = per_user.set_index(["user_id", "k"]).loc[(10, 1)]
    assert a[["precision", "recall", "f1"]].tolist() == pytest.approx([2 / 3, 1 / 2, 4 / 7])
    assert a[["n_gen", "n_pool", "n_likes"]].tolist() == [3, 4, 2]


def test_all_users_by_hand_reference():
    _, summary = retrieval_metrics(**HAND, ks=(1, 2), definition="reference")
    s = summary.set_index("k")
    # k=1: P = (1/2 + 1)/2 = 3/4, R = 3/4, F1 = mean of per-user F1 = (1/2 + 1)/2 = 3/4
    assert s.loc[1, ["precision", "recall", "f1"]].tolist() == pytest.approx([3 / 4, 3 / 4, 3 / 4])
    # k=2: P = (2/3 + 1/2)/2 = 7/12, R = 1, F1 = (4/5 + 2/3)/2 = 11/15 (not 2PR/(P+R) = 14/19)
    assert s.loc[2, ["precision", "recall", "f1"]].tolist() == pytest.approx([7 / 12, 1, 11 / 15])


def test_min_likes_drop_count_and_errors():
    per_user, summary = retrieval_metrics(**HAND, ks=(1,), min_likes=2)  # B has a single held-out like
    assert per_user["user_id"].tolist() == [10]
    assert summary[["users", "users_dropped"]].values.tolist() == [[1, 3]]
    with pytest.raises(ValueError, match="k=4 exceeds the pool of 1 user"):
        retrieval_metrics(**HAND, ks=(1, 4))  # B's pool has 3 items
    with pytest.raises(ValueError, match="min_likes must be >= 1"):
        retrieval_metrics(**HAND, min_likes=0)
    with pytest.raises(ValueError, match="lengths disagree"):
        retrieval_metrics(**{**HAND, "gen_user": HAND["gen_user"][:-1]})


@pytest.mark.parametrize("definition", ["paper", "reference"])
def test_all_users_equal_loop_over_single_user(definition):
    rng = np.random.default_rng(2)
    sizes, m = rng.integers(5, 25, 30), rng.integers(1, 8, 30)  # pools and sample counts of different sizes
    pool_user, gen_user = np.repeat(np.arange(30), sizes), np.repeat(np.arange(30), m)
    pool = rng.normal(size=(len(pool_user), 16)).astype(np.float32)
    liked = rng.random(len(pool_user)) < 0.4
    gen = rng.normal(size=(len(gen_user), 16)).astype(np.float32)
    # shuffle rows so users are interleaved, as in a real table
    pp, gp = rng.permutation(len(pool_user)), rng.permutation(len(gen_user))
    per_user, summary = retrieval_metrics(gen[gp], gen_user[gp], pool[pp], pool_user[pp], liked[pp], ks=(1, 3, 5),
                                          definition=definition)
    for row in per_user.itertuples():
        u = row.user_id
        loop = precision_recall_at_k(gen[gen_user == u], pool[pool_user == u], liked[pool_user == u], row.k,
                                     definition)
        assert (row.precision, row.recall) == pytest.approx(loop)
    kept = np.bincount(pool_user, weights=liked) >= 1
    assert (summary["users"] == kept.sum()).all() and (summary["users_dropped"] == (~kept).sum()).all()


def test_table2_layout_and_paper_values():
    _, s = retrieval_metrics(**HAND, ks=(1, 2))
    with pytest.raises(ValueError, match="no k=\\[5\\]"):
        table2({rebeca_label(5): s})
    _, s = retrieval_metrics(**HAND, ks=(1, 3))
    t = table2({rebeca_label(5): s, "Mine": s}, ks=(1, 3))
    assert list(t.index) == ["REBECA (CFG=5.0)", "Mine"]
    assert list(t.columns) == [(f"@{k}", m) for k in (1, 3) for m in ("P", "R", "F1")]
    assert t.loc["Mine", ("@1", "P")] == pytest.approx(5 / 6)
    both = table2({rebeca_label(5): s}, ks=(1, 3), with_paper=True)
    assert len(both) == len(PAPER_TABLE2)  # the paper's other rows appear with ours = NaN
    assert both.loc["REBECA (CFG=5.0)", ("@1", "P", "ours")] == pytest.approx(5 / 6)
    lora = both.loc["Shared LoRA"]
    assert np.isnan(lora[("@1", "P", "ours")]) and np.isnan(lora[("@3", "P", "paper")])
    # the paper's numbers themselves are checked against the paper's text in tests/test_paper_numbers.py


def test_table2_both_builds_each_definition_per_label():
    label = np.array(["A"] * len(HAND["gen_user"]))
    gen = dict(gen_emb=np.concatenate([HAND["gen_emb"]] * 2), gen_user=np.concatenate([HAND["gen_user"]] * 2))
    labels = np.concatenate([label, np.array(["B"] * len(label))])  # B: the same samples under another name
    tables, per_user, summary = table2_both(**gen, gen_label=labels, pool_emb=HAND["pool_emb"],
                                            pool_user=HAND["pool_user"], pool_liked=HAND["pool_liked"], ks=(1, 2))
    assert list(tables) == ["paper", "reference", "reference_exact"]
    for definition, t in tables.items():
        rows, s = retrieval_metrics(**HAND, ks=(1, 2), definition=definition)
        pd.testing.assert_frame_equal(t, table2({"A": s, "B": s}, (1, 2)))
        got = per_user[(per_user["definition"] == definition) & (per_user["label"] == "B")]
        pd.testing.assert_frame_equal(got.drop(columns=["label", "definition"]).reset_index(drop=True), rows)
    assert tables["reference"].loc["A", ("@2", "F1")] == pytest.approx(11 / 15)
    assert per_user[["definition", "label"]].drop_duplicates().values.tolist() == [
        [d, label] for d in ("paper", "reference", "reference_exact") for label in ("A", "B")]
    assert set(summary["users_dropped"]) == {2} and len(summary) == 12  # 3 definitions x 2 labels x 2 ks
    with pytest.raises(ValueError, match="gen_label has 1 entries"):
        table2_both(**gen, gen_label=["A"], pool_emb=HAND["pool_emb"], pool_user=HAND["pool_user"],
                    pool_liked=HAND["pool_liked"])


def test_table2_reference_exact_normalises_rebeca_rows_only():
    # the same samples as a baseline row and as a REBECA row: reference_exact treats them differently
    rng = np.random.default_rng(6)
    pool, liked = rng.normal(size=(40, 8)), rng.random(40) < 0.4
    gen = rng.normal(size=(10, 8))
    labels = np.array(["Shared LoRA"] * 5 + [rebeca_label(5)] * 5)
    gen2 = np.concatenate([gen[:5], gen[:5]])
    _, per_user, _ = table2_both(gen2, np.zeros(10, int), labels, pool, np.zeros(40, int), liked, ks=(1, 5))
    got = per_user[per_user["definition"] == "reference_exact"].set_index(["label", "k"])
    for label, exact in (("Shared LoRA", False), (rebeca_label(5), True)):
        for k in (1, 5):
            exp = precision_recall_at_k(gen[:5], pool, liked, k, "reference_exact", exact)
            assert (got.loc[(label, k), "precision"], got.loc[(label, k), "recall"]) == pytest.approx(exp)


# --- verifier scores, wins and ranks ----------------------------------------------------------------------------

def test_user_scores_and_wins_and_ranks():
    s = user_scores([0.2, 0.4, 0.9, 0.1], [7, 7, 3, 3], method="REBECA", cfg=5.0)
    assert s.to_dict("list") == dict(user_id=[3, 7], score=[0.5, pytest.approx(0.3)], n=[2, 2], method=["REBECA"] * 2,
                                     cfg=[5.0, 5.0])
    long = pd.DataFrame(dict(user_id=[1, 1, 1, 2, 2, 2, 3, 3], method=["R", "L", "V"] * 2 + ["R", "L"],
                             score=[0.9, 0.5, 0.7, 0.4, 0.6, 0.6, 0.1, 0.2]))
    w = wins_and_ranks(long)
    assert w["users_dropped"] == 1  # user 3 has no V score
    assert w["winner"].to_dict() == {1: "R", 2: "L"}  # a tie goes to the first method given
    assert w["ranks"].loc[1].tolist() == [1, 3, 2] and w["ranks"].loc[2].tolist() == [3, 1, 1]
    assert w["win_counts"].tolist() == [1, 1, 0]
    assert w["rank_counts"].loc["V"].tolist() == [1, 1, 0] and w["rank_counts"].loc["R"].tolist() == [1, 0, 1]


# --- permutation tests (Algorithm 2, §4.5) ----------------------------------------------------------------------

def _scores(rng, n_users, per_user, effect):
    owner = np.repeat(np.arange(n_users), per_user)
    # user bias + image "aesthetics" + noise: no user-image interaction unless effect > 0
    s = rng.normal(size=(n_users, 1)) + rng.normal(size=(1, len(owner))) + rng.normal(size=(n_users, len(owner)))
    return s + effect * (owner[None, :] == np.arange(n_users)[:, None]), owner


def test_permutation_p_values_uniform_under_null():
    rng = np.random.default_rng(3)
    p = [permutation_test(*_scores(rng, 20, 5, 0.0), n_permutations=199, seed=i).p_value for i in range(200)]
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_permutation_planted_effect_and_never_zero():
    s, owner = _scores(np.random.default_rng(4), 20, 5, 2.0)
    res = permutation_test(s, owner, n_permutations=199, seed=0)
    assert res.p_value == 1 / 200 and res.z > 3  # no reassignment reaches the planted statistic
    assert res.null.shape == (199,) and (res.gap > 0).mean() > 0.8


def _scipy_statistic(s, agg):
    def statistic(*images):  # images[j]: the image columns given to user j
        return np.median([agg(s[u, cols]) for u, cols in enumerate(images)])
    return statistic


@pytest.mark.parametrize("test,agg", [(permutation_test, np.mean), (matching_test, np.median)])
def test_permutation_p_value_agrees_with_scipy_exact(test, agg):
    # 3 users with 3, 2, 2 images: scipy enumerates all 7!/(3!2!2!) = 210 reassignments, so its p is exact
    rng = np.random.default_rng(8)
    owner = np.array([0, 0, 0, 1, 1, 2, 2])
    s = rng.normal(size=(3, 7)) + 0.6 * (owner[None, :] == np.arange(3)[:, None])  # a weak planted effect
    exact = stats.permutation_test([np.flatnonzero(owner == u) for u in range(3)], _scipy_statistic(s, agg),
                                   permutation_type="independent", alternative="greater", n_resamples=10_000,
                                   vectorized=False)
    assert len(exact.null_distribution) == 210 and 0.02 < exact.pvalue < 0.5  # a p-value that says something
    res = test(s, owner, 20_000, seed=0)
    assert res.statistic == pytest.approx(exact.statistic)
    mc_sd = np.sqrt(exact.pvalue * (1 - exact.pvalue) / 20_000)
    assert abs(res.p_value - exact.pvalue) < 5 * mc_sd
    assert res.null.mean() == pytest.approx(exact.null_distribution.mean(), abs=0.01)


def test_permutation_result_fields():
    rng = np.random.default_rng(5)
    owner = rng.integers(0, 6, 40)  # unequal group sizes; user 6 has no image
    s = rng.normal(size=(7, 40))
    users = np.unique(owner)
    for test, f in ((permutation_test, np.mean), (matching_test, np.median)):
        res = test(s, owner, 2000, seed=1)
        own = [f(s[u, owner == u]) for u in users]
        assert res.statistic == pytest.approx(np.median(own)) and res.own[users] == pytest.approx(own)
        assert res.null.shape == (2000,) and res.n_permutations == 2000 and np.isnan(res.gap[6])
        assert res.p_value == (1 + (res.null >= res.statistic).sum()) / 2001
        assert res.z == pytest.approx((res.statistic - res.null.mean()) / res.null.std(ddof=1))
        assert res.gap[users] == pytest.approx(res.own[users] - res.random[users])
    # mean agg: a random reassignment averages, for each user, over all images (sd of one draw ~ 0.2 here)
    res = permutation_test(s, owner, 2000, seed=1)
    assert res.random[users] == pytest.approx(s[users].mean(1), abs=0.03)
    np.testing.assert_array_equal(permutation_test(s, owner, 30, seed=1).null, permutation_test(s, owner, 30, seed=1).null)
    assert not np.array_equal(permutation_test(s, owner, 30, seed=1).null, permutation_test(s, owner, 30, seed=2).null)


def test_matching_test_aesthetic_only_has_no_gap():
    rng = np.random.default_rng(6)
    owner = np.repeat(np.arange(15), 8)
    aesthetic = rng.normal(size=len(owner))
    res = matching_test(lambda u, i: aesthetic[i], owner, n_permutations=199, seed=0)  # v(u, I) = f(I)
    assert res.p_value > 0.01 and abs(np.median(res.gap)) < 0.5  # a valid test: p is uniform here
    planted = matching_test(*_scores(rng, 15, 8, 2.0), n_permutations=199, seed=0)
    assert planted.p_value == 1 / 200 and np.median(planted.gap) > 1


def test_permutation_input_errors():
    s = np.zeros((3, 4))
    with pytest.raises(ValueError, match="owner has shape \\(3,\\) but score_matrix has 4 images"):
        permutation_test(s, [0, 1, 2])
    with pytest.raises(ValueError, match="owner values must lie in \\[0, 3\\)"):
        permutation_test(s, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="integer user indices"):
        permutation_test(s, [0.0, 1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="must be \\(users, images\\)"):
        permutation_test(np.zeros(4), [0, 1, 2, 0])


# --- R² (Figure 8b) ---------------------------------------------------------------------------------------------

def test_r2_bootstrap_by_hand():
    line = r2_bootstrap([0, 1, 2, 3, 4], [1, 3, 5, 7, 9], n_bootstrap=200)
    assert (line["r2"], line["slope"], line["intercept"]) == pytest.approx((1.0, 2.0, 1.0))
    assert line["ci_low"] == pytest.approx(1.0) and line["ci_high"] == pytest.approx(1.0)
    # x = 0, 1, 2; y = 0, 2, 1: Sxy = 1, Sxx = 2, Syy = 2 -> slope 1/2, intercept 1/2, R² = 1/(2·2) = 1/4
    hand = r2_bootstrap([0, 1, 2], [0, 2, 1])
    assert (hand["r2"], hand["slope"], hand["intercept"]) == pytest.approx((0.25, 0.5, 0.5))
    # with 3 points ~1/9 of resamples repeat one point (constant x: no R²); they are left out, not counted as 0 or 1
    assert 800 < len(hand["samples"]) < 1000 and np.isfinite(hand["samples"]).all()
    flat = r2_bootstrap([1, 1, 1, 1], [0, 1, 2, 3], n_bootstrap=50)  # x constant: no R², no interval
    assert np.isnan(flat["r2"]) and np.isnan(flat["ci_low"]) and len(flat["samples"]) == 0
    rng = np.random.default_rng(7)
    x = rng.normal(size=200)
    y = x + rng.normal(scale=1.5, size=200)
    fit = r2_bootstrap(x, y, n_bootstrap=500, seed=1)
    assert fit["ci_low"] <= fit["r2"] <= fit["ci_high"] and fit["samples"].shape == (500,)
    np.testing.assert_array_equal(fit["samples"], r2_bootstrap(x, y, n_bootstrap=500, seed=1)["samples"])
    with pytest.raises(ValueError, match="at least 3 points"):
        r2_bootstrap([0, 1], [0, 1])


def test_normalizers_invert():
    x = torch.randn(100, 6) * 3 + 2
    for kind in ("none", "standardize"):
        n = fit_normalizer(kind, x)
        assert torch.allclose(n.inverse(n.forward(x)), x, atol=1e-5)
    z = fit_normalizer("standardize", x).forward(x)
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-5)
    l2 = fit_normalizer("l2", x)
    assert torch.allclose(l2.forward(x).norm(dim=-1), torch.ones(100))
    with pytest.raises(ValueError, match="valid values are none, standardize, l2, clamp"):
        fit_normalizer("whiten", x)
