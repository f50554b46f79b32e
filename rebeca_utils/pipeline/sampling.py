"""Sampling the prior (eq. 4, one generator per sample) and REBECA's samples as decoder work items (§4.2)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ..config import GenerationConfig
from ..io import CorruptFileError, read_safetensors
from ..progress import tqdm
from .items import WorkItem, make_items

log = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddim", "dpmsolver")


def make_sampler(train_sched: DDPMScheduler, sampler: str, steps: int):
    """A sampling scheduler sharing the training betas; 'ddpm' is the paper's ancestral sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: valid samplers are {', '.join(SAMPLERS)}")
    betas = train_sched.betas.numpy()  # trained_betas: the fast samplers reuse the exact schedule (incl. laplace)
    if sampler == "ddpm":
        sched = DDPMScheduler.from_config(train_sched.config)
        sched.set_timesteps(steps)
        return sched
    common = dict(trained_betas=betas, timestep_spacing="trailing")  # trailing: the first step starts at pure noise
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(train_sched.config, **common, set_alpha_to_one=True)
    else:
        sched = DPMSolverMultistepScheduler.from_config(
            train_sched.config, **common, algorithm_type="dpmsolver++", solver_order=2
        )
    sched.set_timesteps(steps)
    return sched


def sample_seed(seed: int, user_id: int, index: int) -> int:
    """Per-sample seed from (seed, user, sample index): independent of batching and of other users."""
    return int(np.random.SeedSequence([seed, user_id, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generators(seed, user_ids, indices, device):
    return [torch.Generator(device).manual_seed(sample_seed(seed, int(u), int(j))) for u, j in zip(user_ids, indices)]


@torch.no_grad()
def _sample_batch(model, sched, user_id, rating, gens, cfg_scale):
    device = user_id.device
    x = torch.stack([torch.randn(model.emb_dim, generator=g, device=device) for g in gens])
    x = x * sched.init_noise_sigma
    guided = cfg_scale != 1.0  # at omega = 1, eq. 4 is the conditional branch alone
    if guided:
        u_in = torch.cat([user_id, torch.full_like(user_id, model.null_user)])
        r_in = torch.cat([rating, torch.full_like(rating, model.null_rating)])
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        tt = torch.full((len(x),), int(t), device=device, dtype=torch.long)
        if guided:
            cond, uncond = model(torch.cat([x_in, x_in]), torch.cat([tt, tt]), u_in, r_in).chunk(2)
            out = uncond + cfg_scale * (cond - uncond)  # eq. 4, both branches in one forward
        else:
            out = model(x_in, tt, user_id, rating)
        x = sched.step(out, t, x, generator=gens).prev_sample
    return x


@torch.no_grad()
def sample_prior(model, train_sched: DDPMScheduler, user_ids, ratings, indices, *, cfg_scale: float, sampler: str,
                 steps: int, seed: int = 0, batch_size: int = 512,
                 device: str = "cpu", progress: bool = True, seed_ids=None, pad: bool = False) -> torch.Tensor:
    """Sample embeddings for items (user_ids[i], ratings[i], indices[i]); each item has its own generator.
    RebecaPipeline.sample is the way in (its sampler, steps and normaliser come from one place, config.diffusion).

    Item i's noise is seeded by (seed, seed_ids[i], indices[i]), seed_ids defaulting to user_ids: pass other ids
    to give several conditions the same noise (a new user's methods, two users compared side by side).
    pad=True runs every forward on exactly `batch_size` rows (a short batch is filled with throw-away rows), so an
    item's bits do not depend on how many items share its batch: kernels are picked by shape (CPU and GPU alike
    differ in the last bits between 1 and 25 rows)."""
    user_ids, ratings, indices = (torch.as_tensor(a).long().reshape(-1) for a in (user_ids, ratings, indices))
    seed_ids = user_ids if seed_ids is None else torch.as_tensor(seed_ids).long().reshape(-1)
    if not (len(user_ids) == len(ratings) == len(indices) == len(seed_ids)):
        raise ValueError("sample_prior: user_ids, ratings, indices and seed_ids must have the same length")
    if sampler == "ddpm":
        steps = train_sched.config.num_train_timesteps  # the paper's full ancestral chain
    model.to(device).eval()
    out = []
    n_batches = (len(user_ids) + batch_size - 1) // batch_size
    for s in tqdm(range(0, len(user_ids), batch_size), total=n_batches, desc=f"sample {sampler}", disable=not progress):
        sched = make_sampler(train_sched, sampler, steps)  # fresh state per batch (multistep solvers keep history)
        u, r = user_ids[s : s + batch_size].to(device), ratings[s : s + batch_size].to(device)
        gens = _generators(seed, seed_ids[s : s + batch_size].tolist(), indices[s : s + batch_size].tolist(), device)
        k = len(gens)
        if pad and k < batch_size:  # filler rows: the first item's condition, their own (discarded) noise
            u, r = torch.cat([u, u[:1].repeat(batch_size - k)]), torch.cat([r, r[:1].repeat(batch_size - k)])
            gens += [torch.Generator(device).manual_seed(i) for i in range(batch_size - k)]
        out.append(_sample_batch(model, sched, u, r, gens, cfg_scale)[:k].float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.emb_dim)


METHOD = "rebeca"


def prior_setting(cfg_scale: float) -> str:
    """Folder name of a prior guidance setting, e.g. prior_cfg5."""
    return f"prior_cfg{cfg_scale:g}"


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers: cached samples are tied to the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


SAMPLE_KEYS = ("cfg_scale", "rating", "seed", "sampler", "steps", "prior", "normalizer", "pad_batch")  # + (u, j)


def read_cache(path: Path) -> tuple[dict, dict] | None:
    """(tensors, meta) of an embeddings cache, None if absent; a truncated one (killed run) is noted and ignored."""
    if not path.is_file():
        return None
    try:
        tensors, saved = read_safetensors(path, "resample")
    except CorruptFileError as exc:
        log.warning("%s", exc)
        return None
    return tensors, json.loads(saved.get("rebeca", "null")) or {}


def known_samples(paths: Sequence[Path], meta: dict) -> dict[tuple[int, int], torch.Tensor]:
    """(user, j) -> embedding from the caches in `paths` sampled with the same SAMPLE_KEYS as `meta` (first wins):
    the same prior sample, whatever the batch it was drawn in."""
    key = {k: meta[k] for k in SAMPLE_KEYS}
    known: dict[tuple[int, int], torch.Tensor] = {}
    for path in paths:
        cache = read_cache(Path(path))
        if cache is None or {k: cache[1].get(k) for k in SAMPLE_KEYS} != key:
            continue
        t = cache[0]
        for u, j, e in zip(t["user_id"].tolist(), t["index"].tolist(), t["img_emb"]):
            known.setdefault((int(u), int(j)), e)
    return known


def rebeca_items(samples: dict[str, torch.Tensor], setting: str, cfg: GenerationConfig) -> list[WorkItem]:
    """Decoder work items for prior samples: decoder seed 42 + 10,000 u + j, the config's prompts."""
    return make_items(METHOD, setting, samples["user_id"].tolist(), samples["index"].tolist(), cfg,
                      ip_embeddings=samples["img_emb"])
