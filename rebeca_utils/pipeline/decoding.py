"""Decoding work items into PNGs: one pipeline call per batch, resume by fingerprint, retry, per-process logs."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..config import GenerationConfig, ModelsConfig
from .. import jobs as J
from ..io import atomic_path, image_arrays, sha256, write_json
from ..models.decoder import ip_adapter_embeds
from ..progress import tqdm
from .adapters import Adapters
from .items import WorkItem, check_ip_embeddings, image_settings, item_fingerprint, make_batches, png_relpath

log = logging.getLogger(__name__)


LOG_DIR = "_decode_logs"  # one append-only log per process
SETTINGS_NAME = "decode_settings.json"


def _has_ip_adapter(pipe) -> bool:
    return getattr(pipe.unet, "encoder_hid_proj", None) is not None


def run_batch(pipe, items: Sequence[WorkItem], cfg: GenerationConfig) -> np.ndarray:
    """Decode items (same LoRA) in one pipeline call; (B, H, W, 3) floats in [0, 1]."""
    gens = [torch.Generator(device="cpu").manual_seed(it.seed) for it in items]  # CPU noise: same on any GPU
    kw: dict[str, Any] = {}
    with_emb = [it.ip_embedding is not None for it in items]
    if any(with_emb) and not _has_ip_adapter(pipe):
        raise ValueError("items carry IP-Adapter embeddings but the pipeline has no IP-Adapter loaded")
    if _has_ip_adapter(pipe):
        dim = pipe.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
        emb = torch.stack([it.ip_embedding if it.ip_embedding is not None else torch.zeros(dim) for it in items])
        if emb.shape[1] != dim:
            raise ValueError(f"ip_embedding has {emb.shape[1]} dims; the IP-Adapter takes {dim}")
        kw["ip_adapter_image_embeds"] = [e.to(pipe.unet.dtype) for e in ip_adapter_embeds(emb, cfg.decoder_cfg)]
    if not all(with_emb):
        if any(with_emb):
            raise ValueError("a batch mixes items with and without IP-Adapter embeddings")
        pipe.set_ip_adapter_scale(0.0) if _has_ip_adapter(pipe) else None  # scale 0: diffusers skips the IP path
    try:
        out = pipe(prompt=[it.prompt for it in items], negative_prompt=[it.negative_prompt for it in items],
                   num_inference_steps=cfg.steps, guidance_scale=cfg.decoder_cfg, height=cfg.height, width=cfg.width,
                   generator=gens, output_type="np", **kw)
    finally:
        if _has_ip_adapter(pipe) and not all(with_emb):
            pipe.set_ip_adapter_scale(cfg.ip_adapter_scale)
    return out.images


def blank_image(image: np.ndarray) -> str:
    """Why a decoded image is no image (non-finite or one flat colour, e.g. black from a NaN), else ""."""
    if not np.isfinite(image).all():
        return "decoder returned NaN/inf pixels (numerical overflow; try generation.dtype: fp32)"
    if float(image.max() - image.min()) < 1 / 255:
        return (f"decoder returned a constant image (every pixel {float(image.mean()):.3f}; NaN in the UNet/VAE, "
                "or a zero embedding?)")
    return ""


PNG_KEY = "rebeca"  # PNG text chunk holding the item fingerprint


def _png_bytes(image: np.ndarray, fingerprint: str) -> bytes:

    info = PngInfo()
    info.add_text(PNG_KEY, fingerprint)
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def valid_png(path: Path, size: tuple[int, int], fingerprint: str | None = None) -> bool:
    """True when `path` is a complete PNG of `size` = (width, height), made for `fingerprint` (if given)."""

    try:
        with Image.open(path) as im:
            ok = im.format == "PNG" and im.size == size
            ok &= fingerprint is None or im.info.get(PNG_KEY) == fingerprint
            im.verify()  # checks every chunk's CRC: a truncated file fails here
            return ok
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: not done
        return False


def _record_settings(out_dir: Path, item: WorkItem, settings: dict, pipe) -> None:
    path = out_dir / item.method / item.setting / SETTINGS_NAME
    rec = {**settings, "dtype": str(pipe.unet.dtype).replace("torch.", ""), "scheduler": type(pipe.scheduler).__name__}
    if not path.is_file() or json.loads(path.read_text()) != json.loads(json.dumps(rec)):
        write_json(path, rec)


class _Log:
    """Append-only JSON-lines log of this process (one file per process, so processes never interleave)."""

    def __init__(self, out_dir: Path):
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        self.path = out_dir / LOG_DIR / name
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**rec, "time": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class DecodeReport:
    """What one decode() call did."""

    written: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    retried: int = 0
    seconds: float = 0.0
    batches: int = 0


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class _Run:
    """One decode() call: the pipeline, where and how images are made, what it did so far."""

    pipe: Any
    out_dir: Path
    cfg: GenerationConfig
    settings: dict
    overwrite: bool
    adapters: Adapters
    logger: _Log
    rep: DecodeReport = field(default_factory=DecodeReport)

    def done(self, it: WorkItem) -> bool:
        """The item's PNG exists, decodes and carries its fingerprint."""
        return valid_png(self.out_dir / it.relpath, (self.cfg.width, self.cfg.height), self.fp(it))

    def fp(self, it: WorkItem) -> str:
        """The item's fingerprint under this run's settings."""
        return item_fingerprint(it, self.settings)


