"""The registry of steps (rebeca_utils/steps.py) against the notebooks, and no notebook folder name spelled out
anywhere else in the kit."""
import ast
import json
import re
from pathlib import Path

import pytest

from rebeca_utils import steps
from rebeca_utils.run import discover

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rebeca_utils"
NOTEBOOKS = discover(ROOT / "notebooks")
# file (under rebeca_utils/) -> why its string constants may spell a folder out; docstrings may always, as prose
ALLOWED: dict[str, str] = {}


def _cells(nb: Path, kind: str) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == kind]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, scopes) and ast.get_docstring(n) is not None}


def _strings(path: Path):
    """(line, text) of every string constant in `path` but its docstrings (f-strings' literal parts included)."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip:
            yield n.lineno, n.value


def _folder_names(paths, folders, base: Path) -> list[str]:
    """'file:line: text' (file relative to `base`) for each string constant that names one of `folders`."""
    pattern = re.compile("|".join(map(re.escape, folders)))
    return [f"{p.relative_to(base)}:{line}: {text!r}" for p in paths for line, text in _strings(p)
            if pattern.search(text)]


def test_the_registry_is_the_notebooks_in_order():
    assert [s.folder for s in steps.STEPS] == [p.stem for p in NOTEBOOKS]
    assert [s.number for s in steps.STEPS] == list(range(len(steps.STEPS)))  # step(nn) indexes by number


@pytest.mark.parametrize("s", steps.STEPS, ids=lambda s: s.folder)
def test_each_title_is_its_notebooks_heading(s):
    heading = _cells(ROOT / "notebooks" / f"{s.folder}.ipynb", "markdown")[0].splitlines()[0]
    assert heading.startswith(f"# {s.nn} · {s.title}"), f"{s.folder}: heading {heading!r}, registry {s.title!r}"


def test_each_output_is_named_in_the_notebooks_or_the_kit():
    """A renamed or misspelt output: a figure saved by savefig(fig, "fig9_...") is named without its .png."""
    code = "\n".join(src for nb in NOTEBOOKS for src in _cells(nb, "code"))
    kit = {text for p in PKG.rglob("*.py") for _, text in _strings(p)}
    unnamed = [f"{s.folder}: {a}" for s in steps.STEPS for a in s.produces
               if a not in kit and a.removesuffix(".png") not in code and a not in code]
    assert not unnamed, f"outputs named nowhere: {unnamed}"


def test_the_helpers():
    assert steps.folder(3) == steps.folder("03") == "03_train_prior"
    assert steps.redo(3) == "rerun notebook 03 (03_train_prior)"
    assert steps.path("out/smoke", 2, "embeddings", "decoder") == Path("out/smoke/02_embed_flickr/embeddings/decoder")
    assert steps.producers("generation_manifest.csv") == ("04_generate_images", "06_lora_baselines", "07_vlm_personas")
    for bad in (14, -1, "3a"):
        with pytest.raises(KeyError, match="no notebook numbered .*; the steps are 00-13"):
            steps.step(bad)


def test_no_folder_name_is_spelt_out_in_the_kit():
    """Folder names come from steps.py; a docstring may name one as prose."""
    paths = sorted(p for p in PKG.rglob("*.py") if p.name != "steps.py")
    found = [f for f in _folder_names(paths, [s.folder for s in steps.STEPS], PKG) if f.split(":")[0] not in ALLOWED]
    assert not found, "name the folder through rebeca_utils.steps (folder, path, redo):\n" + "\n".join(found)


def test_the_folder_check_catches_a_spelt_out_name(tmp_path):
    (tmp_path / "pkg").mkdir()
    planted = tmp_path / "pkg" / "m.py"
    planted.write_text('"""Reads 03_train_prior/pipeline (prose)."""\n\n\ndef f(root, n):\n'
                       '    """As notebook 03 saves it."""\n    return root / f"03_train_prior/{n}", "rerun 03"\n')
    assert _folder_names([planted], ["03_train_prior"], tmp_path) == ["pkg/m.py:6: '03_train_prior/'"]
