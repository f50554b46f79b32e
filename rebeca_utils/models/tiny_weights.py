"""Where the tiny builders' trained weights (the smoke world) are: its key, its folders and their done records.

The world is trained by rebeca_utils.world, a stage above models; the builders only ask here where a component
is, and a missing world is trained through the trainer the package root sets in world_hook.py. The recipe's
numbers live here too, because the world's key hashes them and must be computed without the training code.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import open_clip

from ..config import FlickrConfig, ModelsConfig
from ..runtime import kit_cache_dir
from . import world_hook
from .architectures import (
    tiny_clip_name,
    tiny_image_encoder_config,
    tiny_text_config,
    tiny_unet_config,
    tiny_vae_config,
)
from .weights import MissingWeightsError

WORLD_ENV = "REBECA_SMOKE_WORLD"  # where worlds are kept (tests point it at one folder for the whole session)
DONE_NAME = "done.json"
TINY_WEIGHTS = ("pretrained", "random")
COMPONENTS = ("decoder_encoder", "verifier_encoder", "vae", "decoder")  # the training order
DEPENDS = {"decoder": ("decoder_encoder", "vae")}  # the UNet learns from the VAE's latents and the encoder's space
# the fixture the world is trained on: the smoke/demo FlickrConfig's, at notebook 02's default seed
FIXTURE = {**{f.name: getattr(FlickrConfig(), f.name) for f in fields(FlickrConfig)
              if f.name in ("n_workers", "n_images", "image_size", "ratings_per_image")}, "seed": 0}
# the recipe's numbers (rebeca_utils/world/recipe.py trains with them)
RECIPE = dict(
    version=3, n_heldout=80,  # held-out fixture images: no component trains on them (the round trip uses them)
    encoder=dict(steps=700, batch=64, lr=3e-3, warmup=30, weight_decay=0.05),  # layout is learnt late
    # random 32 px crops (the VAE is convolutional): 4x cheaper steps. Colour is learnt late: after 200 full-size
    # steps red, yellow and green still decode to one olive (seen at 3 seeds), after ~600 crop steps they separate
    vae=dict(steps=700, batch=8, crop=32, lr=3e-3, warmup=20, kl=1e-6),
    decoder=dict(steps=360, batch=32, lr=2e-3, warmup=30, p_drop=0.1, offset_noise=0.3, variants=4),
)


def pretrained(models: ModelsConfig) -> bool:
    """True when the tiny builder loads the smoke world (models.tiny_weights == 'pretrained')."""
    if models.tiny_weights not in TINY_WEIGHTS:
        raise ValueError(f"models.tiny_weights={models.tiny_weights!r}: valid values are {', '.join(TINY_WEIGHTS)}")
    return models.builder == "tiny" and models.tiny_weights == "pretrained"


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
    """<world root>/<world id>/ (may not exist yet; see rebeca_utils.world.cache.ensure_world)."""
    return world_root(cache_dir) / world_id(models)


def read_done(world: Path, name: str) -> dict | None:
    """Component `name`'s done.json in `world`; None while it is not trained."""
    try:
        return json.loads((world / name / DONE_NAME).read_text())
    except (OSError, ValueError):
        return None


def stale(world: Path, name: str) -> bool:
    """Missing, or trained on other files of a component it depends on."""
    rec = read_done(world, name)
    if rec is None:
        return True
    return any((read_done(world, d) or {}).get("digest") != rec.get("deps", {}).get(d) for d in DEPENDS.get(name, ()))


def world_ready(models: ModelsConfig, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when every component is trained and none is stale (ensure_world has nothing to do)."""
    world = world_dir(models, cache_dir)
    return not any(stale(world, n) for n in COMPONENTS)


def component_dir(models: ModelsConfig, name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of one trained component (the world trained first, through world_hook, when it is not ready)."""
    if name not in COMPONENTS:
        raise ValueError(f"component={name!r}: valid components are {', '.join(COMPONENTS)}")
    if not world_ready(models, cache_dir):
        train = world_hook.trainer()
        if train is None:
            raise MissingWeightsError(f"the smoke world {world_dir(models, cache_dir)} is not trained and no trainer "
                                      "is set: run `python -m rebeca_utils.world`")
        train(models, cache_dir)
    return world_dir(models, cache_dir) / name