def decode(pipe, items: Sequence[WorkItem], out_dir: str | os.PathLike, cfg: GenerationConfig, *,
           batch_size: int | None = None, overwrite: bool = False, rank: int = 0, world_size: int = 1,
           models: ModelsConfig | None = None, progress: bool = True) -> DecodeReport:
    """Decode this process's share of `items` into `<out_dir>/<method>/<setting>/u{user:03d}/{j:02d}.png`.

    PNGs that exist, decode and carry their item's fingerprint are skipped (overwrite=True redoes them); PNGs made
    from other inputs (embedding, prompt, seed, LoRA, settings) are redone. A batch that fails (e.g. out of
    memory) is retried once item by item; items that still fail are logged with their error and the rest go on.
    """
    out_dir = Path(out_dir)
    check_ip_embeddings(items)  # before any work: plans and hand-made items are checked too
    J.clear_orphans(out_dir, world_size, recursive=True)
    batches = J.share(make_batches(items, batch_size or cfg.batch_size), rank, world_size)
    run = _Run(pipe, out_dir, cfg, image_settings(cfg, models), overwrite, Adapters(pipe, batches), _Log(out_dir))
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"decode [{rank}/{world_size}]" if world_size > 1 else "decode",
               unit="img", disable=not progress, position=rank)
    t0 = time.perf_counter()
    try:
        for b, batch in enumerate(batches):
            _decode_batch(run, batch)
            bar.update(len(batch))
            run.adapters.done(b)
    finally:
        bar.close()
        run.adapters.close()
        run.rep.seconds = time.perf_counter() - t0
    return run.rep


def _decode_batch(run: _Run, batch: list[WorkItem]) -> None:
    """Decode a batch whose items are not all done and save the images of those that are not."""
    todo, _ = J.split_done(batch, run.done, redo=run.overwrite)
    run.rep.skipped += len(batch) - len(todo)
    if not todo:
        return
    run.rep.batches += 1
    _record_settings(run.out_dir, batch[0], run.settings, run.pipe)
    # the whole batch is decoded even if some PNGs exist: same batch -> same bytes as an uninterrupted run
    for res in _decoded(run, batch):
        run.rep.retried += len(res.items) if res.retry else 0
        images = res.images if res.images is not None else [None] * len(res.items)
        for it, img in zip(res.items, images):
            if it in todo:
                _save(run, it, img, res.error, res.seconds / len(res.items))


