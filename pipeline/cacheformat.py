"""The feature-cache format, defined once: paths, layout, attributes, markers — and a reader.

Both halves of mmemo use this module and nothing else of each other: `pipeline.store`
writes sets through it, `fusion.data` reads them through it. It imports nothing from the
project; numpy and the standard library at import time, zarr / xarray / torch only inside the
functions that need them, so `import pipeline.cacheformat` is cheap.

A cache root holds
    sets/<key>/                      one feature set (a Zarr v3 group; `key` = content hash)
    aliases/<dataset>/<preset>.json  {"key": ...}: the latest set of a dataset and preset
    claims/<key>/<unit>.claim        work-unit leases of running extractors
    srt/<key>/<clip id>.srt          subtitles read by the OCR stage
    srt/<key>/<clip id>.asr.srt      recognised speech segments; <clip id>.text.json: text source
and a set holds, for N clips,
    ids, split, group [N] str; label [N] int32 (-1: none)
    targets/<t>/value [N] float32, targets/<t>/present [N] bool   (regression targets)
    segment/start, segment/end [N] float64                         (CSD imports only)
    <m>/pooled [N, Dp] float16, <m>/present [N] bool               (every modality m)
    <m>/seq [N, T, D] float16, <m>/len [N] int32                   (sequence modalities)
    <m>/layers [N, L+1, Dl] float16   every hidden state's pooled vector (HF encoders only)
    units/header.done        checksums of everything written at creation (written last)
    units/<u>.done           a unit's completion marker (`UnitMarker`), written after its data
    ledger/<u>.jsonl         one JSON line per failed clip of unit u
    tmp/                     a writer's staging folder
with the set's attributes (`SetAttrs`) in the group attribute "mmemo". Per-clip arrays are
chunked along N by exactly one work unit of `unit_size` clips; only rows of units with a
marker (and a set with `units/header.done`) are valid: `completed_rows`.

Reading a set from your own code (see README, "Reading the cache from your own code"):
    s = open_set("cache", "ravdess", "offline")        # or open_set("cache", key=...)
    s.ids, s.split, s.label, s.pooled("audio"), s.seq("audio"), s.lengths("audio")
    s.to_xarray(); s.torch_dataset(["audio", "text"])
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1  # bump when a change makes existing sets unreadable or differently read
SUPPORTED_FORMATS = (FORMAT,)
ATTRS_KEY = "mmemo"  # the group attribute holding SetAttrs
COND = "cond"  # the conditioning vector: stored like a modality, never a fusion input

# --- paths inside a cache root -------------------------------------------------------------
SETS = "sets"
ALIASES = "aliases"
CLAIMS = "claims"
SRT = "srt"
GROUP_META = "zarr.json"  # a Zarr v3 group's (or array's) metadata file


def set_dir(root: Path | str, key: str) -> Path:
    return Path(root) / SETS / key


def alias_file(root: Path | str, dataset: str, preset: str) -> Path:
    return Path(root) / ALIASES / dataset / f"{preset}.json"


def claim_file(root: Path | str, key: str, unit: int) -> Path:
    return Path(root) / CLAIMS / key / f"{int(unit)}.claim"


def srt_file(root: Path | str, key: str, clip_id: str, kind: str = "ocr") -> Path:
    """Per-clip text outputs beside the set: `<id>.srt` (OCR cues), `<id>.asr.srt` (recognised
    speech segments), `<id>.text.json` (which text fed the text modality + the ASR result)."""
    name = {"ocr": f"{clip_id}.srt", "asr": f"{clip_id}.asr.srt", "text": f"{clip_id}.text.json"}[kind]
    return Path(root) / SRT / key / name


def is_set(path: Path | str) -> bool:
    return (Path(path) / GROUP_META).is_file()


# --- paths inside a set --------------------------------------------------------------------
IDS = "ids"
SPLIT = "split"
GROUP = "group"
LABEL = "label"
ROW_ARRAYS = (IDS, SPLIT, GROUP, LABEL)  # written at creation from the manifest
STRING_ARRAYS = (IDS, SPLIT, GROUP)
SEGMENT_START = "segment/start"
SEGMENT_END = "segment/end"
UNITS = "units"
LEDGER = "ledger"
STAGING = "tmp"
HEADER_MARKER = f"{UNITS}/header.done"
POOLED, PRESENT, SEQ, LEN = "pooled", "present", "seq", "len"  # a modality's parts
LAYERS = "layers"  # optional part: [N, L+1, Dl] per-hidden-state pooled vectors


def target_value(t: str) -> str:
    return f"targets/{t}/value"


def target_present(t: str) -> str:
    return f"targets/{t}/present"


def modality_array(m: str, part: str) -> str:
    """`<m>/pooled`, `<m>/present`, `<m>/seq`, `<m>/len` or `<m>/layers`."""
    if part not in (POOLED, PRESENT, SEQ, LEN, LAYERS):
        raise ValueError(f"unknown modality array {part!r} (pooled, present, seq, len, layers)")
    return f"{m}/{part}"


def pooled(m: str) -> str:
    return modality_array(m, POOLED)


def present(m: str) -> str:
    return modality_array(m, PRESENT)


def seq(m: str) -> str:
    return modality_array(m, SEQ)


def length(m: str) -> str:
    return modality_array(m, LEN)


def layer_stack(m: str) -> str:
    """`<m>/layers`: [N, L+1, Dl] float16, row l = hidden state l pooled over the clip."""
    return modality_array(m, LAYERS)


def done_marker(u: int) -> str:
    return f"{UNITS}/{u}.done"


def ledger_file(u: int) -> str:
    return f"{LEDGER}/{u}.jsonl"


CHUNKS = "/c/"  # Zarr v3 default chunk keys: array `rel`'s chunk files are `<rel>/c/<i>/...`


def chunk_prefix(rel: str) -> str:
    return f"{rel}{CHUNKS}"


class FormatError(ValueError):
    """A cache file is not what this format says (missing, unreadable, unsupported)."""


# --- layout --------------------------------------------------------------------------------
@dataclass
class ModalityLayout:
    """One modality's arrays: pooled [N, pooled_dim]; a sequence one also seq [N, max_len, seq_dim].

    A modality made by a transformer encoder (the full preset's hf-audio, whisper-encoder,
    hf-text and hf-vision backends) also keeps every hidden state pooled over the clip:
    layers [N, n_layers, layer_dim] (n_layers = L + 1: the embedding output and each of the L
    blocks, in the encoder's order), so a head can weight layers without a re-extraction.
    `n_layers = 0` (every other backend, and every set written before): no such array.
    """

    name: str
    pooled_dim: int
    seq_dim: int = 0  # 0: a vector modality (pooled only)
    max_len: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)
    n_layers: int = 0  # hidden states kept per clip (L + 1); 0: no `layers` array
    layer_dim: int = 0  # width of one hidden state

    @property
    def is_sequence(self) -> bool:
        return self.seq_dim > 0 and self.max_len > 0

    @property
    def kind(self) -> str:
        return "sequence" if self.is_sequence else "vector"

    @property
    def has_layers(self) -> bool:
        return self.n_layers > 0 and self.layer_dim > 0

    def arrays(self, n: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """relpath -> (shape, dtype) of this modality's per-clip arrays."""
        out = {
            pooled(self.name): ((n, self.pooled_dim), "float16"),
            present(self.name): ((n,), "bool"),
        }
        if self.is_sequence:
            out[seq(self.name)] = ((n, self.max_len, self.seq_dim), "float16")
            out[length(self.name)] = ((n,), "int32")
        if self.has_layers:
            out[layer_stack(self.name)] = ((n, self.n_layers, self.layer_dim), "float16")
        return out

    def paths(self) -> list[str]:
        """This modality's array paths: pooled, present, for a sequence seq, len, and layers."""
        return list(self.arrays(0))

    def to_json(self) -> dict[str, Any]:
        out = {"pooled_dim": self.pooled_dim, "seq_dim": self.seq_dim, "max_len": self.max_len,
               "kind": self.kind, "provenance": self.provenance}
        if self.has_layers:  # absent otherwise: layouts without layers read as before
            out |= {"n_layers": self.n_layers, "layer_dim": self.layer_dim}
        return out

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> ModalityLayout:
        """From `attrs["modalities"][name]`; a `kind: "vector"` entry has no sequence, an
        entry without `n_layers` (sets written before layers existed) no `layers` array."""
        is_seq = d.get("kind", "sequence") == "sequence"
        return cls(name=name, pooled_dim=int(d["pooled_dim"]),
                   seq_dim=int(d.get("seq_dim", 0) or 0) if is_seq else 0,
                   max_len=int(d.get("max_len", 0) or 0) if is_seq else 0,
                   provenance=dict(d.get("provenance") or {}),
                   n_layers=int(d.get("n_layers", 0) or 0), layer_dim=int(d.get("layer_dim", 0) or 0))


# Chunk storage defaults, defined here once (pipeline/presets.py:StoreSettings uses them):
# blosc-lz4 loads twice as fast as zstd at a slightly lower ratio (BENCHMARKS.md).
DEFAULT_COMPRESSION = "blosc-lz4"
DEFAULT_LEVEL = 3
DEFAULT_INNER_CHUNK = 128


@dataclass
class SetLayout:
    """Shapes and storage of a set's per-clip arrays; `unit_size` clips per chunk and per unit."""

    n: int
    unit_size: int
    modalities: dict[str, ModalityLayout]
    # how chunks are stored (the presets' [store] defaults are these constants)
    compression: str = DEFAULT_COMPRESSION  # zstd | blosc-lz4 | none
    level: int = DEFAULT_LEVEL
    inner_chunk: int = DEFAULT_INNER_CHUNK  # clips per inner chunk when a unit is larger (sharding)

    @property
    def n_units(self) -> int:
        return (self.n + self.unit_size - 1) // self.unit_size

    def unit_range(self, u: int) -> tuple[int, int]:
        return u * self.unit_size, min(self.n, (u + 1) * self.unit_size)

    def unit_arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for m in self.modalities.values():
            out.update(m.arrays(self.n))
        return out

    def to_json(self) -> dict[str, Any]:
        """The `layout` attribute (modalities are stored beside it, under `modalities`)."""
        return {
            "n": self.n,
            "unit_size": self.unit_size,
            "compression": self.compression,
            "level": self.level,
            "inner_chunk": self.inner_chunk,
        }


# --- attributes ----------------------------------------------------------------------------
# Named attributes in the order they are written; anything else a writer passes (the
# extractor's preset_config and code_version, an importer's `imported`) is kept after them.
_DESCRIPTIVE = ("dataset", "preset", "classes", "task", "group_by", "label_derived", "targets", "stages")


class SetAttrs:
    """The set attributes (`attrs["mmemo"]`), a typed view over their JSON dict.

    Reads go to the dict on every access, so the view always agrees with `raw`. Writers build
    the dict with `SetAttrs.new(...)`; readers wrap what they read with `SetAttrs(raw)`.
    Attributes: format, key, n, unit_size, layout (SetLayout.to_json), modalities (name ->
    ModalityLayout.to_json), dataset, preset, classes, task, group_by (manifest field that
    groups clips, e.g. speaker), label_derived (metadata fields derived from the label),
    targets (regression target names), stages (each stage's provenance), created_by,
    created_at, plus writer-specific extras (preset_config, code_version, imported).
    """

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    @classmethod
    def new(cls, key: str, layout: SetLayout, descriptive: Mapping[str, Any], created_by: str,
            created_at: str) -> SetAttrs:
        """The attributes of a new set: `descriptive` (dataset, preset, classes, ...) first."""
        raw: dict[str, Any] = {k: descriptive[k] for k in _DESCRIPTIVE if k in descriptive}
        raw.update({k: v for k, v in descriptive.items() if k not in raw})
        raw.update({
            "format": FORMAT,
            "key": key,
            "n": layout.n,
            "unit_size": layout.unit_size,
            "layout": layout.to_json(),
            "modalities": {name: m.to_json() for name, m in layout.modalities.items()},
            "created_by": created_by,
            "created_at": created_at,
        })
        return cls(raw)

    @classmethod
    def read(cls, group_attrs: Mapping[str, Any], where: str) -> SetAttrs:
        """From a zarr group's attributes; FormatError when absent or of another format."""
        raw = dict(group_attrs).get(ATTRS_KEY)
        if not isinstance(raw, dict):
            raise FormatError(f"{where} is not an mmemo feature set (no attrs['{ATTRS_KEY}'])")
        return cls(raw)

    def check_format(self, name: str) -> None:
        if self.raw.get("format") not in SUPPORTED_FORMATS:
            raise FormatError(f"feature set {name}: format {self.raw.get('format')!r} is not "
                              f"supported (this mmemo reads {SUPPORTED_FORMATS})")

    # identity
    @property
    def format(self) -> Any:
        return self.raw.get("format")

    @property
    def key(self) -> str | None:
        return self.raw.get("key")

    @property
    def n(self) -> int | None:
        return self.raw.get("n")

    @property
    def unit_size(self) -> int:
        return int(self.raw.get("unit_size", 0))

    @property
    def dataset(self) -> str | None:
        return self.raw.get("dataset")

    @property
    def preset(self) -> str | None:
        return self.raw.get("preset")

    # labels and grouping
    @property
    def classes(self) -> list[str]:
        return list(self.raw.get("classes") or [])

    @property
    def task(self) -> str:
        return str(self.raw.get("task", "classification"))

    @property
    def group_by(self) -> str | None:
        return self.raw.get("group_by")

    @property
    def label_derived(self) -> list[str]:
        return list(self.raw.get("label_derived") or [])

    @property
    def targets(self) -> list[str]:
        return list(self.raw.get("targets") or [])

    # provenance
    @property
    def stages(self) -> list[dict[str, Any]]:
        return list(self.raw.get("stages") or [])

    @property
    def preset_config(self) -> dict[str, Any] | None:
        return self.raw.get("preset_config")

    @property
    def created_by(self) -> str:
        return str(self.raw.get("created_by", "?"))

    @property
    def created_at(self) -> str:
        return str(self.raw.get("created_at", "?"))

    # layout
    @property
    def modality_names(self) -> tuple[str, ...]:
        """Every stored modality, the conditioning vector included."""
        return tuple(self.raw.get("modalities") or {})

    def modality(self, m: str) -> ModalityLayout:
        return ModalityLayout.from_json(m, self.raw["modalities"][m])

    def modality_info(self, m: str) -> dict[str, Any]:
        """The raw `modalities[m]` entry (pooled_dim, seq_dim, max_len, kind, provenance)."""
        return self.raw["modalities"][m]

    def layout(self) -> SetLayout:
        lj = self.raw["layout"]
        return SetLayout(
            n=lj["n"],
            unit_size=lj["unit_size"],
            modalities={m: self.modality(m) for m in self.modality_names},
            compression=lj["compression"],
            level=lj["level"],
            inner_chunk=lj["inner_chunk"],
        )


# --- completion markers --------------------------------------------------------------------
@dataclass
class UnitMarker:
    """`units/<u>.done`: unit u's rows [start, stop) are complete; written after its data.

    `checksums` maps every file the unit wrote (relative to the set) to its sha256;
    `n_failures` counts its lines in `ledger/<u>.jsonl`. Writers may add fields (`extra`,
    e.g. the extractor's per-stage version stamp `stages`).
    """

    unit: int | str
    start: int
    stop: int
    checksums: dict[str, str] = field(default_factory=dict)
    n_failures: int = 0
    by: str = ""
    at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "start": self.start, "stop": self.stop, "checksums": self.checksums,
                "n_failures": self.n_failures, "by": self.by, "at": self.at, **self.extra}

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name, extras included (`marker.get("stages")`)."""
        if name in ("unit", "start", "stop", "checksums", "n_failures", "by", "at"):
            return getattr(self, name)
        return self.extra.get(name, default)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], file_name: str, unit_size: int, n: int,
                  where: str = "") -> UnitMarker:
        """From a marker's JSON; an old marker without start/stop gets its unit's span."""
        d = dict(d)
        unit = d.pop("unit", file_name[: -len(".done")])
        if "start" in d and "stop" in d:
            start, stop = int(d.pop("start")), int(d.pop("stop"))
        else:
            try:
                u = int(str(unit).lstrip("u"))
            except ValueError as e:
                raise FormatError(f"{where}marker {file_name} has no start/stop and its unit name "
                                  "is not an index") from e
            start, stop = u * unit_size, min((u + 1) * unit_size, n)
        return cls(unit=unit, start=start, stop=stop, checksums=dict(d.pop("checksums", {}) or {}),
                   n_failures=int(d.pop("n_failures", 0) or 0), by=str(d.pop("by", "")),
                   at=str(d.pop("at", "")), extra=d)


def marker_files(set_path: Path | str) -> dict[int, Path]:
    """unit index -> its marker file (the header marker and odd names excluded)."""
    udir = Path(set_path) / UNITS
    out: dict[int, Path] = {}
    if udir.is_dir():
        for p in udir.glob("*.done"):
            if p.stem.isdigit():
                out[int(p.stem)] = p
    return out


def read_markers(set_path: Path | str, unit_size: int, n: int, where: str = "") -> list[UnitMarker]:
    """Every unit's completion marker, by start row; FormatError on an unreadable one."""
    udir = Path(set_path) / UNITS
    markers = []
    for f in sorted(udir.glob("*.done")) if udir.is_dir() else []:
        if f.name == Path(HEADER_MARKER).name:
            continue
        try:
            d = json.loads(f.read_text())
        except ValueError as e:
            raise FormatError(f"{where}unreadable marker {f.name}: {e}") from e
        markers.append(UnitMarker.from_json(d, f.name, unit_size, n, where))
    return sorted(markers, key=lambda m: m.start)


