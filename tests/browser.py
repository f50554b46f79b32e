"""What the real-browser tests share: Debian's Chromium driven by Playwright, and `make lab`'s JupyterLab."""
import contextlib
import importlib.util
import os
import re
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
needs_browser = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lab_server(root: Path):
    """`make lab`'s command with `root` as its folder, on a free port, without a browser: yields its URL."""
    cmd = subprocess.run(["make", "-s", "--no-print-directory", "lab-command", f"PY={sys.executable}"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.strip()
    port = _free_port()
    args = [*shlex.split(cmd), "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}", "--LabApp.news_url=", "--ServerApp.allow_root=True",
            # each server its own workspace: Lab otherwise restores the notebooks another test's server opened (the
            # default workspace lives in ~/.jupyter) and Run All can land on the wrong notebook
            f"--LabApp.workspaces_dir={root / '.lab-workspaces'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(root / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def open_notebook(p, url: str, path: str):
    """A Chromium page with notebook `path` open in Lab on the kit's kernel."""
    from playwright import (
        sync_api,  # optional (the `test` extra): needs_browser says when it is missing
    )

    # the browser cannot be downloaded here: Debian's chromium; --no-sandbox because CI runs as root
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/lab/tree/{path}?token={TOKEN}")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    kernel = page.locator(".jp-NotebookPanel-toolbar .jp-KernelName").first
    sync_api.expect(kernel).to_have_text("Python (rebeca kit)", timeout=60_000)
    return browser, page


def run_all(page, tries: int = 3) -> None:
    """Lab's Run > Run All Cells, again until the first code cell has started (a click before the session is ready is lost)."""
    from playwright import sync_api

    first = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first
    for attempt in range(tries):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:  # "[ ]:" until the kernel takes the cell, then "[*]:" or "[1]:"
            sync_api.expect(first).not_to_have_text(re.compile(r"^\[\s*\]:$"), timeout=30_000)
            return
        except AssertionError:
            page.keyboard.press("Escape")  # a menu left open by the lost click
            if attempt == tries - 1:
                raise


def pixels(img) -> str:
    """An <img>'s decoded pixels as a PNG data URL (ipywidgets serves images as blob: URLs, new at each render)."""
    return img.evaluate("""async e => {
        await e.decode();
        const c = document.createElement('canvas');
        c.width = e.naturalWidth; c.height = e.naturalHeight;
        c.getContext('2d').drawImage(e, 0, 0);
        return c.toDataURL('image/png');
    }""")
