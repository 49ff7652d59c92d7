"""IEMOCAP (dyadic acted sessions, categorical + dimensional labels) -> manifests.

Expected layout (the release as distributed, ``IEMOCAP_full_release/`` or its content)::

    <root>/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt     one block per evaluated turn:
        [6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
        C-E2:\tNeutral;\t()                    categorical annotator lines
        A-E3:\tval 3; act 2; dom  2;\t()       dimensional annotator lines
    <root>/Session{n}/sentences/wav/<dialog>/<turn>.wav         one wav per turn
    <root>/Session{n}/dialog/avi/DivX/<dialog>.avi              the whole dialogue, both actors
    <root>/Session{n}/dialog/transcriptions/<dialog>.txt       "<turn> [start-end]: text"

Decisions:

* Every evaluated turn is a clip, with the id as released (``Ses01F_impro01_F000``) and its raw
  label (``ang hap exc sad fru neu sur fea dis oth xxx``). ``xxx`` (no majority) and ``oth``
  are kept and marked (``metadata.label_status`` = ``no_agreement`` / ``other``); nothing is
  dropped at prepare: the label set (``iemocap4`` / ``iemocap6`` in fusion/labelsets.toml) is
  a fit-time choice. ``CLASSES`` is the raw label list, so ``emotion_idx`` is set for all.
* V / A / D: ``labels.valence`` and ``labels.arousal`` (the released means, 1..5); dominance
  is ``metadata.dominance``. The annotator lines are kept in ``metadata.annotations``
  (``categorical``: evaluator -> labels, ``dimensional``: evaluator -> {val, act, dom});
  both are listed in ``label_derived``.
* Media: the video is ``dialog/avi/DivX/<dialog>.avi`` cut by the turn's ``start`` / ``end``
  (the whole frame: both actors share it). The extractor cuts audio and video of a clip by the
  same ``start`` / ``end``, so the clip's audio comes from the avi's own track; the per-turn
  wav is recorded in ``metadata.turn_wav``. ``media="wav"`` makes audio-only clips from the
  per-turn wavs instead (no cut). Without the avi, the wav is used; with neither, the clip is
  kept transcript-only and reported in ``missing``.
* Who speaks: ``metadata.speaker_gender`` (F / M, the last part of the turn id) and
  ``metadata.mocap_gender`` (the actor wearing markers in that dialogue: the session folder's
  letter, ``Ses01F`` -> F); the recipe does not claim a left / right position in the frame.
* ``speaker`` = session + gender (``Ses01_F``); ``metadata.session`` = ``Ses01``;
  ``group_by`` = ``session`` so ``fit --split kfold --folds 5`` is leave-one-session-out.
  ``metadata.mode`` = ``improvised`` / ``scripted``. Everything is in split ``train``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST_DIR, Clip, Labels
from pipeline.recipes.common import PrepareResult, dataset_name, relative_to_root, write_result

LAYOUT = ("Session{1..5}/dialog/EmoEvaluation/<dialog>.txt; sentences/wav/<dialog>/<turn>.wav; "
          "dialog/avi/DivX/<dialog>.avi; dialog/transcriptions/<dialog>.txt")
CLASSES = ["ang", "hap", "exc", "sad", "fru", "neu", "sur", "fea", "dis", "oth", "xxx"]
STATUS = {"xxx": "no_agreement", "oth": "other"}
HEAD_RE = re.compile(
    r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(Ses\d\d[FM]_\S+_[FM]\d+)\s+(\w+)\s+"
    r"\[\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*\]\s*$"
)
CAT_RE = re.compile(r"^(C-[\w-]+):\s*(.*?)\s*\((.*)\)\s*$")
DIM_RE = re.compile(r"^(A-[\w-]+):\s*val\s*([\d.]+);\s*act\s*([\d.]+);\s*dom\s*([\d.]+);?\s*\((.*)\)\s*$")
TRANS_RE = re.compile(r"^(Ses\S+)\s+\[([\d.]+)-([\d.]+)\]:\s*(.*)$")


def dialog_of(turn: str) -> str:
    """``Ses01F_script01_1_F000`` -> ``Ses01F_script01_1``."""
    return turn.rsplit("_", 1)[0]


def parse_evaluation(path: Path) -> list[dict[str, Any]]:
    """The turns of one EmoEvaluation file with their annotator lines; ValueError on a bad head."""
    turns: list[dict[str, Any]] = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if line.startswith("["):
            m = HEAD_RE.match(line)
            if m is None:
                raise ValueError(f"{path}:{lineno}: not an EmoEvaluation turn line "
                                 "'[start - end]\\tTURN\\tEMO\\t[V, A, D]'")
            s, e, turn, emo, v, a, d = m.groups()
            turns.append({"turn": turn, "start": float(s), "end": float(e), "emotion": emo,
                          "vad": (float(v), float(a), float(d)),
                          "categorical": {}, "dimensional": {}, "line": lineno})
            continue
        if not turns:
            continue
        if (c := CAT_RE.match(line)) is not None:
            labels = [x.strip() for x in c.group(2).split(";") if x.strip()]
            turns[-1]["categorical"][c.group(1)] = labels
        elif (d := DIM_RE.match(line)) is not None:
            turns[-1]["dimensional"][d.group(1)] = {
                "val": float(d.group(2)), "act": float(d.group(3)), "dom": float(d.group(4))}
    return turns


def parse_transcription(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            m = TRANS_RE.match(line.strip())
            if m:
                out[m.group(1)] = m.group(4).strip()
    return out


def prepare(
    root: Path,
    out: Path = MANIFEST_DIR,
    name: str | None = None,
    *,
    media: str = "avi",
) -> PrepareResult:
    """Write IEMOCAP manifests (every evaluated turn, raw labels, V/A/D, session groups)."""
    root = Path(root)
    dataset = dataset_name(name, "iemocap")
    if media not in ("avi", "wav"):
        raise ValueError(f"iemocap: media must be 'avi' or 'wav', not {media!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"iemocap: dataset root {root} is not a folder")
    if (root / "IEMOCAP_full_release").is_dir():
        root = root / "IEMOCAP_full_release"
    evals = sorted(root.glob("Session[1-5]/dialog/EmoEvaluation/*.txt"))
    evals = [p for p in evals if not p.name.startswith(".")]
    if not evals:
        raise FileNotFoundError(f"iemocap: expected Session1/dialog/EmoEvaluation/<dialog>.txt "
                                f"under {root} (not found)")
    missing: list[tuple[str, str]] = []
    clips: list[Clip] = []
    seen: set[str] = set()
    for ev in evals:
        sess_dir = ev.parents[2]
        dialog = ev.stem
        trans = parse_transcription(sess_dir / "dialog" / "transcriptions" / f"{dialog}.txt")
        avi = sess_dir / "dialog" / "avi" / "DivX" / f"{dialog}.avi"
        for t in parse_evaluation(ev):
            tid = t["turn"]
            if tid in seen:
                missing.append((tid, f"{ev.name}:{t['line']}: turn listed twice; skipped"))
                continue
            seen.add(tid)
            wav = sess_dir / "sentences" / "wav" / dialog_of(tid) / f"{tid}.wav"
            use_avi = media == "avi" and avi.is_file()
            video = relative_to_root(avi, root) if use_avi else None
            audio = relative_to_root(wav, root) if not use_avi and wav.is_file() else None
            if video is None and audio is None:
                missing.append((tid, f"neither {avi.relative_to(root).as_posix()} nor "
                                     f"{wav.relative_to(root).as_posix()}; kept transcript-only"))
            v, a, d = t["vad"]
            session = tid[:5]
            emo = t["emotion"]
            meta: dict[str, Any] = {
                "session": session, "mode": "improvised" if "_impro" in tid else "scripted",
                "dominance": d, "speaker_gender": tid.rsplit("_", 1)[1][0],
                "mocap_gender": tid[5], "label_status": STATUS.get(emo, "majority"),
                "annotations": {"categorical": t["categorical"], "dimensional": t["dimensional"]},
                "turn_wav": wav.relative_to(root).as_posix(),
            }
            if use_avi:
                meta["cut"] = "avi by start/end (both actors in the frame)"
            clips.append(Clip(
                id=tid, dataset=dataset, split="train", video=video, audio=audio,
                transcript=trans.get(tid), speaker=f"{session}_{meta['speaker_gender']}",
                dialogue_id=dialog_of(tid), turn=int(re.sub(r"\D", "", tid.rsplit("_", 1)[1]) or 0),
                start=t["start"] if use_avi else None, end=t["end"] if use_avi else None,
                labels=Labels(emotion=emo, emotion_idx=CLASSES.index(emo) if emo in CLASSES else None,
                              valence=v, arousal=a),
                metadata=meta,
            ))
            if not use_avi:
                clips[-1].metadata.update(start=t["start"], end=t["end"])
    info = {"classes": CLASSES, "task": "classification", "group_by": "session",
            "label_derived": ["annotations", "dominance", "label_status"],
            "label_sets": ["iemocap4", "iemocap6"], "media": media}
    return write_result(dataset, root, Path(out), {"train": clips}, missing, info)
