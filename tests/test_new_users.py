"""User inversion (issue 16): a new user's row fitted on a frozen prior recovers a planted taste, leaves every prior
weight bit for bit, is seeded; add_users round-trips; notebook 12's study helpers and the explorer's saved users."""
import numpy as np
import pandas as pd
import pytest
import torch

from rebeca_utils.config import DiffusionConfig, NewUserConfig, TrainConfig
from rebeca_utils.models.prior import RebecaPrior, load_prior, save_prior
from rebeca_utils.pipeline import sampling
from rebeca_utils.pipeline.rebeca import RebecaPipeline
from rebeca_utils.pipeline.sampling import sample_prior
from rebeca_utils.studies import cold_start as CS
from rebeca_utils.studies import explorer as EX
from rebeca_utils.train import inversion as NU
from rebeca_utils.train.diffusion import Triplets, make_scheduler, train_prior

CENTERS = torch.eye(8)[:4] * 3  # four planted tastes: user u likes images near CENTERS[u % 4]


def _data(users, n, seed):
    g = torch.Generator().manual_seed(seed)
    x, u, r = [], [], []
    for user in users:
        c = torch.randint(0, 4, (n,), generator=g)
        x.append(CENTERS[c] + 0.3 * torch.randn(n, 8, generator=g))
        u.append(torch.full((n,), user))
        r.append((c == user % 4).long())
    return Triplets(torch.cat(x), torch.cat(u), torch.cat(r))


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = RebecaPrior(emb_dim=8, n_tokens=4, hidden_dim=32, n_heads=4, n_layers=2, n_users=5)
    sched = make_scheduler(DiffusionConfig())
    cfg = TrainConfig(lr=2e-3, samples_per_user=100, max_epochs=15, patience=15, batch_size=64)
    train_prior(prior, sched, _data(range(4), 60, 0), _data(range(4), 20, 1), cfg, progress=False)
    return prior.eval(), sched


def _taste_rate(model, sched, user, target, n=48):
    x = sample_prior(model, sched, torch.full((n,), user), torch.ones(n, dtype=torch.long), torch.arange(n),
                     cfg_scale=3.0, seed=1, sampler="dpmsolver", steps=20, progress=False)
    return float(((x @ CENTERS.T).argmax(1) == target).float().mean())


def test_inversion_recovers_a_planted_taste_and_leaves_the_prior_untouched(trained):
    prior, sched = trained
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    new = _data([2], 30, 7)  # slot 4 was never trained; its ratings follow user 2's taste
    fit = NU.fit_user(prior, sched, new.img_emb, new.rating, init="null", steps=80, seed=0)
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())  # bit for bit
    assert np.mean(fit.losses[-10:]) < np.mean(fit.losses[:10])
    inverted = NU.with_rows(prior, {4: fit.row})
    hit, null = _taste_rate(inverted, sched, 4, 2), _taste_rate(prior, sched, prior.null_user, 2)
    assert hit >= null + 0.5, (hit, null)
    again = NU.fit_user(prior, sched, new.img_emb, new.rating, init="null", steps=80, seed=0)
    assert torch.equal(again.row, fit.row)  # seeded: same inputs, same row
    other = NU.fit_user(prior, sched, new.img_emb, new.rating, init="null", steps=80, seed=1)
    assert not torch.equal(other.row, fit.row)


def test_fit_sends_gradient_to_the_row_only(trained):
    prior, sched = trained
    prior.zero_grad(set_to_none=True)
    new = _data([1], 20, 3)
    NU.fit_user(prior, sched, new.img_emb, new.rating, steps=3, seed=0)
    touched = [n for n, q in prior.named_parameters() if q.grad is not None]
    assert touched == []  # was 62 of 63 weights: backward ran through the whole frozen prior on every step
    assert all(q.requires_grad for q in prior.parameters())  # the caller's flags come back