def completed_rows(n: int, markers: Iterable[UnitMarker | tuple[int, int]], header: bool = True) -> np.ndarray:
    """[n] bool: rows covered by a completion marker (none when the set's header is missing)."""
    mask = np.zeros(n, dtype=bool)
    if not header:
        return mask
    for m in markers:
        start, stop = (m.start, m.stop) if isinstance(m, UnitMarker) else m
        mask[max(0, int(start)): min(n, int(stop))] = True
    return mask


# --- aliases -------------------------------------------------------------------------------
def read_alias(root: Path | str, dataset: str, preset: str) -> str | None:
    """The key an alias points to; None when there is no such alias."""
    path = alias_file(root, dataset, preset)
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["key"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"alias file {path} is not {{'key': ...}} JSON: {e}") from e


def alias_json(key: str, by: str, at: str) -> dict[str, Any]:
    return {"key": key, "by": by, "at": at}


def alias_presets(root: Path | str, dataset: str) -> list[str]:
    """Presets with an alias for `dataset`."""
    return sorted(p.stem for p in (Path(root) / ALIASES / dataset).glob("*.json"))


def all_aliases(root: Path | str) -> dict[str, str]:
    """`dataset/preset` -> key for every readable alias."""
    out = {}
    adir = Path(root) / ALIASES
    if adir.is_dir():
        for p in adir.glob("*/*.json"):
            try:
                out[f"{p.parent.name}/{p.stem}"] = json.loads(p.read_text())["key"]
            except (OSError, ValueError, KeyError):
                continue
    return out


