"""A real browser: `make lab`'s JupyterLab runs notebook 00 on the kit's kernel with Run All."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import ROOT, lab_server, needs_browser, open_notebook, run_all


def git_repo(path: Path) -> None:
    """`path` as a clone would be: notebooks/ and .gitattributes committed, then `make install`'s git filter."""
    shutil.copytree(ROOT / "notebooks", path / "notebooks")
    shutil.copy(ROOT / ".gitattributes", path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "clone"]):
        subprocess.run(git + args, cwd=path, check=True)
    subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "git-filter", f"PY={sys.executable}"], cwd=path,
                   check=True)


def _git(path: Path, *args) -> str:
    return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def lab(tmp_path):
    """`make lab`'s command in a git copy of notebooks/ (Lab saves there), on a free port, without a browser."""
    git_repo(tmp_path)
    with lab_server(tmp_path) as url:
        yield url, tmp_path


@pytest.mark.slow  # starts JupyterLab, a kernel and a browser (about 30 s)
@needs_browser
def test_run_all_of_notebook_00_in_jupyterlab(lab):
    from playwright import (
        sync_api,  # optional (the `test` extra): needs_browser says when it is missing
    )

    url, root = lab
    with sync_api.sync_playwright() as p:
        browser, page = open_notebook(p, url, "notebooks/00_setup.ipynb")
        run_all(page)
        last = page.locator(".jp-Notebook .jp-CodeCell").last
        sync_api.expect(last.locator(".jp-OutputArea-output")).to_contain_text("00_setup", timeout=180_000)
        errors = page.locator(".jp-Notebook [data-mime-type='application/vnd.jupyter.stderr']", has_text="Error")
        assert errors.count() == 0, errors.all_inner_texts()
        # save, and wait for the file itself: on a busy machine the dirty mark can clear before the write lands,
        # or a keypress can be lost, so press again every 5 s until the outputs are on disk (60 s at most)
        nb_file = root / "notebooks" / "00_setup.ipynb"
        for _ in range(12):
            page.keyboard.press("Control+s")
            deadline = time.monotonic() + 5
            while '"output_type"' not in nb_file.read_text() and time.monotonic() < deadline:
                time.sleep(0.25)
            if '"output_type"' in nb_file.read_text():
                break
        sync_api.expect(page.locator(".jp-NotebookPanel .jp-mod-dirty")).to_have_count(0, timeout=30_000)
        browser.close()
    assert (root / "outputs" / "smoke" / "00_setup" / "manifest.json").is_file()
    saved = (root / "notebooks" / "00_setup.ipynb").read_text()
    assert '"output_type"' in saved  # Lab saved the outputs into the tracked file
    assert _git(root, "diff") == ""  # the filter strips what Lab saved; git status would trust the new file size,
    _git(root, "add", "-u")  # so refresh the index: nothing is staged
    assert _git(root, "status", "--porcelain", "--untracked-files=no") == "" and _git(root, "diff", "--cached") == ""
