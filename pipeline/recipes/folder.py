"""A folder of the user's own videos -> manifests.

Expected layout::

    <root>/labels.csv     optional; columns id,video,audio,text,title,label,speaker,split
                          and the continuous targets sentiment,valence,arousal (``id`` and
                          one of ``video`` / ``audio`` are required, the rest optional; any
                          other column goes into ``metadata``, numbers parsed)
    <root>/classes.txt    optional; one class name per line, fixes the class order
    <root>/**/*.mp4|.wav  the media, paths in labels.csv relative to <root>

Without ``labels.csv`` every media file under the root is a clip (unlabelled); a video and an
audio file with the same relative stem make one clip.

Decisions:

* ``text`` becomes the transcript, ``title`` the conditioning text, ``label`` the emotion.
* ``sentiment`` / ``valence`` / ``arousal`` are regression targets (``mmemo fit --target
  valence``), stored as given (any scale); an empty cell is "not rated". In a column with
  numbers, a cell that is not a finite number is that row's problem: reported, the row
  skipped. A column with no number at all (``sentiment`` as positive / negative words) stays
  metadata, as any other column.
* Classes: ``classes.txt`` if present (a label not in it is an error naming the line), else the
  sorted unique labels.
* Split: the ``split`` column where filled, else a deterministic hash split grouped by speaker
  (or by id when the row has no speaker); ``group_by`` is ``speaker`` when any row names one.
* A row whose media is missing, absolute, climbs out with ``..`` or is a symlink loop is
  reported in ``missing`` (file, line, reason) and left OUT of the manifest (a typo must not
  silently become a text-only clip); ``keep_missing=True`` keeps such rows text-only instead.
  Symlinks inside the root are followed wherever they lead (media on another disk linked
  into the dataset folder is the usual cluster layout).
* One hostile row never stops the batch: a field longer than ``MAX_FIELD_CHARS`` (131,072
  characters, the csv module's default limit, far beyond any transcript) is reported as that
  row's problem and the row skipped; every other row is prepared.
* Ids are sanitised (``sanitize_id``); a duplicate id is reported and the later row skipped.
* ``name`` makes differently named datasets from the same recipe (``sample``, ``ravdess`` ...).
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any

from pipeline.manifest import (
    MANIFEST_DIR,
    TARGETS,
    Clip,
    Labels,
    check_rel_path,
    sanitize_id,
    targets_present,
)
from pipeline.recipes.common import (
    AUDIO_EXTS,
    VIDEO_EXTS,
    PrepareResult,
    dataset_name,
    grouped_split,
    walk_files,
    write_result,
)

LAYOUT = ("labels.csv (id,video,audio,text,title,label,speaker,split and the targets "
          "sentiment,valence,arousal; optional), "
          "classes.txt (optional), media under the root")
CLASSES: list[str] = []  # the dataset's own labels (labels.csv / classes.txt)
KNOWN = ("id", "video", "audio", "text", "title", "label", "speaker", "split")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def read_text_file(path: Path) -> str:
    """UTF-8 text (BOM allowed) or a ValueError naming the file, byte and offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


