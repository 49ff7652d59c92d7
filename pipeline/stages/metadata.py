"""Metadata stage: clip fields and manifest metadata -> one fixed-size vector (hashing trick).

Why hashing: the vector size must be known before any clip runs (the cache allocates
``meta/pooled [N, dim]`` up front), while the set of categories (ages, genders, topics ...)
is only known after reading every clip. Each field is hashed to a slot with a sign, so the
vector never grows and needs no vocabulary pass.

* Categorical values (str, bool): ``+-1`` at ``hash("key=value")``.
* Numeric values: the scaled value (``scale[key]`` divisor, then signed log by default) at
  ``hash("key")``.
* Lists of scalars: every element as a categorical value of the key.

Nested metadata is flattened to dotted keys (``profile.age``). Keys the dataset marks as
label-derived (``dataset.json`` ``label_derived``, patterns like ``chain_of_empathy.*``) are
never used by default; using one requires naming it in ``fields`` AND
``include_label_derived = true``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.manifest import MANIFEST_DIR, read_dataset_info
from pipeline.stages.base import ClipContext, ClipError, Feature, Stage, StageConfig, register

# Clip attributes usable as fields besides metadata keys. ``turn`` (dialogue position) is in
# the default set; identity fields (speaker, dialogue_id) only when named, because hashing
# an identity lets a head memorise people instead of emotions.
CLIP_FIELDS = ("turn", "speaker", "dialogue_id", "start", "end")
DEFAULT_CLIP_FIELDS = ("turn",)


class MetadataConfig(StageConfig):
    dim: int = Field(32, ge=2)
    fields: list[str] | None = None  # None: turn + every non-label-derived scalar metadata key
    include_label_derived: bool = False  # allow label-derived keys that `fields` names
    numeric: Literal["signed_log", "raw"] = "signed_log"
    scale: dict[str, float] = Field(default_factory=dict)  # key -> divisor before `numeric`


def flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; other values unchanged."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def matches(key: str, patterns: list[str]) -> bool:
    """``a.*`` matches ``a.b``; a bare ``a`` matches ``a`` and everything under ``a.``."""
    return any(fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns)


def _slot(token: str, dim: int) -> tuple[int, float]:
    """Stable (index, sign) for a token: blake2b, not Python's salted hash()."""
    h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "big")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, bool, int, float)) and not (isinstance(v, float) and math.isnan(v))


@register
class ManifestMetadata(Stage):
    """Hashing-trick vector of categorical and numeric clip facts (no model)."""

    name: ClassVar[str] = "metadata"
    needs_media: ClassVar[bool] = False  # clip facts come from the manifest
    backend: ClassVar[str] = "manifest"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = MetadataConfig
    config: MetadataConfig

    def __init__(self, config: Any = None, device: str = "cpu"):
        super().__init__(config, device)
        self._label_derived: dict[str, list[str]] = {}  # dataset -> patterns

    def bind_dataset(self, info: dict[str, Any]) -> None:
        """Dataset facts from dataset.json (the runner calls this; else it is read lazily)."""
        self._label_derived[str(info.get("name", ""))] = list(info.get("label_derived") or [])

    def output_dims(self) -> dict[str, tuple[int, int]]:
        return {"meta": (0, self.config.dim)}

    def label_derived(self, dataset: str) -> list[str]:
        if dataset not in self._label_derived:
            info = read_dataset_info(dataset, MANIFEST_DIR)
            self._label_derived[dataset] = list(info.get("label_derived") or [])
        return self._label_derived[dataset]

    def values(self, ctx: ClipContext) -> dict[str, Any]:
        """The (key, value) pairs of this clip that go into the vector."""
        clip = ctx.clip
        meta = flatten(clip.metadata)
        derived = self.label_derived(clip.dataset)
        avail = {f: getattr(clip, f) for f in CLIP_FIELDS} | meta
        if self.config.fields is None:
            keys = [*DEFAULT_CLIP_FIELDS, *(k for k in meta if not matches(k, derived))]
        else:
            keys = list(self.config.fields)
            bad = [k for k in keys if matches(k, derived)]
            if bad and not self.config.include_label_derived:
                raise ClipError(
                    f"metadata field(s) {bad} are label-derived for dataset '{clip.dataset}' "
                    "(dataset.json label_derived); set metadata.include_label_derived=true to "
                    "use them on purpose"
                )
        return {k: avail[k] for k in keys if avail.get(k) is not None}

    def _numeric(self, key: str, x: float) -> float:
        x = x / self.config.scale.get(key, 1.0)
        if self.config.numeric == "signed_log":
            x = math.copysign(math.log1p(abs(x)), x)
        return x

    def vector(self, values: dict[str, Any]) -> np.ndarray:
        vec = np.zeros(self.config.dim, dtype=np.float32)
        for key, v in values.items():
            items = v if isinstance(v, (list, tuple)) else [v]
            for item in items:
                if not _is_scalar(item) or (isinstance(item, float) and math.isinf(item)):
                    continue
                if isinstance(item, str) and not item.strip():
                    continue
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    if isinstance(v, (list, tuple)):
                        item = str(item)  # list elements are categories
                    else:
                        i, s = _slot(key, self.config.dim)
                        vec[i] += s * self._numeric(key, float(item))
                        continue
                i, s = _slot(f"{key}={str(item).strip().lower()}", self.config.dim)
                vec[i] += s
        return vec

    def process_one(self, ctx: ClipContext) -> None:
        values = self.values(ctx)
        if not values:
            ctx.absent["meta"] = "no metadata fields for this clip"
            return
        ctx.features["meta"] = Feature(pooled=self.vector(values))
