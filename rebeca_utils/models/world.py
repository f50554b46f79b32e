"""The smoke world: the tiny stand-ins trained once on the synthetic FLICKR-AES images, cached, loaded by the builders.

With random weights the tiny decoder draws noise that the tiny verifier maps to one point, so nothing after
generation carries signal on a laptop. `ensure_world` trains the decoder- and verifier-space encoders, the VAE and
the UNet + IP-Adapter on the fixture's images (world_recipe.py) and the tiny builders load them with the paper's
calls (`from_pretrained`, open_clip's `pretrained=` file, `pipe.load_ip_adapter`) when
`models.tiny_weights == "pretrained"` (the smoke and demo default).

Everything lives in `<world root>/<world id>/`, the root being $REBECA_SMOKE_WORLD or `<kit cache>/smoke_world`; the
id hashes the fixture parameters, the architecture configs, the recipe and the seed. Each component is built in a
temp folder and renamed into place with its `done.json` (seconds, threads, load, metrics), so a killed run resumes
with the finished ones skipped; a component whose inputs (another component's files) changed is retrained. One
process trains at a time (a lock file); others wait and reuse its result.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import open_clip
import torch

from ..config import FlickrConfig, ModelsConfig, get_profile
from ..data.flickr import image_names
from ..data.synthetic import write_synthetic_flickr
from ..io import remove_orphans, write_json
from ..progress import tqdm
from ..runtime import kit_cache_dir
from .decoder import tiny_text_config, tiny_unet_config, tiny_vae_config
from .encoders import tiny_clip_name, tiny_image_encoder_config
from .weights import quiet_libraries
from .world_recipe import RECIPE, TRAINERS, steps

WORLD_ENV = "REBECA_SMOKE_WORLD"  # where worlds are kept (tests point it at one folder for the whole session)
DONE_NAME = "done.json"
TINY_WEIGHTS = ("pretrained", "random")
COMPONENTS = tuple(TRAINERS)
DEPENDS = {"decoder": ("decoder_encoder", "vae")}  # the UNet learns from the VAE's latents and the encoder's space
# the fixture the world is trained on: the smoke/demo FlickrConfig's, at notebook 02's default seed
FIXTURE = {**{f.name: getattr(FlickrConfig(), f.name) for f in fields(FlickrConfig)
              if f.name in ("n_workers", "n_images", "image_size", "ratings_per_image")}, "seed": 0}


def pretrained(models: ModelsConfig) -> bool:
    """True when the tiny builder loads the smoke world (models.tiny_weights == 'pretrained')."""
    if models.tiny_weights not in TINY_WEIGHTS:
        raise ValueError(f"models.tiny_weights={models.tiny_weights!r}: valid values are {', '.join(TINY_WEIGHTS)}")
    return models.builder == "tiny" and models.tiny_weights == "pretrained"


def random_weights(models: ModelsConfig) -> ModelsConfig:
    """`models` with the seeded random stand-ins (what each trainer starts from)."""
    return replace(models, tiny_weights="random")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@functools.lru_cache(maxsize=None)
def world_spec(models: ModelsConfig) -> dict[str, Any]:
    """What determines the world: fixture parameters, architecture configs, recipe and seed."""
    enc = tiny_image_encoder_config(models).to_dict()
    enc.pop("transformers_version", None)
    arch = {"image_encoder": enc, "unet": tiny_unet_config(), "vae": tiny_vae_config(),
            "text_encoder": tiny_text_config(),
            "verifier_clip": open_clip.get_model_config(tiny_clip_name(models, "verifier"))}
    return _jsonable({"fixture": FIXTURE, "recipe": RECIPE, "seed": models.seed, "arch": arch,
                      "ip_adapter": [models.ip_adapter_subfolder, models.ip_adapter_weight]})


def world_id(models: ModelsConfig) -> str:
    """16 hex digits of the world's fingerprint."""
    return hashlib.sha256(json.dumps(world_spec(models), sort_keys=True).encode()).hexdigest()[:16]


def weights_tag(models: ModelsConfig) -> str:
    """'random' or 'pretrained-<world id>': which tiny weights made an embedding or image (part of fingerprints)."""
    return f"pretrained-{world_id(models)}" if pretrained(models) else "random"


def world_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """$REBECA_SMOKE_WORLD, else <cache_dir or kit cache>/smoke_world."""
    env = os.environ.get(WORLD_ENV)
    return Path(env).expanduser() if env else Path(cache_dir or kit_cache_dir()) / "smoke_world"


