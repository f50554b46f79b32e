"""Profiles, overrides, device/dtype resolution and seeding."""
import dataclasses

import pytest
import torch

from rebeca_utils.config import PROFILES, get_profile
from rebeca_utils.runtime import resolve_device, resolve_dtype, seed_everything


def test_profiles_are_frozen_and_distinct():
    smoke, paper = get_profile("smoke"), get_profile("paper")
    with pytest.raises(dataclasses.FrozenInstanceError):
        smoke.train.lr = 1.0
    assert smoke.models.builder == "tiny" and paper.models.builder == "hub"
    assert (paper.prior.emb_dim, paper.prior.n_tokens, paper.prior.hidden_dim, paper.prior.n_heads,
            paper.prior.n_layers, paper.prior.n_users, paper.prior.n_ratings) == (1024, 32, 128, 8, 6, 210, 2)
    assert paper.diffusion.prediction_type == "sample" and paper.diffusion.beta_schedule == "squaredcos_cap_v2"
    assert (paper.train.lr, paper.train.batch_size, paper.train.samples_per_user) == (1e-4, 64, 100)
    assert set(PROFILES) == {"smoke", "demo", "paper"}


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'gpu'; valid profiles: smoke, demo, paper"):
        get_profile("gpu")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(KeyError) as err:
        get_profile("smoke", {"train.learning_rate": 1e-3})
    msg = str(err.value)
    assert "unknown parameter 'train.learning_rate'" in msg and "train.lr" in msg and "prior.n_layers" in msg


def test_overrides_apply_and_type_check():
    p = get_profile("smoke", {"train.max_epochs": 3, "train.lr": 1, "dsprites.ks": [1, 5]})
    assert p.train.max_epochs == 3 and p.train.lr == 1.0 and p.dsprites.ks == (1, 5)
    assert get_profile("smoke").train.max_epochs != 3  # the base profile is untouched
    with pytest.raises(TypeError, match="parameter 'train.max_epochs' expects int"):
        get_profile("smoke", {"train.max_epochs": "many"})
    with pytest.raises(KeyError, match=r"unknown parameter 'train.epochs'; valid parameters: .*train\.max_epochs"):
        get_profile("smoke", {"train.epochs": 3})


def test_resolve_device_and_dtype(monkeypatch):
    monkeypatch.delenv("REBECA_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"  # cuda > mps > cpu
    monkeypatch.setenv("REBECA_DEVICE", "cpu")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="valid devices are auto, cpu, cuda"):
        resolve_device("tpu")
    assert resolve_dtype("cpu") == torch.float32
    assert resolve_dtype("cuda") == torch.float16
    with pytest.raises(ValueError, match="dtype='fp16' needs a CUDA device"):
        resolve_dtype("cpu", "fp16")


def test_seed_everything_repeats():
    seed_everything(3)
    a = torch.randn(4)
    seed_everything(3)
    assert torch.equal(a, torch.randn(4))
