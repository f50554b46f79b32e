"""Every notebook, headless through the runner in the smoke profile, and the hygiene of committed notebooks."""
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from browser import lab_server, needs_browser, open_notebook, pixels, run_all
from papermill.translators import PythonTranslator

from rebeca_utils import run as runner
from rebeca_utils.baselines import lora_cli as LC
from rebeca_utils.baselines import lora_recipe as R
from rebeca_utils.config import SMOKE_LORA, SMOKE_NEW_USERS, get_profile
from rebeca_utils.data import splits as SP
from rebeca_utils.evaluate import methods as METHODS
from rebeca_utils.evaluate import paper as PAPER
from rebeca_utils.evaluate import retrieval as RET
from rebeca_utils.evaluate import scores as SCORES
from rebeca_utils.evaluate import stats as STATS
from rebeca_utils.models import decoder as DEC
from rebeca_utils.models import encoders as ENC
from rebeca_utils.models import nmf as NMF
from rebeca_utils.notebook.runs import parameter_names
from rebeca_utils.pipeline import decoding as DECODE
from rebeca_utils.pipeline import embeddings as STORE
from rebeca_utils.pipeline import plan as PLAN
from rebeca_utils.train import verifier as TV

REPO = Path(__file__).resolve().parents[1]
# signal thresholds in the smoke world, below what was measured (README, "The smoke world")
MIN_VERIFIER_AUC = 0.75
MIN_P1_OVER_RANDOM = 0.1
MIN_NEW_USER_P1_MARGIN = 0.15  # measured >= 0.20 (inversion / encoder / both 0.49 / 0.56 / 0.47 vs the null user 0.27)
MIN_NEW_USER_VERIFIER_MARGIN = 0.1  # measured >= 0.19 (0.60 / 0.64 / 0.63 vs 0.41)
SCREENSHOT = REPO / ".pytest_cache" / "explorer.png"  # taken by the browser test
NOTEBOOKS = runner.discover(REPO / "notebooks")
# 01 (dSprites) reads nothing of the others: it runs on its own in tests/test_notebook_dsprites.py, so the two
# pytest workers of `make test` share the notebooks
CHAIN = [nb for nb in NOTEBOOKS if not nb.name.startswith("01_")]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Run all notebooks but 01 once, in order (later notebooks read earlier outputs)."""
    out = tmp_path_factory.mktemp("outputs")
    runner.run_notebooks("smoke", CHAIN, {}, out)
    return out / "smoke"


def manifest(root, name):
    return json.loads((root / name / "manifest.json").read_text())


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(nb):
    node = nbformat.read(nb, as_version=4)
    code = [c for c in node.cells if c.cell_type == "code"]
    assert not any(c.outputs or c.execution_count for c in code), f"{nb.name} has outputs or execution counts"
    params = [c for c in node.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{nb.name}: expected exactly one 'parameters' cell, found {len(params)}"
    src = params[0].source
    for name in ("profile", "output_dir", "device", "seed"):
        assert re.search(rf"^{name}: \w+ = .+# why", src, re.M), f"{nb.name}: parameter {name} needs a type and a '# why'"
    assert re.search(r'^device: str = "auto"', src, re.M)
    assert node.cells[0].cell_type == "markdown" and node.cells[0].source.startswith("# ")
    assert re.match(r"^\d\d_[a-z0-9_]+$", nb.stem)
    # papermill's own reading of the cell (its warnings otherwise flood every run): each parameter, once
    assert [p.name for p in PythonTranslator.inspect(params[0])] == parameter_names(nb), nb.name
    long = [line for line in src.splitlines() if len(line) > 100]
    assert not long, f"{nb.name}: parameters-cell lines over 100 characters: {long}"
    dense = [i for i, c in enumerate(node.cells) if c.cell_type == "code" and len(c.source.splitlines()) > 20]
    assert not dense, f"{nb.name}: code cells {dense} have more than 20 lines (short cells tell the story)"


def _outputs(path) -> list[str]:
    """Every text output of an executed notebook, cell by cell."""
    node = nbformat.read(path, as_version=4)
    out = []
    for cell in (c for c in node.cells if c.cell_type == "code"):
        texts = [o.get("text", "") if o.output_type == "stream" else
                 o.get("data", {}).get("text/plain", "") if "data" in o else
                 "\n".join(o.get("traceback", [])) for o in cell.outputs]
        out.append("".join(t if isinstance(t, str) else "".join(t) for t in texts))
    return out


def check_ran_cleanly(root, nb) -> None:
    """An executed notebook: the done line last, no library noise, a manifest whose artifacts exist."""
    cells = _outputs(root / "notebooks" / nb.name)
    last = cells[-1].strip().splitlines()[-1]
    assert re.fullmatch(rf"done: results in {re.escape(str(root / nb.stem))}(; .+)?; next: "
                        r"(\d\d_[a-z0-9_]+|nothing, this is the last notebook)", last), (nb.name, last)
    text = "\n".join(cells)
    for noise in ("No pretrained weights loaded", "is not writable", "PosixPath(", "Loading weights",
                  "image_encoder is not loaded", "No LoRA keys associated"):
        assert noise not in text, (nb.name, noise)
    m = manifest(root, nb.stem)
    assert m["profile"] == "smoke" and m["wall_time_s"] > 0 and m["packages"]["torch"]
    for art in m["artifacts"]:
        assert (root / nb.stem / art).exists(), art


@pytest.mark.slow  # executes notebooks
def test_executed_notebooks_end_with_done_line_stay_quiet_and_wrote_manifests(smoke_run):
    for nb in CHAIN:
        check_ran_cleanly(smoke_run, nb)
    setup = "\n".join(_outputs(smoke_run / "notebooks/00_setup.ipynb"))
    assert "smoke profile: ready." in setup and "needs no downloads" in setup


@pytest.mark.slow  # executes notebooks
def test_missing_prerequisite_stops_at_the_top(smoke_run, tmp_path):
    import shutil

    shutil.copytree(smoke_run / "02_embed_flickr", tmp_path / "smoke" / "02_embed_flickr")
    with pytest.raises(SystemExit) as e:
        runner.run_notebooks("smoke", [REPO / "notebooks/04_generate_images.ipynb"], {}, tmp_path,
                             log=lambda *a, **k: None)
    assert ("PrerequisiteError: 04_generate_images needs the outputs of 03_train_prior, which has not finished in "
            f"{tmp_path / 'smoke/03_train_prior'}; run: python -m rebeca_utils.run --profile smoke --output-dir "
            f"{tmp_path} --only 03") in str(e.value)
    assert not (tmp_path / "smoke" / "04_generate_images").exists()  # checked before anything is written


@pytest.mark.slow  # executes notebooks
def test_02_unreadable_image_listed_in_manifest_and_closing_line(smoke_run, tmp_path):
    import shutil

    d = tmp_path / "smoke" / "02_embed_flickr"
    shutil.copytree(smoke_run / "02_embed_flickr", d)
    bad = sorted((d / "flickr_synthetic/40K").iterdir())[7]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: its chunk is recomputed, the image skipped
    runner.run_notebooks("smoke", [REPO / "notebooks/02_embed_flickr.ipynb"], {}, tmp_path, log=lambda *a, **k: None)
    m = manifest(tmp_path / "smoke", "02_embed_flickr")
    assert [s["image"] for s in m["skipped_images"]] == [bad.name] and m["metrics"]["unreadable_images"] == 1
    last = _outputs(tmp_path / "smoke/notebooks/02_embed_flickr.ipynb")[-1].strip().splitlines()[-1]
    assert "; 1 unreadable image(s) skipped, listed in manifest.json; next: 03_train_prior" in last


@pytest.mark.slow  # executes notebooks
def test_00_setup_reports_offline(smoke_run):
    m = manifest(smoke_run, "00_setup")["metrics"]
    assert m["hub_reachable"] is False and m["weights_total"] == 9
    assert set(m["datasets_present"]) == {"dSprites", "FLICKR-AES"}


@pytest.mark.slow  # executes notebooks
def test_00_setup_paper_profile_offline(tmp_path):
    runner.run_notebooks("paper", [REPO / "notebooks/00_setup.ipynb"], {}, tmp_path, log=lambda *a, **k: None)
    m = manifest(tmp_path / "paper", "00_setup")
    assert m["metrics"]["hub_reachable"] is False and m["config"]["models"]["builder"] == "hub"


@pytest.mark.slow  # executes notebooks
def test_02_flickr_ratings_and_embeddings(smoke_run):
    from rebeca_utils.config import get_profile

    d = smoke_run / "02_embed_flickr"
    m = manifest(smoke_run, "02_embed_flickr")["metrics"]
    smoke = get_profile("smoke")
    assert m["users"] == smoke.flickr.n_workers and m["images"] == smoke.flickr.n_images
    assert 0.28 < m["like_rate"] < 0.40 and m["unreadable_images"] == 0
    assert manifest(smoke_run, "02_embed_flickr")["skipped_images"] == []
    assert m["duplicate_rows"] == m["conflicting_duplicate_rows"] == 0
    assert m["split_sizes"]["test"] == m["split_sizes"]["val"] == 10 * m["users"]
    assert m["holdout_workers"] == smoke.flickr.n_holdout_workers
    assert m["embedding_dims"] == {"decoder": smoke.models.decoder_emb_dim, "verifier": smoke.models.verifier_emb_dim}
    splits, holdout = SP.load_splits(d / "flickr_splits.parquet")
    names, emb = STORE.load_embeddings(d / "embeddings", "decoder", smoke.models)
    assert names == sorted(splits["image"].unique()) and emb.shape == (len(names), smoke.models.decoder_emb_dim)
    # a rerun with everything present does no model work
    store = STORE.embed_images(d / "flickr_synthetic/40K", names, "decoder", smoke.models, d / "embeddings",
                                    device="cpu", progress=False)
    assert store.computed == [] and store.reused


@pytest.mark.slow  # executes notebooks
def test_03_prior_trained_with_signal(smoke_run):
    from rebeca_utils.pipeline.rebeca import RebecaPipeline

    d = smoke_run / "03_train_prior"
    m = manifest(smoke_run, "03_train_prior")["metrics"]
    log = json.loads((d / "training_log.json").read_text())
    assert log["epochs"] == len(log["history"]) and log["best_val_loss"] == min(h["val_loss"] for h in log["history"])
    pipe = RebecaPipeline.from_pretrained(d / "pipeline")
    assert pipe.prior.n_users == 24 and len(pipe.trained_users) == 20 and pipe.users[pipe.trained_users[0]] == {
        "source": "trained"}  # the 4 hold-out workers keep untrained rows and are not users
    card = (d / "pipeline/README.md").read_text()
    assert f"- signal_precision: {m['signal_precision']}" in card and "- flickr_splits.parquet: `" in card
    # planted tastes: samples' nearest held-out item is liked more often than for random training embeddings
    assert m["signal_precision"] > m["signal_random_precision"] + 0.05, m
    assert (d / "loss_curves.png").exists() and (d / "loss_curves.pdf").exists()


@pytest.mark.slow  # executes notebooks
def test_03_grid_records_failures(smoke_run, tmp_path):
    """A tiny grid (with one impossible configuration) runs, and the failure is recorded with its error."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(smoke_run / "02_embed_flickr", out / "smoke" / "02_embed_flickr")
    runner.run_notebooks("smoke", [REPO / "notebooks/03_train_prior.ipynb"],
                         {"run_grid": True, "overrides": {"train.max_epochs": 3}, "grid_axes": {"n_layers": [1], "n_heads": [2, 3], "hidden_dim": [16],
                                                          "n_tokens": [8], "prediction_type": ["sample", "epsilon"],
                                                          "beta_schedule": ["squaredcos_cap_v2"]}},
                         out, log=lambda *a, **k: None)
    grid = pd.read_csv(out / "smoke/03_train_prior/grid_results.csv")
    assert len(grid) == 4
    bad = grid[grid["n_heads"] == 3]  # hidden 16 is not divisible by 3 heads
    assert (bad["status"] == "failed").all() and bad["error"].str.contains("divisible by n_heads=3").all()
    assert (grid[grid["n_heads"] == 2]["status"] == "ok").all() and grid["best_val_loss"].notna().sum() == 2


