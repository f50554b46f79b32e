"""Notebook 00: environment report, paper weights in the HF cache, datasets present and valid, downloads."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..config import ModelsConfig
from ..data.dsprites import DSPRITES_FILENAME, check_dsprites_npz, download_dsprites
from ..data.flickr import DataError, load_ratings
from ..models.weights import download_paper_weights, paper_weights, weights_in_cache
from ..models.tiny_weights import pretrained, world_dir, world_ready
from .runs import package_versions

FLICKR_EXPECTED = {"images": 40_988, "users": 210, "ratings": 193_208}  # paper §4.1

DSPRITES_FALLBACK = "notebook 01 renders the same factor grid procedurally"


def environment_report(device: str) -> pd.DataFrame:
    """Python/package versions, the resolved device and, on CUDA, the GPU and its memory."""

    rows = [{"item": k, "value": v or "not installed"} for k, v in package_versions().items()]
    rows.append({"item": "device", "value": device})
    rows.append({"item": "torch CUDA build", "value": torch.version.cuda or "none"})
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append({"item": f"cuda:{i}", "value": f"{p.name}, {p.total_memory / 2**30:.1f} GiB"})
    return pd.DataFrame(rows).set_index("item")


def weights_report(models: ModelsConfig | None = None) -> pd.DataFrame:
    """Each paper-profile weight and whether it is already in the Hugging Face cache."""

    rows = [{"weights": e.label, "repo": e.repo_id, "files": ", ".join(e.files), "in_cache": weights_in_cache(e)}
            for e in paper_weights(models or ModelsConfig())]
    return pd.DataFrame(rows)


def dsprites_status(data_dir: str | Path) -> dict:
    """Whether the official dSprites npz is under <data_dir>/dsprites/ and structurally valid."""

    path = Path(data_dir) / "dsprites" / DSPRITES_FILENAME
    out = {"dataset": "dSprites", "path": str(path), "optional": True}  # 01 renders the same grid without it
    if not path.exists():
        return {**out, "present": False, "valid": False, "note": f"optional, absent: {DSPRITES_FALLBACK}"}
    chk = check_dsprites_npz(path, full=True)  # present, notebook 01 reads it: an invalid one must not pass
    return {**out, "present": True, "valid": bool(chk["ok"]), "note": "; ".join(chk["problems"]) or "ok"}


def flickr_status(data_dir: str | Path) -> dict:
    """Whether FLICKR-AES is under <data_dir>/FLICKR-AES/, passes validation, and has the paper's counts."""

    root = Path(data_dir) / "FLICKR-AES"
    out = {"dataset": "FLICKR-AES", "path": str(root), "optional": False, "present": root.exists(), "valid": False}
    if not root.exists():
        return {**out, "note": "absent: see README 'Data' for where to get it and the expected layout"}
    try:
        ratings, report = load_ratings(root)
    except (DataError, FileNotFoundError) as err:
        return {**out, "note": str(err)}
    counts = {"images": report["images_in_folder"],
              "users": ratings["user_id"].nunique(), "ratings": len(ratings)}
    diffs = [f"{k} {counts[k]:,} (paper {v:,})" for k, v in FLICKR_EXPECTED.items() if counts[k] != v]
    return {**out, "valid": True, "note": "matches the paper's counts" if not diffs else "differs: " + "; ".join(diffs)}


def datasets_report(data_dir: str | Path) -> pd.DataFrame:
    """Presence and validity of every dataset the kit uses, and whether the paper profile can do without it."""
    return pd.DataFrame([dsprites_status(data_dir), flickr_status(data_dir)])


def download_all(data_dir: str | Path, models: ModelsConfig | None = None) -> dict:
    """Fetch the paper weights (huggingface_hub, progress bars) and the official dSprites npz."""

    weights = download_paper_weights(models=models or ModelsConfig())
    npz = download_dsprites(Path(data_dir) / "dsprites" / DSPRITES_FILENAME)
    return {"weights": weights, "dsprites": str(npz)}


def blockers(weights: pd.DataFrame, datasets: pd.DataFrame) -> list[str]:
    """What keeps the paper profile from running here: uncached weights, required datasets missing or invalid,
    optional ones present but invalid (their notebook would read them); an absent optional dataset is none."""
    missing = weights.loc[~weights["in_cache"], "weights"].tolist()
    bad = datasets.loc[~datasets["valid"] & (~datasets["optional"] | datasets["present"]), "dataset"].tolist()
    todo = []
    if missing:
        todo.append(f"{len(missing)} of {len(weights)} weights are not cached ({', '.join(missing)}): rerun with "
                    "download=True on a machine with internet")
    if bad:
        todo.append(f"dataset(s) {', '.join(bad)} missing or invalid: see README 'Data' and the notes below")
    return todo


def readiness(profile: str, models: ModelsConfig, weights: pd.DataFrame, datasets: pd.DataFrame) -> str:
    """One plain paragraph: can this profile run here, and if not, what to fetch; optional items never decide it."""
    if models.builder == "tiny":
        if not pretrained(models):
            world = "random weights (models.tiny_weights='random')"
        elif world_ready(models):
            world = f"the smoke world trained on the synthetic images, cached in {world_dir(models)}"
        else:
            world = ("the smoke world, trained on the synthetic images on first use (about 5 min on 2 CPU cores; "
                     "`python -m rebeca_utils.world` does it now)")
        return (f"{profile} profile: ready. It builds tiny models from configs with {world}, and writes a "
                "synthetic FLICKR-AES in the real on-disk format, so it needs no downloads and no GPU; the weights "
                "and datasets below matter only for the paper profile.")
    todo = blockers(weights, datasets)
    optional = datasets[datasets["optional"] & ~datasets["present"]]
    extra = "".join(f" {r.dataset}: {r.note}." for r in optional.itertuples())  # said, but never "not ready"
    if not todo:
        return (f"{profile} profile: ready; every weight is in the Hugging Face cache and every required dataset "
                f"is valid.{extra}")
    return f"{profile} profile: not ready; " + "; ".join(todo) + f".{extra}"
