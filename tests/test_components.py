"""Tiny offline components are seeded, paper-shaped and loaded through the paper's calls; hub builders fail fast."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: these tests never reach the network

import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from rebeca_utils.config import ModelsConfig, get_profile
from rebeca_utils.models import architectures as ARCH
from rebeca_utils.models import decoder as DEC
from rebeca_utils.models import encoders as ENC
from rebeca_utils.models import weights as W
from rebeca_utils.rehearse_hub import snapshot  # the Hub cache's layout, as the rehearsal writes it

TINY = get_profile("smoke").models
RANDOM = replace(TINY, tiny_weights="random")  # the seeded random stand-ins (TINY loads the smoke world)
HUB = ModelsConfig()


pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread


@pytest.fixture(scope="module")
def tiny_pipe(kit_cache):
    pipe = DEC.build_sd_pipeline(TINY, cache_dir=kit_cache)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _image(size=48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------- tiny builders


def test_tiny_builders_are_seeded_and_deterministic(kit_cache):
    rng_before = torch.random.get_rng_state()
    for role in ENC.CLIP_ROLES:
        assert _same(ENC.build_clip(TINY, role)[0], ENC.build_clip(TINY, role)[0])
    assert _same(ENC.build_image_encoder(TINY)[0], ENC.build_image_encoder(TINY)[0])
    a = DEC.build_sd_pipeline(TINY, cache_dir=kit_cache)
    b = DEC.build_sd_pipeline(TINY, cache_dir=kit_cache)
    for name in ("unet", "vae", "text_encoder"):
        assert _same(getattr(a, name), getattr(b, name)), name
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    other = replace(RANDOM, seed=1)  # (another seed of the pretrained stand-ins would train another world)
    assert not _same(ENC.build_clip(RANDOM, "verifier")[0], ENC.build_clip(other, "verifier")[0])
    assert not _same(ENC.build_image_encoder(RANDOM)[0], ENC.build_image_encoder(other)[0])


@pytest.mark.parametrize("role,dim", [("verifier", TINY.verifier_emb_dim), ("aesthetic", ARCH.AESTHETIC_EMB_DIM),
                                      ("decoder", TINY.decoder_emb_dim)])
def test_tiny_open_clip_encodes_to_configured_dim(role, dim):
    model, preprocess, tokenizer = ENC.build_clip(TINY, role)
    with torch.no_grad():
        img = model.encode_image(preprocess(_image()).unsqueeze(0))
        txt = model.encode_text(tokenizer(["a red heart", "a blue square"]))
    assert img.shape == (1, dim) and txt.shape == (2, dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert not model.training


def test_tiny_image_encoder_gives_decoder_space_embeds():
    encoder, processor = ENC.build_image_encoder(TINY)
    pixels = processor(images=[_image(), _image(80)], return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = encoder(pixel_values=pixels)
    assert out.image_embeds.shape == (2, TINY.decoder_emb_dim)
    assert encoder.config.projection_dim == TINY.decoder_emb_dim


def test_tokenizer_matches_open_clip_ids(kit_cache):
    import open_clip

    tok = ENC.build_tokenizer(kit_cache)
    assert len(tok) == 49408 and tok.model_max_length == 77
    for prompt in ["a photo of a cat", "A RED heart, on a white background!", "user 17 likes don't-care 3.5x"]:
        ids = tok(prompt).input_ids
        ref = open_clip.tokenize([prompt])[0].tolist()
        assert ids == ref[: len(ids)] and ids[0] == 49406 and ids[-1] == 49407
    # padded to 77 as StableDiffusionPipeline asks for
    assert tok("a cat", padding="max_length", max_length=77).input_ids[-1] == tok.pad_token_id == 49407


# ----------------------------------------------------------------------------------------------- SD 1.5 + IP-Adapter


def test_tiny_pipeline_is_sd15_shaped(tiny_pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    assert type(tiny_pipe) is StableDiffusionPipeline
    assert isinstance(tiny_pipe.scheduler, DDIMScheduler) and tiny_pipe.safety_checker is None
    assert tiny_pipe.vae_scale_factor == 8  # the trained VAE's scaling_factor: tests/test_world.py
    assert DEC.build_sd_pipeline(RANDOM, ip_adapter=False).vae.config.scaling_factor == 0.18215  # SD-1.5's
    assert tiny_pipe.text_encoder.config.hidden_size == tiny_pipe.unet.config.cross_attention_dim
    assert isinstance(tiny_pipe.unet.encoder_hid_proj, MultiIPAdapterImageProjection)
    n_cross = sum(name.endswith("attn2.processor") for name in tiny_pipe.unet.attn_processors)
    assert n_cross == 16  # as SD-1.5


def test_frozen_components_decode_the_same_image_twice_even_with_lora_dropout(kit_cache):
    from peft import LoraConfig

    pipe = DEC.build_sd_pipeline(TINY, ip_adapter=False, cache_dir=kit_cache)
    assert not any(m.training for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    # dropout 0.5 on every attention projection: in train mode two decodes with one seed would differ
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5, target_modules=["to_q", "to_k", "to_v"]))
    run = lambda: pipe("", num_inference_steps=2, height=64, width=64, output_type="pt",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(run(), run())


def test_tiny_pipeline_generates_with_ip_adapter_embeds(tiny_pipe):
    def run(emb):
        return tiny_pipe("a heart", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                         ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])], output_type="pt",
                         generator=torch.Generator().manual_seed(0)).images

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 1, TINY.decoder_emb_dim, generator=g)
    a, b = run(emb), run(torch.randn(1, 1, TINY.decoder_emb_dim, generator=g))
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, run(emb))  # seeded
    assert not torch.allclose(a, b)  # the image embedding conditions the decoder


def test_tiny_ip_adapter_checkpoint_has_original_layout(tiny_pipe, kit_cache):
    DEC.build_sd_pipeline(RANDOM, cache_dir=kit_cache)  # random weights: IP-Adapter's init is written here
    path = kit_cache / "tiny-ip-adapter" / TINY.ip_adapter_subfolder / TINY.ip_adapter_weight
    state = torch.load(path, weights_only=True)
    cross = tiny_pipe.unet.config.cross_attention_dim
    assert set(state) == {"image_proj", "ip_adapter"}
    assert set(state["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert state["image_proj"]["proj.weight"].shape == (4 * cross, TINY.decoder_emb_dim)
    # the exact key set of h94/IP-Adapter models/ip-adapter_sd15.bin: attn2 processors 1, 3, ..., 31
    assert set(state["ip_adapter"]) == {f"{i}.to_{kv}_ip.weight" for i in range(1, 32, 2) for kv in "kv"}
    # present and valid: not rewritten; corrupted: rewritten
    mtime = path.stat().st_mtime_ns
    folder = DEC.write_tiny_ip_adapter(RANDOM, DEC.tiny_sd_components(RANDOM, kit_cache)["unet"], kit_cache)
    assert folder == kit_cache / "tiny-ip-adapter" and path.stat().st_mtime_ns == mtime
    path.write_bytes(b"truncated")
    DEC.write_tiny_ip_adapter(RANDOM, DEC.tiny_sd_components(RANDOM, kit_cache)["unet"], kit_cache)
    assert set(torch.load(path, weights_only=True)) == {"image_proj", "ip_adapter"}


def test_hub_builders_load_paper_ids_from_cache_offline(hf_cache, kit_cache):
    """Tiny weights stored under the paper's repo ids: the hub code path (from_pretrained, load_ip_adapter) runs."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    models = replace(HUB, decoder_emb_dim=TINY.decoder_emb_dim)
    assert not any(W.weights_in_cache(e) for e in W.paper_weights(models))
    tiny = DEC.build_sd_pipeline(TINY, ip_adapter=False, cache_dir=kit_cache)
    tiny.scheduler = PNDMScheduler.from_config(tiny.scheduler.config)  # SD-1.5 ships PNDM
    sd = snapshot(hf_cache, models.sd_id)
    tiny.save_pretrained(sd)
    for f in ENC.tiny_tokenizer_dir(kit_cache).iterdir():
        shutil.copy(f, sd / "tokenizer" / f.name)
    CLIPImageProcessor().save_pretrained(sd / "feature_extractor")
    index = json.loads((sd / "model_index.json").read_text())  # as the real one: a safety checker we skip
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (sd / "model_index.json").write_text(json.dumps(index))
    ip = snapshot(hf_cache, models.ip_adapter_id)
    src = DEC.write_tiny_ip_adapter(models, tiny.unet, kit_cache) / models.ip_adapter_subfolder
    shutil.copytree(src, ip / models.ip_adapter_subfolder)
    ENC.build_image_encoder(TINY)[0].save_pretrained(ip / models.image_encoder_subfolder)
    assert all(W.weights_in_cache(e) for e in W.paper_weights(models)[:3])

    pipe = DEC.build_sd_pipeline(models)
    assert type(pipe) is StableDiffusionPipeline and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None and _same(pipe.vae, tiny.vae)
    emb = torch.randn(1, 1, models.decoder_emb_dim)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a heart", num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="pt",
               ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])]).images
    assert torch.isfinite(out).all()
    encoder, _ = ENC.build_image_encoder(models)
    assert encoder.config.projection_dim == models.decoder_emb_dim


