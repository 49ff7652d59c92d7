"""CREMA-D (crowd-sourced emotional multimodal actors) -> manifests.

Expected layout (the official repository, CheyneyComputerScience/CREMA-D)::

    <root>/AudioWAV/{actor}_{sentence}_{EMO}_{level}.wav      e.g. 1001_DFA_ANG_XX.wav
    <root>/VideoFlash/{actor}_{sentence}_{EMO}_{level}.flv
    <root>/processedResults/summaryTable.csv    (or at the root) per-clip perceptual votes:
        "",FileName,VoiceVote,VoiceLevel,FaceVote,FaceLevel,MultiModalVote,MultiModalLevel
    <root>/VideoDemographics.csv    ActorID,Age,Sex,Race,Ethnicity (91 actors)

File name: actor 1001-1091, sentence (12 codes, ``SENTENCES``), intended emotion ANG, DIS,
FEA, HAP, NEU, SAD, intended level LO, MD, HI or XX (unspecified).

Decisions:

* Clips: the rows of ``summaryTable.csv`` when it is present (7,442, the released set), else
  every media file whose name follows the pattern. A clip with neither file is kept
  transcript-only and reported in ``missing`` (as MELD does); a file name that does not
  follow the pattern is reported and skipped.
* ``labels`` selects the label source: ``name`` (the acted, intended emotion; default),
  ``voice``, ``face`` or ``av`` (the crowd's majority vote for the audio-only, video-only or
  audio-visual presentation). A vote tied between emotions (``N:S``) keeps the raw string in
  ``labels.emotion`` with ``emotion_idx=None`` and is counted in ``info["tied_votes"]``.
  All three votes and their mean levels are kept in ``metadata.votes``; they, the intended
  ``level`` and the intended emotion are listed in ``label_derived``.
* ``speaker`` is the actor id; folds are actor-grouped (``group_by`` = ``speaker``).
  ``folds=k`` writes ``metadata.fold`` (actors 1001..1091 cut into k contiguous blocks,
  ``block_folds``) and sets ``group_by`` = ``fold`` so ``fit --split kfold --folds k`` uses
  exactly those folds. Everything is in split ``train``.
* Demographics (age, sex, race, ethnicity) from ``VideoDemographics.csv`` go to metadata.
* The transcript is the sentence (chosen to carry no emotion).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST_DIR, Clip, Labels, sanitize_id
from pipeline.recipes.common import (
    PrepareResult,
    block_folds,
    dataset_name,
    relative_to_root,
    write_result,
)

LAYOUT = ("AudioWAV/{actor}_{sentence}_{EMO}_{level}.wav, VideoFlash/*.flv, "
          "processedResults/summaryTable.csv (votes), VideoDemographics.csv")
CLASSES = ["anger", "disgust", "fear", "happy", "neutral", "sad"]
CODES = {"ANG": "anger", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral",
         "SAD": "sad"}  # fmt: skip
VOTE_LETTERS = {"A": "anger", "D": "disgust", "F": "fear", "H": "happy", "N": "neutral",
                "S": "sad"}  # fmt: skip
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
SENTENCES = {
    "IEO": "It's eleven o'clock.",
    "TIE": "That is exactly what happened.",
    "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.",
    "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.",
    "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.",
    "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.",
    "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}
VOTE_COLUMNS = {"voice": ("VoiceVote", "VoiceLevel"), "face": ("FaceVote", "FaceLevel"),
                "av": ("MultiModalVote", "MultiModalLevel")}  # fmt: skip
LABEL_SOURCES = ("name", "voice", "face", "av")
NAME_RE = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


def parse_name(stem: str) -> dict[str, Any]:
    """actor, sentence, emotion, level of a CREMA-D file name; ValueError naming the problem."""
    m = NAME_RE.match(stem)
    if not m:
        raise ValueError("file name does not follow CREMA-D {actor}_{sentence}_{EMO}_{level}")
    actor, sent, emo, level = m.groups()
    if sent not in SENTENCES:
        raise ValueError(f"unknown CREMA-D sentence code {sent}")
    if emo not in CODES:
        raise ValueError(f"unknown CREMA-D emotion code {emo}")
    if level not in LEVELS:
        raise ValueError(f"unknown CREMA-D level code {level}")
    return {"actor": int(actor), "sentence": sent, "emotion": CODES[emo], "level": LEVELS[level]}


def _read_csv(path: Path) -> list[dict[str, str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return [{(k or "").strip(): (v or "").strip() for k, v in r.items()}
            for r in csv.DictReader(io.StringIO(text, newline=""))]


def vote_label(vote: str) -> str:
    """A summaryTable vote (``N``, or a tie ``N:S``) as class name(s) joined by ``:``."""
    parts = [p for p in vote.split(":") if p]
    if not parts or any(p not in VOTE_LETTERS for p in parts):
        raise ValueError(f"vote {vote!r} is not one of {sorted(VOTE_LETTERS)} (or a tie A:B)")
    return ":".join(VOTE_LETTERS[p] for p in parts)


def _level(text: str) -> float | list[float] | None:
    """A mean level; a tied vote has one per tied emotion (``30.67:51.00``)."""
    parts = [float(x) for x in text.split(":") if x.strip()]
    return None if not parts else parts[0] if len(parts) == 1 else parts


def read_summary(path: Path) -> dict[str, dict[str, Any]]:
    """FileName -> {voice, voice_level, face, face_level, av, av_level} from summaryTable.csv."""
    rows = _read_csv(path)
    if rows and "FileName" not in rows[0]:
        raise ValueError(f"{path}: no 'FileName' column (not a CREMA-D summaryTable.csv)")
    out: dict[str, dict[str, Any]] = {}
    for line, r in enumerate(rows, start=2):
        votes: dict[str, Any] = {}
        for src, (vcol, lcol) in VOTE_COLUMNS.items():
            try:
                votes[src] = vote_label(r[vcol])
                votes[f"{src}_level"] = _level(r.get(lcol, ""))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{line}: field '{vcol}': {e}") from None
        out[r["FileName"]] = votes
    return out


def read_demographics(path: Path) -> dict[int, dict[str, Any]]:
    """ActorID -> {age, sex, race, ethnicity} from VideoDemographics.csv."""
    out: dict[int, dict[str, Any]] = {}
    for r in _read_csv(path):
        out[int(r["ActorID"])] = {"age": int(r["Age"]), "sex": r["Sex"].lower(),
                                  "race": r["Race"], "ethnicity": r["Ethnicity"]}
    return out


def _find(root: Path, name: str) -> Path | None:
    for p in (root / name, root / "processedResults" / name):
        if p.is_file():
            return p
    return None


def _media(root: Path, sub: str, ext: str) -> dict[str, Path]:
    d = root / sub
    if not d.is_dir():
        return {}
    return {p.stem: p for p in sorted(d.iterdir())
            if p.suffix.lower() == ext and p.is_file() and not p.name.startswith(".")}


def prepare(
    root: Path,
    out: Path = MANIFEST_DIR,
    name: str | None = None,
    *,
    labels: str = "name",
    folds: int | None = None,
) -> PrepareResult:
    """Write CREMA-D manifests (one clip per take; label source and folds selectable)."""
    root = Path(root)
    dataset = dataset_name(name, "cremad")
    if labels not in LABEL_SOURCES:
        raise ValueError(f"cremad: labels must be one of {', '.join(LABEL_SOURCES)}, not {labels!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"cremad: dataset root {root} is not a folder")
    audio, video = _media(root, "AudioWAV", ".wav"), _media(root, "VideoFlash", ".flv")
    summary_path = _find(root, "summaryTable.csv")
    if summary_path is None and not audio and not video:
        raise FileNotFoundError(f"cremad: expected AudioWAV/*.wav, VideoFlash/*.flv or "
                                f"processedResults/summaryTable.csv under {root} (not found)")
    if labels != "name" and summary_path is None:
        raise FileNotFoundError(f"cremad: labels={labels} needs processedResults/summaryTable.csv "
                                f"under {root} (not found)")
    votes = read_summary(summary_path) if summary_path else {}
    demo_path = _find(root, "VideoDemographics.csv")
    demo = read_demographics(demo_path) if demo_path else {}
    missing: list[tuple[str, str]] = []
    stems = list(votes) if votes else sorted(set(audio) | set(video))
    parsed: dict[str, dict[str, Any]] = {}
    for stem in stems:
        try:
            parsed[stem] = parse_name(stem)
        except ValueError as e:
            missing.append((sanitize_id(stem), f"{stem}: {e}; skipped"))
    fold_of = block_folds([p["actor"] for p in parsed.values()], folds) if folds else {}
    clips: list[Clip] = []
    tied = 0
    for stem, p in parsed.items():
        a, v = audio.get(stem), video.get(stem)
        if a is None and v is None:
            missing.append((stem, f"no AudioWAV/{stem}.wav nor VideoFlash/{stem}.flv; "
                                  "kept transcript-only"))
        emotion = p["emotion"] if labels == "name" else votes[stem][labels]
        idx = CLASSES.index(emotion) if emotion in CLASSES else None
        tied += idx is None
        meta: dict[str, Any] = {"sentence": p["sentence"], "intended_emotion": p["emotion"],
                                "level": p["level"], **demo.get(p["actor"], {})}
        if stem in votes:
            meta["votes"] = votes[stem]
        if fold_of:
            meta["fold"] = f"fold{fold_of[p['actor']]}"
        clips.append(Clip(
            id=stem, dataset=dataset, split="train",
            video=relative_to_root(v, root) if v else None,
            audio=relative_to_root(a, root) if a else None,
            transcript=SENTENCES[p["sentence"]], speaker=str(p["actor"]),
            labels=Labels(emotion=emotion, emotion_idx=idx), metadata=meta,
        ))
    if not clips:
        raise FileNotFoundError(f"cremad: no clip named {{actor}}_{{sentence}}_{{EMO}}_{{level}} under {root}")
    info = {"classes": CLASSES, "task": "classification",
            "group_by": "fold" if folds else "speaker",
            "label_derived": ["votes", "level", "intended_emotion"],
            "label_source": labels, "tied_votes": tied,
            "folds": {str(k): f"fold{v}" for k, v in sorted(fold_of.items())} if fold_of else None}
    return write_result(dataset, root, Path(out), {"train": clips}, missing, info)
