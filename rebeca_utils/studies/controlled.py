"""The controlled dSprites study (§3): glue between the data, the frozen VAE, the prior and Table 1."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import DSpritesConfig
from ..data.dsprites import DSPRITES_FILENAME, DSpritesStudy
from ..evaluate.paper import section33_pr, table1
from ..evaluate.retrieval import cosine_nn
from ..io import atomic_path, write_json
from ..models.vae import ConvVAE, freeze, load_vae, save_vae, train_vae
from ..runtime import seed_sequence
from ..train.diffusion import Triplets


def fit_or_load_vae(study: DSpritesStudy, cfg: DSpritesConfig, folder: Path, seed: int, device: str = "cpu"):
    """Train the study's VAE on training images, or load it when `folder` holds one for the same setup and the
    same training images (their sha256: a changed npz or renderer retrains it, whatever the parameters say)."""
    train_images = np.ascontiguousarray(study.images[study.train_idx])
    key = {"latent_dim": cfg.latent_dim, "epochs": cfg.vae_epochs, "batch_size": cfg.vae_batch_size,
           "lr": cfg.vae_lr, "seed": seed, "n_images": study.n_images, "source": study.source,
           "data_seed": study.seed, "train_images_sha256": hashlib.sha256(train_images.tobytes()).hexdigest()}
    weights, meta = Path(folder) / "vae", Path(folder) / "vae.json"
    if weights.exists() and meta.exists():

        saved = json.loads(meta.read_text())
        if saved.get("key") == key:
            return load_vae(weights), saved["history"]
    torch.manual_seed(seed)
    model = ConvVAE(latent_dim=cfg.latent_dim)
    history = train_vae(model, train_images, epochs=cfg.vae_epochs, batch_size=cfg.vae_batch_size,
                        lr=cfg.vae_lr, seed=seed, device=device)
    model = freeze(model.cpu())  # frozen from here on: its decoder is the study's image generator
    save_vae(model, weights)
    write_json(meta, {"key": key, "history": history})  # written last: marks the VAE complete
    return model, history


def study_triplets(study: DSpritesStudy, latents: torch.Tensor, val_frac: float = 0.1, seed: int = 0):
    """(user, rating, latent) triplets for train and a validation slice carved from training images.

    The test images are never seen in training or early stopping: they are every user's evaluation pool.
    """
    rng = np.random.default_rng(seed_sequence(seed, "dsprites_val"))
    train_img = rng.permutation(study.train_idx)
    n_val = int(round(len(train_img) * val_frac))
    parts = {"val": np.sort(train_img[:n_val]), "train": np.sort(train_img[n_val:])}
    out = {}
    for name, idx in parts.items():
        users = np.repeat(np.arange(study.n_users), len(idx))
        images = np.tile(idx, study.n_users)
        ratings = study.likes[:, idx].reshape(-1)
        out[name] = Triplets(latents[images].float(), torch.as_tensor(users), torch.as_tensor(ratings.astype(np.int64)))
    return out["train"], out["val"]


def baseline_samples(study: DSpritesStudy, latents: torch.Tensor, reps: int, k: int, seed: int):
    """Random, Mean and Oracle samples of the study's users.

    Random: uniform draws from all training latents, (reps, U, k, d). Mean: each user's mean liked training latent,
    (U, d). Oracle: uniform draws from the user's liked training latents, (reps, U, k, d): the empirical
    p(latent | user, like), i.e. what a perfect sampler of it would give. Each has its own RNG stream.
    """
    rng = np.random.default_rng(seed_sequence(seed, "dsprites_baselines"))
    train_lat = latents[study.train_idx].numpy()
    random = train_lat[rng.integers(0, len(train_lat), size=(reps, study.n_users, k))]
    liked = study.likes[:, study.train_idx]
    mean = np.stack([train_lat[liked[u]].mean(0) for u in range(study.n_users)])
    rng = np.random.default_rng(seed_sequence(seed, "dsprites_oracle"))
    oracle = np.stack([train_lat[liked[u]][rng.integers(0, liked[u].sum(), size=(reps, k))]
                       for u in range(study.n_users)], axis=1)
    return random.astype(np.float32), mean.astype(np.float32), oracle.astype(np.float32)


def landing_pairs(samples, pool, pool_pair, n_pairs: int = 4) -> np.ndarray:
    """(U, n_pairs): share of each user's samples (reps, U, K, d) whose cosine nearest pool item has pair p."""
    pairs = np.asarray(pool_pair)[cosine_nn(np.asarray(samples), pool)]  # (reps, U, K)
    return np.stack([np.bincount(pairs[:, u].ravel(), minlength=n_pairs) / pairs[:, u].size
                     for u in range(pairs.shape[1])])


