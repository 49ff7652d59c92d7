"""OCR stage: burned-in (hard) subtitles of sampled frames → timed cues and an SRT file.

Why it is built this way:

* Subtitles live in one horizontal band, low in the frame and horizontally centred; logos and
  watermarks sit in corners and never change. So we first find the band (`band="auto"`: run
  OCR on the lower part of a few probe frames, keep centred lines, reject corner boxes and
  text that is identical at the same place in every probe), then OCR only the band crop of
  every frame. A 960x60 crop costs a fraction of a full frame.
* Subtitles change far less often than frames are sampled, so a frame whose band looks like
  the band of the last OCR'd frame reuses that frame's text. The comparison is made on
  "text-like" pixels (strong local contrast: white and black top-hat), which ignores most
  background motion but sees a glyph appear, change or vanish. A changed band with almost no
  text-like pixels (between two cues) reads as no text without OCR.
* OCR flickers (a dropped character, a missing "?"); consecutive readings are merged when
  their normalized edit-distance similarity is high, and the cue keeps the most frequent
  variant (ties: the highest score).

The recognition engine is a backend detail (`_read`): `rapidocr` (ONNX models in the wheel,
offline; the text detector run by OpenVINO, recognition by onnxruntime: `det_engine`) or
`paddleocr` (optional, large, downloads models).
"""

from __future__ import annotations

import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import srt
from pydantic import Field, field_validator

from pipeline.stages.base import (
    ClipContext,
    Cue,
    ModelMissingError,
    Stage,
    StageConfig,
    register,
    worker_threads,
)


class OcrConfig(StageConfig):
    """Knobs of subtitle OCR; defaults suit 960-px-wide frames sampled at 2 fps."""

    # "auto", or the band as [top, bottom] fractions of the frame height, e.g. [0.7, 1.0]
    band: Literal["auto"] | tuple[float, float] = "auto"
    search_from: float = Field(0.5, ge=0.0, lt=1.0)  # auto: look for the band below this
    probe_frames: int = Field(6, ge=1)  # auto: at most this many frames OCR'd to find the band
    # auto: the text detector sees the probe crops at this fraction of their longest side (the
    # band is then read at full detector resolution). Probes only place the band and spot logos; at 0.5
    # they found the same lines on the real and synthetic clips at a third of the cost (BENCHMARKS)
    probe_scale: float = Field(0.5, gt=0.0, le=1.0)
    # a box centred in the outer `edge_margin` of the width is a corner logo or watermark
    edge_margin: float = Field(0.15, ge=0.0, lt=0.5)
    # a text line whose centre is farther than this (fraction of width) from the middle is
    # not a subtitle
    centre_tolerance: float = Field(0.2, gt=0.0, le=0.5)
    min_score: float = Field(0.6, ge=0.0, le=1.0)  # recognition score to keep a box
    # re-run OCR when this fraction of some square cell of the band holds changed text-like
    # pixels (see band_change); lower is safer. Measured: subtitle changes 0.09-0.34 on the
    # real clips, unchanged subtitles 0.00-0.01
    change_threshold: float = Field(0.03, ge=0.0, le=1.0)
    # a band none of whose square cells holds this fraction of text-like pixels is blank: it
    # reads as no text without OCR (0 = OCR every changed band). Measured: blank bands
    # 0.000-0.025 on the synthetic clips (median 0.002); bands with a subtitle 0.11 and up there,
    # 0.016 and up on the real clips (a faint caption)
    blank_cover: float = Field(0.01, ge=0.0, le=1.0)
    merge_similarity: float = Field(0.7, ge=0.0, le=1.0)  # same cue if similarity >= this
    # cues shorter than this are dropped, but only when they look like OCR noise: a single
    # character read with a score below noise_score
    min_duration: float = Field(0.6, ge=0.0)
    noise_score: float = Field(0.9, ge=0.0, le=1.0)
    det_limit_side_len: int = Field(960, ge=32)  # detector input: longest side at most this
    lang: str = "ch"  # recognition language (rapidocr LangRec / paddleocr lang)
    # rapidocr: the runtime of the text detector (recognition runs on onnxruntime). The same
    # ONNX model; OpenVINO ran it 3.7x faster than onnxruntime on this project's CPU with the same
    # probability maps to 1e-7 (BENCHMARKS "Fourth session")
    det_engine: Literal["openvino", "onnxruntime"] = "openvino"
    # threads of the onnxruntime and OpenVINO sessions; 0 = the worker's thread budget when the
    # runner set one (several workers sharing the cores), else the runtimes' default (every core)
    threads: int = Field(0, ge=0)

    @field_validator("band")
    @classmethod
    def _check_band(cls, v: Any) -> Any:
        if v != "auto":
            top, bottom = v
            if not 0.0 <= top < bottom <= 1.0:
                raise ValueError(f"band must be 'auto' or [top, bottom] with 0 <= top < bottom <= 1, got {v}")
        return v


