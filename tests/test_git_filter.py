"""Running a notebook (in Lab or anywhere) leaves nothing for git: `make install`'s nbstripout filter."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]


def _git(repo, *args):
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def clone(tmp_path):
    """A repository like a fresh clone after `make install`: tracked notebooks, .gitattributes, the filter."""
    for name in ("00_setup.ipynb", "06_lora_baselines.ipynb"):  # nbformat 4.4 without cell ids, 4.5 with them
        (tmp_path / "notebooks").mkdir(exist_ok=True)
        (tmp_path / "notebooks" / name).write_bytes((ROOT / "notebooks" / name).read_bytes())
    (tmp_path / ".gitattributes").write_bytes((ROOT / ".gitattributes").read_bytes())
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "clone")
    subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "git-filter", f"PY={sys.executable}"], cwd=tmp_path,
                   check=True)
    return tmp_path


def _run_like_lab(path: Path) -> None:
    """What a frontend saves after Run All: outputs, counts, the kernel's language_info, widget state."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"cell {i}\n"),
                        nbformat.v4.new_output("execute_result", data={"text/plain": "42"}, execution_count=i + 1)]
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.2", "mimetype": "text/x-python",
                                    "file_extension": ".py", "pygments_lexer": "ipython3",
                                    "codemirror_mode": {"name": "ipython", "version": 3},
                                    "nbconvert_exporter": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


@pytest.mark.slow  # git runs the filter, a Python process, per notebook and command (about 15 s)
def test_outputs_never_reach_git(clone):
    for name in ("00_setup.ipynb", "06_lora_baselines.ipynb"):
        _run_like_lab(clone / "notebooks" / name)
        assert '"output_type"' in (clone / "notebooks" / name).read_text()
    assert _git(clone, "diff") == ""
    # git status trusts a changed file size without reading it (the outputs made it bigger): `git add` refreshes
    # the index and stages nothing, and the working copy keeps its outputs
    _git(clone, "add", "-u")
    assert _git(clone, "status", "--porcelain") == "" and _git(clone, "diff", "--cached") == ""
    assert '"output_type"' in (clone / "notebooks" / "00_setup.ipynb").read_text()


def test_the_tracked_notebooks_are_already_stripped(clone):
    """Otherwise the filter itself would make a freshly cloned notebook differ from its commit."""
    clean = _git(clone, "config", "filter.nbstripout.clean").strip()
    nbs = " ".join(str(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb")))
    res = subprocess.run(f"{clean} --verify {nbs}", shell=True, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
