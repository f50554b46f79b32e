"""Resumable, sharded jobs: fingerprints, the rank split of work, skip-what-is-done, orphan cleanup, chunks, collect.

Embedding chunks, decoded images, LoRA adapters and LLaVA tag chunks are such jobs. Each unit of work is written
atomically (``io.atomic_path``) with a fingerprint of its inputs; a rerun skips the units whose stored fingerprint
matches; several processes take disjoint shares without talking to each other, and one collects at the end.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .io import ORPHAN_AGE_S, remove_orphans

log = logging.getLogger(__name__)

T = TypeVar("T")


def fingerprint(payload: Any, *blobs: bytes) -> str:
    """32 hex digits of sha256 over `payload` as sorted-key JSON, then `blobs` (e.g. an embedding's bytes)."""
    h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()[:32]


def check_rank(rank: int, world_size: int) -> None:
    """Refuse a process rank outside 0..world_size-1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")


def deal(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Unit indices of each process: heaviest first, each to the least-loaded process (ties: the lower rank, the
    earlier unit); each share in unit order. Equal weights deal round robin (unit i to process i mod world_size).
    The split depends only on the weights, so every process computes the same one without talking."""
    check_rank(0, world_size)
    loads = [(0.0, r) for r in range(world_size)]  # a heap: (load, rank), the least loaded and lowest rank first
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(loads)
        shares[r].append(i)
        heapq.heappush(loads, (load + weights[i], r))
    return [sorted(s) for s in shares]


def share(units: Sequence[T], rank: int, world_size: int, weight: Callable[[T], float] | None = None) -> list[T]:
    """The units of process `rank` (dealt by `weight`, else round robin): no overlap, nothing left out."""
    check_rank(rank, world_size)
    weights = [1.0] * len(units) if weight is None else [float(weight(u)) for u in units]
    return [units[i] for i in deal(weights, world_size)[rank]]


def chunks(names: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of `size` names (the last one shorter): chunk i is what file i of a chunked job holds."""
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    return [list(names[s:s + size]) for s in range(0, len(names), size)]


def clear_orphans(folder: str | os.PathLike, world_size: int, recursive: bool = False) -> int:
    """At the start of a run, delete the temporaries of atomic writes a killed run left in `folder`; returns how
    many. Alone, every temporary is an orphan; with several processes writing there, only those older than
    io.ORPHAN_AGE_S (a fresh one may be another process's write in flight)."""
    return remove_orphans(folder, recursive=recursive, min_age_s=ORPHAN_AGE_S if world_size > 1 else 0.0)


@dataclass(frozen=True)
class NotDone:
    """What reading a unit gives when it is not done: where and why (missing, truncated, another fingerprint)."""

    where: str | os.PathLike
    why: str = "missing"

    def __bool__(self) -> bool:  # a read returns the unit's result or this: `if read(unit)` asks "is it done?"
        return False


def split_done(units: Iterable[T], read: Callable[[T], Any], redo: bool = False) -> tuple[list[T], list[tuple[T, Any]]]:
    """(units to do, [(unit, read(unit))] of the done ones): a unit is done when read(unit) is truthy (its stored
    result, made for the current fingerprint). A unit that exists but is not valid is named in the log; redo=True
    does every unit and reads none."""
    todo, done = [], []
    for unit in units:
        got = None if redo else read(unit)
        if got:
            done.append((unit, got))
            continue
        if isinstance(got, NotDone) and got.why != "missing":
            log.warning("%s: redoing: %s", got.where, got.why)
        todo.append(unit)
    return todo, done


def collect(units: Iterable[T], read: Callable[[T], Any]) -> tuple[list[Any], list[tuple[T, Any]]]:
    """(results of the done units, in order; [(unit, what read gave)] of the others): the collect step once every
    process has done its share; the caller refuses to collect while the second list is not empty."""
    results, missing = [], []
    for unit in units:
        got = read(unit)
        if got:
            results.append(got)
        else:
            missing.append((unit, got))
    return results, missing
