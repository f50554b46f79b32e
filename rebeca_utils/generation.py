"""REBECA end to end (§2, §4.2): prior samples for (user_id, R = 1) become decoder work items; App M grids."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .artifacts import atomic_path
from .config import GenerationConfig
from .decoding import WorkItem, make_items
from .diffusion import sample_users

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


def prior_embeddings(prior, sched, users: Sequence[int], n_per_user: int, *, cfg_scale: float, path: str | os.PathLike,
                     rating: int = 1, seed: int = 0, sampler: str = "dpmsolver", steps: int = 20, normalizer=None,
                     device: str = "cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """{"user_id", "index", "img_emb"} for every (user, j < n_per_user); cached in `path` (safetensors) and reused
    when users, seeds, sampler and prior weights match. Sample j of user u is seeded by (seed, u, j)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    users = [int(u) for u in users]
    meta = {"users": users, "n_per_user": n_per_user, "cfg_scale": cfg_scale, "rating": rating, "seed": seed,
            "sampler": sampler, "steps": steps if sampler != "ddpm" else sched.config.num_train_timesteps,
            "prior": state_fingerprint(prior), "normalizer": None if normalizer is None else normalizer.kind}
    path = Path(path)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if json.loads((f.metadata() or {}).get("rebeca", "null")) == json.loads(json.dumps(meta)):
                    return {k: f.get_tensor(k) for k in ("user_id", "index", "img_emb")}
        except Exception:  # noqa: BLE001 - unreadable cache: resample
            pass
    x = sample_users(prior, sched, users, n_per_user, rating=rating, cfg_scale=cfg_scale, sampler=sampler,
                     steps=steps, seed=seed, device=device, progress=progress)
    if normalizer is not None:
        x = normalizer.inverse(x)  # back to the decoder's raw embedding space
    out = {"user_id": torch.tensor(users).repeat_interleave(n_per_user),
           "index": torch.arange(n_per_user).repeat(len(users)),
           "img_emb": x.reshape(len(users) * n_per_user, -1).float().contiguous()}
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={"rebeca": json.dumps(meta)})
    return out


def rebeca_items(samples: dict[str, torch.Tensor], setting: str, cfg: GenerationConfig) -> list[WorkItem]:
    """Decoder work items for prior samples: decoder seed 42 + 10,000 u + j, the config's prompts."""
    return make_items(METHOD, setting, samples["user_id"].tolist(), samples["index"].tolist(), cfg,
                      ip_embeddings=samples["img_emb"])


def load_images(out_dir: str | os.PathLike, method: str, setting: str, user_id: int, n: int) -> np.ndarray:
    """(n, H, W, 3) floats in [0, 1]: images 0..n-1 of one user (missing ones are grey)."""
    from PIL import Image

    out = []
    for j in range(n):
        p = Path(out_dir) / WorkItem(method, setting, user_id, j, 0).relpath
        if p.is_file():
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255)
        else:
            out.append(None)
    shape = next((a.shape for a in out if a is not None), (8, 8, 3))
    return np.stack([a if a is not None else np.full(shape, 0.5, np.float32) for a in out])
