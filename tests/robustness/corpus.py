"""The bad-input corpus: broken, hostile and legitimately odd media + manifests, made at test time.

`make_corpus(root, outside)` writes tiny media files under `root` (the dataset root) and
returns one `Case` per input, each naming its manifest row(s) and the defined behaviour:

* ``kind == "ledger"``: the clip fails; the ledger holds a line with its id, `stage`, and a
  message matching `reason` (a case-insensitive regex a person can read).
* ``kind == "ok"``: a legitimate but odd input; the clip succeeds, with the modalities in
  `present` present (True) or absent (False) in the cache.
* ``kind == "manifest"``: the manifest itself is bad; validation fails with
  ``<file>:<line>: field '<field>'`` and a message matching `reason` (see `manifest_cases`).

Everything is written with PyAV (or plain bytes / os calls for hostile files) and is small:
the whole corpus is a few MB, most of it the long clip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import numpy as np
import zarr

from tests.conftest import REPO

SR = 16000
CLASSES = ("calm", "excited")
# the limits the corpus is run with (tests/robustness presets set these)
MAX_SIDE = 480
MAX_PIXELS = 3840 * 2160  # exactly 4K UHD is allowed, anything larger is refused
MAX_DURATION = 10.0
LONG_SECONDS = 180.0


# every media case make_corpus writes, and every manifest case (names known before writing)
CASE_NAMES = (
    "empty_file",
    "truncated_mp4",
    "truncated_faststart",
    "undecodable_stream",
    "text_named_mp4",
    "missing_file",
    "symlink_loop",
    "broken_symlink",
    "symlink_outside_root",
    "directory_as_media",
    "fifo_as_media",
    "oversize_frame",
    "nan_samples",
    "inf_samples",
    "no_media_paths",
    "segment_beyond_end",
    "wav_named_mp4",
    "mp4_named_wav",
    "audio_only_container",
    "video_only_container",
    "silent_audio",
    "dc_audio",
    "clipped_full_scale",
    "extreme_level_float",
    "variable_frame_rate",
    "rotated_video",
    "uhd_4k",
    "long_clip",
    "no_face",
    "several_faces",
    "empty_transcript",
    "mixed_encoding_transcript",
)
MANIFEST_CASE_NAMES = (
    "duplicate_ids",
    "dotdot_id",
    "dotdot_plain_id",
    "absolute_path",
    "dotdot_path",
    "non_utf8_transcript",
)


@dataclass
class Case:
    """One corpus input and its defined behaviour."""

    name: str
    kind: str  # "ledger" | "ok" | "manifest"
    rows: list[dict[str, Any]] = field(default_factory=list)
    stage: str | None = None  # regex of the ledger stage ("decode", "separate|audio") if "ledger"
    reason: str | None = None  # regex for the ledger message / manifest error
    present: dict[str, bool] = field(default_factory=dict)  # modality -> present, kind == "ok"
    status: str | None = None  # regex a clip status line must match (kind == "ok"), if any
    needs_visual: bool = False  # only meaningful with the faces + visual stages
    description: str = ""
    # manifest-level cases: the raw manifest bytes, the bad line and field
    manifest: bytes | None = None
    line: int | None = None
    field_name: str | None = None

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.rows]


# --- signals and frames ----------------------------------------------------------------------
def voice(seconds: float, f0: float = 150.0, level: float = 0.3, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: harmonics of a wobbling f0 under a syllable envelope."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(f) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * (0.6 + 0.4 * rng.random())
    x = x * env + 0.01 * rng.standard_normal(n)
    return (level * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


@lru_cache(maxsize=32)
def _background(w: int, h: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    sw, sh = min(w, 320), min(h, 240)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    img = np.stack([40 + 120 * xx / max(sw, 1), 60 + 100 * yy / max(sh, 1), 90 + 0 * xx], -1)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    if (sw, sh) != (w, h):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    img.setflags(write=False)
    return img


def background(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth coloured gradient with a little noise (no face, compresses well)."""
    return _background(w, h, seed).copy()


