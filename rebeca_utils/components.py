"""Frozen model components: tiny offline seeded builders (smoke/demo) and the paper's Hub weights, one API for both."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import unquote, urlparse

import torch

from .config import ModelsConfig

CACHE_ENV = "REBECA_CACHE"
CLIP_ROLES = ("verifier", "aesthetic", "decoder")
AESTHETIC_EMB_DIM = 768  # the LAION aesthetic head reads ViT-L/14 embeddings; the tiny analog keeps that width
AESTHETIC_HEAD_ENV = "REBECA_AESTHETIC_HEAD"  # a local copy of the LAION head, e.g. on an air-gapped GPU box
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # as hpsv2's hps_version_map
TINY_HPS_EMB_DIM = 64
SETUP_HINT = "Run notebooks/00_setup.ipynb with download=True on a machine with internet"


class MissingWeightsError(RuntimeError):
    """Paper weights are not in the Hugging Face cache and the Hub is offline or unreachable."""


class WeightsEntry(NamedTuple):
    """One paper checkpoint: label, Hub repo id, files ("a|b" = either file is enough); url: a non-Hub file."""

    label: str
    repo_id: str
    files: list[str]
    url: str = ""  # set: files = [the local path] that this URL is fetched to (not the Hugging Face cache)


# ----------------------------------------------------------------------------------------------- helpers


def kit_cache_dir() -> Path:
    """Where tiny artefacts (tokenizer, IP-Adapter, open_clip configs) are written: $REBECA_CACHE or ~/.cache."""
    env = os.environ.get(CACHE_ENV)
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rebeca_kit"
    return base.expanduser()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng: tiny builds are reproducible without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _atomic_write(path: Path, data: bytes) -> None:
    # temp file + rename: a crashed or concurrent writer never leaves a truncated file behind
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_builder(models: ModelsConfig) -> str:
    if models.builder not in ("tiny", "hub"):
        raise ValueError(f"models.builder={models.builder!r}: valid builders are 'tiny' and 'hub'")
    return models.builder


# ----------------------------------------------------------------------------------------------- paper weights


def _hf_cache() -> str:
    from huggingface_hub import constants

    # read at call time (not import time) so HF_HUB_CACHE can be redirected, e.g. by tests
    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    # the env var is re-read because huggingface_hub freezes HF_HUB_OFFLINE when it is first imported
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0, endpoint: str | None = None) -> bool:
    from huggingface_hub import constants

    # a bounded TCP probe, so a machine without internet fails in seconds instead of hanging on HTTP retries
    url = urlparse(endpoint or constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _open_clip_entry(label: str, arch_tag: tuple[str, str]) -> WeightsEntry:
    import open_clip

    arch, tag = arch_tag
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg or not cfg.get("hf_hub"):
        raise ValueError(f"open_clip has no Hugging Face Hub weights for {arch} / {tag}")
    # open_clip's "org/name/" means the default file: open_clip_model.safetensors, else open_clip_pytorch_model.bin
    org, name, filename = (cfg["hf_hub"].split("/", 2) + [""])[:3]
    files = [filename] if filename else ["open_clip_model.safetensors|open_clip_pytorch_model.bin"]
    repo = f"{org}/{name}"
    return WeightsEntry(f"{label} (open_clip {arch} / {tag})", repo, files)


def _sd_entry(models: ModelsConfig) -> WeightsEntry:
    # only what StableDiffusionPipeline needs with safety_checker=None (the repo also holds ~30 GB of variants)
    files = ["model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors",
             "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    return WeightsEntry("Stable Diffusion 1.5 (decoder)", models.sd_id, files)


def _ip_adapter_entry(models: ModelsConfig) -> WeightsEntry:
    return WeightsEntry("IP-Adapter SD1.5", models.ip_adapter_id,
                        [f"{models.ip_adapter_subfolder}/{models.ip_adapter_weight}"])


def _image_encoder_entry(models: ModelsConfig) -> WeightsEntry:
    sub = models.image_encoder_subfolder
    return WeightsEntry("IP-Adapter image encoder (OpenCLIP ViT-H/14)", models.ip_adapter_id,
                        [f"{sub}/config.json", f"{sub}/model.safetensors|{sub}/pytorch_model.bin"])


def _clip_entry(models: ModelsConfig, role: str) -> WeightsEntry:
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


def paper_weights(models: ModelsConfig | None = None) -> list[WeightsEntry]:
    """Every checkpoint the paper profile loads, as (label, repo_id, files[, url])."""
    models = models or ModelsConfig()
    return [_sd_entry(models), _ip_adapter_entry(models), _image_encoder_entry(models),
            *(_clip_entry(models, role) for role in CLIP_ROLES), aesthetic_head_entry(models), hps_entry(models)]


def _cached_file(repo_id: str, spec: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in spec.split("|"):
        hit = try_to_load_from_cache(repo_id, name, cache_dir=_hf_cache())
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def weights_in_cache(entry: WeightsEntry) -> bool:
    """True when every file of `entry` is present locally (HF cache or its path; never touches the network)."""
    if entry.url:
        return all(os.path.isfile(f) for f in entry.files)
    return all(_cached_file(entry.repo_id, spec) is not None for spec in entry.files)


def _missing_message(entry: WeightsEntry, why: str) -> str:
    if entry.url:
        return (f"{entry.label}: {entry.files[0]} does not exist and {why}. {SETUP_HINT}, or download "
                f"{entry.url} to {entry.files[0]} (or point {AESTHETIC_HEAD_ENV} / head_path= at a local copy).")
    names = " ".join(s.split("|")[0] for s in entry.files if _cached_file(entry.repo_id, s) is None)
    return (f"{entry.label}: weights of {entry.repo_id} are not in the Hugging Face cache {_hf_cache()} and {why}. "
            f"{SETUP_HINT}, or `hf download {entry.repo_id} {names}`, then copy that cache here "
            f"(or point HF_HOME / HF_HUB_CACHE at it).")


def download_paper_weights(entries: list[WeightsEntry] | None = None,
                           models: ModelsConfig | None = None) -> dict[str, list[str]]:
    """Download the paper checkpoints into the Hugging Face cache (progress bars); returns repo -> local files."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    out: dict[str, list[str]] = {}
    for entry in entries if entries is not None else paper_weights(models):
        if entry.url:
            out.setdefault(entry.repo_id, []).append(_download_url(entry.url, Path(entry.files[0])))
            continue
        for spec in entry.files:
            path = _cached_file(entry.repo_id, spec)
            for name in spec.split("|") if path is None else []:
                try:
                    path = hf_hub_download(entry.repo_id, name, cache_dir=_hf_cache())
                    break
                except EntryNotFoundError:  # try the alternative file name
                    continue
            if path is None:
                raise FileNotFoundError(f"{entry.label}: none of {spec.split('|')} exists in {entry.repo_id}")
            out.setdefault(entry.repo_id, []).append(path)
    return out


