"""Feature-set access: aliases, completed units only, batch format, pre-training checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from fusion.data import DataError, open_set
from fusion.train import fit
from tests.fusion.conftest import tiny_head, write_feature_set

FAST = {"seeds": 1, "epochs": 2, "patience": 1, "threads": 1}


def _set_path(root: Path, key: str) -> Path:
    return root / "sets" / key


def test_open_by_alias_and_by_key(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path, cond_dim=4)
    a = open_set(tmp_path, "synth", "offline")
    b = open_set(tmp_path, key=key)
    assert a.key == b.key == key
    assert a.modalities == ("audio", "text", "visual")  # cond is not a fusion input
    assert a.has_cond and a.classes == ["c0", "c1", "c2"]
    assert len(a.ids) == len(a.split) == len(a.group) == len(a.label) == 240
    assert a.ids.dtype.kind == "U" and set(a.split) == {"train", "valid", "test"}
    assert np.isnan(a.targets["sentiment"]).any() and np.isfinite(a.targets["sentiment"]).any()


def test_unknown_alias_and_key_name_what_exists(tmp_path: Path) -> None:
    write_feature_set(tmp_path)
    with pytest.raises(DataError, match="preset 'full'.*offline"):
        open_set(tmp_path, "synth", "full")
    with pytest.raises(DataError, match="nope.*not found"):
        open_set(tmp_path, key="nope")


def test_unit_without_done_marker_is_hidden(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path, n=200, unit_size=40, missing_done=(2,))
    fs = open_set(tmp_path, key=key)
    assert fs.complete.sum() == 160
    assert not fs.complete[80:120].any() and fs.complete[:80].all() and fs.complete[120:].all()
    with pytest.raises(DataError, match="unfinished units"):
        fs.load(["audio"], np.array([0, 85]))


def test_no_header_means_nothing_is_complete(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path)
    (_set_path(tmp_path, key) / "units" / "header.done").unlink()
    fs = open_set(tmp_path, key=key)
    assert not fs.complete.any()
    with pytest.raises(DataError, match="no completed rows"):
        fs.check(["audio"])


def test_load_batch_format_and_only_needed_arrays(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path, cond_dim=4)
    # If load touched visual it would fail: its arrays are gone.
    shutil.rmtree(_set_path(tmp_path, key) / "visual")
    fs = open_set(tmp_path, key=key)
    rows = np.array([3, 5, 41, 200])
    b = fs.load(["audio", "text"], rows)
    assert set(b) == {"audio", "text", "cond"}
    a = b["audio"]
    assert a["pooled"].dtype == np.float32 and a["pooled"].shape == (4, 10)
    assert a["seq"].dtype == np.float32 and a["seq"].shape == (4, 8, 6)
    assert a["present"].dtype == bool and a["len"].dtype == np.int64
    assert set(b["cond"]) == {"pooled", "present"}
    g = zarr.open_group(str(_set_path(tmp_path, key)), mode="r")
    np.testing.assert_array_equal(a["pooled"], g["audio/pooled"].oindex[rows].astype(np.float32))
    spec = fs.spec(["audio", "text"])
    assert spec.names == ("audio", "text") and spec["audio"].is_sequence
    assert spec.cond is not None and spec.cond.pooled_dim == 4


def test_unknown_modality(tmp_path: Path) -> None:
    write_feature_set(tmp_path)
    with pytest.raises(DataError, match="no modality.*'face'"):
        open_set(tmp_path, "synth").resolve(["audio", "face"])


def test_dims_mismatch_raises(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path)
    fs = open_set(tmp_path, key=key)
    fs.attrs["modalities"]["audio"]["pooled_dim"] = 11
    with pytest.raises(DataError, match=r"audio/pooled has shape \(240, 10\) but attrs say \(240, 11\)"):
        fs.check(["audio"])


def test_mixed_stage_configs_raise(tmp_path: Path) -> None:
    stages = [{"stage": "audio", "backend": "synthetic", "version": "1"},
              {"stage": "audio", "backend": "synthetic", "version": "2"}]
    key = write_feature_set(tmp_path, stages=stages)
    with pytest.raises(DataError, match="stage 'audio' is recorded with two configurations.*version"):
        open_set(tmp_path, key=key).check(["audio"])


def test_modality_built_by_other_stage_version_raises(tmp_path: Path) -> None:
    stages = [{"stage": "audio", "backend": "synthetic", "version": "2"}]
    key = write_feature_set(tmp_path, stages=stages)
    with pytest.raises(DataError, match="modality 'audio'.*different 'audio' stage.*version"):
        open_set(tmp_path, key=key).check(["audio"])


def test_units_written_by_different_versions_raise(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path)
    units = _set_path(tmp_path, key) / "units"
    for i, f in enumerate(sorted(units.glob("[0-9]*.done"))):
        m = json.loads(f.read_text())
        m["stages"] = {"audio": "1" if i < 2 else "2"}
        f.write_text(json.dumps(m))
    with pytest.raises(DataError, match="unit 2 was written by different stage versions"):
        open_set(tmp_path, key=key).check(["text"])


def test_all_absent_modality_raises(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path)
    g = zarr.open_group(str(_set_path(tmp_path, key)), mode="r+")
    g["visual/present"][:] = False
    fs = open_set(tmp_path, key=key)
    fs.check(["audio"])  # other modalities are fine
    with pytest.raises(DataError, match="modality 'visual' is absent on every one"):
        fs.check(["audio", "visual"])


def test_non_finite_present_values_raise(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path, absent_frac=0.0)
    g = zarr.open_group(str(_set_path(tmp_path, key)), mode="r+")
    g["text/seq"][7, 2, 1] = np.inf
    fs = open_set(tmp_path, key=key)
    with pytest.raises(DataError, match="'text' has non-finite seq values in 1 present rows.*clip00007"):
        fs.load(["text"], np.arange(20))


def test_empty_split_raises_before_training(tmp_path: Path) -> None:
    write_feature_set(tmp_path, splits=(0.7, 0.3, 0.0))
    with pytest.raises(DataError, match="'test' split is empty.*kfold"):
        fit(tmp_path, "synth", tiny_head, ["audio"], runs_dir=tmp_path / "runs", **FAST)
    assert not (tmp_path / "runs").exists()


def test_single_class_raises(tmp_path: Path) -> None:
    write_feature_set(tmp_path, class_probs=[1.0, 0.0, 0.0])
    with pytest.raises(DataError, match="single class \\('c0'\\)"):
        fit(tmp_path, "synth", tiny_head, ["audio"], runs_dir=tmp_path / "runs", **FAST)


def test_unknown_group_field_raises(tmp_path: Path) -> None:
    write_feature_set(tmp_path)
    with pytest.raises(DataError, match="grouped by 'speaker' only"):
        fit(tmp_path, "synth", tiny_head, ["audio"], group_by="dialogue_id",
            runs_dir=tmp_path / "runs", **FAST)


def test_label_derived_metadata_warns_naming_fields(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path, meta_dim=4, label_derived=["chain_of_empathy.*"],
                            meta_fields=["duration", "chain_of_empathy.cause", "views"])
    fs = open_set(tmp_path, key=key)
    assert fs.check(["audio"]) == []
    w = fs.check(["audio", "meta"])
    assert len(w) == 1 and "chain_of_empathy.cause" in w[0] and "views" not in w[0]
