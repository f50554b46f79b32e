"""`make rehearse`: every notebook (00 -> 13) in the paper profile, offline, on random weights of the paper's
architectures in a Hub-layout cache and a micro FLICKR-AES in the real on-disk format. It runs the paper profile's
own code: it only sets environment variables (HF_HUB_CACHE, HF_HUB_OFFLINE, REBECA_AESTHETIC_HEAD) and passes
`-p` parameters and `overrides`, so what fails here fails on a GPU box before the 30 GB of weights are fetched.

python -m rebeca_utils.rehearse [--size ci|full] [--work DIR] [--only 00 02 ...] [--px 256] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from .config import ModelsConfig
from .data.synthetic import write_synthetic_flickr
from .io import write_json
from .notebook.runs import notebooks_dir
from .rehearse_hub import SIZES, build_cache
from .run import discover, parameter_types, run_notebooks, select
from .steps import folder

SHARED_HEAD = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "laion-aesthetic"
HEAD_NAME = "sac+logos+ava1-l14-linearMSE.pth"

# the micro slice: 5 workers (1 held out), each rating 24 of 40 images (14 for training): every user leaves images
# unrated, as Table 2's random-images row needs
MICRO_DATA = dict(n_workers=5, n_images=40, image_size=64, ratings_per_image=3)

# every stage at the paper's code path, with the counts cut to what a CPU does in minutes
OVERRIDES = {
    "flickr.n_holdout_workers": 1, "flickr.n_test": 5, "flickr.n_val": 5,
    "train.max_epochs": 2, "train.samples_per_user": 8, "train.patience": 2, "diffusion.sampler_steps": 2,
    "dsprites.n_images": 400, "dsprites.vae_epochs": 1, "dsprites.max_epochs": 2, "dsprites.samples_per_user": 50,
    "dsprites.reps": 1, "dsprites.ddpm_reps": 1, "dsprites.umap_points": 100, "dsprites.fifth_ks": [5, 0],
    "dsprites.fifth_draws": 1, "dsprites.fifth_retrain": False,
    "generation.n_per_user": 1, "generation.n_users": 3, "generation.steps": 2, "generation.batch_size": 2,
    "generation.prior_cfg_scales": [5.0, 9.0], "generation.grid_users": 2, "generation.grid_images": 1,
    "generation.grid_cfg_scales": [5.0],
    "verifier.max_epochs": 2, "verifier.n_bootstrap": 20, "eval.n_permutations": 20, "eval.n_bootstrap": 20,
    "eval.batch_size": 4,
    "lora.max_steps": 2, "lora.shared_max_steps": 2, "lora.checkpoint_every": 1, "lora.n_users": 2,
    "lora.grad_accum": 1,
    "vlm.max_new_tokens": 8, "vlm.batch_size": 2, "vlm.chunk_size": 2,
    "ablation.omegas": [5.0, 9.0], "ablation.decoder_cfgs": [1.0, 5.0], "ablation.levels": [0, 2],
    "ablation.level_omegas": [5.0], "ablation.n_per_user": 1,
    "new_users.ks": [5, 0], "new_users.draws": 1, "new_users.steps": 2, "new_users.n_samples": 2,
    "new_users.n_images": 1, "new_users.select_ks": [5, 0], "new_users.select_lrs": [0.05],
    "new_users.select_samples": 2, "new_users.encoder_steps": 2, "new_users.feedback_rounds": 1,
    "new_users.feedback_per_round": 1, "new_users.feedback_steps": 2, "dsprites.fifth_encoder_steps": 2,
}
TABLE2_METHODS = ("REBECA", "Per-user LoRA", "Shared LoRA", "VLM Persona", "VLM Persona + LoRA",
                  "Random images (other users)")
PARAMS = {"tag_limit": 4, "control_per_user": 1, "n_images": 1, "example_ratings": 3}


def aesthetic_head() -> Path:
    """The LAION head: $REBECA_AESTHETIC_HEAD, else the fixture in ../shared beside the kit's checkout."""
    path = Path(os.environ.get("REBECA_AESTHETIC_HEAD") or SHARED_HEAD / HEAD_NAME)
    if not path.is_file():
        raise SystemExit(f"error: the LAION aesthetic head {path} does not exist; point REBECA_AESTHETIC_HEAD at "
                         f"{HEAD_NAME}")
    return path


