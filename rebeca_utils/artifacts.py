"""Run folders, atomic writes and the per-notebook manifest.json."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "peft", "accelerate",
            "huggingface_hub", "numpy", "pandas", "scikit-learn", "umap-learn", "papermill")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; it replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write pretty JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    return Path(path)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Run:
    """One notebook execution: its output folder, artifacts and manifest."""

    output_root: Path
    profile: str
    notebook: str
    seed: int
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

    def finish(self, parameters: dict, metrics: dict, device: str, config: Any = None) -> Path:
        """Write manifest.json: parameters, versions, device, seed, wall time, metrics, artifacts."""
        from .config import as_dict

        manifest = {
            "notebook": self.notebook,
            "profile": self.profile,
            "parameters": parameters,
            "config": as_dict(config) if config is not None else None,
            "seed": self.seed,
            "device": device,
            "packages": package_versions(),
            "wall_time_s": round(time.perf_counter() - self.t0, 3),
            "metrics": metrics,
            "artifacts": sorted(self.artifacts),
        }
        return write_json(self.dir / "manifest.json", manifest)


def start_run(output_dir: str | os.PathLike, profile: str, notebook: str, seed: int) -> Run:
    """Create the run folder `<output_dir>/<profile>/<notebook>` and seed the global RNGs."""
    from . import seed_everything
    from .config import get_profile

    get_profile(profile)  # unknown profile -> error listing the valid ones, before anything is written
    run = Run(Path(output_dir).resolve(), profile, notebook, seed)
    run.dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    return run
