"""Small convolutional VAE for the dSprites study: 3x64x64 images <-> 32-d latent (frozen after training).

Its encoder means are the study's image embeddings; its decoder is the study's "frozen image generator".
Built for speed on a 2-core CPU: the first convolution is an 8x8 / stride-4 layer (64 -> 16), then two
stride-2 convolutions (16 -> 8 -> 4); the decoder mirrors it. Images may be uint8 in
{0..255} or float in [0, 1]; the reconstruction loss is Bernoulli (BCE with logits, summed over pixels).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ConvVAE(nn.Module):
    """Conv VAE for (3, 64, 64) images with a ``latent_dim``-d Gaussian latent.

    Encoder: 8x8 / stride-4 conv (64 -> 16, overlapping patches), two 4x4 / stride-2 convs (16 -> 8 -> 4);
    the flattened 4x4 map is concatenated with global max-pools of all three feature maps (translation-
    invariant shape evidence: without them, hearts vs squares at small scales are not learnt in a CPU
    budget) and an MLP gives the mean and log-variance. Decoder: MLP -> 4x4 map -> mirrored transposed
    convs -> logits.
    """

    def __init__(self, latent_dim: int = 32, channels: tuple[int, int, int] = (16, 32, 64), hidden: int = 256,
                 in_channels: int = 3):
        super().__init__()
        c1, c2, c3 = channels
        self.config = {"latent_dim": latent_dim, "channels": list(channels), "hidden": hidden,
                       "in_channels": in_channels}
        self.latent_dim = latent_dim
        self.conv1 = nn.Conv2d(in_channels, c1, 8, 4, 2)  # 64 -> 16
        self.conv2 = nn.Conv2d(c1, c2, 4, 2, 1)  # 16 -> 8
        self.conv3 = nn.Conv2d(c2, c3, 4, 2, 1)  # 8 -> 4
        self.enc_mlp = nn.Sequential(nn.Linear(c3 * 16 + c1 + c2 + c3, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, c3 * 16), nn.SiLU(),
            nn.Unflatten(1, (c3, 4, 4)),
            nn.ConvTranspose2d(c3, c2, 4, 2, 1), nn.SiLU(),  # 4 -> 8
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.SiLU(),  # 8 -> 16
            nn.ConvTranspose2d(c1, in_channels, 8, 4, 2),  # 16 -> 64, logits
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (mean, log-variance), each (n, latent_dim)."""
        h1 = F.silu(self.conv1(x))
        h2 = F.silu(self.conv2(h1))
        h3 = F.silu(self.conv3(h2))
        feats = torch.cat([h3.flatten(1), h1.amax((2, 3)), h2.amax((2, 3)), h3.amax((2, 3))], dim=1)
        mu, logvar = self.enc_mlp(feats).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode_logits(z), mu, logvar


def _as_float(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _as_tensor(images) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))


def vae_loss(model: ConvVAE, x: torch.Tensor, beta: float = 1.0, prior_mean: torch.Tensor | None = None):
    """(loss, recon, kl) per image: summed-pixel BCE + beta * KL(q(z|x) || N(m, I)).

    m = 0 (standard VAE) except on the first ``prior_mean.shape[1]`` dims when ``prior_mean`` is given.
    """
    logits, mu, logvar = model(x)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    if prior_mean is not None:
        k = prior_mean.shape[1]
        mu = torch.cat([mu[:, :k] - prior_mean, mu[:, k:]], dim=1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()
    return recon + beta * kl, recon, kl


def train_vae(model: ConvVAE, images, epochs: int = 8, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
              device: str = "cpu", beta: float = 1.0, progress: bool = True, callback=None,
              prior_means=None) -> dict:
    """Train in place with Adam on in-memory images (uint8 {0..255} or float [0, 1], (n, 3, 64, 64)).

    Batches come from a seeded ``torch.Generator`` permutation each epoch. The learning rate follows a
    cosine decay to 5% over all steps. Returns ``history`` with per-epoch mean ``loss`` / ``recon`` / ``kl``
    (per image) and total ``seconds``. ``callback(epoch, model, history)``, if given, runs after each epoch
    (e.g. to monitor latent quality). The model is left in eval mode.

    ``prior_means`` (optional, (n, k) float): per-image prior means for the first k latent dims
    (a label-informed prior, "guided VAE"); None = the standard N(0, I) prior on every dim.
    """
    from tqdm.auto import tqdm

    data = _as_tensor(images)
    n = data.shape[0]
    pm = None if prior_means is None else _as_tensor(prior_means).float()
    if pm is not None and (pm.ndim != 2 or pm.shape[0] != n or pm.shape[1] > model.latent_dim):
        raise ValueError(f"prior_means must be (n={n}, k<={model.latent_dim}), got {tuple(pm.shape)}")
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
            loss, recon, kl = vae_loss(model, x, beta, None if pm is None else pm[idx].to(device))
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
    return torch.cat(out) if out else torch.zeros(0, 3, 64, 64)


@torch.no_grad()
def nn_label_agreement(z, labels, metric: str = "cosine", batch_size: int = 2048) -> float:
    """Fraction of points whose nearest other point (cosine or euclidean) has the same label."""
    z = _as_tensor(z).float()
    labels = torch.as_tensor(np.asarray(labels))
    if metric == "cosine":
        z = F.normalize(z, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    hits = 0
    for s in range(0, z.shape[0], batch_size):
        q = z[s:s + batch_size]
        d = -(q @ z.T) if metric == "cosine" else torch.cdist(q, z)
        d[torch.arange(q.shape[0]), torch.arange(s, s + q.shape[0])] = float("inf")
        hits += int((labels[d.argmin(1)] == labels[s:s + q.shape[0]]).sum())
    return hits / max(1, z.shape[0])


def save_vae(model: ConvVAE, path: str | Path) -> Path:
    """Save weights (safetensors) with the constructor config in the file's metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(model.config)})
    return path


def load_vae(path: str | Path, device: str = "cpu") -> ConvVAE:
    """Rebuild a :class:`ConvVAE` saved by :func:`save_vae`; returned frozen (eval, no grad)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    if "channels" in config:
        config["channels"] = tuple(config["channels"])
    model = ConvVAE(**config)
    model.load_state_dict(load_file(str(path)))
    return freeze(model.to(device))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and requires_grad=False on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
