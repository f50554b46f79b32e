"""Embedding store: images embedded in chunks, atomic and resumable, shardable across processes, merged into one table."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .. import jobs as J
from ..config import ModelsConfig
from ..io import CorruptFileError, list_images, read_safetensors, save_safetensors, write_json
from ..models.encoders import EmbeddingError, Encoder, build_encoder, check_space, expected_dim, fingerprint
from ..progress import tqdm
from ..runtime import resolve_device, resolve_dtype
from ..steps import notebook, redo
from .embed_chunks import (  # space_dir, chunk_path and check_embeddings are this module's API too
    PLAN_NAME,
    Chunk,
    check_embeddings,
    chunk_path,
    make_plan,
    read_chunk,
    some_names,
    space_dir,
    write_chunk,
)

log = logging.getLogger(__name__)


ON_ERROR = ("skip", "raise")

MERGED_FORMAT = "rebeca-embeddings/1"

MERGED_NAME = "embeddings.safetensors"

INDEX_NAME = "index.json"


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


@dataclass(frozen=True)
class EmbedOptions:
    """How an embedding run goes, not what it embeds: device and precision, batch and chunk sizes, what an unreadable
    image does (ON_ERROR), this process's share (rank of world_size), progress bar, data loader workers."""

    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    batch_size: int = 64
    chunk_size: int = 1024
    on_error: str = "skip"
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    num_workers: int = 0

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r}: valid values are {', '.join(ON_ERROR)}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1 (got {self.batch_size}, {self.chunk_size})")
        J.check_rank(self.rank, self.world_size)


@dataclass
class _Job:
    """One process's embedding run: where the images and the store are, the plan and its chunks, the options."""

    image_dir: Path
    out_dir: Path
    space: str
    dim: int
    plan: dict
    opts: EmbedOptions
    device: str
    dtype: torch.dtype
    chunks: list[list[str]] = field(init=False)  # the names of each chunk

    def __post_init__(self):
        self.chunks = J.chunks(self.plan["names"], self.plan["chunk_size"])

    def read(self, i: int) -> Chunk | J.NotDone:
        """Chunk i when it is done (whole and made for this plan), else why not."""
        return read_chunk(chunk_path(self.out_dir, self.space, i), self.chunks[i], self.plan["fingerprint"],
                          self.plan["sources"][i])


def embed_images(image_dir: str | os.PathLike, names: Sequence[str] | None, space: str, models: ModelsConfig,
                 out_dir: str | os.PathLike, options: EmbedOptions | None = None, *, encoder: Encoder | None = None,
                 **option_values) -> EmbeddingStore:
    """Embed `names` (files in `image_dir`; None = every image there) in `space` into `<out_dir>/<space>/`.

    `options` (or its fields as keywords: device, dtype, batch_size, chunk_size, on_error, rank, world_size,
    progress, num_workers) say how. Names are sorted and cut into chunks of `chunk_size`; this process (`rank` of
    `world_size`) handles chunks rank, rank + world_size, ...; each is written atomically when done. Valid chunks
    already on disk are reused (no model is built when nothing is left to do). Unreadable images: on_error="skip"
    records them (name + error) in the chunk and goes on; "raise" raises EmbeddingError("<path>: cannot read image:
    ..."). A wrong-dim or non-finite embedding always raises. `encoder` overrides the one built from `models` (reuse
    a loaded model). Call `merge` (or `.merge()`) once every process is done.
    """
    check_space(space)
    opts = replace(options or EmbedOptions(), **option_values)
    job = _prepare(Path(image_dir), names, space, models, Path(out_dir), opts, encoder)
    store = EmbeddingStore(job.out_dir, space, job.dim, len(job.chunks), opts.rank, opts.world_size)
    todo = _reuse_done(job, store)
    if todo:
        _embed_chunks(job, todo, store, encoder if encoder is not None else
                      build_encoder(space, models, job.device, job.dtype))
    return store


