"""Headless runner: execute the numbered notebooks in order with papermill on the `rebeca` kernel.

python -m rebeca_utils.run --profile smoke [--only 01 03] [--from 02] [--to 05] [-p key=value ...]
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import papermill
import zmq
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient.exceptions import DeadKernelError
from nbconvert.preprocessors import CoalesceStreamsPreprocessor
from papermill.engines import NBClientEngine, papermill_engines
from papermill.exceptions import PapermillExecutionError
from traitlets import Unicode

from .config import PROFILES
from .notebook.runs import NOTEBOOKS_ENV, notebooks_dir
from .progress import SESSION_ENV

KERNEL = "rebeca"

_NB = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")


def discover(notebooks_dir: Path) -> list[Path]:
    """Numbered notebooks NN_name.ipynb, in order."""
    return sorted(p for p in Path(notebooks_dir).glob("*.ipynb") if _NB.match(p.name))


def select(nbs: list[Path], only=None, start=None, stop=None) -> list[Path]:
    """Filter by number: --only wins; otherwise the inclusive range [--from, --to]."""
    nums = {p.name[:2] for p in nbs}
    for n in [*(only or []), start, stop]:
        if n is not None and n not in nums:
            raise SystemExit(f"error: no notebook numbered {n!r}; available: {', '.join(sorted(nums))}")
    if only:
        return [p for p in nbs if p.name[:2] in set(only)]
    return [p for p in nbs if (start is None or p.name[:2] >= start) and (stop is None or p.name[:2] <= stop)]


def parameter_types(nb: Path) -> dict[str, tuple[str, str]]:
    """Name -> (declared type, its line without the comment) for each assignment of the `parameters` cell."""
    for cell in json.loads(Path(nb).read_text())["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            out = {}
            for node in ast.parse(src).body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    out[node.target.id] = (ast.unparse(node.annotation), ast.get_source_segment(src, node))
                elif isinstance(node, ast.Assign):  # unannotated: the type of the default value
                    try:
                        kind = type(ast.literal_eval(node.value)).__name__
                    except (ValueError, TypeError, SyntaxError):  # not a literal: any value goes
                        kind = "object"
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            out[t.id] = (kind, ast.get_source_segment(src, node))
            return out
    raise SystemExit(f"error: {nb}: no cell tagged 'parameters'")


_CHECKS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool), "bool": lambda v: isinstance(v, bool),
           "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           "str": lambda v: isinstance(v, str), "list": lambda v: isinstance(v, list),
           "dict": lambda v: isinstance(v, dict), "tuple": lambda v: isinstance(v, tuple), "None": lambda v: v is None}


def fits(value, declared: str) -> bool:
    """Whether `value` matches a declared type such as `int` or `str | None` (other annotations are not checked)."""
    kinds = [k.strip() for k in declared.split("|")]
    return any(k not in _CHECKS for k in kinds) or any(_CHECKS[k](value) for k in kinds)


def parse_params(items: list[str], declared: dict[str, list[str]] | None = None) -> dict:
    """key=value pairs; values are Python literals, or the text itself where the parameter is declared `str`.

    `declared` maps a name to its declared types in the selected notebooks: `-p sampler=ddpm` and
    `-p output_name=3` give the strings "ddpm" and "3" for a `str` parameter; elsewhere a value that is not a
    literal stays text and run_notebooks() refuses it with the expected type."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"error: -p {item!r}: expected key=value with a Python identifier as key")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        kinds = (declared or {}).get(key, [])
        if kinds and not any(fits(value, k) for k in kinds) and any(fits(raw, k) for k in kinds):
            value = raw
        out[key] = value
    return out


def check_kernel(kernel: str) -> None:
    """Fail fast when the kit's Jupyter kernel is not registered."""

    if kernel not in KernelSpecManager().find_kernel_specs():
        raise SystemExit(f"error: Jupyter kernel {kernel!r} is not installed; run `make install` "
                         f"(it registers it with: python -m ipykernel install --sys-prefix --name {kernel})")


