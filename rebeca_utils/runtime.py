"""Where and how code runs: device and dtype, seeding and named RNG streams, the kit cache, offline mode, process shares."""
from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from huggingface_hub import constants

DEVICE_ENV = "REBECA_DEVICE"
CACHE_ENV = "REBECA_CACHE"
# Named random streams: each random choice of the kit draws from seed_sequence(seed, stream), so two choices never
# share numbers and a new one never shifts an old one. The values are the constants the streams were born with.
RNG_STREAMS = {
    "split_order": 1, "holdout_workers": 2,  # data.splits
    "fixture_images": 7, "fixture": 0x5EBECA,  # data.synthetic: per-image pixels; names, attributes, tastes, ratings
    "dsprites_val": 101, "dsprites_baselines": 202, "dsprites_oracle": 404,  # studies.controlled
    "random_draws": 303,  # evaluate.retrieval: random training embeddings as the selection score's floor
    "new_user_history": 505, "new_user_fit": 506,  # studies.cold_start: histories of k ratings, fit seeds
    "dsprites_fifth": 405, "dsprites_fifth_history": 406,  # studies.fifth_user: its ratings and histories
    "select_users": 507, "select_history": 508,  # studies.new_users: who chooses inversion's settings, and from what
    "encoder_init": 509, "encoder_batches": 510,  # train.history_encoder: its initial weights and its batches
}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global RNGs (model init, dropout); sampling uses its own generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> $REBECA_DEVICE if set, else cuda > mps > cpu; explicit names are checked."""
    if device == "auto":
        device = os.environ.get(DEVICE_ENV, "") or "auto"
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r}: valid devices are auto, cpu, cuda[:N], mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(device: str, dtype: str = "auto"):
    """'auto' -> fp16 on CUDA, fp32 elsewhere; fp16/bf16 are refused off CUDA."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: valid dtypes are auto, {', '.join(table)}")
    if dtype != "fp32" and not device.startswith("cuda"):
        raise ValueError(f"dtype={dtype!r} needs a CUDA device (got device={device!r}); use fp32")
    return table[dtype]


def seed_sequence(seed: int, stream: str, *keys: int) -> np.random.SeedSequence:
    """SeedSequence of a named stream (see RNG_STREAMS), optionally keyed further (e.g. by an image index)."""
    if stream not in RNG_STREAMS:
        raise KeyError(f"unknown RNG stream {stream!r}; known streams: {', '.join(RNG_STREAMS)}")
    return np.random.SeedSequence([int(seed), RNG_STREAMS[stream], *map(int, keys)])


def rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """NumPy generator of a named stream (see RNG_STREAMS)."""
    return np.random.default_rng(seed_sequence(seed, stream, *keys))


def kit_cache_dir() -> Path:
    """Where tiny artefacts (tokenizer, IP-Adapter, open_clip configs) are written: $REBECA_CACHE or ~/.cache."""
    env = os.environ.get(CACHE_ENV)
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rebeca_kit"
    return base.expanduser()


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """torch's intra-op thread count `n` (None: as it is) inside the block, the caller's restored after. Also a
    guard: numba's OpenMP layer (UMAP) sets the libgomp it shares with torch to every core, behind torch's back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under torch seed `seed` without touching the caller's global RNG stream."""
    # fork_rng: tiny builds are reproducible without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set: the kit's one offline switch, for URLs too."""
    # the env var is re-read because huggingface_hub freezes HF_HUB_OFFLINE when it is first imported
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0, endpoint: str | None = None) -> bool:
    """Whether the Hub (or `endpoint`) answers a TCP connect within `timeout` s; False at once when offline()."""
    if offline():
        return False
    # a bounded TCP probe, so a machine without internet fails in seconds instead of hanging on HTTP retries
    url = urlparse(endpoint or constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


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
        sys.stdout.write(json.dumps(summary) + "\n")  # print() writes text and newline separately
        sys.stdout.flush()

    def finish(self, summary: dict, failed: Sequence[dict] = (), what: str = "item", key: str = "key") -> int:
        """Report `summary`, end the process group, name the first failure: the CLI's exit code (1 if any failed)."""
        self.report(summary)
        self.close()
        if failed:
            print(f"{len(failed)} {what}(s) failed, e.g. {failed[0][key]}: {failed[0]['error']}; rerun to retry them",
                  file=sys.stderr)
        return 1 if failed else 0

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def close(self) -> None:

        self.wait()
        if self.state is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def process_share(device: str = "auto") -> Share:
    """WORLD_SIZE > 1 means `accelerate launch` / torchrun started us (gloo on CPU); else this process is alone."""
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState  # lazy: heavy, only this path needs it

        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        rank, world_size = state.process_index, state.num_processes
        if device == "auto":
            device = "cpu" if cpu else str(state.device)
    else:
        rank, world_size = 0, 1
    return Share(rank, world_size, resolve_device(device), state)