def read_classes(root: Path) -> list[str] | None:
    p = root / "classes.txt"
    if not p.is_file():
        return None
    names = [ln.strip() for ln in read_text_file(p).splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: a class name is listed twice")
    return names


def _value(text: str) -> Any:
    """Metadata cell: int, float or the stripped string."""
    s = text.strip()
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def task_info(classes: list[str], clips: list[Clip]) -> dict[str, Any]:
    """dataset.json's `task` and `targets` for clips read from a labels.csv: classification
    when there are classes, else regression when a clip has a continuous target, else none."""
    targets = targets_present(clips)
    task = "classification" if classes else "regression" if targets else "none"
    return {"task": task, "targets": targets}


def _is_number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def target_columns(rows: list[tuple[int, dict[str, str]]]) -> tuple[str, ...]:
    """The target columns that hold at least one number (the others stay metadata)."""
    return tuple(c for c in TARGETS
                 if any(_is_number(r.get(c, "").strip()) for _, r in rows))


def _targets(row: dict[str, str], columns: tuple[str, ...]) -> tuple[dict[str, float], list[str]]:
    """The row's continuous targets, and one problem per cell that is not a finite number."""
    values: dict[str, float] = {}
    problems: list[str] = []
    for col in columns:
        cell = row.get(col, "").strip()
        if not cell:
            continue
        if _is_number(cell):
            values[col] = float(cell)
        else:
            shown = cell if len(cell) <= 40 else cell[:40] + "..."
            hint = (f" (a decimal comma? write {cell.replace(',', '.')})"
                    if _is_number(cell.replace(",", ".", 1)) and cell.count(",") == 1 else "")
            problems.append(f"field '{col}': '{shown}' is not a finite number{hint}")
    return values, problems


MAX_FIELD_CHARS = 131_072  # longest labels.csv field kept (the csv module's default limit)


def check_media(value: str, root: Path) -> tuple[str | None, str | None]:
    """(relative path, None) for a usable media path, else (None, reason). Absolute and ``..``
    paths are rejected before touching the disk; symlinks inside the root are followed (media
    on another disk); a symlink loop is refused."""
    try:
        rel = check_rel_path(value)
    except ValueError as e:
        return None, str(e)
    if rel is None:
        return None, None
    p = root / rel
    try:
        p.resolve(strict=True)
    except FileNotFoundError:
        if p.is_symlink():
            return None, f"media '{value}' is a broken symlink (its target does not exist)"
        return None, f"media file '{value}' not found under {root}"
    except (RuntimeError, OSError) as e:  # RuntimeError: symlink loop (Python < 3.13)
        if "loop" in str(e).lower() or getattr(e, "errno", None) == 40:
            return None, f"media '{value}' is a symlink loop (it never reaches a file)"
        return None, f"media '{value}' cannot be resolved ({e})"
    if not p.is_file():
        return None, f"media file '{value}' not found under {root} (not a regular file)"
    return rel, None


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    text = read_text_file(path)
    # no field can be longer than the file: lift the csv module's 131,072-character limit
    # so one huge field is read (and then refused as that row's problem, in _row_clip)
    # instead of stopping the whole file
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, min(len(text) + 1, 2**31 - 1)))
    try:
        return _parse_rows(path, text)
    finally:
        csv.field_size_limit(old_limit)


