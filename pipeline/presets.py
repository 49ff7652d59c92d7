"""Presets: TOML files that pick one backend (and its config) per stage.

`offline` (shipped-weight models only) and `full` (pretrained models, GPU) live in
pipeline/presets/; a path to any TOML file works too. CLI overrides are `stage.key=value`
strings whose value is read as a TOML literal (`fps=4`, `model="/models/wavlm"`), falling back
to a plain string.

`load_preset` returns a typed `Preset`: the `[store]` and `[run]` tables as `StoreSettings` /
`RunSettings` (every default of those tables is written here, once), and per stage the
backend name with its validated config model. `Preset.data` keeps the tables as written
(after overrides): that is what set keys hash and what a feature set records, so a table's
omitted keys never change a key.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline import cacheformat
from pipeline.stages.base import StageConfig, get_backend
from pipeline.store import DEFAULT_LEASE_S

PRESET_DIR = Path(__file__).parent / "presets"
STAGE_ORDER = ("decode", "separate", "ocr", "asr", "faces", "audio", "text", "visual", "metadata")
SKIP = "skip"  # a stage's backend that leaves the stage out
# stages added after feature sets were recorded: a preset without their table leaves them
# out, and their backend "none" means SKIP (no stage, nothing recorded)
OPTIONAL_STAGES = {"asr": {"backend": "none"}}


def _with_optional(preset: dict[str, Any]) -> dict[str, Any]:
    for name, table in OPTIONAL_STAGES.items():
        preset.setdefault(name, dict(table))
    return preset


class StoreSettings(BaseModel):
    """`[store]`: how a feature set is laid out on disk (pipeline/store.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # clips per work unit (= per chunk file), or "auto"; checked by plan.resolve_unit_size
    unit_size: Any = "auto"
    inner_chunk: int = cacheformat.DEFAULT_INNER_CHUNK  # larger units are sharded into these
    compression: str = cacheformat.DEFAULT_COMPRESSION  # zstd | blosc-lz4 | none
    level: int = cacheformat.DEFAULT_LEVEL
    max_len: dict[str, int] = Field(default_factory=dict)  # sequence steps kept per modality
    DEFAULT_MAX_LEN: ClassVar[int] = 32  # for a sequence modality max_len does not name

    def max_len_of(self, modality: str) -> int:
        return int(self.max_len.get(modality, self.DEFAULT_MAX_LEN))


class RunSettings(BaseModel):
    """`[run]`: how extraction runs; none of it changes what is extracted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(16, ge=1)  # clips per model call inside a unit
    clip_timeout: float = Field(300.0, gt=0)  # seconds one clip may take in decode
    decode_workers: int = Field(2, ge=1)  # decode threads running ahead of the models
    # seconds a unit's claim lasts unless renewed; a heartbeat renews it every lease/4 while
    # the unit is worked on, so a dead writer's unit is free within this time (at once when
    # the writer ran on the same host: its pid is checked)
    lease: float = Field(DEFAULT_LEASE_S, gt=0)


@dataclass(frozen=True)
class StagePick:
    """One stage of a preset: the backend name and its validated config (None when skipped)."""

    backend: str
    config: StageConfig | None

    @property
    def skipped(self) -> bool:
        return self.backend == SKIP


@dataclass(frozen=True)
class Preset:
    """A loaded preset. Plain data (pydantic models, dicts): it pickles for process pools and Dask."""

    data: dict[str, Any]  # the tables as written, after overrides (hashed into set keys)
    store: StoreSettings
    run: RunSettings
    stages: dict[str, StagePick]  # in STAGE_ORDER

    @property
    def name(self) -> str:
        return str(self.data.get("name", "custom"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(preset: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    out = copy.deepcopy(preset)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override '{item}' must look like stage.key=value (e.g. decode.fps=4)")
        path, raw = item.split("=", 1)
        *tables, key = path.strip().split(".")
        node = out
        for t in tables:
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise ValueError(f"override '{item}': '{t}' is not a table")
        node[key] = _parse_value(raw.strip())
    return out


def _typed(data: dict[str, Any], where: str) -> Preset:
    missing = [s for s in STAGE_ORDER if s not in data]
    if missing:
        raise ValueError(f"preset {where}: missing stage tables {missing}")
    stages: dict[str, StagePick] = {}
    for name in STAGE_ORDER:
        table = dict(data[name])
        backend = table.pop("backend")
        if backend == "none" and name in OPTIONAL_STAGES:
            backend = SKIP
        if backend == SKIP:
            stages[name] = StagePick(backend, None)
        else:
            stages[name] = StagePick(backend, get_backend(name, backend).Config(**table))
    return Preset(
        data=data,
        store=StoreSettings(**data.get("store", {})),
        run=RunSettings(**data.get("run", {})),
        stages=stages,
    )


def load_preset(name_or_path: str | dict[str, Any] | Preset = "offline", overrides: list[str] | None = None) -> Preset:
    """A preset by name, by TOML path, or as data (the config recorded in a feature set's attrs,
    which `predict` and `cache verify --repair` reuse so they extract exactly as before)."""
    if isinstance(name_or_path, Preset):
        name_or_path = name_or_path.data
    if isinstance(name_or_path, dict):
        preset = apply_overrides(_with_optional(dict(name_or_path)), overrides)
        return _typed(preset, str(preset.get("name", "?")))
    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / f"{name_or_path}.toml"
    if not p.exists():
        raise FileNotFoundError(f"unknown preset '{name_or_path}' (known: {', '.join(preset_names())}, or a .toml path)")
    with open(p, "rb") as f:
        preset = tomllib.load(f)
    preset.setdefault("name", p.stem)
    preset = apply_overrides(_with_optional(preset), overrides)
    return _typed(preset, str(p))