def _save(run: _Run, it: WorkItem, img: np.ndarray | None, error: str, seconds: float) -> None:
    """Write an item's PNG atomically (with its fingerprint) and log it; a missing or blank image is a failure."""
    if img is not None and (bad := blank_image(img)):
        img, error = None, bad
    if img is None:
        run.rep.failed.append({"key": list(it.key), "error": error})
        run.logger.write({"key": list(it.key), "status": "failed", "error": error})
        return
    path = run.out_dir / it.relpath
    with atomic_path(path) as tmp:
        tmp.write_bytes(_png_bytes(img, run.fp(it)))
    run.rep.written += 1
    run.logger.write({"key": list(it.key), "status": "ok", "seconds": seconds, "sha256": sha256(path)})


@dataclass
class _Decoded:
    """Images of some items of a batch (None when they failed, with the error), and whether this was a retry."""

    items: list[WorkItem]
    images: np.ndarray | None
    seconds: float = 0.0
    error: str = ""
    retry: bool = False


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _decoded(run: _Run, batch: list[WorkItem]) -> Iterator[_Decoded]:
    """The batch decoded in one call, or, when that fails, each item alone (one retry); yields as it goes, so
    each image is saved as soon as it exists. An adapter that cannot be loaded fails the whole batch."""
    try:
        run.adapters.use(batch[0].lora)
    except Exception as exc:  # noqa: BLE001 - e.g. an unreadable LoRA: these items fail, the rest go on
        yield _Decoded(batch, None, error=_one_line(exc))
        return
    first = _attempt(run.pipe, batch, run.cfg)
    if first.images is not None:
        yield first
        return
    log.warning("batch of %d failed (%s); retrying at batch size 1", len(batch), first.error)
    for it in batch:
        yield replace(_attempt(run.pipe, [it], run.cfg), retry=True)


def _attempt(pipe, items: list[WorkItem], cfg: GenerationConfig) -> _Decoded:
    """One pipeline call on `items`: their images and seconds, or the error (CUDA memory freed after an OOM)."""
    t0 = time.perf_counter()
    try:
        return _Decoded(items, run_batch(pipe, items, cfg), time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - any failure is reported with the items; the caller retries or logs
        if _is_oom(exc) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _Decoded(items, None, error=_one_line(exc))


def adopt_done(items: Sequence[WorkItem], out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike],
               cfg: GenerationConfig, models: ModelsConfig | None = None) -> int:
    """Copy into `out_dir` every item's PNG that another run (`sources`: its output folders) decoded from the same
    inputs (same relative path and fingerprint: embedding bits, prompts, seed, LoRA, decoder settings), so decode()
    skips it; returns how many items' images are a source's (copied now or by an earlier call)."""
    settings, size, reused = image_settings(cfg, models), (cfg.width, cfg.height), 0
    for it in items:
        fp, dest = item_fingerprint(it, settings), Path(out_dir) / it.relpath
        src = next((p for p in (Path(s) / it.relpath for s in sources) if valid_png(p, size, fp)), None)
        if src is None:
            continue
        reused += 1
        if not (dest.is_file() and dest.read_bytes() == src.read_bytes()):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as tmp:
                tmp.write_bytes(src.read_bytes())
    return reused


def pending(items: Sequence[WorkItem], out_dir: str | os.PathLike, cfg: GenerationConfig,
            models: ModelsConfig | None = None, overwrite: bool = False) -> list[WorkItem]:
    """The items decode() would decode: those without a complete PNG made from their inputs (all with overwrite)."""
    settings, size = image_settings(cfg, models), (cfg.width, cfg.height)
    return J.split_done(items, lambda it: valid_png(Path(out_dir) / it.relpath, size, item_fingerprint(it, settings)),
                        redo=overwrite)[0]


def load_images(out_dir: str | os.PathLike, method: str, setting: str, user_id: int, n: int) -> np.ndarray:
    """(n, H, W, 3) floats in [0, 1]: images 0..n-1 of one user (missing ones are grey)."""
    paths = [Path(out_dir) / png_relpath(method, setting, user_id, j) for j in range(n)]
    found = iter(image_arrays([p for p in paths if p.is_file()]))
    out = [next(found) if p.is_file() else None for p in paths]
    shape = next((a.shape for a in out if a is not None), (8, 8, 3))
    return np.stack([a if a is not None else np.full(shape, 0.5, np.float32) for a in out])