def test_update_pulls_towards_the_old_row(trained):
    prior, sched = trained
    old = prior.user_emb.weight[1].detach().clone()
    moved = _data([3], 30, 8)  # user 1's taste moved to user 3's
    free = NU.fit_user(prior, sched, moved.img_emb, moved.rating, init=old, steps=40, seed=0)
    pulled = NU.fit_user(prior, sched, moved.img_emb, moved.rating, init=old, steps=40, seed=0, anchor=old, l2=10.0)
    assert (pulled.row - old).norm() < (free.row - old).norm()


def test_add_users_keeps_earlier_users_and_round_trips(trained, tmp_path):
    prior, _ = trained
    model = NU.with_rows(prior, {})
    x, t = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 50, 500, 900])
    users, ratings = torch.tensor([0, 3, 4, 5]), torch.tensor([1, 0, 1, 2])  # 5 = the null user before
    before = model(x, t, users, ratings)
    ids = model.add_users(torch.randn(2, 32))
    assert ids == [5, 6] and model.null_user == 7
    assert torch.equal(model(x, t, torch.tensor([0, 3, 4, 7]), ratings), before)  # the null row moved, unchanged
    save_prior(model, tmp_path / "p")
    loaded = load_prior(tmp_path / "p")
    assert loaded.n_users == 7 and torch.equal(loaded(x, t, torch.tensor([5, 6, 7, 0]), ratings),
                                               model(x, t, torch.tensor([5, 6, 7, 0]), ratings))
    with pytest.raises(ValueError, match=r"user_id 9: the prior has users 0..4; add_users\(\) first"):
        NU.with_rows(prior, {9: torch.zeros(32)})


def test_seed_ids_give_two_users_the_same_noise(trained):
    prior, sched = trained
    twin = NU.with_rows(prior, {1: prior.user_emb.weight[0].detach()})  # user 1 made identical to user 0
    kw = dict(cfg_scale=3.0, seed=4, sampler="dpmsolver", steps=10, progress=False)
    users, ones, j = torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.long), torch.tensor([0, 1, 0, 1])
    own = sample_prior(twin, sched, users, ones, j, **kw)
    assert not torch.equal(own[:2], own[2:])  # by default each user has its own noise
    shared = sample_prior(twin, sched, users, ones, j, seed_ids=torch.full((4,), 7), **kw)
    assert torch.equal(shared[:2], shared[2:])  # same row, same seed ids: the same samples
    # the same samples in a batch of two: bit for bit with fixed-shape batches (pad=True; unpadded, 2 and 4 rows may
    # take other matmul kernels and differ in the last bits)
    padded = dict(kw, batch_size=8, pad=True)
    assert torch.equal(sample_prior(twin, sched, users, ones, j, seed_ids=torch.full((4,), 7), **padded)[:2],
                       sample_prior(twin, sched, users[:2], ones[:2], j[:2], seed_ids=[7, 7], **padded))
    with pytest.raises(ValueError, match="same length"):
        sample_prior(twin, sched, users, ones, j, seed_ids=[7], **kw)


def _ratings():
    rows = []
    for u, n in ((3, 12), (5, 4)):
        for i in range(n):
            rows.append(dict(user_id=u, image=f"{u}_{i}.jpg", like=i % 3 == 0, split="train"))
        rows.append(dict(user_id=u, image=f"{u}_t.jpg", like=True, split="test"))
    return pd.DataFrame(rows)


def test_histories_are_seeded_training_rows_of_the_user():
    r = _ratings()
    with pytest.warns(UserWarning, match=r"^histories: user 5 has 4 training ratings, fewer than k = 5; their k = 5 "
                                          r"histories are skipped \(k = all covers them\)$"):
        hists = CS.histories(r, [3, 5], ks=(5, 0), draws=2, seed=0)
    assert [(h.user_id, h.size, h.draw) for h in hists] == [(3, 5, 0), (3, 5, 1), (3, 0, 0), (5, 0, 0)]  # 5 >= 4
    for h in hists:
        sel = r.iloc[list(h.rows)]
        assert (sel["user_id"] == h.user_id).all() and (sel["split"] == "train").all()
        assert len(sel) == (h.size or (12 if h.user_id == 3 else 4))
    assert hists[0].rows != hists[1].rows and hists[0].setting == "k5_d0" and hists[2].setting == "kall_d0"
    with pytest.warns(UserWarning):
        assert CS.histories(r, [3, 5], (5, 0), 2, seed=0) == hists
        assert CS.histories(r, [3, 5], (5, 0), 2, seed=1)[0].rows != hists[0].rows


