"""Audio stage: eGeMAPS on real RAVDESS speech and degenerate signals; hf-audio with a tiny
random wav2vec2 saved locally (no downloads)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from pipeline.manifest import Clip
from pipeline.stages.audio import (
    N_COMPARE,
    N_FUNCTIONALS,
    N_LLD,
    EgemapsAudio,
    HfAudio,
    egemaps_lld_and_functionals,
    frames_for,
)
from pipeline.stages.base import ClipContext, ClipError, Media, ModelMissingError
from tests.conftest import shared_path

SR = 16000
LOUDNESS_MEAN = 10  # index of loudness_sma3_amean among the 88 eGeMAPSv02 functionals
F0_MEAN = 0  # F0semitoneFrom27.5Hz_sma3nz_amean


def ravdess(name: str, actor: str = "Actor_01") -> np.ndarray:
    x, sr = sf.read(shared_path("ravdess-speech", actor, name), dtype="float32")
    assert sr == 48000
    return resample_poly(x, 1, 3).astype(np.float32)


def make_ctx(audio: np.ndarray | None, vocals: np.ndarray | None = None, cid: str = "c") -> ClipContext:
    media = Media(path=None, audio=audio, sample_rate=SR)
    return ClipContext(clip=Clip(id=cid, dataset="t"), root=Path("."), media=media, vocals=vocals)


@pytest.fixture(scope="module")
def egemaps() -> EgemapsAudio:
    stage = EgemapsAudio()
    stage.ensure_loaded()
    return stage


# --- egemaps -----------------------------------------------------------------------------------
def test_egemaps_real_speech_shapes_and_emotion(egemaps: EgemapsAudio) -> None:
    neutral = make_ctx(ravdess("03-01-01-01-01-01-01.wav"))
    angry = make_ctx(ravdess("03-01-05-02-01-01-01.wav"))
    for ctx in (neutral, angry):
        egemaps.process_one(ctx)
        f = ctx.features["audio"]
        dur = len(ctx.media.audio) / SR
        assert f.seq.shape[1] == N_LLD and f.seq.dtype == np.float32
        assert abs(f.seq.shape[0] - dur / 0.01) < 8  # 10 ms hop over the whole clip
        assert f.pooled.shape == (N_FUNCTIONALS + 2 * 40,) and f.pooled.dtype == np.float32
        assert f.times.shape == (f.seq.shape[0],)
        np.testing.assert_allclose(np.diff(f.times), 0.01, atol=1e-4)
        assert np.all(np.isfinite(f.seq)) and np.all(np.isfinite(f.pooled))
        assert "audio" not in ctx.absent and "audio" not in ctx.status
    n, a = neutral.features["audio"].pooled, angry.features["audio"].pooled
    # strong anger of the same actor and sentence is louder and higher pitched than neutral
    assert a[LOUDNESS_MEAN] > 1.5 * n[LOUDNESS_MEAN]
    assert a[F0_MEAN] > n[F0_MEAN] + 3  # semitones
    assert egemaps.output_dims() == {"audio": (N_LLD, f.pooled.shape[0])}


def test_output_dims_follow_config() -> None:
    assert EgemapsAudio({"n_mels": 8}).output_dims() == {"audio": (25, 88 + 16)}
    assert EgemapsAudio({"n_mels": 8, "feature_set": "compare"}).output_dims() == {"audio": (25, 6373 + 16)}
    assert EgemapsAudio({"n_mels": 8, "feature_set": "both"}).output_dims() == {"audio": (25, 88 + 6373 + 16)}
    with pytest.raises(ValueError, match="feature_set"):
        EgemapsAudio({"feature_set": "mfcc"})


@pytest.mark.parametrize("name, seconds", [("03-01-05-02-01-01-01.wav", None),
                                           ("03-01-02-01-01-01-01.wav", None),
                                           ("03-01-05-02-01-01-01.wav", 0.5),
                                           ("03-01-05-02-01-01-01.wav", 0.03)])
def test_one_opensmile_run_equals_the_two_level_calls(egemaps: EgemapsAudio, name: str, seconds) -> None:
    """LLDs, their start times and functionals from one openSMILE run are exactly what
    Smile.process_signal returns per level (NaN for a signal too short for openSMILE)."""
    x = ravdess(name)[: int(seconds * SR) if seconds else None]
    lld, starts, fun = egemaps_lld_and_functionals(egemaps._fun, x, SR)
    with pytest.warns(UserWarning, match="too short") if seconds == 0.03 else contextlib.nullcontext():
        want_lld = egemaps._lld.process_signal(x, SR)
        want_fun = egemaps._fun.process_signal(x, SR).to_numpy(np.float32).reshape(-1)
    np.testing.assert_array_equal(lld, want_lld.to_numpy(np.float32))
    np.testing.assert_array_equal(starts, want_lld.index.get_level_values("start").total_seconds().to_numpy())
    np.testing.assert_array_equal(fun, want_fun)
    assert lld.shape[1] == N_LLD and fun.shape == (N_FUNCTIONALS,)


def test_feature_set_compare_and_both_on_real_speech(egemaps: EgemapsAudio) -> None:
    x = ravdess("03-01-05-02-01-01-01.wav")
    base = make_ctx(x)
    egemaps.process_one(base)
    got = {}
    for fs in ("compare", "both"):
        stage = EgemapsAudio({"feature_set": fs})
        ctx = make_ctx(x)
        stage.process_one(ctx)
        f = ctx.features["audio"]
        assert f.pooled.shape == (stage.output_dims()["audio"][1],) and np.all(np.isfinite(f.pooled))
        np.testing.assert_array_equal(f.seq, base.features["audio"].seq)  # sequence: eGeMAPS LLDs
        got[fs] = f.pooled
        assert [m["id"] for m in stage.models()][-1].startswith("opensmile:ComParE_2016")
    b, c, e = got["both"], got["compare"], base.features["audio"].pooled
    np.testing.assert_allclose(b[:N_FUNCTIONALS], e[:N_FUNCTIONALS], rtol=1e-5)  # eGeMAPS first
    np.testing.assert_allclose(b[N_FUNCTIONALS:], c, rtol=1e-5)  # then ComParE + log-mel
    assert np.std(c[:N_COMPARE]) > 0 and not np.allclose(c[:N_FUNCTIONALS], e[:N_FUNCTIONALS])


def test_feature_set_keys_only_change_when_chosen() -> None:
    default, explicit = EgemapsAudio(), EgemapsAudio({"feature_set": "egemaps"})
    assert "feature_set" not in default.provenance()["config"]  # the key eGeMAPS had before
    assert default.fingerprint() == explicit.fingerprint()
    fps = {EgemapsAudio({"feature_set": fs}).fingerprint() for fs in ("egemaps", "compare", "both")}
    assert len(fps) == 3
    with pytest.raises(ValueError):
        EgemapsAudio({"n_mels": 0})


def _degenerate() -> dict[str, np.ndarray]:
    x = ravdess("03-01-03-02-01-01-01.wav")
    mid = len(x) // 2
    return {
        "0.1s": x[mid : mid + SR // 10],
        "0.03s": x[mid : mid + SR * 3 // 100],  # openSMILE alone gives all-NaN here
        "1 sample": x[mid : mid + 1],
        "silent": np.zeros(SR, np.float32),
        "dc": np.full(SR, 0.7, np.float32),
        "clipped": np.clip(x * 1000.0, -1.0, 1.0),
        "extreme level": x * 1e4,
    }


@pytest.mark.parametrize("case", list(_degenerate()))
def test_degenerate_clips_give_finite_features(egemaps: EgemapsAudio, case: str) -> None:
    sig = _degenerate()[case]
    ctx = make_ctx(sig)
    egemaps.process_one(ctx)
    f = ctx.features["audio"]
    assert np.all(np.isfinite(f.seq)) and np.all(np.isfinite(f.pooled)) and np.all(np.isfinite(f.times))
    assert f.seq.shape[1] == N_LLD and f.pooled.shape == (N_FUNCTIONALS + 80,)
    assert 1 <= f.seq.shape[0] <= max(1, len(sig) // 160 + 1)  # only frames of the real clip
    if len(sig) < SR // 2:
        assert "tiled" in ctx.status["audio"]


def test_tiling_keeps_statistics_of_a_short_clip(egemaps: EgemapsAudio) -> None:
    """A 0.3 s slice tiled to 0.5 s keeps its loudness and pitch level (what the tiling
    trade-off promises), while openSMILE would return them untiled as well."""
    x = ravdess("03-01-03-02-01-01-01.wav")[SR : SR + int(0.3 * SR)]
    tiled = egemaps.describe(x).pooled
    plain = egemaps._fun.process_signal(x, SR).to_numpy().reshape(-1)
    assert tiled[LOUDNESS_MEAN] == pytest.approx(plain[LOUDNESS_MEAN], rel=0.15)
    assert tiled[F0_MEAN] == pytest.approx(plain[F0_MEAN], abs=1.5)


def test_empty_missing_and_bad_audio(egemaps: EgemapsAudio) -> None:
    with pytest.raises(ClipError, match="no samples"):
        egemaps.process_one(make_ctx(np.zeros(0, np.float32)))
    bad = np.zeros(SR, np.float32)
    bad[5] = np.inf
    with pytest.raises(ClipError, match="NaN or Inf"):
        egemaps.process_one(make_ctx(bad))
    for ctx in (make_ctx(None), ClipContext(clip=Clip(id="v", dataset="t"), root=Path("."))):
        egemaps.process_one(ctx)
        assert ctx.absent["audio"] == "no audio stream" and "audio" not in ctx.features


def test_reads_vocals_when_separated(egemaps: EgemapsAudio) -> None:
    x = ravdess("03-01-05-02-01-01-01.wav")
    quiet = (x * 0.01).astype(np.float32)
    with_vocals = make_ctx(x, vocals=quiet)
    only_quiet = make_ctx(quiet)
    egemaps.process_one(with_vocals)
    egemaps.process_one(only_quiet)
    np.testing.assert_allclose(with_vocals.features["audio"].pooled, only_quiet.features["audio"].pooled)


def test_other_sample_rates_are_resampled(egemaps: EgemapsAudio) -> None:
    x = ravdess("03-01-01-01-01-01-01.wav")
    ctx16 = make_ctx(x)
    ctx8 = make_ctx(resample_poly(x, 1, 2).astype(np.float32))
    ctx8.media.sample_rate = 8000
    egemaps.process_one(ctx16)
    egemaps.process_one(ctx8)
    a, b = ctx16.features["audio"], ctx8.features["audio"]
    assert abs(a.seq.shape[0] - b.seq.shape[0]) <= 1
    assert b.pooled[LOUDNESS_MEAN] == pytest.approx(a.pooled[LOUDNESS_MEAN], rel=0.2)


# --- hf-audio ----------------------------------------------------------------------------------
def _tiny_model(path: Path, norm: str) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm=norm, do_stable_layer_norm=norm == "layer",
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    Wav2Vec2Model(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
        return_attention_mask=norm == "layer",
    ).save_pretrained(path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def tiny_layer(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("w2v_layer"), "layer")


@pytest.fixture(scope="module")
def tiny_group(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("w2v_group"), "group")


def _clips() -> list[np.ndarray]:
    return [
        ravdess("03-01-01-01-01-01-01.wav"),
        ravdess("03-01-05-02-01-01-01.wav"),
        ravdess("03-01-04-02-01-01-02.wav", "Actor_02")[: int(1.3 * SR)],
    ]


@pytest.mark.parametrize("model", ["tiny_layer", "tiny_group"])
def test_hf_audio_batch_equals_one_by_one(model: str, request) -> None:
    path = str(request.getfixturevalue(model))
    batched = HfAudio({"model": path, "batch_size": 3})
    single = HfAudio({"model": path, "batch_size": 1})
    clips = _clips()
    ctxs = [make_ctx(x, cid=f"c{i}") for i, x in enumerate(clips)]
    assert batched.process(ctxs) == [None, None, None]
    for ctx, x in zip(ctxs, clips, strict=True):
        alone = make_ctx(x)
        single.process_one(alone)
        f, g = ctx.features["audio"], alone.features["audio"]
        assert f.seq.shape == g.seq.shape == (frames_for(len(x), [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]), 32)
        np.testing.assert_allclose(f.seq, g.seq, atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(f.pooled, f.seq.mean(axis=0), atol=1e-6)
        assert np.all(np.isfinite(f.seq))
        np.testing.assert_allclose(np.diff(f.times), 0.02, atol=1e-6)
    assert not np.allclose(ctxs[0].features["audio"].pooled, ctxs[1].features["audio"].pooled)
    # padding is only used where the encoder ignores it
    assert batched.pad_ok == (model == "tiny_layer")


def test_hf_audio_long_clip_runs_in_windows(tiny_layer: Path) -> None:
    x = _clips()[0]
    whole = HfAudio({"model": str(tiny_layer)})
    windowed = HfAudio({"model": str(tiny_layer), "max_seconds": 1.0})
    a, b = make_ctx(x), make_ctx(x)
    whole.process_one(a)
    windowed.process_one(b)
    fa, fb = a.features["audio"], b.features["audio"]
    assert abs(fb.seq.shape[0] - fa.seq.shape[0]) <= 2 * (len(x) // SR + 1)
    assert np.all(np.diff(fb.times) > 0) and fb.times[-1] == pytest.approx(fa.times[-1], abs=0.05)


def test_hf_audio_layers_dims_models_and_tiny_clips(tiny_layer: Path) -> None:
    last = HfAudio({"model": str(tiny_layer)})
    first = HfAudio({"model": str(tiny_layer), "layer": 0})
    assert last.output_dims() == {"audio": (32, 32)}  # from the config, before any clip
    assert last.models() == [{"id": str(tiny_layer), "revision": "local"}]
    x = _clips()[1]
    a, b = make_ctx(x), make_ctx(x)
    last.process_one(a)
    first.process_one(b)
    assert not np.allclose(a.features["audio"].seq, b.features["audio"].seq)
    tiny = make_ctx(x[:100])  # shorter than the 25 ms receptive field
    last.process_one(tiny)
    assert tiny.features["audio"].seq.shape == (1, 32)
    with pytest.raises(ClipError, match="no samples"):
        last.process_one(make_ctx(np.zeros(0, np.float32)))
    none = make_ctx(None)
    assert last.process([none]) == [None] and none.absent["audio"] == "no audio stream"
    with pytest.raises(ValueError, match="out of range"):
        HfAudio({"model": str(tiny_layer), "layer": 3}).ensure_loaded()


def test_hf_audio_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    for model in ("mmemo-test/no-such-audio-model", str(tmp_path / "absent_dir")):
        stage = HfAudio({"model": model})
        with pytest.raises(ModelMissingError) as e:
            stage.ensure_loaded()
        msg = str(e.value)
        assert f"'{model}'" in msg and "hf download" in msg and "\n" not in msg
        with pytest.raises(ModelMissingError):
            stage.output_dims()
