"""VLM baselines: the reply parser, schema-constrained decoding of the tiny LLaVA, resumable tagging, personas."""
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rebeca_utils.baselines import constrained as C
from rebeca_utils.baselines import personas as P
from rebeca_utils.baselines import tagging as TG
from rebeca_utils.baselines import tags as T
from rebeca_utils.config import ModelsConfig, VlmConfig, get_profile
from rebeca_utils.data import flickr, synthetic
from rebeca_utils.data import splits as SP
from rebeca_utils.models import vlm as V
from rebeca_utils.models import weights as W

pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread
TINY = get_profile("smoke").models
GOOD = '{"caption": "a dog on a beach", "objects": ["dog", "ball"], "attributes": ["sunny"], "styles": ["photo"], ' \
       '"colors": ["blue", "sand"]}'

# ----------------------------------------------------------------------------------------------- parser

# realistic LLaVA replies: (reply, our status, our reason, the reference parser's verdict)
CORPUS = [
    (GOOD, "ok", "", ""),
    ("```json\n" + GOOD + "\n```", "ok", "", ""),  # code fence
    ("Sure! Here is the JSON object for the image:\n" + GOOD, "ok", "", ""),  # prose before
    (GOOD + "\nThis image shows a dog. {Note: tags are lowercase}", "ok", "", "Extra data"),  # trailing text
    (GOOD + "\n" + GOOD, "ok", "", "Extra data"),  # two objects
    ('{"caption": "a man holding a "welcome" sign", "objects": ["man"]}', "failed", "Expecting ',' delimiter",
     "Expecting ',' delimiter"),  # unescaped inner quotes: not repairable
    ('{"caption": "a cat", "objects": ["cat" "sofa"], "colors": ["grey",]}', "repaired", "Expecting ',' delimiter",
     "Expecting ',' delimiter"),  # a missing comma and a trailing one
    ('{"caption": "a red car parked", "objects": ["car", "stre', "repaired", "Unterminated string starting at",
     "no JSON object"),  # cut by max_new_tokens
    ('{"caption": "a red car par', "failed", "Unterminated string starting at", "no JSON object"),
    ("", "failed", "empty", "no JSON object"),
    ("I cannot tag this image.", "failed", "no JSON object", "no JSON object"),
    ('{"caption": null, "objects": []}', "failed", "schema violation: caption is null", ""),
    ('{"caption": "x", "objects": "dog"}', "failed", "schema violation: objects is not a list of str", ""),
    ('["dog", "cat"]', "failed", "no JSON object", "no JSON object"),
]


@pytest.mark.parametrize("reply,status,reason,reference", CORPUS, ids=range(len(CORPUS)))
def test_parser_on_realistic_replies(reply, status, reason, reference):
    got = T.parse_reply(reply)
    assert (got.status, got.reason) == (status, reason)
    assert T.reference_parse(reply) == reference
    if got.ok:
        assert got.caption and got.caption == got.caption.lower()


def test_parser_schema_lowercase_dedupe_and_the_ten_item_limit():
    reply = json.dumps({"caption": "A Dog", "objects": ["Dog", "dog", "Ball", ""], "attributes": list("abcdef"),
                        "styles": ["x", "y", "z"], "colors": ["red"], "extra": 1})
    got = T.parse_reply(reply)
    assert got.caption == "a dog" and got.lists["objects"] == ["dog", "ball"]
    assert got.lists["attributes"] == list("abcdef") and got.lists["styles"] == ["x", "y"] and got.lists["colors"] == []
    assert got.n_truncated == 2 and sum(map(len, got.lists.values())) == T.MAX_ITEMS


def test_balanced_object_ignores_braces_inside_strings():
    assert T.balanced_object('x {"a": "}{", "b": {"c": 1}} {"d": 2}') == '{"a": "}{", "b": {"c": 1}}'
    assert T.balanced_object('{"a": "say \\"}\\""} tail') == '{"a": "say \\"}\\""}'
    assert T.balanced_object("no brace") is None


# ----------------------------------------------------------------------------------------------- tiny LLaVA


@pytest.fixture(scope="module")
def tiny_vlm():
    return V.build_vlm(TINY)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")) for _ in range(n)]


def test_tiny_llava_free_running_fails_and_constrained_always_parses(tiny_vlm):
    model, processor = tiny_vlm
    prompts = [TG.chat_prompt(processor)] * 6
    free, _ = TG.generate(model, processor, prompts, _images(6), 192)
    assert not any(T.parse_reply(r).ok for r in free)  # random weights write no JSON
    for budget in (192, C.min_finish(C.START) + 3):  # a tight budget: the constraint closes the object in time
        replies, counts = TG.generate(model, processor, prompts, _images(6), budget, constrained=True)
        parsed = [T.parse_reply(r) for r in replies]
        assert all(p.status == "ok" for p in parsed), [p.reason for p in parsed]
        assert all(n <= budget for n in counts) and all(r.strip().startswith('{"caption": "') for r in replies)
        assert all(sum(map(len, p.lists.values())) <= T.MAX_ITEMS and p.caption == p.caption.lower() for p in parsed)


