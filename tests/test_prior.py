"""The REBECA prior (App D), its training loop and both samplers."""
import pytest
import torch

from rebeca_utils.config import DiffusionConfig, PriorConfig, TrainConfig
from rebeca_utils.models.prior import RebecaPrior, count_parameters
from rebeca_utils.pipeline.rebeca import RebecaPipeline
from rebeca_utils.pipeline.sampling import (
    make_sampler,
    sample_prior,
    sample_seed,
)
from rebeca_utils.train.diffusion import (
    Triplets,
    diffusion_target,
    epoch_indices,
    make_scheduler,
    train_prior,
)

TINY = dict(emb_dim=16, n_tokens=4, hidden_dim=16, n_heads=2, n_layers=2, n_users=4, n_ratings=2)


def tiny(**kw):
    torch.manual_seed(0)
    return RebecaPrior(**{**TINY, **kw})


def test_paper_configuration_has_4_4m_parameters():
    m = RebecaPrior.from_config(PriorConfig())  # App E.2: d=1024, T=32, H=128, 8 heads, 6 layers, 210 users
    n = count_parameters(m)
    assert abs(n - 4.4e6) / 4.4e6 < 0.01, n
    x = torch.randn(3, 1024)
    out = m(x, torch.tensor([0, 500, 999]), torch.tensor([0, 209, 210]), torch.tensor([1, 0, 2]))
    assert out.shape == (3, 1024) and torch.isfinite(out).all()


def test_residual_paths_start_at_zero_and_switch_restores_reference_init():
    paper = tiny()
    for blk in paper.blocks:
        assert torch.all(blk.attn.out.weight == 0)
        assert torch.all(blk.cross_gate == 0) and torch.all(blk.ada[1].weight == 0)
    # every block is the identity at init: the output depends on the input only through tokenizer/merge
    x = torch.randn(2, 16)
    h = torch.randn(2, 4, 16)
    c, ctx = torch.randn(2, 16), torch.randn(2, 3, 16)
    assert torch.equal(paper.blocks[0](h, c, ctx), h)
    ref = tiny(zero_init_attn=False)
    assert ref.blocks[0].attn.out.weight.abs().sum() > 0
    assert not torch.equal(ref.blocks[0](h, c, ctx), h)
    assert paper(x, torch.tensor([3, 3]), torch.tensor([0, 1]), torch.tensor([1, 1])).shape == (2, 16)


def test_every_parameter_gets_a_gradient_from_zero_init():
    """No residual path may be dead: zero-initialised gates must still receive gradient (after one step, all do)."""
    m = tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, t, u, r = torch.randn(8, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 5, (8,)), torch.randint(0, 3, (8,))
    for _ in range(2):  # step 1 opens the gates, step 2 reaches what sits behind them
        opt.zero_grad()
        m(x, t, u, r).pow(2).mean().backward()
        opt.step()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def test_bad_shapes_are_refused():
    import pytest

    with pytest.raises(ValueError, match="emb_dim=10 must be divisible by n_tokens=4"):
        RebecaPrior(**{**TINY, "emb_dim": 10})


def test_save_pretrained_round_trip(tmp_path):
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # move off the zero init so the check is meaningful
    m.save_pretrained(tmp_path / "prior")
    assert (tmp_path / "prior" / "model.safetensors").exists() and (tmp_path / "prior" / "config.json").exists()
    m2 = RebecaPrior.from_pretrained(tmp_path / "prior")
    x, t, u, r = torch.randn(5, 16), torch.arange(5) * 100, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(m.eval()(x, t, u, r), m2.eval()(x, t, u, r))
    assert m2.n_users == 4 and m2.emb_dim == 16


def test_targets_per_objective():
    x0, noise, t = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([1, 10, 100, 999])
    for kind, expect in [("sample", x0), ("epsilon", noise)]:
        s = make_scheduler(DiffusionConfig(prediction_type=kind))
        assert torch.equal(diffusion_target(s, x0, noise, t), expect)
    s = make_scheduler(DiffusionConfig(prediction_type="v_prediction", beta_schedule="laplace"))
    a = s.alphas_cumprod[t].sqrt()[:, None]
    b = (1 - s.alphas_cumprod[t]).sqrt()[:, None]
    assert torch.allclose(diffusion_target(s, x0, noise, t), a * noise - b * x0, atol=1e-6)


def test_epoch_draws_samples_per_user_from_each_user():
    u = torch.tensor([2] * 5 + [0] * 50 + [1] * 3)
    data = Triplets(torch.randn(len(u), 4), u, torch.zeros(len(u), dtype=torch.long))
    idx = epoch_indices(data, 7, torch.Generator().manual_seed(0))
    assert len(idx) == 21
    assert torch.bincount(data.user_id[idx], minlength=3).tolist() == [7, 7, 7]


