"""Per-layer features of the full preset's transformer backends (Feature.layers, the `layers`
array of the cache), each tested with a tiny random model of its real architecture saved
locally: WavLM (hf-audio), the Whisper encoder (whisper-encoder), RoBERTa (hf-text) and a CLIP
vision tower (hf-vision). Real speech comes from ../shared/data, read in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import Clip
from pipeline.stages.base import ClipContext, FaceTrack, Media, get_backend
from tests.conftest import shared_path
from tests.helpers_tiny_models import (
    AUDIO_DIM,
    AUDIO_STATES,
    TEXT_DIM,
    TEXT_STATES,
    VISION_DIM,
    VISION_STATES,
    WHISPER_DIM,
    WHISPER_STATES,
    save_clip_vision,
    save_roberta,
    save_wavlm,
    save_whisper,
)

SR = 16000
SPEECH = "ravdess-speech/Actor_01/03-01-05-02-01-01-01.wav"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_layers")
    return {"wavlm": save_wavlm(root / "wavlm"), "whisper": save_whisper(root / "whisper"),
            "roberta": save_roberta(root / "roberta"), "clip": save_clip_vision(root / "clip")}  # fmt: skip


def speech() -> np.ndarray:
    import soundfile as sf

    x, sr = sf.read(str(shared_path(SPEECH)), dtype="float32", always_2d=True)
    assert sr == 48000
    import librosa

    return librosa.resample(x.mean(axis=1), orig_sr=sr, target_sr=SR).astype(np.float32)


def audio_ctx(x: np.ndarray, cid: str = "c") -> ClipContext:
    return ClipContext(clip=Clip(id=cid, dataset="t"), root=Path("."),
                       media=Media(path=None, audio=x, sample_rate=SR))  # fmt: skip


def stage(name: str, backend: str, **config):
    cls = get_backend(name, backend)
    s = cls(cls.Config(**config))
    s.ensure_loaded()
    return s


@pytest.mark.parametrize("backend, model, dim, states", [
    ("hf-audio", "wavlm", AUDIO_DIM, AUDIO_STATES),
    ("whisper-encoder", "whisper", WHISPER_DIM, WHISPER_STATES),
])  # fmt: skip
def test_audio_layers_are_every_hidden_state_mean(models, backend, model, dim, states) -> None:
    x = speech()
    last = stage("audio", backend, model=str(models[model]))
    assert last.layer_dims() == {"audio": (states, dim)} and last.output_dims() == {"audio": (dim, dim)}
    ctx = audio_ctx(x)
    last.process_one(ctx)
    f = ctx.features["audio"]
    assert f.layers.shape == (states, dim) and np.isfinite(f.layers).all()
    # pooled (the chosen layer's mean over the clip's frames) is that layer's row of `layers`
    np.testing.assert_allclose(f.layers[-1], f.pooled, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f.seq.mean(axis=0), f.pooled, rtol=1e-4, atol=1e-5)
    assert not np.allclose(f.layers[0], f.layers[-1])  # different states, different vectors
    # a chosen earlier layer: the sequence and pooled vector follow it, `layers` does not move
    first = stage("audio", backend, model=str(models[model]), layer=0)
    ctx0 = audio_ctx(x)
    first.process_one(ctx0)
    np.testing.assert_allclose(ctx0.features["audio"].layers, f.layers, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ctx0.features["audio"].pooled, f.layers[0], rtol=1e-4, atol=1e-4)
    if backend == "whisper-encoder":
        # only the clip's own 20 ms frames, not the zero padding up to Whisper's 30 s window
        assert len(f.seq) == int(np.ceil(len(x) / 320)) < 1500
        assert np.all(np.diff(f.times) > 0) and f.times[-1] < len(x) / SR + 0.02


def test_long_audio_layers_weight_windows_by_frames(models) -> None:
    """A clip cut into windows: `layers` is the mean over all frames, not over windows."""
    x = speech()
    s = stage("audio", "hf-audio", model=str(models["wavlm"]), max_seconds=1.0)
    ctx = audio_ctx(x)
    s.process_one(ctx)
    f = ctx.features["audio"]
    assert len(x) / SR > 2.0
    np.testing.assert_allclose(f.layers[-1], f.seq.mean(axis=0), rtol=1e-4, atol=1e-5)


def test_text_layers(models) -> None:
    s = stage("text", "hf-text", model=str(models["roberta"]))
    assert s.layer_dims() == {"text": (TEXT_STATES, TEXT_DIM)}
    ctx = ClipContext(clip=Clip(id="t", dataset="t", transcript="I am so happy. We lost the game!",
                                title="what a day"), root=Path("."))  # fmt: skip
    s.process_one(ctx)
    f = ctx.features["text"]
    assert f.layers.shape == (TEXT_STATES, TEXT_DIM)
    np.testing.assert_allclose(f.layers[-1], f.pooled, rtol=1e-4, atol=1e-5)  # mean pooling, layer -1
    assert ctx.features["cond"].layers is None  # the title vector keeps no layers
    cls = stage("text", "hf-text", model=str(models["roberta"]), pooling="cls", layer=1)
    ctx2 = ClipContext(clip=Clip(id="t", dataset="t", transcript="I am so happy."), root=Path("."))
    cls.process_one(ctx2)
    np.testing.assert_allclose(ctx2.features["text"].layers[1], ctx2.features["text"].pooled, rtol=1e-4, atol=1e-5)


def test_vision_layers(models) -> None:
    s = stage("visual", "hf-vision", model=str(models["clip"]))
    assert s.layer_dims() == {"visual": (VISION_STATES, VISION_DIM)}
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    crops = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), None, rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)]
    face = FaceTrack(boxes=[np.zeros(4)] * 3, landmarks=[np.zeros((5, 2))] * 3, crops=crops,
                     scores=[0.9, None, 0.9], coverage=2 / 3)  # fmt: skip
    media = Media(path=None, frames=frames, frame_times=[0.0, 0.5, 1.0], width=64, height=64)
    ctx = ClipContext(clip=Clip(id="v", dataset="t"), root=Path("."), media=media, face=face)
    s.process_one(ctx)
    f = ctx.features["visual"]
    assert f.seq.shape == (2, 1 + VISION_DIM)  # the two face frames; flag + CLIP embedding
    assert f.layers.shape == (VISION_STATES, VISION_DIM) and np.isfinite(f.layers).all()
    # the same crops embedded one by one: layers = the mean of their per-state [CLS] tokens
    one = s.embed([crops[0], crops[2]], "face")
    per_state = one[:, VISION_DIM:].reshape(2, VISION_STATES, VISION_DIM)
    np.testing.assert_allclose(f.layers, per_state.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f.seq[:, 1:], one[:, :VISION_DIM], rtol=1e-3, atol=1e-3)


def test_runner_stores_layers_and_rejects_bad_ones() -> None:
    """The writer fills `<m>/layers` from Feature.layers; a wrong shape or a non-finite value
    makes the modality absent with a ledger line, like a bad pooled vector."""
    from pipeline import cacheformat as cf
    from pipeline.runner import _assemble
    from pipeline.stages.base import Feature

    lay = cf.ModalityLayout("audio", pooled_dim=4, seq_dim=4, max_len=3, n_layers=2, layer_dim=4)
    layout = cf.SetLayout(n=4, unit_size=4, modalities={"audio": lay})
    assert layout.unit_arrays()["audio/layers"] == ((4, 2, 4), "float16")
    ok = np.arange(8, dtype=np.float32).reshape(2, 4)
    feats = [ok, None, np.zeros((3, 4), np.float32), np.full((2, 4), np.inf, np.float32)]
    ctxs = []
    for i, layers in enumerate(feats):
        ctx = ClipContext(clip=Clip(id=f"c{i}", dataset="t"), root=Path("."))
        ctx.features["audio"] = Feature(pooled=np.ones(4, np.float32), seq=np.ones((2, 4), np.float32), layers=layers)
        ctxs.append(ctx)
    failures: list[dict] = []
    data = _assemble(layout, ctxs, failures)
    assert data["audio/layers"].shape == (4, 2, 4) and data["audio/layers"].dtype == np.float16
    np.testing.assert_array_equal(data["audio/layers"][0], ok)
    assert data["audio/present"].tolist() == [True, False, False, False]
    assert (data["audio/layers"][1:] == 0).all()
    msgs = [f["message"] for f in failures]
    assert msgs[0] == "layers shape None != [2, 4]" and msgs[1] == "layers shape (3, 4) != [2, 4]"
    assert "NaN/Inf" in msgs[2]
    # a layout entry without n_layers (every set written before) declares no layers array
    old = cf.ModalityLayout.from_json("audio", {"pooled_dim": 4, "seq_dim": 4, "max_len": 3, "kind": "sequence"})
    assert not old.has_layers and "audio/layers" not in old.paths() and "n_layers" not in old.to_json()
    assert cf.ModalityLayout.from_json("audio", lay.to_json()) == lay
