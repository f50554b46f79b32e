"""VLM personas (§4.3.1, App G.3): per-user keywords from tags (log-odds), persona text, Algorithm 1's prompts."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import GenerationConfig, VlmConfig
from ..data.synthetic import synthetic_truth
from ..world.recipe import TEXTURE_WORDS, caption
from ..pipeline.items import WorkItem, make_items
from .tagging import chat_prompt, generate
from .tags import LIST_FIELDS

# Table 5
FALLBACK_KEYWORDS = ("nature", "landscape", "portrait", "cityscape", "animals")
STYLE_SUFFIX = "high quality, detailed, natural lighting"
DEFAULT_NEGATIVE = ("low quality", "blurry", "deformed", "overexposed", "underexposed")
KEYWORD_MODES, NEGATIVE_MODES = ("paper", "reference"), ("fixed", "user")
METHOD = "persona"
PERSONA_TERMS = 6  # positive keywords named in the persona text


@dataclass(frozen=True)
class Persona:
    """One user's profile: positive and negative keywords (best first) and the persona text."""

    user_id: int
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    text: str
    n_liked: int = 0  # liked images with usable tags (the keywords read these)
    n_disliked: int = 0
    source: str = "template"  # "vlm" when the VLM wrote the text
    rated_liked: int = 0  # liked images the user rated (tagged or not: tag_limit may leave most untagged)
    rated_disliked: int = 0


def check_config(cfg: VlmConfig) -> None:
    """One clear error for a setting outside its valid values."""
    if cfg.keywords not in KEYWORD_MODES:
        raise ValueError(f"vlm.keywords={cfg.keywords!r}: valid values are {', '.join(KEYWORD_MODES)}")
    if cfg.negative not in NEGATIVE_MODES:
        raise ValueError(f"vlm.negative={cfg.negative!r}: valid values are {', '.join(NEGATIVE_MODES)}")


def planted_tags(root: str | Path) -> pd.DataFrame:
    """A tag table of the synthetic fixture from its planted attributes (an oracle tagger): colors = [hue],
    attributes = [texture word, layout], the world's caption; the columns of tagging.collect."""
    attrs = synthetic_truth(root)["attributes"]
    rows = [{"image": n, "status": "ok", "reason": "", "caption": caption(a), "objects": ["object"],
             "attributes": [TEXTURE_WORDS[a["texture"]], a["layout"]], "styles": [], "colors": [a["hue"]],
             "n_truncated": 0}
            for n, a in sorted(attrs.items())]
    return pd.DataFrame(rows)


def rated_images(splits: pd.DataFrame, cfg: VlmConfig) -> pd.DataFrame:
    """(user_id, image, like) the keywords read: every training-split rating with R = like (paper), or the
    reference's first `reference_limit` likes (score >= 4) and dislikes (score <= 2) per user (in image-id order;
    the reference takes its CSV's row order)."""
    train = splits[splits["split"] == "train"]
    if cfg.keywords == "paper":
        return train[["user_id", "image", "like"]].assign(like=train["like"].astype(bool)).reset_index(drop=True)
    kept = train[train["score"] != 3].assign(like=lambda d: d["score"] >= 4)
    return (kept.groupby(["user_id", "like"], sort=False, group_keys=False).head(cfg.reference_limit)
            [["user_id", "image", "like"]].reset_index(drop=True))


