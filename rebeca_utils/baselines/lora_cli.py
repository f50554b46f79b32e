"""LoRA baselines over users: training jobs, the resumable runner, generation work items, and the CLI.

Layout under the notebook's folder (``outputs/<profile>/06_lora_baselines``)::

    adapters/plan.json                       the training jobs (read by the CLI)
    adapters/per_user/u{user:03d}/           pytorch_lora_weights.safetensors (diffusers format + metadata),
                                             training_log.json, adapter.json (fingerprint; written last)
    adapters/shared/                         the shared adapter
    adapters/<job>.checkpoints/              an adapter's resumable checkpoints while it trains
    adapters/_train_logs/*.jsonl             one append-only log per process (started / ok / skipped / failed + error)
    adapters/_done/<job>.json                the current CLI run's outcome of each job (read by process 0)
    lora/{per_user,shared}/u{user:03d}/{j:02d}.png, generation_manifest.csv    the decoded images (as notebook 04)

Several GPUs: ``accelerate launch --multi_gpu --num_processes N -m rebeca_utils.baselines.lora_cli --out-dir <folder>``
trains the plan a notebook saved there; the jobs still to train are dealt by their steps (``lora_shard``), and every
adapter is seeded by (seed, user_id) alone, so the adapters do not depend on N.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch

from .. import jobs as J
from ..config import GenerationConfig, LoraBaselineConfig, ModelsConfig
from ..io import write_json
from ..models.decoder import build_sd_pipeline
from ..pipeline.items import WorkItem, make_items
from ..progress import tqdm
from ..runtime import process_share
from ..steps import notebook
from . import lora as L
from . import lora_recipe as R
from . import lora_shard as S

ADAPTERS = "adapters"
PLAN_NAME = "plan.json"
LOG_DIR = "_train_logs"
METHOD = "lora"
VARIANTS = ("per_user", "shared", "both")


@dataclass(frozen=True)
class Job:
    """One adapter to train: a user's (user_id set) or the shared one (user_id None)."""

    name: str  # "per_user/u003" or "shared": its folder under adapters/
    user_id: int | None
    images: tuple[str, ...]  # image file names (under image_root)
    captions: tuple[str, ...]
    spec: R.LoraSpec
    seed: int
    fingerprint: str

    @property
    def setting(self) -> str:
        return "shared" if self.user_id is None else "per_user"


def plan_jobs(splits, users: Sequence[int], variant: str, cfg: LoraBaselineConfig, models: ModelsConfig,
              seed: int, resolution: int, captions_path: str | os.PathLike | None = None) -> list[Job]:
    """Per-user jobs for `users` (their liked training images, Table 3 bucket) and/or the shared job (Table 4) on the
    union of every non-hold-out user's liked training images."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: valid values are {', '.join(VARIANTS)}")
    jobs = []
    if variant in ("per_user", "both"):
        rows = R.liked_training_rows(splits, users)
        caps = R.training_captions(rows, cfg.caption, captions_path)
        for u in users:
            sel = (rows["user_id"] == int(u)).to_numpy()
            imgs, cs = tuple(rows["image"][sel]), tuple(c for c, s in zip(caps, sel) if s)
            if not imgs:
                raise ValueError(f"user_id {u} has no liked training images; leave it out of `users`")
            spec = R.capped(R.bucket_for(len(imgs), cfg.table3).spec, cfg.max_steps)
            s = R.adapter_seed(seed, int(u))
            jobs.append(Job(f"per_user/u{int(u):03d}", int(u), imgs, cs, spec, s,
                            R.fingerprint(imgs, cs, spec, cfg, models, s, resolution)))
    if variant in ("shared", "both"):
        pool = splits[~splits["holdout"].astype(bool)]
        rows = R.liked_training_rows(pool)
        caps = R.training_captions(rows, cfg.caption, captions_path)
        pairs = sorted(set(zip(rows["image"], caps)))  # the union: an image liked by several users once per caption
        spec, s = R.shared_spec(cfg), R.adapter_seed(seed, None)
        imgs, cs = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        jobs.append(Job("shared", None, imgs, cs, spec, s, R.fingerprint(imgs, cs, spec, cfg, models, s, resolution)))
    return jobs


def save_train_plan(jobs: Sequence[Job], out_dir: str | os.PathLike, cfg: LoraBaselineConfig, models: ModelsConfig,
                    image_root: str | os.PathLike, resolution: int) -> Path:
    """Write the jobs and configs to <out_dir>/adapters/plan.json (atomic) for the CLI."""
    return write_json(Path(out_dir) / ADAPTERS / PLAN_NAME, {
        "jobs": [{**asdict(j), "spec": asdict(j.spec)} for j in jobs], "lora": asdict(cfg), "models": asdict(models),
        "image_root": str(Path(image_root).resolve()), "resolution": resolution})


def load_train_plan(out_dir: str | os.PathLike) -> tuple[list[Job], LoraBaselineConfig, ModelsConfig, Path, int]:
    """(jobs, LoRA config, models config, image root, resolution) saved by save_train_plan."""
    path = Path(out_dir) / ADAPTERS / PLAN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA training plan; run {notebook(6)} first (or save_train_plan)")
    d = json.loads(path.read_text())

    def conf(cls, v):
        return cls(**{f.name: tuple(v[f.name]) if isinstance(v[f.name], list) else v[f.name]
                      for f in dataclasses.fields(cls) if f.name in v})

    jobs = [Job(j["name"], j["user_id"], tuple(j["images"]), tuple(j["captions"]), R.LoraSpec(**j["spec"]), j["seed"],
                j["fingerprint"]) for j in d["jobs"]]
    return jobs, conf(LoraBaselineConfig, d["lora"]), conf(ModelsConfig, d["models"]), Path(d["image_root"]), \
        int(d["resolution"])


def adapter_dir(out_dir: str | os.PathLike, job: Job) -> Path:
    """Where a job's adapter folder lives."""
    return Path(out_dir) / ADAPTERS / job.name


