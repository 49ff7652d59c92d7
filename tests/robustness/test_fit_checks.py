"""Training-side checks: a broken feature set gives a clear DataError before training starts.

The sets are written per the cache contract (docs/ARCHITECTURE.md) with the store's writer
API, then broken the way real sets break (mixed configs, dims that disagree with attrs, empty
splits, one class, an all-absent or all-NaN modality). Checked through `fusion.train.fit` and
through `mmemo fit` (non-zero exit, the message).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.store import ModalityLayout, SetLayout, Store
from tests.robustness.corpus import run_mmemo

pytestmark = pytest.mark.robustness

N = 24
PROV = {"audio": {"stage": "audio", "backend": "egemaps", "version": "1", "config": {"n_mels": 40}},
        "meta": {"stage": "metadata", "backend": "manifest", "version": "1", "config": {"dim": 8}}}


def make_set(cache: Path, *, labels: np.ndarray | None = None, splits: list[str] | None = None,
             audio_present: np.ndarray | None = None, dataset: str = "fc") -> str:
    """A small, valid two-modality set (audio sequence + meta vector) written through the store."""
    rng = np.random.default_rng(0)
    layout = SetLayout(n=N, unit_size=8, modalities={
        "audio": ModalityLayout("audio", pooled_dim=6, seq_dim=3, max_len=4, provenance=PROV["audio"]),
        "meta": ModalityLayout("meta", pooled_dim=8, provenance=PROV["meta"]),
    })
    labels = np.arange(N) % 2 if labels is None else labels
    splits = splits or ["test" if i % 4 == 3 else "train" for i in range(N)]
    static = {"ids": np.array([f"c{i}" for i in range(N)], dtype=object),
              "split": np.array(splits, dtype=object),
              "group": np.array([f"g{i}" for i in range(N)], dtype=object),
              "label": np.asarray(labels, np.int32)}
    attrs = {"dataset": dataset, "preset": "offline", "classes": ["a", "b"], "task": "classification",
             "group_by": None, "label_derived": [], "targets": [],
             "stages": [PROV["audio"], PROV["meta"]]}
    store = Store(cache)
    key = f"{dataset}-0123456789abcdef"
    fs = store.create_set(key, layout, attrs, static)
    store.set_alias(dataset, "offline", key)
    pres = np.ones(N, bool) if audio_present is None else audio_present
    for u in range(layout.n_units):
        a, b = layout.unit_range(u)
        y = labels[a:b].astype(np.float32)[:, None]
        n = b - a
        p = pres[a:b]
        data = {
            "audio/pooled": (np.where(p[:, None], rng.normal(size=(n, 6)) + y, 0)).astype(np.float16),
            "audio/present": p,
            "audio/seq": (np.where(p[:, None, None], rng.normal(size=(n, 4, 3)), 0)).astype(np.float16),
            "audio/len": np.where(p, 4, 0).astype(np.int32),
            "meta/pooled": rng.normal(size=(n, 8)).astype(np.float16),
            "meta/present": np.ones(n, bool),
        }
        fs.commit_unit(u, data)
    return key


def _attrs_edit(cache: Path, key: str, fn: Callable[[dict], None]) -> None:
    """Edit attrs['mmemo'] in the set's zarr.json (what a hand-merged or mixed set looks like)."""
    p = cache / "sets" / key / "zarr.json"
    meta = json.loads(p.read_text())
    fn(meta["attributes"]["mmemo"])
    p.write_text(json.dumps(meta))


def _mixed_config(cache: Path) -> None:
    key = make_set(cache)

    def edit(a: dict) -> None:
        a["modalities"]["audio"]["provenance"] = {**PROV["audio"], "config": {"n_mels": 64}}

    _attrs_edit(cache, key, edit)


def _mixed_units(cache: Path) -> None:
    key = make_set(cache)
    for u, ver in ((0, "1"), (1, "2")):
        p = cache / "sets" / key / "units" / f"{u}.done"
        m = json.loads(p.read_text())
        m["stages"] = {"audio": ver}
        p.write_text(json.dumps(m))


def _mismatched_dims(cache: Path) -> None:
    key = make_set(cache)
    _attrs_edit(cache, key, lambda a: a["modalities"]["audio"].update(pooled_dim=7))


def _empty_test_split(cache: Path) -> None:
    make_set(cache, splits=["train"] * N)


def _single_class(cache: Path) -> None:
    make_set(cache, labels=np.zeros(N, np.int64))


def _all_absent(cache: Path) -> None:
    make_set(cache, audio_present=np.zeros(N, bool))


def _all_nan(cache: Path) -> None:
    key = make_set(cache)
    # the writer refuses NaN, so this is what a foreign or damaged writer leaves behind
    arr = zarr.open_array(cache / "sets" / key / "audio" / "pooled", mode="r+")
    arr[:] = np.full(arr.shape, np.nan, np.float16)


def _no_completed_units(cache: Path) -> None:
    key = make_set(cache)
    for p in (cache / "sets" / key / "units").glob("[0-9]*.done"):
        p.unlink()


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "mixed_config": (_mixed_config, r"different 'audio' stage configuration.*mixed configurations"),
    "mixed_unit_versions": (_mixed_units, r"different stage versions.*mixed configurations"),
    "mismatched_dims": (_mismatched_dims, r"audio/pooled has shape \(24, 6\) but attrs say \(24, 7\)"),
    "empty_split": (_empty_test_split, r"the 'test' split is empty"),
    "single_class": (_single_class, r"single class"),
    "all_absent_modality": (_all_absent, r"modality 'audio' is absent on every one"),
    "all_nan_modality": (_all_nan, r"modality 'audio' has non-finite pooled values"),
    "no_completed_rows": (_no_completed_units, r"no completed rows"),
}


def test_the_valid_set_fits(tmp_path):
    """The baseline the broken sets are made from trains: the checks do not fire on good data."""
    from fusion.train import fit

    make_set(tmp_path / "cache")
    res = fit(tmp_path / "cache", "fc", "early", modalities=["audio", "meta"], seeds=1, epochs=2,
              runs_dir=tmp_path / "runs", name="ok")
    assert (res.run_dir / "metrics.json").exists()


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_set_raises_data_error_before_training(name, tmp_path):
    from fusion.data import DataError
    from fusion.train import fit

    build, reason = BROKEN[name]
    build(tmp_path / "cache")
    with pytest.raises(DataError, match=reason) as ei:
        fit(tmp_path / "cache", "fc", "early", modalities=["audio", "meta"], seeds=1, epochs=2,
            runs_dir=tmp_path / "runs", name="broken")
    assert "fc/offline" in str(ei.value), "the message names the set"
    _no_outputs(tmp_path / "runs")


@pytest.mark.parametrize("name", ["single_class", "all_nan_modality", "mismatched_dims"])
def test_mmemo_fit_exits_nonzero_with_the_message(name, tmp_path):
    build, reason = BROKEN[name]
    build(tmp_path / "cache")
    proc = run_mmemo(["fit", "--dataset", "fc", "--cache", str(tmp_path / "cache"), "--modalities",
                      "audio,meta", "--seeds", "1", "--epochs", "2", "--runs", str(tmp_path / "runs")],
                     cwd=tmp_path)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    import re

    assert re.search(reason, out), out[-2000:]
    assert "Traceback" not in out
    _no_outputs(tmp_path / "runs")


def _no_outputs(runs: Path) -> None:
    """Training never started: no log, metrics or weights (an empty run folder may be left)."""
    files = [p for p in runs.rglob("*") if p.is_file()] if runs.exists() else []
    assert not files, f"training (or its outputs) started before the check: {files}"
