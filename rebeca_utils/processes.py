"""This process's share of a job: launched by `accelerate launch` / torchrun, given explicit ranks, or alone."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Share:
    """Rank, world size and device of this process; `state` is accelerate's PartialState when launched."""

    rank: int
    world_size: int
    device: str
    state: Any = None

    @property
    def coordinated(self) -> bool:
        """True when every process can be waited for, so rank 0 may finish the job (merge, manifest)."""
        return self.state is not None or self.world_size == 1

    def report(self, summary: dict) -> None:
        """Print `summary` as one JSON line in a single write, so lines of concurrent processes never interleave."""
        import json
        import sys

        sys.stdout.write(json.dumps(summary) + "\n")  # print() writes text and newline separately
        sys.stdout.flush()

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def close(self) -> None:
        import torch

        self.wait()
        if self.state is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def process_share(device: str = "auto", rank: int | None = None, world_size: int | None = None) -> Share:
    """Explicit rank/world_size win; else WORLD_SIZE > 1 means a launcher started us (gloo on CPU); else alone."""
    import torch

    from . import resolve_device

    state = None
    if rank is not None or world_size is not None:
        rank, world_size = rank or 0, world_size or 1
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        rank, world_size = state.process_index, state.num_processes
        if device == "auto":
            device = "cpu" if cpu else str(state.device)
    else:
        rank, world_size = 0, 1
    return Share(rank, world_size, resolve_device(device), state)
