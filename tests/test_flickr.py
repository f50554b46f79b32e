"""FLICKR-AES: synthetic fixture format, validating reader, stable ids, splits."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rebeca_utils.config import FlickrConfig, get_profile
from rebeca_utils.data import flickr as FL
from rebeca_utils.data import splits as SP
from rebeca_utils.data import synthetic as SYN

IMG = ["farm1_10_100_aaaaaaaaaa.jpg", "farm2_20_200_bbbbbbbbbb.jpg", "farm3_30_300_cccccccccc.jpg",
       "farm4_40_400_dddddddddd.jpg"]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    return SYN.write_synthetic_flickr(tmp_path_factory.mktemp("fx") / "flickr", seed=0)


@pytest.fixture(scope="module")
def ratings(fixture_root):
    return FL.load_ratings(fixture_root)[0]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tiny(tmp_path: Path, body: str, header: str = FL.CSV_HEADER, images=IMG) -> Path:
    root = tmp_path / "data" / "FLICKR-AES"
    (root / "40K").mkdir(parents=True)
    for n in images:
        (root / "40K" / n).write_bytes(b"")
    (root / FL.CSV_NAME).write_text(header + "\n" + body)
    return root


GOOD = f"WB,{IMG[1]},4\nWA,{IMG[0]},2\nWA,{IMG[2]},5\nWB,{IMG[0]},1\n"


# ---------------------------------------------------------------- synthetic fixture

def test_fixture_format(fixture_root):
    csv = fixture_root / FL.CSV_NAME
    lines = csv.read_text().splitlines()
    assert lines[0] == "worker, imagePair, score"
    rows = [ln.split(",") for ln in lines[1:]]
    assert all(len(r) == 3 for r in rows)
    df = pd.DataFrame(rows, columns=["worker", "image", "score"])
    assert df["worker"].str.fullmatch(r"[A-Z0-9]{13}").all()
    assert df["worker"].nunique() == 24
    assert df["image"].str.fullmatch(r"farm\d+_\d+_\d+_[0-9a-f]{10}\.jpg").all()
    assert df["score"].str.fullmatch(r"[1-5]").all()
    df["score"] = df["score"].astype(int)
    assert not df.duplicated(["worker", "image"]).any()
    per_img = df.groupby("image").size()
    assert per_img.nunique() == 1 and per_img.iloc[0] == 5 and len(per_img) == 400
    assert df.groupby("worker").size().min() >= 25
    assert 0.28 <= (df["score"] >= 4).mean() <= 0.40
    files = sorted(p.name for p in (fixture_root / "40K").iterdir())
    assert files == sorted(per_img.index)
    # score.txt: "<image> <mean>" per image, consistent with the CSV
    score_lines = (fixture_root / FL.SCORE_NAME).read_text().splitlines()
    assert len(score_lines) == 400
    means = df.groupby("image")["score"].mean()
    for ln in score_lines:
        name, mean = ln.split(" ")
        assert abs(float(mean) - means[name]) < 1e-6
    for name in files[:20]:
        with Image.open(fixture_root / "40K" / name) as im:
            assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"
            im.load()


def test_fixture_deterministic_and_idempotent(tmp_path, fixture_root, monkeypatch):
    a = SYN.write_synthetic_flickr(tmp_path / "a", seed=0)
    assert _files(a) == _files(fixture_root)
    b = SYN.write_synthetic_flickr(tmp_path / "b", seed=1)
    assert (b / FL.CSV_NAME).read_bytes() != (a / FL.CSV_NAME).read_bytes()
    # complete fixture with the same parameters: no work
    monkeypatch.setattr(SYN, "_build_fixture", lambda *a, **k: pytest.fail("rebuilt"))
    assert SYN.write_synthetic_flickr(a, seed=0) == a
    monkeypatch.undo()
    # other parameters: replaced; nothing left beside root
    SYN.write_synthetic_flickr(a, n_workers=6, n_images=40, image_size=16, seed=0)
    assert SYN.synthetic_truth(a)["params"]["n_images"] == 40 and len(list((a / "40K").iterdir())) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # a folder that is not a fixture is refused
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError):
        SYN.write_synthetic_flickr(tmp_path / "c")


def test_fixture_small_sizes_keep_min_ratings(tmp_path):
    root = SYN.write_synthetic_flickr(tmp_path / "s", n_workers=30, n_images=150, image_size=16, seed=3)
    df, _ = FL.load_ratings(root)
    assert df.groupby("user_id").size().min() >= 25
    assert (df.groupby("image_id").size() == 5).all()


def test_planted_signal(ratings, fixture_root):
    truth = SYN.synthetic_truth(fixture_root)
    assert set(truth["preferences"]) == set(ratings["worker"])
    assert all(set(a) == {"hue", "texture", "layout"} for a in truth["attributes"].values())
    m = np.array([SYN.match_fraction(truth, w, i) for w, i in zip(ratings["worker"], ratings["image"])])
    df = ratings.assign(m=m)
    full = df[df.m == 1].groupby("worker")["like"].mean()
    none = df[df.m == 0].groupby("worker")["like"].mean()
    assert (full > none + 0.2).mean() >= 0.9
    assert df.loc[df.m == 1, "like"].mean() - df.loc[df.m == 0, "like"].mean() > 0.4


# ---------------------------------------------------------------- reader / validator

def test_load_ids_sorted_and_stable(tmp_path):
    root = _tiny(tmp_path, GOOD)
    df, rep = FL.load_ratings(root)
    assert list(df.columns) == ["user_id", "worker", "image_id", "image", "score", "like"]
    assert df[["worker", "user_id"]].drop_duplicates().values.tolist() == [["WA", 0], ["WB", 1]]
    assert dict(zip(df["image"], df["image_id"])) == {IMG[0]: 0, IMG[1]: 1, IMG[2]: 2}  # IMG[3] unrated, id 3
    assert df["like"].tolist() == [False, True, False, True]  # (WA,0)=2 (WA,2)=5 (WB,0)=1 (WB,1)=4
    assert rep["users"] == 2 and rep["ratings"] == 4 and rep["images_in_folder"] == 4 and rep["like_rate"] == 0.5
    assert FL.image_names(root) == IMG
    # file order does not matter; threshold is a parameter
    rev = _tiny(tmp_path / "r", "".join(reversed(GOOD.splitlines(keepends=True))))
    pd.testing.assert_frame_equal(FL.load_ratings(rev)[0], df)
    assert FL.load_ratings(root, like_threshold=5)[0]["like"].sum() == 1


def test_stripped_header_spaces_and_blank_lines(tmp_path):
    ref = FL.load_ratings(_tiny(tmp_path / "a", GOOD))[0]
    spaced = GOOD.replace(",", ", ").replace("\nWA", "\n\nWA", 1)
    got = FL.load_ratings(_tiny(tmp_path / "b", spaced, header="worker,imagePair,score"))[0]
    pd.testing.assert_frame_equal(got, ref)


def _check_error(tmp_path, body, message, header=FL.CSV_HEADER, **kw):
    root = _tiny(tmp_path, body, header=header)
    before = _files(root.parent)
    out = tmp_path / "out"
    with pytest.raises(FL.DataError) as e:
        FL.load_ratings(root, **kw)
    assert str(e.value) == message.format(csv=root / FL.CSV_NAME, root=root)
    if not kw:  # the notebook entry point (default policies) writes nothing either
        with pytest.raises(FL.DataError):
            SP.prepare_flickr(FlickrConfig(synthetic=False, n_holdout_workers=1), out, data_dir=root.parent)
    assert _files(root.parent) == before and not out.exists()


def test_error_missing_column(tmp_path):
    _check_error(tmp_path, "WA,x.jpg\n", "{csv}:1: missing column(s) 'score'; header has 'worker', 'imagePair'",
                 header="worker, imagePair")


def test_error_repeated_column(tmp_path):
    # which 'score' holds the scores would be a guess (pandas renames the second 'score.1', csv.DictReader keeps it)
    _check_error(tmp_path, f"WA,{IMG[0]},2,5\nWB,{IMG[1]},4,1\n", "{csv}:1: column 'score' appears twice in the header",
                 header="worker, imagePair, score, score")
    _check_error(tmp_path / "b", f"WA,{IMG[0]},2,x,y,z\n", "{csv}:1: column 'note' appears 3 times in the header",
                 header="worker,imagePair,score,note,note,note")


def test_error_bad_score(tmp_path):
    _check_error(tmp_path, GOOD + f"WC,{IMG[0]},x\nWC,{IMG[1]},6\n",
                 "{csv}:6: score 'x' is not an integer 1-5 (and 1 more such rows)")
    _check_error(tmp_path / "b", f"WA,{IMG[0]},3.5\n", "{csv}:2: score '3.5' is not an integer 1-5")
    _check_error(tmp_path / "c", f"WA,{IMG[0]},4\nWA,{IMG[1]},\n", "{csv}:3: score '' is not an integer 1-5")


def test_error_empty_worker(tmp_path):
    _check_error(tmp_path, GOOD + f" ,{IMG[3]},3\n", "{csv}:6: empty worker id")


def test_error_field_count(tmp_path):
    _check_error(tmp_path, GOOD + f"WA,{IMG[3]},3,9\n", "{csv}:6: expected 3 fields, saw 4")


def test_missing_image_error_or_drop(tmp_path):
    body = GOOD + "WA,farm9_1_1_0000000000.jpg,3\nWC,farm9_1_1_0000000000.jpg,5\n"
    _check_error(tmp_path, body,
                 "{csv}:6: image 'farm9_1_1_0000000000.jpg' not found in {root}/40K (and 1 more such rows)")
    df, rep = FL.load_ratings(_tiny(tmp_path / "d", body), missing_images="drop")
    assert len(df) == 4 and rep["missing_image_rows"] == 2 and rep["missing_images"] == 1
    assert rep["users"] == 2  # WC had only the missing image


def test_duplicates_policies(tmp_path):
    body = GOOD + f"WA,{IMG[0]},5\n"  # (WA, IMG[0]) first 2 at line 3, again 5 at line 6: a conflict
    _check_error(tmp_path, body, f"{{csv}}:6: duplicate rating of '{IMG[0]}' by worker 'WA' (first at line 3)",
                 duplicates="error")
    # the default refuses a conflicting repeat (nothing is dropped silently) ...
    _check_error(tmp_path / "auto", body, f"{{csv}}:6: worker 'WA' rated '{IMG[0]}' 5 here and 2 at line 3; "
                 "choose duplicates='first' or 'last' to keep one")
    root = _tiny(tmp_path / "p", body)
    first, rep = FL.load_ratings(root, duplicates="first")
    assert rep["duplicate_rows"] == 1 and rep["conflicting_duplicate_rows"] == 1 and len(first) == 4
    assert first.query("worker == 'WA' and image_id == 0")["score"].item() == 2
    last, _ = FL.load_ratings(root, duplicates="last")
    assert last.query("worker == 'WA' and image_id == 0")["score"].item() == 5
    # ... and drops an exact repeat (the real test-worker file has one), counting it
    same, rep = FL.load_ratings(_tiny(tmp_path / "s", GOOD + f"WA,{IMG[0]},2\n"))
    assert len(same) == 4 and rep["duplicate_rows"] == 1 and rep["conflicting_duplicate_rows"] == 0


def test_duplicates_reach_the_report(tmp_path):
    root = _tiny(tmp_path, GOOD + f"WA,{IMG[0]},2\nWB,{IMG[1]},3\n")
    cfg = FlickrConfig(synthetic=False, n_test=0, n_val=0, n_holdout_workers=1)
    _, _, rep = SP.prepare_flickr(cfg, tmp_path / "out", data_dir=root.parent, duplicates="first")
    assert rep["value"]["duplicate rows dropped"] == 2 and rep["value"]["of which conflicting"] == 1
    _, _, again = SP.prepare_flickr(cfg, tmp_path / "out", data_dir=root.parent, duplicates="first")  # reused
    assert again["value"]["of which conflicting"] == 1


@pytest.mark.parametrize("raw, message", [
    (GOOD.encode() + b"WC,\xff" + IMG[0].encode() + b",3\n",
     "{csv}:6: not UTF-8 text (byte 0xff at column 4); save the file as UTF-8"),
    (f'WA,{IMG[0]},2\n"W\nB",{IMG[1]},4\nWA,{IMG[2]},5\n'.encode(), "{csv}:3: an unclosed quote (a field cannot span lines)"),
    (f'WA,{IMG[0]},2\nWB,"{IMG[1]},4\n'.encode(), "{csv}:3: an unclosed quote (a field cannot span lines)"),
    ("".join(f"{ln},\n" for ln in GOOD.splitlines()).encode(), "{csv}:2: expected 3 fields, saw 4 (a trailing comma?)"),
    (b"", "{csv}:1: no ratings after the header"),
    (f"WA,{IMG[0]},3.0\n".encode(), "{csv}:2: score '3.0' is not an integer 1-5"),
    (f"WA,{IMG[0]},4.\n".encode(), "{csv}:2: score '4.' is not an integer 1-5"),
    (f"W\tA,{IMG[0]},4\n".encode(), "{csv}:2: worker id 'W\\tA' contains a control character or path separator"),
    (f"../WA,{IMG[0]},4\n".encode(), "{csv}:2: worker id '../WA' contains a control character or path separator"),
    (f"WA,40K/{IMG[0]},4\n".encode(), f"{{csv}}:2: imagePair '40K/{IMG[0]}' is not an image file name in 40K/ (name.jpg, no folders)"),
    (b"WA,notes.txt,4\n", "{csv}:2: imagePair 'notes.txt' is not an image file name in 40K/ (name.jpg, no folders)"),
], ids=["non-utf8", "newline-in-quotes", "unclosed-quote", "trailing-comma", "header-only", "score-3.0", "score-4.",
        "control-char", "path-in-worker", "path-in-image", "not-an-image"])
def test_malformed_csv_one_line_error(tmp_path, raw, message):
    root = _tiny(tmp_path, "")
    (root / FL.CSV_NAME).write_bytes(FL.CSV_HEADER.encode() + b"\n" + raw)
    before = _files(root.parent)
    with pytest.raises(FL.DataError) as e:
        FL.load_ratings(root)
    assert str(e.value) == message.format(csv=root / FL.CSV_NAME)
    with pytest.raises(FL.DataError):  # the notebook entry point stops the same way and writes nothing
        SP.prepare_flickr(FlickrConfig(synthetic=False, n_holdout_workers=1), tmp_path / "out", data_dir=root.parent)
    assert _files(root.parent) == before and not (tmp_path / "out").exists()


def test_header_trailing_comma_and_crlf(tmp_path):
    root = _tiny(tmp_path, "")
    (root / FL.CSV_NAME).write_bytes(b"worker,imagePair,score,\n" + GOOD.encode())
    with pytest.raises(FL.DataError, match=r":1: empty column name in the header \(a trailing comma\?\)$"):
        FL.load_ratings(root)
    (root / FL.CSV_NAME).write_bytes(("\ufeff" + FL.CSV_HEADER + "\r\n" + GOOD.replace("\n", "\r\n")).encode())
    pd.testing.assert_frame_equal(FL.load_ratings(root)[0], FL.load_ratings(_tiny(tmp_path / "lf", GOOD))[0])


def test_bad_policy_names(tmp_path):
    root = _tiny(tmp_path, GOOD)
    with pytest.raises(ValueError, match="missing_images"):
        FL.load_ratings(root, missing_images="skip")
    with pytest.raises(ValueError, match="duplicates"):
        FL.load_ratings(root, duplicates="mean")
    assert FL.DUPLICATES == ("auto", "first", "last", "error")


# ---------------------------------------------------------------- splits

def test_split_sizes_and_small_users(ratings):
    small = ratings[ratings["user_id"] == 0].head(20)  # user 0 with only 20 ratings -> all train
    df, holdout = SP.make_splits(pd.concat([small, ratings[ratings["user_id"] != 0]]), n_holdout_workers=4)
    counts = df.groupby(["user_id", "split"]).size().unstack(fill_value=0)
    assert (counts.loc[0] == pd.Series({"test": 0, "train": 20, "val": 0})).all()
    assert (counts.drop(index=0)[["test", "val"]] == 10).all().all()
    assert (counts.drop(index=0)["train"] >= 5).all()
    assert len(holdout) == 4 and small["worker"].iloc[0] not in holdout
    assert set(df.loc[df["holdout"], "worker"]) == set(holdout)
    rep = FL.ratings_report(df)["value"]
    assert rep["users wholly in train (too few ratings)"] == 1 and rep["hold-out workers"] == 4
    assert rep["ratings (test)"] == 230 and rep["users"] == 24


def test_splits_seeded(ratings):
    a, ha = SP.make_splits(ratings, n_holdout_workers=4, seed=0)
    b, hb = SP.make_splits(ratings.sample(frac=1, random_state=1), n_holdout_workers=4, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert ha == hb == sorted(ha)
    c, hc = SP.make_splits(ratings, n_holdout_workers=4, seed=1)
    assert not a["split"].equals(c["split"]) and hc != ha
    assert SP.make_splits(ratings, n_holdout_workers=6, seed=0)[0]["split"].equals(a["split"])
    with pytest.raises(ValueError) as e:  # one line: how many are eligible, how many asked, which override
        SP.make_splits(ratings, n_holdout_workers=37)
    assert str(e.value) == ("37 hold-out workers asked but only 24 worker(s) are eligible (>= 21 ratings: 10 test + "
                            "10 val + 1 train); set flickr.n_holdout_workers to at most 24 (runner: -p "
                            "'overrides={\"flickr.n_holdout_workers\": 24}')")


def test_save_load_roundtrip(ratings, tmp_path):
    df, holdout = SP.make_splits(ratings, n_holdout_workers=4, seed=0)
    p1 = SP.save_splits(df, holdout, tmp_path / "a" / "splits.parquet", meta={"seed": 0})
    p2 = SP.save_splits(*SP.make_splits(ratings, n_holdout_workers=4, seed=0), tmp_path / "b.parquet", meta={"seed": 0})
    assert p1.read_bytes() == p2.read_bytes()
    got, got_holdout = SP.load_splits(p1)
    pd.testing.assert_frame_equal(got, df, check_dtype=False)
    assert got_holdout == holdout and SP.split_meta(p1) == {"seed": 0}
    assert [p.name for p in p1.parent.iterdir()] == ["splits.parquet"]  # no temp files left


def test_prepare_flickr_smoke(tmp_path):
    cfg = get_profile("smoke").flickr
    df, holdout, rep = SP.prepare_flickr(cfg, tmp_path)
    assert (tmp_path / "flickr_splits.parquet").exists() and len(holdout) == cfg.n_holdout_workers
    assert rep["value"]["users"] == 24 and re.fullmatch(r"\d+", str(rep["value"]["ratings"]))
    df2, holdout2, _ = SP.prepare_flickr(cfg, tmp_path)  # reused
    pd.testing.assert_frame_equal(df, df2, check_dtype=False)
    assert holdout == holdout2
    with pytest.raises(ValueError, match="overwrite=True"):
        SP.prepare_flickr(cfg, tmp_path, seed=1)


def test_prepare_flickr_real_layout(tmp_path):
    SYN.write_synthetic_flickr(tmp_path / "data" / "FLICKR-AES", n_workers=8, n_images=80, image_size=16, seed=2)
    cfg = FlickrConfig(synthetic=False, n_holdout_workers=2)
    df, holdout, rep = SP.prepare_flickr(cfg, tmp_path / "out", data_dir=tmp_path / "data")
    assert len(holdout) == 2 and rep["value"]["ratings"] == 400 and not (tmp_path / "out" / "flickr_synthetic").exists()
    with pytest.raises(ValueError, match="data_dir"):
        SP.prepare_flickr(cfg, tmp_path / "out2")


def test_prepare_flickr_keys_reuse_on_the_data(tmp_path):
    """Splits are reused for the same data only; a moved output folder still reuses them (no absolute paths)."""
    import shutil

    SYN.write_synthetic_flickr(tmp_path / "data" / "FLICKR-AES", n_workers=8, n_images=80, image_size=16, seed=2)
    cfg = FlickrConfig(synthetic=False, n_holdout_workers=2)
    first = SP.prepare_flickr(cfg, tmp_path / "out", data_dir=tmp_path / "data")[0]
    shutil.move(tmp_path / "out", tmp_path / "moved")
    pd.testing.assert_frame_equal(SP.prepare_flickr(cfg, tmp_path / "moved", data_dir=tmp_path / "data")[0], first)
    csv = tmp_path / "data" / "FLICKR-AES" / FL.CSV_NAME
    original = csv.read_text()
    lines = original.splitlines(keepends=True)
    lines[1] = lines[1].rsplit(",", 1)[0] + ", 9\n"  # an edited (even invalid) score
    csv.write_text("".join(lines))
    split_file = tmp_path / "moved" / "flickr_splits.parquet"
    before = split_file.read_bytes()
    with pytest.raises(FL.DataError) as e:
        SP.prepare_flickr(cfg, tmp_path / "moved", data_dir=tmp_path / "data")
    assert re.fullmatch(rf"{re.escape(str(split_file))} was made from other data \({FL.CSV_NAME} [0-9a-f]{{12}} -> "
                        r"[0-9a-f]{12}, sha256\); rerun with overwrite=True \(runner: -p overwrite=True\) or delete it",
                        str(e.value))
    with pytest.raises(FL.DataError, match=r":2: score '9' is not an integer 1-5$"):  # overwrite validates anew
        SP.prepare_flickr(cfg, tmp_path / "moved", data_dir=tmp_path / "data", overwrite=True)
    assert split_file.read_bytes() == before
    csv.write_text(original)
    with pytest.raises(FL.DataError, match=r"other parameters \(seed=0 -> 1\)"):
        SP.prepare_flickr(cfg, tmp_path / "moved", data_dir=tmp_path / "data", seed=1)
