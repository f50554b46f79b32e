"""Headless runner: execute the numbered notebooks in order with papermill on the `rebeca` kernel.

python -m rebeca_utils.run --profile smoke [--only 01 03] [--from 02] [--to 05] [-p key=value ...]
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from pathlib import Path

import papermill
from jupyter_client.kernelspec import KernelSpecManager
from papermill.exceptions import PapermillExecutionError

from .config import PROFILES
from .notebook.runs import NOTEBOOKS_ENV, notebooks_dir, parameter_names

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


def parse_params(items: list[str]) -> dict:
    """key=value pairs; values are Python literals where they parse, strings otherwise."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"error: -p {item!r}: expected key=value with a Python identifier as key")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def check_kernel(kernel: str) -> None:
    """Fail fast when the kit's Jupyter kernel is not registered."""

    if kernel not in KernelSpecManager().find_kernel_specs():
        raise SystemExit(f"error: Jupyter kernel {kernel!r} is not installed; run `make install` "
                         f"(it registers it with: python -m ipykernel install --sys-prefix --name {kernel})")


def _failure(nb: Path, err: Exception) -> str:
    cell = getattr(err, "exec_count", None)
    src = (getattr(err, "source", "") or "").strip().splitlines()
    head = "\n    ".join(src[:6]) + ("\n    ..." if len(src) > 6 else "")
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    return f"FAILED {nb.name}, cell [{cell}]:\n    {head}\n{ename}: {evalue}"


def run_notebooks(profile: str, nbs: list[Path], params: dict, output_dir: Path, kernel: str = KERNEL,
                  log=print) -> list[dict]:
    """Execute notebooks in order; stop at the first failure (SystemExit with the failing cell)."""

    if profile not in PROFILES:
        raise SystemExit(f"error: unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    declared = {nb: set(parameter_names(nb)) for nb in nbs}
    known = set().union(*declared.values()) if declared else set()
    unknown = sorted(set(params) - known)
    if unknown:
        raise SystemExit(f"error: unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(sorted(known))}")
    check_kernel(kernel)
    output_dir = Path(output_dir).resolve()
    executed = output_dir / profile / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    results = []
    for i, nb in enumerate(nbs, 1):
        p = {"profile": profile, "output_dir": str(output_dir)}
        p.update({k: v for k, v in params.items() if k in declared[nb]})
        t0 = time.perf_counter()
        log(f"[{i}/{len(nbs)}] {nb.stem} ({profile}) ...", flush=True)
        try:
            papermill.execute_notebook(str(nb), str(executed / nb.name), parameters=p, kernel_name=kernel,
                                       cwd=str(nb.parent), progress_bar=False, log_output=False)
        except PapermillExecutionError as err:
            raise SystemExit(_failure(nb, err)) from None
        manifest = output_dir / profile / nb.stem / "manifest.json"
        if not manifest.exists():
            raise SystemExit(f"FAILED {nb.name}: it ran but wrote no manifest at {manifest}")
        dt = time.perf_counter() - t0
        log(f"[{i}/{len(nbs)}] {nb.stem} ok in {dt:.1f} s -> {executed / nb.name}", flush=True)
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
    t0 = time.perf_counter()
    run_notebooks(a.profile, nbs, parse_params(a.param), Path(a.output_dir), a.kernel)
    print(f"all {len(nbs)} notebook(s) ok in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