def _head(height: int) -> np.ndarray:
    """The scikit-image astronaut's head (a real face photo) scaled to `height` pixels."""
    import cv2
    from skimage import data

    img = data.astronaut()[10:215, 135:295]
    w = max(8, round(img.shape[1] * height / img.shape[0]))
    return cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA)


def face_frame(w: int, h: int, n_faces: int, t: float = 0.0, seed: int = 0) -> np.ndarray:
    """A frame with `n_faces` real faces side by side (slowly drifting), or none."""
    img = background(w, h, seed)
    if n_faces <= 0:
        return img
    head = _head(int(h * (0.8 if n_faces == 1 else 0.6)))
    hh, hw = head.shape[:2]
    slot = w // n_faces
    for k in range(n_faces):
        x0 = int(k * slot + (slot - hw) / 2 + 3 * np.sin(t + k))
        y0 = int((h - hh) / 2)
        x0 = min(max(0, x0), w - hw)
        img[y0 : y0 + hh, x0 : x0 + hw] = head
    return img


# --- writers ---------------------------------------------------------------------------------
def write_av(
    path: Path,
    frames: Callable[[float], np.ndarray] | None,
    *,
    seconds: float = 1.5,
    fps: int = 5,
    size: tuple[int, int] = (160, 120),
    audio: np.ndarray | None = None,
    times: list[float] | None = None,
    rotation: int = 0,
    faststart: bool = False,
    audio_bitrate: int | None = None,
    crf: int = 30,
) -> Path:
    """An H.264 (+ AAC mono) mp4. `frames(t)` draws the frame at t; `times` = explicit (VFR)
    frame times; `rotation` = display matrix rotation (phone video)."""
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as c:
        vs = as_ = None
        if frames is not None:
            vs = c.add_stream(
                "libx264", rate=fps,
                options={"preset": "ultrafast", "crf": str(crf), "g": str(fps * 4), "threads": "1"},
            )
            vs.width, vs.height = size
            vs.pix_fmt = "yuv420p"
            if times is not None:
                vs.codec_context.time_base = Fraction(1, 1000)
            if rotation:
                vs.set_display_rotation(rotation)
        if audio is not None:
            as_ = c.add_stream("aac", rate=SR, layout="mono")
            if audio_bitrate:
                as_.bit_rate = audio_bitrate
        if vs is not None and frames is not None:
            ts = times if times is not None else [k / fps for k in range(int(seconds * fps))]
            for t in ts:
                fr = av.VideoFrame.from_ndarray(frames(t), format="rgb24")
                if times is not None:
                    fr.pts, fr.time_base = round(t * 1000), Fraction(1, 1000)
                c.mux(vs.encode(fr))
            c.mux(vs.encode(None))
        if as_ is not None and audio is not None:
            for i in range(0, audio.size, 1024):
                fr = av.AudioFrame.from_ndarray(audio[None, i : i + 1024], format="flt", layout="mono")
                fr.sample_rate, fr.pts = SR, i
                c.mux(as_.encode(fr))
            c.mux(as_.encode(None))
    return path


def write_wav(path: Path, audio: np.ndarray, codec: str = "pcm_s16le") -> Path:
    """A mono WAV; `pcm_f32le` keeps any float value (NaN, huge levels) as is."""
    fmt = "flt" if codec == "pcm_f32le" else "s16"
    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream(codec, rate=SR, layout="mono")
        data = audio.astype(np.float32)
        if fmt == "s16":
            data = np.clip(np.round(data * 32767), -32768, 32767).astype(np.int16)
        for i in range(0, data.size, 1024):
            fr = av.AudioFrame.from_ndarray(data[None, i : i + 1024], format=fmt, layout="mono")
            fr.sample_rate, fr.pts = SR, i
            c.mux(s.encode(fr))
        c.mux(s.encode(None))
    return path


