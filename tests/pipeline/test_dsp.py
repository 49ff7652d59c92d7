"""pipeline/stages/dsp.py against librosa, whose definitions it follows: the same numbers, bit
for bit, on real audio, so that moving the offline stages off librosa changed no feature."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from pipeline.stages import dsp
from tests.conftest import REPO, shared_path


def _clips() -> list[tuple[str, np.ndarray, int]]:
    paths = [sorted(shared_path("ravdess-speech", "Actor_01").glob("*.wav"))[0],  # 48 kHz speech
             sorted(shared_path("separation", "musdb").glob("*/mixture.wav"))[0],  # 44.1 kHz song
             shared_path("separation", "speech_music_sample.wav")]  # 16 kHz
    out = []
    for p in paths:
        x, sr = sf.read(p, dtype="float32", always_2d=True)
        out.append((p.name, x.mean(axis=1).astype(np.float32), sr))
    return out


@pytest.fixture(scope="module")
def clips() -> list[tuple[str, np.ndarray, int]]:
    return _clips()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_resample_stft_istft_softmask_equal_librosa(clips) -> None:
    import librosa

    for name, x, sr in clips:
        y = dsp.resample(x, sr, 16000)
        assert _same(y, librosa.resample(x, orig_sr=sr, target_sr=16000)), name
        for n_fft in (2048, 512):  # the separate stage's window at 16 kHz, the log-mel's
            spec = dsp.stft(y, n_fft, n_fft // 4)
            assert _same(spec, librosa.stft(y, n_fft=n_fft, hop_length=n_fft // 4)), (name, n_fft)
            mag = np.abs(spec)
            mask = dsp.softmask(mag * 0.5, mag * 0.3 + 0.01, 2.0)
            assert _same(mask, librosa.util.softmask(mag * 0.5, mag * 0.3 + 0.01, power=2.0))
            for length in (len(y), len(y) - 100):
                back = dsp.istft(spec * mask, n_fft, n_fft // 4, length)
                ref = librosa.istft(spec * mask, hop_length=n_fft // 4, n_fft=n_fft, length=length)
                assert _same(back, ref), (name, n_fft, length)
        assert np.array_equal(dsp.fft_frequencies(16000, 2048), librosa.fft_frequencies(sr=16000, n_fft=2048))


def test_log_mel_equals_librosa(clips) -> None:
    import librosa

    for name, x, sr in clips:
        y = dsp.resample(x, sr, 16000)
        mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=160, win_length=400,
                                             n_mels=64, power=2.0)  # fmt: skip
        ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
        assert _same(dsp.log_mel(y, 16000, 512, 160, 400, 64), ref), name
    assert np.array_equal(dsp.mel_filters(16000, 512, 64), librosa.filters.mel(sr=16000, n_fft=512, n_mels=64))
    from scipy.signal import get_window

    assert _same(dsp.hann(400), get_window("hann", 400, fftbins=True))


def test_softmask_refuses_negative_input() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        dsp.softmask(np.array([-1.0, 1.0]), np.array([1.0, 1.0]), 2.0)
    assert np.array_equal(dsp.softmask(np.zeros(2, np.float32), np.zeros(2, np.float32), 2.0), np.zeros(2))


def test_offline_stages_load_without_heavy_imports() -> None:
    """Worker start-up: the offline preset's stages load without librosa (numba, scipy.signal),
    scikit-learn, transformers or sentence-transformers (1.2-1.5 s and 2.6 s per worker)."""
    code = ("import sys; from pipeline.plan import build_stages; from pipeline.presets import load_preset\n"
            "for s in build_stages(load_preset('offline')): s.ensure_loaded()\n"
            "print(sorted(m for m in ('librosa', 'numba', 'scipy.signal', 'sklearn', 'transformers',"
            " 'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
