"""LAION aesthetic predictor and HPSv2: official checkpoint layouts, batched scoring, offline failures."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: these tests never reach the network

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rebeca_utils import runtime as RT
from rebeca_utils.config import ModelsConfig, get_profile
from rebeca_utils.evaluate import aesthetics as AES
from rebeca_utils.models import encoders as ENC
from rebeca_utils.models import weights as W
from rebeca_utils.rehearse_hub import snapshot  # the Hub cache's layout, as the rehearsal writes it

TINY = get_profile("smoke").models
HUB = ModelsConfig()
# a copy of the official sac+logos+ava1-l14-linearMSE.pth (saved from CUDA tensors)
FIXTURE = Path(os.environ.get("REBECA_TEST_LAION_HEAD",
                              "/work/shared/fixtures/laion-aesthetic/sac+logos+ava1-l14-linearMSE.pth"))
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"official LAION head not at {FIXTURE} "
                                   "(set REBECA_TEST_LAION_HEAD)")


pytestmark = pytest.mark.usefixtures("kit_cache")  # conftest: private kit cache, one torch thread


def _images(n=5):
    rng = np.random.default_rng(0)
    sizes = [(48, 48), (80, 40), (33, 70), (64, 64), (20, 90), (50, 50), (71, 29)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes[:n]]


@pytest.fixture(scope="module")
def tiny_aesthetic():
    return AES.AestheticScorer.from_models(TINY)


@pytest.fixture(scope="module")
def tiny_hps():
    return AES.HPSScorer.from_models(TINY)


# ----------------------------------------------------------------------------------------------- LAION head


@needs_fixture
def test_official_head_checkpoint_layout():
    state = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    assert set(state) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")} == AES.HEAD_KEYS
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}
    head = AES.load_aesthetic_head(FIXTURE)
    assert not head.training and all(torch.equal(head.state_dict()[k], state[k]) for k in state)


@needs_fixture
def test_head_forward_is_the_linear_chain_on_normalised_embeddings():
    head = AES.load_aesthetic_head(FIXTURE)
    s = head.state_dict()
    x = torch.randn(6, 768, generator=torch.Generator().manual_seed(0))
    manual = x
    for i in (0, 2, 4, 6, 7):  # no activations, and dropout is inactive in eval
        manual = manual @ s[f"layers.{i}.weight"].T + s[f"layers.{i}.bias"]
    with torch.no_grad():
        assert torch.allclose(head(x), manual, atol=1e-5)
        unit = x / x.norm(dim=-1, keepdim=True)
        scores = head.score(x)
        assert torch.allclose(scores, head(unit)[:, 0], atol=1e-5) and torch.isfinite(scores).all()
        # L2 normalisation: scale is irrelevant to the score, and without it the raw MLP output differs
        assert torch.allclose(head.score(x * torch.tensor([[0.01], [3.0], [7.5], [1.0], [100.0], [0.5]])), scores,
                              atol=1e-5)
        assert not torch.allclose(head(x * 5)[:, 0], scores, atol=1e-2)
        assert torch.isfinite(head.score(torch.zeros(1, 768))).all()  # a zero norm is left as is
    # the official head on unit vectors gives scores on its 1-10 rating scale, not arbitrary numbers
    assert 0 < float(scores.mean()) < 10


def test_head_loader_rejects_other_checkpoints(tmp_path):
    bad = AES.LaionAestheticHead(512).state_dict()
    torch.save(bad, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="shapes differ"):
        AES.load_aesthetic_head(tmp_path / "wrong.pth")
    torch.save({"state_dict": bad}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        AES.load_aesthetic_head(tmp_path / "nested.pth")


def test_tiny_aesthetic_scorer_is_deterministic_and_batch_independent(tiny_aesthetic, tmp_path):
    images = _images()
    a = tiny_aesthetic.score(images)
    assert a.shape == (5,) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, tiny_aesthetic.score(images))
    assert np.array_equal(a, AES.AestheticScorer.from_models(TINY).score(images))  # seeded build
    assert np.allclose(a, tiny_aesthetic.score(images, batch_size=1), atol=1e-5)
    assert np.allclose(a, tiny_aesthetic.score(images, batch_size=2), atol=1e-5)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    assert np.allclose(tiny_aesthetic.score(paths), a, atol=1e-5)  # PNG is lossless
    assert np.array_equal(tiny_aesthetic.score_embeddings(tiny_aesthetic.embed(images)), a)
    assert tiny_aesthetic.score([]).shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_aesthetic.score(images, batch_size=0)


@needs_fixture
def test_tiny_aesthetic_scorer_takes_the_official_head(tiny_aesthetic):
    scorer = AES.AestheticScorer.from_models(TINY, head_path=FIXTURE)
    state = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    assert all(torch.equal(scorer.head.state_dict()[k], state[k]) for k in state)
    assert scorer.clip is not tiny_aesthetic.clip
    scores = scorer.score(_images())
    assert np.isfinite(scores).all() and not np.allclose(scores, tiny_aesthetic.score(_images()))


# ----------------------------------------------------------------------------------------------- HPSv2


def test_tiny_hps_prompt_matters_and_batches(tiny_hps):
    images = _images()
    cat = tiny_hps.score(images, "a photo of a cat")
    assert cat.shape == (5,) and cat.dtype == np.float32 and np.isfinite(cat).all()
    assert np.array_equal(cat, tiny_hps.score(images, "a photo of a cat"))
    assert np.allclose(cat, tiny_hps.score(images, "a photo of a cat", batch_size=1), atol=1e-4)
    assert np.allclose(cat, tiny_hps.score(images, "a photo of a cat", batch_size=3), atol=1e-4)
    dog = tiny_hps.score(images, "an oil painting of a dog")
    assert not np.allclose(cat, dog, atol=1e-3)
    assert not np.allclose(cat, tiny_hps.score(images, ""), atol=1e-3)  # App K's empty prompt is a prompt too
    mixed = tiny_hps.score(images, ["a photo of a cat", "an oil painting of a dog"] * 2 + ["a photo of a cat"])
    assert np.allclose(mixed, np.where(np.arange(5) % 2 == 0, cat, dog), atol=1e-4)
    with pytest.raises(ValueError, match="one prompt or one per image"):
        tiny_hps.score(images, ["a", "b"])
    assert tiny_hps.score([], "a cat").shape == (0,)


def test_hps_score_is_100_cosine(tiny_hps):
    images = _images(2)
    pixels = torch.stack([tiny_hps.preprocess(im) for im in images])
    with torch.no_grad():
        out = tiny_hps.model(pixels, tiny_hps.tokenizer(["a cat", "a cat"]))  # open_clip CLIP: normalised features
    if isinstance(out, dict):
        out = (out["image_features"], out["text_features"])
    expected = 100 * (out[0] * out[1]).sum(-1)
    assert np.allclose(tiny_hps.score(images, "a cat"), expected.numpy(), atol=1e-4)


def test_hps_versions(tiny_hps):
    v21 = AES.HPSScorer.from_models(TINY, version="v2.1")
    assert v21.version == "v2.1" and tiny_hps.version == "v2.0"
    assert not np.allclose(v21.score(_images(), "a cat"), tiny_hps.score(_images(), "a cat"), atol=1e-3)
    assert W.hps_entry(HUB, "v2.1").files == ["HPS_v2.1_compressed.pt"]
    with pytest.raises(ValueError, match="v2.0, v2.1"):
        AES.HPSScorer.from_models(TINY, version="v3")


def test_hps_transform_pads_the_longest_side_to_square():
    t = AES.hps_transform(32)
    x = t(Image.new("RGB", (128, 64), (255, 255, 255)))
    assert x.shape == (3, 32, 32)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    black = (torch.zeros(3) - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    assert torch.allclose(x[:, :8, :], black[:, None, None].expand(3, 8, 32))  # 8 rows of zero padding on top
    assert torch.allclose(x[:, 8:24, :], ((1 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD))
                          [:, None, None].expand(3, 16, 32), atol=1e-3)
    assert t(Image.new("L", (32, 20))).shape == (3, 32, 32)


@pytest.mark.parametrize("prefix,half", [("", True), ("module.", False)])
def test_hps_checkpoint_in_the_real_layout_loads_offline(hf_cache, tiny_hps, prefix, half, monkeypatch):
    """A tiny model saved as HPS_v2_compressed.pt ({"state_dict": ...}) in the xswu/HPSv2 cache loads by the hub path."""
    import open_clip

    arch = ENC.tiny_clip_name(TINY, "hps")
    # the architecture HPS fine-tuned comes from its base repo's open_clip_config.json (a tiny one here)
    pcfg = dict(open_clip.get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k"), hf_hub="someone/tiny-hps-base/")
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda a, t: pcfg if a == arch else real(a, t))
    base = snapshot(hf_cache, "someone/tiny-hps-base")
    (base / W.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch)}))
    models = replace(HUB, hps_clip=(arch, "laion2b_s32b_b79k"))
    with pytest.raises(W.MissingWeightsError, match="xswu/HPSv2"):
        AES.HPSScorer.from_models(models)
    state = {prefix + k: (v.half() if half and v.is_floating_point() else v).clone()
             for k, v in tiny_hps.model.state_dict().items()}
    torch.save({"epoch": 1, "name": "hps", "state_dict": state}, snapshot(hf_cache, "xswu/HPSv2") / "HPS_v2_compressed.pt")
    assert W.weights_in_cache(W.hps_entry(models))
    scorer = AES.HPSScorer.from_models(models)
    assert isinstance(scorer.model, open_clip.CLIP) and not scorer.model.training
    got, ref = scorer.model.state_dict(), tiny_hps.model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.allclose(got[k].float(), ref[k].float(), atol=1e-2 if half else 0) for k in ref)
    assert np.allclose(scorer.score(_images(), "a cat"), tiny_hps.score(_images(), "a cat"), atol=0.5 if half else 1e-4)
    # a checkpoint of another architecture fails with the keys that do not fit
    torch.save({"state_dict": {"visual.nope": torch.zeros(1)}}, hf_cache / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        AES.load_hps_state(open_clip.create_model(arch, pretrained=None), hf_cache / "other.pt")


# ----------------------------------------------------------------------------------------------- paper profile


def test_paper_scorers_fail_fast_offline(hf_cache):
    start = time.perf_counter()
    with pytest.raises(W.MissingWeightsError) as err:
        AES.AestheticScorer.from_models(HUB)
    msg = str(err.value)
    target = Path(os.environ[RT.CACHE_ENV]) / "laion-aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    assert HUB.aesthetic_head_url in msg and str(target) in msg and W.AESTHETIC_HEAD_ENV in msg
    assert "00_setup" in msg and "\n" not in msg
    for version, name in W.HPS_FILES.items():
        with pytest.raises(W.MissingWeightsError) as err:
            AES.HPSScorer.from_models(HUB, version=version)
        msg = str(err.value)
        assert "xswu/HPSv2" in msg and name in msg and str(hf_cache) in msg and "hf download" in msg
        assert "00_setup" in msg and "\n" not in msg
    assert time.perf_counter() - start < 2.0


def test_head_path_overrides_and_env(hf_cache, monkeypatch, tmp_path):
    missing = tmp_path / "elsewhere" / "head.pth"
    with pytest.raises(W.MissingWeightsError, match=str(missing)):
        AES.build_aesthetic_head(HUB, head_path=missing)
    monkeypatch.setenv(W.AESTHETIC_HEAD_ENV, str(missing))
    assert W.aesthetic_head_entry(HUB).files == [str(missing)]
    with pytest.raises(W.MissingWeightsError, match=str(missing)):
        AES.build_aesthetic_head(HUB)
    if FIXTURE.is_file():
        monkeypatch.setenv(W.AESTHETIC_HEAD_ENV, str(FIXTURE))
        assert W.weights_in_cache(W.aesthetic_head_entry(HUB))
        assert torch.equal(AES.build_aesthetic_head(HUB).layers[7].bias, AES.load_aesthetic_head(FIXTURE).layers[7].bias)


def test_head_host_unreachable_fails_fast(hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    models = replace(HUB, aesthetic_head_url="http://127.0.0.1:9/sac+logos+ava1-l14-linearMSE.pth")  # refused
    with pytest.raises(W.MissingWeightsError, match="127.0.0.1 is unreachable.*sac\\+logos"):
        AES.build_aesthetic_head(models)


@needs_fixture
def test_head_is_fetched_atomically_into_the_kit_cache_and_reused(hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    models = replace(HUB, aesthetic_head_url=FIXTURE.as_uri())  # a file:// URL stands in for GitHub
    entry = W.aesthetic_head_entry(models)
    target = Path(os.environ[RT.CACHE_ENV]) / "laion-aesthetic" / FIXTURE.name
    assert entry.files == [str(target)] and not W.weights_in_cache(entry)
    head = AES.build_aesthetic_head(models)
    assert target.read_bytes() == FIXTURE.read_bytes() and [p.name for p in target.parent.iterdir()] == [target.name]
    assert torch.equal(head.layers[0].weight, AES.load_aesthetic_head(FIXTURE).layers[0].weight)
    mtime = target.stat().st_mtime_ns
    assert W.download_paper_weights([entry]) == {entry.repo_id: [str(target)]} and target.stat().st_mtime_ns == mtime
    AES.build_aesthetic_head(models)
    assert target.stat().st_mtime_ns == mtime


def test_paper_weights_list_the_head_and_hps(hf_cache):
    from rebeca_utils.notebook.setup_check import weights_report

    entries = W.paper_weights()
    assert len(entries) == 9
    head, hps, vlm = entries[-3:]  # the VLM baselines' LLaVA comes last
    assert head.url == HUB.aesthetic_head_url and head.repo_id == "github.com/christophschuhmann/improved-aesthetic-predictor"
    assert head.files[0].endswith("laion-aesthetic/sac+logos+ava1-l14-linearMSE.pth")
    assert hps == W.hps_entry(HUB, "v2.0") and hps.repo_id == "xswu/HPSv2" and hps.files == ["HPS_v2_compressed.pt"]
    report = weights_report()
    assert len(report) == 9 and not report["in_cache"].any() and vlm.repo_id == HUB.vlm_id
    assert "xswu/HPSv2" in set(report["repo"])


# ----------------------------------------------------------------------------------------------- folders
