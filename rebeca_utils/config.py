"""Typed, frozen run profiles: `smoke` (tiny, CPU, tests), `demo` (dSprites study on a laptop), `paper` (GPU)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

PROFILES = ("smoke", "demo", "paper")


@dataclass(frozen=True)
class ModelsConfig:
    """Which builder constructs each model and, for the paper profile, the Hub ids."""

    builder: str = "hub"  # "tiny" (offline, seeded, from configs) or "hub" (the paper's weights)
    sd_id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    ip_adapter_id: str = "h94/IP-Adapter"
    ip_adapter_subfolder: str = "models"
    ip_adapter_weight: str = "ip-adapter_sd15.bin"
    image_encoder_subfolder: str = "models/image_encoder"
    decoder_emb_dim: int = 1024  # IP-Adapter SD1.5 consumes 1024-d image_embeds (ViT-H-14 projection)
    verifier_clip: tuple[str, str] = ("ViT-bigG-14", "laion2b_s39b_b160k")
    verifier_emb_dim: int = 1280
    aesthetic_clip: tuple[str, str] = ("ViT-L-14", "openai")
    decoder_clip: tuple[str, str] = ("ViT-H-14", "laion2b_s32b_b79k")
    # LAION aesthetic predictor head (§4.3.2): not on the Hub, fetched from its public GitHub home into the kit cache
    aesthetic_head_url: str = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                               "sac+logos+ava1-l14-linearMSE.pth")
    hps_id: str = "xswu/HPSv2"  # HPS_v2_compressed.pt (v2.0) / HPS_v2.1_compressed.pt (v2.1): the whole CLIP
    hps_clip: tuple[str, str] = ("ViT-H-14", "laion2b_s32b_b79k")  # the architecture HPS fine-tuned
    vlm_id: str = "llava-hf/llava-1.5-7b-hf"  # the tagger of the VLM baselines (App F)
    seed: int = 0  # seeds the tiny builders
    # tiny builder: "pretrained" = the smoke world (rebeca_utils/world/), trained once on the synthetic images;
    # "random" = the seeded random stand-ins
    tiny_weights: str = "pretrained"


@dataclass(frozen=True)
class PriorConfig:
    """REBECA prior architecture (App D); defaults are the paper's final configuration (App E.2)."""

    emb_dim: int = 1024
    n_tokens: int = 32
    hidden_dim: int = 128
    n_heads: int = 8
    n_layers: int = 6
    n_users: int = 210
    n_ratings: int = 2
    mlp_ratio: int = 4
    zero_init_attn: bool = True  # paper: all residual paths start at zero; False = reference code


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule, objective and samplers (App E.2)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # or "laplace"
    prediction_type: str = "sample"  # eq. 3; or "epsilon", "v_prediction"
    sampler: str = "dpmsolver"  # fast sampler: "dpmsolver" (DPM-Solver++) or "ddim"; "ddpm" = the paper's 1000 steps
    sampler_steps: int = 20  # fast enough for 5,250 samples on a CPU (README, Performance)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (App E.1): AdamW, ReduceLROnPlateau, early stopping."""

    lr: float = 1e-4
    batch_size: int = 64
    samples_per_user: int = 100
    max_epochs: int = 300
    patience: int = 20  # early stopping, epochs without validation improvement
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    p_uncond: float = 0.1  # joint drop of user and rating (classifier-free guidance)
    p_drop_user: float = 0.0  # independent drops; the reference code uses 0.15 each
    p_drop_rating: float = 0.0
    weight_decay: float = 0.01
    val_every: int = 1