def rebeca_samples(pipe, n_users: int, reps: int, k: int, cfg_scale: float, seed: int = 0) -> np.ndarray:
    """(reps, U, k, d) VAE latents with R = 1 from a RebecaPipeline; repetition r uses sample indices r*k .. r*k + k - 1."""
    x = pipe(list(range(n_users)), reps * k, rating=1, cfg_scale=cfg_scale, seed=seed)  # (U, reps*k, d)
    return x.view(n_users, reps, k, -1).permute(1, 0, 2, 3).contiguous().numpy()


@dataclass(frozen=True)
class Table1Inputs:
    """Everything Table 1 is computed from (saved as table1_inputs.npz)."""

    test_latents: np.ndarray  # float32 (N_test, d)
    test_likes: np.ndarray  # bool (U, N_test)
    rebeca: np.ndarray  # float32 (reps, U, K, d)
    random: np.ndarray  # float32 (reps, U, K, d)
    mean: np.ndarray  # float32 (U, d)
    oracle: np.ndarray  # float32 (reps, U, K, d), uniform draws from the user's liked training latents
    latent_mean: np.ndarray  # float32 (d,), training latents' per-dimension mean (the prior's standardisation)
    latent_std: np.ndarray  # float32 (d,), and standard deviation

    def save(self, path: Path) -> Path:
        arrays = {k: np.ascontiguousarray(v) for k, v in asdict(self).items()}
        arrays["test_latents"] = arrays["test_latents"].astype(np.float32)
        arrays["test_likes"] = arrays["test_likes"].astype(bool)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        return Path(path)


def find_dsprites_npz(data_dir: str | Path) -> Path | None:
    """The official npz under `<data_dir>/dsprites/` when 00_setup put it there, else None (renderer)."""

    path = Path(data_dir) / "dsprites" / DSPRITES_FILENAME
    return path if path.exists() else None


def precision_table(samples: dict[str, np.ndarray], test_latents, test_likes, ks):
    """P@k (mean, std over repetitions) for several sample sets of shape (reps, U, K, d)."""
    rows = []
    for name, x in samples.items():
        for k in ks:
            p, r = section33_pr(x, test_latents, test_likes, k)
            rows.append(dict(setting=name, k=k, precision=p.mean(-1).mean(), precision_std=p.mean(-1).std(),
                             recall=r.mean(-1).mean()))
    return pd.DataFrame(rows)


def table1_readings(inputs: dict, ks) -> pd.DataFrame:
    """Table 1 under each reading: P@k with latent / standardized neighbours, R@k with user / all-users denominators."""
    base = table1(inputs, ks)
    std = table1(inputs, ks, space="standardized")
    pooled = table1(inputs, ks, recall_denominator="all_users")
    return pd.DataFrame({"method": base["method"], "k": base["k"], "precision_latent": base["precision"],
                         "precision_standardized": std["precision"], "paper_precision": base["paper_precision"],
                         "recall_user": base["recall"], "recall_all_users": pooled["recall"],
                         "paper_recall": base["paper_recall"]})
