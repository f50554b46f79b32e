"""LoRA baselines (App G.1-G.2): training loop, format, resume, sharding, decoding with adapters."""
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

from rebeca_utils import runtime as RT
from rebeca_utils.baselines import lora as L
from rebeca_utils.baselines import lora_cli as LC
from rebeca_utils.baselines import lora_data as D
from rebeca_utils.baselines import lora_recipe as R
from rebeca_utils.baselines import lora_shard as S
from rebeca_utils.config import SMOKE_LORA, LoraBaselineConfig, get_profile
from rebeca_utils.models import architectures as ARCH
from rebeca_utils.models import decoder as DEC
from rebeca_utils.pipeline import decoding as DECODE
from rebeca_utils.pipeline import items as ITEMS

SMOKE = get_profile("smoke")
TINY, CFG = SMOKE.models, SMOKE.generation
RES = CFG.height
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread


@pytest.fixture(scope="module")
def pipe():
    return LC.build_training_pipeline(TINY, "cpu", SMOKE_LORA)


_IMAGE_DIR = []  # the module's folder of training image files (set by the fixture below)


@pytest.fixture(scope="module", autouse=True)
def _image_dir(tmp_path_factory):
    _IMAGE_DIR[:] = [tmp_path_factory.mktemp("lora_images")]
    yield
    _IMAGE_DIR.clear()


def _images(n=3, seed=0, size=72):
    """Paths of n random RGB training images (PNG: lossless) of side `size`, written once."""
    g = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        path = _IMAGE_DIR[0] / f"s{seed}_{size}_{k}.png"
        arr = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if not path.exists():
            Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _train(pipe, spec, n=2, seed=1, cfg=SMOKE_LORA, **kw):
    return L.train_adapter(pipe, _images(n), [""] * n, spec, cfg, seed=seed, resolution=RES, progress=False, **kw)


def _load(pipe, state, meta, name="probe"):
    pipe.unet.add_adapter(L.peft_config(R.LoraSpec(meta["r"], meta["lora_alpha"], 0.0, 1, 0)), adapter_name=name)
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(pipe.unet, convert_unet_state_dict_to_peft(state), adapter_name=name)


def _decode(pipe, n=2, user=0):
    return DECODE.run_batch(pipe, ITEMS.make_items("lora", "x", [user] * n, list(range(n)), CFG), CFG)


# ----------------------------------------------------------------------------------------------- buckets + config


def test_table3_buckets_and_reference_switch():
    assert [R.bucket_for(n).spec.r for n in (1, 7, 8, 24, 25, 60, 61, 120, 121, 920)] == [8, 8, 16, 16, 32, 32, 64, 64,
                                                                                        128, 128]
    assert R.bucket_for(5).spec == R.LoraSpec(8, 8, 0.10, 1200, 100)
    assert R.bucket_for(500, "reference").spec == R.LoraSpec(32, 32, 0.05, 2500, 200)
    assert R.bucket_for(100, "reference") == R.bucket_for(100)
    counts = R.bucket_counts([3, 8, 9, 200, 130], "paper")
    assert counts["users"].tolist() == [1, 2, 0, 0, 2] and counts["N_i range"].iloc[-1] == "N > 120"
    assert R.shared_spec(LoraBaselineConfig()) == R.TABLE4 == R.LoraSpec(512, 512, 0.05, 10_000, 1_000)
    assert R.capped(R.TABLE4, 20) == R.LoraSpec(512, 512, 0.05, 20, 2)  # the warmup keeps its share
    with pytest.raises(ValueError, match="at least one liked"):
        R.bucket_for(0)