@dataclass(frozen=True)
class DSpritesConfig:
    """Controlled study (§3): four users on red/blue hearts and squares."""

    n_images: int = 40_000
    test_frac: float = 0.1
    # both / one / neither match: the reference code's 0.01 for "neither" produced the paper's Table 1 (README);
    # the paper's text says 0.05 (notebook 01 `p_like_neither=0.05`)
    p_like: tuple[float, float, float] = (0.95, 0.10, 0.01)
    latent_dim: int = 32
    normalization: str = "standardize"  # VAE means carry a large per-dim offset; the prior trains on z-scores
    vae_epochs: int = 6  # enough for the where/what VAE to separate the four shape-colour pairs (README, Table 1)
    vae_batch_size: int = 128
    vae_lr: float = 2e-3
    n_tokens: int = 8  # 8 tokens of 4 dims
    hidden_dim: int = 32
    n_heads: int = 4
    n_layers: int = 2
    batch_size: int = 256  # the paper gives no dSprites recipe; larger batches buy CPU throughput
    lr: float = 1e-3
    samples_per_user: int = 3000
    max_epochs: int = 160  # the demo budget: under 10 min on a laptop CPU (README, Table 1)
    patience: int = 20
    reps: int = 25
    ks: tuple[int, ...] = (1, 5, 10, 20)
    recall_denominator: str = "user"  # R@k over the user's liked test items; "all_users": the paper's Table 1
    cfg_scales: tuple[float, ...] = (1.0, 3.0, 5.0)
    ddpm_reps: int = 5  # repetitions for the slow 1000-step sampler comparison
    umap_points: int = 4000
    fifth_ks: tuple[int, ...] = (5, 20, 100, 0)  # the fifth user's history sizes (0 = all training images)
    fifth_draws: int = 3  # random histories per size
    fifth_retrain: bool = True  # the fifth user's upper bound: a prior retrained with five users (one more training)
    fifth_retrain_epochs: int = 40  # that retrain, warm-started from the four-user prior (from scratch: 160, README)
    fifth_encoder_steps: int = 300  # the history encoder on the four users (few users: more steps did not help in 12)


@dataclass(frozen=True)
class FlickrConfig:
    """FLICKR-AES (§4.1) or its synthetic stand-in."""

    synthetic: bool = True  # True: write and use the synthetic fixture; False: the real dataset under <data_dir>/FLICKR-AES
    n_workers: int = 24
    n_images: int = 400
    image_size: int = 64
    # 10 workers per image (real FLICKR-AES: 5) so each synthetic worker rates ~170 images (real: ~900): fewer and
    # the smoke verifier's test AUC swings by +-0.05 between seeds
    ratings_per_image: int = 10
    like_threshold: int = 4
    n_test: int = 10
    n_val: int = 10
    n_holdout_workers: int = 37


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding prior samples into images with SD-1.5 + IP-Adapter (§4.2-4.3, App G.3, App M)."""

    n_per_user: int = 25
    n_users: int = 0  # 0 = every trained (non-hold-out) user
    steps: int = 50  # decoder denoising steps
    decoder_cfg: float = 5.0
    height: int = 512
    width: int = 512
    dtype: str = "auto"  # fp16 on CUDA (paper); "fp32" = the reference code
    ip_adapter_scale: float = 1.0
    prompt: str = ""  # empty system prompt (§4.3)
    negative_prompt: str = ""
    rating: int = 1  # R = 1: sample what the user likes (§4.2)
    prior_cfg_scales: tuple[float, ...] = (3.0, 5.0, 7.0, 9.0)
    seed_base: int = 42  # decoder seed(u, j) = seed_base + 10,000 u + j (App G.3)
    batch_size: int = 8  # images per pipeline call
    grid_users: int = 12  # App M: users 1-12 x 10 images at prior CFG 5, 7, 9
    grid_images: int = 10
    grid_cfg_scales: tuple[float, ...] = (5.0, 7.0, 9.0)


@dataclass(frozen=True)
class VerifierConfig:
    """Neural Matrix Factorization verifier (§4.3.2, App H) on frozen verifier-space (bigG) embeddings."""

    factor_dim: int = 64  # user factor / projected image factor width (GMF branch)
    mlp_dims: tuple[int, ...] = (256, 128, 64)  # MLP branch on [user, projected image]
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024
    max_epochs: int = 50
    patience: int = 5
    user_weighting: str = "none"  # "none": plain BCE (paper); "inverse_frequency": the reference code
    n_bootstrap: int = 1000


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (§4.4, §4.5, App I-K): retrieval metrics, aesthetics, permutation tests."""

    ks: tuple[int, ...] = (1, 5)
    min_likes: int = 1  # users with fewer held-out likes are dropped (the reference code used 3, silently)
    pr_definition: str = "paper"  # or "reference", "reference_exact" (the printed Table 2; README)
    n_permutations: int = 1000
    n_bootstrap: int = 1000
    hps_version: str = "v2.0"  # or "v2.1"
    hps_prompt: str = "Realistic image, finely detailed, with balanced composition and harmonious elements."
    batch_size: int = 32


