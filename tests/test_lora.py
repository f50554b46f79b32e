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
from rebeca_utils.baselines import lora_recipe as R
from rebeca_utils.config import SMOKE_LORA, LoraBaselineConfig, get_profile
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


def _images(n=3, seed=0, size=72):
    g = np.random.default_rng(seed)
    return [torch.from_numpy(g.integers(0, 256, (3, size, size), dtype=np.uint8)) for _ in range(n)]


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
    cfg = DEC.SD15_UNET_CONFIG
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
    pixels = L.crop_batch(img, [0] * 8, RES, torch.Generator().manual_seed(0))

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

    unet = UNet2DConditionModel(**DEC.tiny_unet_config())
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


@pytest.mark.slow
def test_kill_during_shared_lora_resumes_from_checkpoint(tmp_path, kit_cache):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for root in (whole, cut):
        _fixture_plan(root, variant="shared", shared_max_steps=12, checkpoint_every=2)
    r = subprocess.run(_cli(whole), env=_env(kit_cache), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(_cli(cut), env=_env(kit_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = cut / LC.ADAPTERS / "shared.checkpoints"
    deadline = time.time() + 240
    while not list(ckpts.glob("step-00000[4-9].pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / LC.ADAPTERS / "shared" / R.INFO_NAME).exists()  # killed before the end
    r = subprocess.run(_cli(cut), env=_env(kit_cache), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((cut / LC.ADAPTERS / "shared" / R.LOG_NAME).read_text())
    assert log["resumed_from"] and 4 <= log["resumed_from"] < 12
    assert log["steps"] == 12 and [h["step"] for h in log["history"]] == list(range(1, 13))
    a, b = _weights(whole, "shared"), _weights(cut, "shared")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exactly where it stopped
    assert not ckpts.exists()  # checkpoints removed once the adapter is written


@pytest.mark.slow
def test_two_processes_train_the_same_adapters_as_one(tmp_path, kit_cache):
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        jobs, *_ = _fixture_plan(root, variant="both", shared_max_steps=3)
    r = subprocess.run(_cli(one), env=_env(kit_cache), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "rebeca_utils.baselines.lora_cli", "--out-dir", str(two), "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, env=_env(kit_cache), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = sorted((json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["world_size"], s["trained"]) for s in summaries] == [
        (0, 2, ["per_user/u000", "shared"]), (1, 2, ["per_user/u001"])]  # disjoint
    for j in jobs:
        a, b = _weights(one, j.name), _weights(two, j.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), j.name
