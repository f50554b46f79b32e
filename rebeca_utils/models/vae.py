"""Small convolutional VAE for the dSprites study: 3x64x64 images <-> 32-d latent (frozen after training).

Its encoder means are the study's image embeddings; its decoder is the study's "frozen image generator".

Design ("where / what" VAE, chosen for a 2-core CPU budget; all sprites are single objects):
* latent dims 0-1 ("where") are the sprite's position: the encoder mean is the mask centroid,
  standardised, ``(c - (size-1)/2) / POS_SCALE`` (~ unit variance over the dSprites position range);
  their log-variance is learnt. The decoder places its patch there with a differentiable bilinear
  translation (``grid_sample``), so sampling noise on these dims costs reconstruction as usual.
* dims 2.. ("what") come from a small CNN on a 32x32 crop centred on the centroid
  (4x4 / stride-2 convs 32 -> 16 -> 8 -> 4, flattened map + global max-pools, MLP); the decoder
  mirrors it (MLP -> 4x4 -> transposed convs -> 32x32 patch logits) and adds a learnt background logit.
* everything else is a standard VAE: N(0, I) prior, reparameterisation, Bernoulli likelihood
  (BCE with logits summed over pixels) + beta * KL.
Centring makes shape translation-invariant, so it is learnt within a few epochs where a plain conv VAE on the
full canvas was not (measurements in the README's deviations table).
Images may be uint8 in {0..255} or float in [0, 1].
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..io import load_model, save_model
from ..progress import tqdm
from ..steps import redo

POS_SCALE = 10.0  # pixels per latent unit on the position dims


class ConvVAE(nn.Module, PyTorchModelHubMixin, library_name="rebeca-kit", repo_url=None):
    """Where/what conv VAE for (C, S, S) images with a ``latent_dim``-d Gaussian latent (dims 0-1 = position)."""

    def __init__(self, latent_dim: int = 32, channels: tuple[int, int, int] = (16, 32, 64), hidden: int = 256,
                 in_channels: int = 3, image_size: int = 64, patch: int = 32):
        super().__init__()
        if latent_dim < 3:
            raise ValueError("latent_dim must be >= 3 (2 position dims + appearance)")
        if patch % 8 or patch > image_size:
            raise ValueError("patch must be a multiple of 8 and <= image_size")
        c1, c2, c3 = channels
        self.config = {"latent_dim": latent_dim, "channels": list(channels), "hidden": hidden,
                       "in_channels": in_channels, "image_size": image_size, "patch": patch}
        self.latent_dim, self.image_size, self.patch = latent_dim, image_size, patch
        la, s = latent_dim - 2, patch // 8
        self.conv1 = nn.Conv2d(in_channels, c1, 4, 2, 1)  # P -> P/2
        self.conv2 = nn.Conv2d(c1, c2, 4, 2, 1)  # -> P/4
        self.conv3 = nn.Conv2d(c2, c3, 4, 2, 1)  # -> P/8
        # outputs: appearance means (la), appearance log-variances (la), position log-variances (2)
        self.enc_mlp = nn.Sequential(nn.Linear(c3 * s * s + c1 + c2 + c3, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 2 * la + 2))
        self.decoder = nn.Sequential(
            nn.Linear(la, hidden), nn.SiLU(), nn.Linear(hidden, c3 * s * s), nn.SiLU(),
            nn.Unflatten(1, (c3, s, s)),
            nn.ConvTranspose2d(c3, c2, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(c1, in_channels, 4, 2, 1),  # patch logits
        )
        self.bg_logit = nn.Parameter(torch.tensor(-8.0))

    # -- where -------------------------------------------------------------------------------------
    @staticmethod
    def centroid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask centroid (column, row) in pixel-index units; the canvas centre for empty images."""
        m = x.amax(1)
        h, w = m.shape[-2:]
        tot = m.sum((1, 2))
        safe = tot.clamp_min(1e-6)
        rows = torch.arange(h, dtype=x.dtype, device=x.device)
        cols = torch.arange(w, dtype=x.dtype, device=x.device)
        cy = torch.where(tot > 0, (m.sum(2) * rows).sum(1) / safe, torch.full_like(tot, (h - 1) / 2))
        cx = torch.where(tot > 0, (m.sum(1) * cols).sum(1) / safe, torch.full_like(tot, (w - 1) / 2))
        return cx, cy

    def crop(self, x: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
        """P x P crops starting P/2 pixels before the (rounded) centroid, zero outside the canvas."""
        p, b = self.patch, x.shape[0]
        xp = F.pad(x, (p // 2, p // 2, p // 2, p // 2))
        ar = torch.arange(p, device=x.device)
        rr = cy.round().long()[:, None] + ar  # padded coordinates
        cc = cx.round().long()[:, None] + ar
        out = xp[torch.arange(b, device=x.device)[:, None, None], :, rr[:, :, None], cc[:, None, :]]
        return out.permute(0, 3, 1, 2)

    # -- VAE ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (mean, log-variance), each (n, latent_dim); dims 0-1 = (x, y) position."""
        size = x.shape[-1]
        cx, cy = self.centroid(x)
        xc = self.crop(x, cx, cy)
        h1 = F.silu(self.conv1(xc))
        h2 = F.silu(self.conv2(h1))
        h3 = F.silu(self.conv3(h2))
        feats = torch.cat([h3.flatten(1), h1.amax((2, 3)), h2.amax((2, 3)), h3.amax((2, 3))], dim=1)
        out = self.enc_mlp(feats)
        la = self.latent_dim - 2
        pos = torch.stack([cx, cy], 1).sub((size - 1) / 2).div(POS_SCALE)
        mu = torch.cat([pos, out[:, :la]], 1)
        logvar = torch.cat([out[:, 2 * la:] - 4.0, out[:, la:2 * la]], 1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (n, latent_dim) -> logits (n, C, S, S): the decoded patch translated to position z[:, :2]."""
        p, size = self.patch, self.image_size
        patch = self.decoder(z[:, 2:]) - self.bg_logit  # zero padding outside the patch == background
        grid1d = torch.arange(size, dtype=z.dtype, device=z.device)
        px = (size - 1) / 2 + POS_SCALE * z[:, 0]
        py = (size - 1) / 2 + POS_SCALE * z[:, 1]
        # canvas pixel u <- patch index u - px + P/2; grid_sample(align_corners=True) wants 2*j/(P-1) - 1
        gx = 2 * (grid1d[None, :] - px[:, None] + p / 2) / (p - 1) - 1  # (n, S)
        gy = 2 * (grid1d[None, :] - py[:, None] + p / 2) / (p - 1) - 1
        grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], -1)
        return F.grid_sample(patch, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + self.bg_logit

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode_logits(z), mu, logvar


def _as_float(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _as_tensor(images) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))


def vae_loss(model: ConvVAE, x: torch.Tensor, beta: float = 1.0):
    """(loss, recon, kl) per image: summed-pixel BCE + beta * KL(q(z|x) || N(0, I))."""
    logits, mu, logvar = model(x)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()
    return recon + beta * kl, recon, kl


def train_vae(model: ConvVAE, images, epochs: int = 8, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
              device: str = "cpu", beta: float = 1.0, progress: bool = True, callback=None) -> dict:
    """Train in place with Adam on in-memory images (uint8 {0..255} or float [0, 1], (n, 3, 64, 64)).

    Batches come from a seeded ``torch.Generator`` permutation each epoch. The learning rate follows a
    cosine decay to 5% over all steps. Returns ``history`` with per-epoch mean ``loss`` / ``recon`` / ``kl``
    (per image) and total ``seconds``. ``callback(epoch, model, history)``, if given, runs after each epoch
    (e.g. to monitor latent quality). The model is left in eval mode.
    """

    data = _as_tensor(images)
    n = data.shape[0]
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # reparameterisation noise
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, (n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch, eta_min=0.05 * lr)
    hist = {"loss": [], "recon": [], "kl": [], "seconds": 0.0}
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="VAE", disable=not progress)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        tot = torch.zeros(3)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            x = _as_float(data[idx], device)
            loss, recon, kl = vae_loss(model, x, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += torch.stack([loss.detach(), recon.detach(), kl.detach()]).cpu() * len(idx)
        tot /= n
        for k, v in zip(("loss", "recon", "kl"), tot.tolist()):
            hist[k].append(v)
        bar.set_postfix(loss=f"{hist['loss'][-1]:.1f}", kl=f"{hist['kl'][-1]:.1f}")
        if callback is not None:
            callback(epoch, model, hist)
            model.train()
    hist["seconds"] = time.perf_counter() - t0
    model.eval()
    return hist


@torch.no_grad()
def encode_mean(model: ConvVAE, images, batch_size: int = 1024) -> torch.Tensor:
    """Posterior means, float32 (n, latent_dim) on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    data = _as_tensor(images)
    out = [model.encode(_as_float(data[s:s + batch_size], device))[0].cpu() for s in range(0, data.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.latent_dim)


@torch.no_grad()
def decode(model: ConvVAE, z, batch_size: int = 1024) -> torch.Tensor:
    """Latents (n, latent_dim) -> images float32 (n, 3, 64, 64) in [0, 1] on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    z = _as_tensor(z).float()
    out = [torch.sigmoid(model.decode_logits(z[s:s + batch_size].to(device))).cpu() for s in range(0, z.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.config["in_channels"], model.image_size, model.image_size)


def save_vae(model: ConvVAE, folder: str | Path) -> Path:
    """Save atomically (a killed run never leaves a half-written VAE)."""
    return save_model(model, folder)


def load_vae(folder: str | Path, device: str = "cpu") -> ConvVAE:
    """A :class:`ConvVAE` saved by :func:`save_vae`, frozen (eval, no grad)."""
    return freeze(load_model(ConvVAE, folder, f"delete its folder and {redo(1)}").to(device))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and requires_grad=False on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
