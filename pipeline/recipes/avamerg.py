"""AvaMERG (avatar-based multimodal empathetic dialogues) -> manifests.

Expected layout (any of the annotation files may be absent)::

    <root>/train.json, valid.json (or val.json / dev.json), test.json   official layout
    <root>/random_video_mappings_*.json                                 mapped layout (train)
    <root>/video/ or videos/   dia{conversation_id:05d}utt{index}_{profile ID}.mp4 (any depth)
    <root>/audio/ or audios/   dia{conversation_id:05d}utt{index}_{profile ID}.wav (any depth)

Official layout: a list of conversations ``{conversation_id, speaker_profile{age, gender,
timbre, ID}, listener_profile, topic, turns[{turn_id, context, dialogue_history[{index, role,
utterance}], response?, chain_of_empathy?}], response?, chain_of_empathy?}``; the histories are
cumulative (turn k repeats turns < k). Mapped layout: ``{conversation_id, turn{turn_id, context,
dialogue[{index, role, text, video_name, video_path}], chain_of_empathy}, speaker_profile,
listener_profile, topic}``.

Decisions (documented here because the corpus leaves them open):

* Clips: one per utterance of the role(s) in ``roles`` (default: the ``speaker`` role only).
  ``chain_of_empathy.speaker_emotion`` annotates the *speaker* of the conversation, so only
  speaker utterances carry the label; listener utterances, if asked for, are unlabelled.
  An utterance takes the label of the first turn whose history contains it.
* Labels: the 32 fine labels are projected to the official 7 classes (``EMOTION_TO_CLASS``,
  from the AvaMERG baseline loader). Labels with no class (``tired`` ...) keep their string in
  ``labels.emotion`` with ``emotion_idx=None``; they are counted in ``info["unmapped_labels"]``.
  ``labels.emotion`` is the class name when mapped, the fine label is in
  ``metadata.chain_of_empathy.speaker_emotion``.
* Conditioning title: ``Topic: ...`` plus the previous utterances (``role: text``).
  The turn ``context`` (the situation prompt written for the emotion) and the whole
  ``chain_of_empathy`` are metadata and listed in ``label_derived``.
* Splits: by file. If only one file has labels, its conversations are split by a hash of the
  conversation id (``split_fractions``); an unlabelled file whose split name collides (the
  official ``test.json`` has no labels) becomes ``<name>_unlabelled``.
* Missing media: the clip is kept text-only and reported in ``missing``. A conversation id seen
  in two files is kept in the first and reported for the second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST_DIR, Clip, Labels, sanitize_id
from pipeline.recipes.common import (
    AUDIO_EXTS,
    DEFAULT_FRACTIONS,
    VIDEO_EXTS,
    PrepareResult,
    context_title,
    dataset_name,
    grouped_split,
    index_media,
    relative_to_root,
    write_result,
)

LAYOUT = ("train.json / valid.json / test.json (official) or random_video_mappings_*.json "
          "(mapped); video/ dia{conv:05d}utt{i}_{ID}.mp4, audio/ ... .wav")
CLASSES = ["happy", "surprised", "angry", "fear", "sad", "disgusted", "contempt"]

# Official projection (AvaMERG-Pipeline ed_emotion_projection, resolved to the 7 classes).
# None: the label never reaches a class in the official loader.
EMOTION_TO_CLASS: dict[str, str | None] = {
    "conflicted": "sad", "vulnerability": "fear", "helplessness": "fear", "sadness": "sad",
    "pensive": "sad", "frustration": "angry", "weary": None, "anxiety": "sad", "reflective": "sad",
    "upset": "sad", "worried": "sad", "fear": "fear", "frustrated": "sad", "fatigue": None,
    "lost": "contempt", "disappointment": "sad", "nostalgia": "sad", "exhaustion": None,
    "uneasy": "sad", "loneliness": "sad", "fragile": "fear", "confused": "contempt",
    "vulnerable": "fear", "thoughtful": "sad", "stressed": "sad", "concerned": "sad",
    "tiredness": None, "burdened": "sad", "melancholy": "sad", "overwhelmed": "sad",
    "worry": "sad", "heavy-hearted": "sad", "melancholic": "sad", "nervous": "sad",
    "fearful": "fear", "stress": "sad", "confusion": "sad", "inadequacy": "sad", "regret": "sad",
    "helpless": "fear", "concern": "sad", "exhausted": None, "overwhelm": "sad", "tired": None,
    "disappointed": "sad", "surprised": "surprised", "excited": "happy", "angry": "angry",
    "proud": "happy", "annoyed": "angry", "grateful": "happy", "lonely": "sad", "afraid": "fear",
    "terrified": "fear", "guilty": "sad", "impressed": "surprised", "disgusted": "disgusted",
    "hopeful": "happy", "confident": "happy", "furious": "angry", "anxious": "sad",
    "anticipating": "happy", "joyful": "happy", "nostalgic": "sad", "prepared": "happy",
    "jealous": "contempt", "content": "happy", "devastated": "surprised", "embarrassed": "sad",
    "caring": "happy", "sentimental": "sad", "trusting": "happy", "ashamed": "sad",
    "apprehensive": "fear", "faithful": "happy",
    # the 7 class names map to themselves (some annotations already use them)
    "happy": "happy", "sad": "sad", "contempt": "contempt",
}  # fmt: skip

LABEL_DERIVED = ["chain_of_empathy.*", "situation"]
SPLIT_FILES = {
    "train": ("train.json",),
    "valid": ("valid.json", "val.json", "dev.json"),
    "test": ("test.json",),
}
MAPPED_GLOB = "random_video_mappings_*.json"


def map_emotion(label: str | None) -> tuple[str | None, int | None]:
    """Fine label -> (label string to keep, class index or None)."""
    if not label or not str(label).strip():
        return None, None
    fine = str(label).strip().lower()
    cls = EMOTION_TO_CLASS.get(fine)
    if cls is None:
        return fine, None
    return cls, CLASSES.index(cls)


@dataclass
class Utterance:
    index: int
    role: str
    text: str
    coe: dict[str, Any] = field(default_factory=dict)  # chain_of_empathy of its first turn
    situation: str | None = None
    video_name: str | None = None


@dataclass
class Conversation:
    cid: str
    source: Path
    speaker_profile: dict[str, Any] = field(default_factory=dict)
    listener_profile: dict[str, Any] = field(default_factory=dict)
    topic: str | None = None
    utterances: dict[int, Utterance] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return any(u.coe.get("speaker_emotion") for u in self.utterances.values())


# --- parsing ---------------------------------------------------------------------------------
def _load_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise ValueError(f"{path}: expected a JSON list of conversation objects")
    return data


def _add(conv: Conversation, utt: Utterance) -> None:
    """Keep the first occurrence of an utterance index (the earliest turn that has it)."""
    if utt.index not in conv.utterances:
        conv.utterances[utt.index] = utt


def _turn_utterances(turn: dict[str, Any], conv_coe: dict[str, Any]) -> list[Utterance]:
    """Utterances of one turn in either layout, with that turn's annotation attached."""
    coe = turn.get("chain_of_empathy") or conv_coe or {}
    situation = turn.get("context")
    out: list[Utterance] = []
    rows = turn.get("dialogue_history") or turn.get("dialogue") or []
    for r in rows:
        text = r.get("utterance", r.get("text"))
        if text is None or "index" not in r:
            continue
        out.append(
            Utterance(int(r["index"]), str(r.get("role", "")), str(text), coe, situation,
                      r.get("video_name"))
        )
    resp = turn.get("response")
    if isinstance(resp, str) and resp.strip():
        nxt = max((u.index for u in out), default=-1) + 1
        out.append(Utterance(nxt, "listener_response", resp, coe, situation))
    return out


