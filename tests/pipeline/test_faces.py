"""Faces stage: torch-only NMS, alignment, tracking, main-track choice, real clips."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline import torch_nms
from pipeline.manifest import Clip
from pipeline.stages.base import ClipContext, Media
from pipeline.stages.decode import DecodeConfig, decode_media
from pipeline.stages.faces import (
    Detection,
    FacesConfig,
    MtcnnDetector,
    MtcnnFaces,
    Track,
    align_face,
    appearance_vector,
    choose_main_track,
    face_template,
    shot_cuts,
    track_faces,
)
from tests.conftest import REPO, shared_path


# --- NMS fallback ----------------------------------------------------------------------------
def reference_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, thr: float) -> list[int]:
    """Plain O(n^2) greedy NMS per category, written from the definition."""

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(idxs[k] != idxs[i] or iou(boxes[k], boxes[i]) <= thr for k in keep):
            keep.append(i)
    return keep


def random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32), rng.integers(0, 3, n)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_batched_nms_matches_reference(seed: int, thr: float) -> None:
    boxes, scores, idxs = random_boxes(np.random.default_rng(seed), 300)
    got = torch_nms.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), thr)
    assert got.tolist() == reference_nms(boxes, scores, idxs, thr)


def test_nms_loop_path_matches_matrix_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large inputs take the memory-light loop; it must keep exactly the same boxes."""
    boxes, scores, idxs = random_boxes(np.random.default_rng(7), 400)
    args = (torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), 0.5)
    matrix = torch_nms.batched_nms(*args)
    monkeypatch.setattr(torch_nms, "_MATRIX_LIMIT", 10)
    assert torch_nms.batched_nms(*args).tolist() == matrix.tolist()


def test_nms_edge_cases() -> None:
    empty = torch_nms.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.numel() == 0
    same = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    keep = torch_nms.batched_nms(same, torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0, 0, 0]), 0.5)
    assert keep.tolist() == [0, 2]
    # identical boxes in different images are both kept
    keep = torch_nms.batched_nms(same[:2], torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)
    assert keep.tolist() == [0, 1]


def test_to_tensor_follows_torchvision_semantics() -> None:
    u8 = np.full((4, 5, 3), 255, np.uint8)
    t = torch_nms.to_tensor(u8)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32 and float(t.max()) == 1.0
    f = torch_nms.to_tensor(np.full((4, 5, 3), 7.0, np.float32))
    assert float(f.max()) == 7.0  # float input is not rescaled