@pytest.mark.slow  # executes notebooks
def test_04_generation_layout_manifest_and_resume(smoke_run):
    from rebeca_utils.config import get_profile

    d = smoke_run / "04_generate_images"
    m = manifest(smoke_run, "04_generate_images")["metrics"]
    gen = get_profile("smoke").generation
    n_settings = len(gen.prior_cfg_scales)
    assert m["images_planned"] == m["images_ok"] == m["users"] * gen.n_per_user * n_settings and m["images_failed"] == 0
    table = pd.read_csv(d / PLAN.MANIFEST_NAME, keep_default_na=False)
    assert list(table.columns) == PLAN.MANIFEST_COLUMNS and (table["status"] == "ok").all()
    assert (table["seed"] == 42 + 10_000 * table["user_id"] + table["index"]).all()
    assert all((d / p).is_file() for p in table["path"])
    assert set(table["path"].str.extract(r"^rebeca/(prior_cfg\d+)/u\d{3}/\d{2}\.png$")[0]) == {
        f"prior_cfg{w:g}" for w in gen.prior_cfg_scales}
    for fig in ("fig13_samples_prior_cfg5", "fig14_samples_prior_cfg7", "fig15_samples_prior_cfg9"):
        assert (d / f"{fig}.png").exists() and (d / f"{fig}.pdf").exists()
    for space in ENC.SPACES:  # re-encoded for notebooks 08 and 10
        names, emb = STORE.load_embeddings(d / "embeddings", space)
        assert names == sorted(table["path"]) and torch.isfinite(emb).all()
    # everything done: decoding the saved plan again writes nothing and never calls the pipeline
    items, gcfg, models = PLAN.load_plan(d)
    pipe = _NeverCalled(DEC.build_decoder(models, gcfg))
    rep = DECODE.decode(pipe, items, d, gcfg, models=models, progress=False)
    assert rep.written == 0 and rep.skipped == len(items) and rep.batches == 0


