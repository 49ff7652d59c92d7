"""Visual stage: per-frame descriptors of the main face (or of whole frames), pooled per clip.

Backends (stage "visual", modality "visual"):

* `face-geometry` (offline): for each sampled frame where the main face is present,
  [face flag, landmark geometry (25), ONet descriptor (256), crop colour statistics (6)].
  The ONet descriptor is the 256-d activation after `dense5`/`prelu5` of MTCNN's output
  network, whose weights ship in the facenet-pytorch wheel: a learned face representation
  needing no download. Colour statistics (Lab mean/std) keep tints and lighting visible.
* `hf-vision` (full): a pretrained image encoder from transformers (CLIP vision tower by
  default, or any ViT-like `AutoModel`) on face crops, frames, or both; it also stores
  `layers` [L+1, D]: every hidden state's [CLS] token, averaged over the clip's rows.
* `fer` (offline default; pipeline/stages/visual_fer.py): FER2013 mini-Xception expression
  probabilities + embedding per face frame, with the landmark geometry; pooled mean/max/std.
* `facenet`: InceptionResnetV1 (vggface2) identity embeddings of the face crops, when its
  weights are present locally (`weights = /path/to/20180402-114759-vggface2.pt`).

Every sequence row starts with a face flag (1 = the main face's crop was used, 0 = whole-frame
fallback); pooled = [mean over rows, std over rows, face coverage, log(1 + face tracks)].
Without a face the modality is absent (`ctx.absent['visual']`), never zero-filled, unless
`frames_fallback = true` asks for whole-frame descriptors.
"""

from __future__ import annotations

import importlib.metadata as md
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import torch
from pydantic import Field

from pipeline.stages.base import (
    ClipContext,
    Feature,
    ModelMissingError,
    Stage,
    StageConfig,
    register,
)
from pipeline.torch_nms import import_facenet

GEOMETRY_NAMES: tuple[str, ...] = (
    "box_cx", "box_cy", "box_w", "box_h", "box_log_aspect",
    "roll_sin", "roll_cos",
    *(f"dist_{a}_{b}" for a in range(5) for b in range(a + 1, 5)),
    "iod_over_box_w",
    "nose_x", "nose_y", "mouth_l_x", "mouth_l_y", "mouth_r_x", "mouth_r_y",
    "det_score",
)  # fmt: skip
GEOMETRY_DIM = len(GEOMETRY_NAMES)  # 25
ONET_DIM = 256
COLOUR_DIM = 6
POOL_EXTRA = 2  # coverage, log1p(n_tracks)


def pooled_dim(seq_dim: int) -> int:
    return 2 * seq_dim + POOL_EXTRA


# --- geometry --------------------------------------------------------------------------------
def face_geometry(
    box: np.ndarray, landmarks: np.ndarray, frame_w: int, frame_h: int, score: float
) -> np.ndarray:
    """Scale- and position-free face geometry from the box and 5 landmarks.

    Distances are divided by the box diagonal and in-plane rotation (roll, from the eye line)
    is removed before reading nose/mouth positions in inter-ocular units, so what is left
    varies with expression (mouth width, smile lift) and out-of-plane pose, not with where or
    how large the face is in the frame."""
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_l, eye_r = lm[0], lm[1]
    d = eye_r - eye_l
    iod = max(float(np.hypot(*d)), 1e-3)
    roll = math.atan2(d[1], d[0])
    diag = math.hypot(bw, bh)
    dists = [np.linalg.norm(lm[a] - lm[b]) / diag for a in range(5) for b in range(a + 1, 5)]
    c, s = math.cos(-roll), math.sin(-roll)
    rot = np.array([[c, -s], [s, c]])
    rel = (lm - (eye_l + eye_r) / 2) @ rot.T / iod  # eyes now at (-0.5, 0) and (0.5, 0)
    feats = [
        (x1 + x2) / 2 / max(frame_w, 1), (y1 + y2) / 2 / max(frame_h, 1),
        bw / max(frame_w, 1), bh / max(frame_h, 1), math.log(bh / bw),
        math.sin(roll), math.cos(roll),
        *dists,
        iod / bw,
        *rel[2], *rel[3], *rel[4],
        float(score),
    ]  # fmt: skip
    return np.asarray(feats, dtype=np.float32)


