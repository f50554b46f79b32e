"""Every test runs offline: no model hub, no dataset host."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch thread in every process the tests start (notebook kernels, accelerate CLIs): `make test` runs two
# pytest workers on two cores, and two threads each on a busy 2-core box crawl
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

# one smoke world for the whole session (and later sessions of this checkout; every notebook kernel and CLI
# subprocess inherits it): the fingerprint in its folder name retrains it when recipe, configs or fixture change
os.environ.setdefault("REBECA_SMOKE_WORLD", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "smoke_world"))

import pytest

from rebeca_utils import runtime as RT
from rebeca_utils.models import weights as W


# The longest files first (each runs notebooks for minutes), so the two xdist workers start on them at once and the
# short tests fill in around them; the Makefile's --no-loadscope-reorder keeps this order (xdist would otherwise
# queue files by test count, which put these few-test files last, side by side, with a worker idle at the end).
LONGEST_FIRST = ("test_rehearsal.py", "test_notebooks.py", "test_notebook_dsprites.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def smoke_world():
    """The smoke profile's pretrained world (trained on first use with the world's own fixed thread count; other
    xdist workers wait for it)."""
    from rebeca_utils.config import get_profile
    from rebeca_utils.world import cache as world

    return world.ensure_world(get_profile("smoke").models)


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