def resolve_set(root: Path | str, dataset: str | None = None, preset: str = "offline",
                key: str | None = None) -> Path:
    """The folder of a set given by key, or by its `dataset`/`preset` alias; FormatError if none."""
    root = Path(root)
    if key is None:
        if dataset is None:
            raise FormatError("open_set needs a key, or a dataset (and preset) to look up an alias")
        key = read_alias(root, dataset, preset)
        if key is None:
            have = alias_presets(root, dataset)
            hint = f"presets extracted for {dataset!r}: {have}" if have else "run `mmemo extract` first"
            raise FormatError(f"no feature set for dataset {dataset!r}, preset {preset!r} in {root} ({hint})")
    path = set_dir(root, key)
    if not is_set(path):
        known = sorted(p.name for p in (root / SETS).glob("*") if p.is_dir())
        raise FormatError(f"feature set {key!r} not found under {root / SETS} (known: {known})")
    return path


# --- fast whole-shard reads -----------------------------------------------------------------
# zarr's generic read path spends milliseconds of asyncio and per-chunk bookkeeping on every
# inner chunk; for the layouts mmemo writes (one shard file or chunk file per work unit along
# N, little-endian `bytes` + zstd/blosc, sharding index at the end) a unit can be read with one
# `read()` of its file and its inner chunks decoded on a few threads (numcodecs releases the GIL
# while decompressing). Anything else — other codecs, other stores, string arrays — goes
# through zarr unchanged, so the fast path is an optimisation, never a second format.
_NO_CHUNK = 2**64 - 1