def _prepare(image_dir: Path, names: Sequence[str] | None, space: str, models: ModelsConfig, out_dir: Path,
             opts: EmbedOptions, encoder: Encoder | None) -> _Job:
    """Sort and check the names, resolve device, dtype and encoder identity; clear a killed run's temporaries and
    write the plan."""
    names = sorted(list_images(image_dir) if names is None else names)
    dups = sorted({n for a, n in zip(names, names[1:]) if a == n})
    if dups:
        raise ValueError(f"duplicate image names: {some_names(dups)}")
    device = resolve_device(opts.device)
    dtype = opts.dtype if isinstance(opts.dtype, torch.dtype) else resolve_dtype(device, opts.dtype)
    fp = encoder.fingerprint if encoder is not None else fingerprint(space, models)
    dim = encoder.dim if encoder is not None else expected_dim(space, models)
    if fp.get("space") != space:
        raise ValueError(f"encoder of space {fp.get('space')!r} passed for space {space!r}")
    plan = make_plan(names, opts.chunk_size, fp, image_dir)
    J.clear_orphans(space_dir(out_dir, space), opts.world_size)
    write_json(space_dir(out_dir, space) / PLAN_NAME, plan)  # identical from every process
    return _Job(image_dir, out_dir, space, dim, plan, opts, device, dtype)


def _reuse_done(job: _Job, store: EmbeddingStore) -> list[int]:
    """This process's chunks still to embed; the done ones are reused (a recorded failure raises under "raise")."""
    mine = J.share(range(len(job.chunks)), job.opts.rank, job.opts.world_size)
    todo, done = J.split_done(mine, job.read)
    for i, chunk in done:
        if chunk.failures and job.opts.on_error == "raise":
            f0 = chunk.failures[0]
            raise EmbeddingError(f"{job.image_dir / f0['name']}: cannot read image: {f0['error']} (recorded in "
                                 f"{chunk_path(job.out_dir, job.space, i)}; delete it to retry)")
        store.reused.append(i)
        store.failures += chunk.failures
    return todo


def _batches(chunk_rows: list[list[int]], todo: list[int], batch_size: int) -> tuple[list[list[int]], list[int | None]]:
    """Batches of name indices of the chunks `todo` (none spans two chunks); per batch, the chunk it completes."""
    batches: list[list[int]] = []
    ends: list[int | None] = []  # chunk id when the batch is that chunk's last
    for i in todo:
        parts = J.chunks(chunk_rows[i], batch_size)
        batches += parts
        ends += [None] * (len(parts) - 1) + [i]
    return batches, ends


@dataclass
class _Filling:
    """The chunk being embedded: its rows so far, their embeddings batch by batch, its unreadable images."""

    rows: list[str] = field(default_factory=list)
    embs: list[torch.Tensor] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)


def _embed_chunks(job: _Job, todo: list[int], store: EmbeddingStore, encoder: Encoder) -> None:
    """Embed the chunks `todo` batch by batch (DataLoader workers read the images); each chunk is written as soon
    as its last batch is done."""
    o, names = job.opts, job.plan["names"]
    batches, ends = _batches(J.chunks(range(len(names)), o.chunk_size), todo, o.batch_size)
    loader = torch.utils.data.DataLoader(
        _Images(job.image_dir, names, encoder.transform), batch_sampler=batches, collate_fn=_collate,
        num_workers=o.num_workers, pin_memory=job.device.startswith("cuda"))
    tag = f" [{o.rank}/{o.world_size}]" if o.world_size > 1 else ""
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"{job.space} embeddings{tag}", unit="img",
               disable=not o.progress, position=o.rank)
    filling = _Filling()
    try:
        for (ok, pixels, errors, n), end in zip(loader, ends):
            _add_batch(job, encoder, filling, ok, pixels, errors)
            bar.update(n)
            if end is not None:
                _finish_chunk(job, end, filling, str(encoder.dtype).replace("torch.", ""), store)
                filling = _Filling()
    finally:
        bar.close()


def _add_batch(job: _Job, encoder: Encoder, filling: _Filling, ok: list[int], pixels, errors) -> None:
    """Record a batch's unreadable images (or raise, under "raise") and embed the others into `filling`."""
    names = job.plan["names"]
    for j, err in errors:
        if job.opts.on_error == "raise":
            raise EmbeddingError(f"{job.image_dir / names[j]}: cannot read image: {err}")
        log.warning("%s: cannot read image, skipped: %s", job.image_dir / names[j], err)
        filling.failures.append({"name": names[j], "error": err})
    if ok:
        batch_names = [names[j] for j in ok]
        emb = encoder.encode(pixels)
        check_embeddings(emb, batch_names, job.space, job.dim)
        filling.rows += batch_names
        filling.embs.append(emb.float())


