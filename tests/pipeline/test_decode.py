"""Decode stage: real media in ../shared/data plus synthetic files written here with PyAV."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.manifest import Clip
from pipeline.stages.base import ClipContext, ClipError, get_backend
from pipeline.stages.decode import (
    DecodeConfig,
    PyAVDecode,
    apply_rotation,
    decode_media,
    probe,
    resolve_media_path,
    sample_times,
    scaled_size,
)
from tests.conftest import shared_path

SR = 16000


def gray_for(t: float) -> int:
    """Frame brightness encodes its time, so tests can tell which frame was sampled."""
    return int(min(250, 10 + 20 * t))


def write_media(
    path: Path,
    *,
    seconds: float = 2.0,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    video: bool = True,
    audio: bool = True,
    rotation: int = 0,
    times: list[float] | None = None,
    faststart: bool = False,
    half_white: bool = False,
) -> Path:
    """Write a small H.264 + AAC mp4; `times` gives explicit (variable) frame times."""
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as c:
        vs = as_ = None
        if video:
            vs = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": "10"})
            vs.width, vs.height = size
            vs.pix_fmt = "yuv420p"
            if times is not None:
                vs.codec_context.time_base = Fraction(1, 1000)
            if rotation:
                vs.set_display_rotation(rotation)
        if audio:
            as_ = c.add_stream("aac", rate=SR, layout="mono")
        if vs is not None:
            ts = times if times is not None else [k / fps for k in range(int(seconds * fps))]
            for t in ts:
                img = np.full((size[1], size[0], 3), gray_for(t), np.uint8)
                if half_white:
                    img[:, : size[0] // 2] = 255
                    img[:, size[0] // 2 :] = 0
                fr = av.VideoFrame.from_ndarray(img, format="rgb24")
                if times is not None:
                    fr.pts, fr.time_base = round(t * 1000), Fraction(1, 1000)
                c.mux(vs.encode(fr))
            c.mux(vs.encode(None))
        if as_ is not None:
            n = int(seconds * SR)
            wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SR)).astype(np.float32)
            for i in range(0, n, 1024):
                chunk = wave[i : i + 1024][None, :]
                fr = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                fr.sample_rate, fr.pts = SR, i
                c.mux(as_.encode(fr))
            c.mux(as_.encode(None))
    return path


# --- helpers -----------------------------------------------------------------------------------
def test_sample_times_caps_frames_by_lowering_fps():
    times, eff = sample_times(0.0, 600.0, fps=2.0, max_frames=64)
    assert len(times) == 64 and eff == pytest.approx(64 / 600)
    assert times[-1] < 600.0
    times, eff = sample_times(1.0, 4.0, fps=2.0, max_frames=64)
    assert times == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 3.5]) and eff == 2.0


def test_scaled_size_keeps_aspect_and_never_upscales():
    assert scaled_size(1920, 800, 960) == (960, 400)
    assert scaled_size(720, 1280, 960) == (540, 960)
    assert scaled_size(320, 240, 960) == (320, 240)


def test_apply_rotation_is_counter_clockwise():
    img = np.zeros((2, 4, 3), np.uint8)
    img[:, :2] = 255  # left half white
    up = apply_rotation(img, 90)
    assert up.shape == (4, 2, 3)
    assert (up[2:] == 255).all() and (up[:2] == 0).all()  # left went to the bottom
    assert apply_rotation(img, 0) is img
    assert (apply_rotation(img, -90)[:2] == 255).all()  # -90 == 270: left goes to the top


# --- real media --------------------------------------------------------------------------------
def test_real_wide_film_is_downscaled_and_sampled():
    p = shared_path("video", "film_zh_subs.mp4")
    m = decode_media(p)
    assert m.width == 960 and m.height == 400
    assert all(f.shape == (400, 960, 3) and f.dtype == np.uint8 for f in m.frames)
    assert 6 <= len(m.frames) <= 7  # 2 fps over 3.0 s
    assert len(m.frame_times) == len(m.frames)
    assert np.all(np.diff(m.frame_times) > 0) and m.frame_times[0] == pytest.approx(0.0, abs=0.05)
    assert m.duration == pytest.approx(3.0, abs=0.05) and m.fps == pytest.approx(24.0)
    assert m.info["truncated"] is False and m.info["source_width"] == 1920
    assert m.audio is not None and m.audio.dtype == np.float32


def test_real_ugc_audio_length_matches_duration():
    p = shared_path("video", "ugc_face_zh_subs.mp4")
    m = decode_media(p)
    assert m.audio.ndim == 1 and m.sample_rate == SR
    assert abs(m.audio.size - m.duration * SR) <= SR * 0.05
    assert m.duration == pytest.approx(8.0, abs=0.1)
    assert 0.001 < float(np.abs(m.audio).max()) <= 1.5


def test_real_ravdess_wav_is_audio_only():
    folder = shared_path("ravdess-speech", "Actor_01")
    wav = sorted(folder.glob("*.wav"))[0]
    m = decode_media(wav)
    assert m.frames == [] and m.frame_times == [] and not m.has_video
    assert m.has_audio and abs(m.audio.size - m.duration * SR) <= 0.02 * SR
    info = probe(wav)
    assert info["has_audio"] and not info["has_video"] and info["sample_rate"] == 48000


def test_real_long_clip_is_capped_at_max_frames():
    p = shared_path("video", "animation_long_41s.mp4")
    m = decode_media(p, DecodeConfig(max_frames=16, max_side=320))
    assert len(m.frames) == 16
    assert m.frame_times[-1] > 35.0  # spread over the whole clip, not the first 8 s
    assert max(m.frames[0].shape[:2]) == 320


def test_probe_reports_streams_and_size():
    info = probe(shared_path("video", "film_bilingual_subs.mp4"))
    assert info["width"] == 678 and info["height"] == 360
    assert info["video_codec"] == "mpeg4" and info["has_audio"]
    assert info["duration"] == pytest.approx(13.35, abs=0.1) and info["rotation"] == 0


# --- synthetic cases ---------------------------------------------------------------------------
def test_video_only_file_has_no_audio(tmp_path):
    p = write_media(tmp_path / "v.mp4", audio=False)
    m = decode_media(p)
    assert m.audio is None and not m.has_audio
    assert len(m.frames) == 4 and m.frames[0].shape == (48, 64, 3)


def test_segment_start_end_trims_audio_and_frames(tmp_path):
    p = write_media(tmp_path / "long.mp4", seconds=6.0)
    m = decode_media(p, start=2.0, end=4.5)
    assert m.duration == pytest.approx(2.5)
    assert abs(m.audio.size - 2.5 * SR) <= 2
    assert m.frame_times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0], abs=0.11)
    # the first sampled frame is the one shown at 2.0 s of the file
    assert abs(int(m.frames[0].mean()) - gray_for(2.0)) <= 3
    assert abs(int(m.frames[-1].mean()) - gray_for(4.0)) <= 5


def test_segment_errors_are_clear(tmp_path):
    p = write_media(tmp_path / "a.mp4", seconds=2.0)
    with pytest.raises(ClipError, match="beyond the end of the media"):
        decode_media(p, start=5.0)
    with pytest.raises(ClipError, match="not after its start"):
        decode_media(p, start=1.0, end=0.5)
    m = decode_media(p, start=1.0, end=9.0)
    assert "end_clamped" in m.info and m.duration == pytest.approx(1.0, abs=0.05)


def test_rotated_video_stands_upright(tmp_path):
    p = write_media(tmp_path / "phone.mp4", size=(64, 32), rotation=90, half_white=True, audio=False)
    m = decode_media(p)
    assert m.rotation == 90 and probe(p)["rotation"] == 90
    f = m.frames[0]
    assert f.shape == (64, 32, 3) and (m.width, m.height) == (32, 64)
    assert f[40:].mean() > 200 and f[:24].mean() < 50  # stored left half is now the bottom


def test_variable_frame_rate_samples_by_time(tmp_path):
    times = [0.0, 0.04, 0.08, 1.3, 1.32, 2.6, 2.7, 2.8, 2.9]
    p = write_media(tmp_path / "vfr.mp4", times=times, seconds=3.0, audio=False)
    m = decode_media(p, DecodeConfig(fps=2.0, skip_nonref=False))
    assert np.all(np.diff(m.frame_times) > 0)
    # the frame nearest each of 0, 0.5, 1.0, ..., 2.5 s, each kept once
    assert m.frame_times == pytest.approx([0.0, 0.08, 1.3, 1.32, 2.6], abs=0.01)
    for f, t in zip(m.frames, m.frame_times, strict=True):
        assert abs(int(f.mean()) - gray_for(t)) <= 3


def test_long_generated_clip_caps_frames_and_audio(tmp_path):
    p = write_media(tmp_path / "long.mp4", seconds=150.0, fps=4, size=(32, 24))
    m = decode_media(p, DecodeConfig(max_frames=20, max_duration=100.0))
    assert len(m.frames) == 20
    assert m.frame_times[-1] == pytest.approx(95.0, abs=0.3)  # 100 s / 20 frames = 5 s apart
    assert m.audio.size == 100 * SR
    assert m.duration == pytest.approx(100.0) and "duration_capped" in m.info


def test_max_pixels_refuses_big_frames(tmp_path):
    p = write_media(tmp_path / "v.mp4", audio=False)
    with pytest.raises(ClipError, match=r"64x48 exceeds the limit of 1000 pixels"):
        decode_media(p, DecodeConfig(max_pixels=1000))


@pytest.mark.robustness
def test_missing_file(tmp_path):
    with pytest.raises(ClipError, match=r"nope\.mp4: media file not found"):
        decode_media(tmp_path / "nope.mp4")


@pytest.mark.robustness
def test_empty_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(ClipError, match=r"empty\.mp4: file is empty \(0 bytes\)"):
        decode_media(p)


@pytest.mark.robustness
def test_random_bytes_with_mp4_header(tmp_path):
    p = tmp_path / "junk.mp4"
    rng = np.random.default_rng(0)
    p.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + rng.bytes(20000))
    with pytest.raises(ClipError, match=r"junk\.mp4: (not a readable media file|nothing could be decoded)"):
        decode_media(p)


@pytest.mark.robustness
def test_text_file_has_no_media_stream(tmp_path):
    p = tmp_path / "subs.srt"
    p.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n", encoding="utf-8")
    with pytest.raises(ClipError, match=r"subs\.srt: has no audio or video stream \(streams: subtitle\)"):
        decode_media(p)


@pytest.mark.robustness
def test_truncated_file_decodes_what_is_there(tmp_path):
    p = write_media(tmp_path / "t.mp4", seconds=6.0, faststart=True)
    data = p.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    m = decode_media(cut)
    assert m.info["truncated"] is True and "truncated_reason" in m.info
    assert 0.5 < m.duration < 5.0
    assert m.has_video or m.has_audio


@pytest.mark.robustness
def test_truncated_file_without_index_fails_clearly(tmp_path):
    p = write_media(tmp_path / "t.mp4", seconds=3.0)  # moov atom at the end
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(ClipError, match=r"cut\.mp4: (not a readable media file|nothing could be decoded)"):
        decode_media(cut)


# --- paths and the stage -----------------------------------------------------------------------
def _ctx(root: Path, **kw) -> ClipContext:
    return ClipContext(clip=Clip(id="c1", dataset="t", **kw), root=root)


def test_stage_is_registered_and_decodes_a_clip(tmp_path):
    write_media(tmp_path / "a.mp4")
    assert get_backend("decode", "pyav") is PyAVDecode
    stage = PyAVDecode({"fps": 4.0})
    ctx = _ctx(tmp_path, video="a.mp4")
    assert stage.process([ctx]) == [None]
    assert len(ctx.media.frames) == 8 and ctx.media.has_audio


def test_stage_uses_separate_audio_file(tmp_path):
    write_media(tmp_path / "v.mp4", audio=False, seconds=2.0)
    write_media(tmp_path / "a.m4a", video=False, seconds=1.0)
    ctx = _ctx(tmp_path, video="v.mp4", audio="a.m4a")
    PyAVDecode().process_one(ctx)
    assert len(ctx.media.frames) == 4
    assert abs(ctx.media.audio.size - SR) <= 0.05 * SR
    audio_only = _ctx(tmp_path, audio="a.m4a")
    PyAVDecode().process_one(audio_only)
    assert audio_only.media.frames == [] and audio_only.media.has_audio


def test_stage_applies_clip_segment(tmp_path):
    write_media(tmp_path / "a.mp4", seconds=4.0)
    ctx = _ctx(tmp_path, video="a.mp4", start=1.0, end=2.0)
    PyAVDecode().process_one(ctx)
    assert ctx.media.duration == pytest.approx(1.0) and len(ctx.media.frames) == 2


@pytest.mark.robustness
def test_symlink_inside_the_root_is_followed_and_climbing_paths_are_refused(tmp_path):
    """Media on another disk linked into the dataset folder (the usual cluster layout) is read;
    a `..` or absolute path in the manifest never is."""
    root = tmp_path / "dataset"
    root.mkdir()
    elsewhere = write_media(tmp_path / "disk2.mp4", audio=False)
    os.symlink(elsewhere, root / "link.mp4")
    assert resolve_media_path(root, "link.mp4") == elsewhere.resolve()
    ctx = _ctx(root, video="link.mp4")
    assert PyAVDecode().process([ctx]) == [None] and ctx.media is not None
    with pytest.raises(ClipError, match=r"inside the dataset root"):
        resolve_media_path(root, "../disk2.mp4")
    with pytest.raises(ClipError, match=r"relative to the dataset root"):
        resolve_media_path(root, str(elsewhere))


@pytest.mark.robustness
def test_symlink_loop_and_broken_link(tmp_path):
    os.symlink(tmp_path / "b.mp4", tmp_path / "a.mp4")
    os.symlink(tmp_path / "a.mp4", tmp_path / "b.mp4")
    with pytest.raises(ClipError, match=r"a\.mp4: symlink loop"):
        resolve_media_path(tmp_path, "a.mp4")
    os.symlink(tmp_path / "gone.mp4", tmp_path / "dangling.mp4")
    with pytest.raises(ClipError, match=r"dangling\.mp4: broken symlink"):
        resolve_media_path(tmp_path, "dangling.mp4")
    with pytest.raises(ClipError, match=r"missing\.mp4: media file not found"):
        PyAVDecode().process_one(_ctx(tmp_path, video="missing.mp4"))


def test_symlink_inside_root_is_allowed(tmp_path):
    write_media(tmp_path / "real.mp4", audio=False)
    os.symlink(tmp_path / "real.mp4", tmp_path / "alias.mp4")
    assert resolve_media_path(tmp_path, "alias.mp4") == (tmp_path / "real.mp4").resolve()