def check_params(profile: str, output_dir: Path, params: dict, declared: dict[Path, dict]) -> None:
    """Refuse unknown names, values of the wrong type, and -p profile / output_dir that contradict the options."""
    known = set().union(*declared.values()) if declared else set()
    unknown = sorted(set(params) - known)
    if unknown:
        raise SystemExit(f"error: unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(sorted(known))}")
    if params.get("profile", profile) != profile:
        raise SystemExit(f"error: -p profile={params['profile']!r} conflicts with --profile {profile}; "
                         f"choose the profile with --profile only")
    if "output_dir" in params and Path(str(params["output_dir"])).resolve() != output_dir:
        raise SystemExit(f"error: -p output_dir={params['output_dir']!r} conflicts with --output-dir {output_dir}; "
                         f"choose the output folder with --output-dir only")
    for nb, types in declared.items():
        for key, value in params.items():
            if key in types and not fits(value, types[key][0]):
                raise SystemExit(f"error: -p {key}={value!r}: expected {types[key][0]}, as a Python literal "
                                 f"({nb.name} parameters cell: {types[key][1]})")


def _failure(nb: Path, err: Exception, cell=None, count=None) -> str:
    """The failing notebook, the cell's number and first lines, and the error, for a cell error or a dead kernel."""
    count = getattr(err, "exec_count", count)
    src = (getattr(err, "source", "") or (cell or {}).get("source", "")).strip().splitlines()
    head = "\n    ".join(src[:6]) + ("\n    ..." if len(src) > 6 else "")
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    if isinstance(err, DeadKernelError):
        evalue = "the kernel died while running this cell (os._exit, out of memory, or killed by a signal)"
    return f"FAILED {nb.name}, cell [{count}]:\n    {head}\n{ename}: {evalue}"


class Progress:
    """Prints the running code cell (k/n, elapsed) and the notebook's tqdm bars: a line per cell or per few seconds."""

    def __init__(self, label: str, log=print, every: float = 5.0):
        self.label, self.log, self.every = label, log, every
        self.n, self.k, self.cell, self.t0, self.shown, self.bar = 0, 0, None, time.perf_counter(), 0.0, None
        self.last = None

    def start_cell(self, cell) -> None:
        """A cell starts: report code cells, after the last state of the previous cell's bar if not yet shown."""
        if cell.cell_type != "code":
            return
        self.show_bar()
        self.k, self.cell = self.k + 1, cell
        self.log(f"    [{self.label}] cell {self.k}/{self.n}, {time.perf_counter() - self.t0:.0f} s", flush=True)

    def write(self, text: str) -> None:
        """The kernel's stderr: keep the latest tqdm state, print it at most every `every` seconds."""
        for part in re.split(r"[\r\n]", text):
            if _BAR.search(part):
                self.bar = part.strip()
        if self.bar and time.perf_counter() - self.shown >= self.every:
            self.show_bar()

    def flush(self) -> None:
        """File protocol (papermill flushes after each write)."""

    def show_bar(self) -> None:
        """Print the latest bar state not printed yet."""
        if self.bar and self.bar != self.last:  # tqdm redraws the final state when it closes
            self.log(f"    [{self.label}] {self.bar}", flush=True)
            self.last = self.bar
            self.bar, self.shown = None, time.perf_counter()


_BAR = re.compile(r"\[(\d+:)?\d\d:\d\d")  # tqdm's `[elapsed<remaining, rate]` / `[elapsed, rate]`


class _EncryptedKernelManager(AsyncKernelManager):
    """CurveZMQ keys for the kernel, which otherwise warns on every start that it runs over TCP without encryption."""

    transport_encryption = Unicode("auto" if zmq.has("curve") else "disabled")


class _ProgressEngine(NBClientEngine):
    """papermill's nbclient engine, reporting each cell start to a Progress."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, *, progress: Progress, **kwargs):
        start = nb_man.cell_start
        progress.n = sum(c.cell_type == "code" for c in nb_man.nb.cells)  # with papermill's injected parameters

        def cell_start(cell, cell_index=None, **kw):
            progress.start_cell(cell)
            return start(cell, cell_index, **kw)

        nb_man.cell_start = cell_start
        return super().execute_managed_notebook(nb_man, kernel_name, kernel_manager_class=_EncryptedKernelManager,
                                                **kwargs)


papermill_engines.register("rebeca", _ProgressEngine)
# nbclient logs a dead kernel through papermill's logger before raising; the FAILED message says it in context
logging.getLogger("papermill").addFilter(lambda record: not record.getMessage().startswith("Kernel died"))


def _coalesce(path: Path) -> None:
    """Merge consecutive stream outputs and drop text bars' overwritten redraws (\\r), as JupyterLab displays them."""
    if path.exists():
        nb = nbformat.read(path, as_version=4)
        CoalesceStreamsPreprocessor().preprocess(nb, {})
        nbformat.write(nb, path)


