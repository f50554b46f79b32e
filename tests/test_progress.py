"""Progress bars that tell the truth in saved notebooks: text bars unless a live frontend draws widgets."""
import re
from pathlib import Path

import nbformat
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_notebook

PKG = Path(__file__).resolve().parents[1] / "rebeca_utils"

LOOP = """
import os, time
from rebeca_utils.progress import interactive_frontend, tqdm
for _ in tqdm(range(40), desc="train prior"):
    time.sleep(0.02)
print("interactive:", interactive_frontend())
"""


def test_every_bar_comes_from_rebeca_utils_progress():
    offenders = [f"{p.relative_to(PKG)}: {line.strip()}" for p in PKG.rglob("*.py") if p.name != "progress.py"
                 for line in p.read_text().splitlines() if re.match(r"\s*(from tqdm|import tqdm)", line)]
    assert not offenders, offenders


@pytest.mark.slow  # executes a notebook
@pytest.mark.parametrize("session, widget", [(None, False), ("notebooks/03_train_prior.ipynb", True)])
def test_papermill_called_directly_saves_a_finished_text_bar(tmp_path, monkeypatch, session, widget):
    if session:  # what Jupyter Server puts in the environment of a kernel it starts for JupyterLab
        monkeypatch.setenv("JPY_SESSION_NAME", session)
    else:
        monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    nb = new_notebook(cells=[new_code_cell(LOOP)])
    nb.metadata["kernelspec"] = {"name": "rebeca", "display_name": "rebeca", "language": "python"}
    nbformat.write(nb, tmp_path / "in.ipynb")
    out = papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="rebeca",
                                     progress_bar=False)
    outputs = out.cells[0].outputs
    stdout = "".join(o.text for o in outputs if o.get("name") == "stdout")
    assert stdout == f"interactive: {widget}\n"
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    stderr = "".join(o.text for o in outputs if o.get("name") == "stderr")
    if widget:
        assert widgets and not stderr
    else:
        assert not widgets and stderr.rsplit("\r", 1)[-1].startswith("train prior: 100%|") and "40/40" in stderr
