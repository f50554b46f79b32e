"""A decoding plan on disk (read by the CLI) and the manifest of what was decoded."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..config import GenerationConfig, ModelsConfig
from ..io import (
    atomic_path,
    read_safetensors,
    remove_orphans,
    save_safetensors,
    sha256,
    write_json,
)
from .decoding import LOG_DIR, valid_png
from .items import WorkItem, image_settings, item_fingerprint

PLAN_DIR = "plan"


MANIFEST_NAME = "generation_manifest.csv"


MANIFEST_COLUMNS = ["method", "setting", "user_id", "index", "seed", "prompt", "negative_prompt", "lora", "path",
                    "sha256", "seconds", "status", "error"]


def save_plan(items: Sequence[WorkItem], out_dir: str | os.PathLike, cfg: GenerationConfig,
              models: ModelsConfig) -> Path:
    """Write the work (items, embeddings, configs) under <out_dir>/plan/ so `python -m rebeca_utils.pipeline.decode_cli` can run it."""

    d = Path(out_dir) / PLAN_DIR
    rows, embs = [], []
    for it in sorted(items, key=lambda it: it.key):
        row = {f.name: getattr(it, f.name) for f in fields(WorkItem) if f.name != "ip_embedding"}
        row["emb_row"] = -1 if it.ip_embedding is None else len(embs)
        if it.ip_embedding is not None:
            embs.append(it.ip_embedding.float())
        rows.append(row)
    save_safetensors({"img_emb": torch.stack(embs) if embs else torch.zeros(0, models.decoder_emb_dim)},
                     d / "ip_embeddings.safetensors")
    with atomic_path(d / "items.parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    # written last, with the digests of the two files: a plan interrupted half-way is refused by load_plan
    write_json(d / "plan.json", {"generation": asdict(cfg), "models": asdict(models), "n_items": len(rows),
                                 "sha256": {n: sha256(d / n) for n in ("ip_embeddings.safetensors", "items.parquet")}})
    return d


def _config(cls, d: dict):
    kw = {}
    for f in fields(cls):
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def load_plan(out_dir: str | os.PathLike) -> tuple[list[WorkItem], GenerationConfig, ModelsConfig]:
    """(items, generation config, models config) saved by save_plan."""

    d = Path(out_dir) / PLAN_DIR
    if not (d / "plan.json").is_file():
        raise FileNotFoundError(f"{d / 'plan.json'}: no decoding plan; run the generating notebook (or save_plan) first")
    meta = json.loads((d / "plan.json").read_text())
    for name, digest in meta["sha256"].items():
        if sha256(d / name) != digest:
            raise ValueError(f"{d / name} does not match {d / 'plan.json'} (a save_plan was interrupted); save the plan again")
    emb = read_safetensors(d / "ip_embeddings.safetensors", "save the plan again")[0]["img_emb"]
    df = pd.read_parquet(d / "items.parquet")
    items = [WorkItem(r.method, r.setting, int(r.user_id), int(r.index), int(r.seed), r.prompt, r.negative_prompt,
                      None if r.emb_row < 0 else emb[int(r.emb_row)], r.lora if isinstance(r.lora, str) else None)
             for r in df.itertuples(index=False)]
    return items, _config(GenerationConfig, meta["generation"]), _config(ModelsConfig, meta["models"])


def _log_records(out_dir: Path) -> dict[tuple, dict]:
    latest: dict[tuple, dict] = {}
    for path in sorted((out_dir / LOG_DIR).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a process killed mid-line leaves a partial last line
                continue
            key = tuple(rec["key"])
            if key not in latest or rec["time"] >= latest[key]["time"]:
                latest[key] = rec
    return latest


def write_manifest(items: Sequence[WorkItem], out_dir: str | os.PathLike, cfg: GenerationConfig,
                   models: ModelsConfig | None = None):
    """The manifest table (one row per item, status ok | failed | missing | stale), written atomically as CSV.

    Call it when no process is decoding: it also removes temp files a killed run left behind."""
    return write_manifests([(items, cfg)], out_dir, models)


def write_manifests(groups: Sequence[tuple[Sequence[WorkItem], GenerationConfig]], out_dir: str | os.PathLike,
                    models: ModelsConfig | None = None):
    """`write_manifest` for items decoded under different generation configs (e.g. one per decoder CFG): one
    table, each group's images checked against its own config."""
    out_dir = Path(out_dir)
    logs = _log_records(out_dir)
    remove_orphans(out_dir, recursive=True)  # every temp file a SIGKILL left (PNGs, settings, plan, manifest)
    rows = []
    for items, cfg in groups:
        settings = image_settings(cfg, models)
        for it in sorted(items, key=lambda it: it.key):
            path = out_dir / it.relpath
            rec = logs.get(it.key, {})
            ok = valid_png(path, (cfg.width, cfg.height), item_fingerprint(it, settings))
            rows.append({"method": it.method, "setting": it.setting, "user_id": it.user_id, "index": it.index,
                         "seed": it.seed, "prompt": it.prompt, "negative_prompt": it.negative_prompt,
                         "lora": it.lora or "", "path": it.relpath, "sha256": sha256(path) if ok else "",
                         "seconds": rec.get("seconds", np.nan) if ok else np.nan,
                         "status": "ok" if ok else "failed" if rec.get("status") == "failed" else
                                   "stale" if path.is_file() else "missing",
                         "error": "" if ok else rec.get("error", "")})
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    with atomic_path(out_dir / MANIFEST_NAME) as tmp:
        df.to_csv(tmp, index=False)
    return df