def _summary(manifest: Path) -> str:
    """The kernel's peak RSS and what the notebook skipped (`skipped_images`), from its manifest, for the ok line."""
    m = json.loads(manifest.read_text())
    skipped = m.get("skipped_images") or []
    rss = f", peak RSS {m['peak_rss_mb']:,.0f} MB" if m.get("peak_rss_mb") else ""
    return rss + (f" ({len(skipped)} unreadable image{'s' * (len(skipped) != 1)} skipped; see manifest)" if skipped
                  else "")


def run_notebooks(profile: str, nbs: list[Path], params: dict, output_dir: Path, kernel: str = KERNEL,
                  log=print) -> list[dict]:
    """Execute notebooks in order; stop at the first failure (SystemExit with the failing cell)."""

    if profile not in PROFILES:
        raise SystemExit(f"error: unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    output_dir = Path(output_dir).resolve()
    declared = {nb: parameter_types(nb) for nb in nbs}
    check_params(profile, output_dir, params, declared)
    check_kernel(kernel)
    executed = output_dir / profile / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    # a runner started from a JupyterLab kernel would pass Lab's session on to its kernels, which would then draw
    # widget progress bars that the saved copies show at 0 % (rebeca_utils.progress)
    os.environ.pop(SESSION_ENV, None)
    results = []
    for i, nb in enumerate(nbs, 1):
        p = {"profile": profile, "output_dir": str(output_dir)}
        p.update({k: v for k, v in params.items() if k in declared[nb] and k not in p})
        t0 = time.perf_counter()
        log(f"[{i}/{len(nbs)}] {nb.stem} ({profile}) ...", flush=True)
        progress = Progress(nb.stem[:2], log)
        try:  # the saved copy is coalesced in `finally`, also for a failure, so it reads like Lab shows it
            papermill.execute_notebook(str(nb), str(executed / nb.name), parameters=p, kernel_name=kernel,
                                       cwd=str(nb.parent), progress_bar=False, log_output=False,
                                       stderr_file=progress, engine_name="rebeca", progress=progress)
        except PapermillExecutionError as err:
            raise SystemExit(_failure(nb, err)) from None
        except DeadKernelError as err:
            # a fresh kernel numbers its cells 1, 2, ... as it runs them: the k-th code cell is [k]
            raise SystemExit(_failure(nb, err, progress.cell, progress.k)) from None
        finally:
            _coalesce(executed / nb.name)
        progress.show_bar()
        manifest = output_dir / profile / nb.stem / "manifest.json"
        if not manifest.exists():
            raise SystemExit(f"FAILED {nb.name}: it ran but wrote no manifest at {manifest}")
        dt = time.perf_counter() - t0
        log(f"[{i}/{len(nbs)}] {nb.stem} ok in {dt:.1f} s{_summary(manifest)} -> {executed / nb.name}", flush=True)
        results.append({"notebook": nb.stem, "seconds": dt, "manifest": str(manifest)})
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m rebeca_utils.run`: select notebooks, run them in order, exit non-zero on the first failure."""
    ap = argparse.ArgumentParser(prog="python -m rebeca_utils.run", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--only", nargs="+", metavar="NN", help="run just these notebook numbers")
    ap.add_argument("--from", dest="start", metavar="NN", help="first notebook number (inclusive)")
    ap.add_argument("--to", dest="stop", metavar="NN", help="last notebook number (inclusive)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="notebook parameter, passed to every notebook that declares it")
    ap.add_argument("--output-dir", default="outputs", help="output root (default: ./outputs)")
    ap.add_argument("--notebooks-dir", help=f"default: ${NOTEBOOKS_ENV}, else ./notebooks")
    ap.add_argument("--kernel", default=KERNEL)
    a = ap.parse_args(argv)
    if a.profile not in PROFILES:
        ap.error(f"unknown profile {a.profile!r}; valid profiles: {', '.join(PROFILES)}")
    try:
        nb_dir = Path(a.notebooks_dir) if a.notebooks_dir else notebooks_dir()
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    nbs = select(discover(nb_dir), a.only, a.start, a.stop)
    if not nbs:
        raise SystemExit("error: no notebooks selected")
    declared: dict[str, list[str]] = {}
    for nb in nbs:
        for key, (kind, _) in parameter_types(nb).items():
            declared.setdefault(key, []).append(kind)
    t0 = time.perf_counter()
    run_notebooks(a.profile, nbs, parse_params(a.param, declared), Path(a.output_dir), a.kernel)
    print(f"all {len(nbs)} notebook(s) ok in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
