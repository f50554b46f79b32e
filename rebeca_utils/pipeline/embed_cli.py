"""CLI: embed an image folder into a store; under `accelerate launch` each process takes its chunks."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from ..config import PROFILES, get_profile
from ..models.encoders import SPACES
from ..runtime import process_share
from .embeddings import ON_ERROR, embed_images, merge


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rebeca_utils.pipeline.embed_cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--image-dir", required=True, help="folder holding the images (e.g. FLICKR-AES/40K)")
    p.add_argument("--out-dir", required=True, help="store root; files go to <out-dir>/<space>/")
    p.add_argument("--space", required=True, choices=SPACES)
    p.add_argument("--profile", default="paper", choices=PROFILES, help="which models (smoke/demo: tiny)")
    p.add_argument("--names-file", help="embed only these names (one per line); default: every image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--on-error", choices=ON_ERROR, default="skip")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (default 4 on CUDA, else 0)")
    p.add_argument("--merge-only", action="store_true", help="only merge finished chunks")
    p.add_argument("--no-merge", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; under `accelerate launch` each process takes its share and process 0 merges."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge_only:
        print(json.dumps({"merged": str(merge(args.out_dir, args.space))}), flush=True)
        return 0
    share = process_share(args.device)
    device, rank, world = share.device, share.rank, share.world_size
    names = None
    if args.names_file:
        names = [s for s in Path(args.names_file).read_text().splitlines() if s.strip()]
    workers = args.num_workers if args.num_workers is not None else (4 if device.startswith("cuda") else 0)
    store = embed_images(args.image_dir, names, args.space, get_profile(args.profile).models, args.out_dir,
                         device=device, dtype=args.dtype, batch_size=args.batch_size, chunk_size=args.chunk_size,
                         on_error=args.on_error, rank=rank, world_size=world, progress=not args.no_progress,
                         num_workers=workers)
    summary: dict[str, Any] = {"rank": rank, "world_size": world, "computed": store.computed,
                               "reused": store.reused, "failures": len(store.failures)}
    share.wait()
    if rank == 0 and not args.no_merge and share.coordinated:
        summary["merged"] = str(store.merge())
    return share.finish(summary)


if __name__ == "__main__":
    sys.exit(main())
