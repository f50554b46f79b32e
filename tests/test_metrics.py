"""Nearest-neighbour Precision@k / Recall@k on hand-computed cases, and Table 1 from its inputs."""
import numpy as np
import pytest
import torch

from rebeca_utils.metrics import cosine_nn, pr_from_neighbours, precision_recall_at_k, table1
from rebeca_utils.normalize import fit_normalizer

POOL = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)  # four directions
LIKED = np.array([True, True, False, False])


def test_cosine_nn_ignores_norm():
    q = np.array([[10, 0.1], [0.01, 3], [-0.2, -5]], dtype=np.float32)
    assert cosine_nn(q, POOL).tolist() == [0, 1, 3]


def test_paper_definition_by_hand():
    gen = np.array([[2, 0.1], [1, 0.2], [-1, 0.1]], dtype=np.float32)  # NN: 0 (liked), 0 (liked), 2 (disliked)
    p, r = precision_recall_at_k(gen, POOL, LIKED, k=3)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(1 / 2)
    p1, r1 = precision_recall_at_k(gen, POOL, LIKED, k=1)
    assert (p1, r1) == (1.0, 0.5)


def test_reference_definition_counts_retrieved_set_once():
    gen = np.array([[2, 0.1], [1, 0.2], [-1, 0.1]], dtype=np.float32)  # retrieved set {0, 2}: one liked of two
    p, r = precision_recall_at_k(gen, POOL, LIKED, k=3, definition="reference")
    assert p == pytest.approx(1 / 2) and r == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="valid definitions are paper, reference"):
        precision_recall_at_k(gen, POOL, LIKED, k=1, definition="nope")


def test_batched_matches_per_user():
    rng = np.random.default_rng(0)
    pool, liked = rng.normal(size=(50, 8)).astype(np.float32), rng.random((3, 50)) < 0.3
    gen = rng.normal(size=(2, 3, 6, 8)).astype(np.float32)
    p, r = pr_from_neighbours(cosine_nn(gen, pool), liked, 4)
    for rep in range(2):
        for u in range(3):
            assert (p[rep, u], r[rep, u]) == pytest.approx(precision_recall_at_k(gen[rep, u], pool, liked[u], 4))
    with pytest.raises(ValueError, match="k=7 but only 6 samples"):
        pr_from_neighbours(cosine_nn(gen, pool), liked, 7)


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
    assert 0.1 < t.loc[("Random", 20), "precision"] < 0.45
    assert t.loc[("REBECA", 1), "paper_precision"] == 0.782


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
