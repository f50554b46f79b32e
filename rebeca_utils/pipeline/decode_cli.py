"""CLI: decode the plan a notebook saved; under `accelerate launch` each process takes its batches."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, replace
from typing import Sequence

from ..models.decoder import build_decoder
from ..runtime import process_share
from .decoding import decode
from .plan import load_plan, write_manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rebeca_utils.pipeline.decode_cli",
                                description="Decode the plan a notebook saved in --out-dir (one share per process).")
    p.add_argument("--out-dir", required=True, help="the notebook's output folder holding plan/")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="images per pipeline call (default: the plan's)")
    p.add_argument("--dtype", help="override the plan's decoder dtype (auto | fp16 | fp32)")
    p.add_argument("--overwrite", action="store_true", help="redo images that already exist")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; under `accelerate launch` every process decodes its batches and process 0 writes the manifest."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    items, cfg, models = load_plan(args.out_dir)
    if args.dtype:
        cfg = replace(cfg, dtype=args.dtype)
    share = process_share(args.device)
    pipe = build_decoder(models, cfg, share.device, ip_adapter=any(it.ip_embedding is not None for it in items))
    rep = decode(pipe, items, args.out_dir, cfg, batch_size=args.batch_size, overwrite=args.overwrite,
                 rank=share.rank, world_size=share.world_size, models=models, progress=not args.no_progress)
    summary = {"rank": share.rank, "world_size": share.world_size,
               **{k: v for k, v in asdict(rep).items() if k != "failed"}, "failed": len(rep.failed)}
    share.wait()
    if share.rank == 0 and share.coordinated:
        df = write_manifest(items, args.out_dir, cfg, models)
        summary["manifest"] = {k: int(v) for k, v in df["status"].value_counts().items()}
    return share.finish(summary, rep.failed)


if __name__ == "__main__":
    sys.exit(main())
