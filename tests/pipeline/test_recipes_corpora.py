"""The benchmark recipes (IEMOCAP, CMU-MOSI / MOSEI, CREMA-D, RAVDESS audio-visual, UGC) on
fixtures built in each corpus's official layout, and on the real annotation files in
../shared/data; the Plutchik label space; `mmemo prepare --list` and wrong roots."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from fusion.labels import load_label_set, load_plutchik
from pipeline.manifest import read_dataset_info, read_manifest
from pipeline.recipes import (
    MODULES,
    RECIPES,
    PrepareResult,
    cremad,
    describe,
    iemocap,
    mosi,
    ravdess,
    ugc,
)
from tests.conftest import shared_path
from tests.robustness.corpus import voice, write_av, write_wav


def _all(res: PrepareResult) -> list:
    return [c for clips in res.splits.values() for c in clips]


def _frame(t: float) -> np.ndarray:
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, : int(10 + 40 * (t % 1.0))] = 200
    return img


def write_container(path: Path, seconds: float, video_codec: str, audio_codec: str) -> Path:
    """A tiny .avi / .flv with moving frames and a voice-like track (real codecs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = 16000 if audio_codec.startswith("pcm") else 22050
    sound = voice(seconds)
    with av.open(str(path), "w") as c:
        vs = c.add_stream(video_codec, rate=5)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        as_ = c.add_stream(audio_codec, rate=rate, layout="mono")
        for k in range(int(seconds * 5)):
            c.mux(vs.encode(av.VideoFrame.from_ndarray(_frame(k / 5), format="rgb24")))
        c.mux(vs.encode(None))
        data = np.resize(sound, int(seconds * rate)).astype(np.float32)
        fmt = "s16" if audio_codec.startswith("pcm") else "fltp"
        if fmt == "s16":
            data = np.clip(np.round(data * 32767), -32768, 32767).astype(np.int16)
        step = as_.codec_context.frame_size or 1024
        for i in range(0, data.size, step):
            fr = av.AudioFrame.from_ndarray(data[None, i:i + step], format=fmt, layout="mono")
            fr.sample_rate, fr.pts = rate, i
            c.mux(as_.encode(fr))
        c.mux(as_.encode(None))
    return path


def _wav(path: Path, seconds: float = 0.6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_wav(path, voice(seconds))


# --- registry, Plutchik, CLI --------------------------------------------------------------------
def test_registry_lists_every_recipe_with_layout_and_labels() -> None:
    assert set(RECIPES) == {"avamerg", "cremad", "folder", "iemocap", "meld", "mosei", "mosi",
                            "ravdess", "ugc"}
    for name in RECIPES:
        d = describe(name)
        assert d["layout"] and isinstance(d["classes"], list), name
    assert RECIPES["mosei"] is mosi.prepare_mosei and RECIPES["mosi"] is mosi.prepare_mosi


def test_plutchik_covers_every_recipe_label() -> None:
    space = load_plutchik()
    assert space.classes == ["joy", "trust", "fear", "surprise", "sadness", "disgust", "anger",
                             "anticipation", "neutral"]
    for ds in ("meld", "avamerg", "ravdess", "cremad", "iemocap"):
        targets = space.soft_targets(ds, list(MODULES[ds].CLASSES))
        for label, vec in targets.items():
            if vec is not None:
                assert abs(sum(vec) - 1) < 1e-9, (ds, label)
    mosei_targets = space.soft_targets("mosei", mosi.MOSEI_COLUMNS[1:])
    assert all(v is not None for v in mosei_targets.values())
    contempt = space.soft_targets("avamerg", ["contempt"])["contempt"]
    assert contempt[space.classes.index("disgust")] == contempt[space.classes.index("anger")] == 0.5
    iem = space.soft_targets("iemocap", ["xxx", "oth", "fru"])
    assert iem["xxx"] is None and iem["oth"] is None
    assert iem["fru"][space.classes.index("anger")] == 1.0
    assert space.intensity_of("annoyance") == "low" and space.intensity_of("serenity") == "low"
    with pytest.raises(KeyError, match="does not say"):
        space.soft_targets("meld", ["boredom-typo"])


def test_iemocap_label_sets() -> None:
    four, six = load_label_set("iemocap4"), load_label_set("iemocap6")
    assert four.classes == ["ang", "hap", "neu", "sad"]
    assert four.index("exc") == four.index("hap") == 1 and four.index("fru") is None
    assert six.classes == ["ang", "hap", "exc", "sad", "fru", "neu"] and six.index("xxx") is None
    assert set(six.classes) <= set(iemocap.CLASSES) and set(four.mapping) <= set(iemocap.CLASSES)


def test_cli_list_and_wrong_root(tmp_path: Path) -> None:
    from cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "--list"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    for name in RECIPES:
        assert name in res.output
    assert "EmoEvaluation" in res.output and "summaryTable.csv" in res.output
    res = runner.invoke(app, ["prepare", "iemocap", "--root", str(tmp_path),
                              "--manifests", str(tmp_path / "m")], env={"COLUMNS": "250"})
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "Session1/dialog/EmoEvaluation/<dialog>.txt" in lines[0]
    res = runner.invoke(app, ["prepare", "mosi", "--root", str(tmp_path), "--manifests",
                              str(tmp_path / "m")], env={"COLUMNS": "250"})
    assert res.exit_code == 2 and "CMU_MOSI_Opinion_Labels.csd" in res.output


# --- IEMOCAP ------------------------------------------------------------------------------------
EVAL_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def _eval_block(turn: str, start: float, end: float, emo: str, vad: tuple[float, float, float],
                cats: list[str]) -> str:
    lines = [f"[{start:.4f} - {end:.4f}]\t{turn}\t{emo}\t[{vad[0]:.4f}, {vad[1]:.4f}, {vad[2]:.4f}]"]
    for i, c in enumerate(cats):
        lines.append(f"C-E{i + 2}:\t{c};\t()")
    lines.append("A-E3:\tval 3; act 2; dom  2;\t()")
    lines.append("A-F1:\tval 4; act 3; dom  1;\t(mildly aggravated)")
    return "\n".join(lines) + "\n\n"


IEMOCAP_TURNS = {
    # dialog -> [(turn, start, end, emo, vad, categorical lines)]
    "Ses01F_impro01": [
        ("Ses01F_impro01_F000", 0.2, 1.0, "neu", (2.5, 2.5, 2.5), ["Neutral", "Neutral"]),
        ("Ses01F_impro01_M000", 1.1, 1.9, "fru", (2.0, 3.5, 3.0), ["Frustration; Anger", "Frustration"]),
        ("Ses01F_impro01_F001", 2.0, 2.8, "xxx", (2.5, 3.0, 2.5), ["Anger", "Sadness"]),
    ],
    "Ses01F_script01_1": [
        ("Ses01F_script01_1_F000", 0.5, 1.5, "exc", (4.0, 4.0, 3.0), ["Excited", "Happiness"]),
        ("Ses01F_script01_1_M000", 1.6, 2.4, "oth", (3.0, 3.0, 3.0), ["Other", "Other"]),
    ],
    "Ses02M_impro03": [
        ("Ses02M_impro03_M000", 0.1, 0.9, "ang", (1.5, 4.5, 4.0), ["Anger", "Anger"]),
        ("Ses02M_impro03_F000", 1.0, 1.8, "sad", (1.5, 1.5, 2.0), ["Sadness", "Sadness"]),
    ],
}


def _iemocap_fixture(base: Path) -> Path:
    root = base / "IEMOCAP_full_release"
    for dialog, turns in IEMOCAP_TURNS.items():
        sess = root / f"Session{int(dialog[3:5])}"
        ev = sess / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
        ev.parent.mkdir(parents=True, exist_ok=True)
        ev.write_text(EVAL_HEADER + "".join(_eval_block(*t) for t in turns))
        tr = sess / "dialog" / "transcriptions" / f"{dialog}.txt"
        tr.parent.mkdir(parents=True, exist_ok=True)
        # an unevaluated line (MX...) is in the release too and must not become a clip
        tr.write_text("".join(f"{t[0]} [{t[1]:08.4f}-{t[2]:08.4f}]: words of {t[0]}.\n" for t in turns)
                      + "M_X0001 [003.0000-003.5000]: [LAUGHTER]\n")
        for t in turns[:-1]:  # the last turn of each dialogue has no wav
            _wav(sess / "sentences" / "wav" / dialog / f"{t[0]}.wav")
    # one dialogue has its avi (both actors in the frame, audio in the track)
    write_container(root / "Session1" / "dialog" / "avi" / "DivX" / "Ses01F_impro01.avi", 3.0,
                    "mpeg4", "pcm_s16le")
    (root / "Session1" / "dialog" / "EmoEvaluation" / "Attribute").mkdir()  # not a turn file
    return base


def test_iemocap_fixture(tmp_path: Path) -> None:
    base = _iemocap_fixture(tmp_path / "data")
    res = iemocap.prepare(base, out=tmp_path / "m")
    clips = {c.id: c for c in _all(res)}
    want = [t for ts in IEMOCAP_TURNS.values() for t in ts]
    assert sorted(clips) == sorted(t[0] for t in want)  # every evaluated turn, ids as released
    assert set(res.splits) == {"train"}
    for turn, _start, _end, emo, (v, a, d), _ in want:
        c = clips[turn]
        assert c.labels.emotion == emo and iemocap.CLASSES[c.labels.emotion_idx] == emo
        assert (c.labels.valence, c.labels.arousal, c.metadata["dominance"]) == (v, a, d)
        assert c.metadata["session"] == turn[:5] and c.speaker == f"{turn[:5]}_{turn.rsplit('_', 1)[1][0]}"
        assert c.transcript == f"words of {turn}."
        assert c.metadata["mode"] == ("improvised" if "impro" in turn else "scripted")
    assert clips["Ses01F_impro01_F001"].metadata["label_status"] == "no_agreement"
    assert clips["Ses01F_script01_1_M000"].metadata["label_status"] == "other"
    assert clips["Ses01F_impro01_M000"].metadata["annotations"]["categorical"] == {
        "C-E2": ["Frustration", "Anger"], "C-E3": ["Frustration"]}
    assert clips["Ses01F_impro01_M000"].metadata["annotations"]["dimensional"]["A-F1"] == {
        "val": 4.0, "act": 3.0, "dom": 1.0}
    # avi dialogue: every turn cut from the avi by time (even the one without a wav)
    for t in IEMOCAP_TURNS["Ses01F_impro01"]:
        c = clips[t[0]]
        assert c.video == "Session1/dialog/avi/DivX/Ses01F_impro01.avi" and c.audio is None
        assert (c.start, c.end) == (t[1], t[2]) and c.metadata["speaker_gender"] == t[0][-4]
    # no avi: the per-turn wav, uncut; neither: transcript-only and reported
    c = clips["Ses02M_impro03_M000"]
    assert c.video is None and c.audio == "Session2/sentences/wav/Ses02M_impro03/Ses02M_impro03_M000.wav"
    assert c.start is None and c.metadata["start"] == 0.1
    assert clips["Ses01F_script01_1_F000"].dialogue_id == "Ses01F_script01_1"
    assert {m[0] for m in res.missing} == {"Ses01F_script01_1_M000", "Ses02M_impro03_F000"}
    assert all("kept transcript-only" in m[1] for m in res.missing)
    info = read_dataset_info("iemocap", tmp_path / "m")
    assert info["group_by"] == "session" and "annotations" in info["label_derived"]
    # 4-class protocol chosen at fit time from the kept raw labels
    four = load_label_set("iemocap4")
    assert Counter(four.classes[i] for c in clips.values()
                   if (i := four.index(c.labels.emotion)) is not None) == {
        "neu": 1, "hap": 1, "ang": 1, "sad": 1}
    # wav mode: audio-only clips from the turn wavs
    wav = iemocap.prepare(base, out=tmp_path / "m2", media="wav")
    assert all(c.video is None for c in _all(wav))
    assert len(wav.missing) == 3  # one missing wav per dialogue


def test_iemocap_avi_cut_decodes(tmp_path: Path) -> None:
    from pipeline.stages.decode import DecodeConfig, decode_clip

    base = _iemocap_fixture(tmp_path / "data")
    res = iemocap.prepare(base, out=tmp_path / "m")
    clip = next(c for c in _all(res) if c.id == "Ses01F_impro01_M000")
    media = decode_clip(Path(res.info["root"]), clip, DecodeConfig())
    assert media.has_audio and media.has_video  # both from the one avi
    assert 0.6 < media.audio.size / media.sample_rate < 1.0  # the 0.8 s turn, not the 3 s dialogue
    assert media.duration == pytest.approx(0.8, abs=0.05)
    assert media.frame_times and all(0 <= t <= 0.8 for t in media.frame_times)  # clip-relative


def test_iemocap_bad_turn_line(tmp_path: Path) -> None:
    ev = tmp_path / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    ev.parent.mkdir(parents=True)
    ev.write_text(EVAL_HEADER + "[1.0 - x]\tSes01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]\n")
    with pytest.raises(ValueError, match=r"Ses01F_impro01.txt:3: not an EmoEvaluation turn line"):
        iemocap.prepare(tmp_path, out=tmp_path / "m")


# --- CMU-MOSI / MOSEI ---------------------------------------------------------------------------
def _write_csd(path: Path, root_name: str, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        g = f.create_group(root_name)
        d = g.create_group("data")
        for vid, (feats, ivals) in data.items():
            v = d.create_group(vid)
            v.create_dataset("features", data=feats)
            v.create_dataset("intervals", data=ivals)
        m = g.create_group("metadata")
        m.create_dataset("root name", data=root_name)
    return path


MOSI_DATA = {
    "vidA_x1": (np.array([[2.4], [-0.8], [0.0]], np.float32),
                np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]])),
    "vidB-y2": (np.array([[-3.0], [1.2]], np.float32), np.array([[5.0, 6.5], [6.5, 7.0]])),
    "vidC": (np.array([[0.4]], np.float32), np.array([[0.0, 0.5]])),
}


