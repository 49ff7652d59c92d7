"""Decode stage: one clip's media → bounded audio + sampled frames (PyAV, streaming).

Why streaming: datasets hold 10-minute 1080p files next to 3-second clips. We never keep a
decoded video in memory; each frame is either dropped or, when it is the frame shown at one
of the sampling times, downscaled by swscale straight to a small RGB array. Audio is
resampled on the fly to mono float32 and capped at `max_duration` seconds. The number of
frames is capped by lowering the effective sampling rate, so memory is bounded by
`max_frames * max_side^2 * 3 + max_duration * sample_rate * 4` bytes whatever the input.

Every expected failure (missing, empty, garbage, truncated, absurd frame size, path outside
the dataset root) is a `ClipError` naming the file and the reason.
"""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

from pipeline.stages.base import ClipContext, ClipError, Media, Stage, StageConfig, register

# A decode that ends this many seconds before the declared end counts as truncated.
_TRUNCATION_SLACK = 0.5


class DecodeConfig(StageConfig):
    sample_rate: int = 16000  # audio resampled to mono float32 at this rate
    fps: float = 2.0  # frames sampled per second (lowered for long clips to fit max_frames)
    max_frames: int = 64
    max_side: int = 960  # frames downscaled so max(H, W) <= max_side, RGB uint8
    max_duration: float = 600.0  # seconds decoded at most (longer media: first max_duration s)
    max_pixels: int = 8192 * 8192  # refuse absurd frame sizes before decoding (ClipError)
    # skip decoding non-reference frames (B-frames) when sampling sparsely: about 2x faster
    # on long clips; the chosen frame may be a frame or two off the sampling time (its true
    # time is still what is recorded)
    skip_nonref: bool = True


# --- paths -------------------------------------------------------------------------------------
def resolve_media_path(root: Path, rel: str) -> Path:
    """Resolve a manifest's relative media path inside the dataset root.

    The path as written must stay inside the root (no absolute path, no `..`: the manifest
    refuses both). Symlinks inside the root are followed wherever they lead: media kept on
    another disk and linked into the dataset folder is the usual cluster layout. A symlink
    loop, a broken link and anything that is not a regular file (FIFO, device: checked
    before opening) are refused with a reason.
    """
    from pipeline.manifest import check_rel_path

    try:
        check_rel_path(rel)
    except ValueError as e:
        raise ClipError(f"{rel}: {e}") from None
    candidate = Path(root) / rel
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        if candidate.is_symlink():
            raise ClipError(f"{candidate}: broken symlink (its target does not exist)") from None
        raise ClipError(f"{candidate}: media file not found") from None
    except (RuntimeError, OSError) as e:  # RuntimeError: symlink loop (Python < 3.13)
        if "loop" in str(e).lower() or getattr(e, "errno", None) == 40:
            raise ClipError(f"{candidate}: symlink loop, the path never reaches a file") from None
        raise ClipError(f"{candidate}: cannot resolve the path ({e})") from None
    return resolved


def _check_file(path: Path) -> None:
    """Fail early, in words, on the cheap cases ffmpeg reports cryptically."""
    if not path.exists():
        raise ClipError(f"{path}: media file not found")
    if path.is_dir():
        raise ClipError(f"{path}: is a directory, not a media file")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        # a FIFO or device would block ffmpeg forever (or never end)
        raise ClipError(f"{path}: not a regular file (a FIFO, socket or device); refusing to read it")
    if st.st_size == 0:
        raise ClipError(f"{path}: file is empty (0 bytes)")


def _open(path: Path) -> av.container.InputContainer:
    _check_file(path)
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise ClipError(
            f"{path}: not a readable media file — ffmpeg could not open it "
            f"({_ffmpeg_reason(e)}); the file may be truncated, corrupt or not audio/video"
        ) from None


def _ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return str(msg).strip() or type(e).__name__


# --- stream facts ------------------------------------------------------------------------------
def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first real video stream (cover art in audio files is not video)."""
    for s in container.streams.video:
        if not (s.disposition & av.stream.Disposition.attached_pic):
            return s
    return None


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream | None:
    return container.streams.audio[0] if container.streams.audio else None


def _origin(container: av.container.InputContainer) -> float:
    """Presentation time of the container's start; clip times are measured from it."""
    st = container.start_time
    return st / av.time_base if st is not None else 0.0