@dataclass(frozen=True)
class LoraBaselineConfig:
    """LoRA baselines (App G.1-G.2): the shared adapter's Table 4 and the recipe of both; defaults are the paper's."""

    table3: str = "paper"  # "reference": r = α = 32 for N > 120, as the reference code
    shared_r: int = 512  # Table 4 (App G.2)
    shared_alpha: int = 512
    shared_dropout: float = 0.05
    shared_steps: int = 10_000  # the reference evaluates its step-12,000 checkpoint
    shared_warmup: int = 1_000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    lr_scheduler: str = "cosine"  # with the table's warmup (diffusers.optimization.get_scheduler)
    batch_size: int = 1
    grad_accum: int = 4  # the reference's effective batch of 4; steps count optimiser steps
    max_grad_norm: float = 1.0
    resolution: int = 0  # resize + random crop side; 0 = the decoder's generation size (512 in paper)
    caption: str = "empty"  # "empty" (§4.3's fixed empty prompt), "user_token" (reference "<u{id}> ..."), "llava"
    mixed_precision: str = "auto"  # fp16 autocast with fp32 LoRA weights on CUDA; fp32 elsewhere
    gradient_checkpointing: bool = False  # CUDA only: trades compute for memory at 512²
    max_steps: int = 0  # > 0 caps every per-user adapter's steps (warmup scaled alike): quick looks, smoke
    shared_max_steps: int = 0  # the same cap for the shared adapter
    checkpoint_every: int = 500  # every adapter (per-user and shared): optimiser steps between resumable checkpoints
    num_workers: int = 2  # DataLoader workers decoding training images from disk (the data is streamed, never held)
    # the LoRA rows' decoder prompt: "" is the paper's empty prompt (with the empty negative prompt both CFG branches
    # are equal, so the rows are unguided at decoder CFG 5; README deviations); a fixed text, e.g. eval.hps_prompt,
    # gives every user's adapter the same guided prompt
    generation_prompt: str = ""
    n_users: int = 0  # per-user adapters for the first n users (0 = every non-hold-out user)


@dataclass(frozen=True)
class VlmConfig:
    """VLM baselines (§4.3.1, App F, G.3): LLaVA tagging, user personas (Algorithm 1), their prompts."""

    max_new_tokens: int = 192
    batch_size: int = 16  # images per generate() call, left-padded
    dtype: str = "auto"  # bf16 on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere
    constrained: bool = False  # True: decoding constrained to the App F schema (every reply parses)
    chunk_size: int = 256  # images per resumable tag chunk
    keywords: str = "paper"  # all training-split ratings, R = 1 vs 0; "reference": first 20 likes / dislikes, no 3s
    top_k: int = 12  # keywords per side (positive, negative)
    min_count: int = 2  # a keyword must appear in at least this many of the user's liked (disliked) images
    reference_limit: int = 20  # the reference's first-N likes and dislikes (keywords="reference")
    min_positives: int = 1  # fewer positive keywords: the Table 5 fallback subject (Algorithm 1: "P is empty")
    negative: str = "fixed"  # "fixed": Table 5's negative prompt (§4.3.1); "user": the user's negative keywords
    summarise: bool = False  # True: LLaVA writes the persona text (text only), deterministic text as fallback
    n_users: int = 0  # persona users: the first n non-hold-out users (0 = generation.n_users, else all)


