"""Helpers shared by the recipes (no recipe imports here, so no import cycle).

Dataset recipes: one `prepare()` per corpus turns its official layout into manifests.

A recipe reads a corpus where it lies (never copies media), writes
`<out>/<name>/<split>.jsonl` plus `<out>/<name>/dataset.json`, and returns a `PrepareResult`.
Missing media is reported per clip in `PrepareResult.missing` and never stops a recipe: what
each recipe does with such a clip (keep it text-only, or leave it out) is documented in its
module. `mmemo prepare` prints a row left out as an `error:` line and exits 1 (0 with
--allow-failures), a clip kept with a gap as a `warning:` line.

Splits are never random per utterance: when a corpus has no official split for some data, the
split is derived from a stable hash of the grouping key (speaker, conversation), so the same
group always lands in the same split, on every machine and every run.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.manifest import (
    Clip,
    dataset_info_path,
    manifest_path,
    write_dataset_info,
    write_manifest,
)

# Fractions of the derived (hash) split, used when a corpus gives no split of its own.
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid": 0.1, "test": 0.1}

VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".flv", ".mpg", ".mpeg")
AUDIO_EXTS = (".wav", ".mp3", ".flac", ".m4a", ".ogg", ".opus", ".aac")


@dataclass
class PrepareResult:
    """What a recipe produced: clips per split, per-clip problems, and the files written."""

    dataset: str
    splits: dict[str, list[Clip]]
    # (clip id, reason); every recipe ends a reason with what it did: "...; skipped" (the row
    # is not in the manifests) or "...; kept <how>" (it is, with a gap: text-only, one split)
    missing: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # the dataset.json content
    paths: dict[str, Path] = field(default_factory=dict)  # split / "dataset" -> file

    @property
    def n_clips(self) -> int:
        return sum(len(v) for v in self.splits.values())

    @property
    def left_out(self) -> list[tuple[str, str]]:
        """The problems whose row did not become a clip (bad input a person must hear about)."""
        return [p for p in self.missing if _skipped(p[1])]

    @property
    def kept_with_gaps(self) -> list[tuple[str, str]]:
        """The problems whose clip is in the manifests anyway (e.g. no video: transcript only)."""
        return [p for p in self.missing if not _skipped(p[1])]


def _skipped(reason: str) -> bool:
    return reason.rstrip().endswith("skipped")


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for a key (sha1, so it never changes between runs)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def grouped_split(group: str, fractions: dict[str, float] | None = None) -> str:
    """The split of a group under a deterministic hash split (no random state involved)."""
    fractions = fractions or DEFAULT_FRACTIONS
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must be non-negative with a positive sum: {fractions}")
    x = hash_fraction(group) * total
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name]
        if x < acc:
            return name
    return names[-1]


def dataset_name(name: str | None, default: str) -> str:
    """The dataset name: a given one must already be a simple name (it names folders)."""
    if name is None:
        return re.sub(r"[^A-Za-z0-9_.\-]+", "_", default).strip("._") or "dataset"
    if not re.match(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$", name) or ".." in name:
        raise ValueError(f"dataset name must be a simple name (letters, digits, _ . -): {name!r}")
    return name


def relative_to_root(path: Path, root: Path) -> str:
    """A media path as the manifest stores it: POSIX, relative to the dataset root.

    A path found under the root is kept as found (a symlink inside the root is followed later,
    wherever it leads: media on another disk); otherwise both sides are resolved."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return path.resolve().relative_to(root.resolve()).as_posix()


def walk_files(root: Path) -> list[Path]:
    """Every file under root, sorted, following symlinked folders as well as symlinked files.

    A root assembled from links (Actor_05 -> /nfs/ravdess/Actor_05) is how teams lay out
    shared corpora; Path.rglob does not descend into linked folders before Python 3.13. A
    folder reached twice (a link cycle, or two links to one place) is walked once.
    """
    out: list[Path] = []
    seen: set[str] = set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        out.extend(Path(d) / f for f in files)
    return sorted(out)


def index_media(dirs: Iterable[Path], exts: tuple[str, ...]) -> dict[str, Path]:
    """File name -> path for every media file under `dirs` (recursive; first one wins).

    Hidden files (macOS `._x.mp4` forks shipped in some corpus archives) are ignored.
    """
    found: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for p in walk_files(d):
            if p.name.startswith(".") or p.suffix.lower() not in exts or not p.is_file():
                continue
            found.setdefault(p.name, p)
    return found


def context_title(lines: list[str], max_lines: int | None, header: str | None = None) -> str | None:
    """Conditioning text from previous utterances (most recent last), optionally headed."""
    if max_lines is not None:
        lines = lines[-max_lines:] if max_lines > 0 else []
    parts = ([header] if header else []) + lines
    text = "\n".join(p for p in parts if p)
    return text or None


