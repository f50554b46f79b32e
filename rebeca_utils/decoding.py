"""Images from work items: one decoding entry point (SD-1.5 + IP-Adapter, optional LoRA) for every method.

A work item is ``(method, setting, user_id, index, seed, prompt, negative_prompt, ip_embedding | None, lora | None)``.
REBECA fills ``ip_embedding`` with a prior sample; the LoRA baselines set ``lora``; the persona baselines set the
prompts. Everything else - batching, seeds, files, resume, sharding, failures - is shared.

Layout under ``out_dir`` (the notebook's folder)::

    <method>/<setting>/u{user:03d}/{j:02d}.png    one image per item, written atomically; its PNG text chunk
                                                  "rebeca" holds the item's fingerprint
    <method>/<setting>/decode_settings.json       the decoder settings of the last decoding pass
    plan/items.parquet, plan/ip_embeddings.safetensors, plan/plan.json    the work (read by the CLI)
    _decode_logs/*.jsonl                           one append-only log per process (seconds, failures)
    generation_manifest.csv                        method, setting, user_id, index, seed, prompt, path, sha256, ...

An item's fingerprint hashes everything that determines its image (embedding, prompts, seed, LoRA, decoder
settings, models; not the device or dtype). Items are sorted and cut into fixed batches within one
(method, setting, user) - so a batch shares its LoRA adapter and never depends on which other users or settings
are in the run; batch ``b`` belongs to process ``b % world_size``. A batch is skipped when all its PNGs exist,
decode and carry their item's fingerprint; otherwise it is decoded whole and only the missing or stale PNGs are
written. Because a batch always holds the same items, a run that is killed and resumed, or split across
processes, writes byte-identical files for the same batch size, device and thread count.

Multi-GPU: ``accelerate launch --multi_gpu --num_processes N -m rebeca_utils.decoding --out-dir <folder>`` decodes
the plan a notebook saved there; process 0 writes the manifest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from .artifacts import atomic_path, write_json
from .config import GenerationConfig, ModelsConfig

PLAN_DIR = "plan"
LOG_DIR = "_decode_logs"
MANIFEST_NAME = "generation_manifest.csv"
SETTINGS_NAME = "decode_settings.json"
REENCODE_CHUNK = 4096  # images per embedding chunk when generated images are re-encoded
MANIFEST_COLUMNS = ["method", "setting", "user_id", "index", "seed", "prompt", "negative_prompt", "lora", "path",
                    "sha256", "seconds", "status", "error"]

log = logging.getLogger(__name__)


def decoder_seed(user_id: int, index: int, base: int = 42) -> int:
    """Decoder seed of image j of user u: 42 + 10,000 u + j (App G.3), the same for every method."""
    return int(base) + 10_000 * int(user_id) + int(index)


@dataclass(frozen=True)
class WorkItem:
    """One image to decode."""

    method: str
    setting: str
    user_id: int
    index: int
    seed: int
    prompt: str = ""
    negative_prompt: str = ""
    ip_embedding: torch.Tensor | None = field(default=None, compare=False, repr=False)
    lora: str | None = None

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.method, self.setting, self.user_id, self.index)

    @property
    def relpath(self) -> str:
        return f"{self.method}/{self.setting}/u{self.user_id:03d}/{self.index:02d}.png"


def make_items(method: str, setting: str, user_ids: Sequence[int], indices: Sequence[int], cfg: GenerationConfig,
               ip_embeddings: torch.Tensor | None = None, prompts: Sequence[str] | None = None,
               negative_prompts: Sequence[str] | None = None, loras: Sequence[str | None] | None = None
               ) -> list[WorkItem]:
    """Work items for (user_ids[i], indices[i]) with the App G.3 decoder seeds and the config's prompts."""
    n = len(user_ids)
    if len(indices) != n or any(x is not None and len(x) != n for x in (ip_embeddings, prompts, negative_prompts, loras)):
        raise ValueError(f"make_items: user_ids has {n} entries; indices, ip_embeddings, prompts, negative_prompts "
                         f"and loras must have as many")
    return [WorkItem(method, setting, int(u), int(j), decoder_seed(u, j, cfg.seed_base),
                     cfg.prompt if prompts is None else prompts[i],
                     cfg.negative_prompt if negative_prompts is None else negative_prompts[i],
                     None if ip_embeddings is None else ip_embeddings[i].detach().float().cpu(),
                     None if loras is None else loras[i])
            for i, (u, j) in enumerate(zip(user_ids, indices))]


