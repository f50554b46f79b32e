"""Notebook 00's data check: which datasets are optional, and what decides that the paper profile is ready."""
import pandas as pd

from rebeca_utils.config import get_profile
from rebeca_utils.data import synthetic as SYN
from rebeca_utils.data.dsprites import DSPRITES_FILENAME
from rebeca_utils.models.weights import paper_weights
from rebeca_utils.notebook import setup_check as SC

PAPER = get_profile("paper").models


def _weights(in_cache: bool) -> pd.DataFrame:
    """The weights table as 00 shows it, every entry cached (or none): the weights are not what is tested here."""
    return pd.DataFrame([{"weights": e.label, "in_cache": in_cache} for e in paper_weights(PAPER)])


def test_absent_dsprites_is_optional_and_never_blocks_the_paper_profile(tmp_path):
    SYN.write_synthetic_flickr(tmp_path / "FLICKR-AES", n_workers=4, n_images=30, image_size=16, ratings_per_image=4)
    datasets = SC.datasets_report(tmp_path)
    assert datasets[["dataset", "optional", "present", "valid"]].values.tolist() == [
        ["dSprites", True, False, False], ["FLICKR-AES", False, True, True]]
    assert SC.blockers(_weights(True), datasets) == []
    assert SC.readiness("paper", PAPER, _weights(True), datasets) == (
        "paper profile: ready; every weight is in the Hugging Face cache and every required dataset is valid. "
        "dSprites: optional, absent: notebook 01 renders the same factor grid procedurally.")
    assert SC.readiness("paper", PAPER, _weights(False), datasets).startswith(
        f"paper profile: not ready; {len(_weights(False))} of {len(_weights(False))} weights are not cached (")


def test_present_but_invalid_dsprites_or_absent_flickr_blocks(tmp_path):
    (tmp_path / "dsprites").mkdir()
    (tmp_path / "dsprites" / DSPRITES_FILENAME).write_bytes(b"not an npz")  # 01 would read it and fail
    datasets = SC.datasets_report(tmp_path)
    assert datasets[["dataset", "optional", "present", "valid"]].values.tolist() == [
        ["dSprites", True, True, False], ["FLICKR-AES", False, False, False]]
    assert SC.readiness("paper", PAPER, _weights(True), datasets) == (
        "paper profile: not ready; dataset(s) dSprites, FLICKR-AES missing or invalid: see README 'Data' and the "
        "notes below.")