def checkpoint_dir(out_dir: str | os.PathLike, job: Job) -> Path:
    """Where a job's resumable checkpoints live while it trains."""
    out = adapter_dir(out_dir, job)
    return out.parent / f"{out.name}.checkpoints"


def build_training_pipeline(models: ModelsConfig, device: str, cfg: LoraBaselineConfig):
    """The frozen decoder without IP-Adapter: fp16 weights on CUDA under mixed precision, else fp32."""
    fp16 = device.startswith("cuda") and cfg.mixed_precision in ("auto", "fp16")
    pipe = build_sd_pipeline(models, device, torch.float16 if fp16 else torch.float32, ip_adapter=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class TrainReport:
    """What one train_jobs() call did."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _log(out_dir: Path, rec: dict) -> None:
    # one file per process, appended and fsynced: concurrent processes never interleave
    path = out_dir / ADAPTERS / LOG_DIR / f"{socket.gethostname()}-{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({**rec, "time": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pending(jobs: Sequence[Job], out_dir: str | os.PathLike, overwrite: bool = False) -> list[Job]:
    """The jobs without a finished adapter of their fingerprint (all of them with `overwrite`)."""
    return J.split_done(jobs, lambda j: L.adapter_done(adapter_dir(out_dir, j), j.fingerprint), redo=overwrite)[0]


def train_one(pipe, job: Job, out_dir: Path, cfg: LoraBaselineConfig, image_root: str | os.PathLike,
              resolution: int, num_workers: int, progress: bool) -> dict:
    """Train one job (resuming from its checkpoints), write its adapter folder; returns the training log."""
    out, ckpt = adapter_dir(out_dir, job), checkpoint_dir(out_dir, job)
    state, meta, log = L.train_adapter(
        pipe, [Path(image_root) / n for n in job.images], list(job.captions), job.spec, cfg, seed=job.seed,
        resolution=resolution, fp=job.fingerprint, checkpoint_dir=ckpt, checkpoint_every=cfg.checkpoint_every,
        progress=progress, desc=job.name, num_workers=num_workers)
    info = {"fingerprint": job.fingerprint, "job": job.name, "user_id": job.user_id, "n_images": len(job.images),
            "spec": asdict(job.spec), "seed": job.seed}
    L.write_adapter(out, state, meta, info, {**log, "job": job.name, "user_id": job.user_id})
    shutil.rmtree(ckpt, ignore_errors=True)  # the finished adapter supersedes its checkpoints
    return log


def train_jobs(jobs: Sequence[Job], out_dir: str | os.PathLike, cfg: LoraBaselineConfig, models: ModelsConfig,
               image_root: str | os.PathLike, resolution: int, *, device: str = "cpu", rank: int = 0,
               world_size: int = 1, overwrite: bool = False, progress: bool = True, pipe=None,
               num_workers: int | None = None, todo: Sequence[Job] | None = None) -> TrainReport:
    """Train this process's share of the jobs still to do (`todo`, default: those without a finished adapter),
    dealt by steps (lora_shard.deal_jobs); a failing job (e.g. out of memory) is recorded while the others go on.
    Every job's outcome also lands in its done file for process 0."""
    out_dir = Path(out_dir)
    todo = pending(jobs, out_dir, overwrite) if todo is None else list(todo)
    mine = S.deal_jobs(todo, world_size)[rank]
    workers = cfg.num_workers if num_workers is None else num_workers
    rep, t0 = TrainReport(), time.perf_counter()
    rep.skipped = [j.name for j in jobs if j not in todo] if rank == 0 else []  # one process reports them
    for job in (j for j in jobs if j.name in rep.skipped):
        _log(out_dir, {"job": job.name, "status": "skipped"})
        shutil.rmtree(checkpoint_dir(out_dir, job), ignore_errors=True)  # killed after its adapter was written
    for sub in ("per_user", ""):  # adapter temporaries of a killed run
        J.clear_orphans(out_dir / ADAPTERS / sub, world_size)
    if mine and pipe is None:
        pipe = build_training_pipeline(models, device, cfg)
    bar = tqdm(mine, desc=f"adapters [{rank}/{world_size}]" if world_size > 1 else "adapters", unit="adapter",
               disable=not progress, position=0)
    for job in bar:
        bar.set_postfix(job=job.name)
        _log(out_dir, {"job": job.name, "status": "started", "rank": rank})
        try:
            log = train_one(pipe, job, out_dir, cfg, image_root, resolution, workers, progress)
            rep.trained.append(job.name)
            _log(out_dir, {"job": job.name, "status": "ok", "seconds": log["seconds"], "steps": log["steps"]})
            S.write_done(out_dir / ADAPTERS, job.name, "ok", rank=rank)
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory: this adapter fails, the others go on
            err = f"{type(exc).__name__}: {exc}".splitlines()[0]
            rep.failed.append({"job": job.name, "error": err})
            _log(out_dir, {"job": job.name, "status": "failed", "error": err})
            S.write_done(out_dir / ADAPTERS, job.name, "failed", err, rank=rank)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    bar.close()
    rep.seconds = time.perf_counter() - t0
    return rep


def training_logs(out_dir: str | os.PathLike, jobs: Sequence[Job]) -> dict[str, dict]:
    """job name -> its adapter's training log (finished adapters only)."""
    out = {}
    for j in jobs:
        p = adapter_dir(out_dir, j) / R.LOG_NAME
        if L.adapter_done(adapter_dir(out_dir, j), j.fingerprint) and p.is_file():
            out[j.name] = json.loads(p.read_text())
    return out


def user_adapters(out_dir: str | os.PathLike, users: Sequence[int]) -> dict[int, str]:
    """user_id -> folder of that user's finished per-user adapter in notebook 06's `out_dir` (none: {})."""
    try:
        jobs = load_train_plan(out_dir)[0]
    except FileNotFoundError:
        return {}
    ready = training_logs(out_dir, jobs)
    return {j.user_id: str(adapter_dir(out_dir, j).resolve()) for j in jobs
            if j.user_id is not None and j.user_id in set(users) and j.name in ready}


def lora_items(jobs: Sequence[Job], out_dir: str | os.PathLike, users: Sequence[int], cfg: GenerationConfig,
               caption: str = "empty", prompt: str = "") -> list[WorkItem]:
    """Decoder work items: n_per_user images of every user with each planned adapter (no IP-Adapter embedding),
    App G.3 seeds, the empty prompt (the user token with caption='user_token'; `prompt` for every user if given)."""
    items = []
    for job in jobs:
        who = [job.user_id] if job.user_id is not None else list(users)
        us = [int(u) for u in who for _ in range(cfg.n_per_user)]
        js = [j for _ in who for j in range(cfg.n_per_user)]
        items += make_items(METHOD, job.setting, us, js, cfg, prompts=[prompt or R.generation_prompt(u, caption) for u in us],
                            loras=[str(adapter_dir(out_dir, job).resolve())] * len(us))
    return items


def compute_table(jobs: Sequence[Job], logs: dict[str, dict]):
    """Per adapter: data size, LoRA shape, steps, seconds, steps/s, device (trained adapters), plus a total row."""

    rows = [{"adapter": j.name, "N_i": len(j.images), "r": j.spec.r, "α": j.spec.alpha, "steps": j.spec.steps,
             "seconds": logs[j.name]["seconds"] if j.name in logs else float("nan"),
             "steps/s": logs[j.name]["steps_per_s"] if j.name in logs else float("nan"),
             "device": logs.get(j.name, {}).get("device", "not trained")} for j in jobs]
    df = pd.DataFrame(rows)
    total = {"adapter": "total", "N_i": int(df["N_i"].sum()), "steps": int(df["steps"].sum()),
             "seconds": float(df["seconds"].sum()), "steps/s": df["steps"].sum() / max(df["seconds"].sum(), 1e-9)}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def loss_figure(logs: dict[str, dict], title: str = "LoRA training loss"):
    """Loss per optimiser step of every adapter (thin) and the learning rate (right axis, first adapter)."""

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, log in logs.items():
        steps = [h["step"] for h in log["history"]]
        ax.plot(steps, [h["loss"] for h in log["history"]], lw=1.6 if name == "shared" else 0.9,
                color="k" if name == "shared" else None, label=name)
    ax.set_xlabel("optimiser step"), ax.set_ylabel("ε-MSE (mean over the accumulated micro-batches)")
    if logs:
        first = next(iter(logs.values()))
        lr_ax = ax.twinx()
        lr_ax.plot([h["step"] for h in first["history"]], [h["lr"] for h in first["history"]], color="grey", ls=":")
        lr_ax.set_ylabel("learning rate (dotted)")
    ax.legend(frameon=False, fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rebeca_utils.baselines.lora_cli",
                                description="Train the LoRA adapters of the plan notebook 06 saved in --out-dir.")
    p.add_argument("--out-dir", required=True, help="the notebook's output folder holding adapters/plan.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", choices=("per_user", "shared"), help="train only these jobs of the plan")
    p.add_argument("--overwrite", action="store_true", help="retrain adapters that already exist")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers decoding training images (0: in the training process; default: the "
                        "plan's lora.num_workers)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _finish(share, rep: TrainReport, adapters: Path, todo: Sequence[Job]) -> int:
    """Report; process 0 waits for the other processes' done files and names the run's first failure (exit 1).
    The other processes leave at once with 0: a non-zero exit would make the launcher stop process 0."""
    share.report({"rank": share.rank, "world_size": share.world_size, "trained": rep.trained,
                  "skipped": rep.skipped, "failed": len(rep.failed), "seconds": round(rep.seconds, 3)})
    failed = rep.failed
    if share.rank == 0:
        shares = S.deal_jobs(todo, share.world_size)
        rank_of = {j.name: r for r, js in enumerate(shares) for j in js}
        done = S.wait_for_done(adapters, [j.name for j in todo], who=lambda n: rank_of.get(n, -1))
        failed = [{"job": n, "error": d["error"]} for n, d in done.items() if d["status"] == "failed"]
    S.leave(share)
    _log(adapters.parent, {"status": "exit", "rank": share.rank})
    if failed:
        print(f"{len(failed)} adapter(s) failed, e.g. {failed[0]['job']}: {failed[0]['error']}; rerun to retry them",
              file=sys.stderr)
    return 1 if failed and share.rank == 0 else 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; under `accelerate launch` each process trains a disjoint set of adapters."""
    args = _parser().parse_args(argv)
    try:
        jobs, cfg, models, image_root, resolution = load_train_plan(args.out_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    if args.only:
        jobs = [j for j in jobs if j.setting == args.only]
    share = process_share(args.device)
    adapters = Path(args.out_dir) / ADAPTERS
    todo = pending(jobs, args.out_dir, args.overwrite)  # before any process writes: every process sees the same
    if share.rank == 0:
        S.clear_done(adapters)
    share.wait()  # the only collective, at the start: the stale done files are gone before anyone trains
    rep = train_jobs(jobs, args.out_dir, cfg, models, image_root, resolution, device=share.device, rank=share.rank,
                     world_size=share.world_size, overwrite=args.overwrite, progress=not args.no_progress,
                     num_workers=args.num_workers, todo=todo)
    return _finish(share, rep, adapters, todo)


if __name__ == "__main__":
    sys.exit(main())
