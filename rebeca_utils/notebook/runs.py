"""Run folders and the per-notebook manifest.json."""
from __future__ import annotations

import ast
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import as_dict, get_profile
from ..io import atomic_path, path_digest, write_json
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


def resource_usage() -> dict[str, Any]:
    """Peak resident memory (MB), CPU time (user + system, s) and torch's thread count of this process so far: for a
    notebook, its kernel (the runner starts one per notebook; in Lab, everything since the kernel's last restart)."""
    import torch  # every kernel has it loaded by now; imported here so that this module stays light

    r = resource.getrusage(resource.RUSAGE_SELF)
    kib = r.ru_maxrss / 1024 if sys.platform == "darwin" else r.ru_maxrss  # macOS counts bytes, Linux KiB
    return {"peak_rss_mb": round((own_peak_kib() or kib) / 1024, 1), "cpu_time_s": round(r.ru_utime + r.ru_stime, 3),
            "torch_threads": torch.get_num_threads(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def own_peak_kib(status: str = "/proc/self/status") -> float | None:
    """Linux: this process's own peak RSS (VmHWM, KiB). ru_maxrss is not enough there: a process started by
    fork + exec keeps its parent's peak (a runner that held 10 GB makes every kernel report 10 GB)."""
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


NOTEBOOKS_ENV = "REBECA_NOTEBOOKS"

MANIFEST = "manifest.json"


class PrerequisiteError(RuntimeError):
    """An output this notebook reads is missing or older than what it was made from; the message says what to run."""


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
    inputs: dict[str, str | None] = field(default_factory=dict)  # "<notebook>/<file>" -> its digest when read
    notebooks: list[str] = field(default_factory=list)  # the numbered notebooks next to this one, in order

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

    def command(self, *notebooks: str) -> str:
        """The runner command that (re)makes `notebooks` in this profile and output folder."""
        default = self.output_root == (Path.cwd().parent / "outputs").resolve()  # the kernel runs in notebooks/
        out = "" if default else f" --output-dir {self.output_root}"
        return f"python -m rebeca_utils.run --profile {self.profile}{out} --only {' '.join(n[:2] for n in notebooks)}"

    def require(self, *notebooks: str) -> None:
        """Check that each notebook has finished in this profile and read nothing that was remade since."""
        for nb in notebooks:
            m = _manifest(self.sibling(nb))
            if m is None:
                raise PrerequisiteError(f"{self.notebook} needs the outputs of {nb}, which has not finished in "
                                        f"{self.sibling(nb)}; run: {self.command(nb)}")
            for key, digest in (m.get("inputs") or {}).items():
                src, rel = key.split("/", 1)
                if digest is None or _manifest(self.sibling(src)) is None:  # its producer is gone: nothing to compare
                    continue
                if _artifact_digest(self.sibling(src), rel) != digest:
                    raise PrerequisiteError(f"{nb} is out of date: {src} has remade {rel} since {nb} read it; "
                                            f"run: {self.command(nb)}")

    def input(self, notebook: str, name: str) -> Path:
        """Path of an output of another notebook, recorded (with its digest) in this run's manifest."""
        path = self.sibling(notebook) / name
        if not path.exists():
            raise PrerequisiteError(f"{path} not found: {self.notebook} reads it from {notebook}; "
                                    f"run: {self.command(notebook)}")
        self.inputs[f"{notebook}/{name}"] = _artifact_digest(self.sibling(notebook), name)
        return path

    def savefig(self, fig, name: str, dpi: int = 150) -> None:
        """Save a figure as PNG and PDF under the run folder (returns nothing: a cell ending in it echoes no paths)."""
        for ext in ("png", "pdf"):
            with atomic_path(self.path(f"{name}.{ext}")) as tmp:
                fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)

    def finish(self, metrics: dict, device: str, config: Any = None,
               skipped_images: list[dict[str, str]] | None = None) -> None:
        """Write manifest.json (parameters, device, versions, seed, wall time, the kernel's peak RSS and CPU time,
        metrics, inputs read and digests of the artifacts, images skipped as unreadable) and print the closing line:
        where results are, what is next."""
        skipped = sorted(skipped_images or [], key=lambda r: r["image"])
        # a notebook that builds no model still records which models its profile names (provenance of its inputs)
        config = config if config is not None else get_profile(self.profile, self.params.get("overrides") or {})
        manifest = {
            "notebook": self.notebook,
            "profile": self.profile,
            "parameters": self.params,
            "config": as_dict(config),
            "seed": self.seed,
            "device": device,
            "packages": package_versions(),
            "wall_time_s": round(time.perf_counter() - self.t0, 3),
            **resource_usage(),
            "metrics": metrics,
            "inputs": dict(sorted(self.inputs.items())),
            "artifacts": sorted(self.artifacts),
            "digests": {a: path_digest(self.dir / a) for a in sorted(self.artifacts) if (self.dir / a).exists()},
            "skipped_images": skipped,
        }
        write_json(self.dir / MANIFEST, manifest)  # returns nothing: the closing cell echoes only the line below
        later = [n for n in self.notebooks if n > self.notebook]
        note = f"; {len(skipped)} unreadable image(s) skipped, listed in {MANIFEST}" if skipped else ""
        print(f"done: results in {self.dir}{note}; next: {later[0] if later else 'nothing, this is the last notebook'}")


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _artifact_digest(folder: Path, name: str) -> str | None:
    """Digest of a notebook's output as its manifest recorded it (hashed now when it recorded none)."""
    recorded = ((_manifest(folder) or {}).get("digests") or {}).get(name)
    return recorded if recorded is not None else path_digest(folder / name) if (folder / name).exists() else None


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


def start_run(notebook: str, namespace: dict[str, Any], requires: tuple[str, ...] = ()) -> Run:
    """Create `<output_dir>/<profile>/<notebook>`, record the parameters cell's values, seed the global RNGs.

    `namespace` is the notebook's `globals()`: the names of its parameters cell are read from the notebook file
    (next to the kernel's working folder, else in notebooks_dir()), so each notebook lists them exactly once.
    `requires`: notebooks whose outputs this one reads; each must have finished and be current (`Run.require`),
    checked before anything is written."""
    here = Path.cwd() / f"{notebook}.ipynb"
    nb_file = here if here.is_file() else notebooks_dir() / f"{notebook}.ipynb"
    names = parameter_names(nb_file)
    params = {k: namespace[k] for k in names}
    profile, seed = params["profile"], int(params.get("seed", 0))
    get_profile(profile)  # unknown profile -> error listing the valid ones, before anything is written
    siblings = sorted(p.stem for p in nb_file.parent.glob("[0-9][0-9]_*.ipynb"))
    run = Run(Path(params["output_dir"]).resolve(), profile, notebook, seed, params, notebooks=siblings)
    run.require(*requires)
    run.dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    return run