def _declared_duration(container: av.container.InputContainer) -> float | None:
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    best = None
    for s in list(container.streams.video) + list(container.streams.audio):
        if s.duration and s.time_base:
            d = float(s.duration * s.time_base)
            best = d if best is None else max(best, d)
    return best


def normalise_rotation(degrees: float | None) -> int:
    """Counter-clockwise display rotation snapped to 0/90/180/270 (phones only use these)."""
    if degrees is None or not math.isfinite(degrees):
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


def apply_rotation(image: np.ndarray, degrees: int) -> np.ndarray:
    """Rotate an [H, W, C] image counter-clockwise by `degrees` (a multiple of 90) so that
    a frame stored sideways (phone video with a display matrix) stands upright."""
    k = normalise_rotation(degrees) // 90
    return np.ascontiguousarray(np.rot90(image, k=k)) if k else image


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Output size with max(W, H) <= max_side, aspect kept, never upscaled."""
    side = max(width, height)
    if side <= max_side:
        return width, height
    s = max_side / side
    return max(1, round(width * s)), max(1, round(height * s))


def probe(path: Path) -> dict[str, Any]:
    """Cheap facts about a media file: streams, duration, size, fps, rotation, codecs.

    Reads the header and decodes at most one video frame (the display rotation lives in
    frame side data in PyAV).
    """
    path = Path(path)
    container = _open(path)
    try:
        v, a = _video_stream(container), _audio_stream(container)
        info: dict[str, Any] = {
            "path": str(path),
            "format": container.format.name,
            "size_bytes": path.stat().st_size,
            "duration": _declared_duration(container),
            "streams": [
                {"index": s.index, "type": s.type,
                 "codec": s.codec_context.name if s.codec_context else None}
                for s in container.streams
            ],
            "has_video": v is not None,
            "has_audio": a is not None,
            "video_codec": v.codec_context.name if v is not None else None,
            "audio_codec": a.codec_context.name if a is not None else None,
            "width": v.codec_context.width if v is not None else 0,
            "height": v.codec_context.height if v is not None else 0,
            "fps": float(v.average_rate) if v is not None and v.average_rate else 0.0,
            "sample_rate": a.codec_context.sample_rate if a is not None else 0,
            "channels": a.codec_context.channels if a is not None else 0,
            "rotation": 0,
        }
        if v is not None:
            try:
                for frame in container.decode(v):
                    info["rotation"] = normalise_rotation(frame.rotation)
                    break
            except av.error.FFmpegError:
                info["rotation"] = 0
        return info
    finally:
        container.close()


# --- sampling ----------------------------------------------------------------------------------
def sample_times(t0: float, t1: float | None, fps: float, max_frames: int) -> tuple[list[float], float]:
    """Sampling times in [t0, t1) at `fps`, lowered so that at most max_frames fit.

    With an unknown end (t1 None) the first max_frames / fps seconds are sampled.
    Returns (times, effective fps).
    """
    if max_frames <= 0 or fps <= 0:
        return [], 0.0
    if t1 is None:
        return [t0 + k / fps for k in range(max_frames)], fps
    window = max(t1 - t0, 0.0)
    if window <= 0:
        return [], 0.0
    eff = min(fps, max_frames / window)
    n = min(max_frames, max(1, math.ceil(window * eff - 1e-9)))
    return [t0 + k / eff for k in range(n)], eff


@dataclass
class _FrameSampler:
    """Picks, for each sampling time T, the decoded frame nearest to T (ties: the earlier).

    Works for variable frame rate because it only looks at presentation times, and needs
    one frame of look-ahead (the pending frame). A frame nearest to several times is kept
    once, so a long gap in a VFR stream gives fewer frames, never duplicates.
    """

    targets: list[float]
    rotation: int | None = None
    i: int = 0
    pending: Any = None
    pending_t: float = 0.0
    pending_done: bool = False
    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.i >= len(self.targets)

    def push(self, frame: av.VideoFrame, t: float, convert) -> None:
        current_done = False
        while not self.done and self.targets[self.i] < t:  # T lies between pending and frame
            target = self.targets[self.i]
            if self.pending is not None and target - self.pending_t <= t - target:
                if not self.pending_done:
                    self._emit(self.pending, self.pending_t, convert)
                    self.pending_done = True
            elif not current_done:
                self._emit(frame, t, convert)
                current_done = True
            self.i += 1
        self.pending, self.pending_t, self.pending_done = frame, t, current_done

    def finish(self, t_end: float | None, convert) -> None:
        """End of stream (or window): the last frame covers the remaining times."""
        if self.pending is None or self.pending_done or self.done:
            return
        if t_end is None or self.targets[self.i] < t_end:
            self._emit(self.pending, self.pending_t, convert)
            self.pending_done = True
        self.i = len(self.targets)

    def _emit(self, frame: av.VideoFrame, t: float, convert) -> None:
        self.frames.append(convert(frame))
        self.times.append(t)


@dataclass
class _AudioSink:
    """Collects resampled mono audio inside [t0, t0 + cap) without holding more."""

    t0: float
    cap: int  # samples kept at most
    sample_rate: int
    start_t: float | None = None  # time of the first resampled sample
    seen: int = 0  # samples received since start_t
    kept: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.kept >= self.cap

    def add(self, samples: np.ndarray) -> None:
        if samples.size == 0 or self.start_t is None:
            return
        first = self.seen
        self.seen += samples.size
        skip = max(0, round((self.t0 - self.start_t) * self.sample_rate) - first)
        if skip >= samples.size:
            return
        take = samples[skip : skip + (self.cap - self.kept)]
        if take.size:
            self.chunks.append(np.array(take, dtype=np.float32, copy=True))
            self.kept += take.size

    def array(self) -> np.ndarray | None:
        if not self.chunks:
            return None
        return np.concatenate(self.chunks).astype(np.float32, copy=False)

    @property
    def end_time(self) -> float | None:
        if self.start_t is None:
            return None
        return self.start_t + self.seen / self.sample_rate


# --- decode ------------------------------------------------------------------------------------
def _window(
    path: Path, declared: float | None, start: float | None, end: float | None, max_duration: float
) -> tuple[float, float | None, dict[str, Any]]:
    """The [t0, t1) seconds to decode, and notes about clamping."""
    notes: dict[str, Any] = {}
    t0 = float(start or 0.0)
    if t0 < 0 or not math.isfinite(t0):
        raise ClipError(f"{path}: segment start {start} s is negative or not a number")
    if end is not None and (not math.isfinite(end) or end <= t0):
        raise ClipError(f"{path}: segment end {end} s is not after its start {t0} s")
    if declared is not None and t0 >= declared:
        raise ClipError(f"{path}: segment start {t0:.3f} s is beyond the end of the media ({declared:.3f} s)")
    t1 = float(end) if end is not None else None
    if declared is not None and (t1 is None or t1 > declared):
        if t1 is not None:
            notes["end_clamped"] = f"segment end {t1:.3f} s is past the media end {declared:.3f} s"
        t1 = declared
    if t1 is None or t1 - t0 > max_duration:
        if t1 is not None:
            notes["duration_capped"] = (
                f"only the first {max_duration:g} s of {t1 - t0:.1f} s were decoded (max_duration)"
            )
        t1 = t0 + max_duration if t1 is not None else None
    if t1 is None:
        notes["duration_unknown"] = True
    return t0, t1, notes


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ClipError(
            f"{path}: frame size {width}x{height} exceeds the limit of {max_pixels} pixels "
            "(max_pixels); refusing to decode"
        )


def decode_media(
    path: Path,
    config: DecodeConfig | None = None,
    start: float | None = None,
    end: float | None = None,
    *,
    audio: bool = True,
    video: bool = True,
) -> Media:
    """Decode one media file (or its [start, end) segment) into a bounded `Media`.

    `audio`/`video` select which streams to read (a clip with a separate audio file reads
    frames from one file and audio from the other). Frame times are seconds from the clip
    start; audio starts at the clip start. A file that stops early is decoded as far as it
    goes with `info['truncated'] = True`; a file where nothing decodes is a ClipError.
    """
    cfg = config or DecodeConfig()
    path = Path(path)
    container = _open(path)
    try:
        return _Decoder(container, path, cfg, start, end, audio, video).run()
    finally:
        container.close()


class _Decoder:
    """One decode of an open container: the window, the frame sampler and the audio sink,
    fed packet by packet from the demuxer (`run`), then turned into a bounded `Media`."""

    def __init__(
        self,
        container: av.container.InputContainer,
        path: Path,
        cfg: DecodeConfig,
        start: float | None,
        end: float | None,
        want_audio: bool,
        want_video: bool,
    ) -> None:
        v_stream, a_stream = _video_stream(container), _audio_stream(container)
        if v_stream is None and a_stream is None:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise ClipError(f"{path}: has no audio or video stream (streams: {', '.join(kinds)})")
        v_stream = v_stream if want_video else None
        a_stream = a_stream if want_audio else None
        if v_stream is None and a_stream is None:
            wanted = "video" if want_video else "audio"
            raise ClipError(f"{path}: has no {wanted} stream")
        if v_stream is not None:
            _check_size(path, v_stream.codec_context.width, v_stream.codec_context.height, cfg.max_pixels)
            v_stream.thread_type = "AUTO"
        self.container, self.path, self.cfg = container, path, cfg
        self.v_stream, self.a_stream = v_stream, a_stream

        self.declared = _declared_duration(container)
        self.t0, self.t1, self.notes = _window(path, self.declared, start, end, cfg.max_duration)
        t0, t1 = self.t0, self.t1
        self.origin = _origin(container)
        if t0 > 0:
            try:
                container.seek(int((t0 + self.origin) * av.time_base), backward=True, any_frame=False)
            except av.error.FFmpegError:
                pass  # unseekable input: decoding from the start still gives the right window

        targets, self.eff_fps = sample_times(t0, t1, cfg.fps, cfg.max_frames) if v_stream else ([], 0.0)
        if v_stream is not None and cfg.skip_nonref and self.eff_fps > 0:
            src_fps = float(v_stream.average_rate or 0)
            if src_fps >= 4 * self.eff_fps:
                v_stream.codec_context.skip_frame = "NONREF"
        self.sampler = _FrameSampler(targets)
        cap_s = (t1 - t0) if t1 is not None else cfg.max_duration
        self.sink = _AudioSink(t0, cap=max(0, math.ceil(cap_s * cfg.sample_rate)), sample_rate=cfg.sample_rate)
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=cfg.sample_rate)
        self.last_v: float | None = None  # time of the last video frame seen
        self.v_frames = 0  # video frames seen

    def convert(self, frame: av.VideoFrame) -> np.ndarray:
        cfg, sampler = self.cfg, self.sampler
        _check_size(self.path, frame.width, frame.height, cfg.max_pixels)
        if sampler.rotation is None:
            sampler.rotation = normalise_rotation(frame.rotation)
        w, h = scaled_size(frame.width, frame.height, cfg.max_side)
        rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
        return apply_rotation(rgb, sampler.rotation)

    def on_video(self, frame: av.VideoFrame) -> None:
        t = frame.time if frame.time is not None else self.v_frames / float(self.v_stream.average_rate or 25)
        t -= self.origin
        self.v_frames += 1
        self.last_v = t
        if self.t1 is not None and t >= self.t1:
            self.sampler.finish(self.t1, self.convert)
            return
        self.sampler.push(frame, t, self.convert)

    def on_audio(self, frame: av.AudioFrame) -> None:
        sink = self.sink
        if sink.start_t is None:
            sink.start_t = (frame.time - self.origin) if frame.time is not None else 0.0
        for out in self.resampler.resample(frame):
            sink.add(out.to_ndarray().reshape(-1))

    def video_done(self) -> bool:
        return self.v_stream is None or self.sampler.done or (
            self.last_v is not None and self.t1 is not None and self.last_v >= self.t1
        )

    def run(self) -> Media:
        path, cfg, sampler, sink = self.path, self.cfg, self.sampler, self.sink
        v_stream, a_stream, t0, t1 = self.v_stream, self.a_stream, self.t0, self.t1
        streams = [s for s in (v_stream, a_stream) if s is not None]
        error: str | None = None
        try:
            for packet in self.container.demux(streams):
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        self.on_video(frame)
                    elif isinstance(frame, av.AudioFrame):
                        self.on_audio(frame)
                if self.video_done() and (a_stream is None or sink.done):
                    break
            if a_stream is not None and not sink.done:
                for out in self.resampler.resample(None):
                    sink.add(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            error = _ffmpeg_reason(e)
        except ClipError:
            raise
        sampler.finish(t1, self.convert)

        audio_arr = sink.array() if a_stream is not None else None
        if not sampler.frames and audio_arr is None:
            why = f"ffmpeg: {error}" if error else "no frame or audio sample decoded"
            raise ClipError(f"{path}: nothing could be decoded ({why}); the file is corrupt, truncated or not a media file")

        media = Media(path=path, audio=audio_arr, sample_rate=cfg.sample_rate)
        media.frames, media.frame_times = sampler.frames, [max(0.0, t - t0) for t in sampler.times]
        if media.frames:
            media.height, media.width = media.frames[0].shape[:2]
        if v_stream is not None and v_stream.average_rate:
            media.fps = float(v_stream.average_rate)
        media.rotation = sampler.rotation or 0

        decoded_end = _decoded_end(self.last_v, v_stream, sink, t0)
        truncated = error is not None or (
            t1 is not None and decoded_end is not None and decoded_end < t1 - _TRUNCATION_SLACK
        )
        media.duration = (t1 - t0) if (t1 is not None and not truncated) else max(0.0, (decoded_end or t0) - t0)
        media.info = {
            **self.notes,
            "source_duration": self.declared,
            "start": t0,
            "end": t1,
            "effective_fps": self.eff_fps,
            "video_codec": v_stream.codec_context.name if v_stream is not None else None,
            "audio_codec": a_stream.codec_context.name if a_stream is not None else None,
            "source_width": v_stream.codec_context.width if v_stream is not None else 0,
            "source_height": v_stream.codec_context.height if v_stream is not None else 0,
            "truncated": bool(truncated),
        }
        if truncated:
            media.info["truncated_reason"] = (
                f"ffmpeg: {error}" if error else f"media ends at {decoded_end:.2f} s, before {t1:.2f} s"
            )
        return media


def _decoded_end(last_v: float | None, v_stream, sink: _AudioSink, t0: float) -> float | None:
    """How far the decode actually got (seconds), over both streams."""
    ends = []
    if last_v is not None:
        rate = float(v_stream.average_rate) if v_stream is not None and v_stream.average_rate else 25.0
        ends.append(last_v + 1.0 / rate)
    if sink.end_time is not None:
        ends.append(sink.end_time)
    return max(ends) if ends else None


# --- the stage ---------------------------------------------------------------------------------
@register
class PyAVDecode(Stage):
    """Decode a clip's media with PyAV: audio from `clip.audio` (else the video), frames from
    `clip.video`; both inside the dataset root."""

    name = "decode"
    backend = "pyav"
    version = "1"
    Config = DecodeConfig

    def process_one(self, ctx: ClipContext) -> None:
        ctx.media = decode_clip(ctx.root, ctx.clip, self.config)  # type: ignore[arg-type]
        notes = []
        if ctx.media.info.get("truncated"):
            notes.append(f"truncated ({ctx.media.info.get('truncated_reason', 'media ends early')})")
        if ctx.media.info.get("duration_capped"):
            notes.append(str(ctx.media.info["duration_capped"]))
        if notes:  # the clip is used, but a person should know it was partial
            ctx.status["decode"] = "; ".join(notes)


def decode_clip(root: Path, clip, config: DecodeConfig) -> Media:
    """A clip's Media: one pass when audio and frames come from one file, two otherwise."""
    if not clip.video and not clip.audio:
        raise ClipError(f"clip {clip.id}: has neither a video nor an audio path")
    start, end = clip.start, clip.end
    if clip.video and clip.audio and clip.audio != clip.video:
        vpath = resolve_media_path(root, clip.video)
        apath = resolve_media_path(root, clip.audio)
        media = decode_media(vpath, config, start, end, audio=False)
        sound = decode_media(apath, config, start, end, video=False)
        media.audio = sound.audio
        media.info["audio_path"] = str(apath)
        media.info["audio_truncated"] = sound.info.get("truncated", False)
        return media
    if clip.video:
        return decode_media(resolve_media_path(root, clip.video), config, start, end)
    return decode_media(resolve_media_path(root, clip.audio), config, start, end, video=False)

