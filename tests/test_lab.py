"""A real browser: `make lab`'s JupyterLab runs notebook 00 on the kit's kernel with Run All."""
import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "rebeca-browser-test"
MISSING = ("no Chromium found (apt-get install chromium, or set CHROMIUM=path)" if CHROMIUM is None else
           "playwright is not installed (pip install -e '.[test]')" if importlib.util.find_spec("playwright") is None
           else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    cmd = subprocess.run(["make", "-s", "--no-print-directory", "lab-command", f"PY={sys.executable}"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.strip()
    port = _free_port()
    args = [*shlex.split(cmd), "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}", "--LabApp.news_url=", "--ServerApp.allow_root=True"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, tmp_path
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.mark.slow  # starts JupyterLab, a kernel and a browser (about 30 s)
@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
def test_run_all_of_notebook_00_in_jupyterlab(lab):
    from playwright import (
        sync_api,  # optional (the `test` extra): the skip above says when it is missing
    )

    url, root = lab
    with sync_api.sync_playwright() as p:
        # the browser cannot be downloaded here: Debian's chromium; --no-sandbox because CI runs as root
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{url}/lab/tree/notebooks/00_setup.ipynb?token={TOKEN}")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
        kernel = page.locator(".jp-NotebookPanel-toolbar .jp-KernelName").first
        sync_api.expect(kernel).to_have_text("Python (rebeca kit)", timeout=60_000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
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
