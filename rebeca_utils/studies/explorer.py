"""The explorer's back end (notebook 13): each action of the panel is one call here, through 04's and 12's code.

Loads what notebooks 02, 03 and 05 wrote; generates a grid for (user, prior ω, decoder CFG, n, seed) with the
prior sampler and decoder of notebook 04; fits a new user from liked / disliked gallery images with notebook 12's
user inversion, and the verifier's row for them with the verifier frozen (so their images get a score too); takes
likes / dislikes on generated images as feedback (re-encoded, added to the history, the user updated); saves and
reloads fitted users. Prior noise and decoder seeds depend on (seed, j) only, so two users compared side by side
get the same seeds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import Profile
from ..data import splits as split_table
from ..data.flickr import IMAGE_DIR
from ..evaluate import scores
from ..io import read_safetensors, save_safetensors
from ..models import decoder, encoders, nmf
from ..pipeline import embeddings
from ..pipeline.decoding import run_batch
from ..pipeline.items import make_items
from ..pipeline.rebeca import PIPELINE_DIR, RebecaPipeline
from ..pipeline.sampling import state_fingerprint
from ..steps import folder, notebook
from ..train.verifier import fit_user_row

SEED_ID = 0  # every user's prior noise is seeded by (seed, SEED_ID, j): the same seeds for every user


@dataclass
class Grid:
    """Decoded images (n, H, W, 3) in [0, 1] for one user, and their verifier scores; `fitted_score`: the score
    comes from a verifier row fitted on the user's ratings (a new user), not a trained one."""

    user_id: int
    images: np.ndarray
    scores: np.ndarray
    seconds: float
    fitted_score: bool = False


