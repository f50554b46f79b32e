"""LoRA baselines (§4.3.1, App G.1-G.2, Tables 3-4): one training loop for the per-user and the shared adapter.

The frozen decoder (SD-1.5 in paper, the tiny SD-1.5-shaped pipeline in smoke) gets a peft LoRA on the UNet's
attention projections (``unet.add_adapter``, as diffusers' ``train_text_to_image_lora.py``), trained with the
decoder's own objective (ε-prediction MSE, noise from ``DDPMScheduler.from_config`` of the pipeline). Every random
draw of optimiser step s (data order, crops, noise, timesteps, VAE samples, LoRA dropout) is seeded by
(seed of the adapter, s), so an adapter depends only on its data, recipe and seed, never on which process or in
which order it was trained, and a run resumed from a checkpoint continues exactly where it stopped.

Adapters are saved in diffusers' LoRA format with the peft adapter metadata, so ``pipe.load_lora_weights(dir)``
reloads α ≠ r exactly; ``import_peft_lora`` converts the reference code's raw PEFT files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from ..config import LoraBaselineConfig
from ..io import atomic_path, write_json
from ..progress import tqdm
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

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, unet_lora_adapter_metadata=metadata,
                                                  weight_name=WEIGHTS_NAME, safe_serialization=True)
        if log is not None:
            write_json(tmp / LOG_NAME, log)
        write_json(tmp / INFO_NAME, info)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():  # a directory rename cannot replace a non-empty one: move the old one aside first
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def adapter_done(out_dir: str | os.PathLike, fp: str) -> bool:
    """True when `out_dir` holds a complete adapter made for fingerprint `fp`."""
    info = Path(out_dir) / INFO_NAME
    try:
        return json.loads(info.read_text()).get("fingerprint") == fp and (Path(out_dir) / WEIGHTS_NAME).is_file()
    except (OSError, json.JSONDecodeError):
        return False


# ----------------------------------------------------------------------------------------------- objective


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


def crop_batch(images: list[torch.Tensor], idx: list[int], res: int, g: torch.Generator) -> torch.Tensor:
    """Random crops of side `res` of images[idx], one generator for the whole batch."""
    out = []
    for i in idx:
        img = images[i]
        top = int(torch.randint(0, img.shape[1] - res + 1, (1,), generator=g))
        left = int(torch.randint(0, img.shape[2] - res + 1, (1,), generator=g))
        out.append(img[:, top:top + res, left:left + res].float() / 127.5 - 1.0)
    return torch.stack(out)


class _Order:
    """Sample k of training: an epoch-wise permutation seeded by (seed, epoch), so it needs no saved state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.perms = n, seed, {}

    def __getitem__(self, k: int) -> int:
        e = k // self.n
        if e not in self.perms:
            self.perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(step_seed(self.seed, -1 - e)))}
        return int(self.perms[e][k % self.n])


# ----------------------------------------------------------------------------------------------- training


def _latest_checkpoint(folder: Path | None, fp: str) -> dict | None:
    for path in sorted(folder.glob("step-*.pt"), reverse=True) if folder and folder.is_dir() else []:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a truncated checkpoint: try the one before
            continue
        if state.get("fingerprint") == fp:
            return state
    return None


def _save_checkpoint(folder: Path, state: dict, keep: int = 2) -> None:
    with atomic_path(folder / f"step-{state['step']:06d}.pt") as tmp:
        torch.save(state, tmp)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def train_adapter(pipe, images: list[torch.Tensor], captions: Sequence[str], spec: LoraSpec, cfg: LoraBaselineConfig,
                  *, seed: int, resolution: int, fp: str = "", checkpoint_dir: str | os.PathLike | None = None,
                  checkpoint_every: int = 0, progress: bool = True, desc: str = "steps", position: int = 1
                  ) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Train one LoRA on (images[i], captions[i]); returns (diffusers state dict, adapter metadata, training log).

    The pipeline is left as it was (the training adapter is deleted). With `checkpoint_dir` and `checkpoint_every`,
    the LoRA, optimiser, schedule and loss history are saved every `checkpoint_every` steps and a rerun with the
    same fingerprint `fp` resumes from the latest one."""

    if len(images) != len(captions) or not images:
        raise ValueError(f"train_adapter: {len(images)} images and {len(captions)} captions (need as many, >= 1)")
    unet = pipe.unet
    dev = unet.device
    amp = dev.type == "cuda" and cfg.mixed_precision in ("auto", "fp16")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    text = encode_captions(pipe, captions)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    for m in (unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    cuda_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # dropout and LoRA init draw from the global RNG
        torch.manual_seed(seed)
        unet.add_adapter(peft_config(spec), adapter_name=ADAPTER_NAME)
        try:
            params = [p for p in unet.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()  # fp32 master weights for the LoRA under fp16 autocast
            if cfg.gradient_checkpointing and dev.type == "cuda":
                unet.enable_gradient_checkpointing()
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=spec.warmup, num_training_steps=spec.steps)
            scaler = torch.amp.GradScaler("cuda") if amp else None
            names = [n for n, p in unet.named_parameters() if p.requires_grad]
            step, history, resumed_from, seconds = 0, [], None, 0.0
            state = _latest_checkpoint(ckpt_dir, fp) if checkpoint_every > 0 else None
            if state is not None:
                with torch.no_grad():
                    for n, p in unet.named_parameters():
                        if n in state["lora"]:
                            p.copy_(state["lora"][n])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                step, history, resumed_from, seconds = state["step"], state["history"], state["step"], state["seconds"]
            order = _Order(len(images), seed)
            bs, accum = cfg.batch_size, cfg.grad_accum
            unet.train()
            bar = tqdm(total=spec.steps, initial=step, desc=desc, unit="step", leave=False, disable=not progress,
                       position=position)
            t0 = time.perf_counter()
            while step < spec.steps:
                s = step_seed(seed, step)
                g = torch.Generator().manual_seed(s)
                torch.manual_seed(s)  # this step's LoRA dropout masks
                total = 0.0
                for micro in range(accum):
                    idx = [order[(step * accum + micro) * bs + b] for b in range(bs)]
                    pixels = crop_batch(images, idx, resolution, g)
                    emb = torch.cat([text[captions[i]] for i in idx])
                    loss = denoising_loss(pipe, noise_scheduler, pixels, emb, g, amp) / accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    total += float(loss.detach())
                if scaler:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(opt) if scaler else opt.step()
                if scaler:
                    scaler.update()
                lr = sched.get_last_lr()[0]
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                history.append({"step": step, "loss": total, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
                if ckpt_dir is not None and checkpoint_every > 0 and step % checkpoint_every == 0 and step < spec.steps:
                    elapsed = seconds + time.perf_counter() - t0
                    _save_checkpoint(ckpt_dir, {
                        "fingerprint": fp, "step": step, "history": history, "seconds": elapsed,
                        "lora": {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if n in names},
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict() if scaler else None})
            bar.close()
            seconds += time.perf_counter() - t0
            state_dict, metadata = lora_state_dict(unet), _lora_metadata(unet)
        finally:
            unet.eval()
            if cfg.gradient_checkpointing and dev.type == "cuda":
                unet.disable_gradient_checkpointing()
            unet.delete_adapters(ADAPTER_NAME)
    log = {"spec": dataclasses.asdict(spec), "steps": step, "resumed_from": resumed_from, "seconds": seconds,
           "steps_per_s": step / max(seconds, 1e-9),
           "n_images": len(images), "device": str(dev), "mixed_precision": "fp16" if amp else "fp32",
           "history": history}
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