def _mosi_fixture(root: Path) -> Path:
    _write_csd(root / "labels" / "CMU_MOSI_Opinion_Labels.csd", "Opinion Segment Labels", MOSI_DATA)
    seg = root / "Raw" / "Video" / "Segmented"
    seg.mkdir(parents=True)
    for name in ("vidA_x1_1", "vidA_x1_2", "vidB-y2_2"):
        write_av(seg / f"{name}.mp4", _frame, seconds=0.4, size=(64, 48))
    tr = root / "Raw" / "Transcript" / "Segmented"
    tr.mkdir(parents=True)
    (tr / "vidA_x1.annotprocessed").write_text("1_DELIM_i really liked it\n2_DELIM_but the end\n"
                                                "3_DELIM_was ok\n")
    return root


def test_mosi_fixture_and_folds(tmp_path: Path) -> None:
    root = _mosi_fixture(tmp_path / "mosi")
    res = mosi.prepare_mosi(root, out=tmp_path / "m")
    clips = {c.id: c for c in _all(res)}
    assert sorted(clips) == ["vidA_x1_1", "vidA_x1_2", "vidA_x1_3", "vidB-y2_1", "vidB-y2_2", "vidC_1"]
    # the shipped standard folds name none of the fixture's videos: all in train, counted
    assert set(res.splits) == {"train"} and res.info["folds"] == "mosi.json"
    assert res.info["videos_not_in_folds"] == 3
    a2 = clips["vidA_x1_2"]
    assert a2.labels.sentiment == pytest.approx(-0.8) and (a2.start, a2.end) == (1.0, 2.0)
    assert a2.transcript == "but the end" and a2.video == "Raw/Video/Segmented/vidA_x1_2.mp4"
    assert a2.dialogue_id == "vidA_x1" and a2.metadata["csd_row"] == 1
    assert {m[0] for m in res.missing} == {"vidA_x1_3", "vidB-y2_1", "vidC_1"}
    assert read_dataset_info("mosi", tmp_path / "m")["group_by"] == "dialogue_id"
    # the SDK's standard folds, in its own .py form (read as literals, never executed)
    folds = tmp_path / "cmu_mosi_std_folds.py"
    folds.write_text("standard_train_fold=['vidA_x1']\nstandard_valid_fold=['vidB-y2']\n"
                     "standard_test_fold=['vidC']\nraise SystemExit('never run')\n")
    res = mosi.prepare_mosi(root, out=tmp_path / "m", folds=folds)
    assert {s: len(v) for s, v in res.splits.items()} == {"train": 3, "valid": 2, "test": 1}
    assert not (tmp_path / "m" / "mosi" / "x.jsonl").exists()
    as_json = tmp_path / "f.json"
    as_json.write_text(json.dumps({"train": ["vidA_x1", "vidC"], "test": ["vidB-y2"]}))
    res = mosi.prepare_mosi(root, out=tmp_path / "m3", folds=as_json)
    assert {s: len(v) for s, v in res.splits.items()} == {"train": 4, "test": 2}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["vidC"], "test": ["vidC"]}))
    with pytest.raises(ValueError, match="vidC is in both"):
        mosi.prepare_mosi(root, out=tmp_path / "m4", folds=bad)