def _download_url(url: str, path: Path) -> str:
    import urllib.request

    from tqdm.auto import tqdm

    if path.is_file():
        return str(path)
    request = urllib.request.Request(url, headers={"User-Agent": "rebeca-kit"})
    with urllib.request.urlopen(request, timeout=60) as response:  # follows GitHub's redirect to its raw host
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
                bar.update(len(chunk))
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise OSError(f"{url}: received {len(data)} of {total} bytes")
    _atomic_write(path, data)  # a few MB: the whole file is held, then renamed into place
    return str(path)


def require_weights(entry: WeightsEntry) -> list[str]:
    """Local paths of `entry`'s files: from the cache, else downloaded, else MissingWeightsError at once."""
    # fail fast: the cache is checked first, and nothing waits on a network that is known to be absent;
    # HF_HUB_OFFLINE=1 is the kit's offline switch, for URL entries too
    if not weights_in_cache(entry):
        where = urlparse(entry.url).hostname if entry.url else "the Hub"
        if _offline():
            off = "downloads are off (HF_HUB_OFFLINE=1)" if entry.url else "the Hub is offline (HF_HUB_OFFLINE=1)"
            raise MissingWeightsError(_missing_message(entry, off))
        if urlparse(entry.url).scheme != "file" and not _hub_reachable(endpoint=entry.url or None):
            raise MissingWeightsError(_missing_message(entry, f"{where} is unreachable from this machine"))
        download_paper_weights([entry])
    return list(entry.files) if entry.url else [_cached_file(entry.repo_id, spec) for spec in entry.files]


# ----------------------------------------------------------------------------------------------- architectures