def test_hub_clip_loads_cached_open_clip_weights_offline(hf_cache, monkeypatch):
    """The hub open_clip path (registry -> cache -> create_model_and_transforms) with a tiny arch as the paper one."""
    import open_clip
    from safetensors.torch import save_file

    tiny, _, _ = ENC.build_clip(TINY, "aesthetic")
    arch = ENC.tiny_clip_name(TINY, "aesthetic")
    pcfg = dict(open_clip.get_pretrained_cfg("ViT-L-14", "openai"), hf_hub="someone/tiny-clip/", url="")
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda a, t: pcfg if a == arch else real(a, t))
    models = replace(HUB, aesthetic_clip=(arch, "openai"))
    with pytest.raises(W.MissingWeightsError, match="someone/tiny-clip"):
        ENC.build_clip(models, "aesthetic")
    repo = snapshot(hf_cache, "someone/tiny-clip")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(repo / "open_clip_model.safetensors"))
    with pytest.raises(W.MissingWeightsError, match="open_clip_config.json"):  # the architecture comes from the repo
        ENC.build_clip(models, "aesthetic")
    (repo / W.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch)}))
    model, preprocess, tokenizer = ENC.build_clip(models, "aesthetic")
    assert _same(model, tiny) and not model.training
    assert model.encode_text(tokenizer(["a cat"])).shape == (1, ARCH.AESTHETIC_EMB_DIM)
    # a checkpoint that does not fit the repo's architecture is one line naming the file
    save_file({"visual.nope": torch.zeros(1)}, str(repo / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match=r"open_clip_model.safetensors: checkpoint does not fit the architecture"):
        ENC.build_clip(models, "aesthetic")


def test_hub_clip_is_made_in_the_target_dtype_and_filled_in_place(tmp_path):
    """open_clip_from_repo + stream_state_dict: the model is made in the dtype asked for (no fp32 copy first) and
    the checkpoint is copied into it tensor by tensor, equal to open_clip's own load."""
    import open_clip
    from safetensors.torch import save_file

    arch = ENC.tiny_clip_name(TINY, "aesthetic")
    ref = open_clip.create_model(arch, pretrained=None)
    (tmp_path / W.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch)}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model, _ = ENC.open_clip_from_repo(tmp_path / W.OPEN_CLIP_CONFIG, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ENC.stream_state_dict(model, tmp_path / "w.safetensors")
    assert all(torch.equal(v, ref.state_dict()[k].to(v.dtype)) for k, v in model.state_dict().items())


def test_vision_only_clip_never_holds_the_text_half_and_embeds_the_same(tmp_path):
    """The verifier space's encoder: made on the meta device, its text half dropped before any memory is given, the
    image half filled from the full checkpoint (safetensors or torch file); encode_image equals the whole model's."""
    import open_clip
    from safetensors.torch import save_file

    arch = ENC.tiny_clip_name(TINY, "verifier")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = open_clip.create_model(arch, pretrained=None).eval()
    (tmp_path / W.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch)}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "w.bin")
    x = torch.randn(2, 3, *ref.visual.image_size, generator=torch.Generator().manual_seed(0))
    for f in ("w.safetensors", "w.bin"):
        model, _ = ENC.open_clip_from_repo(tmp_path / W.OPEN_CLIP_CONFIG, "cpu", vision_only=True)
        assert {k.split(".")[0] for k in model.state_dict()} == {"visual", "logit_scale"}
        with pytest.raises(ValueError, match=f"{f}: checkpoint does not fit the architecture"):
            ENC.stream_state_dict(model, tmp_path / f)  # the text half's keys are unexpected unless skipped
        ENC.stream_state_dict(model, tmp_path / f, skip=ENC.TEXT_PARTS)
        with torch.no_grad():
            assert torch.equal(model.eval().encode_image(x), ref.encode_image(x)), f
    enc = ENC.build_encoder("verifier", TINY)  # the same drop on the tiny builder's path
    assert not hasattr(enc.model, "transformer") and hasattr(enc.model, "visual")