def test_mosei_fixture(tmp_path: Path) -> None:
    root = tmp_path / "mosei"
    feats = np.array([[1.5, 2.0, 0.0, 0.0, 0.3, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.6, 0.0, 0.0, 0.3]],
                     np.float32)
    _write_csd(root / "CMU_MOSEI_Labels.csd", "All Labels",
               {"zz9": (feats, np.array([[0.0, 2.0], [2.0, 4.5]]))})
    seg = root / "Videos" / "Segmented" / "Combined"
    seg.mkdir(parents=True)
    write_av(seg / "zz9_2.mp4", _frame, seconds=0.4, size=(64, 48))
    tr = root / "Transcript" / "Segmented" / "Combined"
    tr.mkdir(parents=True)
    (tr / "zz9.txt").write_text("zz9___1___0.0___2.0___so happy today\nzz9___2___2.0___4.5___not great\n")
    res = mosi.prepare_mosei(root, out=tmp_path / "m")
    c1, c2 = sorted(_all(res), key=lambda c: c.id)
    assert c1.id == "zz9_1" and c1.labels.sentiment == 1.5 and c1.transcript == "so happy today"
    assert c2.metadata["emotions"] == pytest.approx(
        {"happy": 0.0, "sad": 1.0, "anger": 0.6, "surprise": 0.0, "disgust": 0.0, "fear": 0.3})
    assert c2.video == "Videos/Segmented/Combined/zz9_2.mp4" and [m[0] for m in res.missing] == ["zz9_1"]
    assert res.info["targets"] == mosi.MOSEI_COLUMNS and "emotions" in res.info["label_derived"]
    wrong = tmp_path / "wrong"
    _write_csd(wrong / "CMU_MOSEI_Labels.csd", "All Labels", MOSI_DATA)  # 1 column, not 7
    with pytest.raises(ValueError, match="expected 7 label column"):
        mosi.prepare_mosei(wrong, out=tmp_path / "m2")


