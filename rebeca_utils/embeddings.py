"""Image embeddings in the two spaces the paper uses, batched, resumable and shardable across processes.

Spaces:

* ``decoder``  - ``image_embeds`` of the IP-Adapter's own image encoder (h94/IP-Adapter ``models/image_encoder``,
  CLIPVisionModelWithProjection = OpenCLIP ViT-H-14, 1024-d, not normalised) with its CLIPImageProcessor: the
  vector SD-1.5's IP-Adapter consumes, so embeddings sampled by the prior decode in-distribution.
* ``verifier`` - OpenCLIP ViT-bigG-14 ``encode_image`` (1280-d) with its own preprocessing: a different backbone on
  purpose, for metrics. Stored raw (not normalised); metrics normalise.

On-disk layout under ``<out_dir>/<space>/``::

    plan.json                    the sorted names, chunk size and encoder fingerprint of the run
    chunk_00000.safetensors      rows of chunk 0 + metadata (requested names, embedded names, failures)
    ...
    embeddings.safetensors       merged float32 (N, d); the names are also in its metadata
    index.json                   name -> row (sorted by name), failures (name + error), space, dim, fingerprint

Chunk ``i`` holds names ``[i*chunk_size, (i+1)*chunk_size)`` of the sorted names and is owned by process
``i % world_size``. Every file is written to a temp file and renamed, so an interrupted run leaves whole chunks
only; on restart, chunks already present and valid (same names, encoder, dim, all finite) are reused, so a rerun
with everything present builds no model at all.

Multi-GPU: ``accelerate launch --multi_gpu --num_processes N -m rebeca_utils.embeddings --image-dir ... --out-dir
... --space decoder --profile paper``; each process embeds its chunks, all wait, process 0 merges. (On CPU-only
machines the same command runs N CPU processes; ``accelerate launch --cpu --num_processes N`` starts only one
process unless an MPI hostfile is given - accelerate's ``--cpu`` uses its simple launcher. Without accelerate:
``--rank r --world-size N`` per process, then ``--merge-only``.)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .artifacts import atomic_path, write_json
from .config import PROFILES, ModelsConfig, get_profile

SPACES = ("decoder", "verifier")
ON_ERROR = ("skip", "raise")
CHUNK_FORMAT = "rebeca-embeddings-chunk/1"
MERGED_FORMAT = "rebeca-embeddings/1"
MERGED_NAME = "embeddings.safetensors"
INDEX_NAME = "index.json"
PLAN_NAME = "plan.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

log = logging.getLogger(__name__)


class EmbeddingError(RuntimeError):
    """An image cannot be read, an embedding is malformed (wrong dim, NaN/inf), or a store is incomplete."""


# ----------------------------------------------------------------------------------------------- encoders


def expected_dim(space: str, models: ModelsConfig) -> int:
    """Embedding width of `space` under `models` (decoder_emb_dim or verifier_emb_dim)."""
    _check_space(space)
    return models.decoder_emb_dim if space == "decoder" else models.verifier_emb_dim


def fingerprint(space: str, models: ModelsConfig) -> dict[str, Any]:
    """What determines the embeddings of `space` (model identity and width); chunks made otherwise are recomputed.
    Device and dtype are not part of it: a store made on a GPU in fp16 is reused on a CPU."""
    _check_space(space)
    if space == "decoder":
        model = f"{models.ip_adapter_id}/{models.image_encoder_subfolder}"
    else:
        model = "/".join(models.verifier_clip)
    fp: dict[str, Any] = {"space": space, "builder": models.builder, "dim": expected_dim(space, models)}
    if models.builder == "tiny":
        fp["seed"] = models.seed
    else:
        fp["model"] = model
    return fp


class Encoder:
    """Images -> embeddings of one space. `transform` (picklable, PIL image -> (3, H, W) float tensor) runs in
    the data loader; `encode` (batched pixels -> (B, dim) float32 on CPU) runs the model."""

    space: str
    dim: int
    fingerprint: dict[str, Any]
    transform: Callable[[Any], torch.Tensor]
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._forward(pixels.to(device=self.device, dtype=self.dtype, non_blocking=True))
        return out.float().cpu()

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _HFTransform:
    """CLIPImageProcessor applied to one image (module-level class, so DataLoader workers can pickle it)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt").pixel_values[0]