# --- plain data --------------------------------------------------------------------------------
@dataclass
class TextBox:
    """One recognised text box, axis-aligned, in frame pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    text: str
    score: float

    @property
    def cx(self) -> float:
        return (self.x1 + self.x2) / 2

    @property
    def cy(self) -> float:
        return (self.y1 + self.y2) / 2


@dataclass
class Line:
    """Boxes on one text row, left to right."""

    boxes: list[TextBox]

    @property
    def x1(self) -> float:
        return min(b.x1 for b in self.boxes)

    @property
    def x2(self) -> float:
        return max(b.x2 for b in self.boxes)

    @property
    def y1(self) -> float:
        return min(b.y1 for b in self.boxes)

    @property
    def y2(self) -> float:
        return max(b.y2 for b in self.boxes)

    @property
    def cx(self) -> float:
        return (self.x1 + self.x2) / 2

    @property
    def text(self) -> str:
        return " ".join(b.text.strip() for b in self.boxes if b.text.strip())

    @property
    def score(self) -> float:
        return min(b.score for b in self.boxes)


@dataclass
class Reading:
    """What one sampled frame says: text ('' = none), its score, whether OCR ran, and whether
    its band was judged blank without OCR."""

    time: float
    text: str
    score: float
    ocr: bool
    blank: bool = False


@dataclass
class OcrResult:
    """Cues of one clip plus the numbers that explain the cost (for logs and the bench)."""

    cues: list[Cue]
    band: tuple[int, int] | None  # pixel rows [top, bottom) OCR'd in every frame
    readings: list[Reading] = field(default_factory=list)
    n_frames: int = 0
    n_band_ocr: int = 0  # frames whose band went through the OCR engine
    n_probe_ocr: int = 0  # probe frames OCR'd below `search_from` to find the band (auto)
    n_blank: int = 0  # changed frames whose band held too few text-like pixels to OCR
    seconds: float = 0.0

    @property
    def skip_rate(self) -> float:
        """Fraction of frames whose band reused the last text instead of running OCR."""
        return 1.0 - self.n_band_ocr / self.n_frames if self.n_frames else 0.0

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / self.n_frames if self.n_frames else 0.0


# --- text helpers ------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Comparison form: NFKC (full-width → ASCII punctuation), case-folded, no whitespace."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (insert, delete, substitute) between two sequences — characters of
    strings here, words of transcripts in bench/asr.py — O(len(a)*len(b)) in two rows."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(a: str, b: str) -> float:
    """1 - normalized edit distance of the comparison forms; 1.0 for two empty strings."""
    na, nb = normalize_text(a), normalize_text(b)
    if not na and not nb:
        return 1.0
    return 1.0 - edit_distance(na, nb) / max(len(na), len(nb))


# --- geometry: lines, filters, band ---------------------------------------------------------------
def group_lines(boxes: list[TextBox]) -> list[Line]:
    """Group boxes into rows (vertical centre inside a row's extent), rows top to bottom,
    boxes left to right: the reading order of subtitles."""
    lines: list[Line] = []
    for box in sorted(boxes, key=lambda b: b.cy):
        for line in lines:
            if line.y1 <= box.cy <= line.y2 or box.y1 <= (line.y1 + line.y2) / 2 <= box.y2:
                line.boxes.append(box)
                break
        else:
            lines.append(Line([box]))
    for line in lines:
        line.boxes.sort(key=lambda b: b.x1)
    return sorted(lines, key=lambda ln: ln.y1)


def subtitle_lines(boxes: list[TextBox], width: int, cfg: OcrConfig) -> list[Line]:
    """Lines that can be subtitles: confident boxes, not tucked in a side strip, on a row
    whose centre is near the middle of the frame."""
    left, right = cfg.edge_margin * width, (1.0 - cfg.edge_margin) * width
    kept = [
        b for b in boxes
        if b.score >= cfg.min_score and _has_word_char(b.text) and left <= b.cx <= right
    ]
    return [
        ln for ln in group_lines(kept)
        if abs(ln.cx - width / 2) <= cfg.centre_tolerance * width
    ]


def _has_word_char(text: str) -> bool:
    """A subtitle has at least one letter or digit; a lone '.' or '|' is a texture read as text."""
    return any(unicodedata.category(c)[0] in "LN" for c in text)


def join_lines(lines: list[Line]) -> tuple[str, float]:
    """Cue text in reading order (rows joined by newline) and its weakest box score."""
    lines = [ln for ln in lines if ln.text]
    if not lines:
        return "", 0.0
    return "\n".join(ln.text for ln in lines), min(ln.score for ln in lines)


def _same_place(a: Line, b: Line) -> bool:
    overlap = min(a.y2, b.y2) - max(a.y1, b.y1)
    return overlap > 0.5 * min(a.y2 - a.y1, b.y2 - b.y1)


def static_lines(probes: list[list[Line]], min_probes: int = 3) -> list[Line]:
    """Lines with the same text at the same place in every probe (a logo, a channel name).

    Needs at least `min_probes` probes: with fewer, a subtitle can look static by chance.
    """
    if len(probes) < min_probes or not probes[0]:
        return []
    return [
        line for line in probes[0]
        if all(
            any(_same_place(line, other) and similarity(line.text, other.text) >= 0.9 for other in probe)
            for probe in probes[1:]
        )
    ]


def is_static(line: Line, statics: list[Line]) -> bool:
    return any(_same_place(line, s) and similarity(line.text, s.text) >= 0.9 for s in statics)


def choose_band(
    probes: list[list[Line]], statics: list[Line], height: int
) -> tuple[int, int] | None:
    """The pixel rows holding the recurring subtitle lines of the probes, with room for a
    wrapped line above.

    Static lines are ignored when anything else was found (a subtitle that stays on screen
    for the whole clip is kept). Rows seen in at least two probes win over one-off text.
    """
    candidates = [[ln for ln in p if not is_static(ln, statics)] for p in probes]
    if not any(candidates):
        candidates = probes
    flat = [(i, ln) for i, p in enumerate(candidates) for ln in p]
    if not flat:
        return None
    recurring = [
        ln for i, ln in flat if any(j != i and _same_place(ln, other) for j, other in flat)
    ]
    chosen = recurring or [ln for _, ln in flat]
    top, bottom = min(ln.y1 for ln in chosen), max(ln.y2 for ln in chosen)
    line = max(ln.y2 - ln.y1 for ln in chosen)
    # one line of room above (bottom-anchored subtitles grow upwards when they wrap), half a
    # line below
    return max(0, int(top - line)), min(height, int(np.ceil(bottom + 0.5 * line)))


def fixed_band(band: tuple[float, float], height: int) -> tuple[int, int]:
    top, bottom = band
    return int(top * height), max(int(top * height) + 1, int(round(bottom * height)))


# --- change detection --------------------------------------------------------------------------
_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
_CONTRAST = 60  # top-hat response (grey levels) of a glyph stroke against its surroundings
_PIXEL_DIFF = 40  # grey-level change that counts as a changed pixel


@dataclass
class BandSignature:
    """Grey band and its mask of text-like pixels (bright or dark thin strokes)."""

    gray: np.ndarray
    mask: np.ndarray


def band_signature(band: np.ndarray) -> BandSignature:
    gray = cv2.cvtColor(band, cv2.COLOR_RGB2GRAY)
    white = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, _KERNEL)
    black = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, _KERNEL)
    return BandSignature(gray, (white > _CONTRAST) | (black > _CONTRAST))


def _cells(h: int, w: int) -> list[tuple[int, int]]:
    """Column ranges of the square cells (side = band height) a band is cut into."""
    n = max(1, w // max(h, 1))
    edges = np.linspace(0, w, n + 1).astype(int)
    return [(int(x0), int(x1)) for x0, x1 in zip(edges[:-1], edges[1:]) if x1 > x0]


def band_change(a: BandSignature, b: BandSignature) -> float:
    """How much text-like content changed between two bands: the band is cut into square
    cells (side = band height) and the largest fraction of a cell's pixels that are
    text-like (in either band) and changed grey level is returned.

    Per cell, because a short subtitle appearing over a busy background (city lights) is a
    small, dense change: averaged over the band it drowns in the background's text-like
    pixels, but it fills a cell or two. Background motion mostly moves pixels that are not
    text-like, so it barely counts; at worst it costs an extra OCR call.
    """
    if a.gray.shape != b.gray.shape:
        return 1.0
    changed = (cv2.absdiff(a.gray, b.gray) > _PIXEL_DIFF) & (a.mask | b.mask)
    h, w = changed.shape
    if h == 0 or w == 0:
        return 0.0
    return max(float(changed[:, x0:x1].mean()) for x0, x1 in _cells(h, w))


def text_cover(sig: BandSignature) -> float:
    """The largest fraction of text-like pixels in one square cell of the band: near 0 for a
    band without glyphs, whatever moves behind it (the same cells as band_change)."""
    h, w = sig.mask.shape
    if h == 0 or w == 0:
        return 0.0
    return max(float(sig.mask[:, x0:x1].mean()) for x0, x1 in _cells(h, w))


# --- merging readings into cues ------------------------------------------------------------------
@dataclass
class _Run:
    start: int
    texts: Counter = field(default_factory=Counter)
    scores: dict[str, list[float]] = field(default_factory=dict)

    def add(self, text: str, score: float) -> None:
        self.texts[text] += 1
        self.scores.setdefault(text, []).append(score)

    def best(self) -> tuple[str, float]:
        """Most frequent variant; ties broken by the highest mean score."""
        text = max(self.texts, key=lambda t: (self.texts[t], float(np.mean(self.scores[t]))))
        return text, float(np.mean(self.scores[text]))


def frame_step(times: list[float], fallback_fps: float | None = None) -> float:
    """How long one sampled frame stands for: 1 / fps, else the median spacing."""
    if fallback_fps and fallback_fps > 0:
        return 1.0 / fallback_fps
    if len(times) >= 2:
        return float(np.median(np.diff(times)))
    return 0.5


def merge_readings(
    readings: list[Reading], step: float, duration: float | None, cfg: OcrConfig
) -> list[Cue]:
    """Consecutive similar readings become one cue: start = its first frame time, end = the
    time of the next different frame (the last frame stands for `step` seconds)."""
    cues: list[Cue] = []
    run: _Run | None = None

    def close(end_index: int) -> None:
        assert run is not None
        start = readings[run.start].time
        if end_index < len(readings):
            end = readings[end_index].time
        else:
            end = readings[-1].time + step
            if duration and duration > start:
                end = min(end, duration)
        text, score = run.best()
        is_noise = len(normalize_text(text)) <= 1 and score < cfg.noise_score
        if end > start and not (end - start < cfg.min_duration and is_noise):
            cues.append(Cue(start=round(start, 3), end=round(end, 3), text=text))

    for i, r in enumerate(readings):
        if run is not None and r.text and similarity(r.text, run.best()[0]) >= cfg.merge_similarity:
            run.add(r.text, r.score)
            continue
        if run is not None:
            close(i)
            run = None
        if r.text:
            run = _Run(start=i)
            run.add(r.text, r.score)
    if run is not None:
        close(len(readings))
    return cues


def compose_srt(cues: list[Cue]) -> str:
    """SRT text of the cues (`srt` library); '' for no cues."""
    if not cues:
        return ""
    subs = [
        srt.Subtitle(
            index=i,
            start=timedelta(seconds=c.start),
            end=timedelta(seconds=c.end),
            content=c.text,
        )
        for i, c in enumerate(cues, start=1)
    ]
    return srt.compose(subs, reindex=False)


# --- the stage ---------------------------------------------------------------------------------
class SubtitleOcr(Stage):
    """Shared pipeline (band → change detection → OCR → merge); backends supply `_read`."""

    name = "ocr"
    version = "1"
    Config = OcrConfig
    last_result: OcrResult | None = None  # the last clip's numbers (band, skips, seconds)

    def _read(self, image: np.ndarray) -> list[TextBox]:
        """All text boxes of an RGB image (coordinates in that image)."""
        raise NotImplementedError

    def _read_coarse(self, image: np.ndarray, scale: float) -> list[TextBox]:
        """Like _read, with text detection at `scale` of the image's longest side where the
        backend can (recognition still reads the full-resolution boxes); by default a plain
        _read."""
        return self._read(image)

    @property
    def cfg(self) -> OcrConfig:
        return self.config  # type: ignore[return-value]

    def process_one(self, ctx: ClipContext) -> None:
        media = ctx.media
        if media is None or not media.has_video:
            ctx.cues, ctx.srt = None, None
            ctx.status["ocr"] = "no video"
            return
        fps = media.info.get("effective_fps") if media.info else None
        result = self.read_subtitles(media.frames, media.frame_times, media.duration or None, fps)
        self.last_result = result
        ctx.cues = result.cues
        ctx.srt = compose_srt(result.cues)
        ctx.status["ocr"] = (
            f"{len(result.cues)} cues" if result.cues else "no subtitles"
        )

    def read_subtitles(
        self,
        frames: list[np.ndarray],
        times: list[float],
        duration: float | None = None,
        fps: float | None = None,
    ) -> OcrResult:
        """Cues of one clip's sampled frames (RGB uint8, all the same size)."""
        self.ensure_loaded()
        t0 = time.perf_counter()
        order = sorted(range(len(frames)), key=lambda i: times[i])
        frames = [frames[i] for i in order]
        times = [float(times[i]) for i in order]
        result = OcrResult(cues=[], band=None, n_frames=len(frames))
        if not frames:
            return result
        height, width = frames[0].shape[:2]
        probe_lines: dict[int, list[Line]] = {}
        statics: list[Line] = []
        if self.cfg.band == "auto":
            probe_lines = self._probe(frames, width)
            band, statics = self._auto_band(probe_lines, height)
            result.n_probe_ocr = len(probe_lines)
        else:
            band = fixed_band(self.cfg.band, height)
        result.band = band
        result.readings = self._read_frames(frames, times, band, width, statics)
        result.n_band_ocr = sum(1 for r in result.readings if r.ocr)
        result.n_blank = sum(1 for r in result.readings if r.blank)
        result.cues = merge_readings(result.readings, frame_step(times, fps), duration, self.cfg)
        result.seconds = time.perf_counter() - t0
        return result

    def _auto_band(
        self, probe_lines: dict[int, list[Line]], height: int
    ) -> tuple[tuple[int, int], list[Line]]:
        """The band from the probes, and the static lines (logos) to drop from readings."""
        probes = list(probe_lines.values())
        statics = static_lines(probes)
        band = choose_band(probes, statics, height)
        if band is None:  # nothing in the probes: watch the whole search region
            band = (int(self.cfg.search_from * height), height)
        if all(is_static(ln, statics) for p in probes for ln in p):
            statics = []  # the only centred text all along: a subtitle, not a logo
        return band, statics

    def _probe(self, frames: list[np.ndarray], width: int) -> dict[int, list[Line]]:
        """Subtitle-like lines of a few evenly spaced frames, searched below `search_from`."""
        # a short clip gets fewer probes (they cost a bigger crop than the band), but at least
        # three so that a static logo can be told from a subtitle
        n = min(self.cfg.probe_frames, len(frames), max(3, -(-len(frames) // 4)))
        idx = sorted({int(round(x)) for x in np.linspace(0, len(frames) - 1, n)})
        top = int(self.cfg.search_from * frames[0].shape[0])
        out = {}
        for i in idx:
            boxes = [_shift(b, top) for b in self._read_coarse(frames[i][top:], self.cfg.probe_scale)]
            out[i] = subtitle_lines(boxes, width, self.cfg)
        return out

    def _read_frames(
        self,
        frames: list[np.ndarray],
        times: list[float],
        band: tuple[int, int],
        width: int,
        statics: list[Line],
    ) -> list[Reading]:
        """One reading per frame; OCR runs only where the band changed since the last OCR and
        holds some text-like pixels (a blank band reads as no text: `blank_cover`).

        Probe frames are read again on the band crop: the detector does not always agree
        between a crop and a larger one (a short "Yes?" found in one, missed in the other),
        and a skipped frame must inherit a reading of the very crop it was compared on.
        """
        top, bottom = band
        readings: list[Reading] = []
        last_sig: BandSignature | None = None
        last: tuple[str, float] = ("", 0.0)
        for frame, t in zip(frames, times):
            crop = frame[top:bottom]
            sig = band_signature(crop)
            if last_sig is not None and band_change(sig, last_sig) < self.cfg.change_threshold:
                readings.append(Reading(t, last[0], last[1], ocr=False))
                continue
            if text_cover(sig) < self.cfg.blank_cover:
                last, last_sig = ("", 0.0), sig
                readings.append(Reading(t, "", 0.0, ocr=False, blank=True))
                continue
            boxes = [_shift(b, top) for b in self._read(crop)]
            lines = [ln for ln in subtitle_lines(boxes, width, self.cfg) if not is_static(ln, statics)]
            last, last_sig = join_lines(lines), sig
            readings.append(Reading(t, last[0], last[1], ocr=True))
        return readings


def _shift(box: TextBox, dy: float) -> TextBox:
    return TextBox(box.x1, box.y1 + dy, box.x2, box.y2 + dy, box.text, box.score)


def _boxes_from(polys: Any, texts: Any, scores: Any) -> list[TextBox]:
    """Axis-aligned TextBoxes from an engine's quadrilaterals, texts and scores."""
    out = []
    for poly, text, score in zip(polys, texts, scores):
        p = np.asarray(poly, dtype=np.float32).reshape(-1, 2)
        out.append(TextBox(float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()),
                           float(p[:, 1].max()), str(text), float(score)))
    return out


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


@register
class RapidOcr(SubtitleOcr):
    """PP-OCR det + rec through rapidocr/onnxruntime; the models ship inside the wheel."""

    backend = "rapidocr"

    def _model_files(self) -> dict[str, dict[str, str]]:
        """det/rec model file names, SHA-256 and local paths as rapidocr resolves them."""
        import rapidocr
        from rapidocr.inference_engine.base import FileInfo, InferSession
        from rapidocr.utils.typings import EngineType, LangDet, ModelType, OCRVersion, TaskType

        root = Path(rapidocr.__file__).parent / "models"
        rec_version, rec_type = _rec_model(self.cfg.lang)
        out = {}
        for task, lang, version, mtype in (
            ("det", LangDet.CH, OCRVersion.PPOCRV6, ModelType.SMALL),
            ("rec", _rec_lang(self.cfg.lang), rec_version, rec_type),
        ):
            info = InferSession.get_model_url(FileInfo(
                engine_type=EngineType.ONNXRUNTIME, ocr_version=version, task_type=TaskType(task),
                lang_type=lang, model_type=mtype,
            ))
            name = Path(str(info["model_dir"])).name
            out[task] = {"file": name, "sha256": str(info["SHA256"]), "path": str(root / name),
                         "url": str(info["model_dir"])}
        return out

    def _params(self) -> dict[str, Any]:
        from rapidocr.utils.typings import ModelType, OCRVersion

        rec_version, rec_type = _rec_model(self.cfg.lang)
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.use_cls": False,  # subtitles are never upside down
            # rapidocr pads images wider than 8:1 to a 240-px-high letterbox before detection;
            # a subtitle band is such an image, and the padding costs 1.5-4x CPU per call for
            # the same text on the real clips
            "Global.use_vertical_padding": False,
            "Det.limit_type": "max",  # never upscale a short wide band to a 736-px min side
            "Det.limit_side_len": self.cfg.det_limit_side_len,
            "Det.ocr_version": OCRVersion.PPOCRV6,
            "Det.model_type": ModelType.SMALL,
            "Rec.ocr_version": rec_version,
            "Rec.model_type": rec_type,
            "Rec.lang_type": _rec_lang(self.cfg.lang),
        }
        threads = self.cfg.threads or worker_threads()  # 0: onnxruntime's default, every core
        if threads:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        if self.cfg.det_engine == "openvino":
            from rapidocr.utils.typings import EngineType

            params |= {
                "Det.engine_type": EngineType.OPENVINO,
                # the wheel's ONNX file itself (load checked it is there): never a download
                "Det.model_path": self._model_files()["det"]["path"],
                "EngineConfig.openvino.performance_hint": "LATENCY",  # one request at a time
                "EngineConfig.openvino.num_streams": 1,
                # OpenVINO pins its threads to cores by default: two worker processes would each
                # pin theirs to the same core and take turns on it
                "EngineConfig.openvino.enable_cpu_pinning": False,
            }
            if threads:
                params["EngineConfig.openvino.inference_num_threads"] = threads
        return params

    def load(self) -> None:
        """Check the model files first: rapidocr would otherwise try to download them."""
        from rapidocr import RapidOCR

        if self.cfg.det_engine == "openvino":
            try:
                _import_openvino()
            except ImportError:
                raise ModelMissingError(
                    "ocr.det_engine 'openvino' needs the openvino package (pip install openvino), "
                    "or use ocr.det_engine 'onnxruntime'"
                ) from None
        for task, f in self._model_files().items():
            if not Path(f["path"]).is_file():
                raise ModelMissingError(
                    f"rapidocr {task} model {f['file']} (ocr.lang '{self.cfg.lang}') is not at "
                    f"{f['path']}: download {f['url']} (sha256 {f['sha256'][:12]}...) to that path, "
                    "or use ocr.lang 'ch' (Chinese/English/Japanese/Latin, shipped in the wheel)"
                )
        self.engine = RapidOCR(params=self._params())
        # one detection and one recognition on blank images: a session's first run sets up its
        # buffers (about 0.2 s here), which start-up pays instead of the first clip's OCR time.
        # rapidocr keeps use_det / use_rec from call to call, so the detection call comes last
        # and sets both back, and _read names them on every call.
        blank = np.zeros((64, 320, 3), dtype=np.uint8)
        self.engine(blank[:48], use_det=False, use_cls=False, use_rec=True)
        self.engine(blank, use_det=True, use_cls=False, use_rec=True)

    def models(self) -> list[dict[str, str]]:
        files = self._model_files()
        engine = self.cfg.det_engine
        return [{"id": "rapidocr", "revision": _version("rapidocr")}] + [
            {"id": f"rapidocr/{task}/{f['file']}", "revision": f"sha256:{f['sha256']}"}
            for task, f in files.items()
        ] + [{"id": f"rapidocr/det-runtime/{engine}", "revision": _version(engine)}]

    def _read_coarse(self, image: np.ndarray, scale: float) -> list[TextBox]:
        """The detector's side limit lowered for this call: rapidocr's TextDetector reads
        `limit_side_len` on every call and maps its boxes back onto the full image."""
        side = max(32, int(round(scale * max(image.shape[:2]))))
        det = self.engine._load_det_model()
        if scale >= 1.0 or side >= det.limit_side_len:
            return self._read(image)
        full = det.limit_side_len
        det.limit_side_len = side
        try:
            return self._read(image)
        finally:
            det.limit_side_len = full

    def _read(self, image: np.ndarray) -> list[TextBox]:
        # rapidocr treats ndarrays as BGR (OpenCV order); our frames are RGB
        out = self.engine(np.ascontiguousarray(image[:, :, ::-1]), use_det=True, use_cls=False,
                          use_rec=True, text_score=0.0)
        if getattr(out, "txts", None) is None or getattr(out, "boxes", None) is None:
            return []
        return _boxes_from(out.boxes, out.txts, out.scores)


def _import_openvino() -> None:
    """Import openvino without its usage telemetry.

    `import openvino` also imports its model converter, which sends a usage event to Google
    Analytics and writes a client id under $HOME unless the user opted out. It sends the event
    from a freshly spawned Python process, about 1 s of CPU in every extract worker. A batch
    job on a shared cluster should do none of that. While openvino is imported, its telemetry
    module is made unimportable, and the converter falls back to openvino's own no-op stub (its
    path for an install without the telemetry package). Afterwards the block is lifted.
    """
    if sys.modules.get("openvino") is not None:  # already imported (None: made unimportable)
        return
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    try:
        import openvino  # noqa: F401
    finally:
        if blocked:
            del sys.modules["openvino_telemetry"]


def _rec_model(lang: str) -> tuple[Any, Any]:
    """(OCR version, model type) of the recognizer for `lang`: PP-OCRv6 small (in the wheel;
    Chinese, English, Japanese, Latin scripts), else the PP-OCRv5 mobile model of that script
    (Cyrillic, Korean, Arabic...), which rapidocr would download (see load)."""
    from rapidocr.utils.model_resolver import route_to_model_key
    from rapidocr.utils.typings import ModelType, OCRVersion, TaskType

    rec_lang = _rec_lang(lang)
    for version, mtype in ((OCRVersion.PPOCRV6, ModelType.SMALL), (OCRVersion.PPOCRV5, ModelType.MOBILE)):
        try:
            if route_to_model_key(TaskType.REC, version, rec_lang, mtype):
                return version, mtype
        except ValueError:
            continue
    raise ValueError(f"ocr.lang '{lang}': rapidocr has no PP-OCRv6/v5 recognizer for it")


def _rec_lang(lang: str) -> Any:
    from rapidocr.utils.typings import LangRec

    try:
        return LangRec(lang)
    except ValueError:
        known = ", ".join(x.value for x in LangRec)
        raise ValueError(f"ocr.lang '{lang}' is not a rapidocr recognition language ({known})") from None


@register
class PaddleOcr(SubtitleOcr):
    """PaddleOCR 3.x pipeline (optional: ~1.4 GB with paddlepaddle; downloads its models)."""

    backend = "paddleocr"

    def load(self) -> None:
        try:
            from paddleocr import PaddleOCR
        except ImportError:
            raise ModelMissingError(
                "ocr backend 'paddleocr' needs the paddleocr package: "
                "pip install paddleocr paddlepaddle (about 1.4 GB, downloads models on first use), "
                "or use backend 'rapidocr'"
            ) from None
        self.engine = PaddleOCR(
            lang=self.cfg.lang,
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=False,
            text_det_limit_type="max",
            text_det_limit_side_len=self.cfg.det_limit_side_len,
        )

    def models(self) -> list[dict[str, str]]:
        return [
            {"id": "paddleocr", "revision": _version("paddleocr")},
            {"id": f"paddleocr/lang/{self.cfg.lang}", "revision": _version("paddlepaddle")},
        ]

    def _read(self, image: np.ndarray) -> list[TextBox]:
        boxes: list[TextBox] = []
        for res in self.engine.predict(np.ascontiguousarray(image[:, :, ::-1])):
            boxes += _boxes_from(res["rec_polys"], res["rec_texts"], res["rec_scores"])
        return boxes
