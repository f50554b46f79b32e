"""The paper's checkpoints: registry, cache look-up, downloads, and a fast failure naming what to fetch."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlparse

import open_clip
import torch
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import constants, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from transformers.utils import logging as transformers_logging

from ..config import ModelsConfig
from ..io import download_url
from ..runtime import hub_reachable, kit_cache_dir, offline
from ..steps import folder

AESTHETIC_HEAD_ENV = "REBECA_AESTHETIC_HEAD"  # a local copy of the LAION head, e.g. on an air-gapped GPU box

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # as hpsv2's hps_version_map

SETUP_HINT = f"Run notebooks/{folder(0)}.ipynb with download=True on a machine with internet"
CLIP_ROLES = ("verifier", "aesthetic", "decoder")
OPEN_CLIP_CONFIG = "open_clip_config.json"


class MissingWeightsError(RuntimeError):
    """Paper weights are not in the Hugging Face cache and the Hub is offline or unreachable."""


class WeightsEntry(NamedTuple):
    """One paper checkpoint: label, Hub repo id, files ("a|b" = either file is enough); url: a non-Hub file."""

    label: str
    repo_id: str
    files: list[str]
    url: str = ""  # set: files = [the local path] that this URL is fetched to (not the Hugging Face cache)
    patterns: tuple[str, ...] = ()  # set: a snapshot fetched by these patterns, checked by snapshot_missing()


def check_builder(models: ModelsConfig) -> str:
    """`models.builder` ("tiny" or "hub"), refused otherwise."""
    if models.builder not in ("tiny", "hub"):
        raise ValueError(f"models.builder={models.builder!r}: valid builders are 'tiny' and 'hub'")
    return models.builder


def hf_cache() -> str:
    """The Hugging Face hub cache folder, read at call time (so HF_HUB_CACHE can be redirected, e.g. by tests)."""
    # read at call time (not import time) so HF_HUB_CACHE can be redirected, e.g. by tests
    return constants.HF_HUB_CACHE


def _open_clip_entry(label: str, arch_tag: tuple[str, str]) -> WeightsEntry:

    arch, tag = arch_tag
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg or not cfg.get("hf_hub"):
        raise ValueError(f"open_clip has no Hugging Face Hub weights for {arch} / {tag}")
    # open_clip's "org/name/" means the default file: open_clip_model.safetensors, else open_clip_pytorch_model.bin
    org, name, filename = (cfg["hf_hub"].split("/", 2) + [""])[:3]
    files = [filename] if filename else ["open_clip_model.safetensors|open_clip_pytorch_model.bin"]
    # the repo's own architecture and preprocessing (open_clip's push_to_hf_hub writes it beside the weights)
    files.append(OPEN_CLIP_CONFIG)
    repo = f"{org}/{name}"
    return WeightsEntry(f"{label} (open_clip {arch} / {tag})", repo, files)


def clip_config_entry(arch_tag: tuple[str, str]) -> WeightsEntry:
    """Only the open_clip_config.json of an open_clip tag's repo: an architecture whose weights come elsewhere (HPS)."""
    entry = _open_clip_entry("architecture", arch_tag)
    return WeightsEntry(entry.label, entry.repo_id, [OPEN_CLIP_CONFIG])


