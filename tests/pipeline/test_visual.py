"""Visual stage: face-geometry descriptors, hf-vision with a tiny local model, facenet."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.manifest import Clip
from pipeline.stages.base import ClipContext, Media, ModelMissingError
from pipeline.stages.decode import DecodeConfig, decode_media
from pipeline.stages.faces import MtcnnFaces
from pipeline.stages.visual import (
    GEOMETRY_DIM,
    FaceGeometryVisual,
    FacenetVisual,
    HFVisionVisual,
    colour_stats,
    face_geometry,
)
from tests.conftest import shared_path


def make_ctx(frames: list[np.ndarray], cid: str = "c") -> ClipContext:
    media = Media(None, frames=frames, frame_times=[0.5 * i for i in range(len(frames))])
    return ClipContext(Clip(id=cid, dataset="t"), Path("."), media=media)


@pytest.fixture(scope="module")
def faces_stage() -> MtcnnFaces:
    s = MtcnnFaces({})
    s.ensure_loaded()
    return s


@pytest.fixture(scope="module")
def face_clips(faces_stage: MtcnnFaces) -> list[ClipContext]:
    """Two real clips through the faces stage (6 frames each, to stay fast)."""
    out = []
    for name in ("ugc_face_zh_subs.mp4", "portrait_laugh_ru_caption.mp4"):
        media = decode_media(shared_path("video", name), DecodeConfig(max_frames=6))
        ctx = ClipContext(Clip(id=name.split(".")[0], dataset="t"), Path("."), media=media)
        assert faces_stage.process([ctx]) == [None]
        assert ctx.face is not None
        out.append(ctx)
    return out


def fresh(ctx: ClipContext) -> ClipContext:
    """A copy of a faces-stage output without features (stages add to the context)."""
    c = ClipContext(ctx.clip, ctx.root, media=ctx.media, face=ctx.face)
    c.status = dict(ctx.status)
    return c


@pytest.fixture(scope="module")
def geometry() -> FaceGeometryVisual:
    s = FaceGeometryVisual({})
    s.ensure_loaded()
    return s


# --- face-geometry ---------------------------------------------------------------------------
def test_geometry_dims_finite_and_batched_equals_single(geometry: FaceGeometryVisual, face_clips) -> None:
    seq_dim, pooled_dim = geometry.output_dims()["visual"]
    together = [fresh(c) for c in face_clips]
    t0 = time.perf_counter()
    assert geometry.process(together) == [None, None]
    n = sum(len(c.features["visual"].seq) for c in together)
    print(f"face-geometry descriptor: {(time.perf_counter() - t0) / n:.4f} s/frame over {n} faces")
    for ctx in together:
        f = ctx.features["visual"]
        present = sum(c is not None for c in ctx.face.crops)
        assert f.seq.shape == (present, seq_dim) and f.pooled.shape == (pooled_dim,)
        assert f.seq.dtype == np.float32 and np.isfinite(f.seq).all() and np.isfinite(f.pooled).all()
        assert (f.seq[:, 0] == 1).all()  # face rows
        assert f.times.shape == (present,)
        assert f.pooled[-2] == pytest.approx(ctx.face.coverage)
        assert "visual" not in ctx.absent
        alone = fresh(ctx)
        geometry.process_one(alone)
        np.testing.assert_allclose(alone.features["visual"].seq, f.seq, rtol=1e-4, atol=1e-4)


def test_different_faces_get_different_descriptors(geometry: FaceGeometryVisual, face_clips) -> None:
    ctxs = [fresh(c) for c in face_clips]
    geometry.process(ctxs)
    onet = [c.features["visual"].seq[:, 1 + GEOMETRY_DIM : 1 + GEOMETRY_DIM + 256] for c in ctxs]
    within = np.linalg.norm(onet[0] - onet[0].mean(0), axis=1).mean()
    between = np.linalg.norm(onet[0].mean(0) - onet[1].mean(0))
    assert between > within  # a man in a dark street vs a woman in a bright studio


def test_onet_hook_equals_rerunning_its_layers(geometry: FaceGeometryVisual) -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    got = geometry.onet_descriptor(imgs)
    assert got.shape == (3, 256)
    net = geometry.onet
    import cv2

    x = torch.from_numpy(np.stack([cv2.resize(i, (48, 48), interpolation=cv2.INTER_AREA) for i in imgs]))
    x = (x.permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
    with torch.no_grad():
        for name in ("conv1", "prelu1", "pool1", "conv2", "prelu2", "pool2", "conv3", "prelu3", "pool3", "conv4", "prelu4"):
            x = getattr(net, name)(x)
        x = net.prelu5(net.dense5(x.permute(0, 3, 2, 1).reshape(3, -1)))
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-5, atol=1e-5)


def test_no_face_is_absent_not_zeros(geometry: FaceGeometryVisual) -> None:
    frames = [np.full((120, 160, 3), v, np.uint8) for v in (20, 120, 220)]
    ctx = make_ctx(frames)
    ctx.status["faces"] = "no face"
    assert geometry.process([ctx]) == [None]
    assert ctx.absent["visual"] == "no face" and "visual" not in ctx.features
    novideo = make_ctx([])
    geometry.process([novideo])
    assert novideo.absent["visual"] == "no video"


def test_frames_fallback_flags_rows(geometry: FaceGeometryVisual) -> None:
    s = FaceGeometryVisual({"frames_fallback": True})
    s.onet, s.torch_device, s._loaded = geometry.onet, geometry.torch_device, True
    frames = [np.full((120, 160, 3), v, np.uint8) for v in (20, 120, 220)]
    ctx = make_ctx(frames)
    assert s.process([ctx]) == [None]
    f = ctx.features["visual"]
    assert f.seq.shape == (3, s.output_dims()["visual"][0])
    assert (f.seq[:, 0] == 0).all() and (f.seq[:, 1 : 1 + GEOMETRY_DIM] == 0).all()
    assert np.isfinite(f.seq).all() and "visual" not in ctx.absent
    lum = f.seq[:, -6]  # mean L of the frame colour stats follows brightness
    assert lum[0] < lum[1] < lum[2]


def test_face_geometry_invariances() -> None:
    box = np.array([100, 100, 200, 230], np.float32)
    lm = np.array([[130, 150], [170, 150], [150, 175], [135, 200], [165, 200]], np.float32)
    g = face_geometry(box, lm, 640, 480, 0.99)
    assert g.shape == (GEOMETRY_DIM,)
    # twice as large, elsewhere: distances and normalised positions unchanged
    g2 = face_geometry(box * 2 + 50, lm * 2 + 50, 640, 480, 0.99)
    np.testing.assert_allclose(g[5:-1], g2[5:-1], atol=1e-5)
    # rotated by 30 degrees: roll changes, roll-normalised nose/mouth positions do not
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    centre = lm.mean(0)
    lm_r = (lm - centre) @ np.array([[c, -s], [s, c]]).T + centre
    g3 = face_geometry(box, lm_r.astype(np.float32), 640, 480, 0.99)
    assert g3[5] == pytest.approx(math.sin(math.radians(30)), abs=1e-4)
    np.testing.assert_allclose(g[-7:-1], g3[-7:-1], atol=1e-4)  # nose, mouth corners
    # a wider smile moves the mouth corners out
    wide = lm.copy()
    wide[3, 0] -= 10
    wide[4, 0] += 10
    g4 = face_geometry(box, wide, 640, 480, 0.99)
    assert g4[-3] - g4[-5] > g[-3] - g[-5]


def test_colour_stats_show_tints() -> None:
    grey = np.full((50, 50, 3), 128, np.uint8)
    red = grey.copy()
    red[..., 0] = 200
    a, b = colour_stats(grey), colour_stats(red)
    assert b[1] > a[1] + 0.1  # Lab a* (green-red) mean rises
    assert abs(a[1]) < 0.02 and abs(a[2]) < 0.02


# --- hf-vision with a tiny local model -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    d = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    d = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=24, intermediate_size=30, num_hidden_layers=1,
                    num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(d)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.mark.parametrize("inp,factor", [("face", 1), ("frame", 1), ("both", 2)])
def test_hf_vision_tiny_clip(tiny_clip: Path, face_clips, inp: str, factor: int) -> None:
    s = HFVisionVisual({"model": str(tiny_clip), "input": inp, "batch_size": 4})
    seq_dim, pooled_dim = s.output_dims()["visual"]
    assert seq_dim == 1 + factor * 32
    together = [fresh(c) for c in face_clips]
    assert s.process(together) == [None, None]
    for ctx in together:
        f = ctx.features["visual"]
        n = len(ctx.media.frames) if inp == "frame" else sum(c is not None for c in ctx.face.crops)
        assert f.seq.shape == (n, seq_dim) and f.pooled.shape == (pooled_dim,)
        assert np.isfinite(f.seq).all()
        alone = fresh(ctx)
        s.process_one(alone)
        np.testing.assert_allclose(alone.features["visual"].seq, f.seq, rtol=1e-4, atol=1e-4)
    assert s.provenance()["models"][0]["id"] == str(tiny_clip)


def test_hf_vision_vit_automodel_and_fallback(tiny_vit: Path) -> None:
    s = HFVisionVisual({"model": str(tiny_vit), "frames_fallback": True})
    assert s.output_dims()["visual"] == (25, 52)
    frames = [np.full((64, 96, 3), v, np.uint8) for v in (10, 200)]
    ctx = make_ctx(frames)
    assert s.process([ctx]) == [None]
    f = ctx.features["visual"]
    assert f.seq.shape == (2, 25) and (f.seq[:, 0] == 0).all()
    assert not np.allclose(f.seq[0, 1:], f.seq[1, 1:])  # a real encoder, not a constant
    again = make_ctx(frames)  # a second load gives the same features (no random head)
    HFVisionVisual({"model": str(tiny_vit), "frames_fallback": True}).process([again])
    np.testing.assert_allclose(again.features["visual"].seq, f.seq, rtol=1e-5, atol=1e-5)
    strict = HFVisionVisual({"model": str(tiny_vit)})
    ctx2 = make_ctx(frames)
    strict.process([ctx2])
    assert ctx2.absent["visual"] == "no face" and "visual" not in ctx2.features


@pytest.mark.parametrize("model", ["mmemo-test/definitely-not-a-model", "/nonexistent/dir/clip"])
def test_hf_vision_missing_model_message(model: str) -> None:
    s = HFVisionVisual({"model": model})
    for call in (s.output_dims, s.ensure_loaded):
        with pytest.raises(ModelMissingError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and model in msg and "--set visual.model=" in msg


# --- facenet (InceptionResnetV1) -------------------------------------------------------------
def test_facenet_missing_weights_message(tmp_path: Path) -> None:
    for cfg in ({}, {"weights": str(tmp_path / "nope.pt")}):
        with pytest.raises(ModelMissingError) as e:
            FacenetVisual(cfg).ensure_loaded()
        msg = str(e.value)
        assert "\n" not in msg and "vggface2" in msg and "--set visual.weights=" in msg


def test_facenet_with_local_weights(tmp_path: Path, face_clips) -> None:
    from pipeline.torch_nms import import_facenet

    torch.manual_seed(0)
    net = import_facenet().InceptionResnetV1(pretrained=None)
    path = tmp_path / "random-vggface2.pt"
    torch.save(net.state_dict(), path)
    s = FacenetVisual({"weights": str(path), "batch_size": 4})
    ctx = fresh(face_clips[0])
    assert s.process([ctx]) == [None]
    f = ctx.features["visual"]
    assert f.seq.shape[1] == s.output_dims()["visual"][0] == 513
    np.testing.assert_allclose(np.linalg.norm(f.seq[:, 1:], axis=1), 1.0, atol=1e-4)
