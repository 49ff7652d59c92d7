"""Presets: TOML files that pick one backend (and its config) per stage.

`offline` (shipped-weight models only) and `full` (pretrained models, GPU) live in
pipeline/presets/; a path to any TOML file works too. CLI overrides are `stage.key=value`
strings whose value is read as a TOML literal (`fps=4`, `model="/models/wavlm"`), falling back
to a plain string.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"
STAGE_ORDER = ("decode", "separate", "asr", "ocr", "faces", "audio", "text", "visual", "metadata")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


# stages added after feature sets were recorded: a preset without their table leaves them
# out, and their backend "none" means "skip" (no stage, nothing recorded)
OPTIONAL_STAGES = {"asr": {"backend": "none"}}


def _with_optional(preset: dict[str, Any]) -> dict[str, Any]:
    for name, table in OPTIONAL_STAGES.items():
        preset.setdefault(name, dict(table))
    return preset


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


def load_preset(name_or_path: str | dict[str, Any] = "offline", overrides: list[str] | None = None) -> dict[str, Any]:
    """A preset by name, by TOML path, or as data (the config recorded in a feature set's attrs,
    which `predict` and `cache verify --repair` reuse so they extract exactly as before)."""
    if isinstance(name_or_path, dict):
        preset = apply_overrides(_with_optional(dict(name_or_path)), overrides)
        missing = [s for s in STAGE_ORDER if s not in preset]
        if missing:
            raise ValueError(f"preset {preset.get('name', '?')}: missing stage tables {missing}")
        return preset
    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / f"{name_or_path}.toml"
    if not p.exists():
        raise FileNotFoundError(f"unknown preset '{name_or_path}' (known: {', '.join(preset_names())}, or a .toml path)")
    with open(p, "rb") as f:
        preset = tomllib.load(f)
    preset.setdefault("name", p.stem)
    preset = apply_overrides(_with_optional(preset), overrides)
    missing = [s for s in STAGE_ORDER if s not in preset]
    if missing:
        raise ValueError(f"preset {p}: missing stage tables {missing}")
    return preset


def stage_config(preset: dict[str, Any], stage: str) -> tuple[str, dict[str, Any]]:
    """(backend, config dict without the backend key) of one stage."""
    table = dict(preset[stage])
    backend = table.pop("backend")
    if backend == "none" and stage in OPTIONAL_STAGES:
        backend = "skip"
    return backend, table
