"""`make bench`: speed of the prior, the decoder and the metrics at the paper's sizes, measured side by side in one run.

python -m rebeca_utils.bench [--quick] [--only prior|decoding|metrics]
python -m rebeca_utils.bench --paper-stages [--gpus N] [--quick] [--shape auto|paper|ci] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .config import get_profile
from .data.synthetic import write_synthetic_flickr
from .evaluate.retrieval import precision_recall_at_k, retrieval_metrics
from .evaluate.stats import matching_test, permutation_test, r2_bootstrap
from .io import atomic_write
from .models.architectures import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from .models.decoder import RebecaDecoderPipeline, build_decoder, tiny_ip_adapter_state_dict
from .models.encoders import SPACES, build_tokenizer
from .models.prior import RebecaPrior, count_parameters
from .pipeline.decoding import run_batch
from .pipeline.embeddings import embed_images
from .pipeline.items import make_items
from .pipeline.rebeca import RebecaPipeline
from .train.history_encoder import HistoryEncoder
from .train.inversion import fit_user
from .train.diffusion import Triplets, diffusion_loss, epoch_indices, make_scheduler


def _synthetic(n: int, d: int, n_users: int, seed: int = 0) -> Triplets:
    g = torch.Generator().manual_seed(seed)
    return Triplets(torch.randn(n, d, generator=g), torch.randint(0, n_users, (n,), generator=g),
                    torch.randint(0, 2, (n,), generator=g))


def bench_training(model, sched, data: Triplets, batch_size: int, steps: int) -> dict:
    """Samples/s of our in-memory tensor batches vs a per-item Dataset + DataLoader over the same model."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step(x, u, r):
        loss = diffusion_loss(model, sched, x, u, r, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    idx = epoch_indices(data, max(1, steps * batch_size // int(data.user_id.max() + 1) + 1), gen)
    step(data.img_emb[:batch_size], data.user_id[:batch_size], data.rating[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for s in range(steps):
        b = idx[s * batch_size : (s + 1) * batch_size]
        step(data.img_emb[b], data.user_id[b], data.rating[b])
    ours = steps * batch_size / (time.perf_counter() - t0)

    class PerItem(torch.utils.data.Dataset):  # the common baseline: one Python call per rating
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data.img_emb[i], data.user_id[i], data.rating[i]

    loader = torch.utils.data.DataLoader(PerItem(), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for s, (x, u, r) in enumerate(loader):
        if s == steps:
            break
        step(x, u, r)
    baseline = steps * batch_size / (time.perf_counter() - t0)
    return {"ours_samples_per_s": ours, "dataloader_samples_per_s": baseline, "ratio": ours / baseline}


def bench_sampling(model, sched, n_users: int, per_user: int, sampler: str, fast_steps: int, cfg_scale: float,
                   ddpm_users: int) -> dict:
    """Time for n_users x per_user embeddings: fast sampler (all users) vs 1000-step DDPM (subset, extrapolated)."""
    pipe = RebecaPipeline(model, sched, sampler=sampler, steps=fast_steps, users={u: {} for u in range(n_users)})
    t0 = time.perf_counter()
    pipe(range(n_users), per_user, cfg_scale=cfg_scale, progress=True)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.with_sampler("ddpm")(range(ddpm_users), per_user, cfg_scale=cfg_scale, progress=True)
    ddpm_subset = time.perf_counter() - t0
    ddpm = ddpm_subset * n_users / ddpm_users
    return {"fast_s": fast, "ddpm_subset_s": ddpm_subset, "ddpm_extrapolated_s": ddpm, "ratio": ddpm / fast}


def bench_embedding(n_images: int = 200) -> dict:
    """Images/s of the tiny decoder- and verifier-space encoders on the synthetic FLICKR-AES fixture."""

    models = get_profile("smoke").models
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_flickr(Path(tmp) / "flickr", n_workers=8, n_images=n_images, image_size=64)
        for space in SPACES:
            t0 = time.perf_counter()
            embed_images(root / "40K", None, space, models, Path(tmp) / "emb", device="cpu", progress=False)
            out[space] = n_images / (time.perf_counter() - t0)
    return out


def bench_decoding(n_images: int = 32, batch_size: int = 8) -> dict:
    """Images/s of the tiny SD-1.5-shaped pipeline on CPU: batches of `batch_size` vs one call per image."""

    prof = get_profile("smoke")
    cfg = prof.generation
    pipe = build_decoder(prof.models, cfg, "cpu")
    emb = torch.randn(n_images, prof.models.decoder_emb_dim, generator=torch.Generator().manual_seed(0))
    items = make_items("bench", "cpu", list(range(n_images)), [0] * n_images, cfg, ip_embeddings=emb)
    run_batch(pipe, items[:batch_size], cfg)  # warm-up
    t0 = time.perf_counter()
    for s in range(0, n_images, batch_size):
        run_batch(pipe, items[s:s + batch_size], cfg)
    batched = n_images / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for it in items:
        run_batch(pipe, [it], cfg)
    single = n_images / (time.perf_counter() - t0)
    return {"batched_img_per_s": batched, "single_img_per_s": single, "ratio": batched / single,
            "steps": cfg.steps, "size": cfg.height}


def full_size_decoder(device: str = "cuda", dtype=torch.float16):
    """SD-1.5-shaped pipeline at full size with random weights (UNet, VAE, text encoder from the SD-1.5 configs)
    and an IP-Adapter for 1024-d embeddings: decoding speed without downloading anything."""

    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    pipe = RebecaDecoderPipeline(
        unet=unet, vae=AutoencoderKL(**SD15_VAE_CONFIG), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)),
        tokenizer=build_tokenizer(), scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                                             beta_schedule="scaled_linear", clip_sample=False,
                                                             set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory() as tmp:

        buf = io.BytesIO()
        torch.save(tiny_ip_adapter_state_dict(unet, 1024), buf)
        atomic_write(Path(tmp) / "models" / "ip-adapter_sd15.bin", buf.getvalue())
        pipe.load_ip_adapter(tmp, subfolder="models", weight_name="ip-adapter_sd15.bin", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def bench_decoding_gpu(batch_sizes=(1, 8), n_batches: int = 2, images_per_setting: int = 5250) -> dict:
    """Images/s at the paper's decoding settings (512², 50 steps, CFG 5, fp16) on CUDA, per batch size."""

    cfg = get_profile("paper").generation
    pipe = full_size_decoder("cuda", torch.float16)
    out = {}
    for bs in batch_sizes:
        emb = torch.randn(bs, 1024, generator=torch.Generator().manual_seed(bs))
        items = make_items("bench", "gpu", list(range(bs)), [0] * bs, cfg, ip_embeddings=emb)
        run_batch(pipe, items, cfg)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            run_batch(pipe, items, cfg)
        torch.cuda.synchronize()
        ips = n_batches * bs / (time.perf_counter() - t0)
        out[bs] = {"img_per_s": ips, "hours_per_setting": images_per_setting / ips / 3600}
    out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_metrics(n_users: int = 210, n_gen: int = 25, pool_size: int = 20, n_images: int = 30, dim: int = 1280,
                  n_permutations: int = 1000, seed: int = 0) -> dict:
    """Seconds for the §4.4/§4.5 metrics at the paper's scale (210 users), on synthetic data."""

    rng = np.random.default_rng(seed)
    sizes = rng.integers(pool_size - 5, pool_size + 6, n_users)  # per-user pools of different sizes
    pool_user = np.repeat(np.arange(n_users), sizes)
    pool = rng.normal(size=(len(pool_user), dim)).astype(np.float32)
    liked = rng.random(len(pool_user)) < 0.45
    gen_user = np.repeat(np.arange(n_users), n_gen)
    gen = rng.normal(size=(len(gen_user), dim)).astype(np.float32)
    owner = np.repeat(np.arange(n_users), n_images)
    scores = rng.random((n_users, len(owner)))
    out = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t0

    timed("retrieval_metrics_s", lambda: retrieval_metrics(gen, gen_user, pool, pool_user, liked, ks=(1, 5)))
    timed("retrieval_loop_s", lambda: [precision_recall_at_k(gen[gen_user == u], pool[pool_user == u],
                                                             liked[pool_user == u], k)
                                       for u in range(n_users) for k in (1, 5)])
    timed("permutation_test_s", lambda: permutation_test(scores, owner, n_permutations, seed))
    timed("matching_test_s", lambda: matching_test(scores, owner, n_permutations, seed))
    timed("r2_bootstrap_s", lambda: r2_bootstrap(scores.mean(1), rng.random(n_users), 1000, seed))
    return out


def bench_new_user(model, sched, n_ratings: int, steps: int, lr: float, batch_size: int, device: str = "cpu") -> dict:
    """Seconds to fit one new user's row (user inversion, notebook 12) on `n_ratings` random ratings."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(n_ratings, model.emb_dim, generator=g), torch.randint(0, 2, (n_ratings,), generator=g)
    model.to(device)
    fit = fit_user(model, sched, x, r, steps=steps, lr=lr, batch_size=batch_size, seed=0)
    model.to("cpu")
    return {"seconds": fit.seconds, "steps_per_s": steps / fit.seconds}


def bench_encoder(model, n_ratings: int, n_seen: int, repeats: int = 20) -> float:
    """Seconds for the history encoder (paper width, untrained) to turn `n_ratings` ratings into a user row."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(n_ratings, model.emb_dim, generator=g), torch.randint(0, 2, (n_ratings,), generator=g)
    enc = HistoryEncoder(model.emb_dim, model.hidden_dim, n_seen).eval()
    enc.encode(x, r)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        enc.encode(x, r)
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    """`make bench`: run the benchmarks side by side and print one JSON summary."""
    ap = argparse.ArgumentParser(prog="python -m rebeca_utils.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a sanity run, not for the README)")
    ap.add_argument("--only", choices=("prior", "decoding", "metrics"), help="run one group of benchmarks")
    ap.add_argument("--paper-stages", action="store_true", help="time every stage of `make paper` through the "
                    "paper-profile builders and price it (python -m rebeca_utils.bench_price; its options follow)")
    a, rest = ap.parse_known_args(argv)
    if a.paper_stages:  # another entry point: run as a process (entry points never import each other)
        return subprocess.call([sys.executable, "-m", "rebeca_utils.bench_price", *(["--quick"] if a.quick else []),
                                *rest])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.only in (None, "decoding"):
        dec = bench_decoding(16 if a.quick else 64)
        print(f"decoding (tiny SD-1.5-shaped pipeline, CPU, {dec['size']}px, {dec['steps']} steps, CFG 5): batches of 8 "
              f"{dec['batched_img_per_s']:.1f} images/s | one call per image {dec['single_img_per_s']:.1f} images/s | "
              f"ratio {dec['ratio']:.2f}x")
        if torch.cuda.is_available():
            g = bench_decoding_gpu(n_batches=1 if a.quick else 3)
            print(f"decoding on {torch.cuda.get_device_name()} (full-size SD-1.5 UNet, random weights, 512px, 50 steps, "
                  f"fp16, CFG 5): " + " | ".join(f"batch {bs}: {v['img_per_s']:.2f} images/s, "
                                                 f"{v['hours_per_setting']:.2f} h per 5,250 images"
                                                 for bs, v in g.items() if bs != "peak_mem_gb")
                  + f" | peak memory {g['peak_mem_gb']:.1f} GB")
        else:
            print("decoding at 512px/fp16: no CUDA device here, skipped")
    if a.only in (None, "metrics"):
        mt = bench_metrics()
        print("metrics at 210 users: " + " | ".join(f"{k[:-2]} {v:.2f} s" for k, v in mt.items()) + " | goal < 2 s each")
    if a.only not in (None, "prior"):
        return 0
    paper = get_profile("paper")
    torch.manual_seed(0)
    model = RebecaPrior.from_config(paper.prior)
    sched = make_scheduler(paper.diffusion)
    print(f"paper-config prior: {count_parameters(model):,} parameters; torch threads {torch.get_num_threads()}")

    data = _synthetic(paper.prior.n_users * paper.train.samples_per_user, paper.prior.emb_dim, paper.prior.n_users)
    tr = bench_training(model, sched, data, paper.train.batch_size, steps=10 if a.quick else 60)
    epoch_s = paper.prior.n_users * paper.train.samples_per_user / tr["ours_samples_per_s"]
    print(f"training (batch {paper.train.batch_size}): ours {tr['ours_samples_per_s']:.0f} samples/s | "
          f"per-item DataLoader {tr['dataloader_samples_per_s']:.0f} samples/s | ratio {tr['ratio']:.2f}x | "
          f"one epoch (21,000 samples) ~ {epoch_s:.0f} s")

    nu, fit_seconds = paper.new_users, {}
    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        fu = bench_new_user(model, sched, 50, 20 if a.quick else nu.steps, nu.lr, nu.batch_size, dev)
        fit_s = fu["seconds"] * nu.steps / (20 if a.quick else nu.steps)
        fit_seconds[dev] = fit_s
        print(f"new user (inversion, {nu.steps} steps, batch {nu.batch_size}, 50 ratings) on {dev}: {fit_s:.1f} s "
              f"({fu['steps_per_s']:.1f} steps/s) | retraining the prior ~ {epoch_s * paper.train.max_epochs:.0f} s "
              f"on this CPU (up to {paper.train.max_epochs} epochs)")
    enc_s = bench_encoder(model, 50, paper.prior.n_users - paper.flickr.n_holdout_workers)
    print(f"new user (history encoder, one forward pass, 50 ratings) on cpu: {enc_s * 1e3:.2f} ms | "
          f"{fit_seconds['cpu'] / enc_s:.0f}x faster than inversion on cpu")

    emb = bench_embedding(100 if a.quick else 400)
    print("embedding throughput (tiny encoders, CPU, incl. model build and JPEG decode): "
          + " | ".join(f"{k} {v:.0f} images/s" for k, v in emb.items()))

    model.eval()
    per_user, users = 25, paper.prior.n_users
    if a.quick:
        users = 8
    sm = bench_sampling(model, sched, users, per_user, paper.diffusion.sampler, paper.diffusion.sampler_steps,
                        cfg_scale=5.0, ddpm_users=1)
    n = users * per_user
    print(f"sampling {n:,} embeddings (CFG 5): {paper.diffusion.sampler}-{paper.diffusion.sampler_steps} "
          f"{sm['fast_s']:.1f} s | ddpm-1000 {sm['ddpm_extrapolated_s']:.0f} s (extrapolated from 1 user, "
          f"{sm['ddpm_subset_s']:.1f} s) | ratio {sm['ratio']:.0f}x | goal: 5,250 in <= 600 s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
