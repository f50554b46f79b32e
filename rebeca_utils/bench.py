"""`make bench`: speed of the prior at the paper configuration (App E.2), measured side by side in one run.

python -m rebeca_utils.bench [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch

from .config import get_profile
from .diffusion import Triplets, diffusion_loss, epoch_indices, make_scheduler, sample_prior
from .prior import RebecaPrior, count_parameters


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
    users = torch.arange(n_users).repeat_interleave(per_user)
    j = torch.arange(per_user).repeat(n_users)
    ones = torch.ones_like(users)
    t0 = time.perf_counter()
    sample_prior(model, sched, users, ones, j, cfg_scale=cfg_scale, sampler=sampler, steps=fast_steps,
                 batch_size=1024, progress=True)
    fast = time.perf_counter() - t0
    m = ddpm_users * per_user
    t0 = time.perf_counter()
    sample_prior(model, sched, users[:m], ones[:m], j[:m], cfg_scale=cfg_scale, sampler="ddpm",
                 batch_size=1024, progress=True)
    ddpm_subset = time.perf_counter() - t0
    ddpm = ddpm_subset * n_users / ddpm_users
    return {"fast_s": fast, "ddpm_subset_s": ddpm_subset, "ddpm_extrapolated_s": ddpm, "ratio": ddpm / fast}


def bench_embedding(n_images: int = 200) -> dict:
    """Images/s of the tiny decoder- and verifier-space encoders on the synthetic FLICKR-AES fixture."""
    import tempfile
    from pathlib import Path

    from .embeddings import SPACES, embed_images
    from .flickr import write_synthetic_flickr

    models = get_profile("smoke").models
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_flickr(Path(tmp) / "flickr", n_workers=8, n_images=n_images, image_size=64)
        for space in SPACES:
            t0 = time.perf_counter()
            embed_images(root / "40K", None, space, models, Path(tmp) / "emb", device="cpu", progress=False)
            out[space] = n_images / (time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rebeca_utils.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a sanity run, not for the README)")
    a = ap.parse_args(argv)
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