def _read_threads() -> int:
    import os

    env = os.environ.get("MMEMO_READ_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))


_POOLS: dict[int, Any] = {}


def _pool() -> Any:
    """The read thread pool of this process (a forked child, e.g. a DataLoader worker, gets its
    own: the parent's threads do not exist there)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = ThreadPoolExecutor(max_workers=_read_threads(), thread_name_prefix="mmemo-read")
    return _POOLS[pid]


def _copy_into(src: Any, out: np.ndarray) -> None:
    flat = out.reshape(-1).view(np.uint8)
    if len(src) != flat.nbytes:
        raise FormatError(f"chunk holds {len(src)} bytes, expected {flat.nbytes}")
    flat[:] = np.frombuffer(src, dtype=np.uint8)


def _decoder(codecs: tuple[dict[str, Any], ...]) -> Any:
    """`decode(src, out)` filling the C-contiguous array `out` (one whole chunk) for
    [bytes(little), zstd|blosc], or None when the codecs are not these."""
    if not codecs or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if endian not in ("little", None) or len(codecs) > 2:
        return None
    if len(codecs) == 1:
        return _copy_into
    name = codecs[1].get("name")
    if name == "zstd":
        from numcodecs import Zstd

        codec = Zstd()
    elif name == "blosc":
        from numcodecs import Blosc

        codec = Blosc()  # blosc frames carry their own shuffle/typesize header
    else:
        return None

    def decode(src: Any, out: np.ndarray) -> None:
        codec.decode(src, out=out.reshape(-1).view(np.uint8))

    return decode


@dataclass(frozen=True)
class _FastLayout:
    root: Path  # the array's folder
    shape: tuple[int, ...]
    dtype: np.dtype
    block: tuple[int, ...]  # shard (or chunk) shape = one file
    inner: tuple[int, ...]  # inner chunk shape (== block when not sharded)
    fill: Any
    decode: Any
    sharded: bool
    index_crc: bool = False  # the shard index is followed by its crc32c (zarr's default)


def _fast_layout(arr: Any) -> _FastLayout | None:
    try:
        from zarr.storage import LocalStore

        if not isinstance(arr.store, LocalStore) or arr.metadata.zarr_format != 3:
            return None
        meta = arr.metadata.to_dict()
        dtype = np.dtype(arr.dtype)
        if dtype.kind not in "biuf" or dtype.byteorder == ">":
            return None
        grid = meta["chunk_grid"]
        enc = meta["chunk_key_encoding"]
        if grid["name"] != "regular" or enc["name"] != "default" or \
                enc.get("configuration", {}).get("separator", "/") != "/":
            return None
        if meta.get("storage_transformers"):
            return None
        block = tuple(int(x) for x in grid["configuration"]["chunk_shape"])
        codecs = tuple(meta["codecs"])
        sharded = len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
        if sharded:
            conf = codecs[0]["configuration"]
            idx = [c["name"] for c in conf["index_codecs"]]
            if conf.get("index_location", "end") != "end" or idx not in (["bytes"], ["bytes", "crc32c"]):
                return None
            inner = tuple(int(x) for x in conf["chunk_shape"])
            index_crc = idx == ["bytes", "crc32c"]
            decode = _decoder(tuple(conf["codecs"]))
            if any(b % i for b, i in zip(block, inner, strict=True)) or len(block) != len(arr.shape):
                return None
        else:
            inner, index_crc = block, False
            decode = _decoder(codecs)
        if decode is None or any(b != s for b, s in zip(block[1:], arr.shape[1:], strict=True)):
            return None  # only arrays chunked along the first axis alone
        root = Path(arr.store.root) / arr.path
        return _FastLayout(root, tuple(arr.shape), dtype, block, inner, meta.get("fill_value", 0),
                           decode, sharded, index_crc)
    except Exception:  # noqa: BLE001 - anything unexpected: let zarr read it
        return None


def _decode_part(lay: _FastLayout, src: Any, dst: np.ndarray, a: int, z: int) -> None:
    """Rows a..z of one encoded chunk into `dst` (decoded in place when it is the whole chunk)."""
    if a == 0 and z == lay.inner[0] and dst.flags.c_contiguous:
        lay.decode(src, dst)
        return
    tmp = np.empty(lay.inner, dtype=lay.dtype)
    lay.decode(src, tmp)
    dst[...] = tmp[a:z]


def _block_file(lay: _FastLayout, b: int) -> Path:
    return lay.root / "c" / "/".join([str(b)] + ["0"] * (len(lay.shape) - 1))


def _read_block(lay: _FastLayout, b: int, out: np.ndarray, lo: int, hi: int) -> None:
    """Fill `out` (rows lo..hi of the array, all inside block b) from block b's file."""
    n0 = b * lay.block[0]
    path = _block_file(lay, b)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        out[...] = lay.fill
        return
    if not lay.sharded:
        _decode_part(lay, data, out, lo - n0, hi - n0)
        return
    n_inner = lay.block[0] // lay.inner[0]
    index_bytes = n_inner * 16
    extra = 4 if lay.index_crc else 0
    start = len(data) - index_bytes - extra
    if start < 0:
        raise FormatError(f"{path}: shard file too short for its index ({len(data)} bytes)")
    if lay.index_crc:
        import google_crc32c

        want = int.from_bytes(data[start + index_bytes:], "little")
        if google_crc32c.value(data[start:start + index_bytes]) != want:
            raise FormatError(f"{path}: shard index checksum mismatch (corrupt or partly written file)")
    index = np.frombuffer(data, dtype="<u8", count=n_inner * 2, offset=start).reshape(n_inner, 2)
    k = lay.inner[0]
    view = memoryview(data)
    for i in range(n_inner):
        c_lo, c_hi = n0 + i * k, n0 + (i + 1) * k
        s_lo, s_hi = max(lo, c_lo), min(hi, c_hi)
        if s_lo >= s_hi:
            continue
        off, nb = int(index[i, 0]), int(index[i, 1])
        dst = out[s_lo - lo:s_hi - lo]
        if off == _NO_CHUNK and nb == _NO_CHUNK:
            dst[...] = lay.fill
            continue
        _decode_part(lay, view[off:off + nb], dst, s_lo - c_lo, s_hi - c_lo)


def read_slice(arr: Any, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of a per-clip array: whole unit files read and decoded on a thread pool."""
    lo, hi = max(0, int(lo)), min(int(arr.shape[0]), int(hi))
    lay = _fast_layout(arr)
    if lay is None or hi <= lo:
        return np.asarray(arr[lo:hi])
    out = np.empty((hi - lo, *lay.shape[1:]), dtype=lay.dtype)
    bs = lay.block[0]
    jobs = [(b, max(lo, b * bs), min(hi, (b + 1) * bs)) for b in range(lo // bs, (hi - 1) // bs + 1)]
    if len(jobs) == 1:
        b, a, z = jobs[0]
        _read_block(lay, b, out[a - lo:z - lo], a, z)
        return out
    futs = [_pool().submit(_read_block, lay, b, out[a - lo:z - lo], a, z) for b, a, z in jobs]
    for f in futs:
        f.result()
    return out


def read_units(arr: Any, rows: np.ndarray) -> np.ndarray:
    """`rows` of a per-clip array (any order), reading only the unit files that hold them."""
    lay = _fast_layout(arr)
    if lay is None:
        return np.asarray(arr.oindex[rows])
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > 1 and np.any(rows[1:] < rows[:-1]):
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *lay.shape[1:]), dtype=lay.dtype)
        out[order] = read_units(arr, rows[order])
        return out
    bs = lay.block[0]
    out = np.empty((len(rows), *lay.shape[1:]), dtype=lay.dtype)
    blocks = rows // bs
    starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
    ends = np.r_[starts[1:], len(rows)]

    def one(s: int, e: int) -> None:
        r = rows[s:e]
        a, z = int(r[0]), int(r[-1]) + 1
        buf = np.empty((z - a, *lay.shape[1:]), dtype=lay.dtype)
        _read_block(lay, int(blocks[s]), buf, a, z)
        out[s:e] = buf[r - a]

    futs = [_pool().submit(one, int(s), int(e)) for s, e in zip(starts, ends, strict=True)]
    for f in futs:
        f.result()
    return out


# --- reading -------------------------------------------------------------------------------
def read_rows(arr: Any, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted) of a chunked-along-N zarr array, touching only the chunks that hold them.

    Dense selections (the usual case: whole completed units) read one bounding slice;
    sparse ones read only the unit files that hold a row, so unrelated units are never decoded.
    """
    if len(rows) == 0:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if len(rows) == hi - lo:
        return read_slice(arr, lo, hi)
    if len(rows) * 2 >= hi - lo:
        return read_slice(arr, lo, hi)[rows - lo]
    return read_units(arr, np.asarray(rows, dtype=np.int64))


def as_strings(values: Any) -> np.ndarray:
    """A zarr string array's values as a numpy unicode array (zarr 3 returns StringDType/object)."""
    return np.asarray(values, dtype=object).astype(str)


class SetReader:
    """One set opened read-only, all N rows; `complete` marks the rows that may be used.

    The low-level reader (fusion's FeatureSet builds on it); for numpy arrays of the completed
    rows only, use `open_set`.
    """

    def __init__(self, path: Path | str):
        import zarr

        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs = SetAttrs.read(self.group.attrs.asdict(), str(self.path))
        self.attrs.check_format(self.name)

    @property
    def key(self) -> str:
        return str(self.attrs.key or self.path.name)

    @property
    def name(self) -> str:
        """How errors name the set: dataset/preset and the key."""
        return f"{self.attrs.raw.get('dataset', '?')}/{self.attrs.raw.get('preset', '?')} ({self.path.name})"

    @property
    def n(self) -> int:
        return int(self.group[IDS].shape[0])

    def array(self, rel: str) -> Any:
        return self.group[rel]

    def has(self, rel: str) -> bool:
        try:
            self.group[rel]
        except KeyError:
            return False
        return True

    def read(self, rel: str, rows: np.ndarray | None = None) -> np.ndarray:
        arr = self.group[rel]
        return read_slice(arr, 0, arr.shape[0]) if rows is None else read_rows(arr, rows)

    def strings(self, rel: str) -> np.ndarray:
        return as_strings(self.group[rel][:])

    def markers(self) -> list[UnitMarker]:
        return read_markers(self.path, self.attrs.unit_size, self.n, f"feature set {self.name}: ")

    def header_done(self) -> bool:
        return (self.path / HEADER_MARKER).is_file()

    def complete(self) -> np.ndarray:
        return completed_rows(self.n, self.markers(), self.header_done())


def open_set(cache: Path | str, dataset: str | None = None, preset: str = "offline",
             key: str | None = None) -> CachedSet:
    """Open a feature set for reading: by `key`, or by the alias of `dataset` and `preset`.

    Returns a `CachedSet` whose arrays hold only the completed rows (units with a marker).
    Raises FormatError (a ValueError) naming what is missing.
    """
    return CachedSet(SetReader(resolve_set(cache, dataset, preset, key)))


class CachedSet:
    """The completed rows of one set as numpy arrays, plus xarray and torch views.

    Row arrays (`ids`, `split`, `group`, `label`, `targets`) and per-modality arrays
    (`pooled(m)` [R, Dp] float32, `present(m)` [R] bool, `seq(m)` [R, T, D] float32,
    `lengths(m)` [R] int64) all have R = number of completed rows, in set order; `rows` gives
    their row numbers in the set. A modality absent for a clip (`present` False) holds zeros
    there: use the mask. Sequences are padded to T; steps at or beyond `lengths` are padding.
    """

    def __init__(self, reader: SetReader):
        self.reader = reader
        self.attrs = reader.attrs
        self.rows = np.flatnonzero(reader.complete())

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"CachedSet({self.reader.name}: {len(self)}/{self.reader.n} rows, modalities {list(self.modalities)})"

    @property
    def key(self) -> str:
        return self.reader.key

    @property
    def classes(self) -> list[str]:
        return self.attrs.classes

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every stored modality (the conditioning vector `cond` included, when there is one)."""
        return self.attrs.modality_names

    def layout(self, m: str) -> ModalityLayout:
        return self.attrs.modality(m)

    def _strings(self, rel: str) -> np.ndarray:
        return self.reader.strings(rel)[self.rows]

    @cached_property
    def ids(self) -> np.ndarray:
        return self._strings(IDS)

    @cached_property
    def split(self) -> np.ndarray:
        return self._strings(SPLIT)

    @cached_property
    def group(self) -> np.ndarray:
        return self._strings(GROUP)

    @cached_property
    def label(self) -> np.ndarray:
        """Class index into `classes`, -1 where the clip has no label."""
        return self.reader.read(LABEL, self.rows).astype(np.int64)

    @cached_property
    def targets(self) -> dict[str, np.ndarray]:
        """Regression targets by name, float32 with NaN where absent."""
        out = {}
        for t in self.attrs.targets:
            v = self.reader.read(target_value(t), self.rows).astype(np.float32)
            p = self.reader.read(target_present(t), self.rows).astype(bool)
            out[t] = np.where(p, v, np.float32(np.nan)).astype(np.float32)
        return out

    def present(self, m: str) -> np.ndarray:
        return self.reader.read(present(m), self.rows).astype(bool)

    def pooled(self, m: str) -> np.ndarray:
        return self.reader.read(pooled(m), self.rows).astype(np.float32)

    def seq(self, m: str) -> np.ndarray:
        self._need_sequence(m)
        return self.reader.read(seq(m), self.rows).astype(np.float32)

    def lengths(self, m: str) -> np.ndarray:
        self._need_sequence(m)
        return self.reader.read(length(m), self.rows).astype(np.int64)

    def layers(self, m: str) -> np.ndarray:
        """[R, L+1, Dl] float32: hidden state l of the encoder pooled over the clip (row l);
        KeyError for a modality stored without layers (offline backends, older sets)."""
        if m not in self.modalities or not self.layout(m).has_layers:
            raise KeyError(f"modality {m!r} of {self.reader.name} has no layers array "
                           "(only the full preset's transformer encoders store one)")
        return self.reader.read(layer_stack(m), self.rows).astype(np.float32)

    def modality(self, m: str, with_seq: bool = True) -> dict[str, np.ndarray]:
        """{"pooled", "present"}, for a sequence modality {"seq", "len"}, and {"layers"} when
        the modality has them."""
        out = {"pooled": self.pooled(m), "present": self.present(m)}
        if with_seq and self.layout(m).is_sequence:
            out["seq"] = self.seq(m)
            out["len"] = self.lengths(m)
        if self.layout(m).has_layers:
            out["layers"] = self.layers(m)
        return out

    def _need_sequence(self, m: str) -> None:
        if m not in self.modalities:
            raise KeyError(f"feature set {self.reader.name} has no modality {m!r} (it has {list(self.modalities)})")
        if not self.layout(m).is_sequence:
            raise KeyError(f"modality {m!r} of {self.reader.name} is a vector: it has pooled/present only")

    def _mods(self, modalities: Iterable[str] | None) -> list[str]:
        mods = list(self.modalities if modalities is None else modalities)
        unknown = [m for m in mods if m not in self.modalities]
        if unknown:
            raise KeyError(f"feature set {self.reader.name} has no modality {unknown} (it has {list(self.modalities)})")
        return mods

    def to_xarray(self, modalities: Iterable[str] | None = None, sequences: bool = True) -> Any:
        """An `xarray.Dataset` over dimension `clip` (coordinate: the clip ids).

        Variables: split, group, label, target_<t>, and per modality `<m>_pooled` (clip,
        <m>_feature), `<m>_present` (clip) and, when `sequences`, `<m>_seq` (clip, <m>_time,
        <m>_seq_feature) and `<m>_len` (clip), and where stored `<m>_layers` (clip, <m>_layer,
        <m>_layer_feature). Attributes: key, dataset, preset, classes (JSON).
        """
        import xarray as xr

        data: dict[str, Any] = {
            "split": ("clip", self.split),
            "group": ("clip", self.group),
            "label": ("clip", self.label),
        }
        for t, v in self.targets.items():
            data[f"target_{t}"] = ("clip", v)
        for m in self._mods(modalities):
            data[f"{m}_pooled"] = (("clip", f"{m}_feature"), self.pooled(m))
            data[f"{m}_present"] = ("clip", self.present(m))
            if sequences and self.layout(m).is_sequence:
                data[f"{m}_seq"] = (("clip", f"{m}_time", f"{m}_seq_feature"), self.seq(m))
                data[f"{m}_len"] = ("clip", self.lengths(m))
            if self.layout(m).has_layers:
                data[f"{m}_layers"] = (("clip", f"{m}_layer", f"{m}_layer_feature"), self.layers(m))
        return xr.Dataset(data, coords={"clip": self.ids},
                          attrs={"key": self.key, "dataset": str(self.attrs.dataset),
                                 "preset": str(self.attrs.preset), "classes": json.dumps(self.classes)})

    def torch_dataset(self, modalities: Iterable[str] | None = None, split: str | None = None,
                      sequences: bool = True) -> Any:
        """A `torch.utils.data.Dataset` of per-clip dicts (for a DataLoader's default collate).

        Item: {"id": str, "split": str, "label": int64 tensor, "targets": {t: float32 (NaN:
        absent)}, m: {"pooled" [Dp], "present" bool, and for sequences "seq" [T, D],
        "len" int64, "mask" [T] bool (True on real steps of a present clip)}}.
        `split` keeps only the clips of that split.
        """
        return _torch_set_class()(self, self._mods(modalities), split, sequences)


@functools.cache
def _torch_set_class() -> type:
    """The Dataset class, defined on first use so that importing this module never imports torch."""
    import torch
    from torch.utils.data import Dataset

    class TorchSet(Dataset):
        def __init__(self, s: CachedSet, mods: list[str], split: str | None, sequences: bool):
            sel = np.ones(len(s), bool) if split is None else (s.split == split)
            self.ids = s.ids[sel]
            self.split = s.split[sel]
            self.label = torch.from_numpy(s.label[sel])
            self.targets = {t: torch.from_numpy(v[sel]) for t, v in s.targets.items()}
            self.mods: dict[str, dict[str, torch.Tensor]] = {}
            for m in mods:
                d = s.modality(m, with_seq=sequences)
                t = {k: torch.from_numpy(np.ascontiguousarray(v[sel])) for k, v in d.items()}
                if "seq" in t:
                    steps = torch.arange(t["seq"].shape[1])
                    t["mask"] = (steps[None, :] < t["len"][:, None]) & t["present"][:, None]
                self.mods[m] = t

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, Any]:
            item: dict[str, Any] = {"id": str(self.ids[i]), "split": str(self.split[i]), "label": self.label[i],
                                    "targets": {t: v[i] for t, v in self.targets.items()}}
            for m, t in self.mods.items():
                item[m] = {k: v[i] for k, v in t.items()}
            return item

    return TorchSet