def _finish_chunk(job: _Job, i: int, filling: _Filling, dtype: str, store: EmbeddingStore) -> None:
    """Write chunk i atomically from what `filling` holds and count it as computed."""
    emb = torch.cat(filling.embs) if filling.embs else torch.zeros(0, job.dim)
    chunk = Chunk(filling.rows, filling.failures, emb, dtype)
    write_chunk(chunk_path(job.out_dir, job.space, i), job.chunks[i], chunk, job.plan["fingerprint"], job.device,
                job.plan["sources"][i])
    store.computed.append(i)
    store.failures += filling.failures


def merge(out_dir: str | os.PathLike, space: str) -> Path:
    """Concatenate every chunk of the last plan into `embeddings.safetensors` (float32, (N, dim), rows sorted by
    name) + `index.json` (name -> row, failures); both atomic. Missing or invalid chunks raise EmbeddingError."""

    d = space_dir(out_dir, space)
    try:
        plan = json.loads((d / PLAN_NAME).read_text())
    except OSError as exc:
        raise EmbeddingError(f"{d / PLAN_NAME}: no embedding run found; run embed_images first") from exc
    fp, dim = plan["fingerprint"], plan["dim"]
    chunked = J.chunks(plan["names"], plan["chunk_size"])
    done, missing = J.collect(range(plan["n_chunks"]), lambda i: read_chunk(
        chunk_path(out_dir, space, i), chunked[i], fp, plan["sources"][i]))
    if missing:
        bad = [f"{Path(nd.where).name} ({nd.why})" for _, nd in missing]
        raise EmbeddingError(f"{d}: cannot merge, {len(bad)} of {plan['n_chunks']} chunks not done: "
                             f"{some_names(bad)}; run embed_images (every rank) first")
    rows = [r for c in done for r in c.rows]
    emb = torch.cat([c.emb for c in done]) if done else torch.zeros(0, dim)
    check_embeddings(emb, rows, space, dim)
    meta = {"format": MERGED_FORMAT, "space": space, "dim": str(dim), "fingerprint": json.dumps(fp, sort_keys=True),
            "names": json.dumps(rows)}
    path = save_safetensors({"embeddings": emb.contiguous()}, d / MERGED_NAME, meta)
    write_json(d / INDEX_NAME, {"format": MERGED_FORMAT, "space": space, "dim": dim, "fingerprint": fp,
                                "n": len(rows), "dtypes": sorted({c.dtype for c in done}),
                                "failures": [f for c in done for f in c.failures],
                                "rows": {n: r for r, n in enumerate(rows)}})
    return path


def load_embeddings(out_dir: str | os.PathLike, space: str,
                    models: ModelsConfig | None = None) -> tuple[list[str], torch.Tensor]:
    """(sorted names, float32 (N, dim)) of a merged store; with `models`, the dim and encoder are checked too."""

    d = space_dir(out_dir, space)
    if not (d / MERGED_NAME).is_file():
        raise EmbeddingError(f"{d / MERGED_NAME}: no merged embeddings; run embed_images and merge first, "
                             f"as {notebook(2)} does")
    try:
        tensors, meta = read_safetensors(d / MERGED_NAME, f"{redo(2)}: its chunks are reused")
        emb = tensors["embeddings"].float()
        index = json.loads((d / INDEX_NAME).read_text())
    except CorruptFileError as exc:
        raise EmbeddingError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"{d / INDEX_NAME}: unreadable ({exc}); {redo(2)}") from None
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
        raise KeyError(f"{where}: no embedding for {some_names(missing)}")
    return emb[torch.tensor([rows[n] for n in names], dtype=torch.long)]


def lookup(out_dir: str | os.PathLike, space: str, names: Sequence[str]) -> torch.Tensor:
    """Rows of the merged store for `names`, in that order (loads the file; keep an EmbeddingStore to reuse it)."""
    all_names, emb = load_embeddings(out_dir, space)
    return _take(emb, {n: i for i, n in enumerate(all_names)}, names, space_dir(out_dir, space) / INDEX_NAME)
