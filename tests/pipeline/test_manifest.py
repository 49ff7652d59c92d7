"""Manifest validation: ids, paths, error locations, duplicates, pandas readability."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.manifest import (
    Clip,
    ManifestError,
    check_clip_id,
    check_rel_path,
    load_dataset,
    read_manifest,
    sanitize_id,
    write_manifest,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def _row(**kw) -> str:
    base = {"id": "a1", "dataset": "d", "split": "train", "video": "v/a1.mp4"}
    base.update(kw)
    return json.dumps(base)


def _write(tmp_path: Path, *rows: str) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "bad, why",
    [
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("..", ".."),
        ("x..y", ".."),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("", "non-empty"),
        ("a b", "letters"),
    ],
)
def test_bad_ids_rejected(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_clip_id(bad)


@pytest.mark.parametrize("raw", ["a/b/../c", "Ünïcødé name.mp4", "..", "\x01x", "a b\tc"])
def test_sanitize_id_always_valid(raw: str) -> None:
    assert check_clip_id(sanitize_id(raw)) == sanitize_id(raw)
    assert "/" not in sanitize_id(raw) and ".." not in sanitize_id(raw)


@pytest.mark.parametrize("bad", ["/etc/passwd", "C:\\x\\y.mp4", "../up.mp4", "a/../../b.mp4"])
def test_bad_paths_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="relative|inside"):
        check_rel_path(bad)


def test_windows_separators_normalised() -> None:
    assert check_rel_path("videos\\a.mp4") == "videos/a.mp4"


def test_error_names_file_line_field(tmp_path: Path) -> None:
    p = _write(tmp_path, _row(id="ok1"), _row(id="ok2"), _row(id="x", video="../../etc/x.mp4"))
    with pytest.raises(ManifestError) as e:
        read_manifest(p)
    assert (e.value.line, e.value.field) == (3, "video")
    assert str(e.value).startswith(f"{p}:3: field 'video'")


def test_bad_id_in_file_and_extra_key(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r":2: field 'id'"):
        read_manifest(_write(tmp_path, _row(), _row(id="../evil")))
    with pytest.raises(ManifestError, match=r":1: field 'colour'"):
        read_manifest(_write(tmp_path, json.dumps({**json.loads(_row()), "colour": 1})))


def test_invalid_json_line(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r":2: field '<json>': not valid JSON"):
        read_manifest(_write(tmp_path, _row(), "{not json"))


def test_duplicate_ids(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r":3: field 'id': duplicate id 'a1' \(first on line 1\)"):
        read_manifest(_write(tmp_path, _row(), _row(id="b"), _row()))


def test_duplicate_across_splits(tmp_path: Path) -> None:
    clip = Clip(id="same", dataset="d", video="a.mp4")
    write_manifest([clip], tmp_path / "d" / "train.jsonl")
    write_manifest([clip.model_copy(update={"split": "test"})], tmp_path / "d" / "test.jsonl")
    with pytest.raises(ManifestError, match="duplicate id 'same'"):
        load_dataset("d", tmp_path)


def test_roundtrip_and_pandas(tmp_path: Path) -> None:
    clips = [
        Clip(id=f"c{i}", dataset="d", video=f"v/{i}.mp4", transcript="it’s ok",
             labels={"emotion": "happy", "emotion_idx": 0}, metadata={"profile": {"age": "young"}})
        for i in range(3)
    ]  # fmt: skip
    p = write_manifest(clips, tmp_path / "d" / "train.jsonl")
    assert read_manifest(p) == clips
    df = pd.read_json(p, lines=True)
    assert list(df["id"]) == ["c0", "c1", "c2"]
    assert df["transcript"][0] == "it’s ok"
    assert df["labels"][0]["emotion_idx"] == 0


def test_committed_examples_are_valid() -> None:
    files = sorted(EXAMPLES.glob("*.jsonl"))
    assert files, f"no example manifests under {EXAMPLES}"
    for f in files:
        clips = read_manifest(f)
        assert clips, f
        assert len(pd.read_json(f, lines=True)) == len(clips)