def test_triplets_refuse_nan():
    import pytest

    with pytest.raises(ValueError, match="NaN"):
        Triplets(torch.tensor([[float("nan")]]), torch.tensor([0]), torch.tensor([0]))


def _planted(n=600, d=16, seed=0):
    centers = torch.randn(4, 2, d, generator=torch.Generator().manual_seed(99)) * 2  # shared by train and val
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 4, (n,), generator=g)
    r = torch.randint(0, 2, (n,), generator=g)
    return Triplets(centers[u, r] + 0.1 * torch.randn(n, d, generator=g), u, r), centers


def test_training_learns_user_conditional_means_and_restores_best_state():
    data, centers = _planted()
    val, _ = _planted(200, seed=1)
    m = tiny()
    sched = make_scheduler(DiffusionConfig())
    cfg = TrainConfig(lr=3e-3, batch_size=64, samples_per_user=256, max_epochs=12, patience=12, p_uncond=0.1)
    res = train_prior(m, sched, data, val, cfg, seed=0, progress=False)
    losses = [h["val_loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.best_val_loss == min(losses)
    from rebeca_utils.train.diffusion import validation_loss
    assert abs(validation_loss(m, sched, val.to("cpu")) - res.best_val_loss) < 1e-6  # best state restored
    pipe = RebecaPipeline(m, sched, sampler="ddim", steps=25, users={u: {} for u in range(4)})
    x = pipe([0, 1, 2, 3], 16, rating=1, cfg_scale=1.0)
    # each user's samples are nearest to its own planted liked centre
    d = torch.cdist(x.mean(1), centers[:, 1])
    assert d.argmin(1).tolist() == [0, 1, 2, 3]


def test_early_stopping_stops():
    data, _ = _planted()
    m = tiny()
    cfg = TrainConfig(lr=0.0, samples_per_user=50, max_epochs=50, patience=2)  # lr 0: val loss never improves
    res = train_prior(m, make_scheduler(DiffusionConfig()), data, data, cfg, progress=False)
    assert res.stopped_early and res.epochs == 3 and res.best_epoch == 0


def test_cfg_dropout_rates():
    from rebeca_utils.train.diffusion import drop_conditioning

    m = tiny()
    u, r = torch.zeros(20000, dtype=torch.long), torch.ones(20000, dtype=torch.long)
    cfg = TrainConfig(p_uncond=0.1, p_drop_user=0.15, p_drop_rating=0.15)
    du, dr = drop_conditioning(u, r, m, cfg, torch.Generator().manual_seed(0))
    pu, pr = (du == m.null_user).float().mean(), (dr == m.null_rating).float().mean()
    both = ((du == m.null_user) & (dr == m.null_rating)).float().mean()
    assert abs(pu - (1 - 0.9 * 0.85)) < 0.015 and abs(pr - (1 - 0.9 * 0.85)) < 0.015
    assert abs(both - (0.1 + 0.9 * 0.15 * 0.15)) < 0.01


@pytest.mark.slow  # the 1000-step DDPM chain, several times
def test_samples_independent_of_batch_size_and_batch_mates():
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s = make_scheduler(DiffusionConfig())
    for sampler, steps in [("ddim", 10), ("dpmsolver", 10), ("ddpm", None)]:
        kw = dict(cfg_scale=3.0, sampler=sampler, steps=steps or 10, seed=7, progress=False)
        full = sample_prior(m, s, [0, 1, 2, 3, 1], [1, 1, 0, 1, 1], [0, 0, 0, 0, 5], batch_size=5, **kw)
        pieces = sample_prior(m, s, [0, 1, 2, 3, 1], [1, 1, 0, 1, 1], [0, 0, 0, 0, 5], batch_size=2, **kw)
        alone = sample_prior(m, s, [1], [1], [5], batch_size=1, **kw)
        assert torch.allclose(full, pieces, atol=1e-4), sampler
        assert torch.allclose(full[4], alone[0], atol=1e-4), sampler
        assert not torch.allclose(full[1], full[4])  # different sample index -> different sample
        again = sample_prior(m, s, [0, 1, 2, 3, 1], [1, 1, 0, 1, 1], [0, 0, 0, 0, 5], batch_size=5, **kw)
        assert torch.equal(full, again)
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_sampler_schedules():
    s = make_scheduler(DiffusionConfig())
    assert len(make_sampler(s, "ddpm", 1000).timesteps) == 1000
    fast = make_sampler(s, "ddim", 25)
    assert len(fast.timesteps) == 25 and int(fast.timesteps[0]) == 999
    assert torch.allclose(fast.alphas_cumprod, s.alphas_cumprod)
    import pytest

    with pytest.raises(ValueError, match="valid samplers are ddpm, ddim, dpmsolver"):
        make_sampler(s, "euler", 10)
