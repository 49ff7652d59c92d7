"""Manifests: one clip per JSONL line, the input contract of the extractor.

A manifest is plain data (Lhotse's idea): recipes write it, people can read it with pandas
(`pd.read_json(path, lines=True)`), and the extractor reads nothing else. Media paths are
relative to a dataset root so that the same manifest works wherever the data is mounted.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST_DIR = Path("manifests")

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-+=@,]+$")


class ManifestError(ValueError):
    """An invalid manifest row, with file, line and field in the message."""

    def __init__(self, path: str | os.PathLike, line: int, field: str, reason: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        super().__init__(f"{path}:{line}: field '{field}': {reason}")


def check_clip_id(value: str) -> str:
    """Ids become file names in the cache: no separators, no `..`, no control characters."""
    if not isinstance(value, str) or not value:
        raise ValueError("id must be a non-empty string")
    if len(value) > 200:
        raise ValueError("id longer than 200 characters")
    if any(unicodedata.category(c).startswith("C") for c in value):
        raise ValueError("id contains control characters")
    if "/" in value or "\\" in value:
        raise ValueError("id contains a path separator")
    if value in (".", "..") or ".." in value:
        raise ValueError("id contains '..'")
    if not _ID_RE.match(value):
        raise ValueError("id may only use letters, digits and _ . - + = @ ,")
    return value


def sanitize_id(raw: str) -> str:
    """Turn an arbitrary name (file stem, dataset key) into a valid clip id."""
    s = unicodedata.normalize("NFKD", str(raw)).encode("ascii", "ignore").decode()
    s = re.sub(r"[^A-Za-z0-9_.\-+=@,]+", "_", s).replace("..", "_").strip("._")
    return s[:200] or "clip"


def check_rel_path(value: str | None) -> str | None:
    """Media paths are relative POSIX paths inside the dataset root."""
    if value is None or value == "":
        return None
    p = PurePosixPath(str(value).replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", str(value)):
        raise ValueError(f"path must be relative to the dataset root, got absolute '{value}'")
    if ".." in p.parts:
        raise ValueError(f"path must stay inside the dataset root, got '{value}'")
    return str(p)


TARGETS = ("sentiment", "valence", "arousal")  # the continuous labels (regression targets)


class Labels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    emotion: str | None = None  # the dataset's own label string
    emotion_idx: int | None = Field(default=None, ge=0)  # index into the dataset's class list
    sentiment: float | None = None
    valence: float | None = None
    arousal: float | None = None

    def any_label(self) -> bool:
        """A class or any continuous target: the clip can take part in some fit."""
        return self.emotion_idx is not None or any(getattr(self, t) is not None for t in TARGETS)


def targets_present(clips: Iterable[Clip]) -> list[str]:
    """The continuous targets (TARGETS order) that at least one of the clips carries."""
    clips = list(clips)
    return [t for t in TARGETS if any(getattr(c.labels, t) is not None for c in clips)]


class Clip(BaseModel):
    """One clip (utterance / video) of a dataset."""

    model_config = ConfigDict(extra="forbid")

    id: str
    dataset: str
    split: str = "train"
    video: str | None = None  # relative to the dataset root
    audio: str | None = None  # relative to the dataset root (if separate from the video)
    transcript: str | None = None
    title: str | None = None  # conditioning text: video title, dialogue context
    speaker: str | None = None
    dialogue_id: str | None = None
    turn: int | None = None
    start: float | None = None  # seconds, when the clip is a segment of a longer file
    end: float | None = None
    labels: Labels = Field(default_factory=Labels)
    metadata: dict[str, Any] = Field(default_factory=dict)

    _check_id = field_validator("id")(classmethod(lambda cls, v: check_clip_id(v)))
    _check_paths = field_validator("video", "audio")(
        classmethod(lambda cls, v: check_rel_path(v))
    )

    @field_validator("split", "dataset")
    @classmethod
    def _simple_name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.\-]+$", v) or ".." in v:
            raise ValueError(f"must be a simple name (letters, digits, _ . -), got '{v}'")
        return v

    @property
    def media(self) -> str | None:
        """The file audio is read from: the separate audio file if any, else the video."""
        return self.audio or self.video


def write_manifest(clips: Iterable[Clip], path: str | os.PathLike) -> Path:
    """Write clips as JSONL atomically (temp name + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in clips:
            f.write(c.model_dump_json(exclude_none=False) + "\n")
    os.replace(tmp, path)
    return path


def iter_manifest(path: str | os.PathLike) -> Iterator[Clip]:
    """Read a JSONL manifest; an invalid row raises ManifestError(file, line, field)."""
    path = Path(path)
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(
                    path, lineno, "<encoding>",
                    f"not valid UTF-8 (byte 0x{raw_line[e.start]:02x} at column {e.start + 1}); "
                    "manifests are UTF-8 JSON lines, re-encode the text (e.g. from Latin-1)",
                ) from None
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(path, lineno, "<json>", f"not valid JSON ({e.msg})") from None
            if not isinstance(raw, dict):
                raise ManifestError(path, lineno, "<json>", "a row must be a JSON object")
            try:
                clip = Clip.model_validate(raw)
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(p) for p in err["loc"]) or "<row>"
                raise ManifestError(path, lineno, field, err["msg"]) from None
            if clip.id in seen:
                raise ManifestError(
                    path, lineno, "id", f"duplicate id '{clip.id}' (first on line {seen[clip.id]})"
                )
            seen[clip.id] = lineno
            yield clip


def read_manifest(path: str | os.PathLike) -> list[Clip]:
    return list(iter_manifest(path))


def manifest_path(dataset: str, split: str, root: str | os.PathLike = MANIFEST_DIR) -> Path:
    return Path(root) / dataset / f"{split}.jsonl"


def dataset_manifests(dataset: str, root: str | os.PathLike = MANIFEST_DIR) -> list[Path]:
    """All split files of a dataset, sorted (train, valid/dev, test, then others)."""
    order = {"train": 0, "valid": 1, "val": 1, "dev": 1, "test": 2}
    d = Path(root) / dataset
    files = sorted(d.glob("*.jsonl"), key=lambda p: (order.get(p.stem, 3), p.stem))
    if not files:
        raise FileNotFoundError(
            f"no manifest for dataset '{dataset}' under {d}/ — run `mmemo prepare` first"
        )
    return files


def load_dataset(dataset: str, root: str | os.PathLike = MANIFEST_DIR) -> list[Clip]:
    """All clips of a dataset across its split files; ids must be unique across splits."""
    clips: list[Clip] = []
    seen: dict[str, Path] = {}
    for p in dataset_manifests(dataset, root):
        for lineno, c in enumerate(iter_manifest(p), start=1):
            if c.id in seen:
                raise ManifestError(p, lineno, "id", f"duplicate id '{c.id}' (also in {seen[c.id]})")
            seen[c.id] = p
            clips.append(c)
    return clips


def dataset_info_path(dataset: str, root: str | os.PathLike = MANIFEST_DIR) -> Path:
    return Path(root) / dataset / "dataset.json"


def write_dataset_info(dataset: str, info: dict[str, Any], root: str | os.PathLike = MANIFEST_DIR) -> Path:
    """Dataset-level facts a recipe knows: class names, media root, label source fields."""
    p = dataset_info_path(dataset, root)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, p)
    return p


def read_dataset_info(dataset: str, root: str | os.PathLike = MANIFEST_DIR) -> dict[str, Any]:
    p = dataset_info_path(dataset, root)
    if not p.exists():
        return {}
    return json.loads(p.read_text(encoding="utf-8"))
