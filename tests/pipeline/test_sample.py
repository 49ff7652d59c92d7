"""The synthetic sample dataset: layout, determinism, decodability and per-modality signal."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.sample import (
    CLASSES,
    CSV_COLUMNS,
    SampleSpec,
    _speakers,
    _styled_head,
    make_sample,
    render_frames,
    subtitle_lines,
    synth_audio,
)
from pipeline.stages.decode import decode_media, probe

N = 8


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return make_sample(tmp_path_factory.mktemp("s") / "sample", n=N, seed=3)


def _rows(d: Path) -> list[dict[str, str]]:
    with open(d / "labels.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_layout_columns_and_balance(sample_dir):
    header = (sample_dir / "labels.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == list(CSV_COLUMNS)
    rows = _rows(sample_dir)
    assert len(rows) == N and len({r["id"] for r in rows}) == N
    assert Counter(r["label"] for r in rows) == {c: N // len(CLASSES) for c in CLASSES}
    for r in rows:
        assert r["video"] == f"videos/{r['id']}.mp4" and (sample_dir / r["video"]).stat().st_size > 1000
        assert r["audio"] == "" and len(r["text"].split()) >= 3 and r["title"]
    # splits are grouped by speaker: a speaker never appears in two splits
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["speaker"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {r["split"] for r in rows} == {"train", "valid", "test"}
    readme = (sample_dir / "README.txt").read_text(encoding="utf-8")
    assert "seed=3" in readme and "n=8" in readme


def test_deterministic_given_seed(sample_dir, tmp_path):
    again = make_sample(tmp_path / "again", n=N, seed=3)
    assert (again / "labels.csv").read_bytes() == (sample_dir / "labels.csv").read_bytes()
    a = decode_media(sample_dir / "videos" / "sample_0000.mp4")
    b = decode_media(again / "videos" / "sample_0000.mp4")
    assert np.array_equal(a.frames[0], b.frames[0]) and np.array_equal(a.audio, b.audio)
    other = make_sample(tmp_path / "other", n=N, seed=4)
    assert (other / "labels.csv").read_bytes() != (sample_dir / "labels.csv").read_bytes()


def test_files_are_real_h264_aac_mp4(sample_dir):
    for r in _rows(sample_dir)[:4]:
        path = sample_dir / r["video"]
        info = probe(path)
        assert info["video_codec"] in ("h264", "mpeg4") and info["audio_codec"] == "aac"
        assert (info["width"], info["height"], info["fps"]) == (320, 240, 10.0)
        m = decode_media(path)
        assert m.duration == pytest.approx(3.0, abs=0.1) and len(m.frames) == 6
        assert abs(m.audio.size - 3 * 16000) < 0.05 * 16000 and np.abs(m.audio).max() > 0.05


def test_face_is_detectable_and_large(sample_dir):
    """A stock OpenCV face detector finds the face in every sampled frame at >= 55 px
    (its box is the inner face; hairline-to-chin is taller)."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    for r in _rows(sample_dir)[:4]:
        for f in decode_media(sample_dir / r["video"]).frames:
            boxes = cascade.detectMultiScale(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), 1.1, 5, minSize=(40, 40))
            assert len(boxes) >= 1 and max(b[3] for b in boxes) >= 55


def test_subtitles_fit_and_are_burned_in():
    spec = SampleSpec()
    text = "We talked about the weather today to be honest"
    lines = subtitle_lines(text, spec.width)
    assert " ".join(lines) == text and len(lines) >= 2
    assert all(cv2.getTextSize(ln, cv2.FONT_HERSHEY_DUPLEX, 0.85, 2)[0][0] <= spec.width - 16 for ln in lines)
    assert cv2.getTextSize("H", cv2.FONT_HERSHEY_DUPLEX, 0.85, 2)[0][1] >= 18
    frames = render_frames(np.random.default_rng(0), 0, text, spec)
    band = frames[5][-40:].astype(int)
    white = (band.min(axis=2) > 235).sum()
    dark = (band.max(axis=2) < 30).sum()
    assert white > 150 and dark > 150  # white letters with a dark outline


