"""LLaVA tagging of images (App F): batched greedy generation, resumable chunks, shards, the parsed tag table.

Layout under a notebook's output folder:
    tags/plan.json                 names (all, or tag_limit of a seeded order), chunk size, batch size, dtype,
                                   fingerprint, image root (what the CLI runs)
    tags/chunk-00000.parquet ...   raw replies of one chunk (image, reply, new_tokens, error) + fingerprint, seconds
    tags.parquet                   every planned image parsed (status ok | repaired | failed, reason, tags)
    captions.parquet               image, caption ("" where tagging failed), status: notebook 06's lora.caption=llava

Several GPUs: ``accelerate launch --multi_gpu --num_processes N -m rebeca_utils.baselines.tagging --out-dir <folder>``
tags the plan a notebook saved there; chunk i belongs to process i mod N, in the plan's dtype. Greedy decoding: the
replies do not depend on N or on which chunks were resumed; a chunk is keyed on the batch size and dtype too (in
bf16 a batch's padding changes the numerics, so the replies can change).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import LogitsProcessorList

from .. import jobs as J
from ..config import ModelsConfig, VlmConfig
from ..io import atomic_path, write_json
from ..models.vlm import LazyVlm, build_vlm, dtype_name, named_dtype
from ..models.tiny_weights import weights_tag
from ..progress import tqdm
from ..runtime import process_share
from .constrained import SchemaConstraint
from .tags import INSTRUCTION, LIST_FIELDS, PARSER_VERSION, parse_reply, reference_parse

TAGS_DIR, PLAN_NAME, TAGS_NAME, CAPTIONS_NAME = "tags", "plan.json", "tags.parquet", "captions.parquet"
FORMAT_VERSION = 2  # 2: the plan holds the dtype and the selection; batch size and dtype in the fingerprint


class TaggingPending(RuntimeError):
    """The plan has chunks to tag and this run was asked not to tag them (tag_images=False): the message says how."""


def fingerprint(models: ModelsConfig, cfg: VlmConfig, dtype: str = "float32", selection: dict | None = None) -> str:
    """Hash of what determines the tags: the model, instruction, decoding, batch size and dtype (padding in a bf16
    batch changes the numerics), and which images were selected (not the device or the process split)."""
    model = {"builder": models.builder, "vlm_id": models.vlm_id,
             **({"seed": models.seed, "weights": weights_tag(models)} if models.builder == "tiny" else {})}
    payload = {"version": FORMAT_VERSION, "model": model, "instruction": INSTRUCTION, "decoding": "greedy",
               "max_new_tokens": cfg.max_new_tokens, "constrained": cfg.constrained, "batch_size": cfg.batch_size,
               "dtype": dtype, "selection": selection or {"limit": 0}}
    return J.fingerprint(payload)


def select_images(names: Sequence[str], limit: int = 0, seed: int = 0) -> list[str]:
    """The sorted names to tag: all (limit 0), else the first `limit` of an order seeded by `seed` (a hash of seed
    and name: a larger limit keeps every image a smaller one chose)."""
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"tag_limit={limit!r}: expected 0 (every image) or a positive number of images")
    names = sorted(set(names))
    if not limit or limit >= len(names):
        return names
    return sorted(sorted(names, key=lambda n: hashlib.sha256(f"rebeca-tag:{seed}:{n}".encode()).digest())[:limit])


def chat_prompt(processor, text: str = INSTRUCTION, image: bool = True) -> str:
    """The processor's chat template around one user turn (one image + `text`), ready for the reply."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def generate(model, processor, prompts: Sequence[str], images: Sequence[Image.Image] | None, max_new_tokens: int,
             constrained: bool = False) -> tuple[list[str], list[int]]:
    """Greedy replies to `prompts` (with `images`) in one left-padded batch: (new text only, new token counts)."""
    tok = processor.tokenizer
    inp = processor(images=list(images) if images else None, text=list(prompts), return_tensors="pt", padding=True)
    inp = {k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype) for k, v in inp.items()}
    n_prompt = inp["input_ids"].shape[1]
    procs = LogitsProcessorList([SchemaConstraint(tok, n_prompt, max_new_tokens)] if constrained else [])
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=procs,
                             pad_token_id=tok.pad_token_id)
    new = out[:, n_prompt:].cpu()
    counts = [int(((row != tok.pad_token_id)).sum()) for row in new]
    return tok.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), counts


