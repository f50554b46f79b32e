"""The house rules of rebeca_utils, checked by parsing its source: import direction, no import circles, top-level
imports, module size."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rebeca_utils"
# data -> models -> world (trains the tiny models) -> train -> pipeline -> baselines -> evaluate -> studies -> notebook;
# config, io, runtime, progress below all
STAGES = ["config", "steps", "io", "jobs", "runtime", "progress", "data", "models", "world", "train", "pipeline", "baselines",
          "evaluate", "studies", "notebook"]
OUTERMOST = {"run", "bench", "bench_price", "bench_stages", "rehearse", "rehearse_hub", "__init__", "__main__"}  # entry points: may import any stage
MODULES = sorted(p for p in PKG.rglob("*.py"))
MAX_LINES = 400


def _dotted(path: Path, pkg: Path = PKG) -> str:
    return ".".join(("rebeca_utils", *path.relative_to(pkg).with_suffix("").parts))


def _stage(dotted: str) -> int:
    head = dotted.split(".")[1] if "." in dotted else "__init__"
    return len(STAGES) if head in OUTERMOST else STAGES.index(head)


def _kit_imports(path: Path, pkg: Path = PKG):
    """(line, imported rebeca_utils module, inside a function?) for every import of the kit in `path`."""
    tree = ast.parse(path.read_text())
    here = _dotted(path, pkg).split(".")
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
                yield node.lineno, target if (pkg.parent / (target.replace(".", "/") + ".py")).exists() \
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


def _import_graph(paths, pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> the kit modules it imports, at the top or inside a function (a package counts as its __init__)."""
    def node(dotted: str) -> str:
        is_package = (pkg.parent / dotted.replace(".", "/") / "__init__.py").exists()
        return f"{dotted}.__init__" if is_package else dotted
    return {_dotted(p, pkg): {node(t) for _, t, _ in _kit_imports(p, pkg)} for p in paths}


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], else None (a depth-first search for a back edge)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            found = None if t in state else visit(t)
            if found:
                return found
        state[m] = "done"
        stack.pop()
        return None
    return next((c for m in sorted(graph) if m not in state for c in [visit(m)] if c), None)


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


def test_no_import_circles():
    """Not even through an import inside a function: stages only import earlier ones, and within a stage (or a
    subpackage) a lazy import back is a circle too (models/decoder.py once imported the smoke world that trains it)."""
    circle = _circle(_import_graph(MODULES))
    assert circle is None, f"import circle: {' -> '.join(circle)}; move what both need into a module below them"


def test_the_circle_check_catches_a_lazy_import_back(tmp_path):
    """The old layout in miniature: world.py imports decoder.py at the top, decoder.py imports world.py lazily."""
    models = tmp_path / "rebeca_utils" / "models"
    models.mkdir(parents=True)
    for name, text in {"__init__": "", "config": "",
                       "world": "from .decoder import tiny_unet_config\n",
                       "decoder": "from ..config import ModelsConfig\n\n\ndef load(models):\n"
                                  "    from .world import component_dir  # a cycle: world.py trains with these\n"}.items():
        (models.parent if name == "config" else models).joinpath(f"{name}.py").write_text(text)
    graph = _import_graph(sorted(tmp_path.rglob("*.py")), tmp_path / "rebeca_utils")
    assert _circle(graph) == ["rebeca_utils.models.decoder", "rebeca_utils.models.world", "rebeca_utils.models.decoder"]
    (models / "decoder.py").write_text("from ..config import ModelsConfig\n")  # the import back removed
    assert _circle(_import_graph(sorted(tmp_path.rglob("*.py")), tmp_path / "rebeca_utils")) is None


def test_the_direction_check_catches_a_backward_import(tmp_path, monkeypatch):
    bad = PKG / "data" / "_planted_backward_import.py"
    bad.write_text("from ..evaluate import retrieval\n")
    try:
        with pytest.raises(AssertionError, match="imports rebeca_utils.evaluate.retrieval"):
            test_imports_flow_from_data_to_figures(bad)
    finally:
        bad.unlink()