def test_constraint_refuses_a_budget_below_the_schema(tiny_vlm):
    _, processor = tiny_vlm
    with pytest.raises(ValueError, match=f"max_new_tokens >= {C.min_finish(C.START)} \\(got 10\\)"):
        C.SchemaConstraint(processor.tokenizer, 5, 10)


def test_constraint_states_walk_the_schema():
    s = C.advance(C.START, '{"caption": "a dog"')
    assert (s.phase, s.k, s.pending) == ("open", 0, ', "objects": [')
    s = C.advance(s, ', "objects": ["dog"')
    assert (s.phase, s.items) == ("after", 1)
    s = C.advance(s, "], \"attributes\": [], \"styles\": [], \"colors\": []")
    assert s.phase == "done" and s.pending == "}" and C.min_finish(s) == 1


def test_replies_do_not_depend_on_the_batch(tiny_vlm):
    model, processor = tiny_vlm
    imgs = _images(4, seed=1)
    together, _ = TG.generate(model, processor, [TG.chat_prompt(processor)] * 4, imgs, 120, constrained=True)
    alone = [TG.generate(model, processor, [TG.chat_prompt(processor)], [im], 120, constrained=True)[0][0]
             for im in imgs]
    assert together == alone


# ----------------------------------------------------------------------------------------------- tagging


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("flickr")
    splits, _, _ = SP.prepare_flickr(get_profile("smoke").flickr, out)
    return splits, SP.dataset_root(get_profile("smoke").flickr, out)


def test_tagging_resumes_by_chunk_and_shards_disjointly(tiny_vlm, fixture_data, tmp_path):
    model, processor = tiny_vlm
    _, root = fixture_data
    names = sorted(flickr.image_names(root))[:10]
    cfg = VlmConfig(constrained=True, batch_size=3, chunk_size=4, max_new_tokens=100)
    TG.save_tag_plan(tmp_path / "one", names, root / flickr.IMAGE_DIR, TINY, cfg)
    first = TG.tag_images(model, processor, tmp_path / "one", progress=False)
    assert (first.computed, first.reused, first.images) == (3, 0, 10)
    tags, thr = TG.collect(tmp_path / "one")
    assert tags["image"].tolist() == names and (tags["status"] == "ok").all() and thr["images"] == 10
    caps = pd.read_parquet(tmp_path / "one" / TG.CAPTIONS_NAME)
    assert caps.columns.tolist() == ["image", "caption", "status"] and caps["caption"].str.len().gt(0).all()
    (tmp_path / "one" / TG.TAGS_DIR / "chunk-00001.parquet").write_bytes(b"truncated")  # a killed write
    again = TG.tag_images(model, processor, tmp_path / "one", progress=False)
    assert (again.computed, again.reused) == (1, 2)
    assert TG.collect(tmp_path / "one")[0].drop(columns=[]).equals(tags)
    # two processes: disjoint chunks, together the same table; a fingerprint change redoes everything
    TG.save_tag_plan(tmp_path / "two", names, root / flickr.IMAGE_DIR, TINY, replace(cfg, batch_size=4))
    reps = [TG.tag_images(model, processor, tmp_path / "two", rank=r, world_size=2, progress=False) for r in (0, 1)]
    assert [c["chunk"] for c in reps[0].chunks] == [0, 2] and [c["chunk"] for c in reps[1].chunks] == [1]
    assert TG.collect(tmp_path / "two")[0].equals(tags)
    TG.save_tag_plan(tmp_path / "one", names, root / flickr.IMAGE_DIR, TINY, replace(cfg, max_new_tokens=90))
    with pytest.raises(FileNotFoundError, match="chunk 0 is missing or stale"):
        TG.collect(tmp_path / "one")
    assert TG.tag_images(model, processor, tmp_path / "one", progress=False).computed == 3


def test_unreadable_image_is_a_failed_row(tiny_vlm, fixture_data, tmp_path):
    model, processor = tiny_vlm
    _, root = fixture_data
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    name = sorted(flickr.image_names(root))[0]
    (tmp_path / "img" / name).write_bytes((root / flickr.IMAGE_DIR / name).read_bytes())
    TG.save_tag_plan(tmp_path, ["broken.jpg", name], tmp_path / "img", TINY, VlmConfig(constrained=True))
    TG.tag_images(model, processor, tmp_path, progress=False)
    tags = TG.collect(tmp_path)[0].set_index("image")
    assert tags.loc["broken.jpg", "status"] == "failed" and tags.loc["broken.jpg", "reason"].startswith(
        "unreadable image: UnidentifiedImageError")
    assert tags.loc[name, "status"] == "ok"
    assert TG.failure_table(tags.reset_index())[["status", "images"]].values.tolist() == [["failed", 1]]