# ----------------------------------------------------------------------------------------------- pipeline


class RebecaDecoderPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline that gives every image of a batch its own IP-Adapter embedding."""

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device,
                                        num_images_per_prompt, do_classifier_free_guidance):
        # diffusers repeats the given embeddings `batch` times (made for one embedding shared by the batch), so a
        # batch of B distinct embeddings would give every image all B images' tokens; ours hold one row per image
        if ip_adapter_image_embeds is None:
            raise ValueError("RebecaDecoderPipeline takes ip_adapter_image_embeds (one row per image), not images")
        rows = num_images_per_prompt * (2 if do_classifier_free_guidance else 1)
        for e in ip_adapter_image_embeds:
            if e.shape[0] != rows:
                raise ValueError(f"ip_adapter_image_embeds has {e.shape[0]} rows; expected {rows} "
                                 f"({num_images_per_prompt} images{', negatives first' if rows > num_images_per_prompt else ''})")
        return [e.to(device) for e in ip_adapter_image_embeds]


def ip_adapter_embeds(img_emb: torch.Tensor, decoder_cfg: float) -> list[torch.Tensor]:
    """`ip_adapter_image_embeds` for (B, d) embeddings: [cat([zeros, emb])] as (2B, 1, d) when CFG > 1, else [(B, 1, d)].

    The reference code passed the concatenated pair at CFG 1 too, which doubles the image tokens of each image."""
    if img_emb.ndim != 2:
        raise ValueError(f"img_emb must be (batch, dim), got shape {tuple(img_emb.shape)}")
    pos = img_emb[:, None, :]
    return [torch.cat([torch.zeros_like(pos), pos])] if decoder_cfg > 1 else [pos]


def build_decoder(models: ModelsConfig, cfg: GenerationConfig, device: str = "cpu", ip_adapter: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> RebecaDecoderPipeline:
    """SD-1.5 (+ IP-Adapter at cfg.ip_adapter_scale) as a RebecaDecoderPipeline; fp16 on CUDA unless cfg.dtype='fp32'."""
    from . import resolve_dtype
    from .components import build_sd_pipeline

    dtype = resolve_dtype(device, cfg.dtype)
    base = build_sd_pipeline(models, device, dtype, ip_adapter, cache_dir)
    # the same modules (IP-Adapter already in the UNet) under our class; from_pipe would cast them to fp32
    pipe = RebecaDecoderPipeline(**base.components, requires_safety_checker=False)
    if pipe.unet.dtype != dtype:
        raise RuntimeError(f"decoder UNet is {pipe.unet.dtype}, expected {dtype}")
    if ip_adapter:
        pipe.set_ip_adapter_scale(cfg.ip_adapter_scale)
    pipe.set_progress_bar_config(disable=True)  # one bar over items instead of one per call
    return pipe


def image_settings(cfg: GenerationConfig, models: ModelsConfig | None = None) -> dict[str, Any]:
    """What determines every image of a run besides its item (device and dtype excluded, as for embeddings)."""
    keys = ("steps", "decoder_cfg", "height", "width", "ip_adapter_scale")
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    if models is not None:
        out["models"] = {"builder": models.builder, "sd_id": models.sd_id, "ip_adapter_id": models.ip_adapter_id,
                         "ip_adapter_weight": models.ip_adapter_weight,
                         **({"seed": models.seed} if models.builder == "tiny" else {})}
    return out


def item_fingerprint(item: WorkItem, settings: dict[str, Any]) -> str:
    """Hash of everything that determines the item's image: a PNG made from other inputs is stale."""
    h = hashlib.sha256(json.dumps({"seed": item.seed, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
                                   "lora": item.lora, "settings": settings}, sort_keys=True).encode())
    if item.ip_embedding is not None:
        h.update(item.ip_embedding.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


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


# ----------------------------------------------------------------------------------------------- files


PNG_KEY = "rebeca"  # PNG text chunk holding the item fingerprint


def _png_bytes(image: np.ndarray, fingerprint: str) -> bytes:
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, fingerprint)
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def valid_png(path: Path, size: tuple[int, int], fingerprint: str | None = None) -> bool:
    """True when `path` is a complete PNG of `size` = (width, height), made for `fingerprint` (if given)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            ok = im.format == "PNG" and im.size == size
            ok &= fingerprint is None or im.info.get(PNG_KEY) == fingerprint
            im.verify()  # checks every chunk's CRC: a truncated file fails here
            return ok
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: not done
        return False


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_batches(items: Iterable[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Items sorted by key, cut into batches of at most `batch_size` within one (method, setting, user)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = sorted(items, key=lambda it: it.key)
    keys = [it.key for it in items]
    dup = sorted({k for a, k in zip(keys, keys[1:]) if a == k})
    if dup:
        raise ValueError(f"duplicate work items: {dup[:3]}")
    groups: dict[tuple, list[WorkItem]] = {}
    for it in items:  # a batch never mixes adapters or items with and without an embedding, and never depends
        # on which other users or settings are in the run (its bytes would change with the batch)
        groups.setdefault((it.method, it.setting, it.user_id, it.lora or "", it.ip_embedding is not None),
                          []).append(it)
    return [g[s:s + batch_size] for _, g in sorted(groups.items()) for s in range(0, len(g), batch_size)]


def shard(batches: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Batches of process `rank`: b, b + world_size, ... (no overlap, nothing left out)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    return list(batches[rank::world_size])


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


def _switch_lora(pipe, current: str | None, wanted: str | None) -> str | None:
    if wanted == current:
        return current
    if current or wanted:
        pipe.unload_lora_weights()  # also clears a half-loaded adapter after a failed load
    if wanted:
        pipe.load_lora_weights(wanted)
    return wanted


def decode(pipe, items: Sequence[WorkItem], out_dir: str | os.PathLike, cfg: GenerationConfig, *,
           batch_size: int | None = None, overwrite: bool = False, rank: int = 0, world_size: int = 1,
           models: ModelsConfig | None = None, progress: bool = True) -> DecodeReport:
    """Decode this process's share of `items` into `<out_dir>/<method>/<setting>/u{user:03d}/{j:02d}.png`.

    PNGs that exist, decode and carry their item's fingerprint are skipped (overwrite=True redoes them); PNGs made
    from other inputs (embedding, prompt, seed, LoRA, settings) are redone. A batch that fails (e.g. out of
    memory) is retried once item by item; items that still fail are logged with their error and the rest go on.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    batches = shard(make_batches(items, batch_size or cfg.batch_size), rank, world_size)
    settings = image_settings(cfg, models)
    size = (cfg.width, cfg.height)
    rep, logger, lora, t0 = DecodeReport(), _Log(out_dir), None, time.perf_counter()
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"decode [{rank}/{world_size}]" if world_size > 1 else "decode",
               unit="img", disable=not progress, position=rank)
    try:
        for batch in batches:
            fps = {it.key: item_fingerprint(it, settings) for it in batch}
            todo = [it for it in batch if overwrite or not valid_png(out_dir / it.relpath, size, fps[it.key])]
            if not todo:
                rep.skipped += len(batch)
                bar.update(len(batch))
                continue
            rep.batches += 1
            _record_settings(out_dir, batch[0], settings, pipe)
            try:
                lora = _switch_lora(pipe, lora, batch[0].lora)
                results = _decode_with_retry(pipe, batch, cfg, rep)
            except Exception as exc:  # noqa: BLE001 - e.g. an unreadable LoRA: these items fail, the rest go on
                lora, err = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
                results = iter([(batch, None, 0.0, err)])
            # the whole batch is decoded even if some PNGs exist: same batch -> same bytes as an uninterrupted run
            for group, images, secs, error in results:
                for it, img in zip(group, images if images is not None else [None] * len(group)):
                    if it not in todo:
                        continue
                    if img is None:
                        rep.failed.append({"key": list(it.key), "error": error})
                        logger.write({"key": list(it.key), "status": "failed", "error": error})
                        continue
                    path = out_dir / it.relpath
                    with atomic_path(path) as tmp:
                        tmp.write_bytes(_png_bytes(img, fps[it.key]))
                    rep.written += 1
                    logger.write({"key": list(it.key), "status": "ok", "seconds": secs / len(group),
                                  "sha256": sha256(path)})
            rep.skipped += len(batch) - len(todo)
            bar.update(len(batch))
    finally:
        bar.close()
        _switch_lora(pipe, lora, None)
        rep.seconds = time.perf_counter() - t0
    return rep


