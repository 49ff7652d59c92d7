"""CMU-MOSI / CMU-MOSEI (opinion videos, sentiment and emotion intensity) -> manifests.

Expected layout (the CMU-MultimodalSDK label sequence plus the segmented raw release)::

    <root>/**/CMU_MOSI_Opinion_Labels.csd    (mosi)  HDF5: <root>/data/<video>/{features [n,1],
    <root>/**/CMU_MOSEI_Labels.csd           (mosei)  intervals [n,2] s}; MOSEI features [n,7]
    <root>/**/Segmented/**/{video}_{n}.mp4   segmented videos  (Raw/Video/Segmented/ in MOSI)
    <root>/**/Segmented/**/{video}_{n}.wav   segmented audio   (optional)
    <root>/**/Transcript/**/{video}.annotprocessed   MOSI: "{n}_DELIM_{text}" per line
    <root>/**/Transcript/**/{video}.txt              MOSEI: "{video}___{n}___{start}___{end}___{text}"

Decisions:

* The label side is `mmemo import csd`'s reader (``pipeline.importers.read_csd``), not a
  second parser. One clip per labelled segment (row of the labels .csd): id ``{video}_{n}``
  with ``n`` = row + 1 (the SDK names the same segment ``{video}[row]``; the segmented files
  are numbered from 1), ``start`` / ``end`` from the interval, ``dialogue_id`` = the video,
  ``speaker`` = the video (one speaker per opinion video) and ``group_by`` = ``dialogue_id``.
* Targets: ``labels.sentiment`` in [-3, 3] (regression; Acc-2 / Acc-7 derive from it at fit
  time). MOSEI's other six columns ``happy, sad, anger, surprise, disgust, fear`` (intensity
  0..3) are kept in ``metadata.emotions`` (listed in ``label_derived``); ``labels.emotion`` is
  left empty: the label set is a fit-time choice.
* Folds: the SDK's standard train / valid / test video-id folds. They are read from
  ``folds=<file>`` (JSON ``{"train": [...], "valid": [...], "test": [...]}`` or the SDK's
  ``cmu_mosi_std_folds.py`` / ``cmu_mosei_std_folds.py`` with ``standard_train_fold = [...]``),
  else from ``pipeline/recipes/folds/{mosi,mosei}.json`` when shipped. MOSI's is shipped (52 /
  10 / 31 videos; on the real labels .csd that is the 1,284 / 229 / 686 segments the MOSI
  literature reports); MOSEI's is not (3,000+ ids that could not be checked against data
  here): pass the SDK's ``cmu_mosei_std_folds.py`` as ``folds=``. Without a fold file every
  clip is in ``train`` and ``info["folds"]`` says so. A video in no fold is put in ``train``
  and counted in ``info["videos_not_in_folds"]``.
* A segment with no media file is kept transcript-only (or empty) and reported in ``missing``.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.manifest import MANIFEST_DIR, Clip, Labels, sanitize_id
from pipeline.recipes.common import (
    AUDIO_EXTS,
    VIDEO_EXTS,
    PrepareResult,
    dataset_name,
    find_one,
    relative_to_root,
    write_result,
)

LABEL_FILES = {"mosi": "CMU_MOSI_Opinion_Labels.csd", "mosei": "CMU_MOSEI_Labels.csd"}
MOSEI_COLUMNS = ["sentiment", "happy", "sad", "anger", "surprise", "disgust", "fear"]
LAYOUTS = {
    "mosi": "**/CMU_MOSI_Opinion_Labels.csd; Raw/Video/Segmented/{video}_{n}.mp4; "
            "Raw/Transcript/Segmented/{video}.annotprocessed",
    "mosei": "**/CMU_MOSEI_Labels.csd; **/Segmented/**/{video}_{n}.mp4; "
             "**/Transcript/**/{video}.txt",
}
# no emotion classes at prepare time: sentiment is the regression target
CLASSES_OF: dict[str, list[str]] = {"mosi": ["sentiment [-3, 3]"],
                                    "mosei": [f"{c} (column {i})" for i, c in enumerate(MOSEI_COLUMNS)]}
SPLITS = ("train", "valid", "test")
FOLDS_DIR = Path(__file__).with_name("folds")


def read_folds(path: Path) -> dict[str, str]:
    """Video id -> split from a fold file (JSON, or the SDK's standard-folds .py as text)."""
    text = Path(path).read_text(encoding="utf-8")
    lists: dict[str, list[str]] = {}
    if Path(path).suffix == ".json":
        raw = json.loads(text)
        lists = {s: list(raw.get(s, [])) for s in SPLITS}
    else:  # literal lists only, never executed
        for s in SPLITS:
            m = re.search(rf"standard_{s}_fold\s*=\s*(\[.*?\])", text, re.S)
            if m is None:
                raise ValueError(f"{path}: no 'standard_{s}_fold = [...]' list")
            lists[s] = [str(v) for v in ast.literal_eval(m.group(1))]
    out: dict[str, str] = {}
    for s, vids in lists.items():
        for v in vids:
            if out.setdefault(str(v), s) != s:
                raise ValueError(f"{path}: video {v} is in both {out[str(v)]} and {s}")
    if not out:
        raise ValueError(f"{path}: no video ids in the train / valid / test lists")
    return out


def _transcripts(root: Path, kind: str) -> dict[str, str]:
    """Segment id ``{video}_{n}`` -> text, from the MOSI / MOSEI segmented transcripts."""
    out: dict[str, str] = {}
    if kind == "mosi":
        for p in sorted(root.rglob("*.annotprocessed")):
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                n, sep, text = line.partition("_DELIM_")
                if sep and n.strip().isdigit():
                    out[f"{p.stem}_{int(n)}"] = text.strip()
    else:
        for p in sorted(root.rglob("*.txt")):
            if "transcript" not in p.as_posix().lower():
                continue
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("___")
                if len(parts) >= 5 and parts[1].isdigit():
                    out[f"{parts[0]}_{int(parts[1])}"] = "___".join(parts[4:]).strip()
    return out


def _prepare(kind: str, root: Path, out: Path, name: str | None,
             folds: Path | None) -> PrepareResult:
    from pipeline.importers import read_csd  # the `import csd` reader: one parser for .csd

    root = Path(root)
    dataset = dataset_name(name, kind)
    csd = find_one(root, [LABEL_FILES[kind], f"**/{LABEL_FILES[kind]}"], kind)
    _root_name, meta, data = read_csd(csd)
    ncol = {f.shape[1] for f, _ in data.values()}
    want = 7 if kind == "mosei" else 1
    if ncol != {want}:
        raise ValueError(f"{csd}: expected {want} label column(s) per segment, found {sorted(ncol)}")
    fold_file = Path(folds) if folds else FOLDS_DIR / f"{kind}.json"
    split_of = read_folds(fold_file) if fold_file.is_file() else {}
    if folds and not split_of:
        raise FileNotFoundError(f"{kind}: fold file {folds} not found")
    segmented = [d for d in root.rglob("*") if d.is_dir() and d.name.lower() == "segmented"]
    media: dict[str, dict[str, Path]] = {}
    for d in segmented:
        for p in sorted(d.rglob("*")):
            ext = p.suffix.lower()
            kind_m = "video" if ext in VIDEO_EXTS else "audio" if ext in AUDIO_EXTS else None
            if kind_m and p.is_file() and not p.name.startswith("."):
                media.setdefault(p.stem, {}).setdefault(kind_m, p)
    texts = _transcripts(root, kind)
    missing: list[tuple[str, str]] = []
    splits: dict[str, list[Clip]] = {}
    not_in_folds: set[str] = set()
    for vid in sorted(data):
        feats, ivals = data[vid]
        if split_of and vid not in split_of:
            not_in_folds.add(vid)
        for row in range(len(feats)):
            seg = f"{vid}_{row + 1}"
            cid = sanitize_id(seg)
            m = media.get(seg, {})
            if not m:
                missing.append((cid, f"no segmented media {seg}.mp4/.wav under {root}; "
                                     + ("kept transcript-only" if seg in texts else "kept without media")))
            vals = [float(x) for x in feats[row]]
            sentiment = vals[0] if np.isfinite(vals[0]) else None
            md: dict[str, Any] = {"video_id": vid, "segment": row + 1, "csd_row": row}
            if kind == "mosei":
                md["emotions"] = dict(zip(MOSEI_COLUMNS[1:], vals[1:]))
            clip = Clip(
                id=cid, dataset=dataset, split=split_of.get(vid, "train"),
                video=relative_to_root(m["video"], root) if "video" in m else None,
                audio=relative_to_root(m["audio"], root) if "audio" in m else None,
                transcript=texts.get(seg), speaker=vid, dialogue_id=vid, turn=row + 1,
                start=float(ivals[row, 0]), end=float(ivals[row, 1]),
                labels=Labels(sentiment=sentiment), metadata=md,
            )
            splits.setdefault(clip.split, []).append(clip)
    info = {
        "classes": [], "task": "regression", "group_by": "dialogue_id",
        "label_derived": ["emotions"] if kind == "mosei" else [],
        "targets": MOSEI_COLUMNS if kind == "mosei" else ["sentiment"],
        "labels_file": relative_to_root(csd, root), "csd_metadata": meta,
        "folds": (fold_file.name if split_of else
                  "missing: the SDK's standard folds are not shipped; every clip is in train"),
        "videos_not_in_folds": len(not_in_folds),
    }
    return write_result(dataset, root, Path(out), splits, missing, info)


def prepare_mosi(root: Path, out: Path = MANIFEST_DIR, name: str | None = None, *,
                 folds: Path | None = None) -> PrepareResult:
    """Write CMU-MOSI manifests (one clip per opinion segment, sentiment target)."""
    return _prepare("mosi", root, out, name, folds)


def prepare_mosei(root: Path, out: Path = MANIFEST_DIR, name: str | None = None, *,
                  folds: Path | None = None) -> PrepareResult:
    """Write CMU-MOSEI manifests (one clip per segment, sentiment + six emotion intensities)."""
    return _prepare("mosei", root, out, name, folds)


prepare = prepare_mosi
