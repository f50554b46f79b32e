"""The REBECA diffusion prior (App D): a small transformer over learned tokens of a CLIP embedding.

f_theta(I_t^e, t, U, R) -> prediction (I_0^e for the paper's `sample` objective). Reads top to bottom:
tokenizer -> conditioning tokens -> L PriorBlocks (AdaLN-Zero, self-attention, gated cross-attention,
zero-initialised MLP) -> projection back -> learned merge.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..io import load_model, save_model
from ..steps import redo

FREQ_DIM = 256  # sinusoidal timestep features, as in DiT


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: per-sample affine of normalised tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention on fused projections, via scaled_dot_product_attention."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.n_heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class PriorBlock(nn.Module):
    """AdaLN-Zero block: self-attention over image tokens, gated cross-attention to condition tokens, MLP."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 4, zero_init_attn: bool = True):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, n_heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = Attention(dim, n_heads)
        self.cross_gate = nn.Parameter(torch.zeros(dim))  # tanh(0) = 0: cross-attention starts closed
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        # shift/scale for the attention norm; shift/scale/gate for the MLP. AdaLN-Zero: the gate starts at 0,
        # so the MLP residual starts at zero; the MLP itself keeps its default init (zeroing both kills the path)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 5 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        if zero_init_attn:  # the paper: every residual path starts at zero (the reference code skips this one)
            nn.init.zeros_(self.attn.out.weight)
            nn.init.zeros_(self.attn.out.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond_tokens: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, shift_m, scale_m, gate_m = self.ada(c).chunk(5, dim=-1)
        h = modulate(self.norm_attn(x), shift_a, scale_a)
        x = x + self.attn(h, h)
        x = x + torch.tanh(self.cross_gate) * self.cross(self.norm_cross(x), cond_tokens)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))


class RebecaPrior(nn.Module, PyTorchModelHubMixin, library_name="rebeca-kit", repo_url=None):
    """User- and rating-conditioned denoiser over d-dim embeddings; index n_users / n_ratings = null (CFG)."""

    def __init__(
        self,
        emb_dim: int = 1024,
        n_tokens: int = 32,
        hidden_dim: int = 128,
        n_heads: int = 8,
        n_layers: int = 6,
        n_users: int = 210,
        n_ratings: int = 2,
        mlp_ratio: int = 4,
        zero_init_attn: bool = True,
    ):
        super().__init__()
        if emb_dim % n_tokens:
            raise ValueError(f"emb_dim={emb_dim} must be divisible by n_tokens={n_tokens}")
        if hidden_dim % n_heads:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}")
        self.emb_dim, self.n_tokens, self.hidden_dim = emb_dim, n_tokens, hidden_dim
        self.n_users, self.n_ratings = n_users, n_ratings
        self.n_heads, self.n_layers, self.mlp_ratio, self.zero_init_attn = n_heads, n_layers, mlp_ratio, zero_init_attn
        self.token_dim = emb_dim // n_tokens

        self.tokenizer = nn.Linear(emb_dim, emb_dim)  # learned tokenizer: mixes before splitting into T tokens
        self.token_in = nn.Linear(self.token_dim, hidden_dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, hidden_dim) * 0.02)

        self.user_emb = nn.Embedding(n_users + 1, hidden_dim)
        self.rating_emb = nn.Embedding(n_ratings + 1, hidden_dim)
        self.time_mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.cond_mlp = nn.Sequential(nn.Linear(3 * hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

        self.blocks = nn.ModuleList(PriorBlock(hidden_dim, n_heads, mlp_ratio, zero_init_attn) for _ in range(n_layers))

        self.norm_out = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        nn.init.zeros_(self.ada_out[1].weight)
        nn.init.zeros_(self.ada_out[1].bias)
        self.token_out = nn.Linear(hidden_dim, self.token_dim)
        self.merge = nn.Linear(emb_dim, emb_dim)  # learned merge of the T token outputs back to d

    @property
    def null_user(self) -> int:
        return self.n_users

    @property
    def null_rating(self) -> int:
        return self.n_ratings

    def add_users(self, rows: torch.Tensor) -> list[int]:
        """Append users with the given embedding rows (n, hidden_dim); the null row stays last. Returns their ids.

        Every other weight, and every earlier user's row, is unchanged; save_pretrained records the new n_users."""
        rows = rows.detach().to(self.user_emb.weight).reshape(-1, self.hidden_dim)
        old = self.user_emb.weight.detach()
        table = nn.Embedding(self.n_users + len(rows) + 1, self.hidden_dim).to(old)
        with torch.no_grad():
            table.weight.copy_(torch.cat([old[: self.n_users], rows, old[self.n_users:]]))
        ids = list(range(self.n_users, self.n_users + len(rows)))
        self.user_emb, self.n_users = table, self.n_users + len(rows)
        return ids

    def init_config(self) -> dict:
        """The constructor arguments that rebuild this prior as it is now (n_users counts added users)."""
        return {"emb_dim": self.emb_dim, "n_tokens": self.n_tokens, "hidden_dim": self.hidden_dim,
                "n_heads": self.n_heads, "n_layers": self.n_layers,
                "n_users": self.n_users, "n_ratings": self.n_ratings, "mlp_ratio": self.mlp_ratio,
                "zero_init_attn": self.zero_init_attn}

    def save_pretrained(self, save_directory, *, config: dict | None = None, **kwargs):
        """The hub mixin's save, with config.json written from `init_config()` (users added since construction)."""
        return super().save_pretrained(save_directory, config=config or self.init_config(), **kwargs)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, user_id: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
        """Predict the diffusion target for noisy embeddings x_t (B, d) at timesteps t (B,)."""
        B = x_t.shape[0]
        t = t.expand(B) if t.ndim == 0 or t.numel() == 1 else t
        t_tok = self.time_mlp(timestep_embedding(t, FREQ_DIM).to(x_t.dtype))
        cond_tokens = torch.stack([self.user_emb(user_id), self.rating_emb(rating), t_tok], dim=1)
        c = self.cond_mlp(cond_tokens.flatten(1))

        h = self.token_in(self.tokenizer(x_t).view(B, self.n_tokens, self.token_dim)) + self.pos
        for block in self.blocks:
            h = block(h, c, cond_tokens)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        h = modulate(self.norm_out(h), shift, scale)
        return self.merge(self.token_out(h).reshape(B, self.emb_dim))

    @classmethod
    def from_config(cls, cfg) -> "RebecaPrior":
        """Build from a `rebeca_utils.config.PriorConfig`."""

        return cls(**asdict(cfg))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_prior(model: RebecaPrior, folder):
    """Save atomically (a killed run never leaves a half-written prior)."""
    return save_model(model, folder)


def load_prior(folder, device: str = "cpu") -> RebecaPrior:
    """A prior saved by `save_prior`, in eval mode; a missing or corrupt file names itself."""
    return load_model(RebecaPrior, folder, redo(3)).to(device).eval()
