"""The resumable sharded job's parts (rebeca_utils.jobs): fingerprints, the rank split, skip-what-is-done, collect."""
import logging
import os
import time

import pytest

from rebeca_utils import jobs as J


def test_fingerprints_keep_the_bits_of_existing_runs():
    """Decoded images, LoRA adapters and tag chunks store these digests: a change would redo every finished run."""
    payload = {"seed": 42, "prompt": "", "lora": None, "settings": {"steps": 2}}
    assert J.fingerprint(payload) == "ca9702dd9e9d51426cac301d0cab321a"
    assert J.fingerprint(dict(reversed(payload.items())), b"\x00\x01") == "6839fb6cd3c3b74e51b2ff0aa36a4638"


@pytest.mark.parametrize("n, world_size", [(0, 1), (5, 1), (7, 3), (2, 4), (12, 8)])
def test_equal_weights_deal_round_robin(n, world_size):
    assert J.deal([1.0] * n, world_size) == [list(range(r, n, world_size)) for r in range(world_size)]
    assert [J.share(list("abcdefghijkl"[:n]), r, world_size) for r in range(world_size)] == [
        list("abcdefghijkl"[:n][r::world_size]) for r in range(world_size)]


def test_weights_deal_heaviest_first_to_the_least_loaded():
    assert J.deal([1, 5, 2, 2, 1], 2) == [[1, 4], [0, 2, 3]]  # 5 | 2, 2, 1 | then the tie to rank 0
    assert J.share(["a", "bb", "ccc"], 1, 2, weight=len) == ["a", "bb"]
    with pytest.raises(ValueError, match=r"^rank=2 must be in 0..world_size-1 \(world_size=2\)$"):
        J.share([1, 2], 2, 2)


def test_split_done_names_stale_units_and_redo_reads_nothing(caplog):
    store = {1: "done", 2: J.NotDone("/x/chunk-2", "made for another fingerprint"), 3: J.NotDone("/x/chunk-3")}
    reads = []

    def read(u):
        reads.append(u)
        return store.get(u, False)

    with caplog.at_level(logging.WARNING, logger="rebeca_utils.jobs"):
        todo, done = J.split_done([0, 1, 2, 3], read)
    assert todo == [0, 2, 3] and done == [(1, "done")]
    assert [r.getMessage() for r in caplog.records] == ["/x/chunk-2: redoing: made for another fingerprint"]
    reads.clear()
    assert J.split_done([0, 1], read, redo=True) == ([0, 1], []) and reads == []
    results, missing = J.collect([1, 2, 3], read)
    assert results == ["done"] and [(u, nd.why) for u, nd in missing] == [(2, "made for another fingerprint"),
                                                                           (3, "missing")]


def test_clear_orphans_spares_fresh_temporaries_of_other_processes(tmp_path):
    old, fresh, kept = (tmp_path / ".a.png.x1.tmp.png", tmp_path / ".b.png.x2.tmp.png", tmp_path / "c.png")
    for p in (old, fresh, kept):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * J.ORPHAN_AGE_S,) * 2)
    assert J.clear_orphans(tmp_path, world_size=2) == 1 and not old.exists() and fresh.exists()
    assert J.clear_orphans(tmp_path, world_size=1) == 1 and not fresh.exists() and kept.exists()
    assert J.chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]] and J.chunks([], 3) == []