@dataclass
class TagReport:
    """What one tag_images() call did."""

    computed: int = 0  # chunks generated now
    reused: int = 0
    images: int = 0  # images tagged now
    new_tokens: int = 0
    seconds: float = 0.0
    chunks: list[dict] = field(default_factory=list)


def save_tag_plan(out_dir: str | os.PathLike, names: Sequence[str], image_root: str | os.PathLike,
                  models: ModelsConfig, cfg: VlmConfig, dtype: torch.dtype = torch.float32, limit: int = 0,
                  seed: int = 0) -> Path:
    """Write tags/plan.json: the image names (all of `names`, or `limit` of them: select_images), chunking, dtype,
    fingerprint and configs (for the CLI)."""
    every = sorted(set(names))
    chosen = select_images(every, limit, seed)
    selection = {"limit": len(chosen), "seed": seed} if len(chosen) < len(every) else {"limit": 0}
    return write_json(Path(out_dir) / TAGS_DIR / PLAN_NAME, {
        "version": FORMAT_VERSION, "names": chosen, "selection": {**selection, "of": len(every)},
        "chunk_size": cfg.chunk_size, "dtype": dtype_name(dtype),
        "fingerprint": fingerprint(models, cfg, dtype_name(dtype), selection),
        "image_root": str(Path(image_root).resolve()), "models": dataclasses.asdict(models),
        "vlm": dataclasses.asdict(cfg)})


def load_tag_plan(out_dir: str | os.PathLike) -> dict:
    """tags/plan.json as saved; a clear error when there is none or an older kit saved it."""
    path = Path(out_dir) / TAGS_DIR / PLAN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tagging plan; run notebook 07 (or save_tag_plan) first")
    plan = json.loads(path.read_text())
    if plan.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: a plan of format {plan.get('version', 1)}, this kit reads {FORMAT_VERSION}; run "
                         "notebook 07 again (tag_images=False saves the plan)")
    plan["models"] = ModelsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan["models"].items()})
    plan["vlm"] = VlmConfig(**plan["vlm"])
    return plan


def _chunks(plan: dict) -> list[list[str]]:
    return J.chunks(plan["names"], plan["chunk_size"])


def _chunk_path(out_dir: Path, i: int) -> Path:
    return out_dir / TAGS_DIR / f"chunk-{i:05d}.parquet"


def _read_chunk(path: Path, names: list[str], fp: str) -> tuple[pd.DataFrame, dict] | J.NotDone:
    """(replies, metadata) of a finished chunk made for `names` and fingerprint `fp`, else why not."""
    if not path.is_file():
        return J.NotDone(path)
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"rebeca"])
    except Exception as exc:  # noqa: BLE001 - truncated or foreign: redo the chunk
        return J.NotDone(path, f"unreadable ({type(exc).__name__}: {exc})".splitlines()[0])
    df = table.to_pandas()
    if meta.get("fingerprint") != fp:
        return J.NotDone(path, "made for another plan (model, decoding, batch size, dtype or selection)")
    return (df, meta) if df["image"].tolist() == names else J.NotDone(path, "holds other images")


def _reader(out_dir: Path, plan: dict):
    """read((i, names)): chunk i of the plan when it is finished, else why not."""
    return lambda chunk: _read_chunk(_chunk_path(out_dir, chunk[0]), chunk[1], plan["fingerprint"])


def missing_chunks(out_dir: str | os.PathLike) -> list[int]:
    """Indices of the plan's chunks that are not finished for its fingerprint (missing, truncated or stale)."""
    plan = load_tag_plan(out_dir)
    return [i for (i, _), _ in J.collect(enumerate(_chunks(plan)), _reader(Path(out_dir), plan))[1]]


def tag_command(out_dir: str | os.PathLike, n_gpus: int) -> str:
    """The accelerate command that tags the plan saved in `out_dir` with `n_gpus` processes."""
    multi = f"--multi_gpu --num_processes {n_gpus}" if n_gpus > 1 else "--num_processes 1"
    return f"accelerate launch {multi} -m rebeca_utils.baselines.tagging --out-dir {Path(out_dir).resolve()}"


