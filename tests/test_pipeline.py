"""RebecaPipeline: one object that samples, fits users, saves, loads (also in a fresh process) and pushes."""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rebeca_utils.config import get_profile
from rebeca_utils.io import CorruptFileError
from rebeca_utils.models.prior import RebecaPrior
from rebeca_utils.pipeline.rebeca import CONFIG_NAME, RebecaPipeline
from rebeca_utils.rehearse_hub import snapshot
from rebeca_utils.train.normalize import fit_normalizer

REPO = Path(__file__).resolve().parents[1]
SMOKE = get_profile("smoke")


def make_pipe(n_users: int = 6, trained=(0, 1, 2, 4), normalization: str = "standardize", seed: int = 0):
    """A seeded tiny prior (random weights, non-zero user rows) in a pipeline with a real normaliser."""
    torch.manual_seed(seed)
    prior = RebecaPrior.from_config(replace(SMOKE.prior, n_users=n_users))
    with torch.no_grad():  # AdaLN-Zero starts with every residual closed: open them so users differ
        for p in prior.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    norm = fit_normalizer(normalization, torch.randn(64, SMOKE.prior.emb_dim) * 3 + 1)
    card = {"data": {"flickr_splits.parquet": "abc123"}, "metrics": {"best_val_loss": 0.25},
            "decoder": {"sd": SMOKE.models.sd_id}}
    return RebecaPipeline.from_config(prior, SMOKE.diffusion, norm, trained_users=trained, card=card,
                                      new_users=SMOKE.new_users)


def test_samples_do_not_depend_on_the_batch_or_its_mates():
    pipe = make_pipe()
    both = pipe([0, 4], n=5, seed=3, cfg_scale=3.0)
    assert both.shape == (2, 5, SMOKE.prior.emb_dim)
    assert torch.equal(both[1], pipe([4], n=5, seed=3, cfg_scale=3.0)[0])  # without user 0 beside it
    assert torch.equal(both[1, :2], pipe([4], n=2, seed=3, cfg_scale=3.0)[0])  # fewer samples: the same first two
    assert not torch.equal(both[0], both[1])  # users differ
    assert not torch.equal(both, pipe([0, 4], n=5, seed=4, cfg_scale=3.0))  # seeds differ


def test_samples_are_in_the_decoders_space():
    pipe = make_pipe()
    x = pipe([1], n=3, seed=0)[0]
    raw = pipe.sample([1, 1, 1], [1, 1, 1], [0, 1, 2], seed=0)
    assert torch.equal(x, raw)
    z = pipe.normalizer.forward(x)  # the prior's space is the standardized one
    assert torch.allclose(pipe.normalizer.inverse(z), x, atol=1e-5) and not torch.allclose(z, x)


def test_unknown_users_are_refused_by_name():
    pipe = make_pipe()
    with pytest.raises(ValueError) as e:
        pipe([3], n=1)  # a hold-out slot: a row exists but was never trained
    assert str(e.value) == ("user_ids [3] are not users of this pipeline (it has 4: [0, 1, 2, 4]); add_users() or "
                            "fit_user() first")
    assert pipe([pipe.null_user], n=1).shape == (1, 1, SMOKE.prior.emb_dim)  # the null user is always there


def test_saved_pipeline_reloads_in_a_fresh_process_bit_identical(tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["README.md", "normalizer.json", "prior",
                                                                      CONFIG_NAME, "scheduler"]
    torch.save(pipe([0, 2, 4], n=4, seed=7), tmp_path / "here.pt")
    code = ("import sys, torch; from rebeca_utils.pipeline.rebeca import RebecaPipeline; "
            "p = RebecaPipeline.from_pretrained(sys.argv[1]); torch.save(p([0, 2, 4], n=4, seed=7), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe"), str(tmp_path / "there.pt")], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert torch.equal(torch.load(tmp_path / "here.pt"), torch.load(tmp_path / "there.pt"))
    again = RebecaPipeline.from_pretrained(tmp_path / "pipe")
    assert (again.sampler, again.steps, again.cfg_scale) == (SMOKE.diffusion.sampler, SMOKE.diffusion.sampler_steps,
                                                             SMOKE.new_users.cfg_scale)
    assert again.users == pipe.users and again.normalizer == pipe.normalizer


