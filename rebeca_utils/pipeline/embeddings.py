"""Embedding store: images embedded in chunks, atomic and resumable, shardable across processes, merged into one table."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..config import ModelsConfig
from ..io import (
    ORPHAN_AGE_S,
    CorruptFileError,
    list_images,
    read_safetensors,
    remove_orphans,
    save_safetensors,
    write_json,
)
from ..models.encoders import (
    EmbeddingError,
    Encoder,
    build_encoder,
    check_space,
    expected_dim,
    fingerprint,
)
from ..progress import tqdm
from ..runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


ON_ERROR = ("skip", "raise")

CHUNK_FORMAT = "rebeca-embeddings-chunk/1"

MERGED_FORMAT = "rebeca-embeddings/1"

MERGED_NAME = "embeddings.safetensors"

INDEX_NAME = "index.json"

PLAN_NAME = "plan.json"


def check_embeddings(emb: torch.Tensor, names: Sequence[str], space: str, dim: int) -> None:
    """Refuse a (len(names), dim) batch that has another shape or non-finite values; the error names the images."""
    shape = tuple(emb.shape)
    if emb.ndim != 2 or shape[0] != len(names) or shape[1] != dim:
        raise EmbeddingError(f"{space} space: {_some(names)}: embedding has shape {shape}, expected "
                             f"({len(names)}, {dim}) (wrong dim for this space?)")
    bad = ~torch.isfinite(emb).all(dim=1)
    if bad.any():
        which = [n for n, b in zip(names, bad.tolist()) if b]
        raise EmbeddingError(f"{space} space: {_some(which)}: embedding has NaN/inf values")


def _some(names: Sequence[str], k: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f" (and {len(names) - k} more)" if len(names) > k else "")


class _Images(torch.utils.data.Dataset):
    """(index, pixels or None, error or None) per name; reading and preprocessing errors are returned, not raised."""

    def __init__(self, image_dir: Path, names: Sequence[str], transform):
        self.image_dir, self.names, self.transform = image_dir, names, transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):

        try:
            with Image.open(self.image_dir / self.names[i]) as im:
                im.load()  # decode now: truncated / corrupt files fail here, not later
                rgb = im.convert("RGB")
            return i, self.transform(rgb), None
        except Exception as exc:  # noqa: BLE001 - any reading/decoding failure is reported with the name
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(batch):
    """(indices read, stacked pixels or None, [(index, error)], batch size); stacking here lets pin_memory work."""
    ok = [(i, px) for i, px, err in batch if err is None]
    pixels = torch.stack([px for _, px in ok]) if ok else None
    return [i for i, _ in ok], pixels, [(i, err) for i, _, err in batch if err is not None], len(batch)


def space_dir(out_dir: str | os.PathLike, space: str) -> Path:
    """`<out_dir>/<space>`: the store folder of one space."""
    check_space(space)
    return Path(out_dir) / space


def chunk_path(out_dir: str | os.PathLike, space: str, i: int) -> Path:
    """Path of chunk i of a space."""
    return space_dir(out_dir, space) / f"chunk_{i:05d}.safetensors"


@dataclass
class _Chunk:
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


def _write_chunk(path: Path, names: list[str], chunk: _Chunk, fp: dict, device: str, sources: str) -> None:

    meta = {"format": CHUNK_FORMAT, "space": fp["space"], "dim": str(fp["dim"]),
            "fingerprint": json.dumps(fp, sort_keys=True), "names": json.dumps(names),
            "rows": json.dumps(chunk.rows), "failures": json.dumps(chunk.failures),
            "dtype": chunk.dtype, "device": device, "sources": sources}
    save_safetensors({"embeddings": chunk.emb.float().contiguous()}, path, meta)


def _read_chunk(path: Path, names: list[str], fp: dict, sources: str) -> tuple[_Chunk | None, str]:
    """The chunk at `path` if it is whole and matches (names, images, fingerprint, dim, finite); else (None, why)."""

    if not path.is_file():
        return None, "missing"
    try:
        tensors, meta = read_safetensors(path, "rerun")
        emb = tensors["embeddings"]
        if meta.get("format") != CHUNK_FORMAT:
            return None, f"unknown format {meta.get('format')!r}"
        if json.loads(meta["fingerprint"]) != fp:
            return None, f"made by another encoder ({meta['fingerprint']})"
        if json.loads(meta["names"]) != names:
            return None, "holds other names (image list or chunk size changed)"
        if meta.get("sources") != sources:
            return None, "its images changed on disk (size or modification time)"
        rows, failures = json.loads(meta["rows"]), json.loads(meta["failures"])
        failed = [f_["name"] for f_ in failures]
        if sorted(rows + failed) != names or len(set(rows)) != len(rows):
            return None, "rows and failures do not cover the names"
        check_embeddings(emb, rows, fp["space"], fp["dim"])
    except (EmbeddingError, CorruptFileError) as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - truncated / foreign file: recompute
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    return _Chunk(rows, failures, emb.float(), meta.get("dtype", "")), ""


def _plan(names: list[str], chunk_size: int, fp: dict, image_dir: Path) -> dict[str, Any]:
    n_chunks = (len(names) + chunk_size - 1) // chunk_size
    sources = [sources_digest(image_dir, names[i * chunk_size:(i + 1) * chunk_size]) for i in range(n_chunks)]
    return {"format": CHUNK_FORMAT, "space": fp["space"], "dim": fp["dim"], "fingerprint": fp,
            "chunk_size": chunk_size, "n_chunks": n_chunks, "names": names, "sources": sources}


def _chunk_names(plan: dict, i: int) -> list[str]:
    c = plan["chunk_size"]
    return plan["names"][i * c:(i + 1) * c]


@dataclass
class EmbeddingStore:
    """Handle on `<out_dir>/<space>` after `embed_images` (this process's share) and, once merged, the table."""

    out_dir: Path
    space: str
    dim: int
    n_chunks: int
    rank: int = 0
    world_size: int = 1
    computed: list[int] = field(default_factory=list)  # chunks this process embedded
    reused: list[int] = field(default_factory=list)  # chunks this process found done
    failures: list[dict[str, str]] = field(default_factory=list)  # unreadable images of this process's chunks
    _table: tuple[list[str], torch.Tensor, dict[str, int]] | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return space_dir(self.out_dir, self.space) / MERGED_NAME

    @property
    def index_path(self) -> Path:
        return space_dir(self.out_dir, self.space) / INDEX_NAME

    def merge(self) -> Path:
        self._table = None
        return merge(self.out_dir, self.space)

    def load(self) -> tuple[list[str], torch.Tensor]:
        """(sorted names, float32 (N, dim)) of the merged store."""
        if self._table is None:
            names, emb = load_embeddings(self.out_dir, self.space)
            self._table = (names, emb, {n: i for i, n in enumerate(names)})
        return self._table[0], self._table[1]

    def lookup(self, names: Sequence[str]) -> torch.Tensor:
        """Rows for `names`, in that order; unknown or failed names raise KeyError."""
        self.load()
        return _take(self._table[1], self._table[2], names, self.index_path)


def embed_images(image_dir: str | os.PathLike, names: Sequence[str] | None, space: str, models: ModelsConfig,
                 out_dir: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype = "auto",
                 batch_size: int = 64, chunk_size: int = 1024, on_error: str = "skip", rank: int = 0,
                 world_size: int = 1, progress: bool = True, num_workers: int = 0,
                 encoder: Encoder | None = None) -> EmbeddingStore:
    """Embed `names` (files in `image_dir`; None = every image there) in `space` into `<out_dir>/<space>/`.

    Names are sorted and cut into chunks of `chunk_size`; this process (`rank` of `world_size`) handles chunks
    rank, rank + world_size, ...; each is written atomically when done. Valid chunks already on disk are reused
    (no model is built when nothing is left to do). Unreadable images: on_error="skip" records them (name + error)
    in the chunk and goes on; "raise" raises EmbeddingError("<path>: cannot read image: ..."). A wrong-dim or
    non-finite embedding always raises. `encoder` overrides the one built from `models` (reuse a loaded model).
    Call `merge` (or `.merge()`) once every process is done.
    """

    check_space(space)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: valid values are {', '.join(ON_ERROR)}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1 (got {batch_size}, {chunk_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    image_dir = Path(image_dir)
    names = sorted(list_images(image_dir) if names is None else names)
    dups = sorted({n for a, n in zip(names, names[1:]) if a == n})
    if dups:
        raise ValueError(f"duplicate image names: {_some(dups)}")
    device = resolve_device(device)
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(device, dtype)
    fp = encoder.fingerprint if encoder is not None else fingerprint(space, models)
    dim = encoder.dim if encoder is not None else expected_dim(space, models)
    if fp.get("space") != space:
        raise ValueError(f"encoder of space {fp.get('space')!r} passed for space {space!r}")

    plan = _plan(names, chunk_size, fp, image_dir)
    # temporaries of a killed run; with several processes, spare the fresh ones of the others
    remove_orphans(space_dir(out_dir, space), min_age_s=0 if world_size == 1 else ORPHAN_AGE_S)
    write_json(space_dir(out_dir, space) / PLAN_NAME, plan)  # identical from every process
    store = EmbeddingStore(Path(out_dir), space, dim, plan["n_chunks"], rank, world_size)

    todo: list[int] = []
    for i in range(rank, plan["n_chunks"], world_size):
        chunk, why = _read_chunk(chunk_path(out_dir, space, i), _chunk_names(plan, i), fp, plan["sources"][i])
        if chunk is None:
            if why != "missing":
                log.warning("%s: recomputing: %s", chunk_path(out_dir, space, i), why)
            todo.append(i)
            continue
        if chunk.failures and on_error == "raise":
            f0 = chunk.failures[0]
            raise EmbeddingError(f"{image_dir / f0['name']}: cannot read image: {f0['error']} (recorded in "
                                 f"{chunk_path(out_dir, space, i)}; delete it to retry)")
        store.reused.append(i)
        store.failures += chunk.failures
    if not todo:
        return store

    if encoder is None:
        encoder = build_encoder(space, models, device, dtype)
    batches: list[list[int]] = []
    ends: list[int | None] = []  # chunk id when the batch is that chunk's last
    for i in todo:
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, len(names))
        for s in range(lo, hi, batch_size):
            batches.append(list(range(s, min(s + batch_size, hi))))
            ends.append(i if s + batch_size >= hi else None)
    loader = torch.utils.data.DataLoader(
        _Images(image_dir, names, encoder.transform), batch_sampler=batches, collate_fn=_collate,
        num_workers=num_workers, pin_memory=device.startswith("cuda"))
    total = sum(len(b) for b in batches)
    tag = f" [{rank}/{world_size}]" if world_size > 1 else ""
    bar = tqdm(total=total, desc=f"{space} embeddings{tag}", unit="img", disable=not progress, position=rank)
    rows: list[str] = []
    embs: list[torch.Tensor] = []
    failures: list[dict[str, str]] = []
    try:
        for (ok, pixels, errors, n), end in zip(loader, ends):
            for j, err in errors:
                if on_error == "raise":
                    raise EmbeddingError(f"{image_dir / names[j]}: cannot read image: {err}")
                log.warning("%s: cannot read image, skipped: %s", image_dir / names[j], err)
                failures.append({"name": names[j], "error": err})
            if ok:
                batch_names = [names[j] for j in ok]
                emb = encoder.encode(pixels)
                check_embeddings(emb, batch_names, space, dim)
                rows += batch_names
                embs.append(emb.float())
            bar.update(n)
            if end is not None:
                chunk = _Chunk(rows, failures, torch.cat(embs) if embs else torch.zeros(0, dim),
                               str(encoder.dtype).replace("torch.", ""))
                _write_chunk(chunk_path(out_dir, space, end), _chunk_names(plan, end), chunk, fp, device,
                             plan["sources"][end])
                store.computed.append(end)
                store.failures += failures
                rows, embs, failures = [], [], []
    finally:
        bar.close()
    return store


def merge(out_dir: str | os.PathLike, space: str) -> Path:
    """Concatenate every chunk of the last plan into `embeddings.safetensors` (float32, (N, dim), rows sorted by
    name) + `index.json` (name -> row, failures); both atomic. Missing or invalid chunks raise EmbeddingError."""

    d = space_dir(out_dir, space)
    try:
        plan = json.loads((d / PLAN_NAME).read_text())
    except OSError as exc:
        raise EmbeddingError(f"{d / PLAN_NAME}: no embedding run found; run embed_images first") from exc
    fp, dim = plan["fingerprint"], plan["dim"]
    rows: list[str] = []
    embs: list[torch.Tensor] = []
    failures: list[dict[str, str]] = []
    dtypes: set[str] = set()
    bad = []
    for i in range(plan["n_chunks"]):
        chunk, why = _read_chunk(chunk_path(out_dir, space, i), _chunk_names(plan, i), fp, plan["sources"][i])
        if chunk is None:
            bad.append(f"{chunk_path(out_dir, space, i).name} ({why})")
            continue
        rows += chunk.rows
        embs.append(chunk.emb)
        failures += chunk.failures
        dtypes.add(chunk.dtype)
    if bad:
        raise EmbeddingError(f"{d}: cannot merge, {len(bad)} of {plan['n_chunks']} chunks not done: "
                             f"{_some(bad)}; run embed_images (every rank) first")
    emb = torch.cat(embs) if embs else torch.zeros(0, dim)
    check_embeddings(emb, rows, space, dim)
    meta = {"format": MERGED_FORMAT, "space": space, "dim": str(dim), "fingerprint": json.dumps(fp, sort_keys=True),
            "names": json.dumps(rows)}
    path = save_safetensors({"embeddings": emb.contiguous()}, d / MERGED_NAME, meta)
    write_json(d / INDEX_NAME, {"format": MERGED_FORMAT, "space": space, "dim": dim, "fingerprint": fp,
                                "n": len(rows), "dtypes": sorted(dtypes), "failures": failures,
                                "rows": {n: r for r, n in enumerate(rows)}})
    return path


def load_embeddings(out_dir: str | os.PathLike, space: str,
                    models: ModelsConfig | None = None) -> tuple[list[str], torch.Tensor]:
    """(sorted names, float32 (N, dim)) of a merged store; with `models`, the dim and encoder are checked too."""

    d = space_dir(out_dir, space)
    if not (d / MERGED_NAME).is_file():
        raise EmbeddingError(f"{d / MERGED_NAME}: no merged embeddings; run embed_images and merge first "
                             "(notebook 02)")
    try:
        tensors, meta = read_safetensors(d / MERGED_NAME, "rerun notebook 02 (its chunks are reused)")
        emb = tensors["embeddings"].float()
        index = json.loads((d / INDEX_NAME).read_text())
    except CorruptFileError as exc:
        raise EmbeddingError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"{d / INDEX_NAME}: unreadable ({exc}); rerun notebook 02") from None
    names = json.loads(meta.get("names", "null"))
    if meta.get("format") != MERGED_FORMAT or names is None:
        raise EmbeddingError(f"{d / MERGED_NAME}: not a merged embedding file")
    if index.get("rows") != {n: r for r, n in enumerate(names)}:
        raise EmbeddingError(f"{d / INDEX_NAME} does not match {d / MERGED_NAME}; rerun merge")
    fp = json.loads(meta["fingerprint"])
    if models is not None and fp != fingerprint(space, models):
        raise EmbeddingError(f"{d / MERGED_NAME} was made by {fp}, not {fingerprint(space, models)}")
    check_embeddings(emb, names, space, int(meta["dim"]))
    return names, emb


def failures(out_dir: str | os.PathLike, space: str) -> list[dict[str, str]]:
    """Images the merged store lacks because they could not be read: [{"name", "error"}]."""
    return json.loads((space_dir(out_dir, space) / INDEX_NAME).read_text())["failures"]


def _take(emb: torch.Tensor, rows: dict[str, int], names: Sequence[str], where: Path) -> torch.Tensor:
    missing = [n for n in names if n not in rows]
    if missing:
        raise KeyError(f"{where}: no embedding for {_some(missing)}")
    return emb[torch.tensor([rows[n] for n in names], dtype=torch.long)]


def lookup(out_dir: str | os.PathLike, space: str, names: Sequence[str]) -> torch.Tensor:
    """Rows of the merged store for `names`, in that order (loads the file; keep an EmbeddingStore to reuse it)."""
    all_names, emb = load_embeddings(out_dir, space)
    return _take(emb, {n: i for i, n in enumerate(all_names)}, names, space_dir(out_dir, space) / INDEX_NAME)