def tag_plan(llava: LazyVlm, out_dir: str | os.PathLike, tag: bool = True, progress: bool = True) -> TagReport:
    """Tag the saved plan's unfinished chunks; LLaVA is built only when there are some. tag=False builds nothing
    and raises TaggingPending naming the command that tags them (several GPUs), when there are some."""
    todo, n = missing_chunks(out_dir), len(_chunks(load_tag_plan(out_dir)))
    if todo and not tag:
        raise TaggingPending(f"{len(todo)} of {n} tag chunks to make in {Path(out_dir).resolve() / TAGS_DIR} "
                             f"(tag_images=False); run `{tag_command(out_dir, torch.cuda.device_count())}`, then "
                             "this notebook again")
    if not todo:
        return TagReport(reused=n)
    return tag_images(*llava.get(), out_dir, progress=progress)


def _load_images(root: Path, names: Sequence[str]) -> tuple[list[Image.Image | None], list[str]]:
    images, errors = [], []
    for n in names:
        try:
            with Image.open(root / n) as im:
                images.append(im.convert("RGB"))
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - one unreadable image fails its row, not the run
            images.append(None)
            errors.append(f"unreadable image: {type(exc).__name__}: {exc}".splitlines()[0])
    return images, errors


def _tag_chunk(model, processor, prompt: str, root: Path, names: list[str], cfg: VlmConfig, bar) -> pa.Table:
    """Replies of one chunk, batch by batch (image, reply, new_tokens, error); unreadable images are failed rows."""
    replies, counts, errors = [], [], []
    for s in range(0, len(names), cfg.batch_size):
        images, errs = _load_images(root, names[s:s + cfg.batch_size])
        ok = [j for j, im in enumerate(images) if im is not None]
        texts, ns = generate(model, processor, [prompt] * len(ok), [images[j] for j in ok], cfg.max_new_tokens,
                             cfg.constrained) if ok else ([], [])
        got = dict(zip(ok, zip(texts, ns)))
        replies += [got.get(j, ("", 0))[0] for j in range(len(images))]
        counts += [got.get(j, ("", 0))[1] for j in range(len(images))]
        errors += errs
        bar.update(len(images))
    return pa.table({"image": names, "reply": replies, "new_tokens": counts, "error": errors})


def tag_images(model, processor, out_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
               progress: bool = True) -> TagReport:
    """Tag this process's chunks of the saved plan (chunk i: i mod world_size == rank); finished chunks with the
    plan's fingerprint are kept. Each chunk is written atomically with its seconds and token counts."""
    out_dir = Path(out_dir)
    plan = load_tag_plan(out_dir)
    if dtype_name(model.dtype) != plan["dtype"]:  # the fingerprint says the plan's dtype: the chunks must hold it
        raise ValueError(f"{out_dir / TAGS_DIR / PLAN_NAME} was planned in {plan['dtype']}, the model is "
                         f"{dtype_name(model.dtype)}: build it in {plan['dtype']} or save the plan again")
    J.clear_orphans(out_dir / TAGS_DIR, world_size)  # a killed write's temp files
    mine = J.share(list(enumerate(_chunks(plan))), rank, world_size)
    todo, done = J.split_done(mine, _reader(out_dir, plan))
    rep, prompt = TagReport(reused=len(done)), chat_prompt(processor)
    bar = tqdm(total=sum(len(c) for _, c in mine), desc=f"tag [{rank}/{world_size}]" if world_size > 1 else "tag",
               unit="img", disable=not progress)
    bar.update(sum(len(c) for (_, c), _ in done))
    for i, names in todo:
        t0 = time.perf_counter()
        table = _tag_chunk(model, processor, prompt, Path(plan["image_root"]), names, plan["vlm"], bar)
        secs, n_new = time.perf_counter() - t0, sum(table.column("new_tokens").to_pylist())
        meta = {"fingerprint": plan["fingerprint"], "seconds": secs, "device": str(model.device),
                "batch_size": plan["vlm"].batch_size, "dtype": plan["dtype"]}
        with atomic_path(_chunk_path(out_dir, i)) as tmp:
            pq.write_table(table.replace_schema_metadata({"rebeca": json.dumps(meta)}), tmp)
        rep.computed, rep.images, rep.new_tokens = rep.computed + 1, rep.images + len(names), rep.new_tokens + n_new
        rep.seconds += secs
        rep.chunks.append({"chunk": i, **meta, "images": len(names), "new_tokens": n_new})
    bar.close()
    return rep


