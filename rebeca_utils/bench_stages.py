"""`make bench --paper-stages`, the measurements: every GPU stage of `make paper` timed through the kit's own
paper-profile builders from the Hugging Face cache (the real weights on a CUDA box; the rehearsal's ci cache, which
bench_price builds, on a CPU); one code path, only HF_HUB_CACHE and the counts differ. Writes one JSON file.

python -m rebeca_utils.bench_stages --out FILE [--shape paper|ci] [--quick] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .baselines.lora import train_adapter
from .baselines.lora_cli import build_training_pipeline
from .baselines.lora_recipe import LoraSpec
from .baselines.tagging import chat_prompt, generate
from .config import Profile, get_profile
from .io import write_json
from .models.decoder import build_decoder
from .models.encoders import build_encoder
from .models.nmf import NMFVerifier
from .models.prior import RebecaPrior
from .models.vlm import build_vlm, vlm_dtype
from .models.weights import quiet_libraries
from .pipeline.decoding import run_batch
from .pipeline.items import make_items
from .pipeline.rebeca import PAD_BATCH, RebecaPipeline
from .progress import tqdm
from .runtime import resolve_dtype
from .train.diffusion import Triplets, make_scheduler, train_prior
from .train.normalize import Normalizer
from .train.verifier import Interactions, train_verifier

@dataclass(frozen=True)
class Shape:
    """The counts each measurement runs (what it prices comes from the profile, bench_price.counts)."""

    name: str
    enc_batch: int = 64
    enc_batches: int = 3
    dec_steps: int = 0  # 0: the profile's 50
    dec_batches: tuple[int, ...] = (1, 4, 8, 16)
    dec_repeats: int = 2
    lora_ranks: tuple[int, ...] = (8, 128, 512)
    lora_steps: int = 10
    lora_grad_accum: int = 0  # 0: the profile's
    vlm_batches: tuple[int, ...] = (1, 8)
    vlm_tokens: int = 0  # 0: the profile's 192
    verifier_rows: int = 150_000  # ~ the paper's 155,707 training rows (bench_price scales per row)
    verifier_epochs: int = 2
    prior_epochs: int = 2
    prior_samples_per_user: int = 0  # 0: the profile's 100
    sampling_users: int = 210


PAPER = Shape("paper")
PAPER_QUICK = Shape("paper, quick", enc_batches=1, dec_repeats=1, lora_steps=3, prior_epochs=1, sampling_users=8)
CI = Shape("ci", enc_batch=4, enc_batches=1, dec_steps=2, dec_batches=(1, 2), dec_repeats=1, lora_steps=2,
           lora_grad_accum=1, vlm_batches=(1, 2), vlm_tokens=8, verifier_rows=20_000, verifier_epochs=1,
           prior_epochs=1, prior_samples_per_user=3, sampling_users=2)
CI_QUICK = replace(CI, name="ci, quick", enc_batch=2, dec_batches=(1,), lora_steps=1, vlm_batches=(1,), vlm_tokens=2,
                   verifier_rows=2_000, prior_samples_per_user=1, sampling_users=1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable, device: str) -> float:
    """Seconds `fn()` takes, kernels finished."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _free(device: str) -> None:
    gc.collect()  # the stage's model goes now, before the next one loads
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _peak(device: str) -> float | None:
    """Peak GPU memory (GB) since the last call, then reset; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    gb = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return gb


def _random_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def bench_embed(prof: Profile, shape: Shape, device: str) -> dict:
    """Images/s of the two CLIP image encoders (build_encoder) on batches of shape.enc_batch preprocessed images."""
    out = {}
    for space in ("decoder", "verifier"):
        enc = build_encoder(space, prof.models, device, resolve_dtype(device))
        pixels = torch.stack([enc.transform(im) for im in _random_images(shape.enc_batch, 256)])
        if device.startswith("cuda"):
            enc.encode(pixels)  # warm-up: kernels, allocator
        s = timed(lambda: [enc.encode(pixels) for _ in range(shape.enc_batches)], device)
        n = shape.enc_batch * shape.enc_batches
        out[f"embed_{space}"] = {"unit_s": s / n, "peak_gb": _peak(device),
                                 "line": f"{space} space: {n / s:.1f} images/s at batch {shape.enc_batch}, "
                                         f"{tuple(pixels.shape[1:])}"}
        del enc
        _free(device)
    return out


def _triplets(rows: int, d: int, users: int, seed: int) -> Triplets:
    g = torch.Generator().manual_seed(seed)
    user = torch.arange(users).repeat_interleave(-(-rows // users))[:rows]  # sorted by user, as flickr_triplets
    return Triplets(torch.randn(rows, d, generator=g), user, torch.randint(0, 2, (rows,), generator=g))


def bench_prior(prof: Profile, shape: Shape, device: str) -> dict:
    """Notebook 03's train_prior (seconds per training sample, validation included) and 04's sample_prior (seconds
    per embedding), on the paper-config prior and random 1024-d data of the trained users."""
    users, spu = prof.prior.n_users - prof.flickr.n_holdout_workers, shape.prior_samples_per_user
    cfg = replace(prof.train, max_epochs=shape.prior_epochs, samples_per_user=spu or prof.train.samples_per_user,
                  patience=shape.prior_epochs + 1)
    d = prof.prior.emb_dim
    train = _triplets(users * 20, d, users, 0)  # ~20 training ratings per user to draw from
    val = _triplets(users * prof.flickr.n_val, d, users, 1)
    torch.manual_seed(0)
    model = RebecaPrior.from_config(prof.prior)
    sched = make_scheduler(prof.diffusion)
    res = train_prior(model, sched, train, val, cfg, device=device, progress=False)
    n_train = res.epochs * users * cfg.samples_per_user
    n = shape.sampling_users * prof.generation.n_per_user
    pipe = RebecaPipeline.from_config(model, prof.diffusion, Normalizer("none"), trained_users=range(users),
                                      scheduler=sched)  # notebook 04's sampler, as 03 saves it
    sampler, rows = f"{pipe.sampler}-{pipe.steps}", -(-n // PAD_BATCH) * PAD_BATCH
    s = timed(lambda: pipe(range(shape.sampling_users), prof.generation.n_per_user, cfg_scale=5.0), device)
    _free(device)
    return {"prior_sample": {"unit_s": res.wall_time_s / n_train,
                             "line": f"{res.epochs} epoch(s) of {users} users × {cfg.samples_per_user} samples "
                                     f"(batch {cfg.batch_size}) in {res.wall_time_s:.1f} s: "
                                     f"{n_train / res.wall_time_s:.0f} samples/s"},
            # priced per padded row: every prior forward runs PAD_BATCH rows, and 04's 17,300 fill their batches
            "sampling": {"unit_s": s / rows, "line": f"{n} embeddings ({sampler}, ω 5) in {s:.2f} s, padded to "
                                                    f"{rows} rows (PAD_BATCH): {s / rows * 1e3:.2f} ms a row"}}


def bench_decode(prof: Profile, shape: Shape, device: str) -> dict:
    """Seconds per image of build_decoder (SD-1.5 + IP-Adapter) at the profile's size and steps, per batch size."""
    gen = replace(prof.generation, steps=shape.dec_steps or prof.generation.steps)
    pipe = build_decoder(prof.models, gen, device)
    dim = prof.models.decoder_emb_dim

    def items(b: int):
        emb = torch.randn(b, dim, generator=torch.Generator().manual_seed(b))
        return make_items("bench", "stages", list(range(b)), [0] * b, gen, ip_embeddings=emb)

    run_batch(pipe, items(1), gen)  # warm-up: kernels, allocator, first-call set-up
    out = {}
    for b in tqdm(shape.dec_batches, desc="decoding batch sizes", leave=False):
        its, _ = items(b), _peak(device)  # this batch size's peak: weights + its activations
        s = timed(lambda: [run_batch(pipe, its, gen) for _ in range(shape.dec_repeats)], device)
        n = b * shape.dec_repeats
        out[f"decode_b{b}"] = {"unit_s": s / n, "peak_gb": _peak(device),
                               "line": f"batch {b}: {n / s:.3g} images/s ({gen.height}², {gen.steps} steps, "
                                       f"CFG {gen.decoder_cfg:g}, {pipe.unet.dtype})"}
    del pipe
    _free(device)
    return out


