"""`make rehearse` in its `ci` size: notebooks 00 -> 13 in the paper profile on random weights of the paper's
architectures (published interfaces, cut depth) in a Hub-layout cache, offline, on a micro FLICKR-AES."""
import json

import pandas as pd
import pytest

from rebeca_utils import rehearse as R
from rebeca_utils.config import ModelsConfig
from rebeca_utils.models import weights as W


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One ci rehearsal for the module; its ~1 GB cache is removed afterwards (CI's disk is tight)."""
    import shutil

    work = tmp_path_factory.mktemp("rehearse")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "REBECA_AESTHETIC_HEAD"):
            mp.delenv(key, raising=False)
        rows = R.rehearse(work, "ci", log=lambda *a, **k: None)
        yield work, rows
    shutil.rmtree(work / "hub-ci", ignore_errors=True)


@pytest.mark.slow
def test_every_notebook_runs_in_the_paper_profile(rehearsal):
    work, rows = rehearsal
    assert [r["notebook"][:2] for r in rows] == [f"{i:02d}" for i in range(14)]
    table = R.check(work, rows)
    assert all(r["peak_rss_mb"] > 100 and r["cpu_time_s"] > 0 for r in table.values())


@pytest.mark.slow
def test_the_rehearsal_loaded_the_paper_ids_from_its_cache(rehearsal):
    work, _ = rehearsal
    models = ModelsConfig()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(work / "hub-ci"))
        from huggingface_hub import constants

        mp.setattr(constants, "HF_HUB_CACHE", str(work / "hub-ci"))
        assert all(W.weights_in_cache(e) for e in W.paper_weights(models) if not e.url)
    manifest = json.loads((work / "outputs" / "paper" / "04_generate_images" / "manifest.json").read_text())
    assert manifest["config"]["models"]["builder"] == "hub"
    assert manifest["config"]["models"]["sd_id"] == models.sd_id


@pytest.mark.slow
def test_table2_has_every_method_and_the_report_is_built(rehearsal):
    work, rows = rehearsal
    run = work / "outputs" / "paper"
    table2 = pd.read_csv(run / "08_evaluate_methods" / "table2_paper.csv", header=[0, 1, 2], index_col=0)
    ours = table2.xs("ours", axis=1, level=2).dropna(how="all")
    for want in R.TABLE2_METHODS:
        assert any(str(m).startswith(want) for m in ours.index), (want, list(ours.index))
    assert (run / "11_make_figures" / "report.html").stat().st_size > 10_000
    # the check itself fails on a Table 2 that lost a method's row
    table2.drop(index=[m for m in table2.index if str(m).startswith("Shared LoRA")]).to_csv(
        run / "08_evaluate_methods" / "table2_paper.csv")
    with pytest.raises(AssertionError, match="no measured row for \\['Shared LoRA'\\]"):
        R.check(work, rows)


def test_px_sets_the_image_size_and_leaves_the_shared_overrides_alone(tmp_path):
    assert "generation.height" not in R.params(tmp_path, set())["overrides"]  # the paper's 512² by default
    p = R.params(tmp_path, {"tag_limit"}, px=256)
    assert p["overrides"]["generation.height"] == p["overrides"]["generation.width"] == 256 and p["tag_limit"] == 4
    assert "generation.height" not in R.OVERRIDES