def _parse_rows(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise ValueError(f"{path}: empty file, expected a header line")
    cols = [(c or "").strip().lower() for c in reader.fieldnames]
    if "id" not in cols or not ({"video", "audio"} & set(cols)):
        raise ValueError(f"{path}: needs an 'id' column and a 'video' or 'audio' column; "
                         f"found {cols}")
    rows: list[tuple[int, dict[str, str]]] = []
    for raw in reader:
        row = {(k or "").strip().lower(): (v or "") for k, v in raw.items() if k is not None}
        rows.append((reader.line_num, row))
    return cols, rows


def _row_clip(
    row: dict[str, str], line: int, csv_path: Path, root: Path, dataset: str,
    classes: list[str] | None, keep_missing: bool, fractions: dict[str, float] | None,
    target_cols: tuple[str, ...] = (),
) -> tuple[Clip | None, str | None]:
    """A clip for one csv row, or (None, reason) when its media cannot be used."""
    huge = [(k, len(v)) for k, v in row.items() if len(v) > MAX_FIELD_CHARS]
    if huge:
        return None, (f"{csv_path.name}:{line}: " + "; ".join(
            f"field '{k}' is {n:,} characters (at most {MAX_FIELD_CHARS:,})" for k, n in huge)
            + "; skipped")
    targets, bad_targets = _targets(row, target_cols)
    if bad_targets:
        return None, f"{csv_path.name}:{line}: {'; '.join(bad_targets)}; skipped"
    media: dict[str, str | None] = {}
    problems: list[str] = []
    for col in ("video", "audio"):
        rel, why = check_media(row.get(col, ""), root)
        media[col] = rel
        if why:
            problems.append(why)
    if not problems and not (media["video"] or media["audio"]):
        problems.append("no video or audio path")
    if problems and not keep_missing:
        return None, f"{csv_path.name}:{line}: {'; '.join(problems)}; skipped"
    stem = Path(row.get("video") or row.get("audio") or "clip").stem
    cid = sanitize_id(row["id"].strip() or stem)
    label = row.get("label", "").strip() or None
    if label is not None and classes is not None and label not in classes:
        raise ValueError(f"{csv_path}:{line}: field 'label': '{label}' is not in classes.txt "
                         f"{classes}")
    split = row.get("split", "").strip()
    if split and not _SPLIT_RE.match(split):
        raise ValueError(f"{csv_path}:{line}: field 'split': '{split}' is not a simple name")
    speaker = row.get("speaker", "").strip() or None
    clip = Clip(
        id=cid,
        dataset=dataset,
        split=split or grouped_split(speaker or cid, fractions),
        video=media["video"],
        audio=media["audio"],
        transcript=row.get("text", "").strip() or None,
        title=row.get("title", "").strip() or None,
        speaker=speaker,
        labels=Labels(emotion=label,
                      emotion_idx=classes.index(label) if label and classes else None,
                      **targets),
        metadata={k: _value(v) for k, v in row.items()
                  if k not in KNOWN and k not in target_cols and v.strip()},
    )
    return clip, (f"{csv_path.name}:{line}: {'; '.join(problems)}; kept text-only"
                  if problems else None)


def clips_from_csv(
    root: Path, dataset: str, keep_missing: bool, fractions: dict[str, float] | None,
    path: Path | None = None,
) -> tuple[list[Clip], list[tuple[str, str]], list[str]]:
    path = path or root / "labels.csv"
    _cols, rows = read_rows(path)
    classes = read_classes(path.parent) or read_classes(root)
    if classes is None:
        classes = sorted({r.get("label", "").strip() for _, r in rows} - {""})
    clips: list[Clip] = []
    missing: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    target_cols = target_columns(rows)
    for line, row in rows:
        clip, problem = _row_clip(row, line, path, root, dataset, classes, keep_missing,
                                  fractions, target_cols)
        raw_id = row.get("id", "").strip()
        cid = clip.id if clip else sanitize_id(raw_id if 0 < len(raw_id) <= 200 else f"line{line}")
        if problem:
            missing.append((cid, problem))
        if clip is None:
            continue
        if clip.id in seen:
            missing.append((clip.id, f"{path.name}:{line}: duplicate id '{clip.id}' "
                            f"(first on line {seen[clip.id]}); skipped"))
            continue
        seen[clip.id] = line
        clips.append(clip)
    return clips, missing, classes


def _from_scan(root: Path, dataset: str, fractions: dict[str, float] | None) -> list[Clip]:
    """Every media file under root; video + audio with the same relative stem pair up."""
    pairs: dict[str, dict[str, str]] = {}
    for p in walk_files(root):
        ext = p.suffix.lower()
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        kind = "video" if ext in VIDEO_EXTS else "audio" if ext in AUDIO_EXTS else None
        if kind is None:
            continue
        # the path as found under the root (symlinked files and folders inside it are
        # followed: media on another disk); walk_files never yields a path outside it
        rel = p.relative_to(root).as_posix()
        pairs.setdefault(Path(rel).with_suffix("").as_posix(), {}).setdefault(kind, rel)
    clips: list[Clip] = []
    used: set[str] = set()
    for stem, media in sorted(pairs.items()):
        base = sanitize_id(stem.replace("/", "_"))
        cid, n = base, 1
        while cid in used:
            n += 1
            cid = f"{base}_{n}"
        used.add(cid)
        clips.append(Clip(id=cid, dataset=dataset, split=grouped_split(cid, fractions),
                          video=media.get("video"), audio=media.get("audio")))
    return clips


def prepare(
    root: Path,
    out: Path = MANIFEST_DIR,
    name: str | None = None,
    *,
    keep_missing: bool = False,
    split_fractions: dict[str, float] | None = None,
    label_derived: list[str] | tuple[str, ...] = (),
    labels: Path | None = None,
) -> PrepareResult:
    """Write manifests for a folder of videos described by an optional labels.csv.

    `labels` points at a labels.csv kept elsewhere (a read-only dataset share); its media
    paths are still relative to `root`.
    """
    root = Path(root)
    if labels is not None and not Path(labels).is_file():
        raise FileNotFoundError(f"labels file {labels} not found")
    dataset = dataset_name(name, root.resolve().name)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    if labels is not None or (root / "labels.csv").is_file():
        clips, missing, classes = clips_from_csv(root, dataset, keep_missing, split_fractions,
                                            Path(labels) if labels else None)
    else:
        clips, missing = _from_scan(root, dataset, split_fractions), []
        classes = read_classes(root) or []
    if not clips:
        raise FileNotFoundError(f"no usable clip under {root} (labels.csv rows or media files)"
                                + (f"; first problem: {missing[0][1]}" if missing else ""))
    splits: dict[str, list[Clip]] = {}
    for c in clips:
        splits.setdefault(c.split, []).append(c)
    info = {
        "classes": classes,
        **task_info(classes, clips),
        "group_by": "speaker" if any(c.speaker for c in clips) else "id",
        "label_derived": list(label_derived),
    }
    return write_result(dataset, root, Path(out), splits, missing, info)
