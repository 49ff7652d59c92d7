"""Faces stage: detect faces in the sampled frames, track them, keep the main track, align.

Backend `mtcnn` (offline and full presets): facenet-pytorch's MTCNN (P/R/O-net weights ship
in its wheel) detects boxes, 5 landmarks and a score per frame, batched across frames and
clips. A small tracker links detections over the sampled frames (which are ~0.5 s apart, so
boxes can move a lot between frames): association by IoU *or* by nearby position plus
appearance, tolerating a few missed frames; tracks broken by a longer miss are re-linked when
their appearance matches. The main track is the most present one, then the largest. Its
faces are aligned to a canonical 5-point template by a similarity transform, which is what
the visual stage embeds.

A clip without any face is not an error: `ctx.face = None`, `status['faces'] = 'no face'`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from pipeline.stages.base import (
    ClipContext,
    ClipError,
    FaceTrack,
    Stage,
    StageConfig,
    register,
)
from pipeline.torch_nms import import_facenet

# The usual 5-point alignment template (eyes, nose tip, mouth corners) for a 112x112 crop,
# in the order MTCNN returns landmarks: left eye, right eye, nose, left mouth, right mouth.
TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
_HIST_BINS = (8, 8)  # hue x saturation bins of the appearance histogram
_THUMB = 16  # side of the grey thumbnail of the aligned crop used for appearance


class FacesConfig(StageConfig):
    """MTCNN detection, tracking and alignment settings (all recorded in provenance)."""

    # smallest face: where MTCNN's image pyramid starts, the larger of min_face_size pixels and
    # min_face_frac of the detection image's longer side. The largest pyramid levels are most of
    # the detector's cost; 0.05 of a 640-px side is 32 px, 48 px of a 960-px decoded frame (the
    # expression model's input size). On the 144 sampled frames of the six real videos
    # (BENCHMARKS.md, seventh session) it found faces in 71 frames instead of 72, the same 82
    # detections down to 25 px wide, in half the time (5.3 -> 2.8 s). Frames of at most 400 px
    # (the demo's 320x240) keep the 20-px start: there a coarser pyramid moved the landmarks by
    # 2 px and the demo's fit lost 3 of 64 clips.
    min_face_size: int = Field(20, ge=8, description="smallest face, pixels of the detection image")
    min_face_frac: float = Field(0.05, ge=0, lt=1, description="smallest face, share of the longer side")
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = Field(0.709, gt=0.1, lt=0.95, description="image pyramid scale step")
    min_score: float = Field(0.9, ge=0, le=1, description="drop weaker final detections")
    detect_max_side: int = Field(
        640, ge=64, description="frames are downscaled to this for detection (speed)"
    )
    device: str | None = None  # None: the device the runner gives the stage
    batch_size: int = Field(16, ge=1, description="frames per detector call (across clips)")
    crop_size: Literal[112, 160] = 112
    margin: int = Field(0, ge=0, le=64, description="pixels of context around the template")
    fast_resample: bool = True  # cv2 INTER_AREA instead of torch 'area' interpolate on CPU
    # tracking
    max_gap: int = Field(2, ge=0, description="missed sampled frames a track survives")
    min_iou: float = Field(0.2, ge=0, le=1)
    max_shift: float = Field(1.0, gt=0, description="centre shift allowed, in face sizes")
    min_appearance: float = Field(0.5, ge=-1, le=1)
    relink_appearance: float = Field(0.75, ge=-1, le=1, description="re-join broken tracks")
    split_at_cuts: bool = True  # across a shot cut only appearance links faces, not position
    presence_ratio: float = Field(
        0.8, gt=0, le=1, description="tracks this close to the most present one compete on size"
    )


@dataclass
class Detection:
    """One face in one frame, with its aligned crop and an appearance descriptor."""

    box: np.ndarray  # [4] x1, y1, x2, y2
    landmarks: np.ndarray  # [5, 2]
    score: float
    crop: np.ndarray  # aligned RGB uint8 [S, S, 3]
    appearance: np.ndarray  # unit-norm vector

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))

    @property
    def centre(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])


@dataclass
class Track:
    """Detections of one face over the sampled frames: frame index -> detection."""

    dets: dict[int, Detection] = field(default_factory=dict)

    @property
    def first(self) -> int:
        return min(self.dets)

    @property
    def last(self) -> int:
        return max(self.dets)

    @property
    def presence(self) -> int:
        return len(self.dets)

    def last_det(self) -> Detection:
        return self.dets[self.last]

    def median_area(self) -> float:
        return float(np.median([d.area for d in self.dets.values()]))

    def appearance(self) -> np.ndarray:
        """Mean appearance of the track (unit norm), robust to one odd frame."""
        return _unit(np.mean([d.appearance for d in self.dets.values()], axis=0))


# --- alignment and appearance ----------------------------------------------------------------
def face_template(size: int, margin: int = 0) -> np.ndarray:
    """The 5-point template scaled to a `size` crop with `margin` pixels of context (the face
    occupies size - margin pixels, centred, as facenet-pytorch's margin means)."""
    return TEMPLATE_112 / 112.0 * (size - margin) + margin / 2.0


def align_face(frame: np.ndarray, landmarks: np.ndarray, size: int, margin: int = 0) -> np.ndarray:
    """Warp the face so its 5 landmarks land on the template (rotation, uniform scale and
    translation only: a similarity keeps the face's proportions, which carry expression)."""
    dst = face_template(size, margin)
    m, _ = cv2.estimateAffinePartial2D(
        landmarks.astype(np.float32), dst, method=cv2.LMEDS
    )
    if m is None or not np.all(np.isfinite(m)):
        m = _box_transform(landmarks, dst)
    return cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _box_transform(landmarks: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Scale + shift fallback when the landmarks are degenerate (all on a line)."""
    src_c, dst_c = landmarks.mean(axis=0), dst.mean(axis=0)
    src_s = max(float(np.ptp(landmarks[:, 0])), float(np.ptp(landmarks[:, 1])), 1.0)
    s = float(np.ptp(dst[:, 0])) / src_s
    return np.array([[s, 0, dst_c[0] - s * src_c[0]], [0, s, dst_c[1] - s * src_c[1]]], np.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > 0 else v.astype(np.float32)


def appearance_vector(crop: np.ndarray) -> np.ndarray:
    """Cheap appearance of an aligned crop: hue/saturation histogram (colour: skin, hair,
    clothes at the margin) + a zero-mean grey thumbnail (coarse layout), each unit-norm, so
    their dot products average the two cosine similarities."""
    hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, list(_HIST_BINS), [0, 180, 0, 256]).ravel()
    grey = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (_THUMB, _THUMB), interpolation=cv2.INTER_AREA)
    thumb = grey.astype(np.float32).ravel()
    thumb -= thumb.mean()
    return np.concatenate([_unit(np.sqrt(hist)), _unit(thumb)]) / np.sqrt(2.0)


# --- tracking --------------------------------------------------------------------------------
def box_iou_np(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes (x1, y1, x2, y2)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def frame_signature(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour histogram (HSV 8x4x4, sums to 1) and zero-mean unit-norm grey layout (32x18)."""
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
    grey = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (32, 18), interpolation=cv2.INTER_AREA)
    layout = grey.astype(np.float32).ravel()
    layout -= layout.mean()
    return hist / max(float(hist.sum()), 1.0), _unit(layout)


def shot_cuts(frames: list[np.ndarray]) -> list[bool]:
    """Per sampled frame: is there a shot cut since the previous one? Both colours and layout
    must change (camera motion changes layout, lighting changes colour), or one of them
    entirely. Checked on the real clips: cuts score (0.83, 0.54), motion (0.89, 0.64)."""
    sigs = [frame_signature(f) for f in frames]
    cuts = [False]
    for (h0, l0), (h1, l1) in zip(sigs, sigs[1:]):
        colour, layout = float(np.minimum(h0, h1).sum()), float(np.dot(l0, l1))
        cuts.append((colour < 0.9 and layout < 0.6) or colour < 0.5 or layout < 0.3)
    return cuts


def affinity(track: Track, det: Detection, cfg: FacesConfig, cut: bool = False) -> float | None:
    """How well a detection continues a track, or None when it cannot (gated out).

    At 2 frames/s a face may move more than its width between samples, so IoU alone loses it:
    a detection also continues a track when it is within `max_shift` face sizes, of similar
    size and looks alike. Across a shot cut position means nothing (the next shot may show
    someone else in the same place): only a strong appearance match links."""
    last = track.last_det()
    iou = box_iou_np(last.box, det.box)
    app = float(np.dot(track.appearance(), det.appearance))
    if cut:
        return app if app >= cfg.relink_appearance else None
    scale = max(np.sqrt(last.area), np.sqrt(det.area), 1.0)
    shift = float(np.linalg.norm(last.centre - det.centre)) / scale
    ratio = np.sqrt(max(det.area, 1.0) / max(last.area, 1.0))
    near = shift <= cfg.max_shift and 0.5 <= ratio <= 2.0 and app >= cfg.min_appearance
    if iou < cfg.min_iou and not near:
        return None
    return 0.5 * iou + 0.5 * app + 0.25 * max(0.0, 1.0 - shift / cfg.max_shift)


def track_faces(
    frames_dets: list[list[Detection]], cfg: FacesConfig, cuts: list[bool] | None = None
) -> list[Track]:
    """Link per-frame detections into tracks (Hungarian matching on the affinity); `cuts[t]`
    marks a shot cut between sampled frames t-1 and t."""
    tracks: list[Track] = []
    cut_seen = np.cumsum([bool(c) for c in (cuts or [False] * len(frames_dets))])
    for t, dets in enumerate(frames_dets):
        active = [k for k, tr in enumerate(tracks) if t - tr.last <= cfg.max_gap + 1]
        matched: set[int] = set()
        if active and dets:
            cost = np.full((len(active), len(dets)), 1e6)
            for i, k in enumerate(active):
                for j, d in enumerate(dets):
                    cut = bool(cut_seen[t] != cut_seen[tracks[k].last])
                    a = affinity(tracks[k], d, cfg, cut)
                    if a is not None:
                        cost[i, j] = -a
            rows, cols = linear_sum_assignment(cost)
            for i, j in zip(rows, cols):
                if cost[i, j] < 1e5:
                    tracks[active[i]].dets[t] = dets[j]
                    matched.add(j)
        tracks.extend(Track({t: d}) for j, d in enumerate(dets) if j not in matched)
    return relink_tracks(tracks, cfg)


def relink_tracks(tracks: list[Track], cfg: FacesConfig) -> list[Track]:
    """Join tracks that do not overlap in time and look like the same face (a face lost for
    longer than `max_gap`, e.g. turned away, then found again)."""
    tracks = sorted(tracks, key=lambda tr: tr.first)
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(tracks):
            for j in range(i + 1, len(tracks)):
                b = tracks[j]
                if b.first <= a.last:
                    continue
                ratio = np.sqrt(b.median_area() / max(a.median_area(), 1.0))
                same = float(np.dot(a.appearance(), b.appearance())) >= cfg.relink_appearance
                if same and 0.5 <= ratio <= 2.0:
                    a.dets.update(b.dets)
                    del tracks[j]
                    merged = True
                    break
            if merged:
                break
    return tracks


def choose_main_track(tracks: list[Track], presence_ratio: float = 0.8) -> Track | None:
    """The most present track; tracks nearly as present compete on (median) size, so a
    briefly missed close-up beats a small face in the background seen one frame more."""
    if not tracks:
        return None
    most = max(tr.presence for tr in tracks)
    contenders = [tr for tr in tracks if tr.presence >= presence_ratio * most]
    return max(contenders, key=lambda tr: (tr.median_area(), tr.presence))


def to_face_track(main: Track, n_frames: int, n_tracks: int) -> FaceTrack:
    """Per sampled frame: the main track's box/landmarks/crop/score, or None where absent."""
    boxes: list[np.ndarray | None] = []
    lms: list[np.ndarray | None] = []
    crops: list[np.ndarray | None] = []
    scores: list[float | None] = []
    for t in range(n_frames):
        d = main.dets.get(t)
        boxes.append(None if d is None else d.box.astype(np.float32))
        lms.append(None if d is None else d.landmarks.astype(np.float32))
        crops.append(None if d is None else d.crop)
        scores.append(None if d is None else float(d.score))
    return FaceTrack(
        boxes=boxes,
        landmarks=lms,
        crops=crops,
        scores=scores,
        n_tracks=n_tracks,
        coverage=main.presence / max(n_frames, 1),
    )


# --- detector --------------------------------------------------------------------------------
class _Cv2AreaResample:
    """Drop-in for facenet's `imresample` (torch 'area' interpolate) on CPU.

    torch's 'area' mode is adaptive average pooling, which is slow for non-integer ratios:
    it took ~70% of MTCNN's CPU time here (thousands of 24/48-pixel candidate crops).
    cv2's INTER_AREA computes the same kind of box average in microseconds. The image pyramid
    resamples the same batch tensor once per scale, so its HWC copy is kept between calls.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._hwc: np.ndarray | None = None

    def __call__(self, img: torch.Tensor, sz: tuple[int, int]) -> torch.Tensor:
        if img.device.type != "cpu":
            return torch.nn.functional.interpolate(img, size=sz, mode="area")
        key = (img.data_ptr(), tuple(img.shape), tuple(img.stride()), img.dtype)
        if key == self._key and self._hwc is not None:
            arr = self._hwc
        else:
            arr = img.permute(0, 2, 3, 1).contiguous().numpy()
            if img.numel() > 1_000_000:  # only the whole-frame batch is worth keeping
                self._key, self._hwc = key, arr
        size = (int(sz[1]), int(sz[0]))
        out = [cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in arr]
        res = np.stack([o if o.ndim == 3 else o[:, :, None] for o in out])
        return torch.from_numpy(res).permute(0, 3, 1, 2).to(img.dtype)

    def clear(self) -> None:
        self._key, self._hwc = None, None


class MtcnnDetector:
    """facenet-pytorch MTCNN over lists of RGB frames, batched by frame size."""

    def __init__(self, cfg: FacesConfig, device: str = "cpu"):
        facenet = import_facenet()
        self.cfg = cfg
        self.device = torch.device(cfg.device or device)
        self.net = facenet.MTCNN(
            min_face_size=cfg.min_face_size,
            thresholds=list(cfg.thresholds),
            factor=cfg.factor,
            keep_all=True,
            device=self.device,
        ).eval()
        self._detect_face = facenet.models.mtcnn.detect_face
        self._df_module = facenet.models.utils.detect_face

    def detect(self, frames: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per frame: boxes [n, 4], scores [n], landmarks [n, 5, 2] (n may be 0).

        Frames of one size are stacked into batches of `batch_size` (MTCNN needs equal
        sizes); results come back in input order."""
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(frames)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(frames):
            by_shape.setdefault(f.shape, []).append(i)
        for idx in by_shape.values():
            for s in range(0, len(idx), self.cfg.batch_size):
                chunk = idx[s : s + self.cfg.batch_size]
                for i, res in zip(chunk, self._detect_batch([frames[i] for i in chunk])):
                    out[i] = res
        return out  # type: ignore[return-value]

    def _detect_batch(self, frames: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        h, w = frames[0].shape[:2]
        scale = min(1.0, self.cfg.detect_max_side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
            sx, sy = w / size[0], h / size[1]
        else:
            sx = sy = 1.0
        side = max(frames[0].shape[:2])
        min_face = max(self.cfg.min_face_size, round(self.cfg.min_face_frac * side))
        boxes, points = self._run_mtcnn(np.ascontiguousarray(np.stack(frames)), min_face)
        results = []
        for b, p in zip(boxes, points):
            b = np.asarray(b, dtype=np.float32).reshape(-1, 5)
            p = np.asarray(p, dtype=np.float32).reshape(-1, 5, 2)
            box = b[:, :4] * np.array([sx, sy, sx, sy], np.float32)
            results.append((box, b[:, 4], p * np.array([sx, sy], np.float32)))
        return results

    def _run_mtcnn(self, batch: np.ndarray, min_face: int) -> tuple[np.ndarray, np.ndarray]:
        """facenet's `detect_face` on a [B, H, W, 3] batch, with the fast resampler swapped
        into its module for the duration of the call (facenet reads it as a global)."""
        original = self._df_module.imresample
        resample = _Cv2AreaResample()
        if self.cfg.fast_resample:
            self._df_module.imresample = resample
        try:
            with torch.inference_mode():
                return self._detect_face(
                    batch,
                    min_face,
                    self.net.pnet,
                    self.net.rnet,
                    self.net.onet,
                    list(self.cfg.thresholds),
                    self.cfg.factor,
                    self.device,
                )
        finally:
            self._df_module.imresample = original
            resample.clear()


def frame_detections(
    frame: np.ndarray, raw: tuple[np.ndarray, np.ndarray, np.ndarray], cfg: FacesConfig
) -> list[Detection]:
    """Turn one frame's raw MTCNN output into aligned, described detections."""
    boxes, scores, points = raw
    h, w = frame.shape[:2]
    dets = []
    for box, score, lm in zip(boxes, scores, points):
        if score < cfg.min_score or not (np.all(np.isfinite(box)) and np.all(np.isfinite(lm))):
            continue
        box = np.clip(box, [0, 0, 0, 0], [w, h, w, h])
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        crop = align_face(frame, lm, cfg.crop_size, cfg.margin)
        dets.append(Detection(box, lm, float(score), crop, appearance_vector(crop)))
    return dets


@register
class MtcnnFaces(Stage):
    """Detect (MTCNN), track, choose the main face and align it; see the module docstring."""

    name = "faces"
    backend = "mtcnn"
    version = "1"
    Config = FacesConfig

    config: FacesConfig

    def load(self) -> None:
        self.detector = MtcnnDetector(self.config, self.device)

    def models(self) -> list[dict[str, str]]:
        import importlib.metadata as md

        return [{"id": "facenet-pytorch/mtcnn", "revision": md.version("facenet-pytorch")}]

    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        """Detect on every sampled frame of every clip in one pass, then track per clip."""
        self.ensure_loaded()
        errors: list[BaseException | None] = [None] * len(batch)
        todo = [k for k, ctx in enumerate(batch) if self._has_video(ctx)]
        frames = [f for k in todo for f in batch[k].media.frames]  # type: ignore[union-attr]
        try:
            raw = self.detector.detect(frames)
        except Exception:  # noqa: BLE001 - retry clip by clip so one bad clip fails alone
            return [self._safe(self.process_one, ctx) for ctx in batch]
        pos = 0
        for k in todo:
            n = len(batch[k].media.frames)  # type: ignore[union-attr]
            errors[k] = self._safe(lambda c, r=raw[pos : pos + n]: self._finish(c, r), batch[k])
            pos += n
        return errors

    def process_one(self, ctx: ClipContext) -> None:
        self.ensure_loaded()
        if self._has_video(ctx):
            self._finish(ctx, self.detector.detect(ctx.media.frames))  # type: ignore[union-attr]

    @staticmethod
    def _safe(fn, ctx: ClipContext) -> BaseException | None:  # noqa: ANN001
        try:
            fn(ctx)
            return None
        except Exception as e:  # noqa: BLE001 - per-clip isolation
            return e

    @staticmethod
    def _has_video(ctx: ClipContext) -> bool:
        """Sets status 'no video' (and no face) for clips without frames."""
        if ctx.media is None or not ctx.media.has_video:
            ctx.face = None
            ctx.status["faces"] = "no video"
            return False
        return True

    def _finish(self, ctx: ClipContext, raw: list) -> None:
        frames = ctx.media.frames  # type: ignore[union-attr]
        if len(raw) != len(frames):
            raise ClipError(f"face detector returned {len(raw)} results for {len(frames)} frames")
        dets = [frame_detections(f, r, self.config) for f, r in zip(frames, raw)]
        cuts = shot_cuts(frames) if self.config.split_at_cuts else None
        tracks = track_faces(dets, self.config, cuts)
        main = choose_main_track(tracks, self.config.presence_ratio)
        if main is None:
            ctx.face = None
            ctx.status["faces"] = "no face"
            return
        ctx.face = to_face_track(main, len(frames), len(tracks))
        ctx.status["faces"] = "ok"
