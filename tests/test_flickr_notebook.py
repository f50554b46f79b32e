"""Notebook 02 in the paper profile on a micro FLICKR-AES in the real on-disk format (4 workers): the data side.

Tiny random encoders stand in for the Hub's (`models.builder`); everything else is the paper profile's."""
import json
from pathlib import Path

import pytest

from rebeca_utils import run as runner
from rebeca_utils.data import synthetic as SYN

NB = Path(__file__).resolve().parents[1] / "notebooks" / "02_embed_flickr.ipynb"
TINY = {"models.builder": "tiny", "models.tiny_weights": "random"}


def test_02_takes_overrides():
    kind, line = runner.parameter_types(NB)["overrides"]
    assert (kind, line) == ("dict", "overrides: dict = {}")


@pytest.mark.slow  # executes notebook 02 twice
def test_02_paper_profile_on_four_workers(tmp_path, kit_cache):
    SYN.write_synthetic_flickr(tmp_path / "data" / "FLICKR-AES", n_workers=4, n_images=30, image_size=16,
                               ratings_per_image=4)
    params = {"data_dir": str(tmp_path / "data"), "overrides": TINY}
    quiet = {"log": lambda *a, **k: None}
    with pytest.raises(SystemExit) as e:  # the paper's 37 hold-out workers: one line saying what to set
        runner.run_notebooks("paper", [NB], params, tmp_path / "out", **quiet)
    assert str(e.value).splitlines()[-1] == (
        "ValueError: 37 hold-out workers asked but only 4 worker(s) are eligible (>= 21 ratings: 10 test + 10 val + "
        "1 train); set flickr.n_holdout_workers to at most 4 (runner: -p 'overrides={\"flickr.n_holdout_workers\": 4}')")
    assert not (tmp_path / "out" / "paper" / "02_embed_flickr" / "flickr_splits.parquet").exists()
    params["overrides"] = {**TINY, "flickr.n_holdout_workers": 1}
    runner.run_notebooks("paper", [NB], params, tmp_path / "out", **quiet)
    m = json.loads((tmp_path / "out" / "paper" / "02_embed_flickr" / "manifest.json").read_text())
    assert m["config"]["flickr"]["n_holdout_workers"] == 1 and m["config"]["flickr"]["synthetic"] is False
    assert m["metrics"]["users"] == 4 and m["metrics"]["images"] == 30 and m["metrics"]["ratings"] == 120
    assert m["metrics"]["holdout_workers"] == 1 and m["metrics"]["split_sizes"] == {"train": 40, "test": 40, "val": 40}
    assert m["metrics"]["embedding_dims"] == {"decoder": 1024, "verifier": 1280}  # the paper's widths
    assert m["peak_rss_mb"] > 0 and m["cpu_time_s"] > 0
