"""LLaVA-1.5-7B's weights as a Hub snapshot: fetched by patterns, present when the index's shards and the processor
files are there (whatever file holds the chat template), loaded from the folder snapshot_download names offline."""
import json
import shutil

import pytest
from huggingface_hub import constants, snapshot_download

from rebeca_utils.baselines import tagging as TG
from rebeca_utils.config import ModelsConfig, get_profile
from rebeca_utils.models import vlm as V
from rebeca_utils.models import weights as W

pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread
TINY, PAPER = get_profile("smoke").models, ModelsConfig()
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def tiny_vlm():
    return V.build_vlm(TINY)


def _todays_repo(snap, model, processor, template: str, shard_size: str = "100KB"):
    """The tiny LLaVA laid out like llava-hf/llava-1.5-7b-hf today; `template`: json, jinja or both."""
    model.save_pretrained(snap, max_shard_size=shard_size)  # config, generation_config, index, shards
    processor.save_pretrained(snap)  # processor_config, tokenizer.json, tokenizer_config, chat_template.jinja
    tok = processor.tokenizer
    processor.image_processor.to_json_file(snap / "preprocessor_config.json")
    (snap / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map))
    (snap / "added_tokens.json").write_text(json.dumps({t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<image>")}))
    (snap / "tokenizer.model").write_bytes(b"")  # the repo's sentencepiece file; tokenizer.json is what loads
    jinja = snap / "chat_template.jinja"
    if template in ("json", "both"):
        (snap / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
    if template == "json":
        jinja.unlink()
    return snap


@pytest.mark.parametrize("template", ["json", "jinja", "both"])
def test_todays_snapshot_is_present_and_loads(hf_cache, tiny_vlm, template, monkeypatch):
    from rebeca_utils.rehearse_hub import snapshot

    model, processor = tiny_vlm
    entry = W.vlm_entry(PAPER)
    assert not W.weights_in_cache(entry)
    snap = _todays_repo(snapshot(hf_cache, PAPER.vlm_id), model, processor, template, shard_size="60KB")
    shards = sorted(set(json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 3  # not the 7B model's three: the list comes from the index
    loaded, proc = V.build_vlm(PAPER)
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert TG.chat_prompt(proc) == TG.chat_prompt(processor) and proc.tokenizer.padding_side == "left"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what a GPU box without internet runs
    assert W.snapshot_folder(PAPER.vlm_id) == snap == type(snap)(snapshot_download(PAPER.vlm_id, cache_dir=hf_cache))
    assert W.weights_in_cache(entry) and W.snapshot_missing(snap) == []
    assert W.require_weights(entry)[0] == str(snap / "config.json")


def test_a_missing_shard_is_named_and_the_loader_reads_refs_main(hf_cache, tiny_vlm):
    from rebeca_utils.rehearse_hub import snapshot

    model, processor = tiny_vlm
    snap = _todays_repo(snapshot(hf_cache, PAPER.vlm_id), model, processor, "both")
    old = snap.parent / OLD_COMMIT  # an older snapshot still in the cache: refs/main names the new one
    shutil.copytree(snap, old)
    (old / "model-00001-of-00003.safetensors").unlink()
    assert W.snapshot_folder(PAPER.vlm_id) == snap and W.weights_in_cache(W.vlm_entry(PAPER))
    (snap / "model-00002-of-00003.safetensors").unlink()
    (snap / "chat_template.jinja").unlink()
    (snap / "chat_template.json").unlink()
    assert W.snapshot_missing(snap) == ["model-00002-of-00003.safetensors", "chat_template.jinja or chat_template.json"]
    with pytest.raises(W.MissingWeightsError) as e:
        V.build_vlm(PAPER)
    assert str(e.value) == (
        f"LLaVA-1.5-7B (VLM baselines' tagger): weights of {PAPER.vlm_id} are not in the Hugging Face cache {hf_cache} "
        "(missing: model-00002-of-00003.safetensors, chat_template.jinja or chat_template.json) and the Hub is offline "
        f"(HF_HUB_OFFLINE=1). {W.SETUP_HINT}, or `hf download {PAPER.vlm_id} --include '*.json' '*.safetensors' "
        "'*.model' '*.jinja' 'tokenizer*'`, then copy that cache here (or point HF_HOME / HF_HUB_CACHE at it).")