def test_nearest_user_separates_likes_from_dislikes(monkeypatch):
    s = np.array([[0.9, 0.9, 0.9, 0.9],    # user 10 likes everything: no separation
                  [0.8, 0.7, 0.2, 0.1],    # user 11 likes what the history likes
                  [0.1, 0.2, 0.8, 0.9]])   # user 12 the opposite
    monkeypatch.setattr(CS.scores, "score_matrix", lambda model, users, emb: s[: len(users)])
    assert CS.nearest_user(None, [10, 11, 12], None, np.array([1, 1, 0, 0])) == 11
    assert CS.nearest_user(None, [10, 11, 12], None, np.array([0, 0, 1, 1])) == 12
    assert CS.nearest_user(None, [10, 11, 12], None, np.array([1, 1, 1, 1])) == 10  # likes only: the top scorer


def _pipe(prior, sched):
    return RebecaPipeline(prior, sched, sampler="dpmsolver", steps=10, users={u: {"source": "trained"} for u in range(4)})


def test_appended_rows_sample_like_rows_in_their_slot(trained):
    pipe = _pipe(*trained)
    new = _data([2], 20, 3)
    hist = [CS.History(4, 0, 0, tuple(range(20)))]  # user 4: the never-trained slot
    cfg = NewUserConfig(steps=20, n_samples=6, cfg_scale=3.0)
    settings = {"inversion": {0: dict(init="null", lr=0.05, gauss=0.0, steps=20)}}
    fits = CS.fit_rows(pipe, hist, new.img_emb, new.rating.numpy().astype(bool), cfg, settings)
    assert set(fits["method"]) == {"inversion"}  # no encoder: inversion alone
    got = CS.method_samples("inversion", pipe, hist, cfg=cfg, fits=fits)
    row = fits.loc[fits["method"] == "inversion", "row"].iloc[0]
    in_slot = pipe.with_rows({4: row}).sample([4] * 6, [1] * 6, range(6), cfg_scale=3.0)
    assert torch.equal(got[0], in_slot)  # appended for the study = the same user in its own slot
    null = CS.method_samples("null_user", pipe, hist, cfg=cfg)
    assert not torch.equal(null, got)
    with pytest.raises(ValueError, match="valid methods are null_user, mean"):
        CS.method_samples("oracle", pipe, hist, cfg=cfg)


def test_fit_ceiling_budgets_and_its_training_row_is_fit_rows_row(trained):
    from dataclasses import replace

    pipe = _pipe(*trained)
    data = _data(range(5), 20, 7)  # user 4, never trained, likes centre 0 (4 of 14 training, 2 of 6 test)
    ratings = pd.DataFrame({"user_id": data.user_id.numpy(), "like": data.rating.numpy().astype(bool),
                            "split": np.tile(["train"] * 14 + ["test"] * 6, 5)})
    like, pool = ratings["like"].to_numpy(), CS.test_pool(ratings, data.img_emb)
    settings = {"inversion": {0: dict(init="null", lr=0.05, gauss=0.0, steps=10)}}
    cfg = NewUserConfig(n_samples=6, cfg_scale=3.0, ceiling_factor=3)
    got = CS.fit_ceiling(pipe, ratings, data.img_emb, like, [4], settings, cfg, pool)
    assert set(got["method"]) == {f"{d}, {n} steps" for d in ("training ratings", "every rating (oracle)")
                                  for n in (10, 30)}
    hist = CS.histories(ratings, [4], [0], 1)
    fits = CS.fit_rows(pipe, hist, data.img_emb, like, cfg, settings)
    want = CS.long_metrics({"inversion": (hist, CS.method_samples("inversion", pipe, hist, cfg=cfg, fits=fits))},
                           pool, (1,), "embedding")
    mine = got.loc[got["method"] == "training ratings, 10 steps", "value"]
    pd.testing.assert_series_equal(mine.reset_index(drop=True), want["value"].reset_index(drop=True))
    one = CS.fit_ceiling(pipe, ratings, data.img_emb, like, [4], settings, replace(cfg, ceiling_factor=1), pool)
    assert set(one["method"]) == {"training ratings, 10 steps", "every rating (oracle), 10 steps"}
    with pytest.raises(ValueError, match="new_users.ceiling_factor=0: it multiplies the chosen steps; use >= 1"):
        CS.fit_ceiling(pipe, ratings, data.img_emb, like, [4], settings, replace(cfg, ceiling_factor=0), pool)