def prepare(work: Path, size: str) -> dict[str, str]:
    """The Hub-layout cache and the micro dataset under `work`; returns the environment the notebooks run in."""
    hub = work / f"hub-{size}"
    if not (hub / "done.json").is_file():  # a complete cache is reused; a half-written one is rebuilt
        shutil.rmtree(hub, ignore_errors=True)
        t0 = time.perf_counter()
        build_cache(hub, size)
        write_json(hub / "done.json", {"size": size, "seconds": round(time.perf_counter() - t0, 1)})
    write_synthetic_flickr(work / "data" / "FLICKR-AES", **MICRO_DATA)
    return {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "REBECA_AESTHETIC_HEAD": str(aesthetic_head())}


def params(work: Path, declared: set[str], px: int | None = None) -> dict:
    """The `-p` parameters: the data folder, the overrides (images `px` square if given, else the paper's 512²), and
    the per-notebook counts that exist as parameters."""
    out = {"data_dir": str(work / "data"), "overrides": dict(OVERRIDES)}
    if px is not None:
        out["overrides"].update({"generation.height": px, "generation.width": px})
    out.update({k: v for k, v in PARAMS.items() if k in declared})
    return out


def rehearse(work: Path, size: str = "ci", only: list[str] | None = None, log=print,
             px: int | None = None) -> list[dict]:
    """Run the selected notebooks in the paper profile on the rehearsal cache and data; returns the runner's rows."""
    work.mkdir(parents=True, exist_ok=True)
    env = prepare(work, size)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernels the runner starts inherit them; restored afterwards
    try:
        nbs = select(discover(notebooks_dir()), only)
        declared = set().union(*(parameter_types(nb) for nb in nbs))
        return run_notebooks("paper", nbs, params(work, declared, px), work / "outputs", log=log)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check(work: Path, rows: list[dict], models: ModelsConfig | None = None) -> dict:
    """What the rehearsal asserts: every manifest names the paper ids and its peak RSS, Table 2 has every method's
    row, report.html exists. Returns the per-notebook table (seconds, peak RSS, CPU time)."""
    models = models or ModelsConfig()
    want = {"builder": "hub", **{k: getattr(models, k) for k in ("sd_id", "ip_adapter_id", "vlm_id", "hps_id")},
            **{k: list(getattr(models, k)) for k in ("verifier_clip", "aesthetic_clip", "decoder_clip")}}
    table = {}
    for row in rows:
        manifest = json.loads(Path(row["manifest"]).read_text())
        named = (manifest.get("config") or {}).get("models") or {}
        wrong = sorted(k for k, v in want.items() if named.get(k) != v)
        if wrong:
            raise AssertionError(f"{row['notebook']}: its manifest's config does not name the paper's {wrong}")
        if not manifest.get("peak_rss_mb"):
            raise AssertionError(f"{row['notebook']}: manifest has no peak RSS")
        table[row["notebook"]] = {"seconds": round(row["seconds"], 1), "peak_rss_mb": manifest["peak_rss_mb"],
                                  "cpu_time_s": manifest.get("cpu_time_s")}
    run = work / "outputs" / "paper"
    evaluated, figures = run / folder(8), run / folder(11)
    if evaluated.is_dir():
        table2 = pd.read_csv(evaluated / "table2_paper.csv", header=[0, 1, 2], index_col=0)
        ours = table2.xs("ours", axis=1, level=2).dropna(how="all")
        lacking = [m for m in TABLE2_METHODS if not any(str(i).startswith(m) for i in ours.index)]
        if lacking:
            raise AssertionError(f"Table 2 ({evaluated.name}/table2_paper.csv) has no measured row for {lacking}")
    if figures.is_dir() and not (figures / "report.html").is_file():
        raise AssertionError(f"{figures.name} built no report.html")
    return table


def _px(text: str) -> int:
    """--px: a positive multiple of 8 (SD's VAE downsamples by 8)."""
    if not text.isdigit() or int(text) <= 0 or int(text) % 8:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of 8 (e.g. 256)")
    return int(text)


def main(argv=None) -> int:
    """`make rehearse`: prepare, run, check, print the per-notebook table."""
    ap = argparse.ArgumentParser(prog="python -m rebeca_utils.rehearse", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="ci", choices=SIZES)
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--only", nargs="+", metavar="NN")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--px", type=_px, help="images (and LoRA training crops) px square (default: the paper's 512); "
                                           "256 makes a CPU's full-size run ~4x quicker and changes no model's shape")
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix=f"rebeca-rehearse-{a.size}-"))
    try:
        rows = rehearse(work, a.size, a.only, px=a.px)
        table = check(work, rows)
        write_json(work / "rehearsal.json", table)
        for nb, r in table.items():
            print(f"{nb:28s} {r['seconds']:8.1f} s  peak RSS {r.get('peak_rss_mb', 0):8.0f} MB  "
                  f"CPU {r.get('cpu_time_s', 0):8.1f} s")
    finally:
        if not a.work and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