def test_imports_do_not_pull_torchvision() -> None:
    """Importing the stages and running MTCNN + ONet must never load torchvision & co, and
    leave no stand-in module behind."""
    code = (
        "import sys, numpy as np\n"
        "import pipeline.stages.faces as f, pipeline.stages.visual as v\n"
        "s = f.MtcnnFaces({}); s.ensure_loaded()\n"
        "s.detector.detect([np.zeros((64, 64, 3), np.uint8)])\n"
        "g = v.FaceGeometryVisual({}); g.ensure_loaded()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torchvision', 'torchaudio', 'torchcodec')]\n"
        "print('BAD', bad)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BAD []" in r.stdout


# --- alignment, appearance, tracking (synthetic) --------------------------------------------
def test_align_face_maps_landmarks_to_template() -> None:
    """Landmarks placed by a known similarity transform land on the template after align."""
    size = 160
    angle, scale, shift = np.deg2rad(20), 2.5, np.array([300.0, 150.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    tmpl = face_template(size, 0)
    lm = tmpl @ rot.T + shift
    frame = np.zeros((720, 960, 3), np.uint8)
    for i, (x, y) in enumerate(lm):  # a distinct colour dot at every landmark
        cv2.circle(frame, (int(round(x)), int(round(y))), 6, (50 * (i + 1), 255, 0), -1)
    crop = align_face(frame, lm.astype(np.float32), size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    for i, (x, y) in enumerate(tmpl):
        assert crop[int(round(y)), int(round(x)), 0] == 50 * (i + 1)


def _det(box: tuple[float, float, float, float], colour: tuple[int, int, int], score: float = 0.99) -> Detection:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    lm = np.array(
        [[x1 + 0.3 * w, y1 + 0.4 * h], [x1 + 0.7 * w, y1 + 0.4 * h], [x1 + 0.5 * w, y1 + 0.6 * h],
         [x1 + 0.35 * w, y1 + 0.8 * h], [x1 + 0.65 * w, y1 + 0.8 * h]], np.float32,
    )  # fmt: skip
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[:] = colour
    crop[40:70, 30:80] = (255 - np.array(colour)).astype(np.uint8)
    return Detection(np.array(box, np.float32), lm, score, crop, appearance_vector(crop))


def test_tracker_two_static_faces_and_main_is_larger() -> None:
    frames = [[_det((100, 100, 200, 220), (200, 150, 120)), _det((500, 100, 560, 170), (200, 150, 120))] for _ in range(6)]
    tracks = track_faces(frames, FacesConfig())
    assert len(tracks) == 2 and all(tr.presence == 6 for tr in tracks)
    assert choose_main_track(tracks).median_area() == pytest.approx(100 * 120)


def test_tracker_bridges_missed_frames_and_fast_motion() -> None:
    cfg = FacesConfig(max_gap=2)
    frames: list[list[Detection]] = []
    for t in range(8):
        x = 100 + 70 * t  # moves 70% of its width per sampled frame: IoU ~0.18 < min_iou
        frames.append([] if t in (3, 4) else [_det((x, 100, x + 100, 220), (180, 120, 90))])
    tracks = track_faces(frames, cfg)
    assert len(tracks) == 1 and sorted(tracks[0].dets) == [0, 1, 2, 5, 6, 7]


def test_tracker_splits_different_faces_at_a_cut_and_relinks_same_one() -> None:
    a, b = (120, 80, 60), (40, 90, 200)
    frames = [[_det((100, 100, 200, 220), a)] for _ in range(3)]
    frames += [[_det((100, 100, 200, 220), b)] for _ in range(2)]  # someone else, same place
    frames += [[_det((400, 50, 520, 190), a)] for _ in range(3)]  # the first face again
    cuts = [False, False, False, True, False, True, False, False]
    tracks = track_faces(frames, FacesConfig(), cuts)
    assert sorted(sorted(tr.dets) for tr in tracks) == [[0, 1, 2, 5, 6, 7], [3, 4]]
    # without the cut information the same place would link the two faces
    assert len(track_faces(frames[:5], FacesConfig(min_appearance=-1.0))) == 1


def test_choose_main_track_prefers_presence_then_size() -> None:
    big = Track({t: _det((0, 0, 200, 200), (1, 2, 3)) for t in range(5)})
    small_long = Track({t: _det((0, 0, 50, 50), (1, 2, 3)) for t in range(10)})
    small_close = Track({t: _det((0, 0, 50, 50), (1, 2, 3)) for t in range(6)})
    assert choose_main_track([big, small_long]) is small_long  # far more present
    # 5 >= 0.8 * 6: nearly as present, so the larger face wins
    assert choose_main_track([big, small_close], presence_ratio=0.8) is big
    big4 = Track({t: _det((0, 0, 200, 200), (1, 2, 3)) for t in range(4)})
    assert choose_main_track([big4, small_close], presence_ratio=0.8) is small_close
    assert choose_main_track([]) is None


def test_shot_cuts_on_synthetic_frames() -> None:
    rng = np.random.default_rng(0)
    dark = np.zeros((90, 160, 3), np.uint8) + np.uint8(30)
    dark[20:60, 40:90] = 200
    moved = np.roll(dark, 4, axis=1)
    other = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    assert shot_cuts([dark, moved, other, other]) == [False, False, True, False]


# --- the stage on synthetic and real frames -------------------------------------------------
@pytest.fixture(scope="module")
def stage() -> MtcnnFaces:
    s = MtcnnFaces({})
    s.ensure_loaded()
    return s


def ctx_for(frames: list[np.ndarray], times: list[float] | None = None) -> ClipContext:
    media = Media(None, frames=frames, frame_times=times or [0.5 * i for i in range(len(frames))])
    if frames:
        media.height, media.width = frames[0].shape[:2]
    return ClipContext(Clip(id="c", dataset="t"), Path("."), media=media)


def test_no_face_is_a_status_not_an_error(stage: MtcnnFaces) -> None:
    rng = np.random.default_rng(1)
    grad = np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    noise = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    ctx = ctx_for([grad, noise, grad])
    assert stage.process([ctx]) == [None]
    assert ctx.face is None and ctx.status["faces"] == "no face"


def test_no_video(stage: MtcnnFaces) -> None:
    ctx = ctx_for([])
    ctx2 = ClipContext(Clip(id="d", dataset="t"), Path("."), media=None)
    assert stage.process([ctx, ctx2]) == [None, None]
    assert ctx.status["faces"] == ctx2.status["faces"] == "no video" and ctx.face is None


def two_face_frame(small: int = 110, large: int = 200) -> np.ndarray:
    from skimage import data

    face = data.astronaut()[20:230, 140:330]  # the astronaut's face, 210x190
    frame = np.full((480, 720, 3), 235, np.uint8)
    a = cv2.resize(face, (large, round(large * 210 / 190)), interpolation=cv2.INTER_AREA)
    b = cv2.resize(face, (small, round(small * 210 / 190)), interpolation=cv2.INTER_AREA)
    frame[40 : 40 + a.shape[0], 40 : 40 + a.shape[1]] = a
    frame[60 : 60 + b.shape[0], 480 : 480 + b.shape[1]] = b
    return frame


def test_two_faces_two_tracks_main_is_larger(stage: MtcnnFaces) -> None:
    frame = two_face_frame()
    ctx = ctx_for([frame, frame.copy(), frame.copy()])
    assert stage.process([ctx]) == [None]
    face = ctx.face
    assert face is not None and face.n_tracks == 2 and face.coverage == 1.0
    for box, crop in zip(face.boxes, face.crops):
        assert box is not None and box[0] < 300  # the larger face is on the left
        assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8


def test_batch_across_clips_equals_one_by_one(stage: MtcnnFaces) -> None:
    two = two_face_frame()
    one = two.copy()
    one[:, 400:] = 235  # only the large face
    small = cv2.resize(two, (360, 240), interpolation=cv2.INTER_AREA)  # another frame size
    clips = [[two, two.copy()], [one, one.copy(), one.copy()], [small, small.copy()]]
    together = [ctx_for(list(f)) for f in clips]
    assert stage.process(together) == [None, None, None]
    for frames, ctx in zip(clips, together):
        alone = ctx_for(list(frames))
        stage.process([alone])
        assert alone.face.n_tracks == ctx.face.n_tracks
        for b1, b2 in zip(alone.face.boxes, ctx.face.boxes):
            np.testing.assert_allclose(b1, b2, atol=1e-3)


def test_crop_size_160(stage: MtcnnFaces) -> None:
    s = MtcnnFaces({"crop_size": 160, "margin": 16})
    s.detector = stage.detector  # same detector settings; only alignment differs
    s._loaded = True
    ctx = ctx_for([two_face_frame()])
    s.process([ctx])
    assert ctx.face.crops[0].shape == (160, 160, 3)


def run_real(name: str, stage: MtcnnFaces) -> tuple[ClipContext, float]:
    media = decode_media(shared_path("video", name), DecodeConfig(fps=2.0, max_frames=16))
    ctx = ClipContext(Clip(id="r", dataset="t"), Path("."), media=media)
    t0 = time.perf_counter()
    assert stage.process([ctx]) == [None]
    per_frame = (time.perf_counter() - t0) / len(media.frames)
    print(f"{name}: MTCNN+tracking {per_frame:.3f} s/frame over {len(media.frames)} frames")
    return ctx, per_frame


@pytest.mark.slow
def test_real_ugc_clip_main_track_is_the_first_speaker(stage: MtcnnFaces) -> None:
    """The clip cuts between two men (t~1.3 s and ~3.4 s) and ends on a group: the main track
    must stay on the man of the first shot and not follow the cut to the other one."""
    ctx, _ = run_real("ugc_face_zh_subs.mp4", stage)
    face, times = ctx.face, ctx.media.frame_times
    assert face is not None and ctx.status["faces"] == "ok"
    assert face.n_tracks >= 3
    assert 0.4 <= face.coverage <= 0.7
    present = [t for t, b in zip(times, face.boxes) if b is not None]
    assert any(t < 1.2 for t in present) and any(3.7 <= t <= 5.5 for t in present)
    assert not any(1.6 <= t <= 3.2 for t in present)  # the other man's shot
    crops = [c for c in face.crops if c is not None]
    assert all(c.shape == (112, 112, 3) for c in crops)
    assert len(face.boxes) == len(face.landmarks) == len(face.scores) == len(times)


@pytest.mark.slow
def test_real_portrait_clip_has_a_main_face(stage: MtcnnFaces) -> None:
    """A montage of face shots (several shots, eye close-ups without a detectable face)."""
    ctx, _ = run_real("portrait_laugh_ru_caption.mp4", stage)
    face = ctx.face
    assert face is not None and face.coverage >= 0.2
    present = [t for t, c in enumerate(face.crops) if c is not None]
    assert len(present) == round(face.coverage * len(face.crops))
    for t in present:
        assert face.crops[t].shape == (112, 112, 3)
        assert face.scores[t] >= 0.9 and face.landmarks[t].shape == (5, 2)
        x1, y1, x2, y2 = face.boxes[t]
        assert (x2 - x1) > 80  # a close-up portrait, not a speck


def test_detector_pyramid_starts_at_a_share_of_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """The smallest face asked of MTCNN: min_face_frac of the detection image's longer side,
    at least min_face_size. A 1280x720 frame (detected at 640 px) starts at 32 px, the demo's
    320x240 frames keep 20 px, and min_face_frac=0 gives min_face_size everywhere."""
    seen: list[int] = []

    def fake(self, batch: np.ndarray, min_face: int):
        seen.append(min_face)
        return [np.zeros((0, 5))] * len(batch), [np.zeros((0, 5, 2))] * len(batch)

    monkeypatch.setattr(MtcnnDetector, "_run_mtcnn", fake)
    det = MtcnnDetector(FacesConfig())
    det.detect([np.zeros((720, 1280, 3), np.uint8), np.zeros((240, 320, 3), np.uint8)])
    assert sorted(seen) == [20, 32]
    seen.clear()
    MtcnnDetector(FacesConfig(min_face_frac=0)).detect([np.zeros((720, 1280, 3), np.uint8)])
    assert seen == [20]
