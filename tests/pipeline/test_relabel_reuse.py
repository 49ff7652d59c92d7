"""A re-labelled dataset is not extracted again: the set of its new key copies the finished
units of the set that holds the same features (pipeline/plan.py features_digest), its labels
are the new ones, and anything that changes what a stage reads (media, transcript, settings)
still extracts.

Uses the cheap preset and tiny wav clips of tests/pipeline/test_cache_concurrency.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import cachetools
from pipeline.manifest import read_dataset_info, read_manifest, write_dataset_info, write_manifest
from pipeline.runner import run_extract
from pipeline.store import Store
from tests.pipeline.test_cache_concurrency import Toy
from tests.pipeline.test_store import read_all

pytest.importorskip("opensmile")
pytest.importorskip("sentence_transformers")

# arrays that hold labels (written from the manifest at set creation), not features
STATIC = ("ids", "split", "group", "label")


def _relabel(toy: Toy, **changes) -> None:
    """New labels for every clip: the other class, a valence rating, other splits, and a
    label-derived metadata field (as a Plutchik remap writes)."""
    path = toy.manifests / "toy" / "train.jsonl"
    clips = read_manifest(path)
    for i, c in enumerate(clips):
        c.labels.emotion_idx = 1 - (c.labels.emotion_idx or 0)
        c.labels.emotion = "ab"[c.labels.emotion_idx]
        c.labels.valence = i / 10
        c.split = "test" if i % 2 else "train"
        c.metadata = {**c.metadata, "plutchik": {"joy": 1.0}}
        for k, v in changes.items():
            setattr(c, k, v(i) if callable(v) else v)
    write_manifest(clips, path)
    info = read_dataset_info("toy", toy.manifests)
    write_dataset_info("toy", {**info, "label_derived": ["plutchik"]}, toy.manifests)


def test_a_relabelled_set_copies_the_features_and_keeps_its_own_labels(tmp_path) -> None:
    toy = Toy(tmp_path, n=8)
    (toy.media / "w3.wav").write_bytes(b"")  # one clip fails: its ledger row comes along
    cache = tmp_path / "cache"
    first = toy.plan()
    s1 = run_extract(first, cache=cache, executor="inline")
    assert s1.done == first.layout.n_units and {f["id"] for f in s1.failures} == {"w3"}

    _relabel(toy)
    second = toy.plan()
    assert second.key != first.key and second.features_digest == first.features_digest
    said: list[str] = []
    reused: list[int] = []
    s2 = run_extract(second, cache=cache, executor="inline", notify=said.append,
                     on_reused=reused.append)
    n_units = second.layout.n_units
    assert (s2.reused, s2.reused_from, s2.done, s2.skipped) == (n_units, first.key, 0, 0)
    assert reused == [8] and len(said) == 1 and f"from {first.key}" in said[0]
    assert {f["id"] for f in s2.set_failures} == {"w3"}  # the copied ledger

    old, new = read_all(cache / "sets" / first.key), read_all(cache / "sets" / second.key)
    features = [k for k in old if k.split("/")[0] not in (*STATIC, "targets")]
    assert features and all(np.array_equal(old[k], new[k]) for k in features)
    np.testing.assert_array_equal(new["label"], 1 - old["label"])
    assert "targets/valence/value" in new and "targets/valence/value" not in old
    store = Store(cache)
    assert all(store.srt_path(second.key, i, "text").is_file() for i in toy.ids if i != "w3")
    assert all(r.clean for r in cachetools.verify(cache))
    marker = store.open(second.key).read_done(0)
    assert marker["reused_from"] == first.key and "timings" in marker
    # `cache ls` says how much of each set is hard-linked with the other
    listed = {r["key"]: r for r in cachetools.list_sets(cache)}
    assert 0 < listed[second.key]["shared"] == listed[first.key]["shared"] < listed[second.key]["size"]

    # --force extracts again; a rerun of the copied set has nothing left to do
    s3 = run_extract(second, cache=cache, executor="inline", force=True, units=[0])
    assert (s3.done, s3.reused) == (1, 0)
    s4 = run_extract(second, cache=cache, executor="inline")
    assert (s4.done, s4.reused, s4.skipped) == (0, 0, n_units)


def test_what_a_stage_reads_still_makes_new_features(tmp_path) -> None:
    toy = Toy(tmp_path, n=4)
    cache = tmp_path / "cache"
    first = toy.plan()
    run_extract(first, cache=cache, executor="inline")
    # a transcript is read by the text stage: not the same features
    _relabel(toy, transcript=lambda i: f"another sentence {i}")
    other = toy.plan()
    assert other.features_digest != first.features_digest
    # other stage settings: not the same features either
    assert toy.plan(overrides=["audio.feature_set=compare"]).features_digest != first.features_digest
    s = run_extract(other, cache=cache, executor="inline")
    assert (s.reused, s.done) == (0, other.layout.n_units)


def test_a_damaged_donor_file_is_not_copied(tmp_path) -> None:
    toy = Toy(tmp_path, n=4)
    cache = tmp_path / "cache"
    first = toy.plan()
    run_extract(first, cache=cache, executor="inline")
    store = Store(cache)
    donor = store.open(first.key)
    rel = sorted(donor.read_done(0)["checksums"])[0]
    data = bytearray((donor.path / rel).read_bytes())
    data[-1] ^= 0xFF
    (donor.path / rel).write_bytes(bytes(data))
    # a set whose zarr.json is garbage sits in the same cache: never a donor, never an error
    junk = cache / "sets" / "toy-0000000000000000"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    _relabel(toy)
    second = toy.plan()
    s = run_extract(second, cache=cache, executor="inline")
    # unit 0 failed its checksum: extracted; the others copied
    assert (s.done, s.reused) == (1, second.layout.n_units - 1)
    assert "reused_from" not in store.open(second.key).read_done(0)


def test_a_file_system_without_hard_links_gets_copies(tmp_path, monkeypatch) -> None:
    import os

    toy = Toy(tmp_path, n=4)
    cache = tmp_path / "cache"
    first = toy.plan()
    run_extract(first, cache=cache, executor="inline")
    _relabel(toy)
    second = toy.plan()

    from pipeline import cacheformat as cf

    real_link = os.link

    def refuse(src, dst, **kw):  # chunk files staged for a unit (zarr itself links elsewhere)
        if Path(dst).is_relative_to(cache / "sets") and f"/{cf.STAGING}/u" in str(dst):
            raise PermissionError("hard links are not allowed here")
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", refuse)
    s = run_extract(second, cache=cache, executor="inline")
    assert (s.reused, s.done) == (second.layout.n_units, 0)
    rel = sorted(Store(cache).open(second.key).read_done(0)["checksums"])[0]
    a, b = cache / "sets" / first.key / rel, cache / "sets" / second.key / rel
    assert a.read_bytes() == b.read_bytes() and a.stat().st_ino != b.stat().st_ino
    assert {r["shared"] for r in cachetools.list_sets(cache)} == {0}
    assert all(r.clean for r in cachetools.verify(cache))