@dataclass(frozen=True)
class AblationConfig:
    """Ablations (§4.4, App L): the dual-guidance grid (Fig 6) and the prompt levels (Fig 7, L.1)."""

    omegas: tuple[float, ...] = (3.0, 6.0, 9.0, 12.0, 15.0)  # prior ω: the reference's grid (the paper prints none)
    decoder_cfgs: tuple[float, ...] = (1.0, 3.0, 5.0, 7.0, 10.0)
    levels: tuple[int, ...] = (0, 1, 2)  # App L.1's prompt levels
    level_omegas: tuple[float, ...] = (5.0, 7.0, 9.0)  # the reference ran only ω = 7
    n_per_user: int = 10  # App L.1: 10 images per user
    n_users: int = 0  # 0 = generation.n_users (notebook 04's users), else every user the prior was trained on


@dataclass(frozen=True)
class NewUserConfig:
    """New users without retraining (beyond the paper; notebooks 12, 13): user inversion and its baselines."""

    ks: tuple[int, ...] = (1, 5, 10, 20, 50, 0)  # history sizes (training-split ratings); 0 = all of them
    draws: int = 3  # random histories per k (k = all has one)
    steps: int = 200  # Adam steps per fitted row
    lr: float = 5e-2
    batch_size: int = 64  # ratings per step, drawn with replacement
    n_samples: int = 25  # prior samples per (user, method, history): the embedding-space metrics
    n_images: int = 10  # of which decoded: the image-space metrics (§4.4 P@k, verifier score)
    cfg_scale: float = 5.0  # prior guidance ω
    update_l2: float = 1e-3  # updating an existing user: pull l2·‖row − old row‖² towards the old row
    retrain: bool = False  # the upper bound: one more prior training run, with the hold-out workers (smoke: on)
    # choosing inversion's settings on seen users (never the hold-out workers): a share of the seen users, each
    # fitting from k ∈ select_ks of their training ratings, judged on their validation ratings
    select_frac: float = 0.1  # of the seen users (paper: 17 of 173); the rest train the history encoder
    select_ks: tuple[int, ...] = (10, 0)  # a history of k is fitted with the settings of the nearest (0 = all)
    select_lrs: tuple[float, ...] = (5e-2, 1e-2)
    select_gauss: tuple[float, ...] = (0.0, 1.0)  # weights of the Gaussian row prior (0 = off)
    select_samples: int = 8  # prior samples per candidate row for its validation P@1
    # the history encoder (zero-shot): a set encoder trained through the frozen prior on the encoder users
    encoder_steps: int = 1500
    encoder_lr: float = 1e-3
    encoder_batch_users: int = 16
    encoder_regress: float = 1.0  # + regress·‖row − learned row‖²; 0 = the prior's loss alone
    # the feedback loop: rounds of per_round generated images answered by the verifier, each followed by an update
    feedback_rounds: int = 3
    feedback_per_round: int = 4
    feedback_steps: int = 50
    ceiling_factor: int = 10  # 12's ceiling: inversion × this many steps, on training ratings and every rating


