"""The stage interface: a named backend with a config, one method over a batch of clips.

Stages know nothing about scheduling, caching or storage (the runner does that). A stage
reads what earlier stages left on each `ClipContext` and adds its own output. Full and
offline backends of one stage share the stage `name` and differ in `backend`; a preset picks
one backend per stage (Lhotse's FeatureExtractor: name + config + extract).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.manifest import Clip


class ClipError(Exception):
    """An expected, per-clip failure with a message a person understands.

    The runner writes it to the error ledger (clip id, stage, type, message) and goes on.
    """


class ModelMissingError(RuntimeError):
    """Pretrained weights are not available locally (and downloads are off).

    The message is one line naming the model and how to provide it; the runner stops the run
    with it (every clip would fail the same way), rather than filling the ledger.
    """


class StageConfig(BaseModel):
    """Base of every backend's config; unknown keys are an error (typos must not pass)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Media:
    """Decoded media of one clip, bounded in size (see DecodeConfig)."""

    path: Path | None
    audio: np.ndarray | None = None  # float32 mono at `sample_rate`
    sample_rate: int = 16000
    duration: float = 0.0  # seconds of the clip (after start/end trimming)
    frames: list[np.ndarray] = field(default_factory=list)  # RGB uint8 [H, W, 3], sampled
    frame_times: list[float] = field(default_factory=list)  # seconds, same length as frames
    width: int = 0  # frame size after downscaling
    height: int = 0
    fps: float = 0.0  # the source's average frame rate
    rotation: int = 0  # degrees applied from the container's display matrix
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_audio(self) -> bool:
        return self.audio is not None and self.audio.size > 0

    @property
    def has_video(self) -> bool:
        return len(self.frames) > 0


@dataclass
class Cue:
    """One subtitle cue (OCR output)."""

    start: float
    end: float
    text: str


@dataclass
class FaceTrack:
    """The main face track of a clip: per sampled frame, a box and an aligned crop or None."""

    boxes: list[np.ndarray | None]  # [4] x1,y1,x2,y2 in frame pixels, per frame
    landmarks: list[np.ndarray | None]  # [5, 2] per frame
    crops: list[np.ndarray | None]  # RGB uint8 [S, S, 3] aligned crops, per frame
    scores: list[float | None]
    n_tracks: int = 1  # how many tracks the tracker found in the clip
    coverage: float = 0.0  # fraction of sampled frames where the main track is present


@dataclass
class Feature:
    """One modality's output for one clip: a sequence [t, D] and a pooled vector [Dp]."""

    pooled: np.ndarray
    seq: np.ndarray | None = None
    times: np.ndarray | None = None  # [t] seconds of each step, when meaningful
    layers: np.ndarray | None = None  # [L+1, Dl] each hidden state pooled over the clip


@dataclass
class ClipContext:
    """Everything known about one clip while it flows through the stages."""

    clip: Clip
    root: Path  # dataset root; media paths in the clip are relative to it
    media: Media | None = None
    vocals: np.ndarray | None = None  # float32 mono at media.sample_rate
    accompaniment: np.ndarray | None = None
    cues: list[Cue] | None = None  # OCR subtitle cues
    srt: str | None = None  # the cues as SRT text
    asr: Any = None  # AsrResult of the asr stage (pipeline/stages/asr.py), when it ran
    text_source: str | None = None  # what fed the text modality ("transcript", "asr", ...)
    face: FaceTrack | None = None
    features: dict[str, Feature] = field(default_factory=dict)  # modality -> feature
    absent: dict[str, str] = field(default_factory=dict)  # modality -> why absent
    status: dict[str, str] = field(default_factory=dict)  # stage -> short status
    failed: dict[str, str] = field(default_factory=dict)  # stage -> error message

    @property
    def id(self) -> str:
        return self.clip.id


