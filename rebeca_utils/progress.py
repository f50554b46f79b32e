"""Progress bars: widgets only in a live Jupyter frontend, text bars elsewhere (papermill, nbconvert, scripts).

A widget bar saved by papermill shows its first state (`0/40`) because no frontend ever renders its updates;
a text bar is plain stderr, so an executed copy reads `40/40`. Import `tqdm` from here, not from tqdm.auto.
"""
from __future__ import annotations

import os
import sys

from tqdm.std import tqdm as _text_tqdm

# Jupyter Server (JupyterLab, Notebook 7) sets this in the environment of the kernels it starts for a session;
# papermill and nbconvert start kernels through jupyter_client directly and never set it.
SESSION_ENV = "JPY_SESSION_NAME"


def interactive_frontend() -> bool:
    """True in a kernel started by a live frontend (Jupyter Server session, VS Code, Colab), else False."""
    shell = sys.modules["IPython"].get_ipython() if "ipykernel" in sys.modules else None
    if shell is None or not hasattr(shell, "kernel"):
        return False
    # VS Code starts kernels itself and sets __vsc_ipynb_file__ in the namespace; Colab has its own server
    return bool(os.environ.get(SESSION_ENV)) or "__vsc_ipynb_file__" in shell.user_ns or "google.colab" in sys.modules


class _TextBar(_text_tqdm):
    """tqdm's text bar, redrawn at most once a second: a saved notebook keeps every redraw of its stderr."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("mininterval", 1.0)
        super().__init__(*args, **kwargs)


def _pick():
    """The bar class for this process."""
    if interactive_frontend():
        import tqdm.notebook  # loads ipywidgets: only for a live frontend

        return tqdm.notebook.tqdm
    return _TextBar


tqdm = _pick()

__all__ = ["tqdm", "interactive_frontend"]