@dataclass(frozen=True)
class Profile:
    """A complete run configuration."""

    name: str
    models: ModelsConfig = field(default_factory=ModelsConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dsprites: DSpritesConfig = field(default_factory=DSpritesConfig)
    flickr: FlickrConfig = field(default_factory=FlickrConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    vlm: VlmConfig = field(default_factory=VlmConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    new_users: NewUserConfig = field(default_factory=NewUserConfig)


# the tiny decoder on a CPU: 3 users, 16 steps each, shared 24, no accumulation (a tiny-UNet micro-step is costly)
SMOKE_LORA = LoraBaselineConfig(max_steps=16, shared_max_steps=24, grad_accum=1, checkpoint_every=8, n_users=3)


# the tiny LLaVA has random weights: free-running it writes no JSON, so smoke constrains decoding to the schema;
# 96 new tokens (paper 192): the constraint closes the object in time, in half the CPU time
SMOKE_VLM = VlmConfig(constrained=True, max_new_tokens=96, batch_size=16, chunk_size=64)


# two history sizes and two draws; 40 steps at lr 0.2 a fit (the tiny prior's rows want a larger step: at 0.05 40
# steps barely move them); 2 of 32 samples decoded. The retrained upper bound (one more prior training, ~80 s here)
# stays off, as in paper: the README has its numbers
SMOKE_NEW_USERS = NewUserConfig(ks=(5, 0), draws=2, steps=40, lr=0.2, n_samples=32, n_images=2, select_frac=0.2,
                                select_ks=(5, 0), select_lrs=(0.2,), encoder_steps=300, feedback_rounds=2, retrain=True,
                                feedback_steps=20, ceiling_factor=5)


def _smoke() -> Profile:
    return Profile(
        name="smoke",
        models=ModelsConfig(builder="tiny", decoder_emb_dim=32, verifier_emb_dim=48),
        prior=PriorConfig(emb_dim=32, n_tokens=8, hidden_dim=32, n_heads=4, n_layers=2, n_users=24),
        diffusion=DiffusionConfig(sampler_steps=20),
        train=TrainConfig(lr=1e-3, samples_per_user=300, max_epochs=40, patience=8),
        dsprites=DSpritesConfig(
            n_images=4_000, vae_epochs=4, vae_batch_size=64, samples_per_user=3000, max_epochs=40, patience=40,
            reps=5, ddpm_reps=1, umap_points=1000, fifth_ks=(5, 100, 0), fifth_draws=2,
            fifth_retrain=False,  # ~100 s more here; README has its numbers
        ),
        flickr=FlickrConfig(n_holdout_workers=4),
        generation=GenerationConfig(n_per_user=4, n_users=12, steps=4, height=64, width=64, batch_size=4,
                                    grid_users=4, grid_images=3),
        verifier=VerifierConfig(factor_dim=16, mlp_dims=(32, 16), batch_size=256, max_epochs=60, patience=10),
        eval=EvalConfig(n_permutations=200, n_bootstrap=200, batch_size=8),
        lora=SMOKE_LORA, vlm=SMOKE_VLM,
        ablation=AblationConfig(omegas=(3.0, 9.0), decoder_cfgs=(1.0, 5.0), levels=(0, 2), level_omegas=(3.0, 9.0),
                                n_per_user=2),
        new_users=SMOKE_NEW_USERS,
    )


def _demo() -> Profile:
    return Profile(name="demo", models=ModelsConfig(builder="tiny", decoder_emb_dim=32, verifier_emb_dim=48),
                   prior=PriorConfig(emb_dim=32, n_tokens=8, hidden_dim=32, n_heads=4, n_layers=2, n_users=24),
                   flickr=FlickrConfig(n_holdout_workers=4), lora=SMOKE_LORA, vlm=SMOKE_VLM)


def _paper() -> Profile:
    return Profile(name="paper", flickr=FlickrConfig(synthetic=False, n_workers=210, n_images=40_988))


_BUILDERS = {"smoke": _smoke, "demo": _demo, "paper": _paper}


def _keys(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _keys(v, f"{prefix}{f.name}.")
        elif f.name != "name":
            out.append(prefix + f.name)
    return out


def _coerce(old: Any, new: Any, key: str) -> Any:
    if isinstance(old, tuple) and isinstance(new, list):
        new = tuple(new)
    if isinstance(old, bool) or old is None or new is None:
        return new
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if type(old) is not type(new):
        raise TypeError(f"parameter {key!r} expects {type(old).__name__}, got {new!r}")
    return new


def get_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """Profile `name` with dotted overrides, e.g. {"train.max_epochs": 5}; unknown names raise."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    prof = _BUILDERS[name]()
    for key, value in (overrides or {}).items():
        prof = _set(prof, key, value)
    return prof


def _set(prof: Profile, key: str, value: Any) -> Profile:
    section, _, attr = key.partition(".")
    sub = getattr(prof, section, None) if attr else None
    if sub is None or not dataclasses.is_dataclass(sub) or attr not in {f.name for f in fields(sub)}:
        raise KeyError(f"unknown parameter {key!r}; valid parameters: {', '.join(_keys(prof))}")
    return replace(prof, **{section: replace(sub, **{attr: _coerce(getattr(sub, attr), value, key)})})


def as_dict(prof: Profile) -> dict[str, Any]:
    """Plain nested dict, for manifests."""
    return dataclasses.asdict(prof)