def colour_stats(image: np.ndarray) -> np.ndarray:
    """Mean and std of L, a, b (scaled to about [0, 1] / [-1, 1]): brightness and tint."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    lab = (lab - np.array([0.0, 128.0, 128.0], np.float32)) / np.array([255.0, 128.0, 128.0], np.float32)
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)]).astype(np.float32)


# --- shared planning / pooling ---------------------------------------------------------------
@dataclass
class Plan:
    """Which sampled frames of a clip become sequence rows, and from what."""

    steps: list[int]  # frame indices
    with_face: bool  # True: main-face crops; False: whole-frame fallback
    coverage: float
    n_tracks: int


def plan_clip(ctx: ClipContext, frames_fallback: bool) -> Plan | str:
    """The rows to compute for one clip, or the reason the modality is absent."""
    if ctx.media is None or not ctx.media.has_video:
        return "no video"
    face = ctx.face
    if face is not None:
        steps = [t for t, c in enumerate(face.crops) if c is not None and t < len(ctx.media.frames)]
        if steps:
            return Plan(steps, True, float(face.coverage), int(face.n_tracks))
    if frames_fallback:
        return Plan(list(range(len(ctx.media.frames))), False, 0.0, 0)
    if "faces" in ctx.failed:
        return "face stage failed"
    return ctx.status.get("faces") or "no face"


def pool(seq: np.ndarray, plan: Plan) -> np.ndarray:
    """[mean, std, coverage, log1p(n_tracks)] of a [t, D] sequence."""
    extra = np.array([plan.coverage, math.log1p(plan.n_tracks)], dtype=np.float32)
    return np.concatenate([seq.mean(axis=0), seq.std(axis=0), extra]).astype(np.float32)


class _VisualStage(Stage):
    """Common flow: plan rows per clip, embed all images of the batch in chunks, assemble.

    Subclasses define `embed(images, kind)` ([n, E] for a list of RGB images of one kind,
    'face' or 'frame'), `kinds(with_face)` (which kinds a row needs) and `seq_dim()`."""

    image_kinds: ClassVar[tuple[str, ...]] = ("face", "frame")  # kinds `kinds()` may name

    def seq_dim(self) -> int:
        raise NotImplementedError

    def kinds(self, with_face: bool) -> tuple[str, ...]:
        raise NotImplementedError

    def embed(self, images: list[np.ndarray], kind: str) -> np.ndarray:
        raise NotImplementedError

    def row(self, ctx: ClipContext, t: int, with_face: bool, emb: dict[str, np.ndarray]) -> np.ndarray:
        """One sequence row: face flag + the embeddings (subclasses may add more)."""
        parts = [np.array([1.0 if with_face else 0.0], np.float32)]
        parts += [emb[k] for k in self.kinds(with_face)]
        return np.concatenate(parts).astype(np.float32)

    def output_dims(self) -> dict[str, tuple[int, int]]:
        d = self.seq_dim()
        return {"visual": (d, pooled_dim(d))}

    def pool_seq(self, seq: np.ndarray, plan: Plan) -> np.ndarray:
        return pool(seq, plan)

    def plan(self, ctx: ClipContext) -> Plan | str:
        return plan_clip(ctx, bool(getattr(self.config, "frames_fallback", False)))

    def process_one(self, ctx: ClipContext) -> None:
        err = self.process([ctx])[0]
        if err is not None:
            raise err

    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        self.ensure_loaded()
        plans: list[Plan | None] = []
        for ctx in batch:
            p = self.plan(ctx)
            if isinstance(p, str):
                ctx.absent["visual"] = p
                plans.append(None)
            else:
                plans.append(p)
        try:
            embs = self._embed_batch(batch, plans)
        except ModelMissingError:
            raise
        except Exception:  # noqa: BLE001 - one bad clip must not fail the others
            if len(batch) == 1:
                raise
            return [self._single(ctx) for ctx in batch]
        errors: list[BaseException | None] = []
        for k, (ctx, plan) in enumerate(zip(batch, plans)):
            try:
                if plan is not None:
                    self._assemble(ctx, plan, {kind: e[k] for kind, e in embs.items()})
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - per-clip isolation
                errors.append(e)
        return errors

    def _single(self, ctx: ClipContext) -> BaseException | None:
        try:
            self.process_one(ctx)
            return None
        except ModelMissingError:
            raise
        except Exception as e:  # noqa: BLE001
            return e

    def _image(self, ctx: ClipContext, t: int, kind: str) -> np.ndarray:
        if kind == "face":
            return ctx.face.crops[t]  # type: ignore[union-attr, return-value]
        return ctx.media.frames[t]  # type: ignore[union-attr]

    def _embed_batch(
        self, batch: list[ClipContext], plans: list[Plan | None]
    ) -> dict[str, list[list[np.ndarray]]]:
        """All images of one kind across the batch go through `embed` together; the result
        is split back per clip: kind -> [clip][row] vectors."""
        out: dict[str, list[list[np.ndarray]]] = {}
        for kind in self.image_kinds:
            owners: list[int] = []
            images: list[np.ndarray] = []
            for k, (ctx, plan) in enumerate(zip(batch, plans)):
                if plan is None or kind not in self.kinds(plan.with_face):
                    continue
                for t in plan.steps:
                    owners.append(k)
                    images.append(self._image(ctx, t, kind))
            vecs = self.embed(images, kind) if images else np.zeros((0, 0), np.float32)
            per_clip: list[list[np.ndarray]] = [[] for _ in batch]
            for k, v in zip(owners, vecs):
                per_clip[k].append(v)
            out[kind] = per_clip
        return out

    def _assemble(self, ctx: ClipContext, plan: Plan, emb: dict[str, list[np.ndarray]]) -> None:
        rows = [
            self.row(ctx, t, plan.with_face, {kind: emb[kind][i] for kind in emb if emb[kind]})
            for i, t in enumerate(plan.steps)
        ]
        seq = np.stack(rows).astype(np.float32)
        if not np.all(np.isfinite(seq)):
            raise ValueError("visual descriptor produced non-finite values")
        times = np.asarray([ctx.media.frame_times[t] for t in plan.steps], np.float32)  # type: ignore[union-attr]
        ctx.features["visual"] = Feature(pooled=self.pool_seq(seq, plan), seq=seq, times=times)
        ctx.status["visual"] = "face" if plan.with_face else "frames (no face)"


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --- offline: geometry + ONet + colour ------------------------------------------------------
class FaceGeometryConfig(StageConfig):
    batch_size: int = Field(256, ge=1, description="crops per ONet call (across clips)")
    device: str | None = None
    frames_fallback: bool = False  # no face: whole-frame ONet + colour rows (flag 0)


@register
class FaceGeometryVisual(_VisualStage):
    """Landmark geometry + MTCNN ONet 256-d descriptor + Lab colour statistics."""

    name: ClassVar[str] = "visual"
    backend = "face-geometry"
    version = "1"
    Config = FaceGeometryConfig
    config: FaceGeometryConfig

    def load(self) -> None:
        facenet = import_facenet()
        self.torch_device = torch.device(self.config.device or self.device)
        self.onet = facenet.ONet().eval().to(self.torch_device)

    def models(self) -> list[dict[str, str]]:
        return [
            {
                "id": "facenet-pytorch/mtcnn-onet",
                "revision": md.version("facenet-pytorch"),
                "descriptor": "onet.prelu5 activations (256-d) of the aligned crop at 48x48",
            }
        ]

    def seq_dim(self) -> int:
        return 1 + GEOMETRY_DIM + ONET_DIM + COLOUR_DIM

    def kinds(self, with_face: bool) -> tuple[str, ...]:
        return ("face",) if with_face else ("frame",)

    def embed(self, images: list[np.ndarray], kind: str) -> np.ndarray:
        """[ONet descriptor, colour stats] per image."""
        return np.concatenate([self.onet_descriptor(images), np.stack([colour_stats(i) for i in images])], axis=1)

    def onet_descriptor(self, images: list[np.ndarray]) -> np.ndarray:
        """ONet's penultimate (prelu5) activations for RGB images resized to 48x48, with
        MTCNN's own input normalisation."""
        small = np.stack([cv2.resize(i, (48, 48), interpolation=cv2.INTER_AREA) for i in images])
        x = (torch.from_numpy(small).permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
        captured: list[torch.Tensor] = []
        hook = self.onet.prelu5.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.inference_mode():
                for sl in _chunks(len(images), self.config.batch_size):
                    self.onet(x[sl].to(self.torch_device))
        finally:
            hook.remove()
        return torch.cat(captured).float().cpu().numpy()

    def row(self, ctx: ClipContext, t: int, with_face: bool, emb: dict[str, np.ndarray]) -> np.ndarray:
        if with_face:
            face = ctx.face
            frame = ctx.media.frames[t]  # type: ignore[union-attr]
            geom = face_geometry(
                face.boxes[t], face.landmarks[t], frame.shape[1], frame.shape[0],  # type: ignore[union-attr, arg-type]
                face.scores[t] or 0.0,  # type: ignore[union-attr]
            )
            vec = emb["face"]
        else:
            geom = np.zeros(GEOMETRY_DIM, np.float32)  # flagged by the leading 0, not data
            vec = emb["frame"]
        flag = np.array([1.0 if with_face else 0.0], np.float32)
        return np.concatenate([flag, geom, vec]).astype(np.float32)


# --- full: transformers image encoder -------------------------------------------------------
def _missing(model: str, key: str, why: str) -> ModelMissingError:
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        why = "no such local directory"  # not the hub's "Repo id must be in the form ..."
    return ModelMissingError(
        f"visual model '{model}' is not available locally ({why}); download it where there is "
        f"network access (or into HF_HOME) and pass --set visual.{key}=/local/dir"
    )


class HFVisionConfig(StageConfig):
    model: str = "openai/clip-vit-base-patch32"  # HF id or a local directory
    revision: str | None = None
    input: Literal["face", "frame", "both"] = "face"
    batch_size: int = Field(32, ge=1)
    device: str | None = None
    frames_fallback: bool = False  # input 'face'/'both' and no face: embed frames (flag 0)


@register
class HFVisionVisual(_VisualStage):
    """A transformers vision encoder's image embedding (CLIP pooled output, else [CLS])."""

    name: ClassVar[str] = "visual"
    backend = "hf-vision"
    version = "2"  # 2: stores every hidden state's [CLS] averaged over the clip (`layers`)
    Config = HFVisionConfig
    config: HFVisionConfig

    def _hf_config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.config.model, revision=self.config.revision)
        except (OSError, ValueError) as e:
            raise _missing(self.config.model, "model", _first_line(e)) from None

    def hidden_size(self) -> int:
        cfg = self._hf_config()
        vision = getattr(cfg, "vision_config", None) or cfg
        return int(vision.hidden_size)

    def n_states(self) -> int:
        """Hidden states of the encoder: the embeddings and each of its layers."""
        cfg = self._hf_config()
        vision = getattr(cfg, "vision_config", None) or cfg
        return int(vision.num_hidden_layers) + 1

    def layer_dims(self) -> dict[str, tuple[int, int]]:
        return {"visual": (self.n_states(), self.hidden_size())}

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

        cfg = self._hf_config()
        kw = {"revision": self.config.revision}
        try:
            try:  # the PIL backend: never torchvision (see pipeline/torch_nms.py)
                self.processor = AutoImageProcessor.from_pretrained(self.config.model, backend="pil", **kw)
            except TypeError:  # transformers 4.x has no `backend`
                self.processor = AutoImageProcessor.from_pretrained(self.config.model, use_fast=False, **kw)
            self._clip = cfg.model_type in ("clip", "clip_vision_model")
            if self._clip:
                self.model = CLIPVisionModel.from_pretrained(self.config.model, **kw).eval()
            else:  # no pooling head: many checkpoints lack one and it would be random init
                self.model = _auto_model_without_pooler(AutoModel, self.config.model, kw)
        except (OSError, ValueError) as e:
            raise _missing(self.config.model, "model", _first_line(e)) from None
        self.torch_device = torch.device(self.config.device or self.device)
        self.model.to(self.torch_device)
        self._hidden = self.hidden_size()

    def models(self) -> list[dict[str, str]]:
        return [
            {
                "id": self.config.model,
                "revision": self.config.revision or "default",
                "descriptor": "CLIP: pooler_output (post-layernorm CLS); others: last_hidden_state[:, 0]",
            }
        ]

    def seq_dim(self) -> int:
        n = 2 if self.config.input == "both" else 1
        return 1 + n * self.hidden_size()

    def kinds(self, with_face: bool) -> tuple[str, ...]:
        if self.config.input == "frame" or not with_face:
            return ("frame",)
        return ("face", "frame") if self.config.input == "both" else ("face",)

    def embed(self, images: list[np.ndarray], kind: str) -> np.ndarray:
        """[n, D + (L+1) * D]: the image embedding, then every hidden state's [CLS] token
        (split off again by `row` and `_assemble`)."""
        outs = []
        with torch.inference_mode():
            for sl in _chunks(len(images), self.config.batch_size):
                px = self.processor(images=list(images[sl]), return_tensors="pt")["pixel_values"]
                res = self.model(pixel_values=px.to(self.torch_device), output_hidden_states=True)
                # CLIP's pooled output is its trained post-layernorm [CLS]; others: [CLS]
                pooled = res.pooler_output if self._clip else res.last_hidden_state[:, 0]
                cls = torch.stack([h[:, 0] for h in res.hidden_states], dim=1)  # [b, L+1, D]
                outs.append(torch.cat([pooled, cls.flatten(1)], dim=1).float().cpu())
        return torch.cat(outs).numpy()

    def _assemble(self, ctx: ClipContext, plan: Plan, emb: dict[str, list[np.ndarray]]) -> None:
        """The rows from the embeddings; `layers` = the per-state [CLS] tokens of the images
        the rows' main descriptor came from (face crops, or frames), averaged over the rows."""
        d = self._hidden
        main = self.kinds(plan.with_face)[0]
        per_state = np.stack([v[d:] for v in emb[main]]).reshape(len(emb[main]), -1, d)
        super()._assemble(ctx, plan, {k: [v[:d] for v in vs] for k, vs in emb.items()})
        layers = per_state.mean(axis=0).astype(np.float32)
        if not np.all(np.isfinite(layers)):
            raise ValueError("visual encoder produced non-finite hidden states")
        ctx.features["visual"].layers = layers

    def row(self, ctx: ClipContext, t: int, with_face: bool, emb: dict[str, np.ndarray]) -> np.ndarray:
        flag = np.array([1.0 if with_face else 0.0], np.float32)
        if self.config.input == "frame":
            flag[0] = float(ctx.face is not None and ctx.face.crops[t] is not None)
            return np.concatenate([flag, emb["frame"]])
        if self.config.input == "both":
            face = emb["face"] if with_face else np.zeros(self._hidden, np.float32)  # flagged 0
            return np.concatenate([flag, face, emb["frame"]])
        return np.concatenate([flag, emb["face"] if with_face else emb["frame"]])

    def plan(self, ctx: ClipContext) -> Plan | str:
        """Input 'frame' embeds every sampled frame whether or not a face was found (the
        leading flag then says whether the main face is in that frame)."""
        if self.config.input != "frame" or ctx.media is None or not ctx.media.has_video:
            return super().plan(ctx)
        face = ctx.face
        cov, n = (float(face.coverage), int(face.n_tracks)) if face is not None else (0.0, 0)
        return Plan(list(range(len(ctx.media.frames))), False, cov, n)


