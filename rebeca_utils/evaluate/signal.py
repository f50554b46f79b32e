"""Does the planted signal survive the whole chain? The decoder round trip and the shuffled-users control.

Both run in any profile; on the smoke world they are the checks that personalization survives generation (a user
mix-up anywhere between prior sampling and re-encoding makes notebook 10's Algorithm 2 signal vanish).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import GenerationConfig, ModelsConfig
from ..data.synthetic import HUES, LAYOUTS, hue_class, layout_class, synthetic_truth
from ..models.decoder import build_decoder
from ..models.encoders import build_encoder
from ..models.tiny_weights import weights_tag
from ..pipeline.decoding import decode, run_batch
from ..pipeline.items import make_items
from ..pipeline.plan import write_manifest
from ..pipeline.sampling import rebeca_items
from ..world.cache import fixture_dir, world_split
from ..world.recipe import load_images
from .methods import reencode
from .scores import score_matrix
from .stats import PermutationResult, permutation_test


def _embed(encoder, images: np.ndarray) -> torch.Tensor:
    return encoder.encode(torch.stack([encoder.transform(Image.fromarray(a)) for a in images]))


def round_trip(models: ModelsConfig, gen: GenerationConfig, names: Sequence[str] | None = None,
               device: str = "cpu", decoder_models: ModelsConfig | None = None) -> dict[str, Any]:
    """Held-out fixture images -> decoder-space embedding -> decoded (build_decoder, run_batch, decoder CFG) ->
    re-encoded: pixel-hue and pixel-layout agreement with the conditioning image, and cosine(embedding,
    re-encoded). `decoder_models` (default `models`) builds the decoder, e.g. tiny_weights='random' for the
    baseline with the trained encoder (a random encoder maps every image near one point, so its cosine says
    nothing)."""
    root = fixture_dir()
    names = list(names) if names is not None else world_split(models)[1]
    src = load_images(root, names)
    encoder = build_encoder("decoder", models, device)
    emb = _embed(encoder, src)
    items = make_items("roundtrip", "heldout", [0] * len(names), list(range(len(names))), gen, ip_embeddings=emb)
    pipe = build_decoder(decoder_models or models, gen, device)
    bs = gen.batch_size
    out = np.concatenate([run_batch(pipe, items[i:i + bs], gen) for i in range(0, len(items), bs)])
    re = _embed(encoder, (out * 255).round().astype(np.uint8))
    truth = synthetic_truth(root)["attributes"]
    hue = np.array([list(HUES).index(truth[n]["hue"]) for n in names])
    layout = np.array([LAYOUTS.index(truth[n]["layout"]) for n in names])
    src01 = src.astype(np.float32) / 255
    return {"n": len(names), "hue_agreement": float(np.mean(hue_class(out) == hue)),
            "layout_agreement": float(np.mean(layout_class(out) == layout)),
            "hue_check_on_sources": float(np.mean(hue_class(src01) == hue)),  # the pixel check itself works
            "layout_check_on_sources": float(np.mean(layout_class(src01) == layout)),
            "cosine": float(F.cosine_similarity(emb, re).mean()), "images": out, "names": names,
            "encoder_weights": weights_tag(models), "decoder_weights": weights_tag(decoder_models or models)}


def derange_users(samples: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A user mix-up on purpose: every user's prior samples go to another user (a seeded derangement; user_id and
    index stay, the img_emb rows move). Users must have the same indices (as notebook 04's samples do)."""
    users = samples["user_id"].unique(sorted=True)
    if len(users) < 2:
        raise ValueError("derange_users needs at least two users")
    rng = np.random.default_rng([seed, 0xD3])
    perm = rng.permutation(len(users))
    while np.any(perm == np.arange(len(users))):
        perm = rng.permutation(len(users))
    src = {int(u): int(users[p]) for u, p in zip(users, perm)}  # user u receives the samples of src[u]
    row = {(int(u), int(j)): r for r, (u, j) in enumerate(zip(samples["user_id"], samples["index"]))}
    try:
        take = [row[(src[int(u)], int(j))] for u, j in zip(samples["user_id"], samples["index"])]
    except KeyError as e:
        raise ValueError(f"derange_users: user {e.args[0][0]} has no sample index {e.args[0][1]}") from None
    return {**samples, "img_emb": samples["img_emb"][torch.tensor(take)].clone()}


def shuffled_users_control(samples: dict[str, torch.Tensor], setting: str, gen: GenerationConfig,
                           models: ModelsConfig, verifier, out_dir: str | os.PathLike, n_permutations: int,
                           seed: int = 0, per_user: int = 0, device: str = "cpu") -> tuple[PermutationResult, int]:
    """Algorithm 2 on images decoded from `samples` with users deranged (derange_users): decoded into `out_dir`
    through the kit's decoder (resumable), re-encoded in the verifier space, scored by `verifier`. A chain that
    keeps users straight shows a signal unshuffled and none here. `per_user` > 0 decodes only each user's first
    `per_user` samples. Returns (result, images decoded)."""
    if per_user > 0:
        keep = samples["index"] < per_user
        samples = {k: v[keep] for k, v in samples.items()}
    items = rebeca_items(derange_users(samples, seed), setting, gen)
    decode(build_decoder(models, gen, device), items, out_dir, gen, models=models, progress=False)
    manifest = write_manifest(items, out_dir, gen, models)
    store = reencode(out_dir, manifest, models, device, spaces=("verifier",), progress=False)["verifier"]
    ok: pd.DataFrame = manifest[manifest["status"] == "ok"]
    emb = store.lookup(ok["path"].tolist())
    users = np.sort(ok["user_id"].unique())
    owner = np.searchsorted(users, ok["user_id"].to_numpy())
    return permutation_test(score_matrix(verifier, users, emb, device=device), owner, n_permutations, seed), len(ok)

