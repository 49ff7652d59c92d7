"""MELD (Friends multi-party dialogues) -> manifests.

Expected layout (any split may be absent; media folders may sit one level deeper, as in the
official archive: ``MELD.Raw/train/train_splits/``)::

    <root>/train_sent_emo.csv   dev_sent_emo.csv   test_sent_emo.csv
        columns: Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID,
                 Season, Episode, StartTime, EndTime
    <root>/train_splits/dia{D}_utt{U}.mp4
    <root>/dev_splits_complete/dia{D}_utt{U}.mp4
    <root>/output_repeated_splits_test/dia{D}_utt{U}.mp4

Decisions:

* Splits are MELD's own: ``train``, ``dev``, ``test``. A file named ``train_sent_emo*.csv``
  (e.g. a ``.head300`` excerpt) counts as that split when the full file is absent.
* Ids are ``{split}_dia{D}_utt{U}``: dialogue ids restart in every split. ``dialogue_id`` is
  ``{split}_dia{D}`` for the same reason; ``group_by`` is ``dialogue_id``.
* ``labels.emotion`` is one of the 7 MELD emotions; ``labels.sentiment`` is -1 / 0 / 1 and the
  sentiment string is kept in ``metadata.sentiment`` (listed in ``label_derived``).
* ``title`` is the dialogue context: the previous ``context_turns`` utterances as
  ``Speaker: text``. Transcripts keep their typography (U+2019 apostrophes); only the known
  MELD mojibake (UTF-8 read as cp1252, stray C1 controls) is repaired, see ``fix_mojibake``.
* Missing media: the clip is kept transcript-only and reported in ``missing``.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST_DIR, Clip, Labels, sanitize_id
from pipeline.recipes.common import (
    VIDEO_EXTS,
    PrepareResult,
    context_title,
    dataset_name,
    index_media,
    relative_to_root,
    write_result,
)

LAYOUT = ("{train,dev,test}_sent_emo.csv; train_splits/, dev_splits_complete/, "
          "output_repeated_splits_test/ dia{D}_utt{U}.mp4")
# The order used by the MELD baselines.
CLASSES = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
SENTIMENT = {"negative": -1.0, "neutral": 0.0, "positive": 1.0}
SPLITS = {
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
REQUIRED = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")

# Text produced by decoding UTF-8 bytes as cp1252 starts with one of these.
_MOJIBAKE_RE = re.compile(r"(?:[\u00c2-\u00f4][\u0080-\u00bf\u0152-\u2122]{1,3})+")
# C1 control characters that are really cp1252 punctuation.
_C1 = {"\x85": "\u2026", "\x91": "\u2018", "\x92": "\u2019", "\x93": "\u201c", "\x94": "\u201d",
       "\x96": "\u2013", "\x97": "\u2014", "\xa0": " "}  # fmt: skip


def _repair_run(m: re.Match[str]) -> str:
    s = m.group(0)
    try:
        return s.encode("cp1252").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s  # not mojibake after all: leave it exactly as it was


def fix_mojibake(text: str) -> str:
    """Repair only what is unambiguous: runs that round-trip cp1252 -> UTF-8 (``â€™`` -> ’),
    and C1 control characters standing for cp1252 punctuation. Everything else is kept."""
    text = _MOJIBAKE_RE.sub(_repair_run, text)
    return "".join(_C1.get(c, c) for c in text).strip()


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a MELD CSV; a clear error for non-UTF-8 files or missing columns."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save the CSV as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = [c.strip() for c in reader.fieldnames or []]
    lacking = [c for c in REQUIRED if c not in cols]
    if lacking:
        raise ValueError(f"{path}: missing column(s) {lacking}; found {cols}")
    return [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]


def _find_csv(root: Path, name: str) -> Path | None:
    exact = root / name
    if exact.is_file():
        return exact
    stem = name.removesuffix(".csv")
    cands = sorted(root.glob(f"{stem}*.csv"))
    return cands[0] if cands else None


def _media_index(root: Path, folder: str) -> dict[str, Path]:
    dirs = [root / folder, *sorted(root.glob(f"*/{folder}")), *sorted(root.glob(f"*/*/{folder}"))]
    return index_media(dirs, VIDEO_EXTS)


def _int(value: str, path: Path, line: int, col: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{path}:{line}: column '{col}': not a number: {value!r}") from None


def _row_clip(row: dict[str, str], split: str, dataset: str, path: Path, line: int) -> Clip:
    d = _int(row["Dialogue_ID"], path, line, "Dialogue_ID")
    u = _int(row["Utterance_ID"], path, line, "Utterance_ID")
    emotion = row["Emotion"].strip().lower() or None
    if emotion is not None and emotion not in CLASSES:
        raise ValueError(f"{path}:{line}: column 'Emotion': unknown emotion {emotion!r}")
    sentiment = row.get("Sentiment", "").strip().lower() or None
    meta: dict[str, Any] = {}
    if sentiment:
        meta["sentiment"] = sentiment
    for key, col in (("season", "Season"), ("episode", "Episode")):
        if row.get(col, "").strip():
            meta[key] = _int(row[col], path, line, col)
    for key, col in (("episode_start", "StartTime"), ("episode_end", "EndTime")):
        if row.get(col, "").strip():
            meta[key] = row[col].strip()
    return Clip(
        id=sanitize_id(f"{split}_dia{d}_utt{u}"),
        dataset=dataset,
        split=split,
        transcript=fix_mojibake(row["Utterance"]),
        speaker=fix_mojibake(row["Speaker"]) or None,
        dialogue_id=f"{split}_dia{d}",
        turn=u,
        labels=Labels(
            emotion=emotion,
            emotion_idx=CLASSES.index(emotion) if emotion else None,
            sentiment=SENTIMENT.get(sentiment or ""),
        ),
        metadata=meta,
    )


def _add_context(clips: list[Clip], context_turns: int | None) -> None:
    """Title = previous utterances of the same dialogue, in Utterance_ID order."""
    by_dia: dict[str, list[Clip]] = {}
    for c in clips:
        by_dia.setdefault(c.dialogue_id or "", []).append(c)
    for dia in by_dia.values():
        dia.sort(key=lambda c: c.turn or 0)
        prev: list[str] = []
        for c in dia:
            c.title = context_title(prev, context_turns)
            prev.append(f"{c.speaker or '?'}: {c.transcript}")


def prepare(
    root: Path,
    out: Path = MANIFEST_DIR,
    name: str | None = None,
    *,
    context_turns: int | None = 5,
) -> PrepareResult:
    """Write MELD manifests for every split whose CSV is present."""
    root = Path(root)
    dataset = dataset_name(name, "meld")
    if not root.is_dir():
        raise FileNotFoundError(f"MELD root {root} is not a folder")
    splits: dict[str, list[Clip]] = {}
    missing: list[tuple[str, str]] = []
    for split, (csv_name, media_dir) in SPLITS.items():
        path = _find_csv(root, csv_name)
        if path is None:
            continue
        media = _media_index(root, media_dir)
        clips: list[Clip] = []
        seen: dict[str, int] = {}
        for line, row in enumerate(read_csv(path), start=2):
            clip = _row_clip(row, split, dataset, path, line)
            if clip.id in seen:
                raise ValueError(f"{path}:{line}: duplicate utterance {clip.id} "
                                 f"(first on line {seen[clip.id]})")
            seen[clip.id] = line
            fname = f"{clip.id.removeprefix(split + '_')}.mp4"
            if fname in media:
                clip.video = relative_to_root(media[fname], root)
            else:
                missing.append((clip.id, f"no {media_dir}/{fname}; kept transcript-only"))
            clips.append(clip)
        _add_context(clips, context_turns)
        splits[split] = clips
    if not splits:
        raise FileNotFoundError(
            f"no MELD CSV under {root}: expected {', '.join(s[0] for s in SPLITS.values())}"
        )
    info = {
        "classes": CLASSES,
        "task": "classification",
        "group_by": "dialogue_id",
        "label_derived": ["sentiment"],
        "targets": ["sentiment"],
    }
    return write_result(dataset, root, Path(out), splits, missing, info)
