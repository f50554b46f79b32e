"""`RebecaPipeline`: REBECA's prior as one object (§2), in the Hub's conventions.

It holds the prior, its noise schedule, the embedding normaliser, the sampler settings, the users (trained, and
added later with how each was made), the embedding space it samples and, optionally, a decoder and a history
encoder (a new user's ratings -> a user row in one pass). One folder holds it: `rebeca_pipeline.json`, `prior/`
(config.json + model.safetensors), `scheduler/scheduler_config.json`, `normalizer.json`, `history_encoder/` when
there is one, and a generated model card (README.md).

    pipe = RebecaPipeline.from_pretrained("outputs/paper/03_train_prior/pipeline")
    img_emb = pipe([3, 7], n=4, seed=0)                 # (2, 4, d) decoder-space embeddings
    new_id = pipe.fit_user(liked_and_disliked_emb, ratings)
    pipe.save_pretrained("my_rebeca")
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from ..config import DiffusionConfig, GenerationConfig, NewUserConfig
from ..io import CorruptFileError, atomic_dir, load_model, save_safetensors, write_json
from ..models.prior import RebecaPrior, load_prior
from ..train.diffusion import make_scheduler
from ..train.history_encoder import HistoryEncoder
from ..train.inversion import FitResult, fit_user, with_rows
from ..train.normalize import Normalizer
from .decoding import run_batch
from .items import make_items
from .model_card import model_card
from .sampling import SAMPLERS, known_samples, read_cache, sample_prior, state_fingerprint

CONFIG_NAME = "rebeca_pipeline.json"
PIPELINE_DIR = "pipeline"  # notebook 03 saves it as <run>/03_train_prior/pipeline
ENCODER_DIR = "history_encoder"  # optional: the zero-shot history encoder (notebook 12 trains it)
FORMAT_VERSION = 1
# every prior forward runs this many rows, so a sample's bits do not depend on its batch mates; a fixed shape is all
# that needs, and a small one keeps a 4-image request cheap (512 made the explorer and 12 pay 512 rows a step)
PAD_BATCH = 64


class RebecaPipeline:
    """Sample user-conditioned CLIP image embeddings, decode them, add and update users, save and load."""

    def __init__(self, prior: RebecaPrior, scheduler: DDPMScheduler, normalizer: Normalizer | None = None, *,
                 sampler: str = DiffusionConfig.sampler, steps: int = DiffusionConfig.sampler_steps,
                 cfg_scale: float = NewUserConfig.cfg_scale, users: dict | None = None, space: dict | None = None,
                 card: dict | None = None, inversion: dict | None = None, decoder=None,
                 generation: GenerationConfig | None = None, encoder: HistoryEncoder | None = None):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: valid samplers are {', '.join(SAMPLERS)}")
        self.prior, self.scheduler = prior.eval(), scheduler
        self.normalizer = normalizer or Normalizer("none")
        self.sampler, self.steps, self.cfg_scale = sampler, int(steps), float(cfg_scale)
        self.users = {int(u): dict(v) for u, v in (users or {}).items()}  # user_id -> how it was made
        self.space = dict(space or {"dim": prior.emb_dim})
        self.card = dict(card or {})
        defaults = NewUserConfig()
        self.inversion = {"steps": defaults.steps, "lr": defaults.lr, "batch_size": defaults.batch_size,
                          "update_l2": defaults.update_l2, **(inversion or {})}
        self.decoder, self.generation = decoder, generation
        self.encoder = None if encoder is None else encoder.eval()  # history -> user row in one pass (optional)
        self.last_fit: FitResult | None = None

    @classmethod
    def from_config(cls, prior: RebecaPrior, diffusion: DiffusionConfig, normalizer: Normalizer, *,
                    trained_users: Sequence[int], new_users: NewUserConfig | None = None,
                    scheduler: DDPMScheduler | None = None, **kw) -> "RebecaPipeline":
        """A pipeline around a freshly trained prior, with the profile's one sampler default (config.diffusion);
        `scheduler` defaults to the training schedule config.diffusion describes."""
        nu = new_users or NewUserConfig()
        inversion = {"steps": nu.steps, "lr": nu.lr, "batch_size": nu.batch_size, "update_l2": nu.update_l2}
        return cls(prior, scheduler or make_scheduler(diffusion), normalizer, sampler=diffusion.sampler,
                   steps=diffusion.sampler_steps, cfg_scale=nu.cfg_scale, inversion=inversion,
                   users={int(u): {"source": "trained"} for u in trained_users}, **kw)

    # ---- users -------------------------------------------------------------------------------------------------
    @property
    def user_ids(self) -> list[int]:
        """Every user the pipeline can sample: trained, then added."""
        return sorted(self.users)

    @property
    def trained_users(self) -> list[int]:
        return sorted(u for u, v in self.users.items() if v.get("source") == "trained")

    @property
    def null_user(self) -> int:
        """The unconditional user (CFG's null row): 'someone we know nothing about'."""
        return self.prior.null_user

    def _check_users(self, user_ids) -> torch.Tensor:
        ids = torch.as_tensor(user_ids).long().reshape(-1)
        unknown = sorted({int(u) for u in ids} - set(self.users) - {self.null_user})
        if unknown:
            raise ValueError(f"user_ids {unknown} are not users of this pipeline (it has {len(self.users)}: "
                             f"{self.user_ids[:8]}{' ...' if len(self.users) > 8 else ''}); add_users() or fit_user() "
                             f"first")
        return ids

    def add_users(self, rows: torch.Tensor, *, source: str = "given", **info) -> list[int]:
        """Append users with the given prior rows (n, hidden_dim); returns their ids. `info` is kept with each."""
        ids = self.prior.add_users(rows)
        for u in ids:
            self.users[u] = {"source": source, **info}
        return ids

    def fit_user(self, img_emb: torch.Tensor, rating: torch.Tensor, *, init="null", seed: int = 0,
                 **fit_kw) -> int:
        """A new user from rated images (decoder-space img_emb, rating 1/0) by inversion; returns its user_id."""
        kw = {k: self.inversion[k] for k in ("steps", "lr", "batch_size")} | fit_kw
        z = self.normalizer.forward(torch.as_tensor(img_emb).float())
        self.last_fit = fit_user(self.prior, self.scheduler, z, torch.as_tensor(rating), init=init,
                                 trained_users=self.trained_users, seed=seed, **kw)
        [uid] = self.add_users(self.last_fit.row[None], source="inversion", n_ratings=len(z),
                               n_likes=int(torch.as_tensor(rating).sum()), init=init if isinstance(init, str) else
                               "given", steps=kw["steps"], seed=seed)
        return uid

    def encode_user(self, img_emb: torch.Tensor, rating: torch.Tensor, *, refine_steps: int = 0, seed: int = 0,
                    **fit_kw) -> int:
        """A new user from rated images through the history encoder (one forward pass), optionally refined by
        `refine_steps` of inversion from the encoded row; returns its user_id."""
        if self.encoder is None:
            raise ValueError("encode_user() needs a history encoder: pipe.encoder = train_encoder(...).encoder "
                             "(notebook 12 trains and saves one)")
        z = self.normalizer.forward(torch.as_tensor(img_emb).float())
        row = self.encoder.encode(z, torch.as_tensor(rating)).to(self.prior.user_emb.weight)
        if refine_steps:
            return self.fit_user(img_emb, rating, init=row, seed=seed, steps=refine_steps, **fit_kw)
        [uid] = self.add_users(row[None], source="encoder", n_ratings=len(z),
                               n_likes=int(torch.as_tensor(rating).sum()))
        return uid

    def update_user(self, user_id: int, img_emb: torch.Tensor, rating: torch.Tensor, *, seed: int = 0,
                    **fit_kw) -> FitResult:
        """Refit `user_id`'s row on new ratings, starting from and pulled towards its current row (in place)."""
        self._check_users([user_id])
        kw = {"l2": self.inversion["update_l2"], **{k: self.inversion[k] for k in ("steps", "lr", "batch_size")},
              **fit_kw}
        old = self.prior.user_emb.weight[user_id].detach().clone()
        z = self.normalizer.forward(torch.as_tensor(img_emb).float())
        self.last_fit = fit_user(self.prior, self.scheduler, z, torch.as_tensor(rating), init=old, anchor=old,
                                 seed=seed, **kw)
        with torch.no_grad():
            self.prior.user_emb.weight[user_id] = self.last_fit.row.to(self.prior.user_emb.weight)
        rec = self.users[user_id]
        rec["updates"] = rec.get("updates", 0) + 1
        return self.last_fit

    def with_rows(self, rows: dict[int, torch.Tensor], source: str = "given") -> "RebecaPipeline":
        """A copy whose user rows `rows` (existing ids, e.g. hold-out slots) are replaced and sampleable."""
        users = {**self.users, **{int(u): {"source": source} for u in rows}}
        return RebecaPipeline(with_rows(self.prior, rows), self.scheduler, self.normalizer, sampler=self.sampler,
                              steps=self.steps, cfg_scale=self.cfg_scale, users=users, space=self.space,
                              card=self.card, inversion=self.inversion, decoder=self.decoder,
                              generation=self.generation, encoder=self.encoder)

    def with_encoder(self, encoder: HistoryEncoder | None) -> "RebecaPipeline":
        """The same pipeline with this history encoder (encode_user; saved with it)."""
        out = copy.copy(self)
        out.encoder = None if encoder is None else encoder.eval()
        return out

    def with_sampler(self, sampler: str, steps: int | None = None) -> "RebecaPipeline":
        """The same prior and users under another sampler (e.g. "ddpm", the paper's 1000-step chain)."""
        out = copy.copy(self)
        out.sampler, out.steps = sampler, self.steps if steps is None else int(steps)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: valid samplers are {', '.join(SAMPLERS)}")
        return out

    # ---- sampling ----------------------------------------------------------------------------------------------
    def to(self, device: str) -> "RebecaPipeline":
        self.prior.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.prior.user_emb.weight.device

    def sample(self, user_ids, ratings, indices, *, cfg_scale: float | None = None, seed: int = 0, seed_ids=None,
               progress: bool = False) -> torch.Tensor:
        """(N, d) decoder-space embeddings for items (user_ids[i], ratings[i], indices[i]); item i is seeded by
        (seed, seed_ids[i] or user_ids[i], indices[i]), whatever else is sampled with it."""
        ids = self._check_users(user_ids)
        x = sample_prior(self.prior, self.scheduler, ids, ratings, indices, sampler=self.sampler, steps=self.steps,
                         cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale, seed=seed, seed_ids=seed_ids,
                         batch_size=PAD_BATCH, pad=True, device=str(self.device), progress=progress)
        return self.normalizer.inverse(x)

    def __call__(self, user_ids, n: int = 1, *, rating: int = 1, cfg_scale: float | None = None, seed: int = 0,
                 progress: bool = False) -> torch.Tensor:
        """(len(user_ids), n, d) embeddings; sample j of user u is seeded by (seed, u, j) whatever the batch."""
        ids = torch.as_tensor(user_ids).long().reshape(-1)
        u, j = ids.repeat_interleave(n), torch.arange(n).repeat(len(ids))
        x = self.sample(u, torch.full_like(u, rating), j, cfg_scale=cfg_scale, seed=seed, progress=progress)
        return x.view(len(ids), n, -1)

    def embeddings(self, users: Sequence[int], n_per_user: int, *, cfg_scale: float, path: str | os.PathLike,
                   rating: int = 1, seed: int = 0, reuse: Sequence[str | os.PathLike] = (), progress: bool = True
                   ) -> dict[str, torch.Tensor]:
        """{"user_id", "index", "img_emb"} for every (user, j < n_per_user), cached in `path` (safetensors).

        A sample is what (u, j) and SAMPLE_KEYS (ω, rating, seed, sampler, steps, prior weights, normaliser, rows
        per forward) determine: one found in a `reuse` cache (e.g. notebook 04's, for 09) or in `path` is taken as
        stored, bit for bit, and only the others are drawn."""
        users = [int(u) for u in users]
        meta = {"users": users, "n_per_user": n_per_user, "cfg_scale": cfg_scale, "rating": rating, "seed": seed,
                "sampler": self.sampler, "steps": self.steps if self.sampler != "ddpm" else
                self.scheduler.config.num_train_timesteps, "prior": state_fingerprint(self.prior),
                "normalizer": self.normalizer.kind, "pad_batch": PAD_BATCH}
        meta = json.loads(json.dumps(meta))  # as stored: tuples -> lists
        path, keys = Path(path), [(u, j) for u in users for j in range(n_per_user)]
        known = known_samples([*reuse, path], meta)
        own = read_cache(path)
        if own is not None and own[1] == meta and all(torch.equal(known[k], e) for k, e in zip(keys, own[0]["img_emb"])):
            return {k: own[0][k] for k in ("user_id", "index", "img_emb")}
        todo = [k for k in keys if k not in known]
        if todo:
            u, j = (torch.tensor(c) for c in zip(*todo))
            x = self.sample(u, torch.full_like(u, rating), j, cfg_scale=cfg_scale, seed=seed, progress=progress)
            known.update(zip(todo, x.float()))
        out = {"user_id": torch.tensor(users).repeat_interleave(n_per_user),
               "index": torch.arange(n_per_user).repeat(len(users)),
               "img_emb": torch.stack([known[k] for k in keys]).float().contiguous()}
        save_safetensors(out, path, {"rebeca": json.dumps(meta)})
        return out

    # ---- decoding ----------------------------------------------------------------------------------------------
    def set_decoder(self, decoder, generation: GenerationConfig) -> "RebecaPipeline":
        """Attach a RebecaDecoderPipeline (models.decoder.build_decoder) and the image settings it decodes with."""
        self.decoder, self.generation = decoder, generation
        return self

    def generate(self, user_ids, n: int = 1, *, rating: int = 1, cfg_scale: float | None = None, seed: int = 0,
                 img_emb: torch.Tensor | None = None) -> list[list[Image.Image]]:
        """PIL images per user through the decoder: notebook 04's work items (decoder seed 42 + 10,000 u + j) and
        `run_batch`, so image j of user u equals 04's file for the same embedding."""
        if self.decoder is None or self.generation is None:
            raise ValueError("generate() needs a decoder: pipe.set_decoder(build_decoder(models, generation), "
                             "generation)")
        ids = torch.as_tensor(user_ids).long().reshape(-1)
        emb = self(ids, n, rating=rating, cfg_scale=cfg_scale, seed=seed) if img_emb is None else img_emb
        items = make_items("rebeca", "pipeline", ids.repeat_interleave(n).tolist(), list(range(n)) * len(ids),
                           self.generation, ip_embeddings=emb.reshape(len(ids) * n, -1))
        bs = self.generation.batch_size
        arrays = np.concatenate([run_batch(self.decoder, items[s : s + bs], self.generation)
                                 for s in range(0, len(items), bs)])
        images = [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in arrays]
        return [images[i * n : (i + 1) * n] for i in range(len(ids))]

    # ---- saving and loading ------------------------------------------------------------------------------------
    def config(self) -> dict:
        """What rebeca_pipeline.json holds."""
        return {"format_version": FORMAT_VERSION, "sampler": self.sampler, "steps": self.steps,
                "cfg_scale": self.cfg_scale, "pad_batch": PAD_BATCH, "space": self.space,
                "users": {str(u): self.users[u] for u in self.user_ids}, "inversion": self.inversion,
                "card": self.card}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """One folder, written atomically: configs as JSON, weights as safetensors, a model card."""
        with atomic_dir(folder) as tmp:
            self.prior.save_pretrained(tmp / "prior")
            self.scheduler.save_pretrained(tmp / "scheduler")
            self.normalizer.save(tmp / "normalizer.json")
            if self.encoder is not None:
                self.encoder.save_pretrained(tmp / ENCODER_DIR)
            write_json(tmp / CONFIG_NAME, self.config())
            (tmp / "README.md").write_text(model_card(self.config(), self.prior))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder_or_repo: str | os.PathLike, *, device: str = "cpu", revision: str | None = None,
                        token: str | None = None) -> "RebecaPipeline":
        """Load a saved folder, or a Hub repo id (through the Hugging Face cache; offline when HF_HUB_OFFLINE=1)."""
        folder = Path(folder_or_repo)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download  # only for a repo id: a local folder needs no Hub client

            folder = Path(snapshot_download(str(folder_or_repo), revision=revision, token=token))
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise CorruptFileError(f"{path}: not found; {folder} is not a saved RebecaPipeline")
        try:
            cfg = json.loads(path.read_text())
        except ValueError as exc:
            raise CorruptFileError(f"{path}: not valid JSON ({exc}); save the pipeline again") from None
        if cfg.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(f"{path}: format_version {cfg.get('format_version')!r}, this kit reads "
                                   f"{FORMAT_VERSION}")
        prior = load_prior(folder / "prior", device)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        encoder = (load_model(HistoryEncoder, folder / ENCODER_DIR, "save the pipeline again (notebook 12)").to(device)
                   if (folder / ENCODER_DIR).is_dir() else None)
        return cls(prior, scheduler, Normalizer.load(folder / "normalizer.json"), sampler=cfg["sampler"],
                   steps=cfg["steps"], cfg_scale=cfg["cfg_scale"], users=cfg["users"], space=cfg["space"],
                   card=cfg["card"], inversion=cfg["inversion"], encoder=encoder)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    commit_message: str = "Upload RebecaPipeline", api=None) -> str:
        """Save into a temporary folder and upload it as `repo_id` (huggingface_hub's HfApi); returns the commit."""
        from huggingface_hub import HfApi  # only when pushing (tests pass a local stand-in as `api`)

        api = api or HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "pipeline")
            info = api.upload_folder(repo_id=repo_id, folder_path=Path(tmp) / "pipeline",
                                     commit_message=commit_message)
        return str(getattr(info, "oid", info))
