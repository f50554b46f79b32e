"""The model card (README.md) a saved RebecaPipeline carries: data, users, metrics, decoder, licenses."""
from __future__ import annotations

import json

from huggingface_hub import ModelCardData

LICENSE_NOTES = """\
- The prior's weights are yours to license; they were learned from the ratings and images named under *Data*.
  FLICKR-AES (Ren et al., 2017) is distributed for research use: check its terms before sharing a prior trained on it.
- The decoder is not in this folder. Stable Diffusion 1.5 is under the CreativeML OpenRAIL-M license (its use
  restrictions apply to every image you make with it); IP-Adapter (h94/IP-Adapter) is under Apache-2.0.
- The code that made this folder is the REBECA kit (see its repository's license)."""


def _users_line(users: dict) -> str:
    by_source: dict[str, list[str]] = {}
    for u, rec in users.items():
        by_source.setdefault(rec.get("source", "?"), []).append(str(u))
    return "; ".join(f"{len(ids)} {src} ({', '.join(ids[:12])}{', ...' if len(ids) > 12 else ''})"
                     for src, ids in by_source.items()) or "none"


def model_card(config: dict, prior) -> str:
    """README.md text: YAML metadata, then what the prior was trained on, its users, metrics and decoder."""
    card = config.get("card", {})
    meta = ModelCardData(library_name="rebeca-kit", license="other", tags=["rebeca", "personalization",
                                                                            "diffusion-prior", "ip-adapter"])
    data = card.get("data", {})
    metrics = card.get("metrics", {})
    decoder = card.get("decoder", {})
    lines = [
        "---", meta.to_yaml(), "---", "",
        "# REBECA prior", "",
        "A user- and rating-conditioned diffusion prior over CLIP image embeddings (REBECA, §2). Load it with "
        "`RebecaPipeline.from_pretrained(...)` from the REBECA kit; `pipe(user_ids, n=4, seed=0)` samples "
        "embeddings that an IP-Adapter decodes into images.", "",
        "## Data", "",
        *(f"- {k}: `{v}`" for k, v in data.items()), *(["- not recorded"] if not data else []), "",
        "## Users", "",
        f"- {_users_line(config.get('users', {}))}",
        f"- null (unconditional) user: id {prior.null_user}", "",
        "## Prior and sampler", "",
        f"- architecture: `{json.dumps(prior.init_config())}`",
        f"- sampler {config['sampler']}, {config['steps']} steps, default prior guidance ω = {config['cfg_scale']:g}",
        f"- embedding space: `{json.dumps(config.get('space', {}))}`", "",
        "## Training metrics", "",
        *(f"- {k}: {v}" for k, v in metrics.items()), *(["- not recorded"] if not metrics else []), "",
        "## Decoder it was meant for", "",
        *(f"- {k}: `{v}`" for k, v in decoder.items()), *(["- not recorded"] if not decoder else []), "",
        "## License notes", "", LICENSE_NOTES, "",
    ]
    return "\n".join(lines)
