"""Planning an extraction: what a feature set will be, before anything runs.

`plan_extract` reads the manifest (or takes clips in memory) and the preset, builds the stages
(without loading models), fingerprints the media, derives the set's layout and its content
key. The runner (pipeline/runner.py) executes a `Plan`; nothing here writes to the cache.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cacheformat as cachefmt
from pipeline.cacheformat import ModalityLayout, SetLayout
from pipeline.manifest import TARGETS, Clip, load_dataset, read_dataset_info
from pipeline.presets import STAGE_ORDER, Preset, load_preset
from pipeline.stages.base import Stage, get_backend

CODE_VERSION = "1"
FP_BYTES = 64 * 1024
# modalities whose sequence is stored (others are vectors)
SEQUENCE_MODALITIES = ("audio", "text", "visual")


def build_stages(preset: Preset | dict[str, Any], device: str = "cpu", info: dict[str, Any] | None = None) -> list[Stage]:
    """The preset's stages in DAG order ('skip' leaves a stage out); models are not loaded."""
    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    stages = []
    for name in STAGE_ORDER:
        pick = preset.stages[name]
        if pick.skipped:
            continue
        stage = get_backend(name, pick.backend)(pick.config, device=device)
        stage.bind_dataset(info or {})
        stages.append(stage)
    return stages


def media_fingerprint(path: Path, root: Path | None = None) -> str:
    """size + mtime + hash of the first and last 64 KiB: cheap on NFS, catches re-encodes.

    Only regular files are opened (symlinks inside `root` are followed: media on another disk):
    a FIFO or device would block or never end. Those get a marker instead; the decode stage
    then fails the clip with a ledger line.
    """
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError, OSError) as e:
        return f"missing:{type(e).__name__}"
    except RuntimeError:  # symlink loop (Python < 3.13)
        return "missing:loop"
    if not stat.S_ISREG(st.st_mode):
        return f"special:{stat.S_IFMT(st.st_mode):o}"
    if root is not None:
        try:
            path.resolve(strict=True)  # symlinks inside the root are followed (media on another disk)
        except (OSError, RuntimeError) as e:
            return f"unresolvable:{type(e).__name__}"
    h = hashlib.sha256()
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since stat(), open must not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "special:changed"
            h.update(f.read(FP_BYTES))
            if st.st_size > 2 * FP_BYTES:
                f.seek(-FP_BYTES, os.SEEK_END)
                h.update(f.read(FP_BYTES))
    except OSError as e:
        return f"unreadable:{type(e).__name__}"
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:16]}"


def clip_fingerprint(clip: Clip, root: Path) -> str:
    parts = []
    for rel in (clip.video, clip.audio):
        parts.append(media_fingerprint(root / rel, root) if rel else "-")
    return "|".join(parts)


def fingerprint_bytes(fingerprint: str) -> int:
    """The media bytes a clip fingerprint records (its files' sizes; 0 for a missing one)."""
    total = 0
    for part in fingerprint.split("|"):
        size = part.split(":", 1)[0]
        total += int(size) if size.isdigit() else 0
    return total


@dataclass
class Plan:
    dataset: str
    preset: Preset
    root: Path
    clips: list[Clip]
    info: dict[str, Any]
    stages: list[Stage]
    layout: SetLayout
    key: str
    device: str = "cpu"
    # the key without the labels: two plans with the same digest extract the same features
    # row for row (see features_digest); the runner reuses such a set's finished units
    features_digest: str = ""
    # bytes of each clip's media files (0 when missing): the runner hands out the units with
    # the most media first, so that a long clip does not start last and keep one worker busy
    # while the others idle
    media_bytes: list[int] = field(default_factory=list)

    @property
    def preset_name(self) -> str:
        return self.preset.name


MIN_UNITS = 8  # "auto" unit size: a small set is cut into at least this many units