def sd_entry(models: ModelsConfig) -> WeightsEntry:
    """Stable Diffusion 1.5: the files StableDiffusionPipeline needs without its safety checker."""
    # only what StableDiffusionPipeline needs with safety_checker=None (the repo also holds ~30 GB of variants)
    files = ["model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors",
             "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    return WeightsEntry("Stable Diffusion 1.5 (decoder)", models.sd_id, files)


def ip_adapter_entry(models: ModelsConfig) -> WeightsEntry:
    """The IP-Adapter SD1.5 checkpoint."""
    return WeightsEntry("IP-Adapter SD1.5", models.ip_adapter_id,
                        [f"{models.ip_adapter_subfolder}/{models.ip_adapter_weight}"])


def image_encoder_entry(models: ModelsConfig) -> WeightsEntry:
    """The IP-Adapter's image encoder (OpenCLIP ViT-H/14 as CLIPVisionModelWithProjection)."""
    sub = models.image_encoder_subfolder
    return WeightsEntry("IP-Adapter image encoder (OpenCLIP ViT-H/14)", models.ip_adapter_id,
                        [f"{sub}/config.json", f"{sub}/model.safetensors|{sub}/pytorch_model.bin"])


def clip_entry(models: ModelsConfig, role: str) -> WeightsEntry:
    """The open_clip checkpoint of a CLIP role (verifier, aesthetic, decoder)."""
    label = {"verifier": "CLIP verifier", "aesthetic": "CLIP for the LAION aesthetic head",
             "decoder": "CLIP in the decoder's space"}[role]
    return _open_clip_entry(label, getattr(models, f"{role}_clip"))


def hps_entry(models: ModelsConfig, version: str = "v2.0") -> WeightsEntry:
    """The HPS checkpoint (v2.0 or v2.1) in models.hps_id; it holds the whole fine-tuned CLIP."""
    if version not in HPS_FILES:
        raise ValueError(f"HPS version={version!r}: valid versions are {', '.join(HPS_FILES)}")
    return WeightsEntry(f"HPS{version} (OpenCLIP {models.hps_clip[0]} fine-tuned)", models.hps_id, [HPS_FILES[version]])


def aesthetic_head_entry(models: ModelsConfig, path: str | os.PathLike | None = None) -> WeightsEntry:
    """The LAION aesthetic head: its URL and its local path (`path`, else $REBECA_AESTHETIC_HEAD, else kit cache)."""
    url = urlparse(models.aesthetic_head_url)
    name = unquote(url.path.rsplit("/", 1)[-1])
    target = path or os.environ.get(AESTHETIC_HEAD_ENV) or kit_cache_dir() / "laion-aesthetic" / name
    repo = "/".join([url.hostname or "", *url.path.strip("/").split("/")[:2]])  # github.com/<owner>/<repo>
    return WeightsEntry("LAION aesthetic predictor head (MLP on CLIP ViT-L/14)", repo,
                        [str(Path(target).expanduser().absolute())], url=models.aesthetic_head_url)


# llava-hf/llava-1.5-7b-hf is fetched by patterns, not a file list: its snapshots differ (the chat template moved from
# tokenizer_config.json to chat_template.json, then chat_template.jinja; the shards are named by the index)
VLM_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.jinja", "tokenizer*")
VLM_REQUIRED = ("config.json", "model.safetensors.index.json", "tokenizer_config.json")
VLM_EITHER = (("preprocessor_config.json", "processor_config.json"),  # the image processor (transformers 5: in the
              ("tokenizer.json", "tokenizer.model"))                 # latter), the fast or sentencepiece tokenizer
VLM_TEMPLATES = ("chat_template.jinja", "chat_template.json")  # else a "chat_template" key in tokenizer_config.json
VLM_FILES = [*VLM_REQUIRED, "the shards model.safetensors.index.json names", *("|".join(e) for e in VLM_EITHER),
             "|".join(VLM_TEMPLATES) + "|tokenizer_config.json (its chat_template key)"]  # what weights_report shows


def vlm_entry(models: ModelsConfig) -> WeightsEntry:
    """LLaVA-1.5-7B, the tagger of the VLM baselines (App F): a snapshot of its weights and processor files."""
    return WeightsEntry("LLaVA-1.5-7B (VLM baselines' tagger)", models.vlm_id, list(VLM_FILES), patterns=VLM_PATTERNS)


def paper_weights(models: ModelsConfig | None = None) -> list[WeightsEntry]:
    """Every checkpoint the paper profile loads, as (label, repo_id, files[, url])."""
    models = models or ModelsConfig()
    return [sd_entry(models), ip_adapter_entry(models), image_encoder_entry(models),
            *(clip_entry(models, role) for role in CLIP_ROLES), aesthetic_head_entry(models), hps_entry(models),
            vlm_entry(models)]


def cached_file(repo_id: str, spec: str) -> str | None:
    """Local path of `spec` ("a|b": either file) of `repo_id` in the Hugging Face cache, or None."""
    for name in spec.split("|"):
        hit = try_to_load_from_cache(repo_id, name, cache_dir=hf_cache())
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def snapshot_folder(repo_id: str, patterns: tuple[str, ...] = VLM_PATTERNS) -> Path | None:
    """The cached snapshot of `repo_id` (the one refs/main names: what snapshot_download returns offline), or None."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), cache_dir=hf_cache(),
                                      local_files_only=True))
    except FileNotFoundError as err:  # LocalEntryNotFoundError; IncompleteSnapshotError names the folder it judged
        path = getattr(err, "snapshot_path", None)  # (snapshot_missing decides what the kit needs of it)
        return Path(path) if path else None


def snapshot_missing(folder: Path | None) -> list[str]:
    """What a LLaVA snapshot lacks: config, index, every shard the index names, processor and tokenizer files."""
    if folder is None:
        return ["every file (no snapshot)"]
    missing = [f for f in VLM_REQUIRED if not (folder / f).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):  # a truncated download: fetch it again
            shards = [f"{index.name} (unreadable)"]
        missing += [s for s in shards if not (folder / s).is_file()]
    missing += [" or ".join(e) for e in VLM_EITHER if not any((folder / f).is_file() for f in e)]
    tok_cfg = folder / "tokenizer_config.json"
    in_tok_cfg = tok_cfg.is_file() and '"chat_template"' in tok_cfg.read_text(errors="replace")  # older snapshots
    if not in_tok_cfg and not any((folder / f).is_file() for f in VLM_TEMPLATES):
        missing.append(" or ".join(VLM_TEMPLATES))
    return missing


def snapshot_files(folder: Path) -> list[str]:
    """The files of a snapshot, config.json first (its folder is what from_pretrained reads)."""
    rest = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name != "config.json")
    return [str(folder / "config.json"), *rest]


def weights_in_cache(entry: WeightsEntry) -> bool:
    """True when every file of `entry` is present locally (HF cache or its path; never touches the network)."""
    if entry.url:
        return all(os.path.isfile(f) for f in entry.files)
    if entry.patterns:
        return not snapshot_missing(snapshot_folder(entry.repo_id, entry.patterns))
    return all(cached_file(entry.repo_id, spec) is not None for spec in entry.files)


def _missing_message(entry: WeightsEntry, why: str) -> str:
    if entry.url:
        return (f"{entry.label}: {entry.files[0]} does not exist and {why}. {SETUP_HINT}, or download "
                f"{entry.url} to {entry.files[0]} (or point {AESTHETIC_HEAD_ENV} / head_path= at a local copy).")
    if entry.patterns:
        lacks = f" (missing: {', '.join(snapshot_missing(snapshot_folder(entry.repo_id, entry.patterns)))})"
        names = "--include " + " ".join(f"'{p}'" for p in entry.patterns)
    else:
        lacks, names = "", " ".join(s.split("|")[0] for s in entry.files if cached_file(entry.repo_id, s) is None)
    return (f"{entry.label}: weights of {entry.repo_id} are not in the Hugging Face cache {hf_cache()}{lacks} and "
            f"{why}. {SETUP_HINT}, or `hf download {entry.repo_id} {names}`, then copy that cache here "
            f"(or point HF_HOME / HF_HUB_CACHE at it).")


def download_paper_weights(entries: list[WeightsEntry] | None = None,
                           models: ModelsConfig | None = None) -> dict[str, list[str]]:
    """Download the paper checkpoints into the Hugging Face cache (progress bars); returns repo -> local files."""

    out: dict[str, list[str]] = {}
    for entry in entries if entries is not None else paper_weights(models):
        if entry.url:
            out.setdefault(entry.repo_id, []).append(str(download_url(entry.url, Path(entry.files[0]))))
            continue
        if entry.patterns:  # the repo's current layout, whatever its file names (the shards, the chat template)
            folder = Path(snapshot_download(entry.repo_id, allow_patterns=list(entry.patterns), cache_dir=hf_cache()))
            if snapshot_missing(folder):
                raise FileNotFoundError(f"{entry.label}: {entry.repo_id} has no {', '.join(snapshot_missing(folder))}")
            out[entry.repo_id] = snapshot_files(folder)
            continue
        for spec in entry.files:
            path = cached_file(entry.repo_id, spec)
            for name in spec.split("|") if path is None else []:
                try:
                    path = hf_hub_download(entry.repo_id, name, cache_dir=hf_cache())
                    break
                except EntryNotFoundError:  # try the alternative file name
                    continue
            if path is None:
                raise FileNotFoundError(f"{entry.label}: none of {spec.split('|')} exists in {entry.repo_id}")
            out.setdefault(entry.repo_id, []).append(path)
    return out


def require_weights(entry: WeightsEntry) -> list[str]:
    """Local paths of `entry`'s files: from the cache, else downloaded, else MissingWeightsError at once."""
    # fail fast: the cache is checked first, and nothing waits on a network that is known to be absent;
    # HF_HUB_OFFLINE=1 is the kit's offline switch, for URL entries too
    if not weights_in_cache(entry):
        where = urlparse(entry.url).hostname if entry.url else "the Hub"
        if offline():
            off = "downloads are off (HF_HUB_OFFLINE=1)" if entry.url else "the Hub is offline (HF_HUB_OFFLINE=1)"
            raise MissingWeightsError(_missing_message(entry, off))
        if urlparse(entry.url).scheme != "file" and not hub_reachable(endpoint=entry.url or None):
            raise MissingWeightsError(_missing_message(entry, f"{where} is unreachable from this machine"))
        download_paper_weights([entry])
    if entry.patterns:
        return snapshot_files(snapshot_folder(entry.repo_id, entry.patterns))
    return list(entry.files) if entry.url else [cached_file(entry.repo_id, spec) for spec in entry.files]



@contextlib.contextmanager
def quiet_libraries():
    """transformers' and diffusers' progress bars and warnings off, prints swallowed; restored afterwards."""
    libs = (transformers_logging, diffusers_logging)
    bars, levels = [lib.is_progress_bar_enabled() for lib in libs], [lib.get_verbosity() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub's mixin prints "Loading weights from ..."
            yield
    finally:
        for lib, bar, level in zip(libs, bars, levels):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def load_pretrained(cls, folder: str | os.PathLike, **kwargs):
    """`cls.from_pretrained(folder, **kwargs)` without the libraries' loading bars and prints (the smoke world's
    local folders; notebooks stay readable)."""
    with quiet_libraries(), torch.random.fork_rng(devices=[]):  # init before loading draws from the global RNG
        return cls.from_pretrained(folder, **kwargs)