def test_mosi_real_csd(tmp_path: Path) -> None:
    root = shared_path("cmu-mosi")
    res = mosi.prepare_mosi(root, out=tmp_path)
    clips = _all(res)
    assert len(clips) == 2199 and len({c.dialogue_id for c in clips}) == 93
    with h5py.File(root / "CMU_MOSI_Opinion_Labels.csd", "r") as f:  # independent count
        data = f["Opinion Segment Labels"]["data"]
        assert sum(data[v]["features"].shape[0] for v in data) == 2199
        v = sorted(data)[0]
        first = float(data[v]["features"][0, 0])
    assert all(-3 <= c.labels.sentiment <= 3 for c in clips)
    assert next(c for c in clips if c.id == f"{v}_1").labels.sentiment == pytest.approx(first)
    assert len(res.missing) == 2199  # annotations only here: every segment reported
    # the shipped SDK standard folds: every video in one fold, the literature's segment counts
    assert res.info["folds"] == "mosi.json" and res.info["videos_not_in_folds"] == 0
    assert {s: len(v) for s, v in res.splits.items()} == {"train": 1284, "valid": 229, "test": 686}
    assert len(read_manifest(res.paths["train"])) == 1284


# --- CREMA-D ------------------------------------------------------------------------------------
CREMA_ROWS = [  # FileName, voice, voice level, face, face level, av, av level
    ("1001_DFA_ANG_XX", "A", "60.5", "A", "80", "A", "75"),
    ("1001_IEO_NEU_XX", "N", "69.1", "N", "92.22", "N", "64.78"),
    ("1002_TIE_HAP_LO", "N", "71.67", "H", "57", "H", "57.38"),
    ("1003_MTI_SAD_HI", "N:S", "30.67:51.00", "S", "70", "F:S", "40:40"),
]