def test_summarise_averages_draws_before_users():
    long = pd.DataFrame(dict(metric="m", method="inv", history=5, user_id=[1, 1, 2], draw=[0, 1, 0],
                             value=[0.0, 1.0, 1.0]))
    out = CS.summarise(long, n_bootstrap=50)
    assert out.loc[0, "mean"] == pytest.approx(0.75) and out.loc[0, "users"] == 2  # (0.5 + 1) / 2, not 2/3


def _explorer(trained):
    """The explorer's fitting, saving and feedback halves on six named images, without a decoder or encoders."""
    from rebeca_utils.models.nmf import NMFVerifier

    ex = EX.Explorer.__new__(EX.Explorer)
    ex.rebeca, ex.names, ex.likes, ex.note, ex.history, ex.ver_ids = _pipe(*trained).with_rows({}), {}, {}, "", {}, {}
    names = [f"im{i}.jpg" for i in range(6)]
    ex.store, ex.ver_store = (names, _data([2], 6, 3).img_emb), (names, _data([2], 6, 4).img_emb * 2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ex.verifier = NMFVerifier(4, 8, 4, (8,)).eval()
    return ex


def test_saved_user_reloads_only_on_its_prior(trained, tmp_path):
    prior, _ = trained
    ex = _explorer(trained)  # the save/load half of the explorer, without a decoder
    ex.base_fingerprint = sampling.state_fingerprint(prior)
    uid, _ = ex.fit(["im0.jpg", "im1.jpg"], ["im2.jpg"], name="me", steps=2)
    path = ex.save_user(uid, tmp_path / "me.safetensors")
    again = ex.load_user(path)
    w = ex.rebeca.prior.user_emb.weight
    assert ex.names[again] == "me" and torch.equal(w[again], w[uid]) and again == uid + 1
    # the history and the fitted verifier row come back with the user: the same scores for the same images
    assert all(torch.equal(a, b) for a, b in zip(ex.history[again], ex.history[uid]))
    x = ex.ver_store[1][:4]
    torch.testing.assert_close(ex.verifier(torch.full((4,), ex.ver_ids[again]), x),
                               ex.verifier(torch.full((4,), ex.ver_ids[uid]), x))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(Exception, match="cut.safetensors"):
        ex.load_user(tmp_path / "cut.safetensors")
    ex.base_fingerprint = "0" * 64
    with pytest.raises(ValueError, match=r"me.safetensors: this user was fitted on another prior"):
        ex.load_user(path)


def test_methods_share_noise_and_mean_is_the_liked_history(trained):
    pipe = _pipe(*trained)
    hist = [CS.History(4, 0, 0, (0, 1, 2)), CS.History(4, 5, 0, (3, 4))]
    cfg = NewUserConfig(n_samples=3, cfg_scale=3.0)
    null = CS.method_samples("null_user", pipe, hist, cfg=cfg)
    near = CS.method_samples("nearest", pipe, hist, cfg=cfg, nearest={h: pipe.null_user for h in hist})
    assert torch.equal(null, near)  # same condition, same noise: the methods differ only in who they condition on
    emb = torch.arange(50.0).view(5, 10)
    like = np.array([True, False, True, False, False])
    mean = CS.method_samples("mean", pipe, hist, cfg=cfg, dec_emb=emb, like=like)
    assert mean.shape == (2, 3, 10) and torch.equal(mean[0, 2], emb[[0, 2]].mean(0))  # the history's likes only
    assert torch.equal(mean[1, 0], emb.mean(0))  # a history without likes: the mean of every image
    with pytest.raises(ValueError, match=r"method_samples\(method='mean'\) needs dec_emb, like"):
        CS.method_samples("mean", pipe, hist, cfg=cfg)


def test_null_user_images_are_decoded_once_per_user(trained):
    from collections import Counter

    from rebeca_utils.config import GenerationConfig

    pipe = _pipe(*trained)
    hist = [CS.History(u, k, 0, (0, 1)) for u in (7, 8) for k in (0, 5, 10)]
    cfg = NewUserConfig(n_samples=3, cfg_scale=3.0)
    gen = {m: (hist, CS.method_samples(m, pipe, hist, cfg=cfg, nearest={h: h.user_id % 4 for h in hist}))
           for m in ("null_user", "nearest")}
    items = CS.work_items(gen, 2, GenerationConfig())
    assert Counter(it.method for it in items) == {"null_user": 2 * 2, "nearest": 6 * 2}  # was 6 * 2 for both
    assert {it.setting for it in items if it.method == "null_user"} == {CS.SHARED_SETTING}

    class Store:  # the re-encoded images by path: the image's index as its one-number embedding
        def lookup(self, paths):
            index = {it.relpath: i for i, it in enumerate(items)}
            return torch.tensor([[float(index[p])] for p in paths])

    null = CS.decoded_embeddings(Store(), {"null_user": gen["null_user"]}, 2)["null_user"][1]
    assert torch.equal(null[0], null[2]) and not torch.equal(null[0], null[3])  # shared within a user only
    gen["null_user"][1][1, 0] += 1  # a history-free method whose samples did depend on the history
    with pytest.raises(ValueError, match="null_user: user 7's samples differ between histories"):
        CS.work_items(gen, 2, GenerationConfig())


def test_the_fifth_users_retrain_starts_from_the_four_user_prior(trained):
    from rebeca_utils.studies.fifth_user import warm_start

    prior, _ = trained
    five = warm_start(prior)
    w4, w5 = prior.state_dict(), five.state_dict()
    assert five.n_users == prior.n_users + 1 and five.training and not prior.training
    assert all(torch.equal(w4[k], w5[k]) for k in w4 if k != "user_emb.weight")
    old, new = w4["user_emb.weight"], w5["user_emb.weight"]
    assert torch.equal(new[: prior.n_users], old[: prior.n_users]) and torch.equal(new[-1], old[-1])
    assert torch.equal(new[prior.n_users], old[prior.null_user])  # the new row starts as "someone we know nothing about"


def test_bad_ratings_are_named_and_add_no_user(trained):
    prior, sched = trained
    ex = _explorer(trained)  # the fitting half of the explorer, on a store of six named images
    before = ex.rebeca.prior.n_users
    with pytest.raises(ValueError, match=r"^fit: image 'im1.jpg' is both liked and disliked; keep one rating per image$"):
        ex.fit(["im0.jpg", "im1.jpg"], ["im1.jpg"])
    with pytest.raises(ValueError, match=r"^fit: rate at least one image$"):
        ex.fit([], [])
    with pytest.raises(KeyError, match=r"no decoder-space embedding for image 'nope.jpg'"):
        ex.fit(["im0.jpg", "nope.jpg"])
    x = ex.store[1][:2]
    with pytest.raises(ValueError, match=r"^fit_user: rating 3 at row 1; ratings are 1 \(like\) or 0 \(dislike\)$"):
        ex.rebeca.fit_user(x, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match=r"^fit_user: img_emb row 0 is not finite \(NaN or inf\)$"):
        NU.fit_user(prior, sched, torch.full((2, 8), float("nan")), torch.tensor([1, 0]))
    assert ex.rebeca.prior.n_users == before  # nothing added by a refused fit
    uid, _ = ex.fit([], ["im2.jpg", "im3.jpg"], steps=2)  # only dislikes: allowed, and said what it means
    assert ex.note.startswith("only dislikes: ") and ex.rebeca.users[uid]["n_likes"] == 0
    uid, _ = ex.fit(["im0.jpg", "im0.jpg"], ["im2.jpg"], steps=2)  # a repeated click counts once
    assert ex.note == "" and ex.rebeca.users[uid]["n_ratings"] == 2
    assert ex.ver_ids[uid] == 5 and ex.verifier.n_users == 6  # a verifier row for each of the two fitted users
    grid = EX.Grid(uid, np.zeros((2, 4, 4, 3)), np.zeros(2), 0.0, True)
    with pytest.raises(ValueError, match=r"^feedback: rate at least one generated image$"):
        ex.feedback(grid, {})
    with pytest.raises(ValueError, match=r"^feedback: image 2 rated 1; rate images 0..1 with 1 \(like\) or 0"):
        ex.feedback(grid, {0: 1, 2: 1})
    with pytest.raises(ValueError, match=r"^feedback: image 0 rated 5; rate images 0..1"):
        ex.feedback(grid, {0: 5})


# ---- the history encoder, the row prior, choosing settings on seen users, the feedback loop (issue 25) -----------
from rebeca_utils.studies import new_users as NEW  # noqa: E402
from rebeca_utils.train import history_encoder as HE  # noqa: E402


@pytest.fixture(scope="module")
def encoder(trained):
    prior, sched = trained
    d = _data(range(4), 40, 11)
    return HE.train_encoder(prior, sched, d.img_emb, d.rating, d.user_id, steps=30, batch_users=4, seed=0,
                            checkpoints=(0, 30), progress=False)


def test_encoder_maps_a_planted_history_to_its_taste(trained, encoder):
    prior, sched = trained
    assert set(encoder.encoder.state_dict()) >= {"seen_taste", "seen_rows"}  # saved with it: no data needed later
    new = _data([2], 12, 5)  # a new user with user 2's taste, never in the encoder's training
    row = encoder.encoder.encode(new.img_emb, new.rating)
    hit = _taste_rate(NU.with_rows(prior, {4: row}), sched, 4, 2)
    null = _taste_rate(prior, sched, prior.null_user, 2)
    assert hit >= null + 0.5, (hit, null)
    assert set(encoder.at) == {0, 30} and len(encoder.losses) == 30


def test_train_encoder_changes_no_prior_weight_and_is_seeded(trained):
    prior, sched = trained
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    d = _data(range(4), 20, 12)
    a = HE.train_encoder(prior, sched, d.img_emb, d.rating, d.user_id, steps=5, batch_users=4, seed=3, progress=False)
    b = HE.train_encoder(prior, sched, d.img_emb, d.rating, d.user_id, steps=5, batch_users=4, seed=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())
    assert all(torch.equal(v, b.encoder.state_dict()[k]) for k, v in a.encoder.state_dict().items())
    assert prior.user_emb.weight.grad is None
    with pytest.raises(ValueError, match=r"users \[9\] have fewer than 2 ratings"):
        HE.train_encoder(prior, sched, d.img_emb[:21], d.rating[:21], torch.cat([d.user_id[:20], torch.tensor([9])]),
                         steps=1, progress=False)


def test_encoder_is_order_free_ignores_padding_and_leaves_itself_out(encoder):
    enc = encoder.encoder
    new = _data([1], 6, 6)
    row = enc.encode(new.img_emb, new.rating)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    torch.testing.assert_close(enc.encode(new.img_emb[perm], new.rating[perm]), row)
    pad = torch.cat([new.img_emb, 9 * torch.ones(2, 8)])[None]
    mask = torch.tensor([[True] * 6 + [False] * 2])
    torch.testing.assert_close(enc(pad, torch.cat([new.rating, torch.ones(2).long()])[None], mask)[0], row)
    own = _data([1], 6, 6)  # user 1's own history: leaving user 1 out changes the mix
    with torch.no_grad():
        out = enc(own.img_emb[None], own.rating[None], torch.ones(1, 6, dtype=torch.bool), torch.tensor([1]))
    assert not torch.allclose(out[0], row)
    with pytest.raises(ValueError, match="encode: 0 embeddings and 0 ratings"):
        enc.encode(torch.zeros(0, 8), torch.zeros(0))


def test_pipeline_saves_the_encoder_and_encodes_users(trained, encoder, tmp_path):
    pipe = _pipe(*trained)
    with pytest.raises(ValueError, match="encode_user\\(\\) needs a history encoder"):
        pipe.encode_user(torch.zeros(2, 8), torch.tensor([1, 0]))
    pipe.encoder = encoder.encoder
    new = _data([3], 10, 9)
    uid = pipe.encode_user(new.img_emb, new.rating)
    assert pipe.users[uid]["source"] == "encoder"
    refined = pipe.encode_user(new.img_emb, new.rating, refine_steps=5)
    assert pipe.users[refined]["source"] == "inversion" and pipe.users[refined]["init"] == "given"
    pipe.save_pretrained(tmp_path / "p")
    back = RebecaPipeline.from_pretrained(tmp_path / "p")
    assert torch.equal(back.encoder.encode(new.img_emb, new.rating), encoder.encoder.encode(new.img_emb, new.rating))
    assert torch.equal(back([uid], 3, seed=1), pipe([uid], 3, seed=1))
    assert RebecaPipeline.from_pretrained(tmp_path / "p").encoder is not None
    (tmp_path / "p" / "history_encoder").rename(tmp_path / "gone")
    assert RebecaPipeline.from_pretrained(tmp_path / "p").encoder is None  # optional: a pipeline without one loads


def test_row_prior_pulls_a_fit_to_the_population(trained):
    prior, sched = trained
    mu, prec = NU.row_prior(prior, range(4))
    w = prior.user_emb.weight.detach()[:4]
    torch.testing.assert_close(mu, w.mean(0))
    assert prec.shape == (32, 32) and torch.allclose(prec, prec.T, atol=1e-4)
    new = _data([2], 10, 4)
    free = NU.fit_user(prior, sched, new.img_emb, new.rating, init="null", steps=30, seed=0, checkpoints=(10, 30))
    pulled = NU.fit_user(prior, sched, new.img_emb, new.rating, init="null", steps=30, seed=0, gauss=(mu, prec),
                         gauss_weight=1e4)
    assert (pulled.row - mu).norm() < 0.5 * (free.row - mu).norm()
    assert set(free.at) == {10, 30} and torch.equal(free.at[30], free.row)
    with pytest.raises(ValueError, match="row_prior needs >= 2 trained users, got 1"):
        NU.row_prior(prior, [0])


def test_settings_are_chosen_by_validation_p1_then_loss():
    t = pd.DataFrame([dict(k=5, init=i, lr=0.1, gauss=0.0, steps=s, **{"P@1 val": p, "loss val": l})
                      for i, s, p, l in (("null", 10, 0.5, 0.3), ("mean", 10, 0.7, 0.4), ("mean", 20, 0.7, 0.2),
                                         ("null", 0, 0.9, 0.1), ("encoder", 10, 0.8, 0.1))])
    best = NEW.best_setting(t, ["null", "mean", "nearest"], 5)
    assert (best["init"], best["steps"]) == ("mean", 20)  # the init alone (steps 0) is not an inversion
    assert NEW.best_setting(t, ["encoder"], 5)["init"] == "encoder"
    with pytest.raises(ValueError, match=r"no selection rows for inits \['nearest'\] at k=5"):
        NEW.best_setting(t, ["nearest"], 5)
    per_k = {10: "ten", 0: "all"}
    assert [NEW.setting_for(per_k, s) for s in (1, 5, 50, 0)] == ["ten", "ten", "ten", "all"]
    assert NEW.setting_for({5: "five", 50: "fifty", 0: "all"}, 20) == "fifty"


def test_seen_users_split_once_and_for_good():
    enc, sel = NEW.split_seen(range(20), 0.2, seed=0)
    assert len(sel) == 4 and not set(enc) & set(sel) and sorted(enc + sel) == list(range(20))
    assert NEW.split_seen(range(20), 0.2, seed=0) == (enc, sel) and NEW.split_seen(range(20), 0.2, seed=1) != (enc, sel)


def test_paired_tests_find_a_planted_difference():
    rng = np.random.default_rng(0)
    rows = [dict(user_id=u, method=m, history=5, draw=0, metric="v", value=base + (0.2 if m == "a" else 0))
            for u, base in enumerate(rng.uniform(0, 1, 10)) for m in ("a", "b")]
    t = NEW.paired_tests(pd.DataFrame(rows), "v", 5, "a", ["a", "b"], n_permutations=999)
    assert t["diff"].item() == pytest.approx(0.2) and t["workers"].item() == 10
    assert t["p_value"].item() <= 0.01  # every worker +0.2: 2 of 1024 sign patterns are as extreme
    same = NEW.paired_tests(pd.DataFrame([{**r, "value": r["value"] - (0.2 if r["method"] == "a" else 0)}
                                          for r in rows]), "v", 5, "a", ["b"])
    assert same["diff"].item() == pytest.approx(0.0) and same["p_value"].item() == 1.0


def test_feedback_adds_answers_to_the_history_and_updates_only_the_live_user(trained):
    pipe = _pipe(*trained)
    [uid] = pipe.add_users(pipe.prior.user_emb.weight[pipe.null_user].detach()[None], source="given")
    seen = []

    def answer(x, r, arm):  # likes every image near taste 2
        seen.append((r, arm))
        liked = (x @ CENTERS.T).argmax(1) == 2
        return liked.numpy(), x, {"hits": float(liked.float().mean())}

    new = _data([2], 6, 10)
    t = NEW.feedback_loop(pipe, uid, new.img_emb, new.rating.numpy(), answer, rounds=2, per_round=4, steps=20,
                          seed=0)
    assert list(zip(t["round"], t["arm"])) == [(0, "feedback"), (0, "no feedback"), (1, "feedback"),
                                              (1, "no feedback"), (2, "feedback"), (2, "no feedback")]
    assert seen == [(0, "feedback"), (1, "feedback"), (1, "no feedback"), (2, "feedback"), (2, "no feedback")]
    assert t.iloc[0]["hits"] == t.iloc[1]["hits"]  # round 0: one user, one set of images
    assert torch.equal(pipe.prior.user_emb.weight[uid], pipe.prior.user_emb.weight[pipe.null_user])  # pipe as it was


def test_a_fit_starts_from_the_nearest_seen_user_by_liked_embeddings(trained):
    pipe = _pipe(*trained)
    means = CENTERS  # seen user u likes images near CENTERS[u]
    new = _data([2], 12, 13)
    start = NEW.start_row(pipe, "nearest", new.img_emb, new.rating.numpy().astype(bool), means=means)
    assert torch.equal(start, pipe.prior.user_emb.weight[2])  # user 2 has this taste
    assert NEW.start_row(pipe, "null", new.img_emb, new.rating.numpy()) == "null"  # fit_user's own init
    with pytest.raises(ValueError, match="a 'nearest' init needs the seen users' liked embeddings"):
        NEW.start_row(pipe, "nearest", new.img_emb, new.rating.numpy().astype(bool))
