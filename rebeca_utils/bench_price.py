"""`make bench --paper-stages`: the paper profile's counts of every stage of `make paper`, priced in hours on one GPU
and on N from the seconds per unit that bench_stages measures (on a CPU: in the rehearsal's ci cache, built here in a
temp folder and deleted at the end).

python -m rebeca_utils.bench_price [--gpus N] [--quick] [--shape auto|paper|ci] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .baselines.lora_recipe import shared_spec, table3
from .config import Profile, get_profile
from .notebook.setup_check import FLICKR_EXPECTED
from .studies.ablations import cells, decode_count
from .studies.cold_start import HISTORY_FREE, METHODS

CI_NOTE = "ci shape on CPU: proves the script, prices nothing"


@dataclass(frozen=True)
class Row:
    """One priced stage: `count` units of work at `unit_s` seconds each (None: not measured); `split`: the work
    divides over GPUs (chunks, items, adapters), else one process does it all (a single training run)."""

    stage: str
    count: int
    unit: str
    basis: str
    measure: str  # which measurement gives unit_s
    split: bool = True
    scale: int = 1  # measured units per unit of this row (samples per epoch, rows per epoch)
    unit_s: float | None = None
    peak_gb: float | None = None

    def hours(self, gpus: int = 1) -> float | None:
        """count × seconds per unit / 3600, divided by `gpus` where the work splits."""
        if self.unit_s is None:
            return None
        return self.count * self.unit_s / 3600 / (gpus if self.split else 1)


def counts(prof: Profile) -> dict:
    """What `make paper` does, from the profile: users, images, epochs, steps, decodes, tokens."""
    fl, gen, nu, lo = prof.flickr, prof.generation, prof.new_users, prof.lora
    users = prof.prior.n_users - fl.n_holdout_workers  # the trained (non-hold-out) workers: 173
    top = table3(lo.table3)[-1].spec  # FLICKR-AES workers rate ~920 images: nearly all have > 120 likes
    main = [c for c in cells(prof.ablation, gen) if c.decoder_cfg == gen.decoder_cfg and c.level == 0
            and c.omega in gen.prior_cfg_scales]  # the ablation cells that are notebook 04's own
    ratings = FLICKR_EXPECTED["ratings"]
    histories = sum(nu.draws if k else 1 for k in nu.ks)
    per_history = [m for m in METHODS if m != "retrain" and m not in HISTORY_FREE]
    once = len(HISTORY_FREE) + int(nu.retrain)  # decoded once per user: the null user; the retrain (all ratings)
    return dict(
        users=users, images=fl.n_images, omegas=len(gen.prior_cfg_scales), n_per_user=gen.n_per_user,
        epoch_samples=users * prof.train.samples_per_user, prior_epochs=prof.train.max_epochs,
        gen04=users * gen.n_per_user * len(gen.prior_cfg_scales),
        lora_r=top.r, lora_steps=top.steps, shared_r=lo.shared_r, shared_steps=shared_spec(lo).steps,
        gen06=users * gen.n_per_user * 2, gen07=users * gen.n_per_user * 2,
        tokens=fl.n_images * prof.vlm.max_new_tokens, vlm_batch=prof.vlm.batch_size,
        verifier_rows=round((ratings - fl.n_workers * (fl.n_test + fl.n_val)) * users / fl.n_workers),
        verifier_epochs=prof.verifier.max_epochs,
        ablation=decode_count(prof.ablation, gen, users), ablation_cells=len(cells(prof.ablation, gen)),
        ablation_04=len(main) * prof.ablation.n_per_user * users, ablation_per_user=prof.ablation.n_per_user,
        histories=histories, methods12=len(per_history), once12=once, n_images12=nu.n_images,
        gen12=fl.n_holdout_workers * (histories * len(per_history) + once) * nu.n_images,
        # the feedback loop: round 0 once, then each round with and without feedback
        feedback12=fl.n_holdout_workers * (1 + 2 * nu.feedback_rounds) * nu.feedback_per_round,
        rounds12=nu.feedback_rounds, per_round12=nu.feedback_per_round,
        holdout=fl.n_holdout_workers, decode_batch=gen.batch_size)


def rows(prof: Profile) -> list[Row]:
    """Every stage of `make paper` that needs a GPU, with its count and what that count is based on."""
    c = counts(prof)
    u, n = c["users"], c["n_per_user"]
    new09 = c["ablation"] - c["ablation_04"]
    decodes = c["gen04"] + c["gen06"] + c["gen07"] + new09 + c["gen12"] + c["feedback12"]
    dec = f"decode_b{c['decode_batch']}"
    return [
        Row("02 embed, decoder space (ViT-H/14)", c["images"], "image", f"{c['images']:,} FLICKR-AES images",
            "embed_decoder"),
        Row("02 embed, verifier space (bigG)", c["images"], "image", f"{c['images']:,} FLICKR-AES images",
            "embed_verifier"),
        Row("03 prior training", c["prior_epochs"], "epoch", f"≤ {c['prior_epochs']} epochs (early stopping) × "
            f"{c['epoch_samples']:,} samples ({u} users × {prof.train.samples_per_user})", "prior_sample", split=False,
            scale=c["epoch_samples"]),
        Row("04 prior sampling", c["gen04"], "embedding", f"{u} users × {n} × {c['omegas']} ω", "sampling"),
        Row("04 decoding (IP-Adapter)", c["gen04"], "image", f"{u} users × {n} × {c['omegas']} ω", dec),
        Row("05 verifier training", c["verifier_epochs"], "epoch", f"≤ {c['verifier_epochs']} epochs × "
            f"≈ {c['verifier_rows']:,} training rows", "verifier_row", split=False, scale=c["verifier_rows"]),
        Row(f"06 per-user LoRA (r = {c['lora_r']})", u * c["lora_steps"], "step",
            f"{u} users × ≤ {c['lora_steps']:,} steps (Table 3, N > 120)", f"lora_r{c['lora_r']}"),
        Row(f"06 shared LoRA (r = {c['shared_r']})", c["shared_steps"], "step",
            f"{c['shared_steps']:,} steps (Table 4)", f"lora_r{c['shared_r']}", split=False),
        Row("06 decoding (LoRA)", c["gen06"], "image", f"{u} users × {n} × 2 (per-user, shared)", dec),
        Row("07 tagging (LLaVA)", c["tokens"], "token", f"≤ {c['images']:,} training-split images × "
            f"{prof.vlm.max_new_tokens} new tokens (batch {c['vlm_batch']}; priced at 8)", "vlm_b8"),
        Row("07 decoding (personas)", c["gen07"], "image", f"{u} users × {n} × 2 (persona, persona + LoRA)", dec),
        Row("09 ablation decoding", new09, "image", f"{c['ablation_cells']} conditions × {c['ablation_per_user']} × "
            f"{u} = {c['ablation']:,}, less 04's {c['ablation_04']:,}", dec),
        Row("12 new-user decoding", c["gen12"], "image", f"{c['holdout']} new users × ({c['histories']} histories × "
            f"{c['methods12']} methods + {c['once12']} once per user) × {c['n_images12']}", dec),
        Row("12 feedback decoding", c["feedback12"], "image", f"{c['holdout']} new users × (1 + 2 × "
            f"{c['rounds12']} rounds) × {c['per_round12']} images", dec),
        Row("re-encode generated images, decoder space", decodes, "image", "04 + 06 + 07 + 09 + 12", "embed_decoder"),
        Row("re-encode generated images, verifier space", decodes, "image", "04 + 06 + 07 + 09 + 12",
            "embed_verifier"),
        Row("08 LAION + HPS scores", 2 * (c["gen04"] + c["gen06"] + c["gen07"]), "image",
            "04 + 06 + 07 images × 2 scorers, at ViT-H's rate", "embed_decoder"),
    ]


def lookup(measured: dict, name: str) -> tuple[str | None, dict]:
    """(key, measurement) of `name`, or for a per-batch one ("decode_b8") the measured batch size nearest to it."""
    if name in measured:
        return name, measured[name]
    head, _, batch = name.rpartition("_b")
    if not batch.isdigit():
        return None, {}
    sizes = [int(k.rpartition("_b")[2]) for k in measured if k.startswith(head + "_b")]
    if not sizes:
        return None, {}
    key = f"{head}_b{min(sizes, key=lambda b: (abs(b - int(batch)), -b))}"
    return key, measured[key]


def priced(prof: Profile, measured: dict) -> list[Row]:
    """rows() with each row's seconds per unit and peak memory from `measured` (name -> {unit_s, peak_gb})."""
    out = []
    for r in rows(prof):
        key, m = lookup(measured, r.measure)
        basis = r.basis if key in (None, r.measure) else f"{r.basis} [rate of batch {key.rpartition('_b')[2]}]"
        unit_s = None if m.get("unit_s") is None else m["unit_s"] * r.scale
        out.append(Row(**{**r.__dict__, "basis": basis, "unit_s": unit_s, "peak_gb": m.get("peak_gb")}))
    return out


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def table(rows_: list[Row], gpus: int) -> str:
    """The pricing table in Markdown: a row per stage and a total."""
    lines = [f"| stage | count | unit | s per unit | h on 1 GPU | h on {gpus} GPUs | peak GB | based on |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows_:
        lines.append(f"| {r.stage} | {r.count:,} | {r.unit} | {_num(r.unit_s, '.4g')} | {_num(r.hours(1), '.3g')} | "
                     f"{_num(r.hours(gpus), '.3g')}{'' if r.split else ' (one process)'} | "
                     f"{_num(r.peak_gb, '.1f')} | {r.basis} |")
    done = [r for r in rows_ if r.unit_s is not None]
    total1, total_n = sum(r.hours(1) for r in done), sum(r.hours(gpus) for r in done)
    lines.append(f"| **total** ({len(done)} of {len(rows_)} stages measured) | | | | {total1:.3g} | {total_n:.3g} | "
                 f"{_num(max((r.peak_gb for r in done if r.peak_gb is not None), default=None), '.1f')} | |")
    return "\n".join(lines)


def build_ci_cache(folder: Path) -> None:
    """The rehearsal's ci cache (rehearse_hub.build_cache: every paper checkpoint, random weights) in `folder`."""
    # rehearse_hub is an entry point: run as a process (entry points never import each other, tests/test_layout.py)
    code = "import sys; from rebeca_utils.rehearse_hub import build_cache; build_cache(sys.argv[1], 'ci')"
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)


