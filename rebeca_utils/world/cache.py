"""The smoke world's cache: trains the tiny stand-ins once (in order, resumable, one process at a time), keeps them.

Everything lives in `<world root>/<world id>/` (models/tiny_weights.py: the root is $REBECA_SMOKE_WORLD or
`<kit cache>/smoke_world`, the id hashes the fixture parameters, the architecture configs, the recipe and the seed).
Each component is built in a temp folder and renamed into place with its `done.json` (seconds, threads, load,
metrics), so a killed run resumes with the finished ones skipped; a component whose inputs (another component's
files) changed is retrained. One process trains at a time (a lock file); others wait and reuse its result. Every
run trains with WORLD_THREADS torch threads, whatever the machine, so the same id means the same weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..config import ModelsConfig
from ..data.flickr import image_names
from ..data.synthetic import write_synthetic_flickr
from ..io import atomic_dir, path_digest, remove_orphans, write_json
from ..models.tiny_weights import (
    COMPONENTS,
    DEPENDS,
    DONE_NAME,
    FIXTURE,
    RECIPE,
    read_done,
    stale,
    world_dir,
    world_id,
    world_ready,
    world_root,
    world_spec,
)
from ..models.weights import quiet_libraries
from ..progress import tqdm
from ..runtime import torch_threads
from .recipe import TRAINERS, steps

# torch threads of every training run: float sums split over threads round differently, and with 1 thread the VAE
# kept the planted hue in 0.825 of the held-out images against 0.9625 with 2 (README); the world id does not hold it
WORLD_THREADS = 2


def random_weights(models: ModelsConfig) -> ModelsConfig:
    """`models` with the seeded random stand-ins (what each trainer starts from)."""
    return replace(models, tiny_weights="random")


def fixture_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The synthetic FLICKR-AES the world trains on (written on first use, byte-identical to notebook 02's)."""
    key = hashlib.sha256(json.dumps(FIXTURE, sort_keys=True).encode()).hexdigest()[:12]
    return write_synthetic_flickr(world_root(cache_dir) / f"fixture-{key}", **FIXTURE)


def world_split(models: ModelsConfig, cache_dir: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """(training image names, held-out image names) of the fixture: a seeded permutation, the last n_heldout out."""
    names = image_names(fixture_dir(cache_dir))
    order = np.random.default_rng([models.seed, 15]).permutation(len(names))
    n = len(names) - RECIPE["n_heldout"]
    return sorted(names[i] for i in order[:n]), sorted(names[i] for i in order[n:])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX flock; elsewhere no lock): one process trains, the others wait."""
    try:
        import fcntl  # POSIX only; Windows runs without the lock
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train(models: ModelsConfig, name: str, world: Path, data: tuple, bar) -> None:
    """Train component `name` in a temp folder that takes its place with its done.json (a kill leaves only the temp)."""
    gen = torch.Generator().manual_seed(models.seed * 100 + COMPONENTS.index(name))
    with atomic_dir(world / name) as tmp:
        t0 = time.perf_counter()
        with quiet_libraries():  # the libraries' own bars and notes would bury the world's bar
            metrics = TRAINERS[name](random_weights(models), *data, tmp, bar, gen, world)
        deps = {d: read_done(world, d)["digest"] for d in DEPENDS.get(name, ())}
        write_json(tmp / DONE_NAME, {  # the digest of the files written before it: what dependents are keyed on
            "component": name, "seconds": round(time.perf_counter() - t0, 1), "steps": steps(name),
            "metrics": metrics, "deps": deps, "threads": torch.get_num_threads(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__, "digest": path_digest(tmp)})


def ensure_world(models: ModelsConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Train whatever components of the world are missing or stale (one progress bar with ETA); its folder."""
    world = world_dir(models, cache_dir)
    if world_ready(models, cache_dir):
        return world
    with _locked(world.parent / f"{world.name}.lock"):
        todo = [n for n in COMPONENTS if stale(world, n)]  # again: another process may have trained meanwhile
        if not todo:
            return world
        world.mkdir(parents=True, exist_ok=True)
        remove_orphans(world)  # under the lock, any temp folder is a killed run's
        write_json(world / "spec.json", world_spec(models))
        data = (fixture_dir(cache_dir), *world_split(models, cache_dir))  # (root, train names, held-out names)
        with tqdm(total=sum(steps(n) for n in todo), desc="smoke world (once)", unit="step", mininterval=5,
                  disable=not progress) as bar:  # redrawn every 5 s: a CI log keeps ~60 lines of it, not 300
            for name in COMPONENTS:
                if not stale(world, name):  # done, or not stale now that its dependencies are rebuilt
                    continue
                bar.set_postfix_str(name)
                with torch_threads(WORLD_THREADS):
                    _train(models, name, world, data, bar)
    return world


def world_report(models: ModelsConfig, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Each finished component's done.json (seconds, threads, load, metrics); None where not trained yet."""
    world = world_dir(models, cache_dir)
    return {"world_id": world_id(models), "folder": str(world), **{n: read_done(world, n) for n in COMPONENTS}}
