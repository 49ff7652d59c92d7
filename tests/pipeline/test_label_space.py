"""`mmemo prepare RECIPE --labels plutchik`: manifests rewritten into Plutchik's wheel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.manifest import Clip, load_dataset, read_dataset_info
from pipeline.recipes import avamerg, meld
from pipeline.recipes.common import to_label_space, write_result
from tests.pipeline.test_recipes import _conv, _folder

WHEEL = ["joy", "trust", "fear", "surprise", "sadness", "disgust", "anger", "anticipation", "neutral"]
MELD_HEADER = ("Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,"
               "StartTime,EndTime\n")


def _ava(root: Path) -> Path:
    """AvaMERG official layout: joyful -> happy, jealous -> contempt (a dyad), tired -> no class."""
    root.mkdir()
    (root / "train.json").write_text(json.dumps([_conv("1", "joyful"), _conv("2", "tired"),
                                                  _conv("5", "jealous")]))
    (root / "valid.json").write_text(json.dumps([_conv("3", "furious")]))
    (root / "test.json").write_text(json.dumps([_conv("4", None)]))
    return root


def _meld(root: Path) -> Path:
    root.mkdir()
    (root / "dev_sent_emo.csv").write_text(
        MELD_HEADER + "1,Late.,Ross,anger,negative,0,0,1,1,,\n2,Sorry.,Rachel,sadness,negative,0,1,1,1,,\n"
        "3,Okay.,Ross,neutral,neutral,0,2,1,1,,\n")
    (root / "train_sent_emo.csv").write_text(MELD_HEADER + "1,Hi!,Joey,joy,positive,3,0,2,5,,\n")
    return root


def _by_id(res) -> dict[str, Clip]:
    return {c.id: c for cs in res.splits.values() for c in cs}


def test_avamerg_in_plutchik_space_dyad_and_left_out(tmp_path: Path) -> None:
    own = avamerg.prepare(_ava(tmp_path / "ava"), out=tmp_path / "m", name="ava-p")
    assert own.info["classes"][0] == "happy"
    res = to_label_space(own, "plutchik", recipe="avamerg")
    clips = _by_id(res)
    joy = clips["dia1_utt0"]
    assert (joy.labels.emotion, joy.labels.emotion_idx) == ("joy", 0)
    assert joy.metadata["plutchik"] == {"joy": 1.0} and joy.metadata["label_original"] == "happy"
    # contempt = disgust + anger at 0.5 / 0.5; the hard label is the first in wheel order
    con = clips["dia5_utt0"]
    assert con.metadata["label_original"] == "contempt"
    assert con.metadata["plutchik"] == {"disgust": 0.5, "anger": 0.5}
    assert (con.labels.emotion, con.labels.emotion_idx) == ("disgust", WHEEL.index("disgust"))
    assert clips["dia3_utt0"].labels.emotion == "anger"
    # tired: no avamerg class, so no Plutchik place either: unlabelled and counted
    tired = clips["dia2_utt0"]
    assert tired.labels.emotion is None and tired.labels.emotion_idx is None
    assert tired.metadata["label_original"] == "tired" and "plutchik" not in tired.metadata
    # never labelled (the test file): untouched
    assert all("label_original" not in c.metadata for c in res.splits["test"])
    info = read_dataset_info("ava-p", tmp_path / "m")
    assert info["label_space"] == "plutchik" and info["classes"] == WHEEL
    assert info["classes_original"] == avamerg.CLASSES
    assert info["label_space_counts"] == {"mapped": 6, "soft": 2, "left_out": {"tired": 2}}
    assert {"plutchik", "label_original"} <= set(info["label_derived"])
    assert info["counts"] == {s: len(c) for s, c in res.splits.items()}
    # the files on disk hold the rewrite, and a second call maps nothing twice
    disk = {c.id: c for c in load_dataset("ava-p", tmp_path / "m")}
    assert disk["dia5_utt0"].labels.emotion == "disgust"
    assert to_label_space(res, "plutchik", recipe="avamerg") is res
    with pytest.raises(ValueError, match="unknown label space"):
        to_label_space(own, "wheel")


def test_meld_and_unmapped_and_intensity(tmp_path: Path) -> None:
    res = to_label_space(meld.prepare(_meld(tmp_path / "MELD"), out=tmp_path / "m"), "plutchik")
    got = {c.id: (c.labels.emotion, c.labels.emotion_idx, c.metadata["label_original"])
           for c in _by_id(res).values()}
    assert got == {"dev_dia0_utt0": ("anger", 6, "anger"), "dev_dia0_utt1": ("sadness", 4, "sadness"),
                   "dev_dia0_utt2": ("neutral", 8, "neutral"), "train_dia3_utt0": ("joy", 0, "joy")}
    assert res.info["label_space_counts"] == {"mapped": 4, "soft": 0, "left_out": {}}
    # iemocap's raw labels: xxx is listed as unmapped, fru is annoyance (anger, low intensity)
    clips = [Clip(id=f"t{i}", dataset="iem", split="train", transcript="x",
                  labels={"emotion": e, "emotion_idx": i}) for i, e in enumerate(["xxx", "fru", "exc"])]
    base = write_result("iem", tmp_path, tmp_path / "m", {"train": clips}, [],
                        {"classes": ["xxx", "fru", "exc"]})
    iem = _by_id(to_label_space(base, "plutchik", recipe="iemocap"))
    assert iem["t0"].labels.emotion is None and iem["t0"].metadata["label_original"] == "xxx"
    assert iem["t1"].labels.emotion == "anger" and iem["t1"].metadata["plutchik_intensity"] == "low"
    assert iem["t2"].labels.emotion == "joy"
    info = read_dataset_info("iem", tmp_path / "m")
    assert info["label_space_counts"]["left_out"] == {"xxx": 1}
    # a label the recipe has as a class but plutchik.toml does not place is an error
    bad = write_result("iem2", tmp_path, tmp_path / "m", {"train": [Clip(
        id="b", dataset="iem2", split="train", transcript="x",
        labels={"emotion": "typo", "emotion_idx": 0})]}, [], {"classes": ["typo"]})
    with pytest.raises(KeyError, match="does not say where 'typo'"):
        to_label_space(bad, "plutchik", recipe="iemocap")


def test_mosei_intensities_become_a_soft_target(tmp_path: Path) -> None:
    emo = [{"happy": 2.0, "sad": 0.0, "anger": 0.0, "surprise": 0.0, "disgust": 0.0, "fear": 0.0},
           {"happy": 1.0, "sad": 0.0, "anger": 0.0, "surprise": 1.0, "disgust": 0.0, "fear": 0.0},
           {k: 0.0 for k in ("happy", "sad", "anger", "surprise", "disgust", "fear")}]
    clips = [Clip(id=f"s{i}", dataset="mosei", split="train", transcript="x",
                  labels={"sentiment": 1.0}, metadata={"emotions": e}) for i, e in enumerate(emo)]
    base = write_result("mosei", tmp_path, tmp_path / "m", {"train": clips}, [],
                        {"classes": [], "task": "regression"})
    res = to_label_space(base, "plutchik", recipe="mosei")
    c = _by_id(res)
    assert c["s0"].labels.emotion == "joy" and c["s0"].labels.sentiment == 1.0
    assert c["s1"].metadata["plutchik"] == {"joy": 0.5, "surprise": 0.5}
    assert c["s1"].labels.emotion == "joy"  # tie: joy comes first on the wheel
    assert c["s2"].labels.emotion is None
    assert res.info["label_space_counts"] == {"mapped": 2, "soft": 1, "left_out": {"(no emotion)": 1}}
    # CMU-MOSI has sentiment only: nothing to map is an error, not an empty label space
    mosi = write_result("mosi", tmp_path, tmp_path / "m", {"train": [Clip(
        id="s", dataset="mosi", split="train", transcript="x", labels={"sentiment": 1.0})]}, [],
        {"classes": [], "task": "regression"})
    with pytest.raises(ValueError, match="no clip has an emotion label"):
        to_label_space(mosi, "plutchik", recipe="mosi")
    assert read_dataset_info("mosi", tmp_path / "m")["classes"] == []


def test_cli_prepare_labels_plutchik_and_folder_labels_file(tmp_path: Path) -> None:
    from cli import app

    runner = CliRunner()
    env = {"COLUMNS": "250"}
    m = tmp_path / "m"
    r = runner.invoke(app, ["prepare", "avamerg", "--root", str(_ava(tmp_path / "ava")),
                            "--labels", "plutchik", "--manifests", str(m)], env=env)
    assert r.exit_code == 0, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("plutchik:")]
    assert line == ["plutchik: mapped 6 (2 soft), left out 2 (tired: 2)"]
    info = read_dataset_info("avamerg-plutchik", m)  # default name: the own-space set stays
    assert info["label_space"] == "plutchik" and info["classes"] == WHEEL
    assert not (m / "avamerg").exists()
    r = runner.invoke(app, ["prepare", "meld", "--root", str(_meld(tmp_path / "MELD")), "--labels",
                            "plutchik", "--name", "meld_p", "--manifests", str(m)], env=env)
    assert r.exit_code == 0 and "plutchik: mapped 4 (0 soft), left out 0" in r.output
    # MELD without its videos: every clip kept transcript-only, a warning each, not an error
    said = [ln.split(":")[0] for ln in r.output.splitlines() if ln.startswith(("warning:", "error:"))]
    assert said == ["warning"] * 4 and "transcript-only" in r.output, r.output
    assert read_dataset_info("meld_p", m)["classes"] == WHEEL
    # the folder recipe's --labels FILE keeps its meaning ...
    root = tmp_path / "mine"
    _folder(root, ["a,clips/a.mp4,,,,happy,ann,,", "b,clips/b.mp4,,,,sad,bob,,"])
    csv = tmp_path / "elsewhere.csv"
    csv.write_text((root / "labels.csv").read_text())
    (root / "labels.csv").unlink()
    r = runner.invoke(app, ["prepare", "folder", "--root", str(root), "--labels", str(csv),
                            "--name", "mine", "--manifests", str(m)], env=env)
    assert r.exit_code == 0, r.output
    assert read_dataset_info("mine", m)["classes"] == ["happy", "sad"]
    # ... and a folder set whose labels are Plutchik names maps them directly (sad is not one)
    _folder(root, ["a,clips/a.mp4,,,,joy,ann,,", "b,clips/b.mp4,,,,rage,bob,,",
                   "c,clips/c.mp4,,,,sad,cy,,"])
    r = runner.invoke(app, ["prepare", "folder", "--root", str(root), "--labels", "plutchik",
                            "--manifests", str(m)], env=env)
    assert r.exit_code == 0, r.output
    assert "plutchik: mapped 2 (0 soft), left out 1 (sad: 1)" in r.output
    got = {c.id: c.labels.emotion for c in load_dataset("folder-plutchik", m)}
    assert got == {"a": "joy", "b": "anger", "c": None}