def world_dir(models: ModelsConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """<world root>/<world id>/ (may not exist yet; see ensure_world)."""
    return world_root(cache_dir) / world_id(models)


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


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != DONE_NAME:
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def _done(world: Path, name: str) -> dict | None:
    try:
        return json.loads((world / name / DONE_NAME).read_text())
    except (OSError, ValueError):
        return None


def _stale(world: Path, name: str) -> bool:
    """Missing, or trained on other files of a component it depends on."""
    rec = _done(world, name)
    if rec is None:
        return True
    return any((_done(world, d) or {}).get("digest") != rec.get("deps", {}).get(d) for d in DEPENDS.get(name, ()))


def _publish(tmp: Path, world: Path, name: str, record: dict) -> None:
    """Write done.json last, then rename the finished temp folder into place (replacing a stale one)."""
    write_json(tmp / DONE_NAME, {**record, "digest": _digest(tmp)})
    dst = world / name
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=world))
        os.replace(dst, old / "x")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, dst)


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


def world_ready(models: ModelsConfig, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when every component is trained and none is stale (ensure_world has nothing to do)."""
    world = world_dir(models, cache_dir)
    return not any(_stale(world, n) for n in COMPONENTS)


def ensure_world(models: ModelsConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Train whatever components of the world are missing or stale (one progress bar with ETA); its folder."""
    world = world_dir(models, cache_dir)
    if world_ready(models, cache_dir):
        return world
    with _locked(world.parent / f"{world.name}.lock"):
        todo = [n for n in COMPONENTS if _stale(world, n)]  # again: another process may have trained meanwhile
        if not todo:
            return world
        world.mkdir(parents=True, exist_ok=True)
        remove_orphans(world)  # under the lock, any temp folder is a killed run's
        write_json(world / "spec.json", world_spec(models))
        root = fixture_dir(cache_dir)
        train, held = world_split(models, cache_dir)
        rnd = random_weights(models)
        with tqdm(total=sum(steps(n) for n in todo), desc="smoke world (once)", unit="step", mininterval=5,
                  disable=not progress) as bar:  # redrawn every 5 s: a CI log keeps ~60 lines of it, not 300
            for name in COMPONENTS:
                if not _stale(world, name):  # done, or not stale now that its dependencies are rebuilt
                    continue
                bar.set_postfix_str(name)
                gen = torch.Generator().manual_seed(models.seed * 100 + COMPONENTS.index(name))
                tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=world))
                try:
                    t0 = time.perf_counter()
                    with quiet_libraries():  # the libraries' own bars and notes would bury the world's bar
                        metrics = TRAINERS[name](rnd, root, train, held, tmp, bar, gen, world)
                    deps = {d: _done(world, d)["digest"] for d in DEPENDS.get(name, ())}
                    _publish(tmp, world, name, {
                        "component": name, "seconds": round(time.perf_counter() - t0, 1), "steps": steps(name),
                        "metrics": metrics, "deps": deps, "threads": torch.get_num_threads(),
                        "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__})
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return world


def component_dir(models: ModelsConfig, name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of one trained component (training the world first if needed)."""
    if name not in COMPONENTS:
        raise ValueError(f"component={name!r}: valid components are {', '.join(COMPONENTS)}")
    return ensure_world(models, cache_dir) / name


def world_report(models: ModelsConfig, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Each finished component's done.json (seconds, threads, load, metrics); None where not trained yet."""
    world = world_dir(models, cache_dir)
    return {"world_id": world_id(models), "folder": str(world), **{n: _done(world, n) for n in COMPONENTS}}



def main(argv: list[str] | None = None) -> int:
    """`python -m rebeca_utils.models.world [--profile smoke]`: train (or find) the world, print what it took."""
    parser = argparse.ArgumentParser(prog="python -m rebeca_utils.models.world", description=main.__doc__)
    parser.add_argument("--profile", default="smoke", help="a profile with the tiny builder (smoke or demo)")
    models = get_profile(parser.parse_args(argv).profile).models
    if models.builder != "tiny":
        parser.error(f"--profile: the {models.builder!r} builder loads the paper's weights; no world to train")
    t0 = time.perf_counter()
    world = ensure_world(models)
    print(f"smoke world {world} ready in {time.perf_counter() - t0:.0f} s "
          f"(torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f})")
    for name, rec in world_report(models).items():
        if isinstance(rec, dict):
            print(f"  {name}: trained in {rec['seconds']} s with {rec['threads']} thread(s) at load "
                  f"{rec['load_avg'][0]}; {json.dumps(rec['metrics'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
