"""Decoding entry point: per-item IP embeddings, seeds, atomic resumable files, sharding, failures."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from rebeca_utils import io as KIO
from rebeca_utils import jobs as J
from rebeca_utils import runtime as RT
from rebeca_utils.config import get_profile
from rebeca_utils.models import decoder as DEC
from rebeca_utils.pipeline import decoding as DECODE
from rebeca_utils.pipeline import items as ITEMS
from rebeca_utils.pipeline import plan as PLAN
from rebeca_utils.pipeline import rebeca as REBECA
from rebeca_utils.pipeline import sampling as SAMPLE

SMOKE = get_profile("smoke")
TINY, CFG = SMOKE.models, SMOKE.generation
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread


@pytest.fixture(scope="module")
def pipe():
    return DEC.build_decoder(TINY, CFG)


def _items(n_users=3, n=4, setting="prior_cfg5", seed=0):
    emb = torch.randn(n_users * n, TINY.decoder_emb_dim, generator=torch.Generator().manual_seed(seed))
    users = [u for u in range(n_users) for _ in range(n)]
    return ITEMS.make_items("rebeca", setting, users, [j for _ in range(n_users) for j in range(n)], CFG, ip_embeddings=emb)


def _hashes(root):
    root = Path(root)
    # rglob matches dotfiles too: leave temp files out
    return {str(p.relative_to(root)): KIO.sha256(p) for p in sorted(root.rglob("*.png")) if not p.name.startswith(".")}


# ----------------------------------------------------------------------------------------------- embeddings + seeds


def test_decoder_seed_is_app_g3_formula():
    assert ITEMS.decoder_seed(0, 0) == 42 and ITEMS.decoder_seed(3, 7) == 30_049 and ITEMS.decoder_seed(209, 24) == 2_090_066
    items = _items(2, 3)
    assert [it.seed for it in items] == [42 + 10_000 * it.user_id + it.index for it in items]
    assert items[4].relpath == "rebeca/prior_cfg5/u001/01.png"


def test_ip_adapter_embeds_shapes_with_and_without_cfg():
    emb = torch.randn(3, 32)
    (guided,) = DEC.ip_adapter_embeds(emb, 5.0)
    assert guided.shape == (6, 1, 32) and torch.equal(guided[:3], torch.zeros(3, 1, 32)) and torch.equal(guided[3:, 0], emb)
    (plain,) = DEC.ip_adapter_embeds(emb, 1.0)  # no negative at CFG <= 1 (the reference doubled the image tokens)
    assert plain.shape == (3, 1, 32) and torch.equal(plain[:, 0], emb)
    with pytest.raises(ValueError, match=r"img_emb must be \(batch, dim\)"):
        DEC.ip_adapter_embeds(torch.randn(32), 5.0)


@pytest.mark.parametrize("decoder_cfg", [5.0, 1.0])
def test_unet_sees_one_image_per_latent_and_four_tokens(pipe, decoder_cfg):
    """The IP tokens reaching the UNet: batch = latent batch (2B with CFG, B without), 4 tokens per image."""
    seen = []
    h = pipe.unet.register_forward_hook(
        lambda m, a, kw, out: seen.append((a[0].shape[0], kw["added_cond_kwargs"]["image_embeds"][0].shape)),
        with_kwargs=True)
    proj = []
    h2 = pipe.unet.encoder_hid_proj.register_forward_hook(lambda m, a, out: proj.append(out[0].shape))
    try:
        DECODE.run_batch(pipe, _items(1, 3), replace(CFG, decoder_cfg=decoder_cfg))
    finally:
        h.remove(), h2.remove()
    rows = 6 if decoder_cfg > 1 else 3
    assert seen[0] == (rows, torch.Size([rows, 1, TINY.decoder_emb_dim]))
    assert proj[0] == torch.Size([rows, 1, 4, 32])  # IP-Adapter SD1.5: 4 tokens of the cross-attention width


def test_batch_equals_single_calls_and_items_differ(pipe):
    items = _items(2, 2)
    batch = DECODE.run_batch(pipe, items, CFG)
    singles = np.stack([DECODE.run_batch(pipe, [it], CFG)[0] for it in items])
    np.testing.assert_allclose(batch, singles, atol=1e-3, rtol=0)  # CPU BLAS noise; a grey level is 4e-3
    # each image got its own embedding (stock diffusers would give every image all four embeddings' tokens)
    assert min(np.abs(batch[i] - batch[k]).mean() for i in range(4) for k in range(i)) > 1e-3


def test_batch_equals_stock_pipeline_one_image_at_a_time(pipe):
    """Stock diffusers is right for a single image: our batched outputs (negative-first embeddings) match it."""
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    items = _items(1, 3)
    ours = DECODE.run_batch(pipe, items, CFG)
    for it, img in zip(items, ours):
        neg_pos = torch.cat([torch.zeros(1, 1, TINY.decoder_emb_dim), it.ip_embedding[None, None]])
        ref = stock(prompt="", negative_prompt="", ip_adapter_image_embeds=[neg_pos], num_inference_steps=CFG.steps,
                    guidance_scale=CFG.decoder_cfg, height=CFG.height, width=CFG.width,
                    generator=torch.Generator().manual_seed(it.seed), output_type="np").images[0]
        np.testing.assert_allclose(img, ref, atol=1e-3, rtol=0)


def test_decoder_keeps_the_requested_dtype(monkeypatch):
    # fp16 is refused on CPU; pretend it resolved, to check the pipeline is not cast back to fp32
    monkeypatch.setattr(DEC, "resolve_dtype", lambda device, dtype: torch.float16)
    pipe = DEC.build_decoder(TINY, CFG)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    assert isinstance(pipe, DEC.RebecaDecoderPipeline) and pipe.unet.encoder_hid_proj is not None


def test_items_without_embedding_decode_as_plain_sd(pipe):
    plain = DEC.build_decoder(TINY, CFG, ip_adapter=False)
    items = ITEMS.make_items("lora", "shared", [0, 1], [0, 0], CFG, prompts=["a red square", "a blue heart"])
    np.testing.assert_allclose(DECODE.run_batch(pipe, items, CFG), DECODE.run_batch(plain, items, CFG), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        DECODE.run_batch(plain, _items(1, 1), CFG)


# ----------------------------------------------------------------------------------------------- files + resume


def test_decode_writes_layout_skips_and_manifest(pipe, tmp_path):
    items = _items(2, 3)
    rep = DECODE.decode(pipe, items, tmp_path, CFG, batch_size=4, models=TINY, progress=False)
    assert rep.written == 6 and rep.skipped == 0 and not rep.failed
    assert sorted(_hashes(tmp_path)) == sorted(it.relpath for it in items)
    again = DECODE.decode(pipe, items, tmp_path, CFG, batch_size=4, models=TINY, progress=False)
    assert again.written == 0 and again.skipped == 6 and again.batches == 0
    df = PLAN.write_manifest(items, tmp_path, CFG, TINY)
    assert list(df.columns) == PLAN.MANIFEST_COLUMNS and (df["status"] == "ok").all()
    assert df["sha256"].tolist() == [KIO.sha256(tmp_path / p) for p in df["path"]]
    assert df["seed"].tolist() == [ITEMS.decoder_seed(u, j) for u, j in zip(df["user_id"], df["index"])]
    assert (df["seconds"] > 0).all()
    # a truncated PNG is not "done": it is redone, and to the same bytes
    before = _hashes(tmp_path)
    p = tmp_path / items[1].relpath
    p.write_bytes(p.read_bytes()[:100])
    rep = DECODE.decode(pipe, items, tmp_path, CFG, batch_size=4, models=TINY, progress=False)
    assert rep.written == 1 and _hashes(tmp_path) == before
    assert not list(tmp_path.rglob(".*.png"))  # no temp files left


def test_images_from_other_inputs_are_stale_and_redone(pipe, tmp_path):
    items = _items(1, 2)
    DECODE.decode(pipe, items, tmp_path, CFG, models=TINY, progress=False)
    other = replace(CFG, steps=CFG.steps + 1)  # other settings: every image is stale
    assert (PLAN.write_manifest(items, tmp_path, other, TINY)["status"] == "stale").all()
    assert DECODE.decode(pipe, items, tmp_path, other, models=TINY, progress=False).written == 2
    assert json.loads((tmp_path / "rebeca/prior_cfg5" / DECODE.SETTINGS_NAME).read_text())["steps"] == CFG.steps + 1
    moved = [replace(items[0], ip_embedding=items[0].ip_embedding + 1), items[1]]  # e.g. a retrained prior
    rep = DECODE.decode(pipe, moved, tmp_path, other, models=TINY, progress=False)
    assert rep.written == 1 and rep.skipped == 1
    assert (PLAN.write_manifest(moved, tmp_path, other, TINY)["status"] == "ok").all()
    assert DECODE.decode(pipe, moved, tmp_path, other, models=TINY, progress=False, overwrite=True).written == 2


def test_shards_cover_every_batch_once():
    batches = ITEMS.make_batches(_items(5, 5), 3)
    shards = [J.share(batches, r, 3) for r in range(3)]
    keys = [it.key for s in shards for b in s for it in b]
    assert len(keys) == len(set(keys)) == 25
    assert shards[1] == batches[1::3]  # round robin: batch b in process b mod 3
    with pytest.raises(ValueError, match=r"rank=3 must be in 0..world_size-1 \(world_size=3\)"):
        J.share(batches, 3, 3)
    with pytest.raises(ValueError, match="duplicate work items"):
        ITEMS.make_batches(_items(1, 2) + _items(1, 2), 2)
    mixed = _items(1, 2) + ITEMS.make_items("lora", "u", [0], [0], CFG, loras=["/a"])
    assert all(len({(it.lora, it.ip_embedding is None) for it in b}) == 1 for b in ITEMS.make_batches(mixed, 8))


class _Flaky:
    """Wraps a pipeline: calls with more than one image run out of memory; `always` items always fail."""

    def __init__(self, pipe, always=()):
        self.pipe, self.always, self.calls = pipe, set(always), []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kw):
        self.calls.append(len(kw["prompt"]))
        seeds = {g.initial_seed() for g in kw["generator"]}
        if len(kw["prompt"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if seeds & self.always:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.pipe(**kw)


def test_failures_retried_at_batch_size_1_and_logged(pipe, tmp_path):
    items = _items(1, 4)
    ref = tmp_path / "ref"
    DECODE.decode(pipe, items, ref, CFG, batch_size=4, models=TINY, progress=False)
    flaky = _Flaky(pipe, always={items[2].seed})
    out = tmp_path / "out"
    rep = DECODE.decode(flaky, items, out, CFG, batch_size=4, models=TINY, progress=False)
    assert flaky.calls == [4, 1, 1, 1, 1] and rep.retried == 4 and rep.written == 3
    assert rep.failed == [{"key": list(items[2].key), "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}]
    df = PLAN.write_manifest(items, out, CFG, TINY)
    assert df["status"].tolist() == ["ok", "ok", "failed", "ok"] and "illegal memory access" in df["error"][2]
    # finished items are kept; the rerun decodes the failed one
    rep = DECODE.decode(pipe, items, out, CFG, batch_size=4, models=TINY, progress=False)
    assert rep.written == 1 and (PLAN.write_manifest(items, out, CFG, TINY)["status"] == "ok").all()
    assert set(_hashes(out)) == set(_hashes(ref))
    for k in _hashes(ref):  # batch-size-1 retries match the batched images to within a grey level
        a, b = (np.asarray(Image.open(r / k), dtype=int) for r in (ref, out))
        assert np.abs(a - b).max() <= 1, k


# ----------------------------------------------------------------------------------------------- processes


def _env(kit_cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            RT.CACHE_ENV: str(kit_cache), "PYTHONPATH": str(REPO)}


def _plan(root, n_users=4, n=6):
    PLAN.save_plan(_items(n_users, n), root, CFG, TINY)
    return root


def _cli(root, *extra):
    return [sys.executable, "-m", "rebeca_utils.pipeline.decode_cli", "--out-dir", str(root), "--device", "cpu", "--batch-size",
            "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, kit_cache):
    root = _plan(tmp_path_factory.mktemp("whole"))
    r = subprocess.run(_cli(root), env=_env(kit_cache), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.slow  # subprocesses
def test_kill_then_rerun_gives_identical_files(uninterrupted, tmp_path, kit_cache):
    root = _plan(tmp_path)
    proc = subprocess.Popen(_cli(root), env=_env(kit_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(root.rglob("u*/*.png"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(root.rglob("u*/*.png")))
    assert 5 <= n_before < 24, n_before  # killed mid-run
    r = subprocess.run(_cli(root), env=_env(kit_cache), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= n_before - 1 and summary["manifest"] == {"ok": 24}
    assert _hashes(root) == _hashes(uninterrupted)
    assert not [p for p in root.rglob("u*/.*") if p.is_file()]  # temp files of the killed run are cleaned up
    a, b = (pd.read_csv(r / PLAN.MANIFEST_NAME) for r in (root, uninterrupted))
    assert a["sha256"].tolist() == b["sha256"].tolist()


@pytest.mark.slow  # subprocesses
def test_two_processes_split_work_without_overlap(uninterrupted, tmp_path, kit_cache):
    root = _plan(tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "rebeca_utils.pipeline.decode_cli", "--out-dir", str(root), "--device", "cpu", "--batch-size", "2", "--no-progress"]
    r = subprocess.run(cmd, env=_env(kit_cache), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = sorted((json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["world_size"], s["written"]) for s in summaries] == [(0, 2, 12), (1, 2, 12)]
    logs = [[tuple(json.loads(line)["key"]) for line in p.read_text().splitlines()]
            for p in (root / DECODE.LOG_DIR).glob("*.jsonl")]
    assert len(logs) == 2 and not set(logs[0]) & set(logs[1]) and len(logs[0]) + len(logs[1]) == 24
    assert summaries[0]["manifest"] == {"ok": 24}
    assert _hashes(root) == _hashes(uninterrupted)


def test_prior_embeddings_cached_and_tied_to_weights(tmp_path, monkeypatch):
    from rebeca_utils.models.prior import RebecaPrior
    from rebeca_utils.train.diffusion import make_scheduler

    torch.manual_seed(0)
    prior = RebecaPrior.from_config(replace(SMOKE.prior, n_users=4))
    sched = make_scheduler(SMOKE.diffusion)
    calls = []
    sample = REBECA.sample_prior
    monkeypatch.setattr(REBECA, "sample_prior", lambda *a, **k: calls.append(k["cfg_scale"]) or sample(*a, **k))
    pipe = REBECA.RebecaPipeline(prior, sched, sampler="ddim", steps=3, users={u: {} for u in range(4)})
    kw = dict(cfg_scale=5.0, path=tmp_path / "e.safetensors", progress=False)
    a = pipe.embeddings([0, 2], 3, **kw)
    assert a["img_emb"].shape == (6, 32) and a["user_id"].tolist() == [0, 0, 0, 2, 2, 2] and a["index"].tolist() == [0, 1, 2] * 2
    b = pipe.embeddings([0, 2], 3, **kw)
    assert calls == [5.0] and torch.equal(a["img_emb"], b["img_emb"])  # reused
    pipe.embeddings([0, 2], 3, **{**kw, "cfg_scale": 7.0})
    with torch.no_grad():
        next(prior.parameters()).add_(1.0)  # other weights: resampled
    pipe.embeddings([0, 2], 3, **{**kw, "cfg_scale": 7.0})
    assert calls == [5.0, 7.0, 7.0]
    pipe.with_sampler("dpmsolver").embeddings([0, 2], 3, **{**kw, "cfg_scale": 7.0})  # another sampler: resampled
    assert calls == [5.0, 7.0, 7.0, 7.0]
    cache = kw["path"]
    cache.write_bytes(cache.read_bytes()[:-5])  # a truncated cache: resampled, not fatal
    pipe.embeddings([0, 2], 3, **{**kw, "cfg_scale": 7.0})
    assert calls == [5.0, 7.0, 7.0, 7.0, 7.0]
    items = SAMPLE.rebeca_items(a, "prior_cfg5", CFG)
    assert [it.seed for it in items] == [42, 43, 44, 20_042, 20_043, 20_044]
    assert torch.equal(items[4].ip_embedding, a["img_emb"][4])


def _prior(n_users=4):
    from rebeca_utils.models.prior import RebecaPrior
    from rebeca_utils.train.diffusion import make_scheduler

    torch.manual_seed(0)
    prior = RebecaPrior.from_config(replace(SMOKE.prior, n_users=n_users))
    with torch.no_grad():  # away from the zero init, so every path of the network shapes the sample
        for p in prior.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return prior, make_scheduler(SMOKE.diffusion)


@pytest.mark.parametrize("sampler", ["dpmsolver", "ddpm"])
def test_a_sample_is_the_same_bits_alone_or_in_a_batch_of_25(sampler, tmp_path):
    """04 samples 25 per user, 09 10: sample (seed, u, j) must not depend on its batch mates or their number
    (unpadded, 1 row vs 25 rows differ in the last bits on CPU: another matmul kernel)."""
    from rebeca_utils.train.diffusion import make_scheduler

    prior, sched = _prior()
    if sampler == "ddpm":  # the ancestral chain runs every training step: 50 here (its noise comes per step too)
        sched = make_scheduler(replace(SMOKE.diffusion, num_train_timesteps=50))
    kw = dict(cfg_scale=5.0, sampler=sampler, steps=8, seed=3, progress=False, batch_size=32, pad=True)
    batch = SAMPLE.sample_prior(prior, sched, [2] * 25, [1] * 25, range(25), **kw)
    alone = SAMPLE.sample_prior(prior, sched, [2], [1], [7], **kw)
    ten = SAMPLE.sample_prior(prior, sched, [2] * 10, [1] * 10, range(10), **kw)
    mixed = SAMPLE.sample_prior(prior, sched, [0, 2, 1], [1] * 3, [4, 7, 7], **kw)
    assert torch.equal(alone[0], batch[7]) and torch.equal(ten, batch[:10]) and torch.equal(mixed[1], batch[7])
    assert not torch.equal(mixed[0], batch[4])  # another user: another sample
    if sampler == "dpmsolver":  # notebooks 04 and 09 draw through this cache: 25 vs 10 per user, other users
        pipe = REBECA.RebecaPipeline(prior, sched, sampler=sampler, steps=8, users={u: {} for u in range(4)})
        kw = dict(cfg_scale=5.0, seed=3, progress=False)
        a = pipe.embeddings([0, 2], 25, path=tmp_path / "04.safetensors", **kw)
        b = pipe.embeddings([2], 10, path=tmp_path / "09.safetensors", **kw)
        assert torch.equal(a["img_emb"][25:35], b["img_emb"])


def test_lora_items_load_their_adapter_and_leave_the_pipeline_clean(pipe, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = DEC.build_decoder(TINY, CFG, ip_adapter=False)  # a LoRA as the baselines' training would save it
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_dir = tmp_path / "lora_u000"
    DEC.RebecaDecoderPipeline.save_lora_weights(
        lora_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet)))
    plain = ITEMS.make_items("sd", "no_lora", [0], [0], CFG, prompts=["a photo"])
    with_lora = ITEMS.make_items("lora", "per_user", [0, 1], [0, 0], CFG, prompts=["a photo"] * 2,
                             loras=[str(lora_dir), str(tmp_path / "missing")])
    before = DECODE.run_batch(pipe, plain, CFG)
    rep = DECODE.decode(pipe, plain + with_lora, tmp_path / "out", CFG, models=TINY, progress=False)
    assert rep.written == 2 and [f["key"][2] for f in rep.failed] == [1]  # the unreadable adapter fails alone
    a, b = (np.asarray(Image.open(tmp_path / "out" / it.relpath), dtype=float) for it in (plain[0], with_lora[0]))
    assert plain[0].seed == with_lora[0].seed and np.abs(a - b).mean() > 1  # same seed: the adapter made the change
    np.testing.assert_allclose(DECODE.run_batch(pipe, plain, CFG), before, atol=1e-6)  # adapter unloaded afterwards


# ----------------------------------------------------------------------------------------------- bad embeddings

@pytest.mark.parametrize("value, why", [
    (float("nan"), "has NaN/inf values"), (float("inf"), "has NaN/inf values"),
    (0.0, "has norm 0 (valid: 1e-06 to 1000)"), (1e5, "has norm 5.66e+05 (valid: 1e-06 to 1000)")])
def test_non_finite_or_absurd_embeddings_refused_with_the_item(pipe, tmp_path, value, why):
    items = _items(2, 2)
    bad = replace(items[3], ip_embedding=torch.full_like(items[3].ip_embedding, value))
    msg = f"item (method='rebeca', setting='prior_cfg5', user_id=1, index=1): ip_embedding {why}; refusing to decode it"
    with pytest.raises(ValueError) as e:  # hand-made items and plans are checked when decoding starts ...
        DECODE.decode(pipe, items[:3] + [bad], tmp_path, CFG, models=TINY, progress=False)
    assert str(e.value) == msg and not list(tmp_path.rglob("*.png"))
    with pytest.raises(ValueError) as e:  # ... and prior samples when their items are made
        ITEMS.make_items("rebeca", "prior_cfg5", [0, 1], [0, 1], CFG, ip_embeddings=torch.stack(
            [items[0].ip_embedding, bad.ip_embedding]))
    assert str(e.value) == msg


def test_blank_decoder_output_is_failed_not_ok(pipe, tmp_path):
    """A NaN inside the decoder gives black PNGs; they are marked failed with the reason and not written."""

    class Black(_Flaky):  # the same delegating wrapper, with blank images instead of errors
        def __call__(self, **kw):
            out = self.pipe(**kw)
            out.images[0] = np.nan  # first image of every call: NaN; the rest black
            out.images[1:] = 0.0
            return out

    items = _items(1, 3)
    rep = DECODE.decode(Black(pipe), items, tmp_path, CFG, batch_size=3, models=TINY, progress=False)
    assert rep.written == 0 and [f["error"] for f in rep.failed] == [
        "decoder returned NaN/inf pixels (numerical overflow; try generation.dtype: fp32)"] + [
        "decoder returned a constant image (every pixel 0.000; NaN in the UNet/VAE, or a zero embedding?)"] * 2
    df = PLAN.write_manifest(items, tmp_path, CFG, TINY)
    assert (df["status"] == "failed").all() and df["error"].str.startswith("decoder returned").all()


def test_decode_removes_orphaned_temp_files(pipe, tmp_path):
    items = _items(1, 1)
    orphans = [tmp_path / "rebeca/prior_cfg5/u000/.00.png.x1y2.tmp.png",
               tmp_path / "rebeca/prior_cfg5/.decode_settings.json.ab12.tmp.json", tmp_path / ".generation_manifest.csv.k.tmp.csv"]
    for p in orphans:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    DECODE.decode(pipe, items, tmp_path, CFG, models=TINY, progress=False)
    assert not any(p.exists() for p in orphans) and (tmp_path / items[0].relpath).is_file()
    # several processes share the folder: a fresh temp file may be another process's write in flight
    fresh = tmp_path / "rebeca/prior_cfg5/u000/.01.png.zz.tmp.png"
    fresh.write_bytes(b"in flight")
    DECODE.decode(pipe, items, tmp_path, CFG, models=TINY, progress=False, rank=0, world_size=2)
    assert fresh.exists()