def bench_lora(prof: Profile, shape: Shape, device: str, folder: Path) -> dict:
    """Optimiser steps/s of train_adapter on notebook 06's frozen decoder (no IP-Adapter) per LoRA rank."""
    cfg = prof.lora if not shape.lora_grad_accum else replace(prof.lora, grad_accum=shape.lora_grad_accum)
    size = prof.lora.resolution or prof.generation.height
    pipe = build_training_pipeline(prof.models, device, cfg)
    paths = []
    for i, im in enumerate(_random_images(cfg.batch_size * cfg.grad_accum, size)):
        paths.append(folder / f"lora-{i}.jpg")
        im.save(paths[-1], quality=95)

    def train(r: int, steps: int) -> dict:
        spec = LoraSpec(r, r, 0.05, steps, 0)
        return train_adapter(pipe, paths, [""] * len(paths), spec, cfg, seed=0, resolution=size, progress=False)[2]

    if device.startswith("cuda"):
        train(shape.lora_ranks[0], 1)  # warm-up: kernels, allocator
    out = {}
    for r in tqdm(shape.lora_ranks, desc="LoRA ranks", leave=False):
        _peak(device)
        log = train(r, shape.lora_steps)
        out[f"lora_r{r}"] = {"unit_s": 1 / log["steps_per_s"], "peak_gb": _peak(device),
                             "line": f"r = {r}: {log['steps_per_s']:.3g} steps/s (batch {cfg.batch_size} × "
                                     f"accumulation {cfg.grad_accum}, {size}², {log['mixed_precision']})"}
    del pipe
    _free(device)
    return out


