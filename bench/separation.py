"""Separation benchmark: SI-SDR of the vocal estimate of every separator we tried.

Cases (all mono, real audio read in place from ../shared/data):
  * the two MUSDB18 songs in separation/musdb (reference: the vocals stem), at 16 kHz (the
    pipeline's rate) and at 44.1 kHz;
  * speech over music: RAVDESS sentences mixed with a MUSDB accompaniment stem at 0 dB SNR
    (reference: the clean sentence) — the case short videos actually have;
  * speech only: RAVDESS sentences alone (reference: themselves) — a separator must not make
    these worse (the baseline is +inf there; higher is better, inf = untouched).

The baseline is the mixture itself used as the vocal estimate. Usage:

    .venv/bin/python bench/separation.py [--data ../shared/data] [--demucs htdemucs]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.stages.separate import (  # noqa: E402
    HpssConfig,
    RepetConfig,
    hpss_separate,
    repet_separate,
)

Method = Callable[[np.ndarray, int], np.ndarray]
OPEN = {"band_low": 0.0, "band_high": 1e9, "floor": 0.0, "gate": 0.0}


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), zero-mean signals."""
    est = estimate.astype(np.float64) - estimate.mean()
    ref = reference.astype(np.float64) - reference.mean()
    target = (est @ ref) / (ref @ ref) * ref
    noise = est - target
    if not np.any(noise):
        return float("inf")
    return float(10 * np.log10(np.sum(target**2) / np.sum(noise**2)))


def band_only(x: np.ndarray, sr: int, low: float = 80.0, high: float = 8000.0) -> np.ndarray:
    """A plain vocal band-pass: how much of any gain is just the band?"""
    n_fft = 2048
    spec = librosa.stft(x, n_fft=n_fft, hop_length=n_fft // 4)
    f = librosa.fft_frequencies(sr=sr, n_fft=n_fft)
    spec *= ((f >= low) & (f <= high))[:, None]
    return librosa.istft(spec, hop_length=n_fft // 4, n_fft=n_fft, length=len(x))


def methods() -> dict[str, Method]:
    """Every classical variant we measured; `repet` is the stage's default config."""

    def rep(**kw) -> Method:
        return lambda x, sr: repet_separate(x, sr, RepetConfig(**kw)).vocals

    return {
        "mixture (baseline)": lambda x, sr: x,
        "band 80-8k Hz only": band_only,
        "repet-sim plain (2 s, m1, p1)": rep(width=2.0, margin=1.0, power=1.0, window=0.064, **OPEN),
        "repet-sim librosa ex. (2 s, m10, p2)": rep(width=2.0, margin=10.0, window=0.064, **OPEN),
        "repet-sim 1 s, m2, p2": rep(**OPEN),
        "repet-sim + band": rep(**{**OPEN, "band_low": 80.0, "band_high": 8000.0}),
        "repet-sim + band + floor 0.2": rep(gate=0.0),
        "repet (default: + gate 0.05)": rep(),
        "repet 64 ms window": rep(window=0.064),
        "hpss two-stage": lambda x, sr: hpss_separate(x, sr, HpssConfig()).vocals,
    }


def _load(path: Path, sr: int) -> np.ndarray:
    x, native = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    return librosa.resample(x, orig_sr=native, target_sr=sr) if native != sr else x


def cases(data: Path) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """(name, rate, mixture, reference vocals) for every benchmark case."""
    out = []
    songs = sorted((data / "separation" / "musdb").iterdir())
    for sr in (16000, 44100):
        for song in songs:
            mix, voc = _load(song / "mixture.wav", sr), _load(song / "vocals.wav", sr)
            out.append((song.name[:24], sr, mix, voc))
    speech = sorted((data / "ravdess-speech").glob("Actor_*/*.wav"))
    picks = [speech[i] for i in (2, 9, 17, 24) if i < len(speech)]
    for k, path in enumerate(picks):
        s = _load(path, 16000)
        acc = _load(songs[k % len(songs)] / "accompaniment.wav", 16000)
        acc = np.resize(acc, len(s))  # tile: the sentence may be longer than the excerpt
        acc *= np.sqrt(np.sum(s**2) / max(np.sum(acc**2), 1e-12))  # 0 dB SNR
        out.append((f"speech+music {path.stem}", 16000, s + acc, s))
        out.append((f"speech only {path.stem}", 16000, s, s))
    return out


def run(data: Path, demucs: str | None) -> list[tuple[str, int, str, float, float, float]]:
    table = methods()
    if demucs:
        table[f"demucs {demucs}"] = _demucs_method(demucs)
    rows = []
    for name, sr, mix, ref in cases(data):
        base = si_sdr(mix, ref)
        for method, fn in table.items():
            t0 = time.perf_counter()
            est = fn(mix, sr)
            rows.append((name, sr, method, si_sdr(est, ref), base, time.perf_counter() - t0))
    return rows


def _demucs_method(name: str) -> Method:
    from pipeline.manifest import Clip
    from pipeline.stages.base import ClipContext, Media
    from pipeline.stages.separate import DemucsSeparation

    stage = DemucsSeparation({"model": name, "model_dir": os.environ.get("DEMUCS_MODEL_DIR")})
    stage.ensure_loaded()  # ModelMissingError here says how to provide the weights

    def fn(x: np.ndarray, sr: int) -> np.ndarray:
        ctx = ClipContext(Clip(id="bench", dataset="bench"), Path("."), Media(None, x, sr))
        stage.process_one(ctx)
        return ctx.vocals

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path(os.environ.get("MMEMO_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=default)
    ap.add_argument("--demucs", default=None, help="also run this demucs model (needs weights)")
    args = ap.parse_args()
    if not (args.data / "separation" / "musdb").is_dir():
        sys.exit(f"no benchmark data: {args.data}/separation/musdb is absent")
    rows = run(args.data, args.demucs)
    print("| case | sr | method | SI-SDR vocals dB | baseline dB | delta dB | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, sr, method, score, base, secs in rows:
        delta = score - base if np.isfinite(base) else float("nan")
        print(f"| {name} | {sr} | {method} | {score:.2f} | {base:.2f} | {delta:+.2f} | {secs:.2f} |")


if __name__ == "__main__":
    main()
