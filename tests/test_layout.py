"""The house rules of rebeca_utils, checked by parsing its source: import direction, top-level imports, module size."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rebeca_utils"
# data -> models -> train -> pipeline -> baselines -> evaluate -> studies -> notebook; config, io, runtime, progress
# below all
STAGES = ["config", "io", "jobs", "runtime", "progress", "data", "models", "train", "pipeline", "baselines", "evaluate",
          "studies", "notebook"]
OUTERMOST = {"run", "bench", "bench_price", "bench_stages", "rehearse", "rehearse_hub", "__init__", "__main__"}  # entry points: may import any stage
MODULES = sorted(p for p in PKG.rglob("*.py"))
MAX_LINES = 400


def _dotted(path: Path) -> str:
    return ".".join(("rebeca_utils", *path.relative_to(PKG).with_suffix("").parts))


def _stage(dotted: str) -> int:
    head = dotted.split(".")[1] if "." in dotted else "__init__"
    return len(STAGES) if head in OUTERMOST else STAGES.index(head)


def _kit_imports(path: Path):
    """(line, imported rebeca_utils module, inside a function?) for every import of the kit in `path`."""
    tree = ast.parse(path.read_text())
    here = _dotted(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".")
            if base[0] != "rebeca_utils":
                continue
            for alias in node.names:  # `from .pkg import module` imports the module
                target = ".".join(base + [alias.name])
                yield node.lineno, target if (PKG.parent / (target.replace(".", "/") + ".py")).exists() \
                    else ".".join(base), id(node) in in_function
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rebeca_utils"):
                    yield node.lineno, alias.name, id(node) in in_function


def _entry_imports() -> dict[str, set[str]]:
    """Entry point -> the entry points it imports (two that import each other would be a circle)."""
    out = {}
    for path in MODULES:
        me = _dotted(path)
        if _stage(me) == len(STAGES):
            out[me] = {t for _, t, _ in _kit_imports(path) if _stage(t) == len(STAGES)}
    return out


ENTRY_IMPORTS = _entry_imports()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_flow_from_data_to_figures(path):
    me = _dotted(path)
    for line, target, _ in _kit_imports(path):
        ok = _stage(target) < _stage(me) or (_stage(target) == _stage(me) and me.count(".") > 1 and
                                              target.split(".")[1] == me.split(".")[1])
        if _stage(me) == _stage(target) == len(STAGES):  # an entry point may use another (rehearse runs run)
            ok = target not in ENTRY_IMPORTS.get(me, ()) or me not in ENTRY_IMPORTS.get(target, ())
        if _stage(me) < STAGES.index("data"):  # the base modules: config <- io <- runtime <- progress
            ok = _stage(target) < _stage(me)
        assert ok, f"{path.relative_to(PKG)}:{line} imports {target}: stages only import earlier stages"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_at_the_top_unless_a_comment_says_why(path):
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(f):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    assert "#" in lines[n.lineno - 1], (f"{path.relative_to(PKG)}:{n.lineno}: an import inside "
                                                        f"{f.name}() needs a comment saying why it is not at the top")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_modules_read_in_one_sitting(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG)} has {n} lines (> {MAX_LINES}): split it by concept"


def test_the_direction_check_catches_a_backward_import(tmp_path, monkeypatch):
    bad = PKG / "data" / "_planted_backward_import.py"
    bad.write_text("from ..evaluate import retrieval\n")
    try:
        with pytest.raises(AssertionError, match="imports rebeca_utils.evaluate.retrieval"):
            test_imports_flow_from_data_to_figures(bad)
    finally:
        bad.unlink()