def parse_conversation(raw: dict[str, Any], source: Path, pos: int) -> Conversation:
    """One conversation record of the official or mapped layout."""
    if "conversation_id" not in raw:
        raise ValueError(f"{source}: conversation #{pos} has no 'conversation_id'")
    conv = Conversation(
        cid=str(raw["conversation_id"]),
        source=source,
        speaker_profile=raw.get("speaker_profile") or {},
        listener_profile=raw.get("listener_profile") or {},
        topic=raw.get("topic"),
    )
    conv_coe = raw.get("chain_of_empathy") or {}
    turns = raw.get("turns")
    if turns is None and isinstance(raw.get("turn"), dict):
        turns = [raw["turn"]]
    for turn in turns or []:
        for u in _turn_utterances(turn, conv_coe):
            _add(conv, u)
    if isinstance(raw.get("response"), str) and raw["response"].strip():
        nxt = max(conv.utterances, default=-1) + 1
        _add(conv, Utterance(nxt, "listener_response", raw["response"], conv_coe))
    return conv


def _merge(into: Conversation, other: Conversation) -> None:
    for u in other.utterances.values():
        _add(into, u)


def read_sources(root: Path) -> dict[str, list[Conversation]]:
    """Split name -> conversations, from official files and (as train) mapped files."""
    sources: dict[str, dict[str, Conversation]] = {}
    files: list[tuple[str, Path]] = []
    for split, names in SPLIT_FILES.items():
        for n in names:
            if (root / n).is_file():
                files.append((split, root / n))
                break
    files += [("train", p) for p in sorted(root.glob(MAPPED_GLOB))]
    for split, path in files:
        convs = sources.setdefault(split, {})
        for pos, raw in enumerate(_load_json_list(path)):
            conv = parse_conversation(raw, path, pos)
            if conv.cid in convs:
                _merge(convs[conv.cid], conv)
            else:
                convs[conv.cid] = conv
    return {s: list(c.values()) for s, c in sources.items()}


