"""RAVDESS (acted speech and song) -> manifests.

Expected layout: the official archives unpacked under one root, any depth::

    <root>/Actor_01/03-01-05-01-02-01-01.wav    audio-only    (Audio_Speech_Actors_01-24.zip)
    <root>/Actor_01/01-01-05-01-02-01-01.mp4    full AV       (Video_Speech_Actor_01.zip)
    <root>/Actor_01/02-01-05-01-02-01-01.mp4    video-only

File name ``MM-VC-EE-II-SS-RR-AA``: MM modality (01 AV, 02 video-only, 03 audio-only), VC vocal
channel (01 speech, 02 song), EE emotion (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry,
06 fearful, 07 disgust, 08 surprised), II intensity (01 normal, 02 strong), SS statement
(01 "Kids are talking by the door", 02 "Dogs are sitting by the door"), RR repetition,
AA actor (odd male, even female).

Decisions:

* One clip per recording (``VC-EE-II-SS-RR-AA``): the files of one recording in different
  modalities are paired (video from the AV file, else the video-only file; audio from the
  audio-only file when present, else the AV file's own track). The id is the stem of the
  audio-only file when present, else of the file giving the video.
* ``speaker`` is ``Actor_AA`` and ``group_by`` is ``speaker`` (actor-grouped folds). Everything
  is in ``train`` unless ``valid_actors`` / ``test_actors`` hold actors out.
* ``folds=5`` or ``folds=6`` selects an actor-fold protocol: the actors present, sorted, are cut
  into contiguous blocks (``block_folds``: 6 folds of 4 actors for the 24 actors; 5 folds of
  5/5/5/5/4), written to ``metadata.fold``; ``group_by`` becomes ``fold`` so
  ``fit --split kfold --folds 6`` reproduces exactly those folds.
* An audio-visual take and its audio-only twin (same ``VC-EE-II-SS-RR-AA``) are one clip:
  ``metadata.modalities`` lists the files paired (``audio-video+audio-only``).
* ``metadata.intensity`` is listed in ``label_derived``: it annotates the emotion (neutral
  has no strong intensity), so using it as an input would leak the label.
* ``valid_intensity="strong"`` carves validation *within* the training actors: their
  strong-intensity takes go to ``valid``. For a set of too few actors to hold one out for
  validation (the shared 2-actor excerpt: one actor trains, the other is the test), since the
  trainer carves validation from whole groups only.
* The transcript is the statement (what the actor says); it carries no emotion by design.
* File names that do not follow the pattern are reported in ``missing`` and skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.manifest import MANIFEST_DIR, Clip, Labels, sanitize_id
from pipeline.recipes.common import (
    AUDIO_EXTS,
    VIDEO_EXTS,
    PrepareResult,
    block_folds,
    dataset_name,
    relative_to_root,
    walk_files,
    write_result,
)

LAYOUT = ("Actor_XX/MM-VC-EE-II-SS-RR-AA.{mp4,wav}: 01- audio-video, 02- video-only, "
          "03- audio-only; speech and song")
CLASSES = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
STATEMENTS = {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"}
INTENSITY = {1: "normal", 2: "strong"}
CHANNEL = {1: "speech", 2: "song"}
MODALITY = {1: "audio-video", 2: "video-only", 3: "audio-only"}
NAME_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")


def parse_name(stem: str) -> dict[str, int]:
    """The seven codes of a RAVDESS file name; ValueError naming what is wrong."""
    m = NAME_RE.match(stem)
    if not m:
        raise ValueError("file name does not follow RAVDESS MM-VC-EE-II-SS-RR-AA")
    mm, vc, ee, ii, ss, rr, aa = (int(g) for g in m.groups())
    checks = [(mm in MODALITY, "modality"), (vc in CHANNEL, "vocal channel"),
              (1 <= ee <= len(CLASSES), "emotion"), (ii in INTENSITY, "intensity"),
              (ss in STATEMENTS, "statement"), (rr in (1, 2), "repetition"), (aa >= 1, "actor")]
    for ok, what in checks:
        if not ok:
            raise ValueError(f"RAVDESS file name has an invalid {what} code")
    return {"modality": mm, "channel": vc, "emotion": ee, "intensity": ii,
            "statement": ss, "repetition": rr, "actor": aa}  # fmt: skip


def _recording_files(root: Path, missing: list[tuple[str, str]]) -> dict[str, dict[int, Path]]:
    """Recording key -> {modality code: file}."""
    recs: dict[str, dict[int, Path]] = {}
    for p in walk_files(root):
        ext = p.suffix.lower()
        if p.name.startswith(".") or not p.is_file() or ext not in VIDEO_EXTS + AUDIO_EXTS:
            continue
        try:
            codes = parse_name(p.stem)
        except ValueError as e:
            missing.append((sanitize_id(p.stem), f"{relative_to_root(p, root)}: {e}; skipped"))
            continue
        if (codes["modality"] == 3) != (ext in AUDIO_EXTS):
            missing.append((sanitize_id(p.stem), f"{relative_to_root(p, root)}: modality code "
                            f"{codes['modality']:02d} does not match a {ext} file; skipped"))
            continue
        recs.setdefault(p.stem[3:], {}).setdefault(codes["modality"], p)
    return recs


def _clip(files: dict[int, Path], root: Path, dataset: str, split_of: dict[int, str],
          fold_of: dict[int, int]) -> Clip:
    video = files.get(1) or files.get(2)
    audio = files.get(3)
    primary = audio or video
    assert primary is not None  # a recording has at least one file
    c = parse_name(primary.stem)
    actor = c["actor"]
    return Clip(
        id=sanitize_id(primary.stem),
        dataset=dataset,
        split=split_of.get(actor, "train"),
        video=relative_to_root(video, root) if video else None,
        audio=relative_to_root(audio, root) if audio else None,
        transcript=STATEMENTS[c["statement"]],
        speaker=f"Actor_{actor:02d}",
        labels=Labels(emotion=CLASSES[c["emotion"] - 1], emotion_idx=c["emotion"] - 1),
        metadata={
            "intensity": INTENSITY[c["intensity"]],
            "statement": c["statement"],
            "repetition": c["repetition"],
            "gender": "male" if actor % 2 else "female",
            "vocal_channel": CHANNEL[c["channel"]],
            "modalities": "+".join(MODALITY[m] for m in sorted(files)),
            **({"fold": f"fold{fold_of[actor]}"} if fold_of else {}),
        },
    )


def prepare(
    root: Path,
    out: Path = MANIFEST_DIR,
    name: str | None = None,
    *,
    valid_actors: list[int] | tuple[int, ...] = (),
    test_actors: list[int] | tuple[int, ...] = (),
    folds: int | None = None,
    valid_intensity: str | None = None,
) -> PrepareResult:
    """Write RAVDESS manifests (one clip per recording, labels from the file names)."""
    root = Path(root)
    dataset = dataset_name(name, "ravdess")
    if not root.is_dir():
        raise FileNotFoundError(f"ravdess: dataset root {root} is not a folder")
    if valid_intensity not in (None, *INTENSITY.values()):
        raise ValueError(f"ravdess: valid_intensity must be one of {sorted(INTENSITY.values())}, "
                         f"not {valid_intensity!r}")
    if folds not in (None, 5, 6):
        raise ValueError(f"ravdess: folds must be 5 or 6 (the actor-fold protocols), not {folds}")
    both = set(valid_actors) & set(test_actors)
    if both:
        raise ValueError(f"actors {sorted(both)} are in both valid_actors and test_actors")
    split_of = {int(a): "valid" for a in valid_actors} | {int(a): "test" for a in test_actors}
    missing: list[tuple[str, str]] = []
    splits: dict[str, list[Clip]] = {}
    recs = _recording_files(root, missing)
    actors = {int(k[-2:]) for k in recs}
    if folds and len(actors) < folds:
        raise ValueError(f"ravdess: folds={folds} needs at least {folds} actors, found {len(actors)}")
    fold_of = block_folds(actors, folds) if folds else {}
    for key in sorted(recs, key=lambda k: (k[-2:], k)):  # actor first
        files = recs[key]
        clip = _clip(files, root, dataset, split_of, fold_of)
        if valid_intensity and clip.split == "train" and clip.metadata["intensity"] == valid_intensity:
            clip.split = "valid"
        splits.setdefault(clip.split, []).append(clip)
    if not splits:
        raise FileNotFoundError(f"ravdess: expected Actor_XX/MM-VC-EE-II-SS-RR-AA.wav or .mp4 "
                                f"under {root} (not found)")
    # intensity is part of the emotion annotation (neutral is never "strong"): label-derived
    info = {"classes": CLASSES, "task": "classification",
            "group_by": "fold" if fold_of else "speaker", "label_derived": ["intensity"],
            "folds": {f"Actor_{a:02d}": f"fold{f}" for a, f in sorted(fold_of.items())} or None}
    return write_result(dataset, root, Path(out), splits, missing, info)
