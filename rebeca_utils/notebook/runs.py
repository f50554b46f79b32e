"""Run folders and the per-notebook manifest.json."""
from __future__ import annotations

import ast
import json
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import as_dict, get_profile
from ..io import atomic_path, write_json
from ..runtime import seed_everything

PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "peft", "accelerate",
            "huggingface_hub", "numpy", "pandas", "scikit-learn", "umap-learn", "papermill")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


NOTEBOOKS_ENV = "REBECA_NOTEBOOKS"


@dataclass
class Run:
    """One notebook execution: its output folder, artifacts and manifest."""

    output_root: Path
    profile: str
    notebook: str
    seed: int
    params: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    artifacts: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.output_root / self.profile / self.notebook

    def path(self, name: str) -> Path:
        """Path of an artifact under the run folder, recorded for the manifest."""
        p = self.dir / name
        rel = str(p.relative_to(self.dir))
        if rel not in self.artifacts:
            self.artifacts.append(rel)
        return p

    def sibling(self, notebook: str) -> Path:
        """Output folder of another notebook of the same profile (e.g. splits from 02)."""
        return self.output_root / self.profile / notebook

    def savefig(self, fig, name: str, dpi: int = 150) -> list[Path]:
        """Save a figure as PNG and PDF under the run folder."""
        paths = []
        for ext in ("png", "pdf"):
            p = self.path(f"{name}.{ext}")
            with atomic_path(p) as tmp:
                fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
            paths.append(p)
        return paths

    def finish(self, metrics: dict, device: str, config: Any = None) -> Path:
        """Write manifest.json: the notebook's parameters, the resolved device, versions, seed, wall time, metrics."""
        manifest = {
            "notebook": self.notebook,
            "profile": self.profile,
            "parameters": self.params,
            "config": as_dict(config) if config is not None else None,
            "seed": self.seed,
            "device": device,
            "packages": package_versions(),
            "wall_time_s": round(time.perf_counter() - self.t0, 3),
            "metrics": metrics,
            "artifacts": sorted(self.artifacts),
        }
        return write_json(self.dir / "manifest.json", manifest)


def notebooks_dir() -> Path:
    """The notebooks folder: $REBECA_NOTEBOOKS, else ./notebooks (the repository root is the working folder)."""
    env = os.environ.get(NOTEBOOKS_ENV)
    path = Path(env).expanduser() if env else Path.cwd() / "notebooks"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: notebooks folder not found; run from the repository root, pass "
                                f"--notebooks-dir, or set {NOTEBOOKS_ENV}")
    return path


def parameter_names(nb: str | os.PathLike) -> list[str]:
    """Names assigned in the notebook's cell tagged `parameters`, in order."""
    cells = json.loads(Path(nb).read_text())["cells"]
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return [t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
    raise ValueError(f"{nb}: no cell tagged 'parameters'")


def start_run(notebook: str, namespace: dict[str, Any]) -> Run:
    """Create `<output_dir>/<profile>/<notebook>`, record the parameters cell's values, seed the global RNGs.

    `namespace` is the notebook's `globals()`: the names of its parameters cell are read from the notebook file
    (next to the kernel's working folder, else in notebooks_dir()), so each notebook lists them exactly once."""
    here = Path.cwd() / f"{notebook}.ipynb"
    names = parameter_names(here if here.is_file() else notebooks_dir() / f"{notebook}.ipynb")
    params = {k: namespace[k] for k in names}
    profile, seed = params["profile"], int(params.get("seed", 0))
    get_profile(profile)  # unknown profile -> error listing the valid ones, before anything is written
    run = Run(Path(params["output_dir"]).resolve(), profile, notebook, seed, params)
    run.dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    return run