def _decode_with_retry(pipe, batch: list[WorkItem], cfg: GenerationConfig, rep: DecodeReport):
    """Yield (items, images | None, seconds, error): the batch, or on failure each item alone (one retry)."""
    t0 = time.perf_counter()
    try:
        images = run_batch(pipe, batch, cfg)
        yield batch, images, time.perf_counter() - t0, ""
        return
    except Exception as exc:  # noqa: BLE001 - any per-batch failure is retried item by item, then logged
        first = f"{type(exc).__name__}: {exc}"
        log.warning("batch of %d failed (%s); retrying at batch size 1", len(batch), first)
        if _is_oom(exc) and torch.cuda.is_available():
            torch.cuda.empty_cache()
    rep.retried += len(batch)
    for it in batch:
        t0 = time.perf_counter()
        try:
            yield [it], run_batch(pipe, [it], cfg), time.perf_counter() - t0, ""
        except Exception as exc:  # noqa: BLE001
            if _is_oom(exc) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            yield [it], None, 0.0, f"{type(exc).__name__}: {exc}".splitlines()[0]


# ----------------------------------------------------------------------------------------------- plan + manifest


def save_plan(items: Sequence[WorkItem], out_dir: str | os.PathLike, cfg: GenerationConfig,
              models: ModelsConfig) -> Path:
    """Write the work (items, embeddings, configs) under <out_dir>/plan/ so `python -m rebeca_utils.decoding` can run it."""
    import pandas as pd
    from safetensors.torch import save_file

    d = Path(out_dir) / PLAN_DIR
    rows, embs = [], []
    for it in sorted(items, key=lambda it: it.key):
        row = {f.name: getattr(it, f.name) for f in fields(WorkItem) if f.name != "ip_embedding"}
        row["emb_row"] = -1 if it.ip_embedding is None else len(embs)
        if it.ip_embedding is not None:
            embs.append(it.ip_embedding.float())
        rows.append(row)
    with atomic_path(d / "ip_embeddings.safetensors") as tmp:
        save_file({"img_emb": torch.stack(embs) if embs else torch.zeros(0, models.decoder_emb_dim)}, str(tmp))
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
    import pandas as pd
    from safetensors.torch import load_file

    d = Path(out_dir) / PLAN_DIR
    if not (d / "plan.json").is_file():
        raise FileNotFoundError(f"{d / 'plan.json'}: no decoding plan; run the generating notebook (or save_plan) first")
    meta = json.loads((d / "plan.json").read_text())
    for name, digest in meta["sha256"].items():
        if sha256(d / name) != digest:
            raise ValueError(f"{d / name} does not match {d / 'plan.json'} (a save_plan was interrupted); save the plan again")
    emb = load_file(str(d / "ip_embeddings.safetensors"))["img_emb"]
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
    import pandas as pd

    out_dir = Path(out_dir)
    logs = _log_records(out_dir)
    settings = image_settings(cfg, models)
    for folder in sorted({out_dir / it.method / it.setting for it in items}):
        for tmp in folder.glob("u*/.*.tmp*"):  # atomic_path's temp files, orphaned by a SIGKILL
            tmp.unlink(missing_ok=True)
    rows = []
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