# ----------------------------------------------------------------------------------------------- paper profile


@pytest.mark.parametrize("build,repo", [
    (lambda: DEC.build_sd_pipeline(HUB), HUB.sd_id),
    (lambda: DEC.build_sd_pipeline(replace(HUB, sd_id="nobody/absent")), "nobody/absent"),
    (lambda: ENC.build_image_encoder(HUB), HUB.ip_adapter_id),
    (lambda: ENC.build_clip(HUB, "verifier"), "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
    (lambda: ENC.build_clip(HUB, "aesthetic"), "timm/vit_large_patch14_clip_224.openai"),
    (lambda: ENC.build_clip(HUB, "decoder"), "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
])
def test_paper_builders_fail_fast_offline(hf_cache, build, repo):
    start = time.perf_counter()
    with pytest.raises(W.MissingWeightsError) as err:
        build()
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert repo in msg and "00_setup" in msg and "hf download" in msg and str(hf_cache) in msg
    assert "\n" not in msg


def test_paper_builders_fail_fast_when_hub_unreachable(hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(W.MissingWeightsError, match="unreachable.*h94/IP-Adapter"):
        ENC.build_image_encoder(HUB)


def test_paper_weights_registry():
    entries = W.paper_weights()
    repos = [e.repo_id for e in entries]
    assert repos[:3] == [HUB.sd_id, HUB.ip_adapter_id, HUB.ip_adapter_id]
    assert "models/ip-adapter_sd15.bin" in entries[1].files
    assert any(f.startswith("models/image_encoder/model.safetensors") for f in entries[2].files)
    assert len(entries) == 9 and all(e.files for e in entries)
    assert entries[-1].repo_id == HUB.vlm_id and "config.json" == entries[-1].files[0]
    assert not any("safety_checker" in f for f in entries[0].files)  # safety_checker=None: never downloaded


def test_real_architectures_are_wired():
    """Embedding dims between the paper's models, from their real configs (built on the meta device)."""
    import open_clip
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    assert open_clip.get_model_config(HUB.decoder_clip[0])["embed_dim"] == HUB.decoder_emb_dim == 1024
    assert open_clip.get_model_config(HUB.verifier_clip[0])["embed_dim"] == HUB.verifier_emb_dim == 1280
    assert open_clip.get_model_config(HUB.aesthetic_clip[0])["embed_dim"] == ARCH.AESTHETIC_EMB_DIM == 768
    vit_h = open_clip.get_model_config("ViT-H-14")["vision_cfg"]
    with init_empty_weights():
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**ARCH.VIT_H14_VISION_CONFIG))
        unet = UNet2DConditionModel(**ARCH.SD15_UNET_CONFIG)
    cfg = encoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size) == (vit_h["width"], vit_h["layers"], 14)
    assert encoder.visual_projection.out_features == HUB.decoder_emb_dim
    assert unet.config.cross_attention_dim == CLIPTextConfig(**ARCH.SD15_TEXT_CONFIG).hidden_size == 768
    # the real ip-adapter_sd15.bin layout, derived from the real UNet: proj 1024 -> 4 x 768, 16 attn2 layers
    state = DEC.tiny_ip_adapter_state_dict(unet, HUB.decoder_emb_dim)
    assert state["image_proj"]["proj.weight"].shape == (4 * 768, 1024)
    assert state["ip_adapter"]["1.to_k_ip.weight"].shape == (320, 768)
    assert state["ip_adapter"]["29.to_v_ip.weight"].shape == (320, 768)  # last up block
    assert state["ip_adapter"]["31.to_v_ip.weight"].shape == (1280, 768)  # mid block comes last
    assert len(state["ip_adapter"]) == 32


def test_builder_name_is_checked():
    with pytest.raises(ValueError, match="tiny"):
        ENC.build_image_encoder(replace(TINY, builder="local"))
    with pytest.raises(ValueError, match="verifier"):
        ENC.build_clip(TINY, "judge")