def user_keywords(tags: pd.DataFrame, rated: pd.DataFrame, cfg: VlmConfig) -> dict[int, tuple[list, list, int, int]]:
    """user_id -> (pos, neg, liked images, disliked images): keywords ranked by add-one smoothed log-odds of
    appearing in the user's liked vs disliked images' tags, at least `min_count` images, top_k per side, the two
    sides disjoint. Tags that failed to parse are skipped."""
    ok = tags[tags["status"] != "failed"]
    words = {r.image: set(k for f in LIST_FIELDS for k in getattr(r, f)) for r in ok.itertuples(index=False)}
    out = {}
    for u, g in rated[rated["image"].isin(words)].groupby("user_id"):
        likes, dislikes = g.loc[g["like"], "image"], g.loc[~g["like"], "image"]
        c_like = pd.Series([w for i in likes for w in words[i]], dtype=object).value_counts()
        c_dis = pd.Series([w for i in dislikes for w in words[i]], dtype=object).value_counts()
        vocab = sorted(set(c_like.index) | set(c_dis.index))
        a, b = c_like.reindex(vocab, fill_value=0), c_dis.reindex(vocab, fill_value=0)
        lo = np.log((a + 1) / (len(likes) + 2)) - np.log((b + 1) / (len(dislikes) + 2))
        frame = pd.DataFrame({"w": vocab, "lo": lo.to_numpy(), "a": a.to_numpy(), "b": b.to_numpy()})
        pos = frame[(frame["lo"] > 0) & (frame["a"] >= cfg.min_count)].sort_values(["lo", "w"], ascending=[False, True])
        neg = frame[(frame["lo"] < 0) & (frame["b"] >= cfg.min_count)].sort_values(["lo", "w"])
        p = pos["w"].head(cfg.top_k).tolist()
        out[int(u)] = (p, [w for w in neg["w"].head(cfg.top_k) if w not in p], len(likes), len(dislikes))
    return out


def persona_text(pos: Sequence[str]) -> str:
    """The persona tail: the user's strongest positive keywords only (never a disliked term: CLIP reads
    "avoids X" as X)."""
    return f"in a style with {', '.join(pos[:PERSONA_TERMS])}" if pos else ""


def build_personas(tags: pd.DataFrame, splits: pd.DataFrame, users: Sequence[int], cfg: VlmConfig,
                   summarise=None) -> dict[int, Persona]:
    """Personas of `users`; summarise(pos) -> text (optional LLaVA) replaces the template where it returns one."""
    rated = rated_images(splits, cfg)
    kw = user_keywords(tags, rated, cfg)
    per = rated.groupby(["user_id", "like"]).size()
    out = {}
    for u in users:
        pos, neg, n_like, n_dis = kw.get(int(u), ([], [], 0, 0))
        written = summarise(pos) if summarise and pos else ""
        out[int(u)] = Persona(int(u), tuple(pos), tuple(neg), written or persona_text(pos), n_like, n_dis,
                              "vlm" if written else "template", int(per.get((u, True), 0)),
                              int(per.get((u, False), 0)))
    return out


def tagged_share(personas: dict[int, Persona]) -> dict:
    """How many of the personas' rated images had usable tags: {"tagged": n, "rated": m}."""
    ps = personas.values()
    return {"tagged": sum(p.n_liked + p.n_disliked for p in ps),
            "rated": sum(p.rated_liked + p.rated_disliked for p in ps)}


def fallback_subject(seed: int, user_id: int, index: int) -> str:
    """Table 5's fallback subject for image j of user u: a function of (seed, u, j), not of a global RNG."""
    h = hashlib.sha256(f"rebeca-persona:{seed}:{user_id}:{index}".encode()).digest()
    return FALLBACK_KEYWORDS[int.from_bytes(h[:4], "big") % len(FALLBACK_KEYWORDS)]


def build_prompt(p: Persona, index: int, cfg: VlmConfig, seed: int = 0) -> tuple[str, str, bool]:
    """Algorithm 1: (prompt, negative prompt, fallback used). k = 1 + (j mod 2) keywords cycling from offset
    j mod |pos|, then the persona text; with fewer than min_positives keywords the Table 5 subject and suffix."""
    fallback = len(p.pos) < max(cfg.min_positives, 1)
    if fallback:
        terms, style = [fallback_subject(seed, p.user_id, index)], STYLE_SUFFIX
    else:
        k = min(1 + index % 2, len(p.pos))
        terms = [p.pos[(index + i) % len(p.pos)] for i in range(k)]
        style = p.text or STYLE_SUFFIX
    neg = p.neg if cfg.negative == "user" and p.neg else DEFAULT_NEGATIVE
    return ", ".join([*terms, style]), ", ".join(neg), fallback


