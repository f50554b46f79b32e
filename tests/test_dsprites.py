"""dSprites study data (renderer, npz path, colouring, like rule, split) and the small VAE."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rebeca_utils.data import dsprites as DS
from rebeca_utils.evaluate import retrieval as RET
from rebeca_utils.models import vae as VAE
from rebeca_utils.studies import controlled as CTRL


# ---------------------------------------------------------------------------------------------------- renderer
def test_renderer_shapes_dtypes_binary():
    imgs = DS.render_sprites([0, 1, 2], 3, 7, 16, 16)
    assert imgs.shape == (3, 64, 64) and imgs.dtype == np.uint8
    assert set(np.unique(imgs)) == {0, 1}
    assert all(img.sum() > 20 for img in imgs)
    # the three shapes differ
    assert (imgs[0] != imgs[1]).any() and (imgs[0] != imgs[2]).any() and (imgs[1] != imgs[2]).any()
    with pytest.raises(ValueError):
        DS.render_sprites(3, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        DS.render_sprites(0, 6, 0, 0, 0)


@pytest.mark.parametrize("shape", [0, 1, 2])
def test_renderer_size_grows_with_scale(shape):
    areas = DS.render_sprites(shape, np.arange(6), 0, 16, 16).reshape(6, -1).sum(1)
    assert np.all(np.diff(areas) > 0)


def test_renderer_rotation_changes_square_and_position_moves_centroid():
    sq = DS.render_sprites(0, 5, [0, 5, 10], 16, 16)  # 0, 45 degrees, 90 degrees (square symmetric)
    assert (sq[0] != sq[1]).any()
    assert abs(int(sq[0].sum()) - int(sq[1].sum())) < 0.2 * sq[0].sum()  # rotation keeps the area roughly
    assert (sq[0] != sq[2]).sum() < 0.1 * sq[0].sum()  # 90 degrees: (nearly) the same square

    def centroid(img):
        r, c = np.nonzero(img)
        return r.mean(), c.mean()

    x = DS.render_sprites(2, 2, 0, [0, 31], 16)
    y = DS.render_sprites(2, 2, 0, 16, [0, 31])
    (r0, c0), (r1, c1) = centroid(x[0]), centroid(x[1])
    assert c1 - c0 > 30 and abs(r1 - r0) < 1  # posX moves along columns
    (r0, c0), (r1, c1) = centroid(y[0]), centroid(y[1])
    assert r1 - r0 > 30 and abs(c1 - c0) < 1  # posY moves along rows
    # nothing is clipped at the extreme positions: full-size rotated sprites keep their area
    corners = DS.render_sprites(0, 5, 5, [0, 31, 0, 31], [0, 0, 31, 31])
    assert np.all(corners.reshape(4, -1).sum(1) == corners[0].sum())


def test_factor_grid_matches_dsprites_layout():
    grid = DS.dsprites_factor_grid()
    assert grid.shape == (DS.N_GRID, 6) == (737_280, 6)
    assert (grid[1] == [0, 0, 0, 0, 0, 1]).all()  # posY varies fastest
    assert (grid.max(0) == np.array(DS.FACTOR_SIZES) - 1).all()


# ---------------------------------------------------------------------------------------------------- npz path
def _write_small_npz(path, n=64, seed=0):
    rng = np.random.default_rng(seed)
    classes = np.stack([np.zeros(n, int), rng.integers(0, 3, n), rng.integers(0, 6, n), rng.integers(0, 40, n),
                        rng.integers(0, 32, n), rng.integers(0, 32, n)], 1)
    classes[:4, 1] = [0, 2, 0, 2]
    imgs = (rng.random((n, 64, 64)) < 0.3).astype(np.uint8)  # distinctive noise, not renderer output
    np.savez_compressed(path, imgs=imgs, latents_classes=classes, latents_values=classes.astype(np.float64))
    return imgs, classes


def test_npz_path_returns_npz_images(tmp_path):
    path = tmp_path / "small.npz"
    imgs, classes = _write_small_npz(path)
    got, factors, source = DS.load_dsprites(path)
    assert source == f"official npz: {path}"
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(factors, classes)
    rows = np.array([50, 3, 3, 17, 0])  # any order, repeats, small chunks
    part = DS.read_npz_rows(path, "imgs", rows, chunk_rows=7)
    np.testing.assert_array_equal(part, imgs[rows])
    got, factors, _ = DS.load_dsprites(path, rows=rows)
    np.testing.assert_array_equal(got, imgs[rows])
    np.testing.assert_array_equal(factors, classes[rows])

    st = DS.make_study(n_images=200, npz_path=path, seed=1)
    assert st.source == f"official npz: {path}"
    assert np.isin(classes[st.rows, 1], (0, 2)).all()  # only squares and hearts
    mask = st.images.max(1) > 0
    np.testing.assert_array_equal(mask, imgs[st.rows] > 0)
    np.testing.assert_array_equal(st.shape, (classes[st.rows, 1] == 2).astype(int))

    chk = DS.check_dsprites_npz(path)  # structure / digest check flags the small file as not official
    assert not chk["ok"] and chk["problems"][0] == f"md5 {chk['md5']} != expected {DS.DSPRITES_MD5}"
    assert not DS.check_dsprites_npz(tmp_path / "missing.npz")["ok"]


def test_procedural_source_string():
    imgs, factors, source = DS.load_dsprites(None, rows=[0, 1000, 737_279])
    assert source == "procedural renderer" and imgs.shape == (3, 64, 64)
    np.testing.assert_array_equal(factors, DS.dsprites_factor_grid()[[0, 1000, 737_279]])
    np.testing.assert_array_equal(imgs, DS.render_from_factors(factors))


# ---------------------------------------------------------------------------------------------------- study
@pytest.fixture(scope="module")
def study():
    return DS.make_study(n_images=4000, seed=3)


def test_colouring_red_blue_channels(study):
    imgs, colour = study.images, study.colour
    assert imgs.shape == (4000, 3, 64, 64) and imgs.dtype == np.uint8
    assert set(np.unique(imgs)) == {0, 255}
    red, blue = imgs[colour == 0], imgs[colour == 1]
    assert red[:, 0].any(axis=(1, 2)).all() and not red[:, 1:].any()
    assert blue[:, 2].any(axis=(1, 2)).all() and not blue[:, :2].any()
    np.testing.assert_array_equal(study.pair, 2 * study.shape + study.colour)
    assert set(np.unique(study.pair)) == {0, 1, 2, 3}
    # roughly uniform over the four pairs
    counts = np.bincount(study.pair, minlength=4)
    assert (np.abs(counts / 4000 - 0.25) < 0.03).all()


def test_split_sizes_and_determinism(study):
    assert len(study.train_idx) == 3600 and len(study.test_idx) == 400
    assert np.intersect1d(study.train_idx, study.test_idx).size == 0
    assert np.union1d(study.train_idx, study.test_idx).size == 4000
    again = DS.make_study(n_images=4000, seed=3)
    for name in ("images", "pair", "rows", "likes", "train_idx", "test_idx"):
        np.testing.assert_array_equal(getattr(study, name), getattr(again, name))
    other = DS.make_study(n_images=4000, seed=4)
    assert not np.array_equal(study.rows, other.rows)
    # latent = image index: the triplets must pair each (user, image) with that user's rating of that image
    train, val = CTRL.study_triplets(study, torch.arange(study.n_images, dtype=torch.float32)[:, None])
    idx = torch.cat([train.img_emb, val.img_emb])[:, 0].long().numpy()
    users, ratings = torch.cat([train.user_id, val.user_id]).numpy(), torch.cat([train.rating, val.rating]).numpy()
    assert len(users) == 4 * 3600 and (ratings == study.likes[users, idx]).all()
    assert np.bincount(users).tolist() == [3600] * 4 and not set(idx) & set(study.test_idx.tolist())


@pytest.mark.parametrize("p_like", [DS.P_LIKE_PAPER, DS.P_LIKE_REFERENCE])
def test_like_rule_rates(p_like):
    st = DS.make_study(n_images=30_000, p_like=p_like, seed=5, test_frac=0.1)
    rates = st.like_rates()  # users x pairs
    for u in range(4):
        for p in range(4):
            n_match = int(p // 2 == u // 2) + int(p % 2 == u % 2)
            expect = p_like[2 - n_match]
            n = (st.pair == p).sum()
            tol = 4 * np.sqrt(expect * (1 - expect) / n) + 1e-3
            assert abs(rates[u, p] - expect) < tol, (u, p, rates[u, p], expect)
    assert np.allclose(DS.like_probability([0, 1, 2, 3], 0, p_like), [p_like[0], p_like[1], p_like[1], p_like[2]])


def test_reference_switch_changes_only_ratings():
    a = DS.make_study(n_images=2000, seed=7)
    b = DS.make_study(n_images=2000, seed=7, p_like=DS.P_LIKE_REFERENCE)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.test_idx, b.test_idx)
    assert a.p_like == (0.95, 0.10, 0.05) and b.p_like == (0.95, 0.10, 0.01)


# ---------------------------------------------------------------------------------------------------- VAE
def test_tiny_vae_trains_encodes_decodes(study, tmp_path):
    torch.manual_seed(0)
    imgs = study.images[:256]
    model = VAE.ConvVAE(latent_dim=32, channels=(8, 16, 16), hidden=64)
    hist = VAE.train_vae(model, imgs, epochs=3, batch_size=64, lr=3e-3, seed=0, progress=False)
    assert len(hist["loss"]) == 3 and hist["loss"][-1] < hist["loss"][0]
    z = VAE.encode_mean(model, imgs[:10])
    assert z.shape == (10, 32) and z.dtype == torch.float32
    x = VAE.decode(model, z)
    assert x.shape == (10, 3, 64, 64) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # float input in [0, 1] encodes like uint8 input
    assert torch.allclose(VAE.encode_mean(model, imgs[:10].astype(np.float32) / 255), z, atol=1e-5)
    path = VAE.save_vae(model, tmp_path / "vae")
    loaded = VAE.load_vae(path)
    assert torch.allclose(VAE.encode_mean(loaded, imgs[:10]), z)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert 0.0 <= RET.nn_label_agreement(z, study.pair[:10]) <= 1.0


def test_vae_where_dims_are_position(study):
    torch.manual_seed(0)
    model = VAE.ConvVAE(latent_dim=32, channels=(8, 16, 16), hidden=64).eval()
    x = torch.from_numpy(study.images[:8]).float() / 255
    cx, cy = model.centroid(x)
    assert torch.allclose(model.crop(x, cx, cy).sum((1, 2, 3)), x.sum((1, 2, 3)))  # crop keeps the sprite
    mu, _ = model.encode(x)
    assert torch.allclose(mu[:, 0], (cx - 31.5) / VAE.POS_SCALE) and torch.allclose(mu[:, 1], (cy - 31.5) / VAE.POS_SCALE)
    # moving z[:, 0] by one unit translates the decoded image by POS_SCALE pixels along columns
    z = torch.randn(4, 32) * 0.3
    with torch.no_grad():
        a = model.decode_logits(z)
        b = model.decode_logits(z + torch.tensor([1.0] + [0.0] * 31))
    s = int(VAE.POS_SCALE)
    assert torch.allclose(b[..., s:], a[..., :-s], atol=1e-4)


def test_nn_label_agreement():
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert RET.nn_label_agreement(z, [0, 0, 1, 1]) == 1.0
    assert RET.nn_label_agreement(z, [0, 1, 0, 1], metric="euclidean") == 0.0


def test_oracle_draws_only_the_users_liked_training_latents(study):
    latents = torch.as_tensor(np.random.default_rng(0).normal(size=(study.n_images, 5)), dtype=torch.float32)
    random, mean, oracle = CTRL.baseline_samples(study, latents, reps=3, k=7, seed=1)
    assert random.shape == oracle.shape == (3, 4, 7, 5) and mean.shape == (4, 5)
    train = latents[study.train_idx].numpy()
    for u in range(4):
        liked = train[study.likes[u, study.train_idx]]
        # every Oracle sample is one of the user's liked training latents, and they are not all the same one
        hit = (np.abs(oracle[:, u].reshape(-1, 1, 5) - liked[None]).max(-1) == 0).any(1)
        assert hit.all() and len(np.unique(oracle[:, u].reshape(-1, 5), axis=0)) > 10
    again = CTRL.baseline_samples(study, latents, reps=3, k=7, seed=1)
    for a, b in zip((random, mean, oracle), again):
        np.testing.assert_array_equal(a, b)


def test_landing_pairs_counts_nearest_pool_pairs():
    pool = np.eye(4, dtype=np.float32)
    pair = np.array([0, 1, 2, 3])
    x = np.zeros((2, 2, 3, 4), np.float32)
    x[:, 0, :, 0] = 1  # user 0's samples all land on pair 0
    x[0, 1, :, 1] = 1  # user 1: 3 on pair 1, 3 on pair 3
    x[1, 1, :, 3] = 1
    np.testing.assert_allclose(CTRL.landing_pairs(x, pool, pair), [[1, 0, 0, 0], [0, 0.5, 0, 0.5]])


def test_table1_default_like_rule_is_the_reference_one():
    # the paper's Table 1 was produced under P(like | neither) = 0.01 (README): notebook 01 and the profiles use it
    import ast
    import json
    from pathlib import Path

    from rebeca_utils.config import get_profile

    for name in ("smoke", "demo", "paper"):
        assert get_profile(name).dsprites.p_like == DS.P_LIKE_REFERENCE
        assert get_profile(name).dsprites.recall_denominator == "user"
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "01_simulate_dsprites.ipynb"
    cell = next(c for c in json.loads(nb.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    values = {n.target.id: ast.literal_eval(n.value) for n in ast.parse("".join(cell["source"])).body
              if isinstance(n, ast.AnnAssign)}
    assert values["p_like_neither"] == 0.01 and values["overrides"] == {}


def test_vae_reused_only_for_the_same_training_images(tmp_path):
    from rebeca_utils.config import get_profile

    st = DS.make_study(n_images=300, seed=2)
    cfg = dataclasses.replace(get_profile("smoke").dsprites, vae_epochs=1, latent_dim=4)
    a, _ = CTRL.fit_or_load_vae(st, cfg, tmp_path, seed=0)
    stamp = (tmp_path / "vae" / "model.safetensors").stat().st_mtime_ns
    b, _ = CTRL.fit_or_load_vae(st, cfg, tmp_path, seed=0)  # same setup and images: loaded
    assert (tmp_path / "vae" / "model.safetensors").stat().st_mtime_ns == stamp
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    st.images[st.train_idx[0]] = 255 - st.images[st.train_idx[0]]  # other pixels, same parameters: retrained
    CTRL.fit_or_load_vae(st, cfg, tmp_path, seed=0)
    assert (tmp_path / "vae" / "model.safetensors").stat().st_mtime_ns != stamp
