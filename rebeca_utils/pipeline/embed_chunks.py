"""The embedding store's files: the plan of a space, its chunks (format, atomic write, validation), shape checks."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import jobs as J
from ..io import CorruptFileError, read_safetensors, save_safetensors
from ..models.encoders import EmbeddingError, check_space

CHUNK_FORMAT = "rebeca-embeddings-chunk/1"

PLAN_NAME = "plan.json"


def check_embeddings(emb: torch.Tensor, names: Sequence[str], space: str, dim: int) -> None:
    """Refuse a (len(names), dim) batch that has another shape or non-finite values; the error names the images."""
    shape = tuple(emb.shape)
    if emb.ndim != 2 or shape[0] != len(names) or shape[1] != dim:
        raise EmbeddingError(f"{space} space: {some_names(names)}: embedding has shape {shape}, expected "
                             f"({len(names)}, {dim}) (wrong dim for this space?)")
    bad = ~torch.isfinite(emb).all(dim=1)
    if bad.any():
        which = [n for n, b in zip(names, bad.tolist()) if b]
        raise EmbeddingError(f"{space} space: {some_names(which)}: embedding has NaN/inf values")


def some_names(names: Sequence[str], k: int = 3) -> str:
    """The first k names, and how many more."""
    names = list(names)
    return ", ".join(names[:k]) + (f" (and {len(names) - k} more)" if len(names) > k else "")


def space_dir(out_dir: str | os.PathLike, space: str) -> Path:
    """`<out_dir>/<space>`: the store folder of one space."""
    check_space(space)
    return Path(out_dir) / space


def chunk_path(out_dir: str | os.PathLike, space: str, i: int) -> Path:
    """Path of chunk i of a space."""
    return space_dir(out_dir, space) / f"chunk_{i:05d}.safetensors"


@dataclass
class Chunk:
    """One chunk's content: the names embedded, the unreadable ones, their embeddings and the model's dtype."""

    rows: list[str]  # names with an embedding, in order
    failures: list[dict[str, str]]  # {"name", "error"}
    emb: torch.Tensor  # (len(rows), dim) float32
    dtype: str = ""


def sources_digest(image_dir: Path, names: Sequence[str]) -> str:
    """sha256 over (name, size, mtime) of the images: a chunk is recomputed when one of its images is replaced."""
    h = hashlib.sha256()
    for n in names:
        try:
            st = (image_dir / n).stat()
            h.update(f"{n}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{n}\0missing\n".encode())
    return h.hexdigest()


def write_chunk(path: Path, names: list[str], chunk: Chunk, fp: dict, device: str, sources: str) -> None:
    """Write a chunk atomically with what keys it: its names, the encoder fingerprint and its images' digest."""
    meta = {"format": CHUNK_FORMAT, "space": fp["space"], "dim": str(fp["dim"]),
            "fingerprint": json.dumps(fp, sort_keys=True), "names": json.dumps(names),
            "rows": json.dumps(chunk.rows), "failures": json.dumps(chunk.failures),
            "dtype": chunk.dtype, "device": device, "sources": sources}
    save_safetensors({"embeddings": chunk.emb.float().contiguous()}, path, meta)


def read_chunk(path: Path, names: list[str], fp: dict, sources: str) -> Chunk | J.NotDone:
    """The chunk at `path` if it is whole and matches (names, images, fingerprint, dim, finite); else why not."""
    if not path.is_file():
        return J.NotDone(path)
    try:
        tensors, meta = read_safetensors(path, "rerun")
        emb = tensors["embeddings"]
        if meta.get("format") != CHUNK_FORMAT:
            return J.NotDone(path, f"unknown format {meta.get('format')!r}")
        if json.loads(meta["fingerprint"]) != fp:
            return J.NotDone(path, f"made by another encoder ({meta['fingerprint']})")
        if json.loads(meta["names"]) != names:
            return J.NotDone(path, "holds other names (image list or chunk size changed)")
        if meta.get("sources") != sources:
            return J.NotDone(path, "its images changed on disk (size or modification time)")
        rows, failures = json.loads(meta["rows"]), json.loads(meta["failures"])
        failed = [f_["name"] for f_ in failures]
        if sorted(rows + failed) != names or len(set(rows)) != len(rows):
            return J.NotDone(path, "rows and failures do not cover the names")
        check_embeddings(emb, rows, fp["space"], fp["dim"])
    except (EmbeddingError, CorruptFileError) as exc:
        return J.NotDone(path, str(exc))
    except Exception as exc:  # noqa: BLE001 - truncated / foreign file: recompute
        return J.NotDone(path, f"unreadable ({type(exc).__name__}: {exc})")
    return Chunk(rows, failures, emb.float(), meta.get("dtype", ""))


def make_plan(names: list[str], chunk_size: int, fp: dict, image_dir: Path) -> dict[str, Any]:
    """The plan of a run (written to plan.json): names, chunking, fingerprint, each chunk's images' digest."""
    chunked = J.chunks(names, chunk_size)
    return {"format": CHUNK_FORMAT, "space": fp["space"], "dim": fp["dim"], "fingerprint": fp,
            "chunk_size": chunk_size, "n_chunks": len(chunked), "names": names,
            "sources": [sources_digest(image_dir, c) for c in chunked]}
