"""The few spectral routines the offline audio and separate stages use, without librosa.

Why: importing librosa (with numba and scipy.signal, which it pulls in) took 1.2-1.5 s of
every extraction worker's start-up, for an STFT, its inverse, a soft mask, a mel filterbank and
a resampler. These follow librosa 0.11's definitions step for step (centred frames with zero
padding, the periodic Hann window, float64 window products, numpy's FFT, slaney mels), so
that a clip's features do not change: tests/pipeline/test_dsp.py compares each one with
librosa on real audio. The resampler is soxr's "HQ" converter, which librosa's default
`res_type="soxr_hq"` calls.
"""

from __future__ import annotations

import numpy as np


def hann(n: int) -> np.ndarray:
    """The periodic ("fftbins") Hann window of n points, float64, as scipy computes it."""
    fac = np.linspace(-np.pi, np.pi, n + 1)
    w = np.zeros(n + 1)
    for k, a in enumerate((0.5, 0.5)):
        w += a * np.cos(k * fac)
    return w[:n]


def _window(win_length: int, n_fft: int) -> np.ndarray:
    """Hann of win_length points, centred in n_fft points with zeros."""
    w = hann(win_length)
    left = (n_fft - win_length) // 2
    return np.pad(w, (left, n_fft - win_length - left))


def stft(y: np.ndarray, n_fft: int, hop_length: int, win_length: int | None = None) -> np.ndarray:
    """Complex STFT [1 + n_fft // 2, frames] of 1-d audio: frames centred (n_fft // 2 zeros
    on each side), Hann-windowed, complex64 for float32 audio."""
    y = np.asarray(y)
    window = _window(win_length or n_fft, n_fft)
    padded = np.pad(y, n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]  # [t, n_fft]
    out_dtype = np.complex64 if y.dtype == np.float32 else np.complex128
    out = np.empty((1 + n_fft // 2, len(frames)), dtype=out_dtype, order="F")
    block = max(1, (1 << 18) // n_fft)  # frames per FFT call: bounded temporaries
    for a in range(0, len(frames), block):
        out[:, a:a + block] = np.fft.rfft(window * frames[a:a + block], axis=-1).T
    return out


def istft(spec: np.ndarray, n_fft: int, hop_length: int, length: int) -> np.ndarray:
    """Inverse of `stft` by windowed overlap-add, divided by the summed squared window,
    cropped to `length` samples (float32 for a complex64 spectrogram)."""
    window = _window(n_fft, n_fft)
    padded_length = length + 2 * (n_fft // 2)
    n_frames = min(spec.shape[1], int(np.ceil(padded_length / hop_length)))
    dtype = np.float32 if spec.dtype == np.complex64 else np.float64
    # both buffers reach at least the last cropped sample; the tail no frame covers stays 0
    # (and is not divided)
    size = max(n_fft + hop_length * (n_frames - 1), padded_length)
    y = np.zeros(size, dtype=dtype)
    env = np.zeros(size, dtype=dtype)
    win_sq = window**2
    block = max(1, (1 << 18) // n_fft)
    for a in range(0, n_frames, block):
        frames = window * np.fft.irfft(spec[:, a:min(n_frames, a + block)], n=n_fft, axis=0).T
        for i, frame in enumerate(frames, start=a):
            y[i * hop_length:i * hop_length + n_fft] += frame
    for i in range(n_frames):
        env[i * hop_length:i * hop_length + n_fft] += win_sq
    y = y[n_fft // 2:n_fft // 2 + length]
    env = env[n_fft // 2:n_fft // 2 + length]
    nonzero = env > np.finfo(env.dtype).tiny
    y[nonzero] /= env[nonzero]
    return y


def softmask(x: np.ndarray, x_ref: np.ndarray, power: float) -> np.ndarray:
    """(x / (x + x_ref)) in the power domain: the share of x, 0 where both are 0."""
    if np.any(x < 0) or np.any(x_ref < 0):
        raise ValueError("softmask: inputs must be non-negative")
    dtype = x.dtype
    z = np.maximum(x, x_ref).astype(dtype)
    bad = z < np.finfo(dtype).tiny
    z[bad] = 1
    mask = (x / z) ** power
    ref = (x_ref / z) ** power
    good = ~bad
    mask[good] /= mask[good] + ref[good]
    mask[bad] = 0.0
    return mask


def fft_frequencies(sr: float, n_fft: int) -> np.ndarray:
    return np.fft.rfftfreq(n=n_fft, d=1.0 / sr)


_F_SP = 200.0 / 3  # slaney mels: linear below 1 kHz, logarithmic above
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(f: float) -> np.floating:
    f = np.float64(f)
    if f >= _MIN_LOG_HZ:
        return _MIN_LOG_MEL + np.log(f / _MIN_LOG_HZ) / _LOGSTEP
    return f / _F_SP


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels)
    freqs = _F_SP * mels
    log_t = mels >= _MIN_LOG_MEL
    freqs[log_t] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels[log_t] - _MIN_LOG_MEL))
    return freqs


def mel_filters(sr: float, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters [n_mels, 1 + n_fft // 2] from 0 Hz to sr / 2."""
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    freqs = fft_frequencies(sr, n_fft)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(float(sr) / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, freqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    return weights


def log_mel(y: np.ndarray, sr: float, n_fft: int, hop_length: int, win_length: int,
            n_mels: int, amin: float = 1e-10) -> np.ndarray:
    """Power mel spectrogram in dB (10 log10, floored at amin, reference 1.0) [n_mels, t]."""
    power = np.abs(stft(y, n_fft, hop_length, win_length)) ** 2
    mel = np.einsum("ft,mf->mt", power, mel_filters(sr, n_fft, n_mels), optimize=True)
    db = 10.0 * np.log10(np.maximum(amin, mel))
    db -= 10.0 * np.log10(np.maximum(amin, np.float64(1.0)))  # in place: stays float32
    return db


def resample(y: np.ndarray, sr: int, target: int) -> np.ndarray:
    """soxr's HQ resampler, then cut or zero-padded to ceil(len * target / sr) samples."""
    import soxr

    if sr == target:
        return y
    n = int(np.ceil(y.shape[-1] * float(target) / sr))
    out = soxr.resample(y, sr, target, quality="soxr_hq")
    out = out[:n] if len(out) >= n else np.pad(out, (0, n - len(out)))
    return np.asarray(out, dtype=y.dtype)