def test_profile_values_and_overrides():
    prof, paper = R.lora_config("paper")
    assert prof.name == "paper" and paper == LoraBaselineConfig() and paper.max_steps == 0
    assert (paper.lr, paper.weight_decay, paper.grad_accum, paper.batch_size, paper.max_grad_norm) == (1e-4, 1e-2, 4, 1, 1.0)
    prof, smoke = R.lora_config("smoke", {"lora.table3": "reference", "generation.n_per_user": 2})
    assert smoke.table3 == "reference" and smoke.n_users == 3 and prof.generation.n_per_user == 2
    with pytest.raises(KeyError, match="unknown parameter 'lora.rank'"):
        R.lora_config("smoke", {"lora.rank": 4})
    with pytest.raises(ValueError, match="lora.caption='blip'"):
        R.lora_config("smoke", {"lora.caption": "blip"})


def test_adapter_seed_depends_on_seed_and_user_only():
    assert R.adapter_seed(0, 3) == R.adapter_seed(0, 3)
    assert len({R.adapter_seed(0, 3), R.adapter_seed(1, 3), R.adapter_seed(0, 4), R.adapter_seed(0, None)}) == 4


def test_captions_switches(tmp_path):
    rows = pd.DataFrame({"user_id": [3, 5], "image": ["a.jpg", "b.jpg"]})
    assert R.training_captions(rows, "empty") == ["", ""]
    assert R.training_captions(rows, "user_token") == ["<u3> liked image.", "<u5> liked image."]
    assert R.generation_prompt(3, "user_token") == "<u3> liked image." and R.generation_prompt(3, "llava") == ""
    with pytest.raises(FileNotFoundError, match="caption='llava' needs the image captions of notebook 07"):
        R.training_captions(rows, "llava", tmp_path / "captions.parquet")
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["a cat", "a dog"]}).to_parquet(tmp_path / "c.parquet")
    assert R.training_captions(rows, "llava", tmp_path / "c.parquet") == ["a cat", "a dog"]