def collect(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Parse every chunk of the plan into tags.parquet and captions.parquet (atomic); (tag table, throughput).

    Raises naming the first chunk that is missing or made for another fingerprint."""
    out_dir = Path(out_dir)
    plan = load_tag_plan(out_dir)
    done, missing = J.collect(enumerate(_chunks(plan)), _reader(out_dir, plan))
    if missing:
        (i, _), _ = missing[0]
        raise FileNotFoundError(f"{_chunk_path(out_dir, i)}: chunk {i} is missing or stale; tag the plan first")
    rows, secs, toks, n = [], 0.0, 0, 0
    for df, meta in done:
        secs, toks, n = secs + meta["seconds"], toks + int(df["new_tokens"].sum()), n + len(df)
        for r in df.itertuples(index=False):
            p = parse_reply(r.reply) if not r.error else None
            rows.append({"image": r.image, "status": p.status if p else "failed", "reason": p.reason if p else r.error,
                         "caption": p.caption if p else "", **{f: p.lists[f] if p else [] for f in LIST_FIELDS},
                         "n_truncated": p.n_truncated if p else 0, "new_tokens": r.new_tokens, "reply": r.reply})
    tags = pd.DataFrame(rows)
    with atomic_path(out_dir / TAGS_NAME) as tmp:
        tags.to_parquet(tmp, index=False)
    caps = tags[["image", "caption", "status"]].copy()
    with atomic_path(out_dir / CAPTIONS_NAME) as tmp:
        caps.to_parquet(tmp, index=False)
    throughput = {"images": n, "seconds": secs, "images_per_s": n / max(secs, 1e-9), "new_tokens": toks,
                  "tokens_per_s": toks / max(secs, 1e-9), "parser_version": PARSER_VERSION,
                  "selection": plan["selection"], "dtype": plan["dtype"], "batch_size": plan["vlm"].batch_size}
    return tags, throughput


def failure_table(tags: pd.DataFrame) -> pd.DataFrame:
    """Replies per status and reason (repaired and failed), with one example image each."""
    bad = tags[tags["status"] != "ok"]
    return (bad.groupby(["status", "reason"]).agg(images=("image", "size"), example=("image", "first"))
            .reset_index().sort_values("images", ascending=False, ignore_index=True))


def free_running(model, processor, image_root: str | os.PathLike, names: Sequence[str],
                 max_new_tokens: int) -> pd.DataFrame:
    """Tag `names` once without the constraint: reply, our parse (status, reason) and the reference's verdict."""
    images, _ = _load_images(Path(image_root), names)
    replies, _ = generate(model, processor, [chat_prompt(processor)] * len(names), images, max_new_tokens)
    parsed = [parse_reply(r) for r in replies]
    return pd.DataFrame({"image": list(names), "status": [q.status for q in parsed],
                         "reason": [q.reason for q in parsed], "reference parser": [reference_parse(r) or "parses"
                                                                                   for r in replies],
                         "reply": [r[:80] for r in replies]})


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; under `accelerate launch` each process tags its chunks and process 0 collects."""
    p = argparse.ArgumentParser(prog="python -m rebeca_utils.baselines.tagging", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True, help="the notebook's output folder holding tags/plan.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        plan = load_tag_plan(args.out_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    share = process_share(args.device)
    model, processor = build_vlm(plan["models"], share.device, named_dtype(plan["dtype"]))
    rep = tag_images(model, processor, args.out_dir, rank=share.rank, world_size=share.world_size,
                     progress=not args.no_progress)
    summary = {"rank": share.rank, "world_size": share.world_size, "computed": rep.computed, "reused": rep.reused,
               "images": rep.images, "seconds": round(rep.seconds, 3)}
    share.wait()
    if share.rank == 0 and share.coordinated:
        summary["parsed"] = int((collect(args.out_dir)[0]["status"] != "failed").sum())
    return share.finish(summary)


if __name__ == "__main__":
    sys.exit(main())