def _row(cid: str, dataset: str, i: int, **kw: Any) -> dict[str, Any]:
    """A manifest row; labels alternate between the two classes so the set stays fit-able."""
    row: dict[str, Any] = {
        "id": cid,
        "dataset": dataset,
        "split": "test" if i % 3 == 2 else "train",
        "speaker": f"s{i % 4}",
        "turn": 1,
        "labels": {"emotion": CLASSES[i % 2], "emotion_idx": i % 2},
        "metadata": {"source": "robustness-corpus"},
    }
    row.update(kw)
    return row


# --- the corpus ------------------------------------------------------------------------------
def good_clips(root: Path, dataset: str, n: int = 12, with_faces: bool = True, start: int = 0) -> list[dict[str, Any]]:
    """`n` well-formed clips of both classes (face + voice), as manifest rows."""
    d = root / "good"
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        i = start + k
        cls = i % 2
        p = d / f"good{i:02d}.mp4"
        f0 = 120.0 if cls == 0 else 240.0
        faces = 1 if with_faces else 0
        write_av(p, (lambda t, s=i, k=faces: face_frame(160, 120, k, t, seed=s)),
                 audio=voice(1.5, f0=f0, level=0.15 + 0.3 * cls, seed=i))
        rows.append(_row(f"good{i:02d}", dataset, i, video=f"good/{p.name}",
                         transcript=["all is calm and quiet today", "wow this is amazing!"][cls],
                         title=["a quiet day", "big news"][cls]))
    return rows