class Explorer:
    """Everything the panel needs, loaded once from a profile's output folder."""

    def __init__(self, cfg: Profile, root: str | os.PathLike, device: str = "cpu",
                 data_dir: str | os.PathLike | None = None):
        root = Path(root)
        self.cfg, self.device, self.gen_cfg = cfg, device, cfg.generation
        src02, src03 = root / folder(2), root / folder(3)
        self.splits, _ = split_table.load_splits(src02 / "flickr_splits.parquet")
        self.image_dir = split_table.dataset_root(cfg.flickr, src02, data_dir) / IMAGE_DIR  # the gallery's images
        self.store = embeddings.load_embeddings(src02 / "embeddings", "decoder", cfg.models)
        self.ver_store = embeddings.load_embeddings(src02 / "embeddings", "verifier", cfg.models)
        self.rebeca = RebecaPipeline.from_pretrained(src03 / PIPELINE_DIR, device=device)
        self.rebeca.set_decoder(decoder.build_decoder(cfg.models, self.gen_cfg, device), self.gen_cfg)
        self.trained_users = self.rebeca.trained_users
        self.verifier = nmf.load_verifier(root / folder(5) / "verifier", device)
        self.encoder = encoders.build_encoder("verifier", cfg.models, device)
        self.dec_encoder = None  # decoder-space encoder: built on the first feedback (re-encodes generated images)
        self.ver_ids: dict[int, int] = {}  # a fitted user's row in the explorer's copy of the verifier
        # what a user rated in this session: decoder- and verifier-space embeddings and the ratings
        self.history: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.names: dict[int, str] = {u: f"user {u + 1}" for u in self.trained_users}
        self.likes: dict[int, list[str]] = {}  # a fitted user's liked images (their strip)
        self.note = ""  # what the last fit means when its ratings were unusual (only dislikes)
        self.base_fingerprint = state_fingerprint(self.rebeca.prior)

    def liked(self, user_id: int, n: int = 8) -> list[Path]:
        """Up to n images the user liked in the training split, or when fitting (the strip under the dropdown)."""
        if user_id in self.likes:
            return [self.image_dir / name for name in self.likes[user_id][:n]]
        s = self.splits
        rows = s[(s["user_id"] == user_id) & (s["split"] == "train") & (s["like"] == 1)]
        return [self.image_dir / name for name in rows["image"].head(n)]

    def gallery(self, page: int = 0, per_page: int = 24) -> list[str]:
        """Page `page` of the dataset's images with an embedding (names), in a fixed order."""
        names = sorted(set(self.splits["image"]) & set(self.store[0]))
        return names[page * per_page : (page + 1) * per_page]

    def generate(self, user_id: int, cfg_scale: float, decoder_cfg: float, n: int, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> Grid:
        """n images for `user_id` at prior ω = cfg_scale and this decoder CFG; sample j seeded by (seed, j)."""
        t0, j = time.perf_counter(), torch.arange(n)
        u = torch.full((n,), int(user_id))
        emb = self.rebeca.sample(u, torch.ones_like(u), j, cfg_scale=cfg_scale, seed=seed,
                                 seed_ids=torch.full_like(u, SEED_ID))
        gen_cfg = dataclasses.replace(self.gen_cfg, decoder_cfg=float(decoder_cfg))
        # decoder seed of image j: App G.3's formula with the seed in the user's place, the same for every user
        items = [dataclasses.replace(it, user_id=int(user_id))
                 for it in make_items("explorer", "grid", [seed] * n, range(n), gen_cfg, ip_embeddings=emb)]
        images, bs = [], max(1, gen_cfg.batch_size)
        for s in range(0, n, bs):
            images.append(run_batch(self.rebeca.decoder, items[s : s + bs], gen_cfg))
            if progress is not None:
                progress(min(s + bs, n), n)
        images = np.concatenate(images)
        return Grid(int(user_id), images, self.score(user_id, images), time.perf_counter() - t0,
                    int(user_id) in self.ver_ids)

    def score(self, user_id: int, images: np.ndarray) -> np.ndarray:
        """Verifier scores of (n, H, W, 3) images for a user: their trained row, their fitted row, or NaN."""
        vid = self.ver_ids.get(int(user_id), int(user_id) if user_id in self.trained_users else None)
        if vid is None:
            return np.full(len(images), np.nan)
        return scores.score(self.verifier, [vid] * len(images), [to_pil(im) for im in images], encoder=self.encoder)

    def fit(self, liked: Sequence[str], disliked: Sequence[str] = (), name: str = "new user", steps: int | None = None,
            seed: int = 0, progress: bool = False) -> tuple[int, float]:
        """User inversion on the chosen images (R = 1 liked, R = 0 disliked); the new user's id and seconds."""
        liked, disliked = list(dict.fromkeys(liked)), list(dict.fromkeys(disliked))  # a repeated click counts once
        rejected = set(disliked)
        both = [n for n in liked if n in rejected]
        if both:
            raise ValueError(f"fit: image {both[0]!r} is both liked and disliked; keep one rating per image")
        if not liked and not disliked:
            raise ValueError("fit: rate at least one image")
        self.note = ("" if liked else "only dislikes: the new user is fitted on R = 0 alone, so its R = 1 samples "
                     "are the population's taste steered away from these images, not a taste of its own")
        images = liked + disliked
        rating = torch.tensor([1] * len(liked) + [0] * len(disliked))
        emb = self.store_lookup(images)
        ver = self.store_lookup(images, self.ver_store, "verifier")
        uid = self.rebeca.fit_user(emb, rating, init="null", seed=seed, progress=progress,
                                   **({"steps": steps} if steps else {}))
        self.names[uid], self.likes[uid], self.history[uid] = name, list(liked), (emb, ver, rating)
        self._fit_verifier_row(uid, ver, rating)
        return uid, self.rebeca.last_fit.seconds

    def _fit_verifier_row(self, uid: int, ver_emb: torch.Tensor, rating: torch.Tensor) -> None:
        """The user's verifier row, fitted on their ratings with the verifier frozen (added, or replaced)."""
        rows = fit_user_row(self.verifier, ver_emb, rating)
        if uid in self.ver_ids:
            with torch.no_grad():
                for table, r in zip((self.verifier.user_gmf, self.verifier.user_mlp, self.verifier.user_bias), rows):
                    table.weight[self.ver_ids[uid]] = r[0]
        else:
            [self.ver_ids[uid]] = self.verifier.add_users(*rows)

    def feedback(self, grid: Grid, rating: dict[int, int], seed: int = 0) -> float:
        """Likes (1) / dislikes (0) on images j of a generated grid: re-encoded, added to the user's history, the
        user updated from its current row (notebook 12's update); returns the seconds the update took."""
        if not rating:
            raise ValueError("feedback: rate at least one generated image")
        bad = [j for j, r in rating.items() if r not in (0, 1) or not 0 <= j < len(grid.images)]
        if bad:
            raise ValueError(f"feedback: image {bad[0]} rated {rating[bad[0]]!r}; rate images 0..{len(grid.images) - 1} "
                             f"with 1 (like) or 0 (dislike)")
        uid, idx = grid.user_id, sorted(rating)
        if self.dec_encoder is None:
            self.dec_encoder = encoders.build_encoder("decoder", self.cfg.models, self.device)
        pil = [to_pil(grid.images[j]) for j in idx]
        new = (scores.embed_pil(pil, self.dec_encoder), scores.embed_pil(pil, self.encoder),
               torch.tensor([rating[j] for j in idx]))
        old = self.history.get(uid, tuple(x[:0] for x in new))
        self.history[uid] = emb, ver, r = tuple(torch.cat([a, b]) for a, b in zip(old, new))
        fit = self.rebeca.update_user(uid, emb, r, seed=seed)
        if uid in self.ver_ids:  # a fitted user's verifier row follows their history; a trained user's stays
            self._fit_verifier_row(uid, ver, r)
        return fit.seconds

    def add(self, row: torch.Tensor, name: str, likes: Sequence[str] = (), history=None, ver_rows=None) -> int:
        """Append a fitted row to the explorer's prior (the trained users keep their rows), with the user's history
        and verifier rows when known."""
        [uid] = self.rebeca.add_users(row[None], source="explorer", name=name)
        self.names[uid], self.likes[uid] = name, list(likes)
        if history is not None:
            self.history[uid] = history
        if ver_rows is not None:
            [self.ver_ids[uid]] = self.verifier.add_users(*ver_rows)
        return uid

    def store_lookup(self, images: Sequence[str], store=None, space: str = "decoder") -> torch.Tensor:
        """Embeddings of dataset images by name from notebook 02's store (decoder space unless given)."""
        names, emb = self.store if store is None else store
        pos = {n: i for i, n in enumerate(names)}
        missing = [im for im in images if im not in pos]
        if missing:
            raise KeyError(f"no {space}-space embedding for image {missing[0]!r}: not among the images {notebook(2)} "
                           f"embedded")
        return emb[[pos[im] for im in images]].float()

    def save_user(self, user_id: int, path: str | os.PathLike) -> Path:
        """One fitted user as a safetensors file: its row, its rated history and verifier rows (when it has them),
        its name and the fingerprint of the prior it belongs to."""
        uid = int(user_id)
        tensors = {"row": self.rebeca.prior.user_emb.weight[uid].detach().cpu()[None]}
        if uid in self.history:
            tensors.update(zip(("history_emb", "history_ver", "history_rating"), self.history[uid]))
        if uid in self.ver_ids:
            v = self.ver_ids[uid]
            tensors.update({f"ver_{t}": getattr(self.verifier, f"user_{t}").weight[v : v + 1].detach().cpu()
                            for t in ("gmf", "mlp", "bias")})
        meta = {"name": self.names[uid], "prior": self.base_fingerprint, "likes": self.likes.get(uid, [])}
        return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path,
                                {"rebeca_user": json.dumps(meta)})  # atomic

    def load_user(self, path: str | os.PathLike) -> int:
        """A saved user, added again; refused when it was fitted on another prior."""
        tensors, meta = read_safetensors(path, "save the user again from the explorer")
        if "rebeca_user" not in meta:
            raise ValueError(f"{path}: not a user saved by the explorer (no rebeca_user metadata)")
        info = json.loads(meta["rebeca_user"])
        if info["prior"] != self.base_fingerprint:
            raise ValueError(f"{path}: this user was fitted on another prior (fingerprint {info['prior'][:12]}), "
                             f"not on {self.base_fingerprint[:12]}")
        history = (tuple(tensors[k] for k in ("history_emb", "history_ver", "history_rating"))
                   if "history_rating" in tensors else None)
        ver = tuple(tensors[f"ver_{t}"] for t in ("gmf", "mlp", "bias")) if "ver_gmf" in tensors else None
        return self.add(tensors["row"][0], info["name"], info.get("likes", []), history, ver)


def to_pil(image: np.ndarray) -> Image.Image:
    """An (H, W, 3) float image in [0, 1] as a PIL image."""
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
