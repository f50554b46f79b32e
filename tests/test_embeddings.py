"""Embedding stores: dims per space, determinism, resume, atomic chunks, bad images, refusals, 2-process merge."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rebeca_utils import io as IO
from rebeca_utils import runtime as RT
from rebeca_utils.config import get_profile
from rebeca_utils.data.flickr import image_names
from rebeca_utils.data.synthetic import write_synthetic_flickr
from rebeca_utils.models import encoders as ENC
from rebeca_utils.pipeline import embed_cli as EMBED_CLI
from rebeca_utils.pipeline import embeddings as STORE
from rebeca_utils.steps import redo

TINY = get_profile("smoke").models
KW = dict(chunk_size=8, batch_size=4, progress=False, device="cpu")  # 40 images -> 5 chunks of 2 batches
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = write_synthetic_flickr(tmp_path_factory.mktemp("flickr") / "fl", n_workers=6, n_images=40, image_size=32)
    return root / "40K"


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """One single-process decoder-space run, merged."""
    out = tmp_path_factory.mktemp("ref")
    STORE.embed_images(images, None, "decoder", TINY, out, **KW).merge()
    return out


@pytest.fixture
def counts(monkeypatch):
    """Counts encoder builds and encode (model) calls."""
    n = {"build": 0, "encode": 0}
    build, encode = ENC.build_encoder, ENC.Encoder.encode

    def counting_build(*a, **k):
        n["build"] += 1
        return build(*a, **k)

    def counting_encode(self, pixels):
        n["encode"] += 1
        return encode(self, pixels)

    monkeypatch.setattr(STORE, "build_encoder", counting_build)  # where embed_images looks it up
    monkeypatch.setattr(ENC.Encoder, "encode", counting_encode)
    return n


def _chunks(out, space="decoder"):
    return sorted(p.name for p in (Path(out) / space).iterdir() if p.name.startswith("chunk_"))


def _stray(out, space="decoder"):
    return [p.name for p in (Path(out) / space).iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------- spaces


@pytest.mark.parametrize("space,dim", [("decoder", TINY.decoder_emb_dim), ("verifier", TINY.verifier_emb_dim)])
def test_dims_per_space_and_rows_keyed_by_name(images, tmp_path, space, dim):
    store = STORE.embed_images(images, None, space, TINY, tmp_path, **KW)
    store.merge()
    names, emb = STORE.load_embeddings(tmp_path, space, models=TINY)
    assert names == image_names(images.parent) and emb.shape == (40, dim) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert not torch.allclose(emb.norm(dim=1), torch.ones(40))  # stored raw, not normalised
    index = json.loads((tmp_path / space / "index.json").read_text())
    assert index["rows"] == {n: i for i, n in enumerate(names)} and index["dim"] == dim and index["failures"] == []
    # the row of a name is that image's embedding, as the encoder gives it one image at a time
    from PIL import Image

    enc = ENC.build_encoder(space, TINY)
    for name in (names[0], names[17]):
        one = enc.encode(enc.transform(Image.open(images / name).convert("RGB"))[None])
        torch.testing.assert_close(store.lookup([name]), one, atol=1e-5, rtol=1e-5)
    assert torch.equal(STORE.lookup(tmp_path, space, [names[3], names[1]]), emb[[3, 1]])
    with pytest.raises(KeyError, match="nope.jpg"):
        store.lookup(["nope.jpg"])


def test_deterministic(images, reference, tmp_path):
    STORE.embed_images(images, list(reversed(image_names(images.parent))), "decoder", TINY, tmp_path, **KW).merge()
    a, b = STORE.load_embeddings(reference, "decoder"), STORE.load_embeddings(tmp_path, "decoder")
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_models_mismatch_refused_on_load(reference):
    from dataclasses import replace

    with pytest.raises(ENC.EmbeddingError, match="made by"):
        STORE.load_embeddings(reference, "decoder", models=replace(TINY, decoder_emb_dim=64))


# ----------------------------------------------------------------------------------------------- resume


def test_rerun_does_no_model_work_and_resume_recomputes_only_missing(images, reference, tmp_path, counts):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    store = STORE.embed_images(images, None, "decoder", TINY, out, **KW)
    assert counts == {"build": 0, "encode": 0} and store.computed == [] and store.reused == [0, 1, 2, 3, 4]

    (out / "decoder" / "chunk_00002.safetensors").unlink()
    (out / "decoder" / "chunk_00004.safetensors").write_bytes(b"truncated")  # a foreign/corrupt file: redone
    store = STORE.embed_images(images, None, "decoder", TINY, out, **KW)
    assert store.computed == [2, 4] and store.reused == [0, 1, 3]
    assert counts == {"build": 1, "encode": 4}  # 2 chunks of 2 batches
    store.merge()
    a, b = STORE.load_embeddings(reference, "decoder"), STORE.load_embeddings(out, "decoder")
    assert a[0] == b[0] and torch.allclose(a[1], b[1], atol=1e-6)

    # other chunking or another encoder: nothing is reused, rows never mix
    store = STORE.embed_images(images, None, "decoder", TINY, out, **{**KW, "chunk_size": 16})
    assert store.computed == [0, 1, 2] and store.reused == []


def test_interrupted_run_leaves_whole_chunks_and_resumes(images, reference, tmp_path, monkeypatch, counts):
    encode = ENC.Encoder.encode

    def dies_on_fifth(self, pixels):
        if counts["encode"] == 4:  # first batch of chunk 2
            raise KeyboardInterrupt
        return encode(self, pixels)

    monkeypatch.setattr(ENC.Encoder, "encode", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        STORE.embed_images(images, None, "decoder", TINY, tmp_path, **KW)
    assert _chunks(tmp_path) == ["chunk_00000.safetensors", "chunk_00001.safetensors"] and not _stray(tmp_path)
    with pytest.raises(ENC.EmbeddingError, match="chunk_00002"):
        STORE.merge(tmp_path, "decoder")

    # killed while writing chunk 2: the half-written temp file never becomes a chunk
    def half_write(path, data):
        with IO.atomic_path(path) as tmp:
            tmp.write_bytes(data[:100])
            raise KeyboardInterrupt

    monkeypatch.setattr(ENC.Encoder, "encode", encode)
    monkeypatch.setattr(IO, "atomic_write", half_write)
    with pytest.raises(KeyboardInterrupt):
        STORE.embed_images(images, None, "decoder", TINY, tmp_path, **KW)
    assert len(_chunks(tmp_path)) == 2 and not _stray(tmp_path)

    monkeypatch.undo()
    store = STORE.embed_images(images, None, "decoder", TINY, tmp_path, **KW)
    assert store.computed == [2, 3, 4] and store.reused == [0, 1]
    store.merge()
    assert torch.allclose(STORE.load_embeddings(tmp_path, "decoder")[1], STORE.load_embeddings(reference, "decoder")[1],
                          atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def broken(images, tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(images, d)
    names = sorted(p.name for p in d.iterdir())
    data = (d / names[5]).read_bytes()
    (d / names[5]).write_bytes(data[: len(data) // 2])  # truncated JPEG
    (d / names[20]).write_bytes(b"not a jpeg at all")
    return d, names[5], names[20]


def test_corrupt_image_skipped_and_reported_by_name(broken, tmp_path):
    d, bad1, bad2 = broken
    store = STORE.embed_images(d, None, "decoder", TINY, tmp_path / "out", on_error="skip", **KW)
    assert [f["name"] for f in store.failures] == [bad1, bad2]
    assert "truncated" in store.failures[0]["error"].lower()
    store.merge()
    names, emb = store.load()
    assert len(names) == 38 and bad1 not in names and emb.shape == (38, TINY.decoder_emb_dim)
    assert [f["name"] for f in STORE.failures(tmp_path / "out", "decoder")] == [bad1, bad2]
    # rerun: failures are remembered, no model work; "raise" now refuses the recorded failure
    assert STORE.embed_images(d, None, "decoder", TINY, tmp_path / "out", **KW).computed == []
    with pytest.raises(ENC.EmbeddingError, match=f"{bad1}: cannot read image"):
        STORE.embed_images(d, None, "decoder", TINY, tmp_path / "out", on_error="raise", **KW)


def test_corrupt_image_fatal_with_raise(broken, tmp_path):
    d, bad1, _ = broken
    with pytest.raises(ENC.EmbeddingError, match=re.escape(f"{d / bad1}: cannot read image: OSError: ")):
        STORE.embed_images(d, None, "decoder", TINY, tmp_path, on_error="raise", **KW)
    assert _chunks(tmp_path) == [] and not _stray(tmp_path)  # the bad image is in chunk 0


class _Fake(ENC.Encoder):
    space = "decoder"

    def __init__(self, out):
        self.out, self.dim, self.fingerprint = out, TINY.decoder_emb_dim, ENC.fingerprint("decoder", TINY)
        self.transform = lambda im: torch.zeros(3, 4, 4)

    def _forward(self, pixels):
        return self.out(len(pixels))


def test_nan_and_wrong_dim_refused(images, tmp_path):
    names = image_names(images.parent)

    def nan_in_row_2(b):
        x = torch.ones(b, TINY.decoder_emb_dim)
        x[min(2, b - 1), 0] = float("nan")
        return x

    with pytest.raises(ENC.EmbeddingError, match=rf"decoder space: {names[2]}: embedding has NaN"):
        STORE.embed_images(images, None, "decoder", TINY, tmp_path, encoder=_Fake(nan_in_row_2), **KW)
    with pytest.raises(ENC.EmbeddingError, match=rf"decoder space: {names[0]}, .*shape \(4, 7\), expected \(4, 32\)"):
        STORE.embed_images(images, None, "decoder", TINY, tmp_path, encoder=_Fake(lambda b: torch.ones(b, 7)), **KW)
    assert _chunks(tmp_path) == []
    with pytest.raises(ValueError, match="valid spaces"):
        STORE.embed_images(images, None, "pixels", TINY, tmp_path, **KW)


# ----------------------------------------------------------------------------------------------- processes


def _cli_env(kit_cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            RT.CACHE_ENV: str(kit_cache), "PYTHONPATH": str(REPO)}


@pytest.mark.slow  # subprocesses
def test_two_accelerate_processes_merge_equals_one_process(images, reference, tmp_path, kit_cache):
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's --cpu path is its simple
    # launcher, multi-CPU needs an MPI hostfile); --multi_gpu runs torchrun, and the entry point asks
    # PartialState for CPU (gloo) when there is no GPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "rebeca_utils.pipeline.embed_cli", "--image-dir", str(images), "--out-dir", str(tmp_path),
           "--space", "decoder", "--profile", "smoke", "--chunk-size", "8", "--batch-size", "4", "--no-progress"]
    r = subprocess.run(cmd, env=_cli_env(kit_cache), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summaries = sorted((json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["world_size"], s["computed"]) for s in summaries] == [(0, 2, [0, 2, 4]), (1, 2, [1, 3])]
    assert "merged" in summaries[0]
    a, b = STORE.load_embeddings(reference, "decoder"), STORE.load_embeddings(tmp_path, "decoder")
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


def test_shares_then_merge_only(images, reference, tmp_path, counts):
    base = ["--image-dir", str(images), "--out-dir", str(tmp_path), "--space", "decoder", "--profile", "smoke",
            "--chunk-size", "8", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    for rank in (1, 0):  # each share as accelerate would hand it out, in any order
        STORE.embed_images(images, None, "decoder", TINY, tmp_path, device="cpu", chunk_size=8, batch_size=4,
                           rank=rank, world_size=2, progress=False)
    assert not (tmp_path / "decoder" / "embeddings.safetensors").exists()  # no barrier here: merge is explicit
    assert EMBED_CLI.main(base + ["--merge-only"]) == 0
    a, b = STORE.load_embeddings(reference, "decoder"), STORE.load_embeddings(tmp_path, "decoder")
    assert a[0] == b[0] and torch.allclose(a[1], b[1], atol=1e-5)
    n = counts["encode"]
    assert EMBED_CLI.main(base) == 0 and counts["encode"] == n  # a full rerun does no model work


# ----------------------------------------------------------------------------------------------- damaged store


def test_corrupt_chunk_is_recomputed_and_merged_file_names_itself(images, reference, tmp_path, counts):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    chunk = STORE.chunk_path(out, "decoder", 1)
    chunk.write_bytes(chunk.read_bytes()[:-10])  # truncated (disk full, copied half)
    with pytest.raises(ENC.EmbeddingError, match=r"chunk_00001.safetensors \(.*truncated or corrupt"):
        STORE.merge(out, "decoder")
    store = STORE.embed_images(images, None, "decoder", TINY, out, **KW)  # resume: the chunk is missing, not fatal
    assert store.computed == [1] and store.reused == [0, 2, 3, 4]
    merged = store.merge()
    assert merged.read_bytes() == (reference / "decoder" / STORE.MERGED_NAME).read_bytes()
    merged.write_bytes(merged.read_bytes()[:50])
    with pytest.raises(ENC.EmbeddingError) as e:
        STORE.load_embeddings(out, "decoder")
    assert re.fullmatch(rf"{re.escape(str(merged))}: truncated or corrupt safetensors file \(.+\); delete it and "
                        + re.escape(f"{redo(2)}: its chunks are reused"), str(e.value))


def test_replaced_image_recomputes_only_its_chunk(images, reference, tmp_path):
    src = tmp_path / "imgs"
    shutil.copytree(images, src)  # copy2 keeps sizes and mtimes: the reference's chunks stay valid
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    name = sorted(p.name for p in src.iterdir())[9]  # chunk 1
    shutil.copy(src / sorted(p.name for p in src.iterdir())[0], src / name)  # another image under the same name
    store = STORE.embed_images(src, None, "decoder", TINY, out, **KW)
    assert store.computed == [1] and store.reused == [0, 2, 3, 4]


def test_embedding_run_removes_orphaned_temp_files(images, tmp_path):
    d = tmp_path / "decoder"
    d.mkdir(parents=True)
    orphan = d / ".chunk_00003.safetensors.a1b2c3.tmp.safetensors"
    orphan.write_bytes(b"\0" * 64)
    STORE.embed_images(images, None, "decoder", TINY, tmp_path, **KW)
    assert not orphan.exists() and not _stray(tmp_path)


def test_store_files_byte_reproducible_across_processes(images, tmp_path):
    """safetensors' writer orders metadata by a per-process hash: ours sorts it, so sha256 of outputs compare."""
    code = ("import sys; from rebeca_utils.config import get_profile; from rebeca_utils.pipeline import embeddings as S;"
            "S.embed_images(sys.argv[1], None, 'decoder', get_profile('smoke').models, sys.argv[2], chunk_size=20,"
            " progress=False, device='cpu').merge()")
    for k in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(images), str(tmp_path / k)], check=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": "random"})
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 3
    for f in files:
        assert IO.sha256(tmp_path / "a" / f) == IO.sha256(tmp_path / "b" / f), f


def test_manifest_json_is_strict(tmp_path):
    import numpy as np

    p = IO.write_json(tmp_path / "m.json", {"auc": float("nan"), "x": [np.float32("inf"), 1.5], "t": torch.tensor(2.0)})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auc": None, "x": [None, 1.5], "t": 2.0}