def reencode(out_dir: str | os.PathLike, manifest, models: ModelsConfig, device: str = "auto",
             spaces: Sequence[str] = ("decoder", "verifier"), progress: bool = True) -> dict:
    """Embed the manifest's finished images in the decoder and verifier spaces under <out_dir>/embeddings/<space>/.

    Cached and resumable like notebook 02; `sources.json` records each image's sha256, and a space whose images
    changed since (e.g. redecoded) is recomputed. Returns space -> store."""
    import shutil

    from .embeddings import embed_images, space_dir

    ok = manifest[manifest["status"] == "ok"].sort_values("path")
    names, sources = ok["path"].tolist(), dict(zip(ok["path"], ok["sha256"]))
    stores = {}
    for space in spaces:
        d = space_dir(Path(out_dir) / "embeddings", space)
        src = d / "sources.json"
        old = json.loads(src.read_text()) if src.is_file() else None
        if d.exists() and (old is None or any(old.get(n, h) != h for n, h in sources.items())):
            shutil.rmtree(d)  # embeddings of images that have since been replaced
        write_json(src, sources)
        store = embed_images(out_dir, names, space, models, Path(out_dir) / "embeddings", device=device,
                             chunk_size=REENCODE_CHUNK, progress=progress)
        store.merge()
        stores[space] = store
    return stores


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rebeca_utils.decoding",
                                description="Decode the plan a notebook saved in --out-dir (one share per process).")
    p.add_argument("--out-dir", required=True, help="the notebook's output folder holding plan/")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="images per pipeline call (default: the plan's)")
    p.add_argument("--dtype", help="override the plan's decoder dtype (auto | fp16 | fp32)")
    p.add_argument("--overwrite", action="store_true", help="redo images that already exist")
    p.add_argument("--rank", type=int, help="without accelerate: this process's rank (with --world-size); "
                   "afterwards, one run without --rank writes the manifest")
    p.add_argument("--world-size", type=int)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; under `accelerate launch` every process decodes its batches and process 0 writes the manifest."""
    from .processes import process_share

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    items, cfg, models = load_plan(args.out_dir)
    if args.dtype:
        cfg = replace(cfg, dtype=args.dtype)
    share = process_share(args.device, args.rank, args.world_size)
    pipe = build_decoder(models, cfg, share.device, ip_adapter=any(it.ip_embedding is not None for it in items))
    rep = decode(pipe, items, args.out_dir, cfg, batch_size=args.batch_size, overwrite=args.overwrite,
                 rank=share.rank, world_size=share.world_size, models=models, progress=not args.no_progress)
    summary = {"rank": share.rank, "world_size": share.world_size,
               **{k: v for k, v in asdict(rep).items() if k != "failed"}, "failed": len(rep.failed)}
    share.wait()
    if share.rank == 0 and share.coordinated:
        df = write_manifest(items, args.out_dir, cfg, models)
        summary["manifest"] = {k: int(v) for k, v in df["status"].value_counts().items()}
    share.report(summary)
    share.close()
    if rep.failed:
        print(f"{len(rep.failed)} item(s) failed, e.g. {rep.failed[0]['key']}: {rep.failed[0]['error']}; "
              f"rerun to retry them", file=sys.stderr)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