def persona_items(personas: dict[int, Persona], setting: str, gen: GenerationConfig, cfg: VlmConfig, seed: int = 0,
                  loras: dict[int, str] | None = None) -> tuple[list[WorkItem], pd.DataFrame]:
    """Work items (n_per_user per user, App G.3 seeds, no IP-Adapter embedding; with `loras`, only its users and
    each one's adapter) and the prompt table (user_id, index, prompt, negative_prompt, fallback)."""
    users = [u for u in personas if loras is None or u in loras]
    rows = [(u, j, *build_prompt(personas[u], j, cfg, seed)) for u in users for j in range(gen.n_per_user)]
    table = pd.DataFrame(rows, columns=["user_id", "index", "prompt", "negative_prompt", "fallback"])
    items = make_items(METHOD, setting, table["user_id"].tolist(), table["index"].tolist(), gen,
                       prompts=table["prompt"].tolist(), negative_prompts=table["negative_prompt"].tolist(),
                       loras=None if loras is None else [loras[u] for u in table["user_id"]])
    return items, table


def method_items(personas: dict[int, Persona], settings: Sequence[str], gen: GenerationConfig, cfg: VlmConfig,
                 seed: int = 0, loras: dict[int, str] | None = None) -> tuple[list[WorkItem], pd.DataFrame]:
    """Items and prompt table (with a setting column) of "vlm" and, where `loras` has users, "vlm_lora"."""
    items, tables = [], []
    for s in settings:
        if s == "vlm_lora" and not loras:
            continue
        its, table = persona_items(personas, s, gen, cfg, seed, loras if s == "vlm_lora" else None)
        items, tables = items + its, tables + [table.assign(setting=s)]
    return items, pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["user_id", "index", "prompt", "negative_prompt", "fallback", "setting"])


def tag_line(row) -> str:
    """One tag row as text: "caption | keywords", or why it failed."""
    if row.status == "failed":
        return f"FAILED: {row.reason}"
    return f"{row.caption} | {', '.join(dict.fromkeys(k for f in LIST_FIELDS for k in getattr(row, f)))}"


def truncation(tokenizer, prompts: Sequence[str]) -> dict:
    """How many prompts CLIP's tokenizer cuts at its 77 tokens, and the longest one."""
    ids = tokenizer(list(prompts), truncation=False)["input_ids"] if len(prompts) else []
    lens = [len(x) for x in ids]
    limit = tokenizer.model_max_length
    worst = int(np.argmax(lens)) if lens else -1
    return {"limit": limit, "truncated": sum(n > limit for n in lens), "prompts": len(lens),
            "max_tokens": max(lens, default=0), "worst": prompts[worst] if lens else ""}


def keyword_table(personas: dict[int, Persona], users: Sequence[int], top: int = 6) -> pd.DataFrame:
    """Top positive and negative keywords of a few users and how many of their rated images were tagged."""
    ps = [personas[u] for u in users]
    return pd.DataFrame([{"user_id": p.user_id, "liked (tagged of rated)": f"{p.n_liked} of {p.rated_liked}",
                          "disliked (tagged of rated)": f"{p.n_disliked} of {p.rated_disliked}",
                          "positive": ", ".join(p.pos[:top]) or "(none: fallback)",
                          "negative": ", ".join(p.neg[:top]) or "(none)"} for p in ps])


def summariser(model, processor, max_new_tokens: int = 48):
    """pos -> one persona sentence written by the VLM (text only, greedy); "" when it writes nothing usable."""
    def summarise(pos: Sequence[str]) -> str:
        ask = f"In one short phrase, describe the visual style of images with: {', '.join(pos)}."
        text = generate(model, processor, [chat_prompt(processor, ask, image=False)], None, max_new_tokens)[0][0]
        text = " ".join(text.split()).strip(" .").lower()
        usable = text and all(c.isascii() and (c.isalnum() or c in " ,-'") for c in text)
        return text[:160] if usable else ""

    return summarise


def persona_rate(table: pd.DataFrame) -> float:
    """Share of prompts that used the Table 5 fallback."""
    return float(table["fallback"].mean()) if len(table) else math.nan
