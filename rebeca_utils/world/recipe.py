"""The smoke world's recipe: how each tiny stand-in is trained on the synthetic FLICKR-AES images (never its ratings).

Every trainer builds the component with the kit's own builder at random weights (the same class the paper loads),
trains it with an honest objective (its numbers: RECIPE in models/tiny_weights.py, which the world's key hashes)
and saves it in the format that builder loads:

* decoder-space image encoder (transformers ``CLIPVisionModelWithProjection``, the IP-Adapter's ViT-H/14 stand-in)
  and verifier-space encoder (open_clip tiny ViT, the bigG stand-in: another architecture, width and seed): CLIP's
  contrastive loss against a tiny text tower on captions of the planted attributes, flips/turns as augmentation;
* VAE (``AutoencoderKL``): reconstruction of random crops; ``scaling_factor`` = 1/std of its trained latents;
* UNet + IP-Adapter: IP-Adapter's own objective, epsilon-prediction on the VAE latents conditioned on the image's
  own decoder-space embedding, empty prompt, the image condition zeroed ``p_drop`` of the time (decoder CFG), offset
  noise (on 8x8 latents SD's schedule leaves colour in the noisiest step; without it colour comes from the noise).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)

from ..config import ModelsConfig
from ..data.flickr import IMAGE_DIR
from ..data.synthetic import ATTRIBUTES, HUES, hue_class, synthetic_truth
from ..io import read_rgb, save_safetensors
from ..models.architectures import tiny_text_config, tiny_unet_config
from ..models.decoder import tiny_sd_components, write_tiny_ip_adapter
from ..models.encoders import VERIFIER_WEIGHTS, build_clip, build_image_encoder, build_tokenizer
from ..models.tiny_weights import RECIPE
from ..models.weights import load_pretrained
from ..runtime import seeded

TEXTURE_WORDS = {"stripes": "striped", "dots": "dotted", "plain": "plain"}


def steps(name: str) -> int:
    """Optimiser steps of component `name` (the progress bar's share)."""
    return RECIPE["encoder" if name.endswith("_encoder") else name]["steps"]


def caption(attrs: dict[str, str]) -> str:
    """The caption of an image's planted attributes, e.g. 'a red striped picture with the object in the corner'."""
    return f"a {attrs['hue']} {TEXTURE_WORDS[attrs['texture']]} picture with the object in the {attrs['layout']}"


def all_captions() -> list[str]:
    """The 24 captions (hue x texture x layout), in a fixed order."""
    return [caption({"hue": h, "texture": t, "layout": lay})
            for h in ATTRIBUTES["hue"] for t in ATTRIBUTES["texture"] for lay in ATTRIBUTES["layout"]]


def load_images(root: Path, names: Sequence[str]) -> np.ndarray:
    """(N, H, W, 3) uint8 fixture images."""
    return read_rgb(root / IMAGE_DIR / n for n in names)


def dihedral(x: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Dihedral transform k (0-7: k % 4 quarter turns, then a flip if k >= 4) of (B, C, H, W), per sample."""
    if isinstance(k, int):
        y = torch.rot90(x, k % 4, (-2, -1))
        return torch.flip(y, (-1,)) if k >= 4 else y
    out = torch.empty_like(x)
    for v in range(8):
        sel = (k == v).nonzero().flatten()
        if len(sel):
            out[sel] = dihedral(x[sel], v)
    return out


def _lr_at(step: int, n: int, lr: float, warmup: int) -> float:
    # linear warm-up, cosine decay to 10 %: short runs need the high early rate and a calm end
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + np.cos(np.pi * (step - warmup) / max(1, n - warmup))))


def _loop(params, cfg: dict, loss_at: Callable[[int], torch.Tensor], bar, weight_decay: float) -> list[float]:
    """AdamW over `params` for cfg['steps'] steps of loss_at(step), the recipe's schedule; returns the losses."""
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=weight_decay)
    losses = []
    for step in range(cfg["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
    return losses


def _summary(losses: list[float]) -> dict[str, float]:
    return {"first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-20:]))}


# ----------------------------------------------------------------------------------------------- encoders


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor):
    """CLIP's symmetric loss with the batch's captions deduplicated: images -> the 24 captions, and each caption
    present -> the images carrying it (uniform over them), since many images of a batch share one caption."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, 24)
    present = labels.unique()
    target = (labels[None, :] == present[:, None]).float()
    t2i = -(target / target.sum(1, keepdim=True) * logits[:, present].T.log_softmax(-1)).sum(1).mean()
    return (F.cross_entropy(logits, labels) + t2i) / 2


def _labels(root: Path, names: Sequence[str]) -> torch.Tensor:
    truth = synthetic_truth(root)["attributes"]
    index = {c: i for i, c in enumerate(all_captions())}
    return torch.tensor([index[caption(truth[n])] for n in names])


def _train_contrastive(encode_image, encode_text, params, logit_scale, pixels, labels, bar, gen) -> list[float]:
    cfg = RECIPE["encoder"]

    def loss_at(step):
        idx = torch.randint(0, len(pixels), (cfg["batch"],), generator=gen)
        x = dihedral(pixels[idx], torch.randint(0, 8, (len(idx),), generator=gen))
        return contrastive_loss(encode_image(x), encode_text(), labels[idx], logit_scale)
    return _loop(params, cfg, loss_at, bar, cfg["weight_decay"])


def _without_token_table(model) -> list:
    # the 49408-word token table stays at its seeded init: 24 captions use a few dozen rows, and AdamW over 1.6 M
    # untouched weights would be most of a step's cost
    return [p for n, p in model.named_parameters() if "token_embedding" not in n]


def probe_accuracy(train_emb, train_names, test_emb, test_names, root) -> dict[str, float]:
    """Held-out accuracy of a logistic-regression probe per planted attribute (how well a space separates them)."""
    from sklearn.linear_model import LogisticRegression  # only the report

    truth = synthetic_truth(root)["attributes"]
    out = {}
    for attr in ATTRIBUTES:
        ytr = [truth[n][attr] for n in train_names]
        yte = np.array([truth[n][attr] for n in test_names])
        clf = LogisticRegression(max_iter=2000).fit(F.normalize(train_emb, dim=-1).numpy(), ytr)
        out[attr] = float(np.mean(clf.predict(F.normalize(test_emb, dim=-1).numpy()) == yte))
    return out


def train_decoder_encoder(rnd: ModelsConfig, root: Path, train, held, out: Path, bar, gen, world: Path) -> dict:
    """The IP-Adapter image-encoder stand-in, contrastive against a tiny text tower; save_pretrained."""
    encoder, processor = build_image_encoder(rnd)
    encoder.train().requires_grad_(True)
    with seeded(rnd.seed + 1):
        text = CLIPTextModelWithProjection(CLIPTextConfig(**{**tiny_text_config(),
                                                             "projection_dim": rnd.decoder_emb_dim}))
    tok = build_tokenizer()(all_captions(), padding="max_length", max_length=24, truncation=True,
                            return_tensors="pt")
    logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    pixels = processor(images=list(load_images(root, train)), return_tensors="pt").pixel_values
    losses = _train_contrastive(lambda x: encoder(pixel_values=x).image_embeds,
                                lambda: text(input_ids=tok.input_ids, attention_mask=tok.attention_mask).text_embeds,
                                [*encoder.parameters(), *_without_token_table(text), logit_scale], logit_scale,
                                pixels, _labels(root, train), bar, gen)
    encoder.eval()
    with torch.no_grad():
        emb_tr = encoder(pixel_values=pixels).image_embeds
        held_px = processor(images=list(load_images(root, held)), return_tensors="pt").pixel_values
        emb_te = encoder(pixel_values=held_px).image_embeds
    encoder.save_pretrained(out)
    return {**_summary(losses), "probe_heldout": probe_accuracy(emb_tr, train, emb_te, held, root)}


def train_verifier_encoder(rnd: ModelsConfig, root: Path, train, held, out: Path, bar, gen, world: Path) -> dict:
    """The bigG stand-in (open_clip), contrastive against its own text tower; an open_clip safetensors file."""
    model, preprocess, tokenizer = build_clip(rnd, "verifier")
    model.train().requires_grad_(True)
    tokens = tokenizer(all_captions())
    pixels = torch.stack([preprocess(Image.fromarray(a)) for a in load_images(root, train)])
    losses = _train_contrastive(model.encode_image, lambda: model.encode_text(tokens), _without_token_table(model),
                                model.logit_scale, pixels, _labels(root, train), bar, gen)
    model.eval()
    with torch.no_grad():
        emb_tr = model.encode_image(pixels)
        emb_te = model.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in load_images(root, held)]))
    save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / VERIFIER_WEIGHTS)
    return {**_summary(losses), "probe_heldout": probe_accuracy(emb_tr, train, emb_te, held, root)}


# ----------------------------------------------------------------------------------------------- VAE


def to_unit(imgs: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as diffusers' VaeImageProcessor."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def _encode_means(vae, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])


def train_vae(rnd: ModelsConfig, root: Path, train, held, out: Path, bar, gen, world: Path) -> dict:
    """The tiny AutoencoderKL as an autoencoder (MSE + a tiny KL); scaling_factor = 1/std of its latents."""
    vae = tiny_sd_components(rnd, None)["vae"]
    vae.train().requires_grad_(True)
    cfg = RECIPE["vae"]
    x_all = to_unit(load_images(root, train))

    def loss_at(step):
        idx = torch.randint(0, len(x_all), (cfg["batch"],), generator=gen)
        x = dihedral(x_all[idx], torch.randint(0, 8, (len(idx),), generator=gen))
        i, j = torch.randint(0, x.shape[-1] - cfg["crop"] + 1, (2,), generator=gen).tolist()
        x = x[:, :, i:i + cfg["crop"], j:j + cfg["crop"]]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, x) + cfg["kl"] * post.kl().mean()
    losses = _loop(vae.parameters(), cfg, loss_at, bar, 0.0)
    vae.eval()
    with torch.no_grad():
        std = float(_encode_means(vae, x_all).std())
        x_te = to_unit(load_images(root, held))
        rec = torch.cat([vae.decode(_encode_means(vae, x_te[i:i + 64])).sample for i in range(0, len(x_te), 64)])
        rec01 = ((rec + 1) / 2).clamp(0, 1)
        mse01 = float(F.mse_loss(rec01, (x_te + 1) / 2))
    truth = synthetic_truth(root)["attributes"]
    hue = np.array([list(HUES).index(truth[n]["hue"]) for n in held])
    hue_ok = float(np.mean(hue_class(rec01.permute(0, 2, 3, 1).numpy()) == hue))  # colour survives encode/decode
    vae.register_to_config(scaling_factor=1.0 / std)  # unit-variance latents for the UNet's noise schedule
    vae.save_pretrained(out)
    return {**_summary(losses), "latent_std": std, "scaling_factor": 1.0 / std, "heldout_mse_01": mse01,
            "heldout_hue_agreement": hue_ok}


# ----------------------------------------------------------------------------------------------- UNet + IP-Adapter


def ip_adapter_state(unet) -> dict:
    """A loaded IP-Adapter's weights in the original ip-adapter_sd15.bin layout (the inverse of load_ip_adapter)."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    image_proj = {"proj.weight": proj.image_embeds.weight, "proj.bias": proj.image_embeds.bias,
                  "norm.weight": proj.norm.weight, "norm.bias": proj.norm.bias}
    ip = {}
    for i, (name, proc) in enumerate(unet.attn_processors.items()):  # indices as the original's ModuleList
        if name.endswith("attn2.processor"):
            ip[f"{i}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            ip[f"{i}.to_v_ip.weight"] = proc.to_v_ip[0].weight

    def detach(d):
        return {k: v.detach().float().cpu().clone().contiguous() for k, v in d.items()}
    return {"image_proj": detach(image_proj), "ip_adapter": detach(ip)}


def base_unet_state(unet) -> dict:
    """The UNet's own weights without the IP-Adapter's (image projection, attention processors)."""
    return {k: v for k, v in unet.state_dict().items()
            if ".processor." not in k and not k.startswith("encoder_hid_proj")}


def _training_pairs(root: Path, train, world: Path, processor, variants: int):
    """(V, N, 4, 8, 8) scaled VAE latents and (V, N, d) decoder-space embeddings of each dihedral variant."""
    vae = load_pretrained(AutoencoderKL, world / "vae").eval().requires_grad_(False)
    encoder = load_pretrained(CLIPVisionModelWithProjection, world / "decoder_encoder").eval().requires_grad_(False)
    imgs = load_images(root, train)
    x_all, px_all = to_unit(imgs), processor(images=list(imgs), return_tensors="pt").pixel_values
    lats, embs = [], []
    with torch.no_grad():  # each variant's latents and its own embedding, once
        for v in range(variants):
            lats.append(_encode_means(vae, dihedral(x_all, v)) * vae.config.scaling_factor)
            embs.append(encoder(pixel_values=dihedral(px_all, v)).image_embeds)
    return torch.stack(lats), torch.stack(embs), vae


def train_decoder(rnd: ModelsConfig, root: Path, train, held, out: Path, bar, gen, world: Path) -> dict:
    """UNet + IP-Adapter with IP-Adapter's objective; saves unet/, text_encoder/ and models/ip-adapter_sd15.bin."""
    cfg = RECIPE["decoder"]
    comps = tiny_sd_components(rnd, None)
    _, processor = build_image_encoder(rnd)
    lats, embs, vae = _training_pairs(root, train, world, processor, cfg["variants"])
    tok = comps["tokenizer"]
    with torch.no_grad():  # the empty prompt, as at inference
        ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        context = comps["text_encoder"](ids)[0]
    pipe = StableDiffusionPipeline(**{**comps, "vae": vae})
    init = write_tiny_ip_adapter(rnd, pipe.unet)  # IP-Adapter's init: to_k_ip / to_v_ip = to_k / to_v
    pipe.load_ip_adapter(str(init), subfolder=rnd.ip_adapter_subfolder, weight_name=rnd.ip_adapter_weight,
                         image_encoder_folder=None, local_files_only=True)
    unet = pipe.unet.train().requires_grad_(True)
    sched = DDPMScheduler.from_config(comps["scheduler"].config)

    def loss_at(step):
        b = cfg["batch"]
        idx = torch.randint(0, lats.shape[1], (b,), generator=gen)
        var = torch.randint(0, cfg["variants"], (b,), generator=gen)
        z0, emb = lats[var, idx], embs[var, idx]
        emb = emb * (torch.rand(b, generator=gen) >= cfg["p_drop"]).float()[:, None]  # zeros: the CFG negative
        noise = torch.randn(z0.shape, generator=gen)
        noise = noise + cfg["offset_noise"] * torch.randn(b, z0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=context.expand(b, -1, -1),
                    added_cond_kwargs={"image_embeds": [emb[:, None, :]]}).sample
        return F.mse_loss(pred, noise)
    losses = _loop(unet.parameters(), cfg, loss_at, bar, 0.01)
    with seeded(rnd.seed):
        clean = UNet2DConditionModel(**tiny_unet_config())
    clean.load_state_dict(base_unet_state(unet), strict=True)
    clean.save_pretrained(out / "unet")
    comps["text_encoder"].save_pretrained(out / "text_encoder")
    path = out / rnd.ip_adapter_subfolder / rnd.ip_adapter_weight
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(ip_adapter_state(unet), buf)  # the original checkpoint's format, which load_ip_adapter reads
    path.write_bytes(buf.getvalue())
    return _summary(losses)


TRAINERS = {"decoder_encoder": train_decoder_encoder, "verifier_encoder": train_verifier_encoder,
            "vae": train_vae, "decoder": train_decoder}  # in models/tiny_weights.py's COMPONENTS order
