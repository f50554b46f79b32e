"""Install metadata: pyproject.toml and environment.yml list the same dependencies."""
import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    pip_lines, in_pip = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if re.match(r"^\s*- pip:\s*$", line):
            in_pip = True
            continue
        m = re.match(r"^\s{6,}- (.+?)\s*(#.*)?$", line)
        if in_pip and m:
            pip_lines.append(m.group(1))
    env = {_name(d) for d in pip_lines if not d.startswith("-e")}
    assert env == deps, f"only in pyproject: {sorted(deps - env)}; only in environment.yml: {sorted(env - deps)}"
    assert "-e ." in pip_lines


def test_every_third_party_import_is_a_declared_dependency():
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    dists = metadata.packages_distributions()  # import name -> distributions that provide it
    used = set()
    for path in (ROOT / "rebeca_utils").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                used.add(node.module.split(".")[0])
    third_party = {m for m in used - {"rebeca_utils"} if m not in sys.stdlib_module_names}
    undeclared = {m: dists.get(m) for m in third_party if not {_name(d) for d in dists.get(m, [m])} & deps}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_ci_calls_make_test_and_readme_names_it():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_make_report_runs_notebook_11_of_the_chosen_profile():
    import subprocess

    out = subprocess.run(["make", "-n", "report", "PROFILE=paper", f"STAMP={ROOT / 'pyproject.toml'}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "-m rebeca_utils.run --profile paper --only 11" in out
    assert "outputs/paper/11_make_figures/report.html" in out
    assert "make report" in (ROOT / "README.md").read_text()