# The paper's architectures (config.json of h94/IP-Adapter models/image_encoder and of SD-1.5's unet, vae,
# text_encoder); the tiny builders reuse them with only widths, depths and sizes shrunk.
VIT_H14_VISION_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                             image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
SD15_UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                       block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       scaling_factor=0.18215)
SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


# ----------------------------------------------------------------------------------------------- open_clip


def _tiny_clip_name(models: ModelsConfig, role: str) -> str:
    import open_clip

    emb = {"verifier": models.verifier_emb_dim, "aesthetic": AESTHETIC_EMB_DIM,
           "decoder": models.decoder_emb_dim, "hps": TINY_HPS_EMB_DIM}[role]
    name = f"rebeca-tiny-{role}-{emb}"
    if name not in open_clip.list_models():
        # same config schema as open_clip's ViT-*.json, tiny widths; text keeps the real BPE vocab and 77 tokens
        cfg = {"embed_dim": emb,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
        if role == "aesthetic":
            cfg["quick_gelu"] = True  # as OpenAI's ViT-L/14
        path = kit_cache_dir() / "open_clip_configs" / f"{name}.json"
        _atomic_write(path, json.dumps(cfg, indent=1).encode())
        open_clip.add_model_config(path)
    return name


def build_clip(models: ModelsConfig, role: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, preprocess, tokenizer) from open_clip for role verifier | aesthetic | decoder."""
    import open_clip

    if role not in CLIP_ROLES:
        raise ValueError(f"role={role!r}: valid roles are {', '.join(CLIP_ROLES)}")
    if _check_builder(models) == "tiny":
        name = _tiny_clip_name(models, role)
        with _seeded(models.seed):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    else:
        name, tag = getattr(models, f"{role}_clip")
        entry = _clip_entry(models, role)
        require_weights(entry)
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        # load the cached file by path (no Hub round-trip) with the tag's preprocessing and activation
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=_cached_file(entry.repo_id, entry.files[0]),
            force_quick_gelu=pcfg.get("quick_gelu", False), image_mean=pcfg.get("mean"),
            image_std=pcfg.get("std"), image_interpolation=pcfg.get("interpolation"),
            image_resize_mode=pcfg.get("resize_mode"))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(name)


# ----------------------------------------------------------------------------------------------- image encoder


def tiny_image_encoder_config(models: ModelsConfig):
    """ViT-H/14's CLIPVisionConfig shrunk, projecting to models.decoder_emb_dim."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**VIT_H14_VISION_CONFIG, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                               "projection_dim": models.decoder_emb_dim})


def build_image_encoder(models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor): the IP-Adapter's encoder; image_embeds in decoder space."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    if _check_builder(models) == "tiny":
        with _seeded(models.seed):
            encoder = CLIPVisionModelWithProjection(tiny_image_encoder_config(models))
    else:
        require_weights(_image_encoder_entry(models))
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            models.ip_adapter_id, subfolder=models.image_encoder_subfolder, dtype=dtype,
            cache_dir=_hf_cache(), local_files_only=True)
    size = encoder.config.image_size
    # the processor diffusers' load_ip_adapter builds for this encoder (h94 ships no preprocessor config)
    processor = CLIPImageProcessor(size=size, crop_size=size)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False), processor


# ----------------------------------------------------------------------------------------------- tokenizer


def tiny_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A CLIPTokenizer folder (vocab.json, merges.txt) written from the BPE vocabulary shipped inside open_clip."""
    import open_clip.tokenizer as oct

    folder = Path(cache_dir or kit_cache_dir()) / "tiny-clip-tokenizer"
    names = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
    if all((folder / n).is_file() for n in names):
        return folder
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # the slice open_clip and OpenAI CLIP use
    units = list(oct.bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # ids 49406, 49407 as in openai/clip-vit-large-patch14
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                             "do_lower_case": True, **special}),
        "special_tokens_map.json": json.dumps(special),
    }
    for name in names:  # content is deterministic, so per-file atomic writes are enough
        _atomic_write(folder / name, files[name].encode("utf-8"))
    return folder


def build_tokenizer(cache_dir: str | os.PathLike | None = None):
    """SD-1.5's CLIPTokenizer, built offline (transformers 5 ignores vocab_file=, so load the folder)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_tokenizer_dir(cache_dir)))


# ----------------------------------------------------------------------------------------------- SD 1.5 + IP-Adapter