class _NeverCalled:
    """A pipeline stand-in whose decoding call fails the test."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kw):
        raise AssertionError("the pipeline was called although every image exists")


@pytest.mark.slow  # executes notebooks
def test_05_verifier_beats_chance_on_planted_tastes(smoke_run):
    from rebeca_utils.config import get_profile

    d = smoke_run / "05_train_verifier"
    m = manifest(smoke_run, "05_train_verifier")["metrics"]
    # the smoke world's verifier-space encoder separates the planted attributes (random encoders: 0.671)
    assert m["auc_test"] >= MIN_VERIFIER_AUC, m["auc_test"]
    assert m["auc_test_ci"][0] < m["auc_test"] < m["auc_test_ci"][1] and m["auc_test_se"] > 0
    # the reported AUC is reproduced from the saved verifier and 02's artifacts alone
    src = smoke_run / "02_embed_flickr"
    splits, _ = SP.load_splits(src / "flickr_splits.parquet")
    test = TV.interactions(splits, STORE.load_embeddings(src / "embeddings", "verifier",
                                                                    get_profile("smoke").models), "test")
    model = NMF.load_verifier(d / "verifier")
    assert STATS.roc_auc(test.like, SCORES.predict(model, test.user_id, test.img_emb)) == pytest.approx(m["auc_test"])
    assert (d / "fig9_verifier_roc.png").exists() and (d / "fig9_verifier_roc.pdf").exists()


@pytest.mark.slow  # executes notebooks
def test_08_evaluation_tables_recomputable(smoke_run):
    from rebeca_utils.config import get_profile

    d = smoke_run / "08_evaluate_methods"
    m = manifest(smoke_run, "08_evaluate_methods")["metrics"]
    gen = get_profile("smoke").generation
    assert m["methods"] == [PAPER.rebeca_label(w) for w in gen.prior_cfg_scales] + [
        "Per-user LoRA", "Shared LoRA", "VLM Persona", "VLM Persona + LoRA"]
    assert m["folders_missing"] == []
    # per-user P/R agree with the single-user function on the same embeddings (both definitions)
    images, _ = METHODS.find_generated(smoke_run)
    models = get_profile("smoke").models
    gen_emb = METHODS.generated_embeddings(images, smoke_run, "verifier", models).numpy()
    splits, _ = SP.load_splits(smoke_run / "02_embed_flickr/flickr_splits.parquet")
    names, real = STORE.load_embeddings(smoke_run / "02_embed_flickr/embeddings", "verifier", models)
    pool = METHODS.heldout_pool(splits, names, real, ("test",))
    pr = pd.read_csv(d / "precision_recall_per_user.csv")
    assert set(pr["definition"]) == {"paper", "reference", "reference_exact"} and pr["user_id"].nunique() > 1
    made = pr[pr["label"] != METHODS.RANDOM_IMAGES_LABEL]
    for _, r in made.sample(18, random_state=0).iterrows():
        g = (images["label"] == r["label"]).to_numpy() & (images["user_id"] == r["user_id"]).to_numpy()
        p = pool["user_id"] == r["user_id"]
        exp = RET.precision_recall_at_k(gen_emb[g], pool["img_emb"].numpy()[p], pool["liked"][p], int(r["k"]),
                                        r["definition"], PAPER.reference_normalised_correctly(r["label"]))
        assert (r["precision"], r["recall"]) == pytest.approx(exp)
    assert all((d / f"table2_{name}.csv").is_file() for name in RET.DEFINITIONS)
    t = pd.read_csv(d / "table2_paper.csv", header=[0, 1], index_col=0)
    assert {"Per-user LoRA", "Shared LoRA"} <= set(t.index)  # Table 2's two LoRA rows (notebook 06)
    assert {"VLM Persona", "VLM Persona + LoRA"} <= set(t.index)  # and its two VLM rows (notebook 07)
    label = m["methods"][0]
    sub = pr[(pr["label"] == label) & (pr["definition"] == "paper") & (pr["k"] == 1)]
    assert t.loc[label, ("@1", "P")] == pytest.approx(sub["precision"].mean())
    # the floor row: REBECA's users and counts, random training images of other users; REBECA's images beat it
    floor = pr[(pr["label"] == METHODS.RANDOM_IMAGES_LABEL) & (pr["definition"] == "paper") & (pr["k"] == 1)]
    assert sorted(floor["user_id"]) == sorted(sub["user_id"]) and floor["n_gen"].sum() == sub["n_gen"].sum()
    rebeca, random = t.loc[PAPER.rebeca_label(5.0), ("@1", "P")], t.loc[METHODS.RANDOM_IMAGES_LABEL, ("@1", "P")]
    assert rebeca >= random + MIN_P1_OVER_RANDOM, (rebeca, random)
    # eq. 5 per user from the saved verifier
    v = pd.read_csv(d / "verifier_per_user.csv")
    model = NMF.load_verifier(smoke_run / "05_train_verifier/verifier")
    g = (images["label"] == label).to_numpy() & (images["user_id"] == v["user_id"][0]).to_numpy()
    assert v[v["method"] == label]["score"].iloc[0] == pytest.approx(
        SCORES.predict(model, int(v["user_id"][0]), gen_emb[g]).mean())
    q = pd.read_csv(d / "quality_per_image.csv")
    cols = ["LAION aesthetic", "HPSv2 (generic prompt)", "HPSv2 (empty prompt)"]
    assert len(q) == len(images) and np.isfinite(q[cols].to_numpy()).all()
    assert not np.allclose(q["HPSv2 (generic prompt)"], q["HPSv2 (empty prompt)"])  # HPS reads the prompt
    for fig in ("fig4_verifier", "fig5a_laion", "fig5b_hps_generic", "fig10_verifier_heatmap", "fig11_ranks",
                "fig12_hps_empty", "table2"):
        assert (d / f"{fig}.png").exists() and (d / f"{fig}.pdf").exists()
    # cached per-image scores: a second pass scores nothing new
    calls = []
    METHODS.cached_scores(smoke_run / "cache/laion_aesthetic.parquet", images["sha256"], images["file"],
                             lambda f: calls.append(f) or np.zeros(len(f)))
    assert calls == []


@pytest.mark.slow  # executes notebooks
def test_06_lora_baselines_adapters_images_and_resume(smoke_run):
    d = smoke_run / "06_lora_baselines"
    m = manifest(smoke_run, "06_lora_baselines")["metrics"]
    jobs, cfg, models, image_root, res = LC.load_train_plan(d)
    users = m["users"]
    assert len(users) == SMOKE_LORA.n_users and [j.name for j in jobs] == [f"per_user/u{u:03d}" for u in users] + ["shared"]
    assert m["adapters_ready"] == len(jobs) and m["adapters_failed"] == 0
    assert m["steps"] == {**{j.name: cfg.max_steps for j in jobs[:-1]}, "shared": cfg.shared_max_steps}
    fl = get_profile("smoke").flickr
    assert sum(m["bucket_users"].values()) == fl.n_workers - fl.n_holdout_workers
    for j in jobs:  # each adapter carries its Table 3 bucket (capped steps) and its fingerprint
        info = json.loads((LC.adapter_dir(d, j) / R.INFO_NAME).read_text())
        assert info["fingerprint"] == j.fingerprint and info["n_images"] == len(j.images)
        if j.user_id is not None:
            bucket = R.bucket_for(len(j.images))
            assert (j.spec.r, j.spec.alpha) == (bucket.spec.r, bucket.spec.alpha)
    table = pd.read_csv(d / PLAN.MANIFEST_NAME, keep_default_na=False)
    gen = get_profile("smoke").generation
    assert (table["status"] == "ok").all() and len(table) == 2 * len(users) * gen.n_per_user
    assert set(zip(table["method"], table["setting"])) == {("lora", "per_user"), ("lora", "shared")}
    assert (table["seed"] == 42 + 10_000 * table["user_id"] + table["index"]).all() and (table["prompt"] == "").all()
    for fig in ("loss_curves", "samples_grid"):
        assert (d / f"{fig}.png").exists() and (d / f"{fig}.pdf").exists()
    # a rerun finds every adapter done and trains nothing (the pipeline stand-in would fail if used)
    rep = LC.train_jobs(jobs, d, cfg, models, image_root, res, progress=False, pipe=object())
    assert rep.trained == [] and len(rep.skipped) == len(jobs)


@pytest.mark.slow  # executes notebooks
def test_07_vlm_personas_tags_prompts_and_images(smoke_run):
    from rebeca_utils.baselines import personas as PERS
    from rebeca_utils.baselines import tagging as TG

    d = smoke_run / "07_vlm_personas"
    m = manifest(smoke_run, "07_vlm_personas")["metrics"]
    prof = get_profile("smoke")
    splits, _ = SP.load_splits(smoke_run / "02_embed_flickr/flickr_splits.parquet")
    tags = pd.read_parquet(d / TG.TAGS_NAME)
    assert tags["image"].tolist() == sorted(splits.loc[splits["split"] == "train", "image"].unique())
    # the tiny random LLaVA: constrained (smoke) every reply parses; free-running none does
    assert m["parse_rate"] == 1.0 and m["free_running_parse_rate"] == 0.0 and m["throughput"]["images"] == len(tags)
    free = pd.read_csv(d / "free_running_sample.csv", keep_default_na=False)
    assert len(free) == 8 and (free["status"] == "failed").all() and free["reason"].str.len().gt(0).all()
    table = pd.read_csv(d / PLAN.MANIFEST_NAME, keep_default_na=False)
    lora_users = manifest(smoke_run, "06_lora_baselines")["metrics"]["users"]
    assert (table["status"] == "ok").all() and m["users_lora"] == lora_users
    assert len(m["users"]) == prof.generation.n_users
    assert len(table) == (len(m["users"]) + len(lora_users)) * prof.generation.n_per_user
    assert (table["seed"] == 42 + 10_000 * table["user_id"] + table["index"]).all()
    # prompts recorded per item: Algorithm 1 on the saved tags, recomputed here
    personas = PERS.build_personas(tags, splits, m["users"], prof.vlm)
    for r in table.sample(12, random_state=0).itertuples():
        assert (r.prompt, r.negative_prompt) == PERS.build_prompt(personas[r.user_id], r.index, prof.vlm)[:2]
    lora = table[table["setting"] == "vlm_lora"]
    assert sorted(lora["user_id"].unique()) == lora_users
    assert all(f"06_lora_baselines/adapters/per_user/u{u:03d}" in p for u, p in zip(lora["user_id"], lora["lora"]))
    for fig in ("tag_examples", "persona_grid"):
        assert (d / f"{fig}.png").exists() and (d / f"{fig}.pdf").exists()


@pytest.mark.slow  # executes notebooks
def test_09_ablations_grid_levels_reuse_and_tests(smoke_run):
    from rebeca_utils.studies import ablations as AB

    d = smoke_run / "09_run_ablations"
    m = manifest(smoke_run, "09_run_ablations")["metrics"]
    prof = get_profile("smoke")
    ab, n_users = prof.ablation, len(m["users"])
    assert len(m["conditions"]) == 6 and m["images"] == m["images_ok"] == 6 * ab.n_per_user * n_users
    # ω = 3 and 9 at decoder CFG 5, level 0 are notebook 04's work items: adopted, byte for byte
    assert m["adopted_from_04"] == 2 * ab.n_per_user * n_users
    table = pd.read_csv(d / PLAN.MANIFEST_NAME, keep_default_na=False)
    for rel in table.loc[table["setting"] == "prior_cfg9", "path"]:
        assert (d / rel).read_bytes() == (smoke_run / "04_generate_images" / rel).read_bytes()
    level2 = table[table["setting"].str.endswith("_prompt2")]
    assert len(level2) and (level2["prompt"] == AB.PROMPT_LEVELS[2][0]).all()
    assert (level2["negative_prompt"] == AB.PROMPT_LEVELS[2][1]).all()
    scored = pd.read_csv(d / "scores_per_image.csv")  # conditions labelled from their folder names
    assert sorted(scored["decoder_cfg"].unique()) == sorted(ab.decoder_cfgs) and len(scored) == m["images"]
    grid = pd.read_csv(d / "fig6_grid.csv")
    assert len(grid) == len(ab.omegas) * len(ab.decoder_cfgs) and grid["verifier"].between(0, 1).all()
    B = prof.eval.n_permutations
    for test in m["fig6_p"] + m["fig7_p"]:
        assert 1 / (B + 1) <= test["p_permutation"] <= 1 and test["users"] == n_users
    assert {t["test"] for t in m["fig7_p"]} == {"level at omega=3", "level at omega=9"}
    for fig in ("fig6_dual_guidance", "fig7_prompt_levels"):
        assert (d / f"{fig}.png").exists() and (d / f"{fig}.pdf").exists()


@pytest.mark.slow  # executes notebooks
def test_11_builds_every_figure_it_can_and_reports_the_gaps(smoke_run, tmp_path):
    import shutil

    from rebeca_utils.io import sha256
    from rebeca_utils.notebook import figures as FIG

    d = smoke_run / "11_make_figures"
    m = manifest(smoke_run, "11_make_figures")["metrics"]
    every = [e.id for e in FIG.REGISTRY]
    dsprites = {e.id for e in FIG.REGISTRY if e.notebook == "01_simulate_dsprites"}  # 01 runs on its own in CI
    assert set(m["missing"]) == dsprites and all("run 01_simulate_dsprites first" in w for w in m["missing"].values())
    assert m["built"] == [i for i in every if i not in dsprites]
    built = json.loads((d / "figures_manifest.json").read_text())
    for row in built:
        for f, digest in row["sources"].items():
            assert digest == sha256(smoke_run / row["notebook"] / f), (row["id"], f)
        assert all((d / f).is_file() for f in row["outputs"])
    page = (d / "report.html").read_text()
    assert page.count("<img") == sum(f.endswith(".png") for r in built for f in r["outputs"])
    compare = pd.read_csv(d / "paper_vs_ours.csv", keep_default_na=False)
    assert "missing: run 01_simulate_dsprites first" in set(compare["note"])
    assert {"verifier ROC-AUC test", "Algorithm 2 p", "matching test z (Fig 8a)"} <= set(compare["quantity"])
    # one source gone: 11 says which notebook to run and still builds the rest
    out = tmp_path / "out"
    shutil.copytree(smoke_run, out / "smoke", ignore=shutil.ignore_patterns("notebooks"))
    (out / "smoke/08_evaluate_methods/verifier_per_user.csv").unlink()
    runner.run_notebooks("smoke", [REPO / "notebooks/11_make_figures.ipynb"], {}, out, log=lambda *a, **k: None)
    gap = manifest(out / "smoke", "11_make_figures")["metrics"]
    assert set(gap["missing"]) == dsprites | {"Fig 4", "Fig 10", "Fig 11"}
    assert "run 08_evaluate_methods first" in gap["missing"]["Fig 4"]
    assert len(gap["built"]) == len(m["built"]) - 3


@pytest.mark.slow  # executes notebooks
def test_10_personalization_tests(smoke_run):
    d = smoke_run / "10_test_personalization"
    m = manifest(smoke_run, "10_test_personalization")["metrics"]
    B = m["n_permutations"]
    for test in ("alg2", "matching", "shuffled_control"):
        assert 1 / (B + 1) <= m[test]["p_value"] <= 1
    # personalization survives generation: Algorithm 2 on REBECA's images, and not with users deranged
    assert m["alg2"]["p_value"] <= 0.01 and m["alg2"]["z"] > 2, m["alg2"]
    assert m["shuffled_control"]["p_value"] > 0.05, m["shuffled_control"]
    assert m["shuffled_control"]["images"] == m["alg2"]["images"]  # 4 per user, as notebook 04's smoke run
    # planted tastes: users' own held-out likes score above random reassignment
    assert m["matching"]["p_value"] <= 0.05 and m["matching"]["z"] > 2, m["matching"]
    assert 0 <= m["r2"]["r2"] <= 1 and m["r2"]["ci_low"] <= m["r2"]["r2"] <= m["r2"]["ci_high"]
    for fig in ("alg2_generated_permutation", "alg2_shuffled_users_control", "fig8a_matching_permutation",
                "fig8b_verifier_vs_aesthetic"):
        assert (d / f"{fig}.png").exists() and (d / f"{fig}.pdf").exists()


@pytest.mark.slow  # executes notebooks
def test_10_algorithm2_recomputed_from_saved_artifacts(smoke_run):
    from rebeca_utils.config import get_profile

    m = manifest(smoke_run, "10_test_personalization")["metrics"]
    images, _ = METHODS.find_generated(smoke_run, ["04_generate_images", "06_lora_baselines"])
    images = images[images["setting"] == "prior_cfg5"]  # the notebook's default setting, in manifest order
    emb = METHODS.generated_embeddings(images, smoke_run, "verifier", get_profile("smoke").models)
    rev = METHODS.generated_embeddings(images.iloc[::-1], smoke_run, "verifier", get_profile("smoke").models)
    assert torch.equal(rev, emb.flip(0))  # rows follow positions, whatever the index
    model = NMF.load_verifier(smoke_run / "05_train_verifier/verifier")
    users = np.sort(images["user_id"].unique())
    owner = np.searchsorted(users, images["user_id"].to_numpy())
    scores = np.stack([SCORES.predict(model, int(u), emb) for u in users])
    res = STATS.permutation_test(scores, owner, m["n_permutations"], 0)
    assert res.statistic == pytest.approx(m["alg2"]["statistic"]) and res.p_value == pytest.approx(m["alg2"]["p_value"])


@pytest.mark.slow  # executes notebooks
def test_08_picks_up_any_method_folder(smoke_run, tmp_path):
    import shutil

    root = tmp_path / "out" / "smoke"
    for nb in ("02_embed_flickr", "04_generate_images", "05_train_verifier"):
        shutil.copytree(smoke_run / nb, root / nb)
    # a stand-in baseline folder in the shared layout: REBECA's CFG-5 images relabelled as a shared LoRA
    base = root / "06_lora_baselines"
    shutil.copytree(smoke_run / "04_generate_images", base)
    table = pd.read_csv(base / PLAN.MANIFEST_NAME, keep_default_na=False)
    table[table["setting"] == "prior_cfg5"].assign(method="lora", setting="shared").to_csv(
        base / PLAN.MANIFEST_NAME, index=False)
    runner.run_notebooks("smoke", [REPO / "notebooks/08_evaluate_methods.ipynb"], {"score_quality": False},
                         tmp_path / "out", log=lambda *a, **k: None)
    m = manifest(root, "08_evaluate_methods")["metrics"]
    assert m["methods"][-1] == "Shared LoRA" and m["folders_missing"] == ["07_vlm_personas"]
    # the same images and verifier: the stand-in scores exactly as REBECA at CFG 5
    assert m["verifier_mean"]["Shared LoRA"] == pytest.approx(m["verifier_mean"]["REBECA (CFG=5.0)"])
    assert m["table2"]["paper"]["Shared LoRA"] == pytest.approx(m["table2"]["paper"]["REBECA (CFG=5.0)"])


@pytest.mark.slow  # executes notebooks
def test_12_new_users_beat_the_population_and_leave_the_prior(smoke_run):
    from rebeca_utils.pipeline.rebeca import RebecaPipeline

    d = smoke_run / "12_fit_new_users"
    m = manifest(smoke_run, "12_fit_new_users")["metrics"]
    assert m["prior_untouched"] and m["reloaded_identical"] and m["encoder_reloaded_identical"]
    assert m["new_users"] == 4 and m["fits"] == 3 * m["histories"]  # inversion, encoder, encoder + inversion
    s = pd.read_csv(d / "metrics_summary.csv")
    at = s[s["history"] == 0].set_index(["metric", "method"])["mean"]
    p1, ver = at["P@1 embedding (paper)"], at["verifier score"]
    for method in ("inversion", "encoder", "encoder_inversion"):  # the hold-out workers, from all their ratings
        assert p1[method] >= p1["null_user"] + MIN_NEW_USER_P1_MARGIN, at
        assert ver[method] >= ver["null_user"] + MIN_NEW_USER_VERIFIER_MARGIN, at
    assert ver["retrain"] > ver["null_user"]  # smoke runs the upper bound too: 03's training with the new workers
    # the encoder is a forward pass: far cheaper than inversion
    assert m["seconds_by_method"]["encoder"] * 50 < m["seconds_by_method"]["inversion"]
    # settings were chosen on seen users' validation ratings, per select k; none of the hold-out workers chose
    sel = pd.read_csv(d / "selection.csv")
    new_ids = json.loads((d / "new_users.json").read_text())["user_ids"]
    assert set(sel["k"]) == {5, 0} and not set(sel["user_id"]) & set(new_ids)
    assert set(m["settings"]) == {"inversion", "encoder_inversion"}
    tests = pd.read_csv(d / "paired_tests.csv")
    assert {"inversion", "encoder"} <= set(tests["method"]) and tests["p_value"].between(0, 1).all()
    # the ceiling: its training-ratings row at the chosen steps is the table's inversion row (same P@1 per worker)
    c, long = pd.read_csv(d / "ceiling_per_user.csv"), pd.read_csv(d / "metrics_per_user.csv")
    steps = m["settings"]["inversion"]["0"]["steps"]
    assert set(c["method"]) == {f"{r}, {n} steps" for r in ("training ratings", "every rating (oracle)")
                                for n in (steps, steps * SMOKE_NEW_USERS.ceiling_factor)}
    p1 = "P@1 embedding (paper)"
    a = c[(c["metric"] == p1) & (c["method"] == f"training ratings, {steps} steps")].set_index("user_id")["value"]
    b = long[(long["metric"] == p1) & (long["history"] == 0) & (long["method"] == "inversion")]
    pd.testing.assert_series_equal(a.sort_index(), b.set_index("user_id")["value"].sort_index())
    fb = pd.read_csv(d / "feedback_summary.csv")
    assert set(fb["round"]) == {0, 1, 2} and set(fb["method"]) == {"feedback", "no feedback"}
    r0 = fb[fb["round"] == 0].set_index(["metric", "method"])["mean"]
    assert r0["verifier score", "feedback"] == r0["verifier score", "no feedback"]  # round 0: one set of images
    # the saved pipeline: the new workers' rows are fitted, every other weight is 03's bit for bit
    old, new = (RebecaPipeline.from_pretrained(p).prior for p in (smoke_run / "03_train_prior/pipeline", d / "pipeline"))
    ids = new_ids
    assert RebecaPipeline.from_pretrained(d / "pipeline").users[ids[0]] == {"source": "inversion"}
    for k, v in old.state_dict().items():
        w = new.state_dict()[k]
        if k == "user_emb.weight":
            rest = [i for i in range(len(v)) if i not in ids]
            assert torch.equal(v[rest], w[rest]) and not torch.equal(v[ids], w[ids])
        else:
            assert torch.equal(v, w), k
    update = pd.DataFrame(m["update"])
    assert update.loc["after", "cos(mean sample, donor's)"] > update.loc["before", "cos(mean sample, donor's)"]
    for f in ("inversion/kall_d0/u001/00.png", "encoder/k5_d0/u001/00.png", "new_users_vs_k.pdf", "feedback_rounds.pdf"):
        assert (d / f).is_file(), f


@pytest.mark.slow  # executes notebooks
def test_13_static_grid_and_a_saved_new_user(smoke_run):
    d = smoke_run / "13_explore_users"
    m = manifest(smoke_run, "13_explore_users")["metrics"]
    assert m["reloaded_same"] and m["example_likes"] > 0 and m["fit_seconds"] > 0 and 0 <= m["grid_verifier_mean"] <= 1
    # a new user gets a verifier score from a fitted row; feedback on generated images moves the user
    assert m["new_user_verifier_fitted"] and 0 <= m["new_user_v"] <= 1
    assert m["feedback_seconds"] > 0 and m["feedback_changed_images"] and 0 <= m["feedback_v_after"] <= 1
    for fig in ("default_grid", "new_user_example", "feedback_round"):
        assert (d / f"{fig}.png").is_file() and (d / f"{fig}.pdf").is_file()
    assert (d / "users/example.safetensors").is_file()


@pytest.mark.slow  # starts JupyterLab, a kernel and a browser (about a minute)
@needs_browser
def test_13_explorer_in_jupyterlab(smoke_run, tmp_path):
    """Run notebook 13 in Lab; change the user and ω, Generate; a like on a generated image, Update; page the
    gallery, like three images and dislike one, Fit me; save, restart the kernel and run all, load in the fresh
    panel, the same seed gives the same images; compare; a screenshot."""
    import shutil

    from playwright import (
        sync_api,  # optional (the `test` extra): needs_browser says when it is missing
    )

    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    for nb in ("02_embed_flickr", "03_train_prior", "05_train_verifier"):
        shutil.copytree(smoke_run / nb, tmp_path / "outputs" / "smoke" / nb)
    expect = sync_api.expect
    with lab_server(tmp_path) as url, sync_api.sync_playwright() as p:
        browser, page = open_notebook(p, url, "notebooks/13_explore_users.ipynb")
        run_all(page)
        go, status = page.locator("button.rebeca-generate"), page.locator(".rebeca-status")
        expect(go).to_be_visible(timeout=240_000)
        users = page.locator(".rebeca-user select")
        name = users.locator("option").nth(2).inner_text()
        users.select_option(index=2)
        readout = page.locator(".rebeca-omega .widget-readout")
        readout.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("9")
        page.keyboard.press("Enter")
        go.click()
        expect(status).to_contain_text(f"grid 1: {name}, prior ω 9,", timeout=120_000)
        grid = page.locator(".rebeca-grid img.rebeca-grid-image")
        expect(grid).to_have_count(4)
        # feedback: a like on a generated image updates the user, and a new grid follows
        page.locator(".rebeca-grid .rebeca-feedback").first.get_by_role("button", name="✓", exact=True).click()
        page.locator("button.rebeca-update").click()
        expect(status).to_contain_text(f"updated {name} from 1 ratings on generated images", timeout=120_000)
        expect(status).to_contain_text(f"grid 2: {name}, prior ω 9,")
        # a new user: page 1 of the gallery, three likes and a dislike, Fit me
        page.locator(".widget-tab .lm-TabBar-tab", has_text="New user").click()
        gallery = page.locator(".rebeca-gallery")
        first = pixels(gallery.locator("img").first)
        page.locator(".rebeca-page input").fill("1")
        page.locator(".rebeca-page input").press("Enter")
        for _ in range(60):  # the gallery redraws from the kernel
            if pixels(gallery.locator("img").first) != first:
                break
            page.wait_for_timeout(500)
        assert pixels(gallery.locator("img").first) != first  # another page, other images
        for i in range(3):
            gallery.get_by_role("button", name="✓", exact=True).nth(i).click()  # like
        gallery.get_by_role("button", name="✗", exact=True).nth(3).click()  # dislike
        page.locator("button.rebeca-fit").click()
        expect(status).to_contain_text("grid 3: new user, prior ω 9,", timeout=120_000)
        expect(grid).to_have_count(4)
        out = page.locator(".rebeca-fit-out")
        expect(out).to_contain_text("fitted 'new user' on 3 likes and 1 dislikes")
        expect(page.locator(".rebeca-grid small", has_text="v* =")).to_have_count(4)  # from a fitted verifier row
        before = [pixels(grid.nth(i)) for i in range(4)]
        # save; a fresh kernel and a fresh panel; load; the same seed: the same images
        page.locator("button.rebeca-save").click()
        expect(out).to_contain_text("saved ")
        saved = page.locator(".rebeca-path input").input_value()
        page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Restart Kernel and Run All Cells").first.click()
        page.locator(".jp-Dialog .jp-mod-accept").click()
        expect(grid).to_have_count(0, timeout=120_000)  # the old panel's output is gone
        expect(go).to_be_visible(timeout=240_000)
        page.locator(".widget-tab .lm-TabBar-tab", has_text="New user").click()
        page.locator(".rebeca-path input").fill(saved)
        page.locator("button.rebeca-load").click()
        expect(out).to_contain_text("loaded 'new user' as user id", timeout=60_000)
        page.locator(".widget-tab .lm-TabBar-tab", has_text="Explore").click()
        expect(page.locator(".rebeca-strip img")).to_have_count(3)  # the loaded user's strip: the three likes
        readout.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("9")
        page.keyboard.press("Enter")
        go.click()
        expect(status).to_contain_text("grid 1: new user, prior ω 9,", timeout=120_000)
        expect(grid).to_have_count(4)
        assert [pixels(grid.nth(i)) for i in range(4)] == before
        page.locator(".rebeca-compare input").check()
        vs = page.locator(".rebeca-other select").evaluate("e => e.options[e.selectedIndex].text")
        assert vs != "new user"  # loading a user keeps the comparison user as chosen
        go.click()
        expect(status).to_contain_text(f"grid 2: new user, {vs}, prior ω 9,", timeout=120_000)
        expect(grid).to_have_count(8)  # the same seeds for both users, side by side
        page.add_style_tag(content=".Toastify { display: none !important; }")  # Lab's news prompt
        panel = page.locator(".widget-tab").first
        panel.scroll_into_view_if_needed()
        panel.screenshot(path=tmp_path / "explorer.png")
        errors = page.locator(".jp-Notebook [data-mime-type='application/vnd.jupyter.stderr']", has_text="Error")
        assert errors.count() == 0, errors.all_inner_texts()
        browser.close()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "explorer.png", SCREENSHOT)  # README's screenshot: docs/explorer.png is a copy of it
