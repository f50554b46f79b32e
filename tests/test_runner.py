"""The headless runner: selection, parameters, failures, manifests."""
import json
import re
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


def _cli(nbdir, out, *args):
    with pytest.raises(SystemExit) as err:
        runner.main(["--profile", "smoke", "--notebooks-dir", str(nbdir), "--output-dir", str(out), *args])
    return err.value.code


TYPED = 'profile: str = "smoke"\noutput_dir: str = "out"\nseed: int = 0  # why: test\nsampler: str = "ddim"\nflag: bool = False'


@pytest.mark.parametrize("arg, msg", [
    ("seed=abc", "error: -p seed='abc': expected int, as a Python literal (01_a.ipynb parameters cell: seed: int = 0)"),
    ("seed=1.5", "error: -p seed=1.5: expected int, as a Python literal (01_a.ipynb parameters cell: seed: int = 0)"),
    ("flag=1", "error: -p flag=1: expected bool, as a Python literal (01_a.ipynb parameters cell: flag: bool = False)"),
    ("profile=demo", "error: -p profile='demo' conflicts with --profile smoke; choose the profile with --profile only"),
])
def test_bad_parameter_values_are_refused_before_anything_is_written(tmp_path, arg, msg):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_a.ipynb", "pass", params=TYPED)
    assert _cli(nbdir, tmp_path / "out", "-p", arg) == msg  # a str code: SystemExit exits 1 with it on stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_parameter_must_agree_with_the_option(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_a.ipynb", "pass", params=TYPED)
    out = tmp_path / "out"
    assert _cli(nbdir, out, "-p", "output_dir=elsewhere") == (
        f"error: -p output_dir='elsewhere' conflicts with --output-dir {out}; choose the output folder with "
        f"--output-dir only")
    assert not out.exists()


def test_a_bare_word_is_text_only_where_the_parameter_is_a_str():
    declared = {"sampler": ["str"], "name": ["str"], "seed": ["int"], "users": ["list"]}
    assert runner.parse_params(["sampler=ddpm", "name=3", "seed=3", "users=[1, 2]", "sampler2='x'"], declared) == {
        "sampler": "ddpm", "name": "3", "seed": 3, "users": [1, 2], "sampler2": "x"}
    assert runner.parse_params(["seed=abc"], declared) == {"seed": "abc"}  # refused by run_notebooks, with the type


@pytest.mark.slow  # executes a notebook
def test_a_dead_kernel_fails_like_any_cell(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_dead.ipynb", "import os\nos._exit(3)")
    with pytest.raises(SystemExit) as err:
        runner.run_notebooks("smoke", runner.discover(nbdir), {}, tmp_path / "out", log=lambda *a, **k: None)
    assert str(err.value) == ("FAILED 01_dead.ipynb, cell [3]:\n    import os\n    os._exit(3)\nDeadKernelError: the "
                              "kernel died while running this cell (os._exit, out of memory, or killed by a signal)")


BARS = """
import json, time
from rebeca_utils.progress import tqdm
for _ in tqdm(range(40), desc="train prior"):
    time.sleep(0.05)
NAME = '01_bars'
""" + WRITE_MANIFEST + """
m = run.dir / "manifest.json"
man = json.loads(m.read_text())
man["skipped_images"] = [{"image": "a.jpg", "reason": "empty file"}, {"image": "b.jpg", "reason": "not an image"}]
m.write_text(json.dumps(man))
"""


@pytest.mark.slow  # executes a notebook
def test_progress_lines_saved_bars_and_summary(tmp_path, capfd):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_bars.ipynb", BARS)
    lines = []
    runner.run_notebooks("smoke", runner.discover(nbdir), {}, tmp_path / "out", log=lambda *a, **k: lines.append(a[0]))
    assert lines[0] == "[1/1] 01_bars (smoke) ..."
    cells = [re.sub(r", \d+ s$", ", N s", x) for x in lines if " cell " in x]
    assert cells == ["    [01] cell 1/3, N s", "    [01] cell 2/3, N s", "    [01] cell 3/3, N s"]  # with the injected one
    bars = [x for x in lines if "train prior" in x]
    assert bars[-1].startswith("    [01] train prior: 100%") and "40/40" in bars[-1] and len(bars) <= 3
    assert re.fullmatch(r"\[1/1\] 01_bars ok in [\d.]+ s, peak RSS [\d,]+ MB \(2 unreadable images skipped; see "
                        r"manifest\) -> .*", lines[-1])
    assert "without encryption" not in capfd.readouterr().err
    saved = nbformat.read(tmp_path / "out/smoke/notebooks/01_bars.ipynb", as_version=4)
    stderr = [o.text for c in saved.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert len(stderr) == 1 and "40/40" in stderr[0] and not re.search(r"(?<!\d)0/40", stderr[0]) and "\r" not in stderr[0]
