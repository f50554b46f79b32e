"""LoRA baselines (§4.3.1, App G.1-G.2, Tables 3-4): one training loop for the per-user and the shared adapter.

The frozen decoder (SD-1.5 in paper, the tiny SD-1.5-shaped pipeline in smoke) gets a peft LoRA on the UNet's
attention projections (``unet.add_adapter``, as diffusers' ``train_text_to_image_lora.py``), trained with the
decoder's own objective (ε-prediction MSE, noise from ``DDPMScheduler.from_config`` of the pipeline). The images
stream from disk (``lora_data``: memory does not grow with their number). Every random draw of optimiser step s
(data order, crops, noise, timesteps, VAE samples, LoRA dropout) is seeded by (seed of the adapter, s), so an
adapter depends only on its data, recipe and seed, never on which process, in which order or with how many data
workers it was trained, and a run resumed from a checkpoint continues exactly where it stopped.

Adapters are saved in diffusers' LoRA format with the peft adapter metadata, so ``pipe.load_lora_weights(dir)``
reloads α ≠ r exactly; ``import_peft_lora`` converts the reference code's raw PEFT files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from ..config import LoraBaselineConfig
from .. import jobs as J
from ..io import atomic_dir, atomic_path, write_json
from ..progress import tqdm
from . import lora_data as D
from .lora_recipe import (
    ADAPTER_NAME,
    INFO_NAME,
    LOG_NAME,
    TARGET_MODULES,
    WEIGHTS_NAME,
    LoraSpec,
    step_seed,
)

# ----------------------------------------------------------------------------------------------- LoRA layers


def peft_config(spec: LoraSpec):
    """peft LoraConfig of a spec on the attention projections."""
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights="gaussian",
                      target_modules=list(TARGET_MODULES))


def lora_parameter_count(unet_config: dict, r: int) -> int:
    """Trainable LoRA parameters of rank r on a UNet built from `unet_config` on the meta device (no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        unet.add_adapter(peft_config(LoraSpec(r, r, 0.0, 1, 0)))
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


def _lora_metadata(unet) -> dict:
    md = unet.peft_config[ADAPTER_NAME].to_dict()
    md["target_modules"] = sorted(md["target_modules"])  # a set in peft: JSON needs a list
    return json.loads(json.dumps(md, default=str))


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The training adapter's weights in diffusers' key format (fp32, CPU)."""
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def write_adapter(out_dir: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict, info: dict,
                  log: dict | None = None) -> Path:
    """Write an adapter folder atomically (temp folder + rename): weights with metadata, log, then info."""
    with atomic_dir(out_dir) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, unet_lora_adapter_metadata=metadata,
                                                  weight_name=WEIGHTS_NAME, safe_serialization=True)
        if log is not None:
            write_json(tmp / LOG_NAME, log)
        write_json(tmp / INFO_NAME, info)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    return Path(out_dir)


def adapter_done(out_dir: str | os.PathLike, fp: str) -> bool:
    """True when `out_dir` holds a complete adapter made for fingerprint `fp`."""
    info = Path(out_dir) / INFO_NAME
    try:
        return json.loads(info.read_text()).get("fingerprint") == fp and (Path(out_dir) / WEIGHTS_NAME).is_file()
    except (OSError, json.JSONDecodeError):
        return False


# ----------------------------------------------------------------------------------------------- objective


class CaptionStates:
    """caption -> (1, 77, d) frozen text encoder states, cached for the few distinct captions of a run."""

    def __init__(self, pipe, max_cached: int = 512):
        self.pipe, self.max_cached, self.cache = pipe, max_cached, {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        out = []
        for c in captions:
            if c not in self.cache:
                state = encode_captions(self.pipe, [c])[c]
                if len(self.cache) >= self.max_cached:  # e.g. one LLaVA caption per image: do not hold them all
                    self.cache.clear()
                self.cache[c] = state
            out.append(self.cache[c])
        return torch.cat(out)


def encode_captions(pipe, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """caption -> (1, 77, d) text encoder states (frozen; computed once per distinct caption)."""
    tok = pipe.tokenizer
    out = {}
    with torch.no_grad():
        for c in dict.fromkeys(captions):
            ids = tok([c], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(pipe.text_encoder.device)
            out[c] = pipe.text_encoder(ids)[0]
    return out


def denoising_loss(pipe, noise_scheduler, pixels: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                   amp: bool = False) -> torch.Tensor:
    """The decoder's training objective on a batch: MSE of the UNet's ε (or v) prediction at a random timestep."""
    unet, vae = pipe.unet, pipe.vae
    dev = unet.device
    with torch.no_grad():
        dist = vae.encode(pixels.to(dev, vae.dtype)).latent_dist
        latents = dist.sample(generator=generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(dev, latents.dtype)  # CPU draws: same on any device
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(dev)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"prediction_type={kind!r}: the LoRA objective supports epsilon and v_prediction")
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        pred = unet(noisy, t, text.to(dev, unet.dtype)).sample
    return torch.nn.functional.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------------------------- training


@dataclass
class _Run:
    """One adapter's optimisation state: what a checkpoint saves and a resumed run restores."""

    params: list
    names: list
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    amp: bool
    step: int = 0
    history: list = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0


def _start(unet, spec: LoraSpec, cfg: LoraBaselineConfig, amp: bool) -> _Run:
    """Optimiser, schedule and grad scaler of the training adapter just added to `unet` (fp32 LoRA weights)."""
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 master weights for the LoRA under fp16 autocast
    if cfg.gradient_checkpointing and unet.device.type == "cuda":
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=spec.warmup, num_training_steps=spec.steps)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    return _Run(params, names, opt, sched, scaler, amp)


