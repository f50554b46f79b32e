"""Who trains the smoke world when a tiny builder finds it missing: models sit below the world package
(rebeca_utils.world trains them), so the package root hands them its trainer here instead of models importing it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

Trainer = Callable[[Any, Any], Path]  # (ModelsConfig, cache_dir) -> the trained world's folder

_trainer: list[Trainer] = []  # empty until set: this module stays import-free, the package root imports it


def set_trainer(train: Trainer) -> None:
    """Make `train` the smoke world's trainer (the package root sets rebeca_utils.world's)."""
    _trainer[:] = [train]


def trainer() -> Trainer | None:
    """The smoke world's trainer, or None when nothing has set one."""
    return _trainer[0] if _trainer else None