def tiny_unet_config() -> dict:
    """SD-1.5's UNet layout (4 levels, cross-attention in the first three, 16 attn2 layers) at tiny widths."""
    return {**SD15_UNET_CONFIG, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32}


def _tiny_sd_components(models: ModelsConfig, cache_dir: str | os.PathLike | None) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with _seeded(models.seed):
        unet = UNet2DConditionModel(**tiny_unet_config())
    with _seeded(models.seed):
        # 4 levels as SD-1.5 (8x downsampling, 4 latent channels, scaling 0.18215): 64 px images, 8x8 latents
        vae = AutoencoderKL(**{**SD15_VAE_CONFIG, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
                               "sample_size": 64})
    with _seeded(models.seed):
        # hidden size = the UNet's cross_attention_dim, as 768 = 768 in SD-1.5; full BPE vocab and 77 positions
        text_encoder = CLIPTextModel(CLIPTextConfig(**{
            **SD15_TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "projection_dim": 32}))
    # SD-1.5's scheduler constants, with DDIM as the sampler
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(cache_dir),
                scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False)


def tiny_ip_adapter_state_dict(unet, image_embed_dim: int, seed: int = 0) -> dict:
    """IP-Adapter weights in the original ip-adapter_sd15.bin layout for `unet`: image_proj + ip_adapter."""
    cross = unet.config.cross_attention_dim
    with _seeded(seed):
        proj = torch.nn.Linear(image_embed_dim, 4 * cross)  # 4 image tokens, as IP-Adapter SD1.5
    image_proj = {"proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone(),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}  # LayerNorm's own init
    ip_adapter = {}
    # keys index unet.attn_processors, as the original's ModuleList(attn_processors.values()) did: 1, 3, ..., 31;
    # to_k_ip / to_v_ip start as copies of to_k / to_v, which is how IP-Adapter initialises them for training
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            ip_adapter[f"{i}.to_k_ip.weight"] = attn.to_k.weight.detach().float().clone()
            ip_adapter[f"{i}.to_v_ip.weight"] = attn.to_v.weight.detach().float().clone()
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        isinstance(a[k], dict) and isinstance(b[k], dict) and _same_state(a[k], b[k])
        or isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor)
        and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def write_tiny_ip_adapter(models: ModelsConfig, unet, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the tiny IP-Adapter checkpoint to <cache>/tiny-ip-adapter/<subfolder>/<weight>; returns the folder."""
    folder = Path(cache_dir or kit_cache_dir()) / "tiny-ip-adapter"
    path = folder / models.ip_adapter_subfolder / models.ip_adapter_weight
    state = tiny_ip_adapter_state_dict(unet, models.decoder_emb_dim, models.seed)
    if path.is_file():
        try:
            if _same_state(torch.load(path, map_location="cpu", weights_only=True), state):
                return folder  # present and identical to what this config produces
        except Exception:  # unreadable or truncated: rewrite below
            pass
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(path, buf.getvalue())
    return folder


def build_sd_pipeline(models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      ip_adapter: bool = True, cache_dir: str | os.PathLike | None = None):
    """StableDiffusionPipeline (DDIM, safety_checker=None), IP-Adapter loaded by the paper's load_ip_adapter call."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if _check_builder(models) == "tiny":
        pipe = StableDiffusionPipeline(**_tiny_sd_components(models, cache_dir))
        source = write_tiny_ip_adapter(models, pipe.unet, cache_dir) if ip_adapter else None  # from fp32 weights
        if dtype != torch.float32:  # (a float32 .to() only earns diffusers warnings)
            pipe = pipe.to(dtype=dtype)
    else:
        require_weights(_sd_entry(models))
        if ip_adapter:
            require_weights(_ip_adapter_entry(models))
        pipe = StableDiffusionPipeline.from_pretrained(
            models.sd_id, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            cache_dir=_hf_cache(), local_files_only=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        source = models.ip_adapter_id
    if ip_adapter:
        # one loading path for both profiles: only the first argument (local folder or Hub repo) differs
        pipe.load_ip_adapter(str(source), subfolder=models.ip_adapter_subfolder, weight_name=models.ip_adapter_weight,
                             image_encoder_folder=None, cache_dir=_hf_cache(), local_files_only=True)
    return pipe.to(device)
