"""`make bench --paper-stages`: every stage of `make paper` timed through the paper-profile builders and priced."""
import tempfile
from pathlib import Path

import pytest

from rebeca_utils import bench
from rebeca_utils.bench_price import CI_NOTE, Row, counts, lookup, rows
from rebeca_utils.config import get_profile

COLUMNS = ["stage", "count", "unit", "s per unit", "h on 1 GPU", "h on 3 GPUs", "peak GB", "based on"]


def _table(out: str) -> dict[str, dict[str, str]]:
    """The printed Markdown pricing table: stage -> column -> cell."""
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]
    return {c[0]: dict(zip(header, c)) for c in cells}


def _num(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix(" (one process)"))


def test_counts_are_the_paper_profiles():
    c = counts(get_profile("paper"))
    assert (c["users"], c["gen04"], c["ablation"], c["ablation_04"]) == (173, 17_300, 57_090, 6_920)
    assert (c["lora_r"], c["lora_steps"], c["shared_steps"], c["tokens"]) == (128, 2_500, 10_000, 40_988 * 192)
    # the null user once per worker, the other five methods per history (k ∈ {1, 5, 10, 20, 50} × 3 draws + all)
    assert c["gen12"] == 37 * (16 * 5 + 1) * 10 and c["feedback12"] == 37 * (1 + 2 * 3) * 4


def test_hours_divide_by_gpus_only_where_the_work_splits():
    split = Row("decode", 17_300, "image", "", "decode_b8", unit_s=0.9)
    single = Row("prior", 300, "epoch", "", "prior_epoch", split=False, unit_s=6.0)
    assert split.hours(1) == 17_300 * 0.9 / 3600 and split.hours(4) == 17_300 * 0.9 / 3600 / 4
    assert single.hours(4) == single.hours(1) == 0.5
    assert Row("x", 5, "image", "", "y").hours(2) is None


def test_a_batch_size_not_measured_takes_the_nearest_measured_one():
    measured = {"decode_b1": {"unit_s": 2.0}, "decode_b4": {"unit_s": 1.0}, "vlm_b1": {"unit_s": 0.1}}
    assert lookup(measured, "decode_b8") == ("decode_b4", {"unit_s": 1.0})
    assert lookup(measured, "decode_b1")[0] == "decode_b1"
    assert lookup(measured, "lora_r128") == (None, {})


def test_gpus_below_one_is_refused(capfd):
    assert bench.main(["--paper-stages", "--gpus", "0"]) == 2
    assert "--gpus 0: must be >= 1" in capfd.readouterr().err


@pytest.mark.slow
def test_paper_stages_run_end_to_end_in_the_ci_shape_and_price_every_stage(capfd):
    before = set(Path(tempfile.gettempdir()).glob("rebeca-bench-*"))
    rc = bench.main(["--paper-stages", "--quick", "--gpus", "3", "--shape", "ci", "--device", "cpu"])
    out = capfd.readouterr().out
    assert rc == 0, out
    assert f"make paper priced per stage ({CI_NOTE}; machine: CPU" in out
    assert "load average" in out and "torch threads" in out
    table = _table(out)
    stages = [r.stage for r in rows(get_profile("paper"))]
    assert list(table) == stages + [f"**total** ({len(stages)} of {len(stages)} stages measured)"]
    for stage in stages:  # every stage measured through its builder; no GPU memory on a CPU
        assert table[stage]["s per unit"] != "–" and table[stage]["peak GB"] == "–", table[stage]
    assert "verifier training] 1 epoch(s) of 2,000 rows" in out  # each stage prints what it ran
    dec = table["04 decoding (IP-Adapter)"]
    assert _num(dec["count"]) == 17_300 and dec["based on"].endswith("[rate of batch 1]")
    one = _num(dec["count"]) * _num(dec["s per unit"]) / 3600
    assert _num(dec["h on 1 GPU"]) == pytest.approx(one, rel=1e-2)
    assert _num(dec["h on 3 GPUs"]) == pytest.approx(one / 3, rel=1e-2)
    prior = table["03 prior training"]
    assert prior["h on 3 GPUs"] == prior["h on 1 GPU"] + " (one process)"
    abl = table["09 ablation decoding"]
    assert _num(abl["count"]) == 57_090 - 6_920 and "57,090" in abl["based on"] and "6,920" in abl["based on"]
    assert set(Path(tempfile.gettempdir()).glob("rebeca-bench-*")) == before  # the ci cache is gone