@dataclass
class _Checkpoints:
    """An adapter's resumable training state: the folder (None: no checkpoints), how often (optimiser steps) and the
    fingerprint a checkpoint must carry to be resumed from."""

    folder: Path | None
    every: int
    fp: str
    keep: int = 2

    def due(self, run: _Run, steps: int) -> bool:
        """A checkpoint after this step (never after the last one: the adapter itself is written then)."""
        return self.folder is not None and run.step % self.every == 0 and run.step < steps

    def save(self, unet, run: _Run, seconds: float) -> None:
        """LoRA weights, optimiser, schedule, scaler and loss history, written atomically; the last `keep` kept."""
        state = {"fingerprint": self.fp, "step": run.step, "history": run.history, "seconds": seconds,
                 "lora": {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if n in run.names},
                 "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler else None}
        with atomic_path(self.folder / f"step-{run.step:06d}.pt") as tmp:
            torch.save(state, tmp)
        for old in sorted(self.folder.glob("step-*.pt"))[:-self.keep]:
            old.unlink(missing_ok=True)

    def latest(self) -> dict | None:
        """The newest whole checkpoint made for this fingerprint, if any."""
        for path in sorted(self.folder.glob("step-*.pt"), reverse=True) if self.folder.is_dir() else []:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - a truncated checkpoint: try the one before
                continue
            if state.get("fingerprint") == self.fp:
                return state
        return None

    def resume(self, unet, run: _Run) -> None:
        """Continue `run` from the latest checkpoint, if any."""
        if self.folder is None:
            return
        J.clear_orphans(self.folder, world_size=1)  # a killed checkpoint write's temp file (this job alone writes here)
        state = self.latest()
        if state is None:
            return
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if n in state["lora"]:
                    p.copy_(state["lora"][n])
        run.opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.step, run.history, run.resumed_from = state["step"], state["history"], state["step"]
        run.seconds = state["seconds"]


def _optimiser_step(pipe, run: _Run, batches, texts: CaptionStates, noise_scheduler, seed: int,
                    cfg: LoraBaselineConfig) -> float:
    """One optimiser step over grad_accum micro-batches; its noise, timesteps, VAE samples and dropout are seeded
    by (seed, step). Returns the loss (mean over the micro-batches)."""
    s = step_seed(seed, run.step)
    g = torch.Generator().manual_seed(s)
    torch.manual_seed(s)  # this step's LoRA dropout masks (the caller forked the global RNG)
    total = 0.0
    for _ in range(cfg.grad_accum):
        pixels, captions = next(batches)
        loss = denoising_loss(pipe, noise_scheduler, pixels, texts(captions), g, run.amp) / cfg.grad_accum
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        total += float(loss.detach())
    if run.scaler:
        run.scaler.unscale_(run.opt)
    torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.scaler.step(run.opt) if run.scaler else run.opt.step()
    if run.scaler:
        run.scaler.update()
    lr = run.sched.get_last_lr()[0]
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    run.history.append({"step": run.step, "loss": total, "lr": lr})
    return total


def _loop(pipe, run: _Run, data: D.LoraImages, spec: LoraSpec, cfg: LoraBaselineConfig, seed: int,
          ckpts: _Checkpoints, num_workers: int, bar) -> None:
    """Optimiser steps from run.step to spec.steps, with a checkpoint whenever one is due."""
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    texts = CaptionStates(pipe)
    batches = iter(D.loader(data, cfg.batch_size, run.step * data.per_step, num_workers))
    t0 = time.perf_counter()
    while run.step < spec.steps:
        loss = _optimiser_step(pipe, run, batches, texts, noise_scheduler, seed, cfg)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if ckpts.due(run, spec.steps):
            ckpts.save(pipe.unet, run, run.seconds + time.perf_counter() - t0)
    run.seconds += time.perf_counter() - t0


def _mixed_precision(pipe, cfg: LoraBaselineConfig) -> bool:
    """fp16 autocast (fp32 LoRA master weights) on CUDA unless lora.mixed_precision says fp32."""
    return pipe.unet.device.type == "cuda" and cfg.mixed_precision in ("auto", "fp16")


@contextlib.contextmanager
def _training_adapter(pipe, spec: LoraSpec, cfg: LoraBaselineConfig, seed: int) -> Iterator:
    """The frozen pipeline's UNet with a new training LoRA, its init and dropout drawn from a global RNG forked and
    seeded by `seed`; afterwards the adapter is deleted and the pipeline is as it was."""
    unet, dev = pipe.unet, pipe.unet.device
    for m in (unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        unet.add_adapter(peft_config(spec), adapter_name=ADAPTER_NAME)
        try:
            yield unet
        finally:
            unet.eval()
            if cfg.gradient_checkpointing and dev.type == "cuda":
                unet.disable_gradient_checkpointing()
            unet.delete_adapters(ADAPTER_NAME)


def train_adapter(pipe, images: Sequence[str | os.PathLike], captions: Sequence[str], spec: LoraSpec,
                  cfg: LoraBaselineConfig, *, seed: int, resolution: int, fp: str = "",
                  checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0, progress: bool = True,
                  desc: str = "steps", position: int = 1, num_workers: int = 0) -> tuple[dict, dict, dict]:
    """Train one LoRA on the image files `images` with their `captions`, streamed from disk by `num_workers`
    DataLoader workers; returns (diffusers state dict, adapter metadata, training log).

    The pipeline is left as it was (the training adapter is deleted). With `checkpoint_dir` and `checkpoint_every`,
    the LoRA, optimiser, schedule and loss history are saved every `checkpoint_every` steps and a rerun with the
    same fingerprint `fp` resumes from the latest one."""
    D.check_images(images)  # a missing file is named now, not hours into the run
    per_step = cfg.batch_size * cfg.grad_accum
    data = D.LoraImages(images, captions, resolution, seed, per_step, spec.steps * per_step)
    amp = _mixed_precision(pipe, cfg)
    folder = Path(checkpoint_dir) if checkpoint_dir and checkpoint_every > 0 else None
    ckpts = _Checkpoints(folder, checkpoint_every, fp)
    with _training_adapter(pipe, spec, cfg, seed) as unet:
        run = _start(unet, spec, cfg, amp)
        ckpts.resume(unet, run)
        unet.train()  # the LoRA dropout of training; the frozen weights have no dropout of their own
        with tqdm(total=spec.steps, initial=run.step, desc=desc, unit="step", leave=False, disable=not progress,
                  position=position) as bar:
            _loop(pipe, run, data, spec, cfg, seed, ckpts, num_workers, bar)
        state_dict, metadata = lora_state_dict(unet), _lora_metadata(unet)
    log = {"spec": dataclasses.asdict(spec), "steps": run.step, "resumed_from": run.resumed_from,
           "seconds": run.seconds, "steps_per_s": run.step / max(run.seconds, 1e-9),
           "n_images": len(data.paths), "device": str(pipe.unet.device), "mixed_precision": "fp16" if amp else "fp32",
           "num_workers": num_workers, "history": run.history}
    return state_dict, metadata, log


# ----------------------------------------------------------------------------------------------- reference import


def _peft_key(key: str) -> str | None:
    """Raw peft key -> bare module key ('...to_q.lora_A.weight'), or None for non-LoRA entries."""
    for prefix in ("base_model.model.", "unet."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in ("lora_A", "lora_B"):
            tail = parts[i + 1:]
            if tail[-1] != "weight":
                return None
            return ".".join(parts[:i + 1] + ["weight"])  # drops an adapter name between lora_X and weight
    return None


def import_peft_lora(path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                     lora_alpha: float | None = None) -> Path:
    """Convert a raw-PEFT LoRA file (the reference code's format, which load_lora_weights ignores) into an adapter
    folder that `pipe.load_lora_weights` loads; α from `lora_alpha`, else adapter_config.json beside it, else r."""

    src = Path(path)
    if src.is_dir():
        found = [src / n for n in ("adapter_model.safetensors", "adapter_model.bin", WEIGHTS_NAME) if (src / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{src}: no adapter_model.safetensors / adapter_model.bin in this folder")
        src = found[0]
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such LoRA file")
    if src.suffix == ".safetensors":

        raw = load_file(str(src))
    else:
        raw = torch.load(src, map_location="cpu", weights_only=True)
    peft_sd = {k2: v for k, v in raw.items() if (k2 := _peft_key(k)) is not None}
    if not peft_sd:
        raise ValueError(f"{src}: no LoRA weights (keys '...lora_A[.<adapter>].weight') found")
    conf_path = src.parent / "adapter_config.json"
    conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    r = int(next(v.shape[0] for k, v in peft_sd.items() if k.endswith("lora_A.weight")))
    alpha = lora_alpha if lora_alpha is not None else conf.get("lora_alpha", r)
    modules = {k.rsplit(".lora_", 1)[0] for k in peft_sd}
    targets = sorted({"to_out.0" if m.endswith("to_out.0") else m.rsplit(".", 1)[-1] for m in modules})
    metadata = {"r": r, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": conf.get("lora_dropout", 0.0),
                "rank_pattern": conf.get("rank_pattern", {}), "alpha_pattern": conf.get("alpha_pattern", {}),
                "use_dora": conf.get("use_dora", False), "bias": "none", "init_lora_weights": True}
    state = {k: v.float() for k, v in convert_state_dict_to_diffusers(peft_sd).items()}
    out = Path(out_dir) if out_dir else src.parent / f"{src.parent.name}_diffusers"
    info = {"fingerprint": hashlib.sha256(src.read_bytes()).hexdigest()[:32], "imported_from": str(src),
            "r": r, "alpha": alpha, "tensors": len(state)}
    return write_adapter(out, state, metadata, info)
