"""Early stopping on a validation loss, shared by the prior and the verifier."""
from __future__ import annotations

import copy
import time

import torch


class EarlyStopping:
    """Keeps the weights of the lowest validation loss; `stop` once `patience` epochs pass without improvement."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.bad = patience, float("inf"), -1, 0
        self._state: dict | None = None

    def step(self, model: torch.nn.Module, epoch: int, val_loss: float) -> bool:
        """Record one epoch; True when it improved on the best so far (its weights are kept)."""
        if val_loss < self.best:
            self.best, self.best_epoch, self.bad = val_loss, epoch, 0
            self._state = copy.deepcopy(model.state_dict())
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience

    def finish(self, model: torch.nn.Module, result, t0: float):
        """End a run: the best weights back in `model` (eval mode), and the summary fields of `result` filled."""
        result.epochs, result.best_val_loss, result.best_epoch = len(result.history), self.best, self.best_epoch
        result.stopped_early = self.stop
        result.wall_time_s = time.perf_counter() - t0
        self.restore(model)
        model.eval()
        return result

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best weights back (nothing to do before the first epoch)."""
        if self._state is not None:
            model.load_state_dict(self._state)
