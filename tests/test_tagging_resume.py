"""LLaVA tagging as a long stage: chunks keyed on batch size and dtype, tag_limit, tag_images=False loading nothing,
LLaVA freed before SD, and five SIGKILLs that lose and duplicate nothing."""
import gc
import json
import os
import random
import signal
import time
import weakref
from dataclasses import replace
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from rebeca_utils.baselines import personas as P
from rebeca_utils.baselines import tagging as TG
from rebeca_utils.config import ModelsConfig, VlmConfig, get_profile
from rebeca_utils.data import flickr
from rebeca_utils.data import splits as SP
from rebeca_utils.models import vlm as V

pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread
TINY, PAPER = get_profile("smoke").models, ModelsConfig()
CFG = VlmConfig(constrained=True, batch_size=3, chunk_size=4, max_new_tokens=80)
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "07_vlm_personas.ipynb"


@pytest.fixture(scope="module")
def tiny_vlm():
    return V.build_vlm(TINY)


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("flickr")
    splits, _, _ = SP.prepare_flickr(get_profile("smoke").flickr, out)
    return splits, SP.dataset_root(get_profile("smoke").flickr, out) / flickr.IMAGE_DIR


def _names(root, n):
    return sorted(p.name for p in root.iterdir())[:n]


def test_batch_size_and_dtype_key_the_chunks(tiny_vlm, fixture_data, tmp_path):
    model, processor = tiny_vlm
    _, root = fixture_data
    names = _names(root, 8)
    TG.save_tag_plan(tmp_path, names, root, TINY, CFG)
    assert TG.tag_images(model, processor, tmp_path, progress=False).computed == 2 and TG.missing_chunks(tmp_path) == []
    TG.save_tag_plan(tmp_path, names, root, TINY, replace(CFG, batch_size=4))  # other padding: other numerics
    assert TG.missing_chunks(tmp_path) == [0, 1]
    again = TG.tag_images(model, processor, tmp_path, progress=False)
    assert (again.computed, again.reused) == (2, 0) and [c["batch_size"] for c in again.chunks] == [4, 4]
    TG.save_tag_plan(tmp_path, names, root, TINY, replace(CFG, batch_size=4), dtype=torch.bfloat16)
    assert TG.missing_chunks(tmp_path) == [0, 1]
    plan = tmp_path / TG.TAGS_DIR / TG.PLAN_NAME
    with pytest.raises(ValueError) as e:
        TG.tag_images(model, processor, tmp_path, progress=False)
    assert str(e.value) == (f"{plan} was planned in bfloat16, the model is float32: build it in bfloat16 or save the "
                            "plan again")
    assert {TG.fingerprint(TINY, c, d) for c in (CFG, replace(CFG, batch_size=4)) for d in ("float32", "bfloat16")} \
        .__len__() == 4


def test_a_killed_writes_temp_file_goes_when_the_next_run_starts(tiny_vlm, fixture_data, tmp_path):
    _, root = fixture_data
    TG.save_tag_plan(tmp_path, _names(root, 4), root, TINY, CFG)
    stale = tmp_path / TG.TAGS_DIR / ".chunk-00000.parquet.k1ll3d.tmp.parquet"  # atomic_path's temp, never renamed
    stale.write_bytes(b"PAR1 half a parquet")
    assert TG.tag_images(*tiny_vlm, tmp_path, progress=False).computed == 1
    assert sorted(p.name for p in stale.parent.iterdir()) == ["chunk-00000.parquet", TG.PLAN_NAME]
    # several processes share the folder: a fresh temp file may be another process's write in flight
    stale.write_bytes(b"PAR1 in flight")
    assert TG.tag_images(*tiny_vlm, tmp_path, rank=1, world_size=2, progress=False).reused == 0
    assert stale.exists()


def test_tag_limit_selects_a_seeded_subset_into_the_plan_and_the_personas(tiny_vlm, fixture_data, tmp_path):
    model, processor = tiny_vlm
    splits, root = fixture_data
    train = sorted(splits.loc[splits["split"] == "train", "image"].unique())
    three, five = TG.select_images(train, 3, seed=1), TG.select_images(train, 5, seed=1)
    assert len(three) == 3 and three == sorted(three) and set(three) < set(five) and set(five) <= set(train)
    assert TG.select_images(train, 0) == TG.select_images(train, len(train) + 5) == train
    assert TG.select_images(train, 3, seed=2) != three
    with pytest.raises(ValueError, match=r"^tag_limit=-1: expected 0 \(every image\) or a positive number of images$"):
        TG.select_images(train, -1)
    TG.save_tag_plan(tmp_path, train, root, TINY, CFG, limit=3, seed=1)
    plan = TG.load_tag_plan(tmp_path)
    assert plan["names"] == three and plan["selection"] == {"limit": 3, "seed": 1, "of": len(train)}
    assert plan["fingerprint"] == TG.fingerprint(TINY, CFG, "float32", {"limit": 3, "seed": 1})
    assert plan["fingerprint"] != TG.fingerprint(TINY, CFG, "float32")
    rep = TG.tag_images(model, processor, tmp_path, progress=False)  # what the CLI runs: the plan's names only
    tags, thr = TG.collect(tmp_path)
    assert rep.images == 3 and tags["image"].tolist() == three and thr["selection"] == plan["selection"]
    users = sorted(splits["user_id"].unique())
    personas = P.build_personas(tags, splits, users, VlmConfig())
    train_rows = splits[splits["split"] == "train"]
    tagged_rows = train_rows[train_rows["image"].isin(three)]
    assert P.tagged_share(personas) == {"tagged": len(tagged_rows), "rated": len(train_rows)}
    u = int(tagged_rows["user_id"].iloc[0])
    row = P.keyword_table(personas, [u]).iloc[0]
    mine = train_rows[train_rows["user_id"] == u]
    liked = int(mine["like"].sum())
    assert row["liked (tagged of rated)"] == f"{int(mine['image'].isin(three)[mine['like']].sum())} of {liked}"