def write_result(
    dataset: str,
    root: Path,
    out: Path,
    splits: dict[str, list[Clip]],
    missing: list[tuple[str, str]],
    info: dict[str, Any],
) -> PrepareResult:
    """Write every non-empty split and dataset.json; remove split files of an older run.

    Stale `<split>.jsonl` files must go: `load_dataset` reads every split file it finds.
    """
    splits = {k: v for k, v in splits.items() if v}
    d = manifest_path(dataset, "x", out).parent
    if d.is_dir():
        for old in d.glob("*.jsonl"):
            if old.stem not in splits:
                old.unlink()
    paths = {s: write_manifest(clips, manifest_path(dataset, s, out)) for s, clips in splits.items()}
    full = {
        "name": dataset,
        "root": os.path.abspath(root),  # normalised, symlinks kept as given
        "classes": [],
        "task": "classification",
        "group_by": "speaker",
        "label_derived": [],
        **info,
        "counts": {s: len(c) for s, c in splits.items()},
    }
    write_dataset_info(dataset, full, out)
    paths["dataset"] = dataset_info_path(dataset, out)
    return PrepareResult(dataset=dataset, splits=splits, missing=missing, info=full, paths=paths)


def require_file(root: Path, rel: str, recipe: str) -> Path:
    """`root / rel`, or FileNotFoundError naming the file the recipe expected there."""
    p = Path(root) / rel
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{recipe}: dataset root {root} is not a folder")
    if not p.exists():
        raise FileNotFoundError(f"{recipe}: expected {rel} under {root} (not found); "
                                f"see `mmemo prepare --list` for the layout")
    return p


def find_one(root: Path, patterns: Iterable[str], recipe: str) -> Path:
    """The first file matching one of `patterns` (globs, tried in order, recursive from root),
    or FileNotFoundError naming the first pattern, i.e. the file the layout expects."""
    patterns = list(patterns)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{recipe}: dataset root {root} is not a folder")
    for pat in patterns:
        hits = sorted(p for p in Path(root).glob(pat) if not p.name.startswith("."))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{recipe}: expected {patterns[0]} under {root} (not found); "
                            f"see `mmemo prepare --list` for the layout")


def block_folds(members: Iterable[int], k: int) -> dict[int, int]:
    """Member (actor, session) -> fold 1..k: the sorted members cut into k contiguous blocks
    of near-equal size (the first `len % k` blocks one larger). Deterministic, documented."""
    ordered = sorted(set(members))
    if k < 2 or k > len(ordered):
        raise ValueError(f"{k} folds need between 2 and {len(ordered)} groups")
    size, extra = divmod(len(ordered), k)
    out: dict[int, int] = {}
    i = 0
    for f in range(k):
        n = size + (1 if f < extra else 0)
        for m in ordered[i:i + n]:
            out[m] = f + 1
        i += n
    return out


# --- shared label spaces ------------------------------------------------------------------
LABEL_SPACES = ("plutchik",)
# metadata fields `to_label_space` writes (all derived from the label annotation)
SPACE_FIELDS = ("plutchik", "plutchik_intensity", "label_original")


