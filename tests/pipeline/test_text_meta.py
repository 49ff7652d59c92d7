"""Text (minilm, hf-text with a tiny local BERT) and metadata stages on small ClipContexts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import Clip
from pipeline.stages.base import REGISTRY, ClipContext, ClipError, Cue
from pipeline.stages.metadata import ManifestMetadata, flatten
from pipeline.stages.text import (
    HFText,
    MiniLMText,
    ModelMissingError,
    clean_text,
    split_sentences,
)


def ctx(transcript: str | None = None, title: str | None = None, cues=None, cid: str = "c1",
        **kw) -> ClipContext:  # fmt: skip
    clip = Clip(id=cid, dataset="d", transcript=transcript, title=title, **kw)
    return ClipContext(clip=clip, root=Path("."), cues=cues)


# --- text helpers ----------------------------------------------------------------------------
def test_split_and_clean() -> None:
    assert split_sentences("I won! Really?  Yes.\n我很好。你呢？") == [
        "I won!", "Really?", "Yes.", "我很好。", "你呢？"
    ]  # fmt: skip
    assert split_sentences(" ... \t") == []
    assert clean_text(b"\xff\xfehello\x00 there") == "hello there"
    assert clean_text("it\u2019s\u200b ok") == "it\u2019s ok"


# --- minilm ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm() -> MiniLMText:
    stage = MiniLMText()
    stage.ensure_loaded()
    return stage


def test_minilm_shapes_order_and_cond(minilm: MiniLMText) -> None:
    assert REGISTRY[("text", "minilm")] is MiniLMText
    assert minilm.output_dims() == {"text": (384, 384), "cond": (0, 384)}
    assert minilm.models()[0]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    cues = [Cue(2.0, 3.0, "second cue"), Cue(0.5, 1.0, "first cue"), Cue(4.0, 5.0, " \x00 ")]
    c = ctx("I can't believe it. We won!", title="Finals vlog", cues=cues)
    assert minilm.process([c]) == [None]
    f = c.features["text"]
    assert f.seq.shape == (4, 384) and f.pooled.shape == (384,) and f.seq.dtype == np.float32
    np.testing.assert_allclose(f.pooled, f.seq.mean(axis=0), atol=1e-6)
    single = minilm._embed(["We won!", "first cue", "second cue", "Finals vlog"])
    np.testing.assert_allclose(f.seq[1], single[0][1], atol=1e-5)  # transcript sentences first
    np.testing.assert_allclose(f.seq[2], single[1][1], atol=1e-5)  # then cues by time
    np.testing.assert_allclose(f.seq[3], single[2][1], atol=1e-5)
    np.testing.assert_allclose(c.features["cond"].pooled, single[3][1], atol=1e-5)
    assert "text" not in c.absent and "cond" not in c.absent


def test_minilm_absent_reasons(minilm: MiniLMText) -> None:
    none, blank, junk, titled = (ctx(None, cid="a"), ctx("  \n\t", cid="b"),
                                 ctx("\ufffd\x00\x01 ...", cid="c"), ctx(None, "A title", cid="t"))  # fmt: skip
    assert minilm.process([none, blank, junk, titled]) == [None] * 4
    assert none.absent["text"] == "no transcript; no subtitle cues"
    assert blank.absent["text"] == "transcript is empty; no subtitle cues"
    assert junk.absent["text"].startswith("transcript has no readable text")
    for c in (none, blank, junk):
        assert "text" not in c.features and "cond" not in c.features
        assert c.absent["cond"] == "no title"
    assert "text" not in titled.features and titled.features["cond"].pooled.shape == (384,)


def test_minilm_batch_equals_one_by_one(minilm: MiniLMText) -> None:
    def make() -> list[ClipContext]:
        return [
            ctx("Short.", cid="x1"),
            ctx("A much longer transcript with several words. And a second sentence here!",
                title="context line", cid="x2"),
            ctx(None, cues=[Cue(0, 1, "only a cue")], title="t", cid="x3"),
        ]  # fmt: skip

    batch, single = make(), make()
    assert minilm.process(batch) == [None] * 3
    for c in single:
        minilm.process_one(c)
    for b, s in zip(batch, single, strict=True):
        assert b.features.keys() == s.features.keys()
        for m in b.features:
            np.testing.assert_allclose(b.features[m].pooled, s.features[m].pooled, atol=1e-5)


def test_minilm_plain_torch_encoder_equals_sentence_transformers(minilm: MiniLMText) -> None:
    """The bundled model runs in plain torch (minilm_model.py): on 200 real MELD utterances,
    a Chinese subtitle and a text past the 256-token cap, the same token ids and the same
    vectors as sentence-transformers' encode of the same folder (float rounding apart)."""
    import csv

    from sentence_transformers import SentenceTransformer

    from pipeline.stages.minilm_model import MiniLM
    from tests.conftest import shared_path

    with open(shared_path("meld", "dev_sent_emo.csv"), encoding="utf-8") as f:
        texts = [r["Utterance"] for r in csv.DictReader(f)][:200]
    texts += ["我进去帮他", "I've decided, Rem.", "so " * 400]
    assert isinstance(minilm._model, MiniLM)
    ref = SentenceTransformer(minilm._model_path(), device="cpu")
    assert minilm._model.token_ids(texts) == ref.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    ours = np.stack([v for _, v in minilm._embed(texts)])
    theirs = ref.encode(texts, batch_size=16, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(texts), 384)
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_minilm_stage_on_another_sentence_transformers_folder(tmp_path: Path, tiny_bert: Path,
                                                              pooling: str) -> None:
    """`text.model=DIR`: a BERT + mean pooling + normalize folder runs in plain torch, any other
    (here CLS pooling) through sentence-transformers; both give sentence-transformers' vectors."""
    from sentence_transformers import SentenceTransformer, models

    from pipeline.stages.minilm_model import MiniLM

    mods = [models.Transformer(str(tiny_bert), max_seq_length=12), models.Pooling(16, pooling)]
    if pooling == "mean":
        mods.append(models.Normalize())
    SentenceTransformer(modules=mods, device="cpu").save(str(tmp_path / "st"))
    stage = MiniLMText({"model": str(tmp_path / "st")})
    stage.ensure_loaded()
    assert isinstance(stage._model, MiniLM) == (pooling == "mean")
    assert stage.output_dims()["text"] == (16, 16)
    texts = ["i am happy !", "we lost the game . it is not ok", "hello world " * 20]
    ours = np.stack([v for _, v in stage._embed(texts)])
    ref = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(ours - ref).max() < 1e-5