# --- media -----------------------------------------------------------------------------------
def _media_dirs(root: Path, explicit: str | Path | None, defaults: tuple[str, ...]) -> list[Path]:
    if explicit is not None:
        d = Path(explicit)
        d = d if d.is_absolute() else root / d
        if not d.is_dir():
            raise FileNotFoundError(f"media folder {d} does not exist")
        try:
            d.resolve().relative_to(root.resolve())
        except ValueError:
            raise ValueError(f"media folder {d} is outside the dataset root {root}") from None
        return [d]
    return [root / n for n in defaults]


def media_stems(conv: Conversation, utt: Utterance) -> list[str]:
    """Candidate file stems ``dia{cid}utt{index}_{ID}`` (5-digit padded id first)."""
    profile = conv.speaker_profile if utt.role.startswith("speaker") else conv.listener_profile
    pid = profile.get("ID")
    stems: list[str] = []
    if utt.video_name:
        stems.append(Path(str(utt.video_name).replace("\\", "/")).stem)
    if pid is None:
        return stems
    ids = [conv.cid]
    if conv.cid.isdigit():
        ids = [f"{int(conv.cid):05d}", str(int(conv.cid)), conv.cid]
    for c in dict.fromkeys(ids):
        stems.append(f"dia{c}utt{utt.index}_{pid}")
    return list(dict.fromkeys(stems))


def _find(index: dict[str, Path], stems: list[str], exts: tuple[str, ...]) -> Path | None:
    for s in stems:
        for e in exts:
            if f"{s}{e}" in index:
                return index[f"{s}{e}"]
    return None


# --- clips -----------------------------------------------------------------------------------
def _profile_meta(profile: dict[str, Any]) -> dict[str, Any]:
    """Voice profile of the utterance's speaker; the avatar ID is identity (Clip.speaker),
    not a feature, so it stays out of the metadata vector."""
    return {k.lower(): v for k, v in profile.items() if v is not None and k != "ID"}


def _clip(
    conv: Conversation, utt: Utterance, dataset: str, split: str, prev: list[str],
    context_turns: int | None,
) -> Clip:
    profile = conv.speaker_profile if utt.role.startswith("speaker") else conv.listener_profile
    labels = Labels()
    if utt.role == "speaker":
        emotion, idx = map_emotion(utt.coe.get("speaker_emotion"))
        labels = Labels(emotion=emotion, emotion_idx=idx)
    meta: dict[str, Any] = {"role": utt.role, "profile": _profile_meta(profile)}
    if conv.topic:
        meta["topic"] = conv.topic
    if utt.situation:
        meta["situation"] = utt.situation
    if utt.coe:
        meta["chain_of_empathy"] = dict(utt.coe)
    header = f"Topic: {conv.topic}" if conv.topic else None
    pid = profile.get("ID")
    return Clip(
        id=sanitize_id(f"dia{conv.cid}_utt{utt.index}"),
        dataset=dataset,
        split=split,
        transcript=utt.text,
        title=context_title(prev, context_turns, header),
        speaker=f"avatar{pid}" if pid is not None else None,
        dialogue_id=conv.cid,
        turn=utt.index,
        labels=labels,
        metadata=meta,
    )


