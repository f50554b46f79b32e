"""Personalization verifier network (§4.3.2, App H): Neural Matrix Factorization over (user, image embedding)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..config import VerifierConfig
from ..io import load_model, save_model
from ..steps import redo


class NMFVerifier(nn.Module, PyTorchModelHubMixin, library_name="rebeca-kit", repo_url=None):
    """NeuMF over (user id, image embedding): GMF and MLP branches fused into one like-logit, plus biases."""

    def __init__(self, n_users: int, emb_dim: int, factor_dim: int = 64, mlp_dims: Sequence[int] = (256, 128, 64),
                 dropout: float = 0.1):
        super().__init__()
        if n_users < 1 or emb_dim < 1 or factor_dim < 1:
            raise ValueError(f"n_users, emb_dim, factor_dim must be >= 1 (got {n_users}, {emb_dim}, {factor_dim})")
        self.n_users, self.emb_dim, self.factor_dim = int(n_users), int(emb_dim), int(factor_dim)
        self.mlp_dims = tuple(int(h) for h in mlp_dims)  # config.json stores a list; keep one type

        # items are embeddings, not ids, so that generated images (never seen in training) can be scored
        self.item_proj = nn.Linear(emb_dim, factor_dim)
        self.user_gmf = nn.Embedding(n_users, factor_dim)
        self.user_mlp = nn.Embedding(n_users, factor_dim)
        layers: list[nn.Module] = []
        width = 2 * factor_dim
        for h in self.mlp_dims:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.fuse = nn.Linear(factor_dim + width, 1)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Linear(emb_dim, 1)
        nn.init.zeros_(self.user_bias.weight)
        # user factors keep PyTorch's N(0, 1), not He et al.'s N(0, 0.01): with a few thousand interactions the tiny
        # init lingers on the GMF saddle (user x item factor ~ 0) until early stopping fires (README, deviations)
        self.register_buffer("emb_mean", torch.zeros(emb_dim))  # set from the training embeddings, see forward
        self.register_buffer("emb_std", torch.ones(emb_dim))

    @torch.no_grad()
    def fit_standardizer(self, img_emb: torch.Tensor) -> None:
        """Set the per-dimension mean / std of the L2-normalised embeddings from (training) data."""
        x = F.normalize(img_emb.float(), dim=-1)
        self.emb_mean.copy_(x.mean(0))
        self.emb_std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.emb_mean))

    def forward(self, user_id: torch.Tensor, img_emb: torch.Tensor) -> torch.Tensor:
        """Like-logits (B,) for user ids (B,) and raw verifier-space embeddings (B, emb_dim)."""
        return self.with_rows(img_emb, self.user_gmf(user_id), self.user_mlp(user_id), self.user_bias(user_id))

    def with_rows(self, img_emb: torch.Tensor, gmf: torch.Tensor, mlp: torch.Tensor, bias: torch.Tensor
                  ) -> torch.Tensor:
        """Like-logits (B,) for embeddings (B, emb_dim) as users with these rows of the three user tables."""
        # raw bigG embeddings differ in norm from image to image; only the direction should carry taste
        x = F.normalize(img_emb.float(), dim=-1)
        # CLIP directions share a large common component; what tells images apart is small. Standardising is an
        # affine reparametrisation of the Linear layers below (same function class) that puts that signal on a unit
        # scale for the optimiser (README, deviations: verifier init)
        x = (x - self.emb_mean) / self.emb_std
        v = self.item_proj(x)
        gmf, mlp = gmf.expand_as(v) * v, self.mlp(torch.cat([mlp.expand_as(v), v], dim=-1))
        logit = self.fuse(torch.cat([gmf, mlp], dim=-1)) + bias + self.item_bias(x)
        return logit.squeeze(-1)

    def add_users(self, gmf: torch.Tensor, mlp: torch.Tensor, bias: torch.Tensor) -> list[int]:
        """Append users with the given rows of the three user tables ((n, factor_dim) ×2, (n, 1)); their ids."""
        n = len(gmf)
        for name, rows in (("user_gmf", gmf), ("user_mlp", mlp), ("user_bias", bias)):
            old = getattr(self, name).weight.detach()
            table = nn.Embedding(self.n_users + n, old.shape[1]).to(old)
            with torch.no_grad():
                table.weight.copy_(torch.cat([old, rows.detach().to(old).reshape(n, -1)]))
            setattr(self, name, table)
        self.n_users += n
        return list(range(self.n_users - n, self.n_users))

    @classmethod
    def from_config(cls, cfg: VerifierConfig, n_users: int, emb_dim: int) -> "NMFVerifier":
        """Build from a `rebeca_utils.config.VerifierConfig` (training fields are ignored here)."""
        return cls(n_users=n_users, emb_dim=emb_dim, factor_dim=cfg.factor_dim, mlp_dims=cfg.mlp_dims,
                   dropout=cfg.dropout)


def save_verifier(model: NMFVerifier, folder: str | os.PathLike) -> Path:
    """Save atomically (no half-written model)."""
    return save_model(model, folder)


def load_verifier(folder: str | os.PathLike, device: str = "cpu") -> NMFVerifier:
    """A verifier saved by `save_verifier`, in eval mode; a missing or corrupt file names itself."""
    return load_model(NMFVerifier, folder, redo(5)).to(device).eval()