def _cremad_fixture(root: Path) -> Path:
    pr = root / "processedResults"
    pr.mkdir(parents=True)
    with open(pr / "summaryTable.csv", "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["", "FileName", "VoiceVote", "VoiceLevel", "FaceVote", "FaceLevel",
                    "MultiModalVote", "MultiModalLevel"])
        for i, r in enumerate(CREMA_ROWS, start=1):
            w.writerow([str(i), *r])
    (root / "VideoDemographics.csv").write_text(
        '"ActorID","Age","Sex","Race","Ethnicity"\n1001,51,"Male","Caucasian","Not Hispanic"\n'
        '1002,21,"Female","Caucasian","Not Hispanic"\n1003,33,"Female","African American","Not Hispanic"\n')
    for stem in ("1001_DFA_ANG_XX", "1002_TIE_HAP_LO", "1003_MTI_SAD_HI"):
        _wav(root / "AudioWAV" / f"{stem}.wav")
    write_container(root / "VideoFlash" / "1001_DFA_ANG_XX.flv", 0.6, "flv", "mp3")
    write_container(root / "VideoFlash" / "1002_TIE_HAP_LO.flv", 0.6, "flv", "mp3")
    return root


def test_cremad_fixture_label_sources(tmp_path: Path) -> None:
    root = _cremad_fixture(tmp_path / "CREMA-D")
    res = cremad.prepare(root, out=tmp_path / "m")
    clips = {c.id: c for c in _all(res)}
    assert sorted(clips) == sorted(r[0] for r in CREMA_ROWS)
    a = clips["1001_DFA_ANG_XX"]
    assert a.audio == "AudioWAV/1001_DFA_ANG_XX.wav" and a.video == "VideoFlash/1001_DFA_ANG_XX.flv"
    assert a.transcript == "Don't forget a jacket." and a.speaker == "1001"
    assert a.metadata["sex"] == "male" and a.metadata["age"] == 51
    assert [m[0] for m in res.missing] == ["1001_IEO_NEU_XX"]
    assert {c: clips[c].labels.emotion for c in clips} == {
        "1001_DFA_ANG_XX": "anger", "1001_IEO_NEU_XX": "neutral", "1002_TIE_HAP_LO": "happy",
        "1003_MTI_SAD_HI": "sad"}
    voice_ = {c.id: c.labels.emotion for c in _all(cremad.prepare(root, out=tmp_path / "v", labels="voice"))}
    assert voice_["1002_TIE_HAP_LO"] == "neutral" and voice_["1003_MTI_SAD_HI"] == "neutral:sad"
    av_res = cremad.prepare(root, out=tmp_path / "a", labels="av")
    tied = next(c for c in _all(av_res) if c.id == "1003_MTI_SAD_HI")
    assert tied.labels.emotion == "fear:sad" and tied.labels.emotion_idx is None
    assert tied.metadata["votes"]["voice_level"] == [30.67, 51.0]
    assert av_res.info["tied_votes"] == 1 and av_res.info["label_source"] == "av"
    face = {c.id: c.labels.emotion for c in _all(cremad.prepare(root, out=tmp_path / "f", labels="face"))}
    assert face["1003_MTI_SAD_HI"] == "sad"
    folds = cremad.prepare(root, out=tmp_path / "k", folds=3)
    assert {c.speaker: c.metadata["fold"] for c in _all(folds)} == {
        "1001": "fold1", "1002": "fold2", "1003": "fold3"}
    assert folds.info["group_by"] == "fold"
    with pytest.raises(ValueError, match="labels must be one of"):
        cremad.prepare(root, out=tmp_path / "x", labels="crowd")