def test_visual_cue_depends_on_class():
    """Tint/brightness inside the face differ by class in the designed direction."""
    red_minus_blue = []
    for cls in range(len(CLASSES)):
        head, mask, _ = _styled_head(np.random.default_rng(1), cls)
        face = head[60:140, 50:110].reshape(-1, 3)
        red_minus_blue.append(float(face[:, 0].mean() - face[:, 2].mean()))
    happy, sad, angry, neutral = red_minus_blue
    assert angry > neutral + 20 and sad < neutral - 20 and happy > neutral + 20


def _median_f0(y: np.ndarray, sr: int) -> float:
    """Median autocorrelation pitch over the loud frames (a plain estimator, no numba JIT)."""
    size, f0s = 1024, []
    frames = [y[i : i + size] for i in range(0, y.size - size, size // 2)]
    level = max(float(np.sqrt(np.mean(f**2))) for f in frames)
    for f in frames:
        if np.sqrt(np.mean(f**2)) < 0.3 * level:
            continue
        ac = np.correlate(f, f, mode="full")[size - 1 :]
        lo, hi = sr // 500, sr // 60
        f0s.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(f0s))


def test_audio_cue_depends_on_class():
    """Loudness and pitch carry the class for a fixed speaker (eGeMAPS-visible)."""
    spec = SampleSpec()
    speaker = _speakers(0, 8)[0]
    rms, pitch = [], []
    for cls in range(len(CLASSES)):
        y = synth_audio(np.random.default_rng(5), cls, speaker, spec)
        assert y.dtype == np.float32 and y.size == 48000 and np.abs(y).max() <= 1.0
        rms.append(float(np.sqrt(np.mean(y**2))))
        pitch.append(_median_f0(y, spec.sample_rate))
    happy, sad, angry, neutral = range(4)
    assert rms[angry] > rms[happy] > rms[neutral] > rms[sad]
    assert pitch[happy] > pitch[neutral] > pitch[sad] and pitch[angry] > pitch[neutral]
    assert pitch[neutral] == pytest.approx(speaker.f0, rel=0.2)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n must be at least 1"):
        make_sample(tmp_path, n=0)
    with pytest.raises(ValueError, match="n_speakers must be at least 3"):
        make_sample(tmp_path, n=4, spec=SampleSpec(n_speakers=2))


def test_an_emotion_shift_clip_ends_in_its_label(tmp_path):
    """shift=1: every clip starts in another class (face tint, voice, first sentence) and ends
    in its own cues; the shift draws from its own random stream, so what a clip shows after
    the change is what the same clip shows without a shift."""
    spec = SampleSpec(shift=1.0, corrupt=0.0)
    still = make_sample(tmp_path / "still", n=4, seed=5, spec=SampleSpec(shift=0.0, corrupt=0.0))
    moved = make_sample(tmp_path / "moved", n=4, seed=5, spec=spec)
    for a, b in zip(_rows(still), _rows(moved), strict=True):
        assert (a["label"], a["title"], a["speaker"]) == (b["label"], b["title"], b["speaker"])
        first, second = b["text"].split(". ")
        assert second == a["text"] and first  # the labelled sentence comes last
        ya = decode_media(still / a["video"]).audio
        yb = decode_media(moved / b["video"]).audio
        tail = slice(int(2.0 * 16000), int(2.9 * 16000))  # after the fade, before the end
        assert np.corrcoef(ya[tail], yb[tail])[0, 1] > 0.99
        head = slice(int(0.1 * 16000), int(1.3 * 16000))
        assert np.corrcoef(ya[head], yb[head])[0, 1] < 0.5
    assert "shifts emotion" in (moved / "README.txt").read_text(encoding="utf-8")


def test_a_shift_changes_the_face_at_the_midpoint():
    spec = SampleSpec()
    sad, angry = CLASSES.index("sad"), CLASSES.index("angry")
    frames = render_frames(np.random.default_rng(2), angry, "I am so mad about the game", spec,
                           (np.random.default_rng(3), sad, "I really miss my phone"))

    def red_minus_blue(f: np.ndarray) -> float:
        boxes = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
                                      ).detectMultiScale(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), 1.1, 5)
        x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
        face = f[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4].reshape(-1, 3).astype(float)
        return float(face[:, 0].mean() - face[:, 2].mean())

    before = [red_minus_blue(f) for f in frames[:15]]  # sad: bluish, the first 1.5 s
    after = [red_minus_blue(f) for f in frames[15:]]  # angry: reddish
    assert max(before) + 30 < min(after)
