"""REBECA kit: the package behind the notebooks, in subpackages by pipeline stage (see README "Where things live")."""
from .models import world_hook as _world_hook

__version__ = "0.1.0"


def _train_world(models, cache_dir):
    """Train the smoke world for a tiny builder that found it missing (models cannot import rebeca_utils.world)."""
    from .world.cache import ensure_world  # torch, diffusers: loaded when a builder needs the world, not on import

    return ensure_world(models, cache_dir)


_world_hook.set_trainer(_train_world)