def test_minilm_sources_config() -> None:
    stage = MiniLMText({"sources": ["cues"], "cond": False})
    assert stage.output_dims() == {"text": (384, 384)}
    c = ctx("ignored transcript", title="t", cues=[])
    stage._embed = lambda texts: [(np.ones((1, 384), np.float32), np.ones(384, np.float32))] * len(texts)  # type: ignore[method-assign]
    stage._loaded = True
    stage.process_one(c)
    assert c.absent == {"text": "no subtitle cues"} and c.features == {}
    with pytest.raises(ValueError, match="sources"):
        MiniLMText({"sources": ["subtitles"]})


# --- hf-text with a tiny random BERT -----------------------------------------------------------
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "am", "happy", "sad", "we", "won",
         "lost", "it", "is", "ok", "not", "good", "hello", "world", "the", "game", ".", "!", "?",
         "##s", "##ed"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    vocab = {w: i for i, w in enumerate((d / "vocab.txt").read_text().split("\n")) if w}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).eval().save_pretrained(d)
    return d


def test_hf_text_shapes_and_values(tiny_bert: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    stage = HFText({"model": str(tiny_bert), "pooling": "cls"})
    assert stage.output_dims() == {"text": (16, 16), "cond": (0, 16)}  # before loading
    assert stage.models() == [{"id": str(tiny_bert), "revision": "local"}]
    c = ctx("I am happy. We won the game!", title="hello world", cues=[Cue(0, 1, "it is ok")])
    assert stage.process([c]) == [None]
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert)
    n_tokens = sum(len(tok.tokenize(s)) for s in ["I am happy.", "We won the game!", "it is ok"])
    f = c.features["text"]
    assert f.seq.shape == (n_tokens, 16) and f.pooled.shape == (16,)
    with torch.inference_mode():
        h = model(**tok(["hello world"], return_tensors="pt")).last_hidden_state
    np.testing.assert_allclose(c.features["cond"].pooled, h[0, 0].numpy(), atol=1e-5)  # cls
    with torch.inference_mode():
        h = model(**tok(["I am happy."], return_tensors="pt")).last_hidden_state
    np.testing.assert_allclose(f.seq[0], h[0, 1].numpy(), atol=1e-5)  # first content token


def test_hf_text_cap_layer_pooling_batching(tiny_bert: Path) -> None:
    capped = HFText({"model": str(tiny_bert), "max_tokens": 3})
    c = ctx("I am happy. We won the game!")
    capped.process_one(c)
    assert c.features["text"].seq.shape == (3, 16)
    assert c.absent["cond"] == "no title"

    def make() -> list[ClipContext]:
        return [ctx("ok.", cid="a"), ctx("we lost the game . it is not good !", title="sad", cid="b"),
                ctx("   ", cid="c")]  # fmt: skip

    last, first = HFText({"model": str(tiny_bert)}), HFText({"model": str(tiny_bert), "layer": 0})
    batch, single, emb = make(), make(), make()
    assert last.process(batch) == [None] * 3
    for s in single:
        last.process_one(s)
    first.process(emb)
    for b, s, e in zip(batch[:2], single[:2], emb[:2], strict=True):
        np.testing.assert_allclose(b.features["text"].seq, s.features["text"].seq, atol=1e-5)
        np.testing.assert_allclose(b.features["text"].pooled, s.features["text"].pooled, atol=1e-5)
        assert not np.allclose(b.features["text"].pooled, e.features["text"].pooled)
    assert batch[2].absent["text"].startswith("transcript is empty")
    with pytest.raises(ValueError, match=r"text.layer=5 is outside"):
        HFText({"model": str(tiny_bert), "layer": 5}).ensure_loaded()


