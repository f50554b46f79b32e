"""Embedding normalisation before the prior: `none` (the paper's final choice) or the variants the reference tried."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io import write_json

KINDS = ("none", "standardize", "l2", "clamp")


@dataclass(frozen=True)
class Normalizer:
    """Maps embeddings to the prior's space (`forward`) and samples back (`inverse`)."""

    kind: str
    mean: list[float] | None = None
    std: list[float] | None = None
    scale: float = 1.0  # l2: mean training norm, restored by `inverse`; clamp: the bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "standardize":
            return (x - torch.tensor(self.mean, dtype=x.dtype)) / torch.tensor(self.std, dtype=x.dtype)
        if self.kind == "l2":
            return torch.nn.functional.normalize(x, dim=-1)
        if self.kind == "clamp":
            return x.clamp(-self.scale, self.scale)
        return x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "standardize":
            return x * torch.tensor(self.std, dtype=x.dtype) + torch.tensor(self.mean, dtype=x.dtype)
        if self.kind == "l2":
            return torch.nn.functional.normalize(x, dim=-1) * self.scale
        return x

    def save(self, path: str | Path) -> None:

        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Normalizer":
        return cls(**json.loads(Path(path).read_text()))


def fit_normalizer(kind: str, emb: torch.Tensor, clamp_quantile: float = 0.999) -> Normalizer:
    """Fit on training embeddings (N, d)."""
    if kind not in KINDS:
        raise ValueError(f"normalization={kind!r}: valid values are {', '.join(KINDS)}")
    emb = emb.float()
    if kind == "standardize":
        return Normalizer(kind, emb.mean(0).tolist(), emb.std(0).clamp_min(1e-6).tolist())
    if kind == "l2":
        return Normalizer(kind, scale=float(emb.norm(dim=-1).mean()))
    if kind == "clamp":
        return Normalizer(kind, scale=float(torch.quantile(emb.abs().flatten()[:1_000_000], clamp_quantile)))
    return Normalizer(kind)