def test_paper_lora_parameter_count_matches_closed_form():
    """SD-1.5's UNet from its config on the meta device: r (d_in + d_out) summed over every targeted projection."""
    cfg = ARCH.SD15_UNET_CONFIG
    widths = list(cfg["block_out_channels"])
    cross = cfg["cross_attention_dim"]
    n_cross_levels = sum(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    # transformer blocks per width: down levels x layers_per_block, the mid block, up levels x (layers_per_block + 1)
    blocks = {}
    for c in widths[:n_cross_levels]:
        blocks[c] = blocks.get(c, 0) + cfg["layers_per_block"] + (cfg["layers_per_block"] + 1)
    blocks[widths[-1]] = blocks.get(widths[-1], 0) + 1
    per_block = lambda c: 4 * (c + c) + 2 * (c + c) + 2 * (cross + c)  # attn1 q,k,v,out; attn2 q,out; attn2 k,v
    for r in (128, 512):
        closed = r * sum(n * per_block(c) for c, n in blocks.items())
        assert L.lora_parameter_count(cfg, r) == closed
    assert L.lora_parameter_count(cfg, 128) == 25_509_888 and L.lora_parameter_count(cfg, 512) == 102_039_552


# ----------------------------------------------------------------------------------------------- training


def test_training_reduces_loss_on_a_fixed_batch(pipe):
    from diffusers import DDPMScheduler

    img = _images(1)
    spec = R.LoraSpec(8, 8, 0.0, 20, 0)
    cfg = replace(SMOKE_LORA, lr=1e-2, max_steps=0)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    text = L.encode_captions(pipe, [""])[""]
    g = torch.Generator().manual_seed(0)
    pixels = torch.stack([D.random_crop(D.load_resized(img[0], RES), RES, g) for _ in range(8)])

    def fixed_loss():  # the objective on a fixed batch: 8 crops, fixed noise and timesteps
        with torch.no_grad():
            return float(L.denoising_loss(pipe, sched, pixels, text.expand(8, -1, -1), torch.Generator().manual_seed(5)))

    before = fixed_loss()
    state, meta, log = L.train_adapter(pipe, img, [""], spec, cfg, seed=0, resolution=RES, progress=False)
    assert fixed_loss() == before  # the pipeline is left as it was
    _load(pipe, state, meta)
    try:
        after = fixed_loss()
    finally:
        pipe.unet.delete_adapters("probe")
    assert after < 0.98 * before, (before, after)  # measured: 1.080 -> 1.031 (a random-init tiny UNet)
    assert log["steps"] == 20 and len(log["history"]) == 20 and log["steps_per_s"] > 0
    assert log["history"][0]["lr"] == pytest.approx(cfg.lr * 0.5 * (1 + np.cos(0)))  # cosine from the top, no warmup


def test_warmup_and_cosine_schedule(pipe):
    _, _, log = _train(pipe, R.LoraSpec(4, 4, 0.0, 8, 4))
    lrs = [h["lr"] for h in log["history"]]
    assert lrs[0] == 0 and lrs[3] == pytest.approx(0.75e-4) and lrs[4] == pytest.approx(1e-4) and lrs[-1] < lrs[4]


def test_same_seed_same_adapter_and_adapter_changes_output(pipe):
    spec, cfg = R.LoraSpec(4, 4, 0.1, 3, 1), replace(SMOKE_LORA, lr=1e-2, grad_accum=2)  # the paper accumulates
    a, meta, _ = _train(pipe, spec, cfg=cfg)
    b, _, _ = _train(pipe, spec, cfg=cfg)
    c, _, _ = _train(pipe, spec, seed=2, cfg=cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    base = _decode(pipe)
    _load(pipe, a, meta)
    try:
        assert np.abs(_decode(pipe) - base).mean() > 1e-3
    finally:
        pipe.unet.delete_adapters("probe")
    np.testing.assert_array_equal(_decode(pipe), base)


def test_save_reload_identical_with_alpha_not_r(pipe, tmp_path):
    spec = R.LoraSpec(4, 16, 0.0, 4, 0)  # α ≠ r: without the metadata it would reload as α = r
    state, meta, log = _train(pipe, replace(spec), cfg=replace(SMOKE_LORA, lr=1e-2))
    _load(pipe, state, meta)
    try:
        trained = _decode(pipe)
    finally:
        pipe.unet.delete_adapters("probe")
    L.write_adapter(tmp_path / "u000", state, meta, {"fingerprint": "x"}, log)
    assert L.adapter_done(tmp_path / "u000", "x") and not L.adapter_done(tmp_path / "u000", "y")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "u000" / R.WEIGHTS_NAME), "pt") as f:
        saved = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (saved["unet.r"], saved["unet.lora_alpha"]) == (4, 16)  # the adapter metadata travels with the weights
    fresh = DEC.build_decoder(TINY, CFG, ip_adapter=False)
    fresh.load_lora_weights(str(tmp_path / "u000"), adapter_name="u000")
    assert fresh.unet.peft_config["u000"].lora_alpha == 16 and fresh.unet.peft_config["u000"].r == 4
    np.testing.assert_array_equal(_decode(fresh), trained)
    # rewriting the folder replaces it whole
    L.write_adapter(tmp_path / "u000", state, meta, {"fingerprint": "y"})
    assert L.adapter_done(tmp_path / "u000", "y") and not (tmp_path / "u000" / R.LOG_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["u000"]  # no temp folders left


def test_reference_peft_format_import(pipe, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    unet = UNet2DConditionModel(**ARCH.tiny_unet_config())
    conf = L.peft_config(R.LoraSpec(4, 8, 0.0, 1, 0))
    conf.init_lora_weights = False  # non-zero B, so the adapter does something
    model = get_peft_model(unet, conf)
    model.save_pretrained(tmp_path / "ref")  # raw PEFT keys: base_model.model.<module>.lora_A.weight
    out = L.import_peft_lora(tmp_path / "ref", tmp_path / "imported")
    fresh = DEC.build_decoder(TINY, CFG, ip_adapter=False)
    base = _decode(fresh)
    fresh.load_lora_weights(str(out), adapter_name="ref")
    loaded = fresh.unet.peft_config["ref"]
    assert (loaded.r, loaded.lora_alpha) == (4, 8)
    n_lora = sum(p.numel() for n, p in fresh.unet.named_parameters() if ".ref." in n or n.endswith(".ref.weight"))
    assert n_lora > 0 and np.abs(_decode(fresh) - base).mean() > 1e-3
    with pytest.raises(ValueError, match="no LoRA weights"):
        from safetensors.torch import save_file

        save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
        L.import_peft_lora(tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------------------------- decoding


def test_decode_keeps_adapters_by_name_and_deletes_them(pipe, tmp_path):
    """Two users' adapters in one decode: each loaded once, switched by name, deleted after; base restored bitwise."""
    dirs = []
    for u in (0, 1):
        state, meta, _ = _train(pipe, R.LoraSpec(4, 4, 0.0, 2, 0), seed=10 + u, cfg=replace(SMOKE_LORA, lr=1e-2))
        dirs.append(str(L.write_adapter(tmp_path / f"u{u:03d}", state, meta, {"fingerprint": str(u)})))
    dec = DEC.build_decoder(TINY, CFG, ip_adapter=False)
    base = _decode(dec)
    loads, sets = [], []
    orig_load, orig_set = dec.load_lora_weights, dec.set_adapters
    dec.load_lora_weights = lambda p, **kw: loads.append(kw["adapter_name"]) or orig_load(p, **kw)
    dec.set_adapters = lambda names, *a, **kw: sets.append(tuple(names)) or orig_set(names, *a, **kw)
    items = ITEMS.make_items("lora", "per_user", [0, 0, 1, 1], [0, 1, 0, 1], CFG, loras=[dirs[0]] * 2 + [dirs[1]] * 2)
    plain = ITEMS.make_items("lora", "plain", [0, 0], [0, 1], CFG)  # sorted between them: the adapter is disabled
    items += plain + ITEMS.make_items("lora", "shared", [0, 1], [0, 0], CFG, loras=[dirs[0]] * 2)
    rep = DECODE.decode(dec, items, tmp_path / "out", CFG, batch_size=1, models=TINY, progress=False)
    assert rep.written == 8 and not rep.failed
    assert len(loads) == len(set(loads)) == 2  # per_user/u000 and shared/u000..1 share one resident adapter
    assert len(sets) == 6 and dec.get_list_adapters() == {}  # deleted after use
    np.testing.assert_array_equal(_decode(dec), base)  # no leak: the base pipeline's output, bitwise
    for it in plain:  # the batches without LoRA ran on the base weights (same batch size 1: same bytes)
        img = DECODE.run_batch(dec, [it], CFG)[0]
        png = np.asarray(Image.open(tmp_path / "out" / it.relpath), dtype=np.uint8)
        np.testing.assert_array_equal(png, (np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    a = np.asarray(Image.open(tmp_path / "out" / items[0].relpath), dtype=float)
    b = np.asarray(Image.open(tmp_path / "out" / items[6].relpath), dtype=float)
    assert np.array_equal(a, b)  # same adapter, same seed (42): same image whichever setting
    # a retrained adapter (same folder, new weights) makes its images stale
    state, meta, _ = _train(pipe, R.LoraSpec(4, 4, 0.0, 2, 0), seed=99, cfg=replace(SMOKE_LORA, lr=1e-2))
    L.write_adapter(dirs[1], state, meta, {"fingerprint": "new"})
    rep = DECODE.decode(dec, items, tmp_path / "out", CFG, batch_size=1, models=TINY, progress=False)
    assert rep.written == 2 and rep.skipped == 6


def test_lora_items_decode_without_ip_adapter(tmp_path, pipe):
    """LoRA items carry no IP embedding: the IP-Adapter path is off (scale 0) and the output equals plain SD + LoRA."""
    state, meta, _ = _train(pipe, R.LoraSpec(4, 4, 0.0, 2, 0), cfg=replace(SMOKE_LORA, lr=1e-2))
    folder = str(L.write_adapter(tmp_path / "u000", state, meta, {"fingerprint": "x"}))
    items = ITEMS.make_items("lora", "per_user", [0, 0], [0, 1], CFG, loras=[folder] * 2)
    assert all(it.ip_embedding is None for it in items)
    with_ip, plain = DEC.build_decoder(TINY, CFG), DEC.build_decoder(TINY, CFG, ip_adapter=False)
    scales = []
    procs = [p for p in with_ip.unet.attn_processors.values() if hasattr(p, "scale")]
    hook = with_ip.unet.register_forward_pre_hook(lambda m, a: scales.append({s for p in procs for s in p.scale}))
    try:
        DECODE.decode(with_ip, items, tmp_path / "ip", CFG, models=TINY, progress=False)
    finally:
        hook.remove()
    assert scales and all(s == {0.0} for s in scales)  # IP-Adapter inactive in every UNet call
    assert {s for p in procs for s in p.scale} == {CFG.ip_adapter_scale}  # and restored afterwards
    DECODE.decode(plain, items, tmp_path / "plain", CFG, models=TINY, progress=False)
    for it in items:
        a, b = (np.asarray(Image.open(tmp_path / d / it.relpath), dtype=int) for d in ("ip", "plain"))
        assert np.abs(a - b).max() <= 1, it.relpath
    assert plain.unet.encoder_hid_proj is None  # what notebook 06 decodes with


def test_lora_items_layout_and_seeds(tmp_path):
    jobs = [LC.Job("per_user/u003", 3, ("a",), ("",), R.LoraSpec(8, 8, 0.1, 1, 0), 1, "f"),
            LC.Job("shared", None, ("a",), ("",), R.TABLE4, 2, "g")]
    items = LC.lora_items(jobs, tmp_path, [3, 5], replace(CFG, n_per_user=2))
    assert [it.relpath for it in items] == ["lora/per_user/u003/00.png", "lora/per_user/u003/01.png",
                                            "lora/shared/u003/00.png", "lora/shared/u003/01.png",
                                            "lora/shared/u005/00.png", "lora/shared/u005/01.png"]
    assert [it.seed for it in items] == [30_042, 30_043, 30_042, 30_043, 50_042, 50_043]  # App G.3
    assert items[0].lora == str((tmp_path / "adapters/per_user/u003").resolve()) and items[2].lora.endswith("shared")
    assert {it.prompt for it in items} == {""}
    from rebeca_utils.evaluate.paper import method_label

    assert {method_label(it.method, it.setting) for it in items} == {"Per-user LoRA", "Shared LoRA"}
    # lora.generation_prompt: one guided prompt for every user's adapter, in the items' fingerprints
    guided = LC.lora_items(jobs, tmp_path, [3, 5], replace(CFG, n_per_user=2), prompt="a photo")
    assert {it.prompt for it in guided} == {"a photo"} and {it.negative_prompt for it in guided} == {""}
    from rebeca_utils.pipeline.items import item_fingerprint

    assert all(item_fingerprint(g, {}) != item_fingerprint(i, {}) for g, i in zip(guided, items))


# ----------------------------------------------------------------------------------------------- runner + CLI


def _fixture_plan(root: Path, users=(0, 1), variant="both", **cfg_kw):
    """A small training plan on synthetic liked images (the smoke fixture's format) under root."""
    rng = np.random.default_rng(0)
    imgdir = root / "images"
    imgdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(3):
        for k in range(3 + u):
            name = f"u{u}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(imgdir / name)
            rows.append({"user_id": u, "image": name, "like": True, "split": "train", "holdout": u == 2})
        rows.append({"user_id": u, "image": f"u{u}_0.png", "like": True, "split": "test", "holdout": u == 2})
    splits = pd.DataFrame(rows)
    cfg = replace(SMOKE_LORA, **{"max_steps": 3, "shared_max_steps": 6, "checkpoint_every": 2, **cfg_kw})
    jobs = LC.plan_jobs(splits, list(users), variant, cfg, TINY, seed=0, resolution=RES)
    LC.save_train_plan(jobs, root, cfg, TINY, imgdir, RES)
    return jobs, cfg, imgdir


def test_plan_jobs_data_and_fingerprints(tmp_path):
    jobs, cfg, _ = _fixture_plan(tmp_path)
    assert [j.name for j in jobs] == ["per_user/u000", "per_user/u001", "shared"]
    assert jobs[0].images == ("u0_0.png", "u0_1.png", "u0_2.png")  # liked, training split only
    assert len(jobs[2].images) == 3 + 4  # union of the non-hold-out users (user 2 is held out)
    assert jobs[0].spec == R.LoraSpec(8, 8, 0.10, 3, 0) and jobs[2].spec.steps == 6
    again, *_ = LC.load_train_plan(tmp_path)
    assert again == jobs
    other = LC.plan_jobs(pd.DataFrame({"user_id": [0], "image": ["u0_0.png"], "like": [True], "split": ["train"],
                                       "holdout": [False]}), [0], "per_user", cfg, TINY, 0, RES)
    assert other[0].fingerprint != jobs[0].fingerprint


def test_train_jobs_skip_matching_and_record_failures(tmp_path, pipe):
    jobs, cfg, imgdir = _fixture_plan(tmp_path, variant="per_user")
    broken = replace(jobs[0], images=("missing.png",))
    rep = LC.train_jobs([broken, jobs[1]], tmp_path, cfg, TINY, imgdir, RES, progress=False, pipe=pipe)
    assert rep.trained == ["per_user/u001"] and [f["job"] for f in rep.failed] == ["per_user/u000"]
    assert "missing.png" in rep.failed[0]["error"]
    rep = LC.train_jobs(jobs, tmp_path, cfg, TINY, imgdir, RES, progress=False, pipe=pipe)
    assert rep.trained == ["per_user/u000"] and rep.skipped == ["per_user/u001"] and not rep.failed  # rerun retries
    log = LC.training_logs(tmp_path, jobs)["per_user/u001"]
    assert log["steps"] == 3 and len(log["history"]) == 3 and log["seconds"] > 0 and log["n_images"] == 4


def test_cli_bad_plan_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rebeca_utils.baselines.lora_cli", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "plan.json: no LoRA training plan" in r.stderr


def _env(kit_cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            RT.CACHE_ENV: str(kit_cache), "PYTHONPATH": str(REPO)}


def _cli(root, *extra):
    return [sys.executable, "-m", "rebeca_utils.baselines.lora_cli", "--out-dir", str(root), "--device", "cpu",
            "--no-progress", *extra]


def _weights(root, name):
    from safetensors.torch import load_file

    return load_file(str(root / LC.ADAPTERS / name / R.WEIGHTS_NAME))


def _train_log_records(root):
    return [json.loads(line) for f in sorted((root / LC.ADAPTERS / LC.LOG_DIR).glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()] if (root / LC.ADAPTERS / LC.LOG_DIR).is_dir() else []


@pytest.mark.slow
def test_five_kills_during_lora_training_lose_and_repeat_nothing(tmp_path, kit_cache, pipe):
    """Five SIGKILLs of a CLI run (the first after a per-user checkpoint, the others at seeded random moments;
    per-user and shared adapters, a checkpoint every step):
    the final adapters equal an uninterrupted run's exactly, every step is in each log once, no temporaries stay."""
    import random

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for root in (whole, cut):
        jobs, cfg, imgdir = _fixture_plan(root, variant="both", max_steps=8, shared_max_steps=6, checkpoint_every=1)
    LC.train_jobs(jobs, whole, cfg, TINY, imgdir, RES, progress=False, pipe=pipe, num_workers=0)
    rng, resumed = random.Random(23), []
    for kill in range(5):
        before = sum(r["status"] == "started" for r in _train_log_records(cut))
        proc = subprocess.Popen(_cli(cut, "--num-workers", "0"), env=_env(kit_cache), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        if kill == 0:  # the first kill waits for a per-user checkpoint, so one resume is certain whatever the speed
            while not any(any(LC.checkpoint_dir(cut, j).glob("step-*.pt")) for j in jobs[:2]) \
                    and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None and time.time() < deadline, "no per-user checkpoint appeared to kill after"
        else:
            while sum(r["status"] == "started" for r in _train_log_records(cut)) == before and proc.poll() is None \
                    and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.5, 3.0))  # somewhere in a job: mid-step, mid-checkpoint or mid-adapter write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = subprocess.run(_cli(cut, "--num-workers", "0"), env=_env(kit_cache), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for j in jobs:
        log = json.loads((cut / LC.ADAPTERS / j.name / R.LOG_NAME).read_text())
        assert [h["step"] for h in log["history"]] == list(range(1, j.spec.steps + 1)), j.name  # none lost or twice
        resumed.append(log["resumed_from"])
        a, b = _weights(whole, j.name), _weights(cut, j.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), j.name
    assert any(resumed[:2]), resumed  # a per-user adapter went on from its checkpoint after a kill
    ok = [rec["job"] for rec in _train_log_records(cut) if rec["status"] == "ok"]
    assert sorted(set(ok)) == sorted(ok)  # no adapter trained to the end twice
    left = [p.name for p in (cut / LC.ADAPTERS).rglob("*") if p.name.startswith(".") or p.name.endswith("checkpoints")]
    assert left == []  # no checkpoint folders, no temporaries of killed writes


@pytest.mark.slow
def test_two_processes_deal_by_steps_and_train_the_same_adapters_as_one(tmp_path, kit_cache, pipe):
    """Unequal jobs on two processes (gloo): the 16-step shared adapter alone on process 0, both 3-step users on
    process 1, which leaves as soon as they are done (no barrier until the shared one ends); same adapters as one."""
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        jobs, cfg, imgdir = _fixture_plan(root, variant="both", shared_max_steps=16)
    LC.train_jobs(jobs, one, cfg, TINY, imgdir, RES, progress=False, pipe=pipe, num_workers=0)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "rebeca_utils.baselines.lora_cli", "--out-dir", str(two), "--device", "cpu", "--no-progress",
           "--num-workers", "1"]
    r = subprocess.run(cmd, env=_env(kit_cache), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = sorted((json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["world_size"], s["trained"]) for s in summaries] == [
        (0, 2, ["shared"]), (1, 2, ["per_user/u000", "per_user/u001"])]  # 16 steps vs 3 + 3
    recs = _train_log_records(two)
    exit1 = next(x["time"] for x in recs if x["status"] == "exit" and x["rank"] == 1)
    shared_done = next(x["time"] for x in recs if x.get("job") == "shared" and x["status"] == "ok")
    assert exit1 < shared_done  # process 1 did not wait at a barrier for process 0's long job
    for j in jobs:
        a, b = _weights(one, j.name), _weights(two, j.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), j.name


# ----------------------------------------------------------------------------------------------- issue 23 §2


def test_lora_dropout_is_off_when_decoding(pipe, tmp_path):
    """An adapter with dropout 0.5 and a trained (non-zero) B: the same images at every decode, whichever adapter
    was loaded in between, equal to the merged weights' (peft makes lora_dropout in training mode)."""
    from rebeca_utils.pipeline.adapters import Adapters

    folders = []
    for u in (0, 1):
        state, meta, _ = _train(pipe, R.LoraSpec(4, 4, 0.5, 2, 0), seed=20 + u, cfg=replace(SMOKE_LORA, lr=1e-2))
        assert meta["lora_dropout"] == 0.5 and any(v.abs().max() > 0 for k, v in state.items()
                                                   if "lora_B" in k or "lora.up" in k)
        folders.append(str(L.write_adapter(tmp_path / f"u{u:03d}", state, meta, {"fingerprint": str(u)})))
    dec = DEC.build_decoder(TINY, CFG, ip_adapter=False)
    items = ITEMS.make_items("lora", "per_user", [0, 0], [0, 1], CFG, loras=[folders[0]] * 2)
    adapters = Adapters(dec, [items])
    adapters.use(folders[0])
    first = DECODE.run_batch(dec, items, CFG)
    adapters.use(folders[1])  # switching users loads a second adapter (new dropout modules)
    adapters.use(folders[0])
    second = DECODE.run_batch(dec, items, CFG)
    adapters.close()
    np.testing.assert_array_equal(first, second)
    merged = DEC.build_decoder(TINY, CFG, ip_adapter=False)
    merged.load_lora_weights(folders[0], adapter_name="m")
    merged.fuse_lora()
    merged.unload_lora_weights()  # the fused weights stay: a plain UNet without lora_dropout modules
    assert not any("lora" in n for n, _ in merged.unet.named_modules())
    base = DECODE.run_batch(DEC.build_decoder(TINY, CFG, ip_adapter=False), items, CFG)
    ref = DECODE.run_batch(merged, items, CFG)
    assert np.abs(ref - base).mean() > 1e-3  # the adapter does change the images
    np.testing.assert_allclose(first, ref, atol=1e-4)


def test_same_adapter_with_any_number_of_data_workers(pipe):
    """Crops are seeded per (seed, step, sample), not by worker RNG: 0 and 2 DataLoader workers, same adapter."""
    spec, cfg = R.LoraSpec(4, 4, 0.1, 3, 1), replace(SMOKE_LORA, lr=1e-2, grad_accum=2)
    a, _, log = _train(pipe, spec, n=3, cfg=cfg, num_workers=0)
    b, _, log2 = _train(pipe, spec, n=3, cfg=cfg, num_workers=2)
    assert log2["num_workers"] == 2 and [h["loss"] for h in log["history"]] == [h["loss"] for h in log2["history"]]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_crops_are_seeded_per_sample():
    paths = _images(3, size=80)
    data = D.LoraImages(paths, ["a", "b", "c"], RES, seed=7, samples_per_step=2, n_samples=12)
    again = D.LoraImages(paths, ["a", "b", "c"], RES, seed=7, samples_per_step=2, n_samples=12)
    assert all(torch.equal(data[k][0], again[k][0]) and data[k][1] == again[k][1] for k in (11, 0, 5))
    assert sorted(data.order[k] for k in range(3)) == [0, 1, 2]  # an epoch sees every image once
    assert not torch.equal(data[0][0], D.LoraImages(paths, ["a"] * 3, RES, 8, 2, 12)[0][0])
    with pytest.raises(FileNotFoundError, match=r"nope\.png: training image not found \(1 of 2 missing\)"):
        D.check_images([paths[0], paths[0].parent / "nope.png"])


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS of a LoRA run on 16 vs 320 images whose decoded pixels take 384 KiB each (120 MB for 320 held in
    memory): streamed from disk, the peak stays flat."""
    from rebeca_utils.baselines import lora_bench

    rows = lora_bench.rss_curve([16, 320], tmp_path / "imgs", steps=2, num_workers=0)
    assert [r["n_images"] for r in rows] == [16, 320] and rows[1]["all_decoded_mb"] == 120.0
    grew = rows[1]["training_rss_growth_mb"] - rows[0]["training_rss_growth_mb"]
    assert grew < 30, rows  # measured: see the README's LoRA section


def test_jobs_are_dealt_by_steps():
    job = lambda name, steps: LC.Job(name, None, ("a",), ("",), R.LoraSpec(8, 8, 0.1, steps, 0), 0, name)
    jobs = [job(f"u{k}", s) for k, s in enumerate([1200, 2500, 1500, 2500, 1200])] + [job("shared", 10_000)]
    shares = S.deal_jobs(jobs, 2)
    assert [[j.name for j in s] for s in shares] == [["shared"], ["u0", "u1", "u2", "u3", "u4"]]
    assert [sum(j.spec.steps for j in s) for s in S.deal_jobs(jobs, 3)] == [10_000, 4_000, 4_900]
    assert [[j.name for j in s] for s in S.deal_jobs(jobs[:4], 2)] == [["u1", "u2"], ["u0", "u3"]]
    assert S.deal_jobs(jobs[:1], 3)[1:] == [[], []] and S.deal_jobs(jobs, 1) == [jobs]
