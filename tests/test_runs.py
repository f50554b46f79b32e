"""Run folders: prerequisites checked at the top of a notebook, inputs and digests in the manifest, the closing line."""
import json
import subprocess
import sys
import time

import pytest

from rebeca_utils.notebook.runs import PrerequisiteError, Run

NBS = ["02_embed_flickr", "03_train_prior", "04_generate_images"]


def _run(root, name):
    return Run(root, "smoke", name, 0, {"seed": 0}, notebooks=NBS)


def _produce(root, text, capsys=None):
    r = _run(root, "02_embed_flickr")
    r.path("flickr_splits.parquet").parent.mkdir(parents=True, exist_ok=True)
    r.path("flickr_splits.parquet").write_text(text)
    r.finish({}, "cpu")


def test_missing_prerequisite_says_what_to_run(tmp_path):
    with pytest.raises(PrerequisiteError) as e:
        _run(tmp_path, "04_generate_images").require("02_embed_flickr", "03_train_prior")
    assert str(e.value) == (f"04_generate_images needs the outputs of 02_embed_flickr, which has not finished in "
                            f"{tmp_path / 'smoke/02_embed_flickr'}; run: python -m rebeca_utils.run --profile smoke "
                            f"--output-dir {tmp_path} --only 02")
    _produce(tmp_path, "splits v1")
    with pytest.raises(PrerequisiteError) as e:
        _run(tmp_path, "03_train_prior").input("02_embed_flickr", "embeddings/decoder/embeddings.safetensors")
    assert str(e.value) == (f"{tmp_path / 'smoke/02_embed_flickr/embeddings/decoder/embeddings.safetensors'} not "
                            "found: 03_train_prior reads it from 02_embed_flickr; run: python -m rebeca_utils.run "
                            f"--profile smoke --output-dir {tmp_path} --only 02")


def test_stale_prerequisite_after_its_input_was_remade(tmp_path):
    _produce(tmp_path, "splits v1")
    r3 = _run(tmp_path, "03_train_prior")
    r3.require("02_embed_flickr")
    assert r3.input("02_embed_flickr", "flickr_splits.parquet").read_text() == "splits v1"
    r3.finish({}, "cpu")
    m3 = json.loads((tmp_path / "smoke/03_train_prior/manifest.json").read_text())
    m2 = json.loads((tmp_path / "smoke/02_embed_flickr/manifest.json").read_text())
    assert m3["inputs"] == {"02_embed_flickr/flickr_splits.parquet": m2["digests"]["flickr_splits.parquet"]}
    _run(tmp_path, "04_generate_images").require("02_embed_flickr", "03_train_prior")  # current: fine
    _produce(tmp_path, "splits v1")  # 02 rerun with the same result: still current
    _run(tmp_path, "04_generate_images").require("03_train_prior")
    _produce(tmp_path, "splits v2")  # 02 rerun with other data or parameters: 03 is out of date
    with pytest.raises(PrerequisiteError) as e:
        _run(tmp_path, "04_generate_images").require("02_embed_flickr", "03_train_prior")
    assert str(e.value) == ("03_train_prior is out of date: 02_embed_flickr has remade flickr_splits.parquet since "
                            "03_train_prior read it; run: python -m rebeca_utils.run --profile smoke --output-dir "
                            f"{tmp_path} --only 03")
    import shutil

    shutil.rmtree(tmp_path / "smoke/02_embed_flickr")  # a copied or pruned outputs folder: nothing to compare
    _run(tmp_path, "04_generate_images").require("03_train_prior")


def test_finish_lists_skipped_images_and_says_what_is_next(tmp_path, capsys):
    r = _run(tmp_path, "02_embed_flickr")
    r.finish({"auc": float("nan")}, "cpu", skipped_images=[{"image": "b.jpg", "reason": "OSError: truncated"},
                                                           {"image": "a.jpg", "reason": "empty file"}])
    m = json.loads((tmp_path / "smoke/02_embed_flickr/manifest.json").read_text())
    assert [s["image"] for s in m["skipped_images"]] == ["a.jpg", "b.jpg"] and m["metrics"] == {"auc": None}
    assert capsys.readouterr().out == (f"done: results in {tmp_path / 'smoke/02_embed_flickr'}; 2 unreadable image(s) "
                                       "skipped, listed in manifest.json; next: 03_train_prior\n")
    _run(tmp_path, "04_generate_images").finish({}, "cpu")
    assert capsys.readouterr().out.endswith("; next: nothing, this is the last notebook\n")


def test_manifest_records_peak_rss_and_cpu_time(tmp_path):
    ballast = b"\x01" * (96 << 20)  # 96 MB touched: the peak is at least that
    cpu = time.process_time()
    _run(tmp_path, "03_train_prior").finish({}, "cpu")
    m = json.loads((tmp_path / "smoke/03_train_prior/manifest.json").read_text())
    assert isinstance(m["peak_rss_mb"], float) and m["peak_rss_mb"] > 96 and len(ballast) == 96 << 20
    # this process's CPU time, user + system, as time.process_time() counts it (getrusage may count in ticks)
    assert isinstance(m["cpu_time_s"], float) and 0 < cpu - 0.05 <= m["cpu_time_s"] <= time.process_time() + 0.05


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + exec keeps ru_maxrss on Linux")
def test_a_kernel_started_by_a_big_process_reports_its_own_peak():
    ballast = b"\x01" * (1200 << 20)  # the parent (a runner that built a cache in-process) holds 1.2 GB
    code = "from rebeca_utils.notebook.runs import resource_usage; print(resource_usage()['peak_rss_mb'])"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert len(ballast) == 1200 << 20 and child < 1000, child  # ru_maxrss alone reports >= 1200 (the import: ~500)
