"""The numbered steps (notebooks 00-13): number, name, output folder, title and main outputs, in one registry.

Every other module takes a step's folder name and its "rerun notebook NN (NN_name)" text from here; tests check the
registry against notebooks/ (the files, their titles, the outputs their code names)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Step:
    """One numbered notebook: its folder (`<output_dir>/<profile>/<folder>`) is its file's stem."""

    number: int
    name: str
    title: str  # the notebook's heading after "NN · "
    produces: tuple[str, ...]  # the files and folders other notebooks or the kit read from its folder

    @property
    def nn(self) -> str:
        return f"{self.number:02d}"

    @property
    def folder(self) -> str:
        return f"{self.nn}_{self.name}"


STEPS = (
    Step(0, "setup", "Setup and data check", ("weights.csv", "datasets.csv")),
    Step(1, "simulate_dsprites", "REBECA under control: the dSprites study",
         ("vae", "pipeline", "table1_inputs.npz", "fig2_umap_vae.png", "fig3_users.png")),
    Step(2, "embed_flickr", "FLICKR-AES: ratings, splits and CLIP embeddings", ("flickr_splits.parquet", "embeddings")),
    Step(3, "train_prior", "Training the REBECA prior", ("pipeline", "training_log.json")),
    Step(4, "generate_images", "Personalized generation with REBECA", ("rebeca", "generation_manifest.csv")),
    Step(5, "train_verifier", "The personalization verifier", ("verifier", "fig9_verifier_roc.png")),
    Step(6, "lora_baselines", "LoRA baselines",
         ("lora", "generation_manifest.csv", "table3_bucket_counts.csv", "table4_shared.csv")),
    Step(7, "vlm_personas", "VLM baselines", ("persona", "generation_manifest.csv", "captions.parquet")),
    Step(8, "evaluate_methods", "Evaluation",
         ("verifier_per_user.csv", "quality_per_image.csv", "table2_paper.csv", "table2_reference.csv")),
    Step(9, "run_ablations", "Ablations",
         ("fig6_grid.csv", "fig6_effects.csv", "fig7_summary.csv", "fig7_tests.csv")),
    Step(10, "test_personalization", "Personalization beyond global aesthetics",
         ("per_user.csv", "fig8a_matching_permutation.png", "fig8b_verifier_vs_aesthetic.png")),
    Step(11, "make_figures", "Every figure and table of the paper", ("report.html", "paper_vs_ours.csv")),
    Step(12, "fit_new_users", "New users without retraining", ("table_new_users.csv", "metrics_per_user.csv")),
    Step(13, "explore_users", "Explorer", ("users",)),
)


def step(nn: int | str) -> Step:
    """The step numbered `nn` (3 or "03")."""
    try:
        found = STEPS[int(nn)]
    except (ValueError, IndexError):
        found = None
    if found is None or found.number != int(nn):
        raise KeyError(f"no notebook numbered {nn!r}; the steps are {STEPS[0].nn}-{STEPS[-1].nn}")
    return found


def folder(nn: int | str) -> str:
    """The output folder (and notebook file stem) of step `nn`, e.g. "03_train_prior"."""
    return step(nn).folder


def notebook(nn: int | str) -> str:
    """How a message names step `nn`: "notebook 03 (03_train_prior)"."""
    s = step(nn)
    return f"notebook {s.nn} ({s.folder})"


def redo(nn: int | str) -> str:
    """What an error message tells the user to do when step `nn`'s output is missing or stale."""
    return f"rerun {notebook(nn)}"


def path(root: str | os.PathLike, nn: int | str, *parts: str) -> Path:
    """`<root>/<folder of nn>/<parts...>`, where `root` is a profile's output folder (`<output_dir>/<profile>`)."""
    return Path(root, folder(nn), *parts)


def producers(artifact: str) -> tuple[str, ...]:
    """The folders of the steps that produce `artifact` (e.g. generation_manifest.csv: the method folders)."""
    return tuple(s.folder for s in STEPS if artifact in s.produces)
