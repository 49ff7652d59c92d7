"""pipeline.cacheformat: the public reading API (numpy, xarray, torch) and its import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline import cacheformat as cf
from tests.conftest import REPO
from tests.fusion.conftest import write_feature_set


@pytest.fixture
def synth(tmp_path):
    # 240 clips in units of 40; unit 2 (rows 80:120) has no marker, so its rows are not usable
    key = write_feature_set(tmp_path, missing_done=(2,), cond_dim=3)
    return tmp_path, key


def test_open_set_gives_completed_rows_only(synth):
    from fusion.data import open_set as fusion_open

    root, key = synth
    s = cf.open_set(root, "synth", "offline")
    fs = fusion_open(root, key=key)
    rows = np.flatnonzero(fs.complete)
    assert len(s) == len(rows) == 240 - 40
    assert not np.isin(np.arange(80, 120), s.rows).any()
    np.testing.assert_array_equal(s.rows, rows)
    np.testing.assert_array_equal(s.ids, fs.ids[rows])
    np.testing.assert_array_equal(s.split, fs.split[rows])
    np.testing.assert_array_equal(s.group, fs.group[rows])
    np.testing.assert_array_equal(s.label, fs.label[rows])
    np.testing.assert_array_equal(s.targets["sentiment"], fs.targets["sentiment"][rows])
    batch = fs.load(["audio", "text"], rows, cond=False)
    for m in ("audio", "text"):
        got = s.modality(m)
        for part in ("pooled", "present", "seq", "len"):
            np.testing.assert_array_equal(got[part], batch[m][part])
    assert s.modalities == ("audio", "text", "visual", "cond") and s.layout("cond").kind == "vector"
    with pytest.raises(KeyError, match="is a vector"):
        s.seq("cond")
    assert cf.open_set(root, key=key).key == key


def test_open_set_errors_name_what_is_missing(synth):
    root, key = synth
    with pytest.raises(cf.FormatError, match=r"no feature set for dataset 'synth', preset 'full'.*\['offline'\]"):
        cf.open_set(root, "synth", "full")
    with pytest.raises(cf.FormatError, match="'nokey' not found"):
        cf.open_set(root, key="nokey")
    (root / "aliases" / "synth" / "broken.json").write_text("[1]")
    with pytest.raises(cf.FormatError, match="is not {'key': ...} JSON"):
        cf.open_set(root, "synth", "broken")


def test_to_xarray(synth):
    root, _ = synth
    s = cf.open_set(root, "synth")
    ds = s.to_xarray(["audio"])
    assert list(ds["clip"].values) == list(s.ids)
    assert ds["audio_pooled"].dims == ("clip", "audio_feature")
    assert ds["audio_seq"].dims == ("clip", "audio_time", "audio_seq_feature")
    np.testing.assert_array_equal(ds["audio_len"].values, s.lengths("audio"))
    np.testing.assert_array_equal(ds["label"].values, s.label)
    assert "text_pooled" not in ds and json.loads(ds.attrs["classes"]) == s.classes
    train = ds.where(ds["split"] == "train", drop=True)
    assert train.sizes["clip"] == int((s.split == "train").sum())


def test_torch_dataset_items_and_masks(synth):
    import torch
    from torch.utils.data import DataLoader

    root, _ = synth
    s = cf.open_set(root, "synth")
    td = s.torch_dataset(["audio", "cond"], split="test")
    assert len(td) == int((s.split == "test").sum()) > 0
    batch = next(iter(DataLoader(td, batch_size=8)))
    assert batch["audio"]["seq"].shape[:2] == batch["audio"]["mask"].shape
    assert "mask" not in batch["cond"] and batch["cond"]["pooled"].dtype == torch.float32
    sel = np.flatnonzero(s.split == "test")[:8]
    lens, pres = s.lengths("audio")[sel], s.present("audio")[sel]
    want = (np.arange(s.layout("audio").max_len)[None, :] < lens[:, None]) & pres[:, None]
    np.testing.assert_array_equal(batch["audio"]["mask"].numpy(), want)
    assert list(batch["id"]) == list(s.ids[sel])
    assert batch["label"].dtype == torch.int64


def test_import_boundary():
    """Importing the format pulls no array library beyond numpy; fusion imports only it from pipeline."""
    code = (
        "import sys\n"
        "import pipeline.cacheformat\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('zarr', 'torch', 'xarray', 'pydantic'))\n"
        "import fusion.data, fusion.train, fusion.predict, fusion.ablate\n"
        "print(heavy, sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] ['pipeline', 'pipeline.cacheformat']"


def test_marker_round_trip_and_old_markers():
    m = cf.UnitMarker(unit=3, start=96, stop=128, checksums={"a/c/3": "x"}, n_failures=1, by="u@h", at="t",
                      extra={"stages": {"audio": "1"}})
    assert cf.UnitMarker.from_json(m.to_json(), "3.done", 32, 200) == m
    old = cf.UnitMarker.from_json({"checksums": {}}, "u6.done", 32, 200)
    assert (old.unit, old.start, old.stop) == ("u6", 192, 200)
    with pytest.raises(cf.FormatError, match="no start/stop"):
        cf.UnitMarker.from_json({}, "x.done", 32, 200)
    assert cf.completed_rows(10, [(2, 4), m], header=True).sum() == 2
    assert not cf.completed_rows(10, [(2, 4)], header=False).any()