def test_missing_plan_is_one_clear_line(tmp_path, capsys):
    assert TG.main(["--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}/tags/plan.json: no tagging plan; run notebook 07 " \
                                              "(or save_tag_plan) first"


def test_paper_vlm_fails_fast_offline_and_loads_from_cache(hf_cache, tiny_vlm):
    from rebeca_utils.rehearse_hub import snapshot

    models = ModelsConfig()
    with pytest.raises(W.MissingWeightsError, match="llava-hf/llava-1.5-7b-hf are not in the Hugging Face cache"):
        V.build_vlm(models)
    model, processor = tiny_vlm
    snap = snapshot(hf_cache, models.vlm_id)
    model.save_pretrained(snap, max_shard_size="100KB")  # 3 shards, named as the 7B model's on the Hub
    processor.save_pretrained(snap)  # transformers 5's layout (test_vlm_snapshot: the Hub repo's)
    loaded, proc = V.build_vlm(models)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration" and proc.tokenizer.padding_side == "left"
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert TG.chat_prompt(proc) == TG.chat_prompt(processor)


# ----------------------------------------------------------------------------------------------- personas


def test_planted_tastes_become_positive_keywords(fixture_data):
    splits, root = fixture_data
    truth = synthetic.synthetic_truth(root)
    workers = splits.drop_duplicates("user_id").set_index("user_id")["worker"]
    red = [u for u, w in workers.items() if truth["preferences"][w].get("hue") == "red"]
    assert red, "the fixture plants a red-liking user"
    profiles = P.build_personas(P.planted_tags(root), splits, red, VlmConfig())
    for u in red:
        assert "red" in profiles[u].pos and "red" not in profiles[u].neg
        assert not set(profiles[u].pos) & set(profiles[u].neg)
        assert not any(n in profiles[u].text for n in profiles[u].neg)  # the persona names no disliked term
    ref = P.rated_images(splits, VlmConfig(keywords="reference"))
    per = ref.groupby(["user_id", "like"]).size()
    assert per.max() <= 20 and not ref.merge(splits, on=["user_id", "image"])["score"].eq(3).any()


def test_fallback_exactly_when_positives_are_too_few():
    cfg = VlmConfig(min_positives=2)
    none, one, two = (P.Persona(7, tuple(p), ("dark",), P.persona_text(p)) for p in ([], ["red"], ["red", "sea"]))
    for persona, expect in ((none, True), (one, True), (two, False)):
        prompt, neg, fb = P.build_prompt(persona, 0, cfg)
        assert fb is expect
        assert prompt.endswith(P.STYLE_SUFFIX) if fb else prompt.startswith("red, ")
        assert neg == ", ".join(P.DEFAULT_NEGATIVE)
    assert P.build_prompt(one, 0, VlmConfig())[2] is False  # Algorithm 1's default: fallback only when empty
    assert P.build_prompt(two, 1, replace(cfg, negative="user"))[:2] == ("sea, red, in a style with red, sea", "dark")
    assert P.build_prompt(none, 3, cfg)[0].split(", ")[0] == P.fallback_subject(0, 7, 3) in P.FALLBACK_KEYWORDS


def test_prompts_identical_across_runs_and_processes():
    persona = P.Persona(3, ("red", "sea", "dusk"), ("blurry",), "in a style with red, sea, dusk")
    empty = P.Persona(4, (), (), "")
    here = [P.build_prompt(p, j, VlmConfig(), seed=5) for p in (persona, empty) for j in range(6)]
    code = ("import json; from rebeca_utils.baselines import personas as P; from rebeca_utils.config import VlmConfig;"
            "ps = [P.Persona(3, ('red', 'sea', 'dusk'), ('blurry',), 'in a style with red, sea, dusk'),"
            " P.Persona(4, (), (), '')];"
            "print(json.dumps([P.build_prompt(p, j, VlmConfig(), seed=5) for p in ps for j in range(6)]))")
    there = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert [list(x) for x in here] == there
    assert len({p for p, _, _ in here[6:]}) > 1  # the fallback subject varies with j


def test_truncation_counts_prompts_over_77_clip_tokens():
    from rebeca_utils.models.encoders import build_tokenizer

    out = P.truncation(build_tokenizer(), ["a red car", "word " * 90])
    assert (out["truncated"], out["limit"], out["prompts"]) == (1, 77, 2) and out["max_tokens"] == 92
    assert out["worst"].startswith("word word")


def test_vlm_summary_falls_back_to_the_template_when_it_writes_nothing_usable(tiny_vlm, fixture_data):
    model, processor = tiny_vlm
    splits, root = fixture_data
    summarise = P.summariser(model, processor, max_new_tokens=16)
    assert summarise(["red", "corner"]) == ""  # the random tiny LLaVA writes bytes, not a phrase
    users = sorted(splits.loc[~splits["holdout"], "user_id"].unique())[:2]
    tags = P.planted_tags(root)
    written = P.build_personas(tags, splits, users, VlmConfig(summarise=True), lambda pos: "warm red tones")
    fallback = P.build_personas(tags, splits, users, VlmConfig(summarise=True), summarise)
    for u in users:
        assert (written[u].text, written[u].source) == ("warm red tones", "vlm")
        assert fallback[u].source == "template" and fallback[u].text == P.persona_text(fallback[u].pos)
