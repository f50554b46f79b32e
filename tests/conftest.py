"""Every test runs offline: no model hub, no dataset host."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from rebeca_utils import runtime as RT
from rebeca_utils.models import weights as W


@pytest.fixture(scope="module")
def kit_cache(tmp_path_factory):
    """A private kit cache per test module, and one torch thread (two threads on a busy 2-core box crawl)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("rebeca_cache")
        mp.setenv(RT.CACHE_ENV, str(path))
        mp.delenv(W.AESTHETIC_HEAD_ENV, raising=False)
        yield path
    torch.set_num_threads(threads)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and an empty kit cache, offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(RT.CACHE_ENV, str(tmp_path / "kit"))
    return tmp_path / "hub"
