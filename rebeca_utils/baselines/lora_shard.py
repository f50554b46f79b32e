"""Several processes training one LoRA plan: jobs dealt by their steps, a done file per job, process 0 collecting.

The shared adapter (10,000 steps) is as long as several per-user ones, so jobs are dealt longest first, each to the
least-loaded process. No process waits at a collective for another's training (NCCL's watchdog would end the run
after 10 minutes): each job's outcome lands in ``adapters/_done/<job>.json`` (written atomically), every process
but 0 leaves when its own jobs are done, and process 0 polls the done files of the others' jobs, saying which it
waits for, before it reports the run's outcome.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import jobs as J
from ..io import write_json

DONE_DIR = "_done"
POLL_S = 2.0  # between looks at the done files: a stat per pending job
SAY_EVERY_S = 300.0  # how often process 0 says what it still waits for


def deal_jobs(jobs: Sequence, world_size: int) -> list[list]:
    """Each process's jobs: longest (most optimiser steps) first, each to the least-loaded process (ties: the lower
    rank, the earlier job), so the split depends only on the jobs; each process keeps the plan's order."""
    return [[jobs[i] for i in share] for share in J.deal([j.spec.steps for j in jobs], world_size)]


def done_dir(adapters: str | os.PathLike) -> Path:
    """Where the done files of the current run live (under the plan's adapters/ folder)."""
    return Path(adapters) / DONE_DIR


def done_path(adapters: str | os.PathLike, name: str) -> Path:
    """The done file of job `name` ("per_user/u003" -> per_user__u003.json)."""
    return done_dir(adapters) / f"{name.replace('/', '__')}.json"


def clear_done(adapters: str | os.PathLike) -> None:
    """Forget a previous run's done files (process 0, before any process starts training)."""
    shutil.rmtree(done_dir(adapters), ignore_errors=True)


def write_done(adapters: str | os.PathLike, name: str, status: str, error: str = "", rank: int = 0) -> None:
    """Record a job's outcome (ok, skipped, failed) atomically: process 0 reads it whole or not at all."""
    write_json(done_path(adapters, name), {"job": name, "status": status, "error": error, "rank": rank,
                                           "time": time.time()})


def _read_done(adapters: str | os.PathLike, name: str) -> dict | J.NotDone:
    """Job `name`'s done record, or why there is none yet."""
    try:
        return json.loads(done_path(adapters, name).read_text())
    except (OSError, ValueError):  # not there yet (written atomically: never half)
        return J.NotDone(done_path(adapters, name))


def wait_for_done(adapters: str | os.PathLike, names: Sequence[str], who: Callable[[str], int] = lambda n: -1,
                  poll_s: float = POLL_S, say_every_s: float = SAY_EVERY_S) -> dict[str, dict]:
    """Poll until every job in `names` has a done file; every `say_every_s` name on stderr what is still missing."""
    said = -float("inf")
    while True:
        got, waiting = J.collect(names, lambda n: _read_done(adapters, n))
        if not waiting:
            return dict(zip(names, got))
        if time.monotonic() - said >= say_every_s:
            missing = [n for n, _ in waiting]
            head = ", ".join(f"{n} (process {who(n)})" if who(n) >= 0 else n for n in missing[:4])
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            print(f"process 0: waiting for {len(missing)} adapter(s) of other processes: {head}{more} "
                  f"(done files in {done_dir(adapters)})", file=sys.stderr, flush=True)
            said = time.monotonic()
        time.sleep(poll_s)


def leave(share) -> None:
    """End this process's part in the process group without waiting for the others (no barrier)."""
    if share.state is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
