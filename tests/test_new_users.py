"""User inversion (issue 16's foundation): a new user's row fitted on a frozen prior recovers a planted taste,
leaves every prior weight bit for bit, is seeded, and add_users keeps earlier users and round-trips."""
import numpy as np
import pytest
import torch

from rebeca_utils.config import DiffusionConfig, TrainConfig
from rebeca_utils.models.prior import RebecaPrior, load_prior, save_prior
from rebeca_utils.pipeline.sampling import sample_prior
from rebeca_utils.studies import new_users as NU
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