def test_tag_images_false_builds_nothing_and_names_the_command(hf_cache, tiny_vlm, fixture_data, tmp_path):
    _, root = fixture_data
    names = _names(root, 6)
    out = tmp_path / "paper" / "07_vlm_personas"
    TG.save_tag_plan(out, names, root, PAPER, CFG, dtype=torch.bfloat16)
    llava = V.LazyVlm(PAPER, "cpu", torch.bfloat16)  # no weights in this cache: building would fail
    with pytest.raises(TG.TaggingPending) as e:
        TG.tag_plan(llava, out, tag=False)
    assert str(e.value) == (f"2 of 2 tag chunks to make in {out / 'tags'} (tag_images=False); run `accelerate launch "
                            f"--num_processes 1 -m rebeca_utils.baselines.tagging --out-dir {out}`, then this notebook "
                            "again")
    assert llava.builds == 0 and not (out / "tags" / "chunk-00000.parquet").exists()
    assert TG.tag_command(out, 8) == (f"accelerate launch --multi_gpu --num_processes 8 -m "
                                      f"rebeca_utils.baselines.tagging --out-dir {out}")
    # once the chunks exist (here: the tiny LLaVA), neither tag=False nor tag=True builds LLaVA again
    small = tmp_path / "smoke"
    TG.save_tag_plan(small, names, root, TINY, CFG)
    TG.tag_images(*tiny_vlm, small, progress=False)
    lazy = V.LazyVlm(TINY)
    for tag in (False, True):
        assert (TG.tag_plan(lazy, small, tag=tag).reused, lazy.builds) == (2, 0)


def test_release_frees_llava():
    llava = V.LazyVlm(TINY)
    model, _ = llava.get()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is not None and llava.loaded  # the holder keeps it while steps need it
    llava.release()
    assert ref() is None and not llava.loaded and llava.builds == 1


def test_notebook_07_loads_llava_lazily_and_frees_it_before_sd():
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    code = "\n".join(cells)
    assert "build_vlm" not in code and "tagging.tag_plan(llava, run.dir, tag=tag_images)" in code
    release = next(i for i, c in enumerate(cells) if "llava.release()" in c)
    sd = next(i for i, c in enumerate(cells) if "decoder.build_decoder" in c)
    assert release < sd and not any("llava.get()" in c for c in cells[release + 1:])
    assert "tag_limit, seed)" in code and 'tag_limit: int = 0  # why:' in cells[0]


def _tag_in_child(out: Path) -> int:
    """Fork a process that runs the tagging CLI on `out` (the parent keeps its imports: no 20 s start)."""
    pid = os.fork()
    if pid == 0:  # the child: the CLI, then out without pytest's atexit handlers
        code = 1
        try:
            code = TG.main(["--out-dir", str(out), "--device", "cpu", "--no-progress"])
        finally:
            os._exit(code)
    return pid


@pytest.mark.slow  # ~30-45 s on 2 busy cores: five killed runs, a resumed one, an uninterrupted one
def test_five_sigkills_lose_and_duplicate_nothing(fixture_data, tmp_path):
    _, root = fixture_data
    names = _names(root, 36)
    cfg = replace(CFG, batch_size=4, chunk_size=6, max_new_tokens=96)
    for d in ("clean", "killed"):
        TG.save_tag_plan(tmp_path / d, names, root, TINY, cfg)
    t0 = time.perf_counter()
    assert TG.main(["--out-dir", str(tmp_path / "clean"), "--device", "cpu", "--no-progress"]) == 0
    whole = time.perf_counter() - t0
    rng = random.Random(23)
    for _ in range(5):  # each kill after a seeded share of one whole run: five together stay below one run
        pid = _tag_in_child(tmp_path / "killed")
        time.sleep(whole * rng.uniform(0.04, 0.17))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # it was still tagging
    left = TG.missing_chunks(tmp_path / "killed")
    assert left, "the kills left nothing to resume"
    pid = _tag_in_child(tmp_path / "killed")
    assert os.waitpid(pid, 0)[1] == 0
    tags = {d: pd.read_parquet(tmp_path / d / TG.TAGS_NAME) for d in ("clean", "killed")}
    assert tags["killed"]["image"].tolist() == names and tags["killed"]["image"].is_unique
    pd.testing.assert_frame_equal(tags["killed"], tags["clean"])
    chunks = sorted(p.name for p in (tmp_path / "killed" / TG.TAGS_DIR).iterdir())
    assert chunks == sorted([TG.PLAN_NAME] + [f"chunk-{i:05d}.parquet" for i in range(6)])  # no killed write's temp
    for name in chunks[:-1]:
        replies = [pd.read_parquet(tmp_path / d / TG.TAGS_DIR / name) for d in ("clean", "killed")]
        pd.testing.assert_frame_equal(*replies)
    print(json.dumps({"whole_run_s": round(whole, 2), "chunks_left_after_kills": len(left)}))