def _auto_model_without_pooler(auto: Any, model: str, kw: dict[str, Any]) -> Any:
    """AutoModel without its pooling head where the architecture has one (ViT, BERT-like)."""
    try:
        return auto.from_pretrained(model, add_pooling_layer=False, **kw).eval()
    except TypeError:  # the architecture takes no such argument
        return auto.from_pretrained(model, **kw).eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# --- optional: InceptionResnetV1 (facenet) --------------------------------------------------
FACENET_FILE = "20180402-114759-vggface2.pt"


class FacenetConfig(StageConfig):
    weights: Path | None = None  # the vggface2 state dict, e.g. .../20180402-114759-vggface2.pt
    batch_size: int = Field(32, ge=1)
    device: str | None = None


@register
class FacenetVisual(_VisualStage):
    """InceptionResnetV1 (vggface2) 512-d embeddings of the aligned face crops at 160 px."""

    name: ClassVar[str] = "visual"
    backend = "facenet"
    version = "1"
    Config = FacenetConfig
    config: FacenetConfig

    def load(self) -> None:
        path = self.config.weights
        if path is None or not Path(path).is_file():
            where = "no path configured" if path is None else f"{path} does not exist"
            raise ModelMissingError(
                f"visual model 'facenet InceptionResnetV1 (vggface2)' weights not found ({where}); "
                f"download {FACENET_FILE} from the facenet-pytorch releases and pass "
                f"--set visual.weights=/path/to/{FACENET_FILE}"
            )
        facenet = import_facenet()
        net = facenet.InceptionResnetV1(pretrained=None, classify=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        net.load_state_dict(state)
        self.torch_device = torch.device(self.config.device or self.device)
        self.net = net.eval().to(self.torch_device)

    def models(self) -> list[dict[str, str]]:
        name = Path(self.config.weights).name if self.config.weights else FACENET_FILE
        return [{"id": "facenet-pytorch/inception_resnet_v1", "revision": name, "descriptor": "512-d L2-normalised embedding"}]

    def seq_dim(self) -> int:
        return 1 + 512

    def kinds(self, with_face: bool) -> tuple[str, ...]:
        return ("face",) if with_face else ("frame",)

    def embed(self, images: list[np.ndarray], kind: str) -> np.ndarray:
        small = np.stack([cv2.resize(i, (160, 160), interpolation=cv2.INTER_AREA) for i in images])
        x = (torch.from_numpy(small).permute(0, 3, 1, 2).float() - 127.5) / 128.0
        outs = []
        with torch.inference_mode():
            for sl in _chunks(len(images), self.config.batch_size):
                outs.append(self.net(x[sl].to(self.torch_device)).float().cpu())
        return torch.cat(outs).numpy()


# registered here so that get_backend("visual", ...) finds it; its code is in its own file
from pipeline.stages import visual_fer as _visual_fer  # noqa: E402, F401
