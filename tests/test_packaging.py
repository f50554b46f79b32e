"""Install metadata: pyproject.toml and environment.yml list the same dependencies."""
import re
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


def test_required_dependencies_declared():
    deps = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    need = {"jupyterlab", "papermill", "ipykernel", "ipywidgets", "torch", "torchvision", "diffusers", "transformers",
            "open-clip-torch", "peft", "accelerate", "safetensors", "huggingface-hub", "seaborn", "umap-learn",
            "scikit-learn", "scipy", "pandas", "pyarrow", "tqdm", "pytest"}
    assert need <= deps, sorted(need - deps)


def test_ci_calls_make_test_and_readme_names_it():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