def test_hf_text_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    for name in (str(tmp_path / "no-such-model"), "nonexistent-org/no-such-model"):
        stage = HFText({"model": name})
        with pytest.raises(ModelMissingError) as e:
            stage.ensure_loaded()
        msg = str(e.value)
        assert "\n" not in msg and f"'{name}'" in msg
        assert "--set text.model=/local/dir" in msg and "HF_HOME" in msg
        with pytest.raises(ModelMissingError):
            stage.output_dims()


# --- metadata --------------------------------------------------------------------------------
AVA_META = {
    "role": "speaker", "topic": "Work",
    "profile": {"age": "young", "gender": "female", "timbre": "mid"},
    "situation": "I felt proud", "chain_of_empathy": {"speaker_emotion": "proud"},
}  # fmt: skip
INFO = {"name": "d", "label_derived": ["chain_of_empathy.*", "situation"]}


def meta_ctx(meta: dict, turn: int | None = 2, cid: str = "m") -> ClipContext:
    return ctx("x", cid=cid, turn=turn, metadata=meta)


def _bound(**cfg) -> ManifestMetadata:
    stage = ManifestMetadata(cfg)
    stage.bind_dataset(INFO)
    return stage


def _vec(stage: ManifestMetadata, meta: dict, turn: int | None = 2) -> np.ndarray:
    c = meta_ctx(meta, turn)
    stage.process_one(c)
    return c.features["meta"].pooled


def test_metadata_default_fields_exclude_label_derived() -> None:
    stage = _bound()
    assert REGISTRY[("metadata", "manifest")] is ManifestMetadata
    assert stage.output_dims() == {"meta": (0, 32)}
    used = stage.values(meta_ctx(AVA_META))
    assert set(used) == {"turn", "role", "topic", "profile.age", "profile.gender",
                         "profile.timbre"}  # fmt: skip
    v = _vec(stage, AVA_META)
    assert v.shape == (32,) and v.dtype == np.float32 and np.abs(v).sum() > 0
    leak = {**AVA_META, "situation": "other", "chain_of_empathy": {"speaker_emotion": "sad"}}
    np.testing.assert_array_equal(_vec(stage, leak), v)  # label-derived changes nothing
    older = {**AVA_META, "profile": {**AVA_META["profile"], "age": "elderly"}}
    assert not np.array_equal(_vec(stage, older), v)
    assert not np.array_equal(_vec(stage, AVA_META, turn=5), v)
    np.testing.assert_array_equal(_vec(_bound(), AVA_META), v)  # stable across instances


def test_metadata_label_derived_needs_explicit_opt_in() -> None:
    fields = ["profile.age", "chain_of_empathy.speaker_emotion"]
    with pytest.raises(ClipError, match=r"label-derived.*include_label_derived=true"):
        _bound(fields=fields).process_one(meta_ctx(AVA_META))
    stage = _bound(fields=fields, include_label_derived=True)
    sad = {**AVA_META, "chain_of_empathy": {"speaker_emotion": "sad"}}
    assert not np.array_equal(_vec(stage, AVA_META), _vec(stage, sad))


def test_metadata_numeric_scaling_and_absent(monkeypatch, tmp_path: Path) -> None:
    raw = _bound(dim=8, fields=["duration"], numeric="raw", scale={"duration": 2.0})
    v = _vec(raw, {"duration": 10})
    assert np.count_nonzero(v) == 1 and abs(v[np.nonzero(v)][0]) == pytest.approx(5.0)
    logv = _vec(_bound(dim=8, fields=["duration"]), {"duration": 10})
    assert abs(logv[np.nonzero(logv)][0]) == pytest.approx(np.log1p(10.0), rel=1e-6)
    tags = _vec(_bound(dim=64, fields=["tags"]), {"tags": ["a", "b", ""]})
    assert np.count_nonzero(tags) == 2 and set(np.abs(tags[tags != 0])) == {1.0}
    c = meta_ctx({}, turn=None)
    _bound().process_one(c)
    assert c.absent["meta"] == "no metadata fields for this clip" and "meta" not in c.features
    # without bind_dataset the stage reads manifests/<dataset>/dataset.json from the cwd
    (tmp_path / "manifests" / "d").mkdir(parents=True)
    (tmp_path / "manifests" / "d" / "dataset.json").write_text(json.dumps(INFO))
    monkeypatch.chdir(tmp_path)
    assert "situation" not in ManifestMetadata().values(meta_ctx(AVA_META))


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1]}) == {"a.b": 1, "a.c.d": "x", "e": [1]}


def test_length_batches_sort_cover_and_bound():
    from pipeline.stages.text import length_batches

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 20, 40), rng.integers(80, 120, 25)])
    rng.shuffle(lengths)
    groups = length_batches(lengths, batch_size=16)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every text exactly once
    assert all(len(g) <= 16 for g in groups)
    for g in groups:  # no batch mixes a short utterance with a long context
        assert lengths[g].max() <= 1.3 * lengths[g].min() or len(g) <= 4
    assert length_batches(np.array([], dtype=int), 8) == []
