"""The headless runner: selection, parameters, failures, manifests."""
import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from rebeca_utils import run as runner

ROOT = Path(__file__).resolve().parents[1]


def _nb(path, body, params='profile = "smoke"\noutput_dir = "out"\nseed = 0\nx: int = 1  # why: test'):
    nb = new_notebook()
    p = new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "rebeca", "display_name": "rebeca", "language": "python"}
    nbformat.write(nb, path)


WRITE_MANIFEST = """
from rebeca_utils.notebook.runs import start_run
run = start_run(NAME, globals())
run.finish(metrics={"x_squared": x * x}, device="cpu")
"""


def test_select_and_params():
    nbs = [ROOT / f"notebooks/{n}_a.ipynb" for n in ("00", "01", "02", "05")]
    assert [p.name[:2] for p in runner.select(nbs, only=["05", "01"])] == ["01", "05"]
    assert [p.name[:2] for p in runner.select(nbs, start="01", stop="02")] == ["01", "02"]
    with pytest.raises(SystemExit, match=r"no notebook numbered '07'; available: 00, 01, 02, 05"):
        runner.select(nbs, only=["07"])
    assert runner.parse_params(["a=3", "b=hello", "c=[1, 2]", "d=True"]) == {"a": 3, "b": "hello", "c": [1, 2], "d": True}
    with pytest.raises(SystemExit, match="expected key=value"):
        runner.parse_params(["novalue"])


@pytest.mark.slow  # executes notebooks
def test_runs_in_order_writes_executed_copies_and_manifests(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_first.ipynb", "NAME = '01_first'\n" + WRITE_MANIFEST)
    _nb(nbdir / "02_second.ipynb", "NAME = '02_second'\n" + WRITE_MANIFEST)
    lines = []
    res = runner.run_notebooks("smoke", runner.discover(nbdir), {"x": 7}, tmp_path / "out", log=lambda *a, **k: lines.append(a[0]))
    assert [r["notebook"] for r in res] == ["01_first", "02_second"]
    assert (tmp_path / "out/smoke/notebooks/02_second.ipynb").exists()
    man = json.loads((tmp_path / "out/smoke/01_first/manifest.json").read_text())
    assert man["metrics"] == {"x_squared": 49} and man["seed"] == 0 and man["packages"]["torch"]
    # the parameters cell is recorded once, with the runner's values, and the resolved device beside it
    assert man["parameters"] == {"profile": "smoke", "output_dir": str(tmp_path / "out"), "seed": 0, "x": 7}
    assert man["device"] == "cpu"
    assert sum("ok in" in line for line in lines) == 2


@pytest.mark.slow  # executes notebooks
def test_failure_names_notebook_cell_and_error(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_boom.ipynb", "raise ValueError('planted failure')")
    _nb(nbdir / "02_never.ipynb", "NAME = '02_never'\n" + WRITE_MANIFEST)
    with pytest.raises(SystemExit) as err:
        runner.run_notebooks("smoke", runner.discover(nbdir), {}, tmp_path / "out", log=lambda *a, **k: None)
    msg = str(err.value)
    assert "FAILED 01_boom.ipynb" in msg and "raise ValueError('planted failure')" in msg
    assert "ValueError: planted failure" in msg
    assert not (tmp_path / "out/smoke/02_never").exists()  # stopped at the first failure


@pytest.mark.slow  # executes notebooks
def test_missing_manifest_is_a_failure(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_silent.ipynb", "pass")
    with pytest.raises(SystemExit, match="it ran but wrote no manifest"):
        runner.run_notebooks("smoke", runner.discover(nbdir), {}, tmp_path / "out", log=lambda *a, **k: None)


def test_unknown_parameter_and_profile(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_a.ipynb", "pass")
    with pytest.raises(SystemExit, match=r"unknown parameter\(s\) nope; valid parameters: output_dir, profile, seed, x"):
        runner.run_notebooks("smoke", runner.discover(nbdir), {"nope": 1}, tmp_path)
    with pytest.raises(SystemExit, match="unknown profile 'big'"):
        runner.run_notebooks("big", runner.discover(nbdir), {}, tmp_path)


def test_cli_exit_code_on_bad_selection(capsys):
    with pytest.raises(SystemExit) as err:
        runner.main(["--profile", "smoke", "--only", "99"])
    assert "no notebook numbered '99'" in str(err.value)
