"""Recipes on the real annotation files in ../shared/data and on fixtures in official layouts."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from pipeline.manifest import load_dataset, read_dataset_info, read_manifest
from pipeline.recipes import RECIPES, PrepareResult, avamerg, folder, grouped_split, meld, ravdess
from tests.conftest import shared_path


def _all(res: PrepareResult) -> list:
    return [c for clips in res.splits.values() for c in clips]


def test_registry_and_signature(tmp_path: Path) -> None:
    assert {"avamerg", "folder", "meld", "ravdess"} <= set(RECIPES)  # all: test_recipes_corpora
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    res = RECIPES["folder"](root=tmp_path, out=tmp_path / "m", name="sample")
    assert res.dataset == "sample" and res.paths["dataset"].is_file()


def test_grouped_split_is_deterministic() -> None:
    groups = [f"g{i}" for i in range(2000)]
    first = [grouped_split(g) for g in groups]
    assert first == [grouped_split(g) for g in groups]
    share = Counter(first)
    assert set(share) == {"train", "valid", "test"}
    assert 0.75 < share["train"] / 2000 < 0.85


# --- AvaMERG ---------------------------------------------------------------------------------
def _raw_mapped(root: Path) -> list[dict]:
    return [c for f in sorted(root.glob("random_video_mappings_*.json")) for c in json.loads(f.read_text())]


def test_avamerg_real_counts(tmp_path: Path) -> None:
    root = shared_path("avamerg")
    res = avamerg.prepare(root, out=tmp_path)
    # independent count from the raw JSON: speaker utterances carry the conversation label
    mapped = _raw_mapped(root)
    speaker_utts = [(c, u) for c in mapped for u in c["turn"]["dialogue"] if u["role"] == "speaker"]
    labelled = [c for c in _all(res) if c.labels.emotion is not None]
    assert len(labelled) == len(speaker_utts) == 116
    assert len({c.dialogue_id for c in labelled}) == len({c["conversation_id"] for c in mapped}) == 58
    # official 7-class projection, checked against the published mapping file
    resolved = json.loads((root / "label_mapping.json").read_text())["resolved_to_7"]
    classes = avamerg.CLASSES
    expected = Counter(resolved[u_c["turn"]["chain_of_empathy"]["speaker_emotion"]] for u_c, _ in speaker_utts)
    assert Counter(c.labels.emotion for c in labelled) == expected == Counter(
        {"happy": 68, "sad": 30, "fear": 18}
    )
    assert all(classes[c.labels.emotion_idx] == c.labels.emotion for c in labelled)
    assert res.info["unmapped_labels"] == {}

    # the unlabelled official test set: one clip per distinct speaker utterance
    test = json.loads((root / "test.json").read_text())
    distinct = {
        (c["conversation_id"], u["index"])
        for c in test for t in c["turns"] for u in t["dialogue_history"] if u["role"] == "speaker"
    }  # fmt: skip
    unl = res.splits["test_unlabelled"]
    assert len(unl) == len(distinct) == 6597
    assert len({c.dialogue_id for c in unl}) == len({k[0] for k in distinct}) == 3121
    assert all(c.labels.emotion is None and c.labels.emotion_idx is None for c in unl)
    # only one labelled file -> grouped hash split, never a conversation in two splits
    assert {"train", "valid", "test"} <= set(res.splits)
    owner: dict[str, str] = {}
    for c in _all(res):
        assert owner.setdefault(c.dialogue_id, c.split) == c.split
    again = avamerg.prepare(root, out=tmp_path / "again")
    assert {c.id: c.split for c in _all(again)} == {c.id: c.split for c in _all(res)}
    # no media here: every clip is kept text-only and reported
    assert len(res.missing) == len(_all(res))
    info = read_dataset_info("avamerg", tmp_path)
    assert info["root"] == os.path.abspath(root) and info["group_by"] == "dialogue_id"
    assert "chain_of_empathy.*" in info["label_derived"] and info["classes"] == classes
    assert info["counts"] == {s: len(v) for s, v in res.splits.items()}


def test_avamerg_embedded_mapping_matches_official(shared) -> None:
    resolved = json.loads(shared("avamerg", "label_mapping.json").read_text())["resolved_to_7"]
    for fine, cls in resolved.items():
        assert avamerg.EMOTION_TO_CLASS[fine] == cls, fine
    assert avamerg.map_emotion("Tired") == ("tired", None)
    assert avamerg.map_emotion("apprehensive") == ("fear", 3)


def _conv(cid: str, emotion: str | None, n: int = 3, sid: int = 7, lid: int = 9) -> dict:
    roles = ["speaker", "listener"] * n
    history = [{"index": i, "role": roles[i], "utterance": f"utt {cid}-{i}."} for i in range(n)]
    turns = [{"turn_id": str(k), "context": "a situation",
              "dialogue_history": history[: 2 * k + 1], "response": f"reply {cid}-{2 * k + 1}"}
             for k in range((n + 1) // 2)]  # fmt: skip
    conv = {"conversation_id": cid, "topic": "Work", "turns": turns,
            "speaker_profile": {"age": "young", "gender": "female", "timbre": "mid", "ID": sid},
            "listener_profile": {"age": "elderly", "gender": "male", "timbre": "low", "ID": lid}}  # fmt: skip
    if emotion:
        for t in turns:
            t["chain_of_empathy"] = {"speaker_emotion": emotion, "event_scenario": "e",
                                     "emotion_cause": "c", "goal_to_response": "g"}  # fmt: skip
    return conv


def _avamerg_fixture(root: Path) -> None:
    (root / "train.json").write_text(json.dumps([_conv("1", "joyful"), _conv("2", "tired")]))
    (root / "valid.json").write_text(json.dumps([_conv("3", "furious")]))
    test = _conv("4", None)
    del test["speaker_profile"], test["listener_profile"]
    (root / "test.json").write_text(json.dumps([test]))
    (root / "video" / "part1").mkdir(parents=True)
    (root / "audio").mkdir()
    (root / "video" / "part1" / "dia00001utt0_7.mp4").write_bytes(b"x")
    (root / "audio" / "dia00001utt0_7.wav").write_bytes(b"x")
    (root / "video" / "dia00003utt2_7.mp4").write_bytes(b"x")
    (root / "video" / "._dia00001utt2_7.mp4").write_bytes(b"x")  # macOS fork: ignored


def test_avamerg_official_layout(tmp_path: Path) -> None:
    root = tmp_path / "ava"
    root.mkdir()
    _avamerg_fixture(root)
    res = avamerg.prepare(root, out=tmp_path / "m")
    assert set(res.splits) == {"train", "valid", "test"}  # two labelled files: official splits
    train = {c.id: c for c in res.splits["train"]}
    assert sorted(train) == ["dia1_utt0", "dia1_utt2", "dia2_utt0", "dia2_utt2"]
    c0 = train["dia1_utt0"]
    assert (c0.video, c0.audio) == ("video/part1/dia00001utt0_7.mp4", "audio/dia00001utt0_7.wav")
    assert c0.labels.emotion == "happy" and c0.labels.emotion_idx == 0
    assert c0.metadata["profile"] == {"age": "young", "gender": "female", "timbre": "mid"}
    assert c0.metadata["chain_of_empathy"]["speaker_emotion"] == "joyful"
    assert c0.speaker == "avatar7" and c0.turn == 0 and c0.title == "Topic: Work"
    assert train["dia1_utt2"].title == "Topic: Work\nspeaker: utt 1-0.\nlistener_response: reply 1-1"
    assert train["dia1_utt2"].video is None  # the hidden ._ file does not count
    # tired: no class, emotion kept, counted
    assert train["dia2_utt0"].labels.emotion == "tired"
    assert train["dia2_utt0"].labels.emotion_idx is None
    assert res.info["unmapped_labels"] == {"tired": 2}
    assert res.splits["valid"][1].video == "video/dia00003utt2_7.mp4"
    assert [c.labels.emotion for c in res.splits["test"]] == [None, None]
    missing = dict(res.missing)
    assert "dia1_utt0" not in missing and "dia1_utt2" in missing
    assert "dia1utt2_7" in missing["dia1_utt2"] or "dia00001utt2_7" in missing["dia1_utt2"]
    assert "no profile ID" in missing["dia4_utt0"]
    assert len(load_dataset("avamerg", tmp_path / "m")) == 8
    # listener utterances on request, unlabelled
    every = avamerg.prepare(root, out=tmp_path / "m2", roles="all")
    roles = Counter(c.metadata["role"] for c in every.splits["train"])
    assert roles == {"speaker": 4, "listener_response": 4}
    assert all(c.labels.emotion is None for c in _all(every) if c.metadata["role"] != "speaker")


def test_avamerg_single_labelled_file_and_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "ava"
    root.mkdir()
    convs = [_conv(str(i), "proud") for i in range(1, 41)]
    (root / "train.json").write_text(json.dumps(convs))
    (root / "test.json").write_text(json.dumps([_conv("1", None), _conv("99", None)]))
    res = avamerg.prepare(root, out=tmp_path / "m")
    assert {"train", "valid", "test_unlabelled"} <= set(res.splits)
    for c in _all(res):
        if c.labels.emotion:
            assert c.split == grouped_split(c.dialogue_id)
    assert [c.dialogue_id for c in res.splits["test_unlabelled"]] == ["99", "99"]
    assert any("also in split" in why for _, why in res.missing)


def test_avamerg_bad_json_names_file(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text('[{"conversation_id": "1",')
    with pytest.raises(ValueError, match=r"train\.json:1: not valid JSON"):
        avamerg.prepare(tmp_path, out=tmp_path / "m")


# --- MELD ------------------------------------------------------------------------------------
def _raw_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_meld_real_dev_and_train_head(tmp_path: Path) -> None:
    root = shared_path("meld")
    res = meld.prepare(root, out=tmp_path)
    dev_raw = _raw_csv(root / "dev_sent_emo.csv")
    dev = res.splits["dev"]
    assert len(dev) == len(dev_raw) == 1109
    assert len({c.dialogue_id for c in dev}) == len({r["Dialogue_ID"] for r in dev_raw}) == 114
    assert Counter(c.labels.emotion for c in dev) == Counter(r["Emotion"] for r in dev_raw)
    assert {c.labels.emotion for c in dev} == set(meld.CLASSES)
    assert all(meld.CLASSES[c.labels.emotion_idx] == c.labels.emotion for c in dev)
    assert Counter(c.metadata["sentiment"] for c in dev) == Counter(r["Sentiment"] for r in dev_raw)
    assert {c.labels.sentiment for c in dev} == {-1.0, 0.0, 1.0}
    first, second = dev[0], dev[1]
    assert first.transcript == "Oh my God, he’s lost it. He’s totally lost it."  # U+2019 kept
    assert first.title is None and first.speaker == "Phoebe"
    assert second.title == "Phoebe: " + first.transcript
    assert sum("\u2019" in c.transcript for c in dev) == sum("\u2019" in r["Utterance"] for r in dev_raw)
    train = res.splits["train"]
    assert len(train) == 300 and len({c.dialogue_id for c in train}) == 30
    assert len(res.missing) == 1409  # no media in shared/: transcript-only, reported
    assert {c.id for c in train}.isdisjoint({c.id for c in dev})
    df = pd.read_json(res.paths["dev"], lines=True)
    assert len(df) == 1109


def test_meld_fixture_media_and_mojibake(tmp_path: Path) -> None:
    root = tmp_path / "MELD"
    (root / "MELD.Raw" / "dev" / "dev_splits_complete").mkdir(parents=True)
    (root / "MELD.Raw" / "dev" / "dev_splits_complete" / "dia0_utt1.mp4").write_bytes(b"x")
    (root / "train_splits").mkdir()
    (root / "train_splits" / "dia3_utt0.mp4").write_bytes(b"x")
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    (root / "dev_sent_emo.csv").write_text(
        header
        + '1,"Youâ€™re late\x85",Ross,anger,negative,0,0,1,1,"00:00:01,000","00:00:02,000"\n'
        + "2,Sorry.,Rachel,sadness,negative,0,1,1,1,,\n",
        encoding="utf-8",
    )
    (root / "train_sent_emo.csv").write_text(header + "1,Hi!,Joey,joy,positive,3,0,2,5,,\n")
    res = meld.prepare(root, out=tmp_path / "m", context_turns=1)
    d0, d1 = res.splits["dev"]
    assert d0.transcript == "You’re late…" and d0.video is None
    assert d1.video == "MELD.Raw/dev/dev_splits_complete/dia0_utt1.mp4"
    assert d1.title == "Ross: You’re late…"
    assert res.splits["train"][0].video == "train_splits/dia3_utt0.mp4"
    assert dict(res.missing) == {"dev_dia0_utt0": "no dev_splits_complete/dia0_utt0.mp4; kept transcript-only"}


def test_meld_fix_mojibake_only_when_safe() -> None:
    assert meld.fix_mojibake("Itâ€™s") == "It’s"
    assert meld.fix_mojibake("caf\u00e9\u2019s ok") == "caf\u00e9\u2019s ok"  # real text kept
    assert meld.fix_mojibake("Â¿QuÃ©?") == "¿Qué?"
    assert meld.fix_mojibake("wait\x97what") == "wait—what"


def test_meld_bad_csv_errors(tmp_path: Path) -> None:
    (tmp_path / "dev_sent_emo.csv").write_bytes(b"Utterance,Speaker\nHi,Ross\n")
    with pytest.raises(ValueError, match=r"dev_sent_emo\.csv: missing column"):
        meld.prepare(tmp_path, out=tmp_path / "m")
    (tmp_path / "dev_sent_emo.csv").write_bytes(b"Utterance,Speaker\n\xff\xfeHi,Ross\n")
    with pytest.raises(ValueError, match=r"dev_sent_emo\.csv: not UTF-8 \(byte 0xff"):
        meld.prepare(tmp_path, out=tmp_path / "m")


# --- RAVDESS ---------------------------------------------------------------------------------
EMO = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]


def test_ravdess_real(tmp_path: Path) -> None:
    root = shared_path("ravdess-speech")
    res = ravdess.prepare(root, out=tmp_path)
    files = sorted(root.rglob("*.wav"))
    clips = res.splits["train"]
    assert len(clips) == len(files) == 30 and res.missing == []
    by_id = {c.id: c for c in clips}
    for f in files:
        c = by_id[f.stem]
        parts = [int(x) for x in f.stem.split("-")]
        assert c.labels.emotion == EMO[parts[2] - 1] and c.labels.emotion_idx == parts[2] - 1
        assert c.speaker == f"Actor_{parts[6]:02d}"
        assert c.metadata["gender"] == ("male" if parts[6] % 2 else "female")
        assert c.metadata["intensity"] == ("normal" if parts[3] == 1 else "strong")
        assert c.metadata["repetition"] == parts[5]
        assert (root / c.audio).is_file() and c.video is None
    assert {c.speaker for c in clips} == {"Actor_01", "Actor_02"}
    assert res.info["group_by"] == "speaker" and res.info["classes"] == EMO
    assert res.info["label_derived"] == ["intensity"]


def test_ravdess_pairs_and_bad_names(tmp_path: Path) -> None:
    a1, a2 = tmp_path / "Actor_01", tmp_path / "Actor_02"
    a1.mkdir()
    a2.mkdir()
    for name in ["01-01-03-02-01-01-01.mp4", "03-01-03-02-01-01-01.wav",
                 "02-01-04-01-02-02-01.mp4", "03-01-05-01-01-01-02.wav",
                 "notes.wav", "03-01-09-01-01-01-01.wav", "03-01-03-01-01-01-01.mp4"]:  # fmt: skip
        (a1 / name).write_bytes(b"x")
    (a2 / "03-01-08-01-01-01-02.wav").write_bytes(b"x")
    res = ravdess.prepare(tmp_path, out=tmp_path / "m", test_actors=[2])
    train = {c.id: c for c in res.splits["train"]}
    paired = train["03-01-03-02-01-01-01"]
    assert (paired.video, paired.audio) == ("Actor_01/01-01-03-02-01-01-01.mp4",
                                            "Actor_01/03-01-03-02-01-01-01.wav")
    assert paired.metadata["modalities"] == "audio-video+audio-only"
    assert train["02-01-04-01-02-02-01"].audio is None  # video-only, kept
    assert [c.id for c in res.splits["test"]] == ["03-01-05-01-01-01-02", "03-01-08-01-01-01-02"]
    reasons = dict(res.missing)
    assert "MM-VC-EE-II-SS-RR-AA" in reasons["notes"]
    assert "invalid emotion" in reasons["03-01-09-01-01-01-01"]
    assert "modality code 03" in reasons["03-01-03-01-01-01-01"]


def test_ravdess_root_of_linked_folders(tmp_path: Path) -> None:
    """A root assembled from links to actor folders elsewhere (how teams lay out a shared
    corpus) is walked through the links; a link cycle is walked once."""
    elsewhere = tmp_path / "nfs" / "speech_05"
    elsewhere.mkdir(parents=True)
    (elsewhere / "03-01-05-02-01-01-05.wav").write_bytes(b"x")
    root = tmp_path / "root"
    (root / "Actor_01").mkdir(parents=True)
    (root / "Actor_01" / "03-01-03-01-01-01-01.wav").write_bytes(b"x")
    os.symlink(elsewhere, root / "Actor_05")
    os.symlink(root, root / "Actor_01" / "loop")
    res = ravdess.prepare(root, out=tmp_path / "m", test_actors=[5])
    assert [c.id for c in res.splits["test"]] == ["03-01-05-02-01-01-05"]
    assert res.splits["test"][0].audio == "Actor_05/03-01-05-02-01-01-05.wav"
    assert [c.id for c in res.splits["train"]] == ["03-01-03-01-01-01-01"]


# --- folder ----------------------------------------------------------------------------------
def _folder(root: Path, rows: list[str], header: str = "id,video,audio,text,title,label,speaker,split,mood") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "clips").mkdir(exist_ok=True)
    for n in ("a.mp4", "b.mp4", "c.mp4", "d.wav", "e.mp4"):
        (root / "clips" / n).write_bytes(b"x")
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")


def test_folder_labels_csv(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    (root / "clips").mkdir(parents=True)
    os.symlink(outside, root / "clips" / "link.mp4")
    _folder(root, [
        "a 1,clips/a.mp4,,Hello there.,My vlog,happy,ann,,3",
        "b,clips/b.mp4,,,,sad,ann,,",
        "c,clips/c.mp4,clips/d.wav,,,happy,bob,test,calm",
        "gone,clips/nope.mp4,,,,happy,bob,,",
        "abs,/etc/passwd,,,,happy,bob,,",
        "esc,../secret.mp4,,,,happy,bob,,",
        "sym,clips/link.mp4,,,,happy,bob,,",
        "a 1,clips/e.mp4,,,,happy,cy,,",
    ])  # fmt: skip
    res = folder.prepare(root, out=tmp_path / "m", name="sample")
    clips = {c.id: c for c in _all(res)}
    assert sorted(clips) == ["a_1", "b", "c", "sym"]  # a symlink inside the root is followed
    a = clips["a_1"]
    assert (a.video, a.transcript, a.title, a.speaker) == ("clips/a.mp4", "Hello there.", "My vlog", "ann")
    assert a.labels.emotion == "happy" and a.labels.emotion_idx == 0
    assert a.metadata == {"mood": 3}
    assert clips["b"].labels.emotion_idx == 1 and clips["b"].split == a.split  # same speaker
    assert a.split == grouped_split("ann")
    assert clips["c"].split == "test" and clips["c"].audio == "clips/d.wav"
    reasons = dict(res.missing)
    assert "not found" in reasons["gone"] and reasons["gone"].startswith("labels.csv:5:")
    assert "absolute" in reasons["abs"]
    assert "inside the dataset root" in reasons["esc"]
    assert "sym" not in reasons and clips["sym"].video == "clips/link.mp4"
    assert "duplicate id 'a_1' (first on line 2)" in reasons["a_1"]
    info = read_dataset_info("sample", tmp_path / "m")
    assert info["classes"] == ["happy", "sad"] and info["group_by"] == "speaker"
    assert read_manifest(res.paths["test"])[0].id == "c"
    kept = folder.prepare(root, out=tmp_path / "m2", name="ravdess", keep_missing=True)
    assert {"gone", "abs", "esc"} <= {c.id for c in _all(kept)}
    assert all(c.video is None for c in _all(kept) if c.id in {"gone", "abs", "esc"})
    assert (tmp_path / "m2" / "ravdess" / "dataset.json").is_file()


def test_folder_continuous_targets_are_labels_not_metadata(tmp_path: Path) -> None:
    # valence / arousal ratings (a speech corpus rated on [-1, 1]) become regression targets;
    # they used to land in metadata, leaving "labelled 0" and nothing for --target valence
    root = tmp_path / "va"
    _folder(root, ["a,,clips/d.wav,-0.7,0.65", "b,,clips/d.wav,0.3,", "c,,clips/d.wav,,",
                   "d,,clips/d.wav,high,0.1", "e,,clips/d.wav,nan,0.2", 'f,,clips/d.wav,"0,4",0.2'],
            header="id,video,audio,valence,arousal")
    res = folder.prepare(root, out=tmp_path / "m")
    clips = {c.id: c for c in _all(res)}
    assert sorted(clips) == ["a", "b", "c"]
    assert (clips["a"].labels.valence, clips["a"].labels.arousal) == (-0.7, 0.65)
    assert (clips["b"].labels.valence, clips["b"].labels.arousal) == (0.3, None)  # not rated
    assert clips["c"].labels.valence is None and clips["a"].metadata == {}
    assert res.left_out == [
        ("d", "labels.csv:5: field 'valence': 'high' is not a finite number; skipped"),
        ("e", "labels.csv:6: field 'valence': 'nan' is not a finite number; skipped"),
        ("f", "labels.csv:7: field 'valence': '0,4' is not a finite number (a decimal comma? "
              "write 0.4); skipped")]
    assert res.info["task"] == "regression" and res.info["targets"] == ["valence", "arousal"]
    # prepare says what the manifests can be fit on, and where they are
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["prepare", "folder", "--root", str(root), "--manifests",
                                 str(tmp_path / "m3"), "--allow-failures"])
    assert r.exit_code == 0, r.output
    assert (f"target valence: 2 clips (mmemo fit --target valence); target arousal: 1 clips "
            f"(mmemo fit --target arousal); manifests in {tmp_path / 'm3' / 'va'}") in r.output
    # a sentiment column of words (no number in it) stays metadata, as before
    _folder(root, ["a,,clips/d.wav,positive,happy", "b,,clips/d.wav,negative,sad"],
            header="id,video,audio,sentiment,label")
    res = folder.prepare(root, out=tmp_path / "m")
    assert {c.metadata["sentiment"] for c in _all(res)} == {"positive", "negative"}
    assert res.info["task"] == "classification" and res.info["targets"] == []
    assert all(c.labels.sentiment is None for c in _all(res))


def test_folder_classes_txt_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _folder(root, ["a,clips/a.mp4", "b,clips/b.mp4,,,,angry"], header="id,video,audio,text,title,label")
    (root / "classes.txt").write_text("neutral\nhappy\n")
    with pytest.raises(ValueError, match=r"labels\.csv:3: field 'label': 'angry' is not in classes"):
        folder.prepare(root, out=tmp_path / "m")
    (root / "classes.txt").write_text("# order\nneutral\nangry\n")
    res = folder.prepare(root, out=tmp_path / "m")
    assert res.info["classes"] == ["neutral", "angry"]
    assert {c.id: c.labels.emotion_idx for c in _all(res)} == {"a": None, "b": 1}
    assert res.dataset == "d"
    (root / "labels.csv").write_bytes(b"id,video\nx,clips/a.mp4\ncaf\xe9,clips/b.mp4\n")
    with pytest.raises(ValueError, match=r"labels\.csv: not UTF-8 \(byte 0xe9"):
        folder.prepare(root, out=tmp_path / "m")
    (root / "labels.csv").write_text("id,label\nx,happy\n")
    with pytest.raises(ValueError, match="needs an 'id' column and a 'video' or 'audio'"):
        folder.prepare(root, out=tmp_path / "m")
    with pytest.raises(ValueError, match="simple name"):
        folder.prepare(root, out=tmp_path / "m", name="../evil")


def test_folder_scan_without_csv(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    (root / "s1").mkdir(parents=True)
    (root / "s1" / "x.mp4").write_bytes(b"x")
    (root / "s1" / "x.wav").write_bytes(b"x")
    (root / "y z.mov").write_bytes(b"x")
    (root / "notes.txt").write_text("not media")
    res = folder.prepare(root, out=tmp_path / "m")
    clips = {c.id: c for c in _all(res)}
    assert set(clips) == {"s1_x", "y_z"}
    assert (clips["s1_x"].video, clips["s1_x"].audio) == ("s1/x.mp4", "s1/x.wav")
    assert all(c.labels.emotion is None for c in clips.values())
    assert res.info["task"] == "none" and res.info["group_by"] == "id"
    # a second run with fewer splits removes the stale split files
    for p in (tmp_path / "m" / "raw").glob("*.jsonl"):
        p.rename(p.with_name("old_" + p.name))
    folder.prepare(root, out=tmp_path / "m")
    assert not list((tmp_path / "m" / "raw").glob("old_*.jsonl"))