class DecoderEncoder(Encoder):
    """IP-Adapter image encoder (CLIPVisionModelWithProjection) + its CLIPImageProcessor; output `.image_embeds`."""

    space = "decoder"

    def __init__(self, models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from .components import build_image_encoder

        self.model, processor = build_image_encoder(models, device=device, dtype=dtype)
        self.transform = _HFTransform(processor)
        self.dim, self.fingerprint = models.decoder_emb_dim, fingerprint("decoder", models)
        self.device, self.dtype = device, dtype
        got = self.model.config.projection_dim
        if got != self.dim:
            raise EmbeddingError(f"decoder space: the image encoder projects to {got} dims, but "
                                 f"models.decoder_emb_dim={self.dim}")

    def _forward(self, pixels):
        return self.model(pixel_values=pixels).image_embeds


class VerifierEncoder(Encoder):
    """open_clip verifier (ViT-bigG-14 in the paper) with its own preprocess; raw `encode_image`, not normalised."""

    space = "verifier"

    def __init__(self, models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from .components import build_clip

        self.model, self.transform, _ = build_clip(models, "verifier", device=device, dtype=dtype)
        self.dim, self.fingerprint = models.verifier_emb_dim, fingerprint("verifier", models)
        self.device, self.dtype = device, dtype

    def _forward(self, pixels):
        return self.model.encode_image(pixels, normalize=False)


def build_encoder(space: str, models: ModelsConfig, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Encoder:
    """The encoder of `space` ("decoder" | "verifier") built from `models` (tiny or Hub weights)."""
    _check_space(space)
    return (DecoderEncoder if space == "decoder" else VerifierEncoder)(models, device, dtype)


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


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space={space!r}: valid spaces are {', '.join(SPACES)}")


# ----------------------------------------------------------------------------------------------- images


def list_image_files(image_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the image files (.jpg/.jpeg/.png) directly in `image_dir`."""
    d = Path(image_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: image folder not found")
    with os.scandir(d) as it:
        return sorted(e.name for e in it if e.name.lower().endswith(IMAGE_EXTS) and e.is_file())


class _Images(torch.utils.data.Dataset):
    """(index, pixels or None, error or None) per name; reading and preprocessing errors are returned, not raised."""

    def __init__(self, image_dir: Path, names: Sequence[str], transform):
        self.image_dir, self.names, self.transform = image_dir, names, transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        from PIL import Image

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


# ----------------------------------------------------------------------------------------------- chunks


def space_dir(out_dir: str | os.PathLike, space: str) -> Path:
    _check_space(space)
    return Path(out_dir) / space


def chunk_path(out_dir: str | os.PathLike, space: str, i: int) -> Path:
    return space_dir(out_dir, space) / f"chunk_{i:05d}.safetensors"


@dataclass
class _Chunk:
    rows: list[str]  # names with an embedding, in order
    failures: list[dict[str, str]]  # {"name", "error"}
    emb: torch.Tensor  # (len(rows), dim) float32
    dtype: str = ""


def _write_chunk(path: Path, names: list[str], chunk: _Chunk, fp: dict, device: str) -> None:
    from safetensors.torch import save_file

    meta = {"format": CHUNK_FORMAT, "space": fp["space"], "dim": str(fp["dim"]),
            "fingerprint": json.dumps(fp, sort_keys=True), "names": json.dumps(names),
            "rows": json.dumps(chunk.rows), "failures": json.dumps(chunk.failures),
            "dtype": chunk.dtype, "device": device}
    with atomic_path(path) as tmp:
        save_file({"embeddings": chunk.emb.float().contiguous()}, str(tmp), metadata=meta)


def _read_chunk(path: Path, names: list[str], fp: dict) -> tuple[_Chunk | None, str]:
    """The chunk at `path` if it is whole and matches (names, fingerprint, dim, finite); else (None, why)."""
    from safetensors import safe_open

    if not path.is_file():
        return None, "missing"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            emb = f.get_tensor("embeddings")
        if meta.get("format") != CHUNK_FORMAT:
            return None, f"unknown format {meta.get('format')!r}"
        if json.loads(meta["fingerprint"]) != fp:
            return None, f"made by another encoder ({meta['fingerprint']})"
        if json.loads(meta["names"]) != names:
            return None, "holds other names (image list or chunk size changed)"
        rows, failures = json.loads(meta["rows"]), json.loads(meta["failures"])
        failed = [f_["name"] for f_ in failures]
        if sorted(rows + failed) != names or len(set(rows)) != len(rows):
            return None, "rows and failures do not cover the names"
        check_embeddings(emb, rows, fp["space"], fp["dim"])
    except EmbeddingError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - truncated / foreign file: recompute
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    return _Chunk(rows, failures, emb.float(), meta.get("dtype", "")), ""


def _plan(names: list[str], chunk_size: int, fp: dict) -> dict[str, Any]:
    n_chunks = (len(names) + chunk_size - 1) // chunk_size
    return {"format": CHUNK_FORMAT, "space": fp["space"], "dim": fp["dim"], "fingerprint": fp,
            "chunk_size": chunk_size, "n_chunks": n_chunks, "names": names}


def _chunk_names(plan: dict, i: int) -> list[str]:
    c = plan["chunk_size"]
    return plan["names"][i * c:(i + 1) * c]


# ----------------------------------------------------------------------------------------------- embedding


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
    from tqdm.auto import tqdm

    from . import resolve_device, resolve_dtype

    _check_space(space)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: valid values are {', '.join(ON_ERROR)}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1 (got {batch_size}, {chunk_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    image_dir = Path(image_dir)
    names = sorted(list_image_files(image_dir) if names is None else names)
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

    plan = _plan(names, chunk_size, fp)
    write_json(space_dir(out_dir, space) / PLAN_NAME, plan)  # identical from every process
    store = EmbeddingStore(Path(out_dir), space, dim, plan["n_chunks"], rank, world_size)

    todo: list[int] = []
    for i in range(rank, plan["n_chunks"], world_size):
        chunk, why = _read_chunk(chunk_path(out_dir, space, i), _chunk_names(plan, i), fp)
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
                _write_chunk(chunk_path(out_dir, space, end), _chunk_names(plan, end), chunk, fp, device)
                store.computed.append(end)
                store.failures += failures
                rows, embs, failures = [], [], []
    finally:
        bar.close()
    return store


# ----------------------------------------------------------------------------------------------- merge / load


def merge(out_dir: str | os.PathLike, space: str) -> Path:
    """Concatenate every chunk of the last plan into `embeddings.safetensors` (float32, (N, dim), rows sorted by
    name) + `index.json` (name -> row, failures); both atomic. Missing or invalid chunks raise EmbeddingError."""
    from safetensors.torch import save_file

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
        chunk, why = _read_chunk(chunk_path(out_dir, space, i), _chunk_names(plan, i), fp)
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
    path = d / MERGED_NAME
    with atomic_path(path) as tmp:
        save_file({"embeddings": emb.contiguous()}, str(tmp), metadata=meta)
    write_json(d / INDEX_NAME, {"format": MERGED_FORMAT, "space": space, "dim": dim, "fingerprint": fp,
                                "n": len(rows), "dtypes": sorted(dtypes), "failures": failures,
                                "rows": {n: r for r, n in enumerate(rows)}})
    return path


def load_embeddings(out_dir: str | os.PathLike, space: str,
                    models: ModelsConfig | None = None) -> tuple[list[str], torch.Tensor]:
    """(sorted names, float32 (N, dim)) of a merged store; with `models`, the dim and encoder are checked too."""
    from safetensors import safe_open

    d = space_dir(out_dir, space)
    try:
        with safe_open(str(d / MERGED_NAME), "pt") as f:
            meta = f.metadata() or {}
            emb = f.get_tensor("embeddings").float()
        index = json.loads((d / INDEX_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"{d}: no merged embeddings ({exc}); run embed_images and merge first") from exc
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


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rebeca_utils.embeddings", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--rank", type=int, help="without accelerate: this process's rank (use with --world-size)")
    p.add_argument("--world-size", type=int, help="without accelerate: number of processes")
    p.add_argument("--merge-only", action="store_true", help="only merge finished chunks")
    p.add_argument("--no-merge", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; under `accelerate launch` each process takes its share and process 0 merges."""
    from .processes import process_share

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge_only:
        print(json.dumps({"merged": str(merge(args.out_dir, args.space))}), flush=True)
        return 0
    share = process_share(args.device, args.rank, args.world_size)
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
    share.report(summary)
    share.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