def test_fit_user_trains_one_row_and_survives_a_save(tmp_path):
    pipe = make_pipe()
    before = {k: v.clone() for k, v in pipe.prior.state_dict().items()}
    liked = pipe([0], n=6, seed=1)[0]
    me = pipe.fit_user(liked, torch.tensor([1, 1, 1, 0, 0, 0]), steps=5, seed=0)
    assert me == 6 and pipe.prior.null_user == 7  # appended after the 6 rows; the null row stays last
    assert pipe.users[me] == {"source": "inversion", "n_ratings": 6, "n_likes": 3, "init": "null", "steps": 5,
                              "seed": 0}
    after = pipe.prior.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "user_emb.weight")
    w0, w1 = before["user_emb.weight"], after["user_emb.weight"]
    assert torch.equal(w1[:6], w0[:6]) and torch.equal(w1[7], w0[6])  # old users and the null row unchanged
    mine = pipe([me], n=3, seed=0)
    pipe.save_pretrained(tmp_path / "p")
    again = RebecaPipeline.from_pretrained(tmp_path / "p")
    assert again.prior.n_users == 7 and json.loads((tmp_path / "p/prior/config.json").read_text())["n_users"] == 7
    assert torch.equal(again([me], n=3, seed=0), mine)


def test_update_user_moves_one_row_towards_new_ratings():
    pipe = make_pipe()
    old = pipe.prior.user_emb.weight.detach().clone()
    donor = pipe([4], n=8, seed=0)[0]
    fit = pipe.update_user(1, donor, torch.ones(8, dtype=torch.long), steps=5, seed=0)
    new = pipe.prior.user_emb.weight.detach()
    assert not torch.equal(new[1], old[1]) and torch.equal(new[1], fit.row)
    assert torch.equal(torch.cat([new[:1], new[2:]]), torch.cat([old[:1], old[2:]]))
    assert pipe.users[1] == {"source": "trained", "updates": 1}


def test_model_card_states_data_users_metrics_decoder_and_licenses(tmp_path):
    pipe = make_pipe()
    pipe.fit_user(pipe([0], n=4, seed=0)[0], torch.tensor([1, 1, 0, 0]), steps=2)
    card = pipe.save_pretrained(tmp_path / "p").joinpath("README.md").read_text()
    assert card.startswith("---\n") and "library_name: rebeca-kit" in card
    for line in ("- flickr_splits.parquet: `abc123`", "- 4 trained (0, 1, 2, 4); 1 inversion (6)",
                 "- null (unconditional) user: id 7", "- best_val_loss: 0.25", f"- sd: `{SMOKE.models.sd_id}`",
                 f"- sampler {SMOKE.diffusion.sampler}, {SMOKE.diffusion.sampler_steps} steps"):
        assert line in card, line
    assert "CreativeML OpenRAIL-M" in card and "FLICKR-AES" in card


def test_a_folder_that_is_not_a_pipeline_is_one_clear_line(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CorruptFileError) as e:
        RebecaPipeline.from_pretrained(tmp_path / "x")
    assert str(e.value) == f"{tmp_path / 'x' / CONFIG_NAME}: not found; {tmp_path / 'x'} is not a saved RebecaPipeline"
    make_pipe().save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    (tmp_path / "p" / CONFIG_NAME).write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(CorruptFileError, match=r"format_version 99, this kit reads 1$"):
        RebecaPipeline.from_pretrained(tmp_path / "p")


class LocalHub:
    """huggingface_hub's HfApi surface that push_to_hub uses, writing into a local Hub cache (no network): what
    `snapshot_download` finds offline afterwards."""

    def __init__(self, cache: Path):
        self.cache, self.repos = cache, {}

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.repos.setdefault(repo_id, private)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None):
        assert repo_id in self.repos, "create_repo first"
        snap = snapshot(self.cache, repo_id)
        shutil.copytree(folder_path, snap, dirs_exist_ok=True)
        return type("CommitInfo", (), {"oid": snap.name})()


def test_push_to_hub_then_anyone_loads_it_by_repo_id(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = make_pipe()
    hub = LocalHub(tmp_path / "hub")
    commit = pipe.push_to_hub("someone/rebeca-flickr", private=True, api=hub)
    assert hub.repos == {"someone/rebeca-flickr": True} and re.fullmatch(r"[0-9a-f]{40}", commit)
    loaded = RebecaPipeline.from_pretrained("someone/rebeca-flickr")
    assert torch.equal(loaded([0, 4], n=3, seed=2), pipe([0, 4], n=3, seed=2))


def readme_snippet() -> str:
    """The README's "Use REBECA from Python" code block, as written there."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Use REBECA from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch, smoke_world, kit_cache):
    make_pipe(n_users=24, trained=range(20)).save_pretrained(tmp_path / "outputs/smoke/03_train_prior/pipeline")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)
    images, mine, pipe = scope["images"], scope["mine"], scope["pipe"]
    size = (SMOKE.generation.width, SMOKE.generation.height)
    assert len(images) == len(mine) == 4 and all(im.size == size for im in images + mine)
    assert scope["me"] == 24 and pipe.users[24]["n_ratings"] == 4
    again = RebecaPipeline.from_pretrained(tmp_path / "my_rebeca")
    assert torch.equal(again([24], n=2, seed=0), pipe([24], n=2, seed=0))
