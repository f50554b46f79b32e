"""Decoder work items: App G.3 seeds, fingerprints of what determines an image, fixed batches."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .. import jobs as J
from ..config import GenerationConfig, ModelsConfig
from ..io import sha256
from ..models.tiny_weights import weights_tag


def decoder_seed(user_id: int, index: int, base: int = 42) -> int:
    """Decoder seed of image j of user u: 42 + 10,000 u + j (App G.3), the same for every method."""
    return int(base) + 10_000 * int(user_id) + int(index)


def png_relpath(method: str, setting: str, user_id: int, index: int) -> str:
    """Where image `index` of a user lands under a notebook's folder: <method>/<setting>/u<user>/<index>.png."""
    return f"{method}/{setting}/u{user_id:03d}/{index:02d}.png"


@dataclass(frozen=True)
class WorkItem:
    """One image to decode."""

    method: str
    setting: str
    user_id: int
    index: int
    seed: int
    prompt: str = ""
    negative_prompt: str = ""
    ip_embedding: torch.Tensor | None = field(default=None, compare=False, repr=False)
    lora: str | None = None

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.method, self.setting, self.user_id, self.index)

    @property
    def relpath(self) -> str:
        return png_relpath(self.method, self.setting, self.user_id, self.index)


MAX_EMB_NORM = 1e3  # far above any CLIP image embedding; a prior that diverged or a wrong unit lands here


def check_ip_embeddings(items: Iterable[WorkItem]) -> None:
    """Refuse an item whose IP-Adapter embedding is NaN/inf, zero or of absurd norm, naming the item."""
    for it in items:
        e = it.ip_embedding
        if e is None:
            continue
        norm = float(e.float().norm()) if torch.isfinite(e).all() else None
        if norm is not None and 1e-6 < norm <= MAX_EMB_NORM:
            continue
        why = "has NaN/inf values" if norm is None else f"has norm {norm:.3g} (valid: 1e-06 to {MAX_EMB_NORM:g})"
        raise ValueError(f"item (method={it.method!r}, setting={it.setting!r}, user_id={it.user_id}, index={it.index}): "
                         f"ip_embedding {why}; refusing to decode it")


def make_items(method: str, setting: str, user_ids: Sequence[int], indices: Sequence[int], cfg: GenerationConfig,
               ip_embeddings: torch.Tensor | None = None, prompts: Sequence[str] | None = None,
               negative_prompts: Sequence[str] | None = None, loras: Sequence[str | None] | None = None
               ) -> list[WorkItem]:
    """Work items for (user_ids[i], indices[i]) with the App G.3 decoder seeds and the config's prompts."""
    n = len(user_ids)
    if len(indices) != n or any(x is not None and len(x) != n for x in (ip_embeddings, prompts, negative_prompts, loras)):
        raise ValueError(f"make_items: user_ids has {n} entries; indices, ip_embeddings, prompts, negative_prompts "
                         f"and loras must have as many")
    items = [WorkItem(method, setting, int(u), int(j), decoder_seed(u, j, cfg.seed_base),
                     cfg.prompt if prompts is None else prompts[i],
                     cfg.negative_prompt if negative_prompts is None else negative_prompts[i],
                     None if ip_embeddings is None else ip_embeddings[i].detach().float().cpu(),
                     None if loras is None else loras[i])
             for i, (u, j) in enumerate(zip(user_ids, indices))]
    check_ip_embeddings(items)
    return items


def image_settings(cfg: GenerationConfig, models: ModelsConfig | None = None) -> dict[str, Any]:
    """What determines every image of a run besides its item (device and dtype excluded, as for embeddings)."""
    keys = ("steps", "decoder_cfg", "height", "width", "ip_adapter_scale")
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    if models is not None:
        out["models"] = {"builder": models.builder, "sd_id": models.sd_id, "ip_adapter_id": models.ip_adapter_id,
                         "ip_adapter_weight": models.ip_adapter_weight,
                         **({"seed": models.seed, "weights": weights_tag(models)} if models.builder == "tiny" else {})}
    return out


_LORA_DIGESTS: dict[tuple, str] = {}


def lora_digest(lora: str | None) -> str | None:
    """sha256 of an adapter's weight files, so a retrained adapter makes its images stale; else the path as given."""
    p = Path(lora) if lora else None
    files = sorted(p.glob("*.safetensors")) if p and p.is_dir() else [p] if p and p.is_file() else []
    if not files:
        return lora
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _LORA_DIGESTS:  # hashed once per file version, not once per item
        _LORA_DIGESTS[key] = hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()
    return _LORA_DIGESTS[key]


def item_fingerprint(item: WorkItem, settings: dict[str, Any]) -> str:
    """Hash of everything that determines the item's image: a PNG made from other inputs is stale."""
    payload = {"seed": item.seed, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
               "lora": lora_digest(item.lora), "settings": settings}
    emb = () if item.ip_embedding is None else (item.ip_embedding.float().contiguous().numpy().tobytes(),)
    return J.fingerprint(payload, *emb)


def make_batches(items: Iterable[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Items sorted by key, cut into batches of at most `batch_size` within one (method, setting, user)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = sorted(items, key=lambda it: it.key)
    keys = [it.key for it in items]
    dup = sorted({k for a, k in zip(keys, keys[1:]) if a == k})
    if dup:
        raise ValueError(f"duplicate work items: {dup[:3]}")
    groups: dict[tuple, list[WorkItem]] = {}
    for it in items:  # a batch never mixes adapters or items with and without an embedding, and never depends
        # on which other users or settings are in the run (its bytes would change with the batch)
        groups.setdefault((it.method, it.setting, it.user_id, it.lora or "", it.ip_embedding is not None),
                          []).append(it)
    return [b for _, g in sorted(groups.items()) for b in J.chunks(g, batch_size)]