def to_label_space(result: PrepareResult, space: str, recipe: str | None = None) -> PrepareResult:
    """Rewrite a prepared dataset's manifests into a shared label space (``plutchik``).

    The mapping is ``pipeline/recipes/plutchik.toml`` read by ``fusion.labels.load_plutchik``
    (pure Python; the same data `fit --labels plutchik` uses). `recipe` names the table
    ``[map.<recipe>]`` (default: the dataset name). Per clip:

    * ``labels.emotion`` / ``emotion_idx``: the Plutchik class with the largest weight. Ties
      (a dyad, e.g. avamerg ``contempt`` = disgust + anger at 0.5 / 0.5) go to the tied class
      that comes first in wheel order (joy, trust, fear, surprise, sadness, disgust, anger,
      anticipation, then neutral): contempt -> disgust, optimism (anticipation + joy) -> joy.
      This is the rule `fusion.protocols.relabel` uses for the hard label of a soft target.
    * ``metadata["plutchik"]``: the full soft target ``{class: weight}`` (non-zero weights,
      summing to 1); ``metadata["plutchik_intensity"]`` when the target is an intensity word
      (``fru`` -> annoyance -> low); ``metadata["label_original"]``: the dataset's own label.
    * a label listed under ``unmapped`` in plutchik.toml, or one the recipe itself gave no
      class (avamerg's labels outside its 7), leaves the clip unlabelled; it is counted by label.

    Where the label comes from: the recipe's ``labels.emotion`` through ``[map.<recipe>]``;
    MOSEI (``metadata.emotions``, six intensities) a soft target weighted by the intensities
    (all six at 0: left out as ``"(no emotion)"``); ugc's annotated ``plutchik`` column when a
    clip has one; a recipe without a table (folder, ugc) has its labels read as Plutchik names
    (a primary, an intensity word, a dyad or neutral), any other label is left out. A dataset
    with no emotion label at all (CMU-MOSI: sentiment only) is a ValueError, nothing rewritten.

    dataset.json then holds ``label_space = "plutchik"``, ``classes`` = the 9 classes in wheel
    order, ``classes_original``, and ``label_space_counts`` = ``{"mapped": n, "soft": n (more
    than one class), "left_out": {label: n}}``; the fields above join ``label_derived``.
    """
    if space not in LABEL_SPACES:
        raise ValueError(f"unknown label space {space!r} (known: {', '.join(LABEL_SPACES)})")
    if result.info.get("label_space") == space:
        return result  # already in the space: never map twice
    from fusion.labels import load_plutchik

    pl = load_plutchik()
    classes = pl.classes
    recipe = recipe or result.dataset
    table = recipe in pl.maps  # else the labels are read as Plutchik names
    own = set(result.info.get("classes") or [])
    mapped, soft = 0, 0
    left: dict[str, int] = {}

    def target(clip: Clip) -> tuple[Any, list[float] | None, object]:
        """(original label, soft vector or None when left out, the mapping target)."""
        emotions = clip.metadata.get("emotions")
        if clip.labels.emotion is None and isinstance(emotions, dict) and table:
            vec = [0.0] * len(classes)
            for col, w in emotions.items():
                try:
                    t = pl.target_of(recipe, str(col)) if w else None
                except KeyError:  # a column the table does not place
                    t = None
                if t is not None:
                    for i, x in enumerate(pl.vector(t)):
                        vec[i] += float(w) * x
            total = sum(vec)
            return dict(emotions), ([x / total for x in vec] if total > 0 else None), None
        label = clip.labels.emotion
        annotated = clip.metadata.get("plutchik")
        if isinstance(annotated, str) and annotated and not table:
            return label, pl.vector(annotated), annotated
        if label is None:
            return None, None, None
        if table:
            try:
                t = pl.target_of(recipe, label)
            except KeyError:
                # a label the recipe gave no class (avamerg's outside its 7) is left out; one of
                # its own classes that the table forgot is an error
                if clip.labels.emotion_idx is not None and label in own:
                    raise
                return label, None, None
            return label, (None if t is None else pl.vector(t)), t
        key = label.lower()
        try:
            return label, pl.vector(key), key
        except ValueError:
            return label, None, None

    for clips in result.splits.values():
        for c in clips:
            original, vec, tgt = target(c)
            if original is None and vec is None:
                continue  # never labelled: nothing to map, nothing lost
            md = dict(c.metadata)
            md["label_original"] = original
            if vec is None:
                name = original if isinstance(original, str) else "(no emotion)"
                left[name] = left.get(name, 0) + 1
                md.pop("plutchik", None)
                c.labels.emotion, c.labels.emotion_idx = None, None
            else:
                best = max(range(len(vec)), key=lambda i: (vec[i], -i))  # first on ties
                md["plutchik"] = {k: round(w, 6) for k, w in zip(classes, vec, strict=True) if w}
                level = pl.intensity_of(tgt) if tgt is not None else None
                if level and "plutchik_intensity" not in md:
                    md["plutchik_intensity"] = level
                c.labels.emotion, c.labels.emotion_idx = classes[best], best
                mapped += 1
                soft += len(md["plutchik"]) > 1
            c.metadata = md
    if not mapped and not left:
        raise ValueError(f"{result.dataset}: no clip has an emotion label to map into {space} "
                         f"(recipe {recipe}); manifests left in the dataset's own labels")
    info = {k: v for k, v in result.info.items() if k not in ("name", "counts")}
    info["classes_original"] = list(result.info.get("classes") or [])
    info["classes"] = list(classes)
    if info.get("task") in (None, "none"):
        info["task"] = "classification"
    info["label_space"] = space
    info["label_space_counts"] = {"mapped": mapped, "soft": soft, "left_out": dict(sorted(left.items()))}
    info["label_derived"] = list(dict.fromkeys([*info.get("label_derived", []), *SPACE_FIELDS]))
    out = result.paths["dataset"].parent.parent if "dataset" in result.paths else None
    if out is None:
        raise ValueError(f"{result.dataset}: no dataset.json written; nothing to rewrite")
    return write_result(result.dataset, Path(info.pop("root", ".")), out, result.splits,
                        result.missing, info)