def resolve_unit_size(value: Any, n: int) -> int:
    """`store.unit_size`: clips per work unit (= per chunk file), or "auto".

    "auto" cuts a set of up to 256 clips into at least MIN_UNITS units (n / 8 clips each,
    rounded up: 6 clips are 6 units, 160 clips 8 units of 20), and is 32 clips up to 2,048
    clips, 64 up to 4,096, and 128 beyond (the size doubles while the set would still have more
    than 64 units). Small units keep a small set spread over many workers (a 6-video set was
    one unit, and one of two workers did all of it) and make resumption fine-grained; on a
    large set they make thousands of small chunk files per array, and reading those, not
    decoding, becomes most of a fit's set-up (10k clips: 3.2 s at 32 clips per chunk, 0.8 s at
    128; BENCHMARKS.md). Depends on n only, so the set key never depends on the number of
    workers; the resolved size is part of the key (plan_extract).
    """
    if value == "auto":
        size = min(32, max(1, -(-n // MIN_UNITS)))
        while size < 128 and n > size * 64:
            size *= 2
        return size
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'store.unit_size must be a positive integer or "auto", got {value!r}')
    return value


def _layout(preset: Preset, stages: list[Stage], n: int) -> SetLayout:
    st = preset.store
    mods: dict[str, ModalityLayout] = {}
    for s in stages:
        layer_dims = s.layer_dims()
        for mod, (seq_dim, pooled_dim) in s.output_dims().items():
            is_seq = mod in SEQUENCE_MODALITIES and seq_dim > 0
            n_layers, layer_dim = layer_dims.get(mod, (0, 0))
            mods[mod] = ModalityLayout(
                name=mod,
                pooled_dim=int(pooled_dim),
                seq_dim=int(seq_dim) if is_seq else 0,
                max_len=st.max_len_of(mod) if is_seq else 0,
                provenance=s.provenance(),
                n_layers=int(n_layers),
                layer_dim=int(layer_dim),
            )
    return SetLayout(
        n=n,
        unit_size=resolve_unit_size(st.unit_size, n),
        modalities=mods,
        compression=st.compression,
        level=st.level,
        inner_chunk=st.inner_chunk,
    )


def plan_extract(
    dataset: str,
    root: str | os.PathLike | None = None,
    preset: str | dict[str, Any] | Preset = "offline",
    overrides: list[str] | None = None,
    manifests: str | os.PathLike = "manifests",
    device: str = "cpu",
    limit: int | None = None,
    clips: list[Clip] | None = None,
    info: dict[str, Any] | None = None,
) -> Plan:
    """The plan of extracting `dataset` with a preset (+ `stage.key=value` overrides).

    Clips and dataset facts come from `manifests/<dataset>/` unless given in memory (`clips`,
    `info`: what a dataset.json would hold), as `predict` does for one file.
    """
    if clips is None:
        clips = load_dataset(dataset, manifests)
        where = f"{manifests}/{dataset}/"
    else:
        clips = list(clips)
        where = "the clips given"
    if limit:
        clips = clips[:limit]
    if not clips:
        raise ValueError(f"dataset '{dataset}' has no clips in {where}")
    if info is None:
        info = read_dataset_info(dataset, manifests)
    if root is None:
        if "root" not in info:
            raise ValueError(f"dataset '{dataset}': no --root given and dataset.json names none")
        root = info["root"]
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    pre = load_preset(preset, overrides)
    stages = build_stages(pre, device=device, info=info)
    layout = _layout(pre, stages, len(clips))
    with cf.ThreadPoolExecutor(8) as ex:
        fps = list(ex.map(lambda c: clip_fingerprint(c, root), clips))
    ident = {
        "format": cachefmt.FORMAT,
        "code": CODE_VERSION,
        "stages": [s.provenance() for s in stages],
        # the tables as written (not the filled-in defaults), so keys of existing sets stay
        "store": {k: v for k, v in pre.data.get("store", {}).items()},
        # the clips per unit "auto" resolved to: a set's chunking is fixed at creation, so a
        # change of the auto rule must make a new set, never resume an old one unit-misaligned
        "unit_size": layout.unit_size,
        "decode_run": pre.data.get("run", {}).get("clip_timeout"),
        "classes": info.get("classes"),
        "clips": [c.model_dump(mode="json") for c in clips],
        "media": fps,
    }
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    key = f"{dataset}-{hashlib.sha256(blob).hexdigest()[:16]}"
    return Plan(dataset, pre, root, clips, info, stages, layout, key, device,
                features_digest(ident, clips, info, pre), [fingerprint_bytes(f) for f in fps])


# what a clip's labels are made of: nothing here reaches a stage (the metadata stage reads
# `metadata`, handled below; the others read media, transcript, title and times)
LABEL_FIELDS = ("labels", "split", "dataset")


def features_digest(ident: dict[str, Any], clips: list[Clip], info: dict[str, Any],
                    preset: Preset) -> str:
    """The set's identity without what only labels it: each clip's `labels`, `split` and
    dataset name, the class list, and the metadata fields dataset.json calls label-derived
    (the metadata stage leaves them out of its vector unless told to use them).

    A re-labelled dataset (a fixed label column, added valence ratings, a Plutchik remap, new
    splits) gets a new key, since the set stores its labels, but the same digest: the runner
    copies the finished units of a set with this digest instead of extracting them again.
    """
    from pipeline.stages.metadata import flatten, matches

    pick = preset.stages.get("metadata")
    meta_cfg = pick.config if pick is not None else None
    explicit = (getattr(meta_cfg, "fields", None) is not None
                or bool(getattr(meta_cfg, "include_label_derived", False)))
    derived = [] if explicit else list(info.get("label_derived") or [])

    def unlabelled(c: Clip) -> dict[str, Any]:
        d = c.model_dump(mode="json", exclude=set(LABEL_FIELDS))
        d["metadata"] = {k: v for k, v in flatten(c.metadata).items() if not matches(k, derived)}
        return d

    rest = {k: v for k, v in ident.items() if k not in ("classes", "clips")}
    rest["clips"] = [unlabelled(c) for c in clips]
    # with explicit metadata fields, which of them are label-derived decides a clip's failure
    rest["label_derived"] = list(info.get("label_derived") or []) if explicit else None
    blob = json.dumps(rest, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def static_arrays(plan: Plan) -> dict[str, np.ndarray]:
    """Arrays known from the manifest alone: ids, split, group, label, regression targets."""
    clips = plan.clips
    group_by = plan.info.get("group_by") or "speaker"
    groups = []
    for c in clips:
        g = getattr(c, group_by, None) if hasattr(c, group_by) else c.metadata.get(group_by)
        groups.append(str(g) if g is not None else c.id)
    out: dict[str, np.ndarray] = {
        cachefmt.IDS: np.array([c.id for c in clips], dtype=object),
        cachefmt.SPLIT: np.array([c.split for c in clips], dtype=object),
        cachefmt.GROUP: np.array(groups, dtype=object),
        cachefmt.LABEL: np.array(
            [c.labels.emotion_idx if c.labels.emotion_idx is not None else -1 for c in clips],
            dtype=np.int32,
        ),
    }
    for t in TARGETS:
        vals = [getattr(c.labels, t) for c in clips]
        if any(v is not None for v in vals):
            out[cachefmt.target_value(t)] = np.array([v if v is not None else 0.0 for v in vals], np.float32)
            out[cachefmt.target_present(t)] = np.array([v is not None for v in vals], bool)
    return out