class Stage(ABC):
    """A backend of one pipeline stage.

    Subclasses set `name` (the stage: decode, audio, ...), `backend`, `version` (bump when
    output changes) and `Config`, and override `process_one` (or `process` to batch across
    clips, e.g. on a GPU). The modalities a stage writes are the keys of `output_dims()`.
    """

    name: ClassVar[str]
    backend: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = StageConfig
    # False for stages that work from the manifest alone (text, metadata): they run on clips
    # without media or whose decode failed; the others see only decoded clips
    needs_media: ClassVar[bool] = True

    def __init__(self, config: StageConfig | dict | None = None, device: str = "cpu"):
        if config is None:
            config = {}
        self.config = config if isinstance(config, StageConfig) else self.Config(**config)
        self.device = device
        self._loaded = False

    # --- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load models (once per process). Raise a clear error if weights are missing."""

    def bind_dataset(self, info: dict[str, Any]) -> None:
        """Receive dataset.json facts (classes, label_derived...) before any clip runs."""

    def ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()
            self._loaded = True

    # --- provenance ------------------------------------------------------------------------
    def models(self) -> list[dict[str, str]]:
        """Model ids + revisions this backend uses (recorded in the feature set)."""
        return []

    def provenance(self) -> dict[str, Any]:
        return {
            "stage": self.name,  # the key stays "stage": set keys hash provenance
            "backend": self.backend,
            "version": self.version,
            "config": self.config.model_dump(mode="json"),
            "models": self.models(),
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.provenance(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # --- shapes (embedding stages) ---------------------------------------------------------
    def output_dims(self) -> dict[str, tuple[int, int]]:
        """modality -> (sequence dim D, pooled dim Dp). Needed before any clip runs."""
        return {}

    def layer_dims(self) -> dict[str, tuple[int, int]]:
        """modality -> (hidden states L+1, width Dl) of the `layers` array the backend fills
        (Feature.layers); {} (the default): no layers. Needed before any clip runs."""
        return {}

    # --- work ------------------------------------------------------------------------------
    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        """Run on a batch; return one error (or None) per clip. Default: clip by clip."""
        self.ensure_loaded()
        errors: list[BaseException | None] = []
        for ctx in batch:
            try:
                self.process_one(ctx)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - per-clip isolation is the point
                errors.append(e)
        return errors

    def process_one(self, ctx: ClipContext) -> None:
        raise NotImplementedError


# --- registry --------------------------------------------------------------------------------
REGISTRY: dict[tuple[str, str], type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    REGISTRY[(cls.name, cls.backend)] = cls
    return cls


def get_backend(stage: str, backend: str) -> type[Stage]:
    import importlib

    importlib.import_module(f"pipeline.stages.{stage}")  # registers that stage's backends
    try:
        return REGISTRY[(stage, backend)]
    except KeyError:
        known = sorted(b for s, b in REGISTRY if s == stage)
        raise KeyError(f"unknown backend '{backend}' for stage '{stage}'; known: {known}") from None


def pad_or_pool(seq: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    """Fit a [t, D] sequence into [max_len, D]: zero-pad a short one, average-pool a long one
    into max_len equal segments (the whole clip stays covered). Returns (array, valid length)."""
    t, d = seq.shape
    out = np.zeros((max_len, d), dtype=np.float32)
    if t == 0:
        return out, 0
    if t <= max_len:
        out[:t] = seq
        return out, t
    edges = np.linspace(0, t, max_len + 1).astype(int)
    for i in range(max_len):
        out[i] = seq[edges[i] : max(edges[i + 1], edges[i] + 1)].mean(axis=0)
    return out, max_len


WORKER_THREADS_ENV = "MMEMO_WORKER_THREADS"


def worker_threads() -> int:
    """The threads this worker process may use (set by the runner when several workers share
    the cores; 0 when none was set). Libraries with thread pools of their own — onnxruntime in
    the OCR stage — size them with it; their defaults take every core in every worker, and on 2
    cores 2 workers x 2 spinning onnxruntime threads made OCR twice as slow (BENCHMARKS.md)."""
    try:
        return max(0, int(os.environ.get(WORKER_THREADS_ENV, "0")))
    except ValueError:
        return 0