def measure(shape: str, quick: bool, device: str, folder: Path) -> dict:
    """bench_stages' measurements (a child process reading the HF cache; the ci cache under `folder` for "ci")."""
    env = dict(os.environ)
    if shape == "ci":
        t0 = time.perf_counter()
        build_ci_cache(folder / "hub")
        print(f"ci cache built in {time.perf_counter() - t0:.0f} s in {folder / 'hub'} (deleted at the end)",
              flush=True)
        env.update(HF_HUB_CACHE=str(folder / "hub"), HF_HUB_OFFLINE="1")
    out = folder / "measured.json"
    cmd = [sys.executable, "-m", "rebeca_utils.bench_stages", "--out", str(out), "--shape", shape, "--device", device]
    rc = subprocess.run(cmd + (["--quick"] if quick else []), env=env).returncode
    if not out.is_file():
        raise SystemExit(f"error: bench_stages exited {rc} without writing its measurements {out}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    """Measure, then print the pricing table; non-zero when a stage failed."""
    ap = argparse.ArgumentParser(prog="python -m rebeca_utils.bench_price", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=1, help="price the run on this many GPUs too")
    ap.add_argument("--quick", action="store_true", help="the smallest counts (a sanity run)")
    ap.add_argument("--shape", choices=("auto", "paper", "ci"), default="auto",
                    help="paper: the HF cache's weights (default on CUDA); ci: the ci cache (default on a CPU)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a = ap.parse_args(argv)
    if a.gpus < 1:
        ap.error(f"--gpus {a.gpus}: must be >= 1")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shape = a.shape if a.shape != "auto" else ("paper" if device == "cuda" else "ci")
    with tempfile.TemporaryDirectory(prefix="rebeca-bench-") as tmp:
        got = measure(shape, a.quick, device, Path(tmp))
    note = CI_NOTE if shape == "ci" and device == "cpu" else f"{got['shape']['name']} shape on {device}"
    print(f"\nmake paper priced per stage ({note}; {got['machine']}):\n")
    print(table(priced(get_profile("paper"), got["measured"]), a.gpus))
    for f in got["failed"]:
        print(f"FAILED {f}")
    return 1 if got["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