def test_cremad_media_only_and_bad_names(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _wav(root / "AudioWAV" / "1010_ITS_FEA_MD.wav")
    _wav(root / "AudioWAV" / "1010_XXX_FEA_MD.wav")  # unknown sentence code
    res = cremad.prepare(root, out=tmp_path / "m")
    assert [c.id for c in _all(res)] == ["1010_ITS_FEA_MD"]
    assert res.missing[0][0] == "1010_XXX_FEA_MD" and "sentence code" in res.missing[0][1]
    with pytest.raises(FileNotFoundError, match="labels=voice needs processedResults/summaryTable.csv"):
        cremad.prepare(root, out=tmp_path / "m", labels="voice")
    with pytest.raises(FileNotFoundError, match="expected AudioWAV"):
        cremad.prepare(tmp_path / "m", out=tmp_path / "m2")


def test_cremad_real_summary_table(tmp_path: Path) -> None:
    root = shared_path("cremad")
    with open(root / "summaryTable.csv", newline="") as f:  # independent reading of the votes
        raw = list(csv.DictReader(f))
    assert len(raw) == 7442
    for src, col in (("voice", "VoiceVote"), ("face", "FaceVote"), ("av", "MultiModalVote")):
        res = cremad.prepare(root, out=tmp_path / src, labels=src)
        clips = _all(res)
        assert len(clips) == 7442 and len({c.speaker for c in clips}) == 91
        letters = {c.id: c.labels.emotion for c in clips}
        for r in raw[:200]:
            assert letters[r["FileName"]] == ":".join(cremad.VOTE_LETTERS[x] for x in r[col].split(":"))
        assert res.info["tied_votes"] == sum(":" in r[col] for r in raw)
    by_name = cremad.prepare(root, out=tmp_path / "n")
    counts = Counter(c.labels.emotion for c in _all(by_name))
    assert counts == Counter(cremad.CODES[r["FileName"].split("_")[2]] for r in raw)
    assert all(c.metadata["sex"] in ("male", "female") for c in _all(by_name))
    assert len(by_name.missing) == 7442  # annotations only here


# --- RAVDESS audio-visual -----------------------------------------------------------------------
def _ravdess_av_fixture(root: Path, actors: range) -> Path:
    for a in actors:
        d = root / f"Actor_{a:02d}"
        d.mkdir(parents=True)
        (d / f"01-01-03-01-01-01-{a:02d}.mp4").write_bytes(b"x")  # AV speech
        (d / f"03-01-03-01-01-01-{a:02d}.wav").write_bytes(b"x")  # its audio-only twin
        (d / f"02-01-05-02-02-01-{a:02d}.mp4").write_bytes(b"x")  # video-only speech
        (d / f"01-02-04-01-01-02-{a:02d}.mp4").write_bytes(b"x")  # AV song
    return root


def test_ravdess_valid_intensity_carves_validation_within_training_actors(tmp_path: Path) -> None:
    root = _ravdess_av_fixture(tmp_path / "r", range(1, 3))
    res = ravdess.prepare(root, out=tmp_path / "m", test_actors=[2], valid_intensity="strong")
    split = {c.id: c.split for c in _all(res)}
    # actor 1: its strong take (02-01-05-02-...) validates, the normal ones train; actor 2: test
    assert split["02-01-05-02-02-01-01"] == "valid" and split["03-01-03-01-01-01-01"] == "train"
    assert {s for i, s in split.items() if i.endswith("-02")} == {"test"}
    with pytest.raises(ValueError, match="valid_intensity"):
        ravdess.prepare(root, out=tmp_path / "m2", valid_intensity="loud")


def test_ravdess_av_pairs_and_fold_protocols(tmp_path: Path) -> None:
    root = _ravdess_av_fixture(tmp_path / "r", range(1, 25))
    res = ravdess.prepare(root, out=tmp_path / "m")
    clips = {c.id: c for c in _all(res)}
    assert len(clips) == 24 * 3
    twin = clips["03-01-03-01-01-01-07"]
    assert twin.video == "Actor_07/01-01-03-01-01-01-07.mp4" and twin.audio == "Actor_07/03-01-03-01-01-01-07.wav"
    assert twin.metadata["modalities"] == "audio-video+audio-only"
    assert clips["02-01-05-02-02-01-07"].metadata["modalities"] == "video-only"
    assert clips["01-02-04-01-01-02-07"].metadata["vocal_channel"] == "song"
    six = ravdess.prepare(root, out=tmp_path / "m6", folds=6)
    fold = {c.speaker: c.metadata["fold"] for c in _all(six)}
    assert Counter(fold.values()) == {f"fold{i}": 4 for i in range(1, 7)}
    assert fold["Actor_01"] == fold["Actor_04"] == "fold1" and fold["Actor_24"] == "fold6"
    five = ravdess.prepare(root, out=tmp_path / "m5", folds=5)
    assert sorted(Counter(c.metadata["fold"] for c in _all(five) if c.id.startswith("03")).values()) == [4, 5, 5, 5, 5]
    assert six.info["group_by"] == "fold" and res.info["group_by"] == "speaker"
    with pytest.raises(ValueError, match="folds must be 5 or 6"):
        ravdess.prepare(root, out=tmp_path / "m7", folds=4)


def test_ravdess_real_av_pairs(tmp_path: Path) -> None:
    root = shared_path("ravdess-av-actor05", "original")
    res = ravdess.prepare(root, out=tmp_path)
    clips = _all(res)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(clips) == len(rows) == 14
    assert all(c.video and c.audio and c.metadata["modalities"] == "audio-video+audio-only" for c in clips)
    assert Counter(c.labels.emotion for c in clips) == Counter(r["label"] for r in rows)


# --- UGC ----------------------------------------------------------------------------------------
def test_ugc_titles_and_plutchik(tmp_path: Path) -> None:
    root = tmp_path / "ugc"
    (root / "v").mkdir(parents=True)
    for i in range(3):
        write_av(root / "v" / f"{i}.mp4", _frame, seconds=0.4, size=(64, 48),
                 audio=voice(0.4) if i else None)
    rows = [
        "id,video,title,text,label,speaker,plutchik,plutchik_intensity,plutchik_dyads",
        "a,v/0.mp4,My cat at 3am,lol,joy,u1,joy,high,love",
        "b,v/1.mp4,,what a day,sadness,u2,sadness,1,",
        "c,v/2.mp4,Exam results,ugh,anger,u3,anger,basic,contempt;envy",
        "d,v/9.mp4,Gone,,anger,u4,,,",
    ]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    res = ugc.prepare(root, out=tmp_path / "m")
    clips = {c.id: c for c in _all(res)}
    assert sorted(clips) == ["a", "b", "c"] and [m[0] for m in res.missing] == ["d"]
    assert clips["a"].title == "My cat at 3am" and clips["a"].metadata["plutchik_dyads"] == ["love"]
    assert clips["b"].metadata["plutchik_intensity"] == "low" and res.info["untitled"] == 1
    assert clips["c"].metadata["plutchik_dyads"] == ["contempt", "envy"]
    assert "plutchik" in res.info["label_derived"] and res.info["classes"] == ["anger", "joy", "sadness"]
    (root / "labels.csv").write_text("\n".join(rows[:2] + ["e,v/1.mp4,t,x,joy,u5,happiness,,"]) + "\n")
    with pytest.raises(ValueError, match=r"labels.csv:3: field 'plutchik': 'happiness'"):
        ugc.prepare(root, out=tmp_path / "m")
    (root / "labels.csv").write_text("id,video,label\na,v/0.mp4,joy\n")
    with pytest.raises(ValueError, match="needs a 'title' column"):
        ugc.prepare(root, out=tmp_path / "m")


@pytest.mark.parametrize("recipe,expected", [
    ("avamerg", "train.json"), ("cremad", "summaryTable.csv"), ("folder", "labels.csv"),
    ("iemocap", "EmoEvaluation"), ("meld", "train_sent_emo.csv"),
    ("mosei", "CMU_MOSEI_Labels.csd"), ("mosi", "CMU_MOSI_Opinion_Labels.csd"),
    ("ravdess", "MM-VC-EE-II-SS-RR-AA"), ("ugc", "labels.csv"),
])
def test_wrong_root_names_expected_file(tmp_path: Path, recipe: str, expected: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=expected):
        RECIPES[recipe](root=tmp_path / "empty", out=tmp_path / "m")