def _assign_splits(
    sources: dict[str, list[Conversation]], fractions: dict[str, float]
) -> dict[str, list[Conversation]]:
    """Official splits, or a hash split of the only labelled file (see module docstring)."""
    labelled = [s for s, convs in sources.items() if any(c.labelled for c in convs)]
    if len(labelled) != 1:
        return sources
    out: dict[str, list[Conversation]] = {s: [] for s in fractions}
    for conv in sources[labelled[0]]:
        out[grouped_split(conv.cid, fractions)].append(conv)
    for s, convs in sources.items():
        if s == labelled[0]:
            continue
        out[f"{s}_unlabelled" if s in fractions else s] = convs
    return out


def prepare(
    root: Path,
    out: Path = MANIFEST_DIR,
    name: str | None = None,
    *,
    roles: tuple[str, ...] | str = ("speaker",),
    context_turns: int | None = None,
    video_dir: str | Path | None = None,
    audio_dir: str | Path | None = None,
    split_fractions: dict[str, float] | None = None,
) -> PrepareResult:
    """Write AvaMERG manifests. ``roles="all"`` also makes (unlabelled) listener clips."""
    root = Path(root)
    dataset = dataset_name(name, "avamerg")
    if not root.is_dir():
        raise FileNotFoundError(f"AvaMERG root {root} is not a folder")
    sources = read_sources(root)
    if not sources:
        raise FileNotFoundError(
            f"no AvaMERG annotation under {root}: expected train.json / valid.json / test.json "
            f"or {MAPPED_GLOB}"
        )
    fractions = split_fractions or DEFAULT_FRACTIONS
    videos = index_media(_media_dirs(root, video_dir, ("video", "videos")), VIDEO_EXTS)
    audios = index_media(_media_dirs(root, audio_dir, ("audio", "audios")), AUDIO_EXTS)

    splits: dict[str, list[Clip]] = {}
    missing: list[tuple[str, str]] = []
    unmapped: dict[str, int] = {}
    seen: dict[str, str] = {}
    for split, convs in _assign_splits(sources, fractions).items():
        clips = splits.setdefault(split, [])
        for conv in sorted(convs, key=lambda c: c.cid):
            if conv.cid in seen:
                missing.append((sanitize_id(f"dia{conv.cid}"),
                                f"conversation {conv.cid} of {conv.source.name} is also in "
                                f"split '{seen[conv.cid]}'; kept there only"))
                continue
            seen[conv.cid] = split
            prev: list[str] = []
            for utt in sorted(conv.utterances.values(), key=lambda u: u.index):
                if roles == "all" or utt.role in roles:
                    clip = _clip(conv, utt, dataset, split, prev, context_turns)
                    _attach_media(clip, conv, utt, root, videos, audios, missing)
                    if clip.labels.emotion and clip.labels.emotion_idx is None:
                        unmapped[clip.labels.emotion] = unmapped.get(clip.labels.emotion, 0) + 1
                    clips.append(clip)
                prev.append(f"{utt.role}: {utt.text}")
    info = {
        "classes": CLASSES,
        "task": "classification",
        "group_by": "dialogue_id",
        "label_derived": LABEL_DERIVED,
        "unmapped_labels": dict(sorted(unmapped.items())),
        "conversations": {s: len({c.dialogue_id for c in v}) for s, v in splits.items() if v},
    }
    return write_result(dataset, root, Path(out), splits, missing, info)


def _attach_media(
    clip: Clip, conv: Conversation, utt: Utterance, root: Path,
    videos: dict[str, Path], audios: dict[str, Path], missing: list[tuple[str, str]],
) -> None:
    stems = media_stems(conv, utt)
    v, a = _find(videos, stems, VIDEO_EXTS), _find(audios, stems, AUDIO_EXTS)
    clip.video = relative_to_root(v, root) if v else None
    clip.audio = relative_to_root(a, root) if a else None
    if v is None and a is None:
        why = (f"no video or audio file {stems[0]}.mp4/.wav under video(s)/ or audio(s)/"
               if stems else "no profile ID to name its media file")
        missing.append((clip.id, f"{why}; kept text-only"))