def make_corpus(root: Path, outside: Path, dataset: str = "corpus") -> list[Case]:
    """Write every bad / odd input under `root` (files meant to be outside go to `outside`)."""
    m = root / "media"
    m.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    i = 100

    def add(case: Case, **row: Any) -> None:
        nonlocal i
        case.rows = [_row(case.name.replace("_", "-"), dataset, i, **row)]
        i += 1
        cases.append(case)

    talk = voice(1.5)

    def frame(t: float) -> np.ndarray:
        return face_frame(160, 120, 1, t)

    ref = write_av(m / "ref.mp4", frame, seconds=3.0, audio=voice(3.0))

    # --- files that cannot be decoded --------------------------------------------------------
    (m / "empty.mp4").write_bytes(b"")
    add(Case("empty_file", "ledger", stage="decode", reason=r"empty \(0 bytes\)",
             description="0-byte file"), video="media/empty.mp4")

    (m / "truncated.mp4").write_bytes(ref.read_bytes()[: ref.stat().st_size // 2])
    add(Case("truncated_mp4", "ledger", stage="decode",
             reason=r"not a readable media file|nothing could be decoded",
             description="mp4 cut mid-stream (index atom at the end is lost)"),
        video="media/truncated.mp4")

    fast = write_av(m / "fast.mp4", frame, seconds=3.0, audio=voice(3.0), faststart=True)
    (m / "truncated_faststart.mp4").write_bytes(fast.read_bytes()[: fast.stat().st_size * 2 // 5])
    fast.unlink()
    add(Case("truncated_faststart", "ok", present={"audio": True, "meta": True},
             status=r"decode: truncated", description="faststart mp4 cut mid-stream: the decodable "
             "part is used and the clip's status says it was truncated"),
        video="media/truncated_faststart.mp4")

    (m / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
                                    + np.random.default_rng(1).bytes(6000))
    add(Case("undecodable_stream", "ledger", stage="decode",
             reason=r"not a readable media file|nothing could be decoded",
             description="random bytes behind an mp4 header"), video="media/garbage.mp4")

    (m / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    add(Case("text_named_mp4", "ledger", stage="decode",
             reason=r"not a readable media file|no audio or video stream|nothing could be decoded",
             description="a text file with an .mp4 name"), video="media/notes.mp4")

    add(Case("missing_file", "ledger", stage="decode", reason=r"media file not found",
             description="the manifest names a file that does not exist"), video="media/nowhere.mp4")

    os.symlink("loop_b.mp4", m / "loop_a.mp4")
    os.symlink("loop_a.mp4", m / "loop_b.mp4")
    add(Case("symlink_loop", "ledger", stage="decode", reason=r"symlink loop",
             description="a symlink loop"), video="media/loop_a.mp4")

    os.symlink("gone-target.mp4", m / "dangling.mp4")
    add(Case("broken_symlink", "ledger", stage="decode", reason=r"broken symlink",
             description="a symlink whose target does not exist"), video="media/dangling.mp4")

    secret = write_wav(outside / "outside.wav", voice(1.0, seed=7))
    os.symlink(secret, m / "escape.wav")
    add(Case("symlink_outside_root", "ok", present={"audio": True, "meta": True},
             description="a symlink inside the root to media on another disk (the usual cluster "
                         "layout): followed"), audio="media/escape.wav")

    (m / "adir.mp4").mkdir()
    add(Case("directory_as_media", "ledger", stage="decode", reason=r"is a directory",
             description="the media path is a directory"), video="media/adir.mp4")

    os.mkfifo(m / "pipe.mp4")
    add(Case("fifo_as_media", "ledger", stage="decode", reason=r"not a regular file",
             description="a FIFO (reading it would block forever)"), video="media/pipe.mp4")

    write_av(m / "oversize.mp4", lambda t: np.full((2400, 4000, 3), 90, np.uint8),
             seconds=0.4, fps=5, size=(4000, 2400))
    add(Case("oversize_frame", "ledger", stage="decode", reason=r"exceeds the limit of \d+ pixels",
             description=f"4000x2400 frames > decode.max_pixels={MAX_PIXELS}"),
        video="media/oversize.mp4")

    nan = voice(1.5)
    nan[4000:4100] = np.nan
    write_wav(m / "nan.wav", nan, codec="pcm_f32le")
    add(Case("nan_samples", "ledger", stage="separate|audio", reason=r"NaN or Inf",
             description="float WAV holding NaN samples"), audio="media/nan.wav")

    inf = voice(1.5)
    inf[100:200] = np.inf
    write_wav(m / "inf.wav", inf, codec="pcm_f32le")
    add(Case("inf_samples", "ledger", stage="separate|audio", reason=r"NaN or Inf",
             description="float WAV holding +Inf samples"), audio="media/inf.wav")

    add(Case("no_media_paths", "ok", present={"audio": False, "text": True, "meta": True},
             status=r"decode: no media",
             description="a transcript-only row (MELD without media): text and metadata only, "
                         "no ledger line"), transcript="a transcript with no media at all")

    add(Case("segment_beyond_end", "ledger", stage="decode", reason=r"beyond the end of the media",
             description="start/end past the media's end"), video="media/ref.mp4", start=50.0, end=52.0)

    # --- legitimate but odd ------------------------------------------------------------------
    write_wav(m / "speech_wav.mp4", voice(1.5, seed=3))
    add(Case("wav_named_mp4", "ok", present={"audio": True, "visual": False, "meta": True},
             description="a WAV file with an .mp4 name: content decides, audio only"),
        video="media/speech_wav.mp4")

    write_av(m / "movie.wav", frame, audio=talk)
    add(Case("mp4_named_wav", "ok", present={"audio": True, "meta": True},
             description="an mp4 with a .wav name used as the audio file"), audio="media/movie.wav")

    write_av(m / "audio_only.mp4", None, audio=talk)
    add(Case("audio_only_container", "ok", present={"audio": True, "visual": False, "meta": True},
             description="mp4 with only an AAC stream"), video="media/audio_only.mp4")

    write_av(m / "video_only.mp4", frame)
    add(Case("video_only_container", "ok", present={"audio": False, "visual": True, "meta": True},
             needs_visual=True, description="mp4 with only a video stream: audio absent"),
        video="media/video_only.mp4")

    write_av(m / "silent.mp4", frame, audio=np.zeros(int(1.5 * SR), np.float32))
    add(Case("silent_audio", "ok", present={"audio": True, "meta": True},
             description="all-zero audio: finite features (level floor), not NaN"),
        video="media/silent.mp4")

    write_wav(m / "dc.wav", np.full(int(1.5 * SR), 0.5, np.float32))
    add(Case("dc_audio", "ok", present={"audio": True, "meta": True},
             description="constant (DC) audio"), audio="media/dc.wav")

    sq = np.sign(np.sin(2 * np.pi * 200 * np.arange(int(1.5 * SR)) / SR)).astype(np.float32)
    write_wav(m / "clipped.wav", sq)
    add(Case("clipped_full_scale", "ok", present={"audio": True, "meta": True},
             description="full-scale clipped square wave (16-bit)"), audio="media/clipped.wav")

    write_wav(m / "loud.wav", voice(1.5) * 1e6, codec="pcm_f32le")
    add(Case("extreme_level_float", "ok", present={"audio": True, "meta": True},
             description="float WAV at 1e6 x full scale: features stay finite and in float16 range"),
        audio="media/loud.wav")

    times = [0.0, 0.05, 0.1, 0.6, 0.62, 0.64, 1.3, 1.4]
    write_av(m / "vfr.mp4", frame, times=times, audio=talk)
    add(Case("variable_frame_rate", "ok", present={"audio": True, "visual": True, "meta": True},
             needs_visual=True, description="irregular frame times"), video="media/vfr.mp4")

    write_av(m / "rotated.mp4", lambda t: np.ascontiguousarray(np.rot90(face_frame(160, 120, 1, t), -1)),
             size=(120, 160), rotation=90, audio=talk)
    add(Case("rotated_video", "ok", present={"audio": True, "visual": True, "meta": True},
             needs_visual=True, description="frames stored sideways with a 90 degree display matrix"),
        video="media/rotated.mp4")

    write_av(m / "uhd.mp4", lambda t: face_frame(3840, 2160, 1, t), seconds=1.0, fps=2,
             size=(3840, 2160), audio=talk, crf=40)
    add(Case("uhd_4k", "ok", present={"audio": True, "visual": True, "meta": True},
             needs_visual=True, description="3840x2160 frames: downscaled to max_side"),
        video="media/uhd.mp4")

    write_long(m / "long.mp4")
    add(Case("long_clip", "ok", present={"audio": True, "meta": True}, status=r"decode: .*max_duration",
             description=f"{LONG_SECONDS:g} s at low bitrate: capped at decode.max_duration"),
        video="media/long.mp4")

    write_av(m / "noface.mp4", lambda t: face_frame(160, 120, 0, t), audio=talk)
    add(Case("no_face", "ok", present={"audio": True, "visual": False, "meta": True},
             needs_visual=True, description="no face in any frame: visual absent, not an error"),
        video="media/noface.mp4")

    write_av(m / "crowd.mp4", lambda t: face_frame(320, 160, 2, t), size=(320, 160), audio=talk)
    add(Case("several_faces", "ok", present={"audio": True, "visual": True, "meta": True},
             needs_visual=True, description="two faces: the main track is used"),
        video="media/crowd.mp4")

    add(Case("empty_transcript", "ok", present={"audio": True, "text": False, "meta": True},
             description="transcript is the empty string: text absent, not embedded"),
        video="media/ref.mp4", transcript="")

    add(Case("mixed_encoding_transcript", "ok", present={"audio": True, "text": True, "meta": True},
             description="valid JSON transcript mixing scripts, mojibake and a lone surrogate"),
        video="media/ref.mp4",
        transcript="Caf\u00c3\u00a9 cr\u00e8me \u4f60\u597d \udce9 ok \ufffd\u0000 fin")
    assert tuple(c.name for c in cases) == CASE_NAMES, "CASE_NAMES is out of date"
    return cases


def write_long(path: Path, seconds: float = LONG_SECONDS) -> Path:
    """A long, small file: 64x48 video at 5 fps and 16 kbit/s speech-like audio."""
    return write_av(path, lambda t: face_frame(64, 48, 0, seed=int(t) % 7), seconds=seconds, fps=5,
                    size=(64, 48), audio=voice(seconds, seed=5), audio_bitrate=16000, crf=40)


# --- manifest-level cases --------------------------------------------------------------------
def _line(row: dict[str, Any]) -> bytes:
    return json.dumps(row).encode() + b"\n"


def manifest_cases(root: Path, dataset: str = "corpus") -> list[Case]:
    """Manifests that must be refused as a whole, each with one good row first."""
    (root / "media").mkdir(parents=True, exist_ok=True)
    good_path = root / "media" / "ok.wav"
    if not good_path.exists():
        write_wav(good_path, voice(1.0))
    good = _row("fine", dataset, 0, audio="media/ok.wav")
    out = [
        Case("duplicate_ids", "manifest", reason=r"duplicate id 'fine'", line=2, field_name="id",
             manifest=_line(good) + _line(_row("fine", dataset, 1, audio="media/ok.wav")),
             description="two rows with the same id"),
        Case("dotdot_id", "manifest", reason=r"path separator|'\.\.'", line=2, field_name="id",
             manifest=_line(good) + _line(_row("../../escape", dataset, 1, audio="media/ok.wav")),
             description="an id with ../ (ids become file names in the cache)"),
        Case("dotdot_plain_id", "manifest", reason=r"'\.\.'", line=2, field_name="id",
             manifest=_line(good) + _line(_row("..", dataset, 1, audio="media/ok.wav")),
             description="the id '..'"),
        Case("absolute_path", "manifest", reason=r"absolute", line=2, field_name="video",
             manifest=_line(good) + _line(_row("abs", dataset, 1, video="/etc/passwd")),
             description="an absolute media path outside the dataset root"),
        Case("dotdot_path", "manifest", reason=r"inside the dataset root", line=2, field_name="audio",
             manifest=_line(good) + _line(_row("up", dataset, 1, audio="media/../../secret.wav")),
             description="a media path climbing out with .."),
        Case("non_utf8_transcript", "manifest", reason=r"UTF-8", line=2, field_name="<encoding>",
             manifest=_line(good) + _line(_row("latin", dataset, 1, audio="media/ok.wav",
                                               transcript="PLACEHOLDER")).replace(
                 b"PLACEHOLDER", b"caf\xe9 cr\xe8me"),
             description="a transcript in Latin-1 bytes inside a UTF-8 manifest"),
    ]
    assert tuple(c.name for c in out) == MANIFEST_CASE_NAMES, "MANIFEST_CASE_NAMES is out of date"
    return out


# --- running the corpus: presets, the CLI, cache checks ---------------------------------------
# decode + passthrough separation + eGeMAPS + MiniLM text + metadata: no faces/OCR (cheap)
CHEAP = f"""
name = "robust-cheap"
[store]
unit_size = 8
max_len = {{ audio = 16, text = 4, visual = 4 }}
[run]
batch_size = 8
clip_timeout = 120
[decode]
backend = "pyav"
max_side = {MAX_SIDE}
max_pixels = {MAX_PIXELS}
max_duration = {MAX_DURATION}
[separate]
backend = "none"
[ocr]
backend = "skip"
[faces]
backend = "skip"
[audio]
backend = "egemaps"
[text]
backend = "minilm"
[visual]
backend = "skip"
[metadata]
backend = "manifest"
"""

# the real offline preset, with the corpus' resource limits
OFFLINE_LIMITS = [
    f"decode.max_side={MAX_SIDE}",
    f"decode.max_pixels={MAX_PIXELS}",
    f"decode.max_duration={MAX_DURATION}",
    "run.clip_timeout=120",
    "store.unit_size=8",
]


def mmemo_cmd() -> list[str]:
    """The `mmemo` console script of this venv (or the typer app through python -c)."""
    exe = Path(sys.executable).parent / "mmemo"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from cli import app; sys.argv[0] = 'mmemo'; app()"]


def _env(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1", **(env or {})}


def run_mmemo(args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    """Run `mmemo ARGS` in a subprocess (wide console so messages are not wrapped)."""
    return subprocess.run([*mmemo_cmd(), *args], cwd=cwd, env=_env(env), capture_output=True,
                          text=True, timeout=timeout)


def start_mmemo(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `mmemo ARGS` in the background (stdout/stderr piped, text)."""
    return subprocess.Popen([*mmemo_cmd(), *args], cwd=cwd, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def write_dataset(man: Path, name: str, root: Path, rows: list[dict[str, Any]]) -> Path:
    """manifests/<name>/train.jsonl (rows written as given: hostile rows stay hostile) + dataset.json."""
    d = man / name
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**r, "dataset": name}) + "\n" for r in rows]
    (d / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    (d / "dataset.json").write_text(json.dumps({"name": name, "root": str(root), "classes": list(CLASSES)}))
    return d


def set_key(cache: Path, dataset: str, preset: str) -> str:
    return json.loads((cache / "aliases" / dataset / f"{preset}.json").read_text())["key"]


def ledger(cache: Path, key: str) -> list[dict[str, Any]]:
    rows = []
    for p in sorted((cache / "sets" / key / "ledger").glob("*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def assert_clean_cache(cache: Path, key: str) -> dict[str, np.ndarray]:
    """No NaN/Inf in any float array; absent rows hold no data; every unit committed; no
    leftovers. Returns `{modality: present}`."""
    path = cache / "sets" / key
    g = zarr.open_group(path, mode="r")
    attrs = g.attrs["mmemo"]
    n, unit = int(attrs["n"]), int(attrs["unit_size"])
    n_units = (n + unit - 1) // unit
    done = sorted(p.name for p in (path / "units").glob("[0-9]*.done"))
    assert len(done) == n_units, f"units committed: {done}, expected {n_units}"
    assert not any((path / "tmp").rglob("*.*")) if (path / "tmp").exists() else True, "staging leftovers"
    claims = cache / "claims" / key
    assert not claims.exists() or not list(claims.glob("*.claim")), "claims left behind"

    def walk(grp: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
        out = []
        for name, item in grp.members():
            rel = f"{prefix}{name}"
            out += walk(item, rel + "/") if isinstance(item, zarr.Group) else [(rel, item)]
        return out

    for rel, arr in walk(g):
        data = np.asarray(arr[:])
        if data.dtype.kind == "f":
            assert np.isfinite(data.astype(np.float32)).all(), f"{rel} holds NaN/Inf"
    present = {}
    for m, info in attrs["modalities"].items():
        pres = np.asarray(g[f"{m}/present"][:], bool)
        present[m] = pres
        pooled = np.asarray(g[f"{m}/pooled"][:], np.float32)
        assert not pooled[~pres].any(), f"{m}: absent rows hold pooled data"
        if info.get("kind") == "sequence":
            seq = np.asarray(g[f"{m}/seq"][:], np.float32)
            lens = np.asarray(g[f"{m}/len"][:])
            assert not seq[~pres].any() and not lens[~pres].any(), f"{m}: absent rows hold sequence data"
            assert (lens[pres] > 0).all(), f"{m}: a present row has an empty sequence"
    return present


def ids_of(cache: Path, key: str) -> list[str]:
    g = zarr.open_group(cache / "sets" / key, mode="r")
    return [str(x) for x in g["ids"][:]]