def bench_vlm(prof: Profile, shape: Shape, device: str) -> dict:
    """New tokens/s of build_vlm's LLaVA through the tagger's own greedy generate() (App F's prompt), per batch."""
    model, processor = build_vlm(prof.models, device, vlm_dtype(device, prof.vlm.dtype))
    prompt, tokens = chat_prompt(processor), shape.vlm_tokens or prof.vlm.max_new_tokens
    images = _random_images(max(shape.vlm_batches), 336)
    if device.startswith("cuda"):
        generate(model, processor, [prompt], images[:1], 4)  # warm-up
    out = {}
    for b in tqdm(shape.vlm_batches, desc="LLaVA batch sizes", leave=False):
        got, _ = [], _peak(device)
        s = timed(lambda: got.extend(generate(model, processor, [prompt] * b, images[:b], tokens)[1]), device)
        n = max(sum(got), 1)
        out[f"vlm_b{b}"] = {"unit_s": s / n, "peak_gb": _peak(device),
                            "line": f"batch {b}: {n / s:.3g} new tokens/s ({n} tokens, ≤ {tokens} per image, "
                                    f"{model.dtype})"}
    del model, processor
    _free(device)
    return out


def bench_verifier(prof: Profile, shape: Shape, device: str) -> dict:
    """Notebook 05's train_verifier (NMF on bigG-width embeddings): seconds per training row and epoch."""
    n, users, d = shape.verifier_rows, prof.prior.n_users, prof.models.verifier_emb_dim
    g = torch.Generator().manual_seed(0)

    def data(rows: int) -> Interactions:
        return Interactions(torch.randint(0, users, (rows,), generator=g), torch.randn(rows, d, generator=g),
                            torch.randint(0, 2, (rows,), generator=g).float())

    model = NMFVerifier.from_config(prof.verifier, users, d)
    cfg = replace(prof.verifier, max_epochs=shape.verifier_epochs, patience=shape.verifier_epochs + 1)
    res = train_verifier(model, data(n), data(users * prof.flickr.n_val), cfg, device=device, progress=False)
    _free(device)
    return {"verifier_row": {"unit_s": res.wall_time_s / res.epochs / n,
                             "line": f"{res.epochs} epoch(s) of {n:,} rows (batch {cfg.batch_size}) in "
                                     f"{res.wall_time_s:.2f} s"}}


STAGES = {"CLIP embedding": bench_embed, "prior training and sampling": bench_prior, "decoding": bench_decode,
          "LoRA training": bench_lora, "LLaVA generation": bench_vlm, "verifier training": bench_verifier}


def machine_line(device: str) -> str:
    """Where the numbers come from: the device, `uptime`'s load, torch's thread count."""
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        up = "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    return f"machine: {name} | uptime: {up} | torch threads {torch.get_num_threads()}"


def measure(prof: Profile, shape: Shape, device: str, folder: Path) -> tuple[dict, list[str]]:
    """Run every stage; (measurement name -> {unit_s, peak_gb, line}, failures). A failing stage is reported and
    the others still run (its rows stay unpriced)."""
    measured, failed = {}, []
    for title, fn in STAGES.items():
        _peak(device)  # reset: each stage's own peak
        try:
            with quiet_libraries():  # the loaders' bars and prints (the stage's lines are printed below)
                got = fn(prof, shape, device, folder) if fn is bench_lora else fn(prof, shape, device)
        except Exception as e:  # noqa: BLE001 - one stage's failure (missing weights, OOM) must not hide the rest
            failed.append(f"{title}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"[{title}] FAILED: {failed[-1]}", flush=True)
            _free(device)
            continue
        peak = _peak(device)  # the stage's peak, for what did not take its own
        for v in got.values():
            v.setdefault("peak_gb", peak)
            print(f"[{title}] {v['line']}", flush=True)
        measured.update(got)
    return measured, failed


SHAPES = {"paper": PAPER, "ci": CI}
QUICK = {"paper": PAPER_QUICK, "ci": CI_QUICK}


def main(argv=None) -> int:
    """Measure every stage in the paper profile; write {machine, shape, device, measured, failed} to --out."""
    ap = argparse.ArgumentParser(prog="python -m rebeca_utils.bench_stages", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="paper")
    ap.add_argument("--quick", action="store_true", help="the smallest counts")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a = ap.parse_args(argv)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shape = (QUICK if a.quick else SHAPES)[a.shape]
    print(f"paper stages, {shape.name} shape on {device}; {machine_line(device)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rebeca-bench-stages-") as tmp:
        measured, failed = measure(get_profile("paper"), shape, device, Path(tmp))
    write_json(a.out, {"machine": machine_line(device), "shape": asdict(shape), "device": device,
                       "measured": {k: {x: v[x] for x in ("unit_s", "peak_gb", "line")} for k, v in measured.items()},
                       "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
