"""Importers (CMU-MultimodalSDK .csd, MMSA .pkl) and exporters (hdf5, mmsa-pkl)."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import zarr

from pipeline import cachetools
from pipeline.importers import export_set, import_csd, import_mmsa_pkl
from pipeline.manifest import sanitize_id
from pipeline.store import Store
from tests.conftest import shared_path
from tests.pipeline.test_store import make_set, read_all


def strs(a) -> np.ndarray:
    """zarr v3 string arrays as plain Python-str numpy arrays."""
    return np.asarray([str(x) for x in a])


def _csd_truth(path):
    with h5py.File(path, "r") as f:
        (root,) = f.keys()
        data = f[root]["data"]
        return {vid: (np.asarray(g["features"][:]), np.asarray(g["intervals"][:])) for vid, g in data.items()}


def test_real_mosi_opinion_labels_import(tmp_path):
    csd = shared_path("cmu-mosi", "CMU_MOSI_Opinion_Labels.csd")
    cache = tmp_path / "cache"
    key = import_csd(csd, cache, dataset="mosi")
    assert Store(cache).resolve("mosi", "csd") == key
    g = zarr.open_group(cache / "sets" / key, mode="r")
    attrs = g.attrs["mmemo"]
    assert attrs["n"] == 2199 and attrs["targets"] == ["sentiment"] and attrs["task"] == "regression"
    assert attrs["modalities"] == {}
    ids = strs(g["ids"][:])
    groups = strs(g["group"][:])
    vals = np.asarray(g["targets/sentiment/value"][:])
    assert len(set(groups)) == 93 and len(set(ids)) == 2199
    assert np.asarray(g["targets/sentiment/present"][:]).all()
    assert vals.dtype == np.float32 and vals.min() >= -3 and vals.max() <= 3
    assert vals.min() == -3 and vals.max() == 3  # the real file spans the full scale
    # the same numbers as the source, segment by segment
    truth = _csd_truth(csd)
    starts = np.asarray(g["segment/start"][:])
    ends = np.asarray(g["segment/end"][:])
    pos = {i: k for k, i in enumerate(ids)}
    n_checked = 0
    for vid, (feats, ivals) in truth.items():
        for i in range(len(feats)):
            k = pos[sanitize_id(f"{vid}[{i}]")]
            assert groups[k] == vid
            assert vals[k] == feats[i, 0]
            assert (starts[k], ends[k]) == (ivals[i, 0], ivals[i, 1])
            n_checked += 1
    assert n_checked == 2199
    rep = cachetools.verify(cache, "mosi/csd")[0]
    assert rep.clean and rep.units_done == rep.units
    # content-addressed: importing the same file again is a no-op with the same key
    before = sorted(p.stat().st_mtime_ns for p in (cache / "sets" / key / "units").glob("*.done"))
    assert import_csd(csd, cache, dataset="mosi") == key
    after = sorted(p.stat().st_mtime_ns for p in (cache / "sets" / key / "units").glob("*.done"))
    assert before == after
    # labels only: a fit on it says that there is nothing to fit on, not "no modalities asked for"
    from fusion.data import DataError
    from fusion.train import fit

    with pytest.raises(DataError, match=r"has no feature modalities, only labels or targets"):
        fit(cache, "mosi", "early", "all", preset="csd", target="sentiment", runs_dir=tmp_path / "r")


def _write_csd(path, root, videos, meta=None):
    with h5py.File(path, "w") as f:
        g = f.create_group(root)
        d = g.create_group("data")
        for vid, (feats, ivals) in videos.items():
            v = d.create_group(vid)
            v.create_dataset("features", data=feats)
            v.create_dataset("intervals", data=ivals)
        m = g.create_group("metadata")
        for k, val in (meta or {"root name": root, "dimension names": "[]"}).items():
            m.create_dataset(k, data=np.array([val.encode()], dtype=object), dtype=h5py.string_dtype())


def test_synthetic_features_csd(tmp_path):
    rng = np.random.default_rng(0)
    videos = {}
    for j, t in enumerate([5, 80, 12]):
        iv = np.stack([np.arange(t) * 0.1, np.arange(t) * 0.1 + 0.1], 1)
        videos[f"vid-{j}"] = (rng.standard_normal((t, 4)).astype(np.float32), iv)
    bad = videos["vid-2"][0].copy()
    bad[3, 1] = -np.inf  # COVAREP-style -inf: the clip's modality must become absent
    videos["vid-2"] = (bad, videos["vid-2"][1])
    # rows stored out of time order are sorted by interval start
    f1, i1 = videos["vid-0"]
    videos["vid-0"] = (f1[::-1].copy(), i1[::-1].copy())
    path = tmp_path / "feat.csd"
    _write_csd(path, "COVAREP Acoustic", videos)
    cache = tmp_path / "cache"
    key = import_csd(path, cache, dataset="toy", max_len=16)
    g = zarr.open_group(cache / "sets" / key, mode="r")
    attrs = g.attrs["mmemo"]
    assert list(attrs["modalities"]) == ["covarep_acoustic"]
    m = attrs["modalities"]["covarep_acoustic"]
    assert (m["seq_dim"], m["pooled_dim"], m["max_len"], m["kind"]) == (4, 4, 16, "sequence")
    assert strs(g["ids"][:]).tolist() == ["vid-0", "vid-1", "vid-2"]
    present = np.asarray(g["covarep_acoustic/present"][:])
    lens = np.asarray(g["covarep_acoustic/len"][:])
    seq = np.asarray(g["covarep_acoustic/seq"][:]).astype(np.float32)
    pooled = np.asarray(g["covarep_acoustic/pooled"][:]).astype(np.float32)
    assert present.tolist() == [True, True, False]
    assert lens.tolist() == [5, 16, 0]
    np.testing.assert_allclose(seq[0, :5], f1, atol=2e-3)  # back in time order
    assert not seq[0, 5:].any() and not seq[2].any()
    np.testing.assert_allclose(seq[1, 0], videos["vid-1"][0][:5].mean(0), atol=3e-3)  # pooled 80→16
    np.testing.assert_allclose(pooled[1], videos["vid-1"][0].mean(0), atol=3e-3)
    fails = Store(cache).open(key).failures()
    assert [(f["id"], f["error"]) for f in fails] == [("vid-2", "BadFeatures")]
    assert "NaN/Inf" in fails[0]["message"]
    assert cachetools.verify(cache, key)[0].clean


def test_features_csd_segmented_by_labels(tmp_path):
    feats = np.arange(20, dtype=np.float32)[:, None].repeat(2, 1)
    iv = np.stack([np.arange(20) * 0.5, np.arange(20) * 0.5 + 0.5], 1)
    fpath = tmp_path / "f.csd"
    _write_csd(fpath, "FACET 4.2", {"v1": (feats, iv)})
    lpath = tmp_path / "l.csd"
    _write_csd(lpath, "Opinion Segment Labels",
               {"v1": (np.array([[1.5], [-2.0]], np.float32), np.array([[1.0, 2.0], [6.0, 7.4]]))})
    key = import_csd(fpath, tmp_path / "c", dataset="seg", labels=lpath)
    g = zarr.open_group(tmp_path / "c" / "sets" / key, mode="r")
    assert strs(g["ids"][:]).tolist() == ["v1_0", "v1_1"]
    assert np.asarray(g["targets/sentiment/value"][:]).tolist() == [1.5, -2.0]
    lens = np.asarray(g["facet_4_2/len"][:]).tolist()
    seq = np.asarray(g["facet_4_2/seq"][:]).astype(np.float32)
    assert lens == [2, 3]  # rows overlapping [1, 2) and [6, 7.4)
    assert seq[0, :2, 0].tolist() == [2.0, 3.0] and seq[1, :3, 0].tolist() == [12.0, 13.0, 14.0]


def test_csd_that_is_not_a_computational_sequence(tmp_path):
    p = tmp_path / "x.csd"
    with h5py.File(p, "w") as f:
        f.create_group("a").create_dataset("b", data=[1])
    with pytest.raises(ValueError, match="not a CMU-MultimodalSDK"):
        import_csd(p, tmp_path / "c")


def test_hdf5_export_matches_zarr(tmp_path):
    cache = tmp_path / "c"
    store, fs = make_set(cache, n=10, unit_size=4, commit=False)
    for u in (0, 2):
        from tests.pipeline.test_store import unit_data

        fs.commit_unit(u, unit_data(fs.layout, u))
    out = export_set(cache, "ds/p", tmp_path / "out.h5")
    arrays = read_all(fs.path)
    rows = np.r_[0:4, 8:10]  # only completed units are exported
    with h5py.File(out, "r") as h:
        assert [x.decode() for x in h["ids"][:]] == [f"c{i}" for i in rows]
        np.testing.assert_array_equal(h["label"][:], arrays["label"][rows])
        for rel in ("audio/pooled", "audio/present", "audio/seq", "audio/len", "meta/pooled", "meta/present"):
            np.testing.assert_array_equal(h[rel][:], arrays[rel][rows])
        assert "seq" not in h["meta"]


def test_mmsa_pkl_round_trip(tmp_path):
    from tests.pipeline.test_store import unit_data

    cache = tmp_path / "c"
    store, fs = make_set(cache, n=10, unit_size=4, commit=False)
    for u in range(3):
        d = unit_data(fs.layout, u)
        d["audio/seq"][~d["audio/present"]] = 0  # the extractor leaves absent rows zero
        d["audio/len"][~d["audio/present"]] = 0
        for i, ln in enumerate(d["audio/len"]):
            d["audio/seq"][i, ln:] = 0  # and pads after len with zeros
        fs.commit_unit(u, d)
    pkl = export_set(cache, fs.key, tmp_path / "aligned.pkl", fmt="mmsa-pkl")
    with open(pkl, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"train", "test", "_mmemo"}
    tr = raw["train"]
    n_tr = len(tr["id"])
    assert tr["audio"].shape == (n_tr, 6, 3) and tr["audio"].dtype == np.float32
    assert tr["audio_mask"].dtype == bool and tr["meta"].shape == (n_tr, 2)
    assert not tr["audio"][~tr["audio_mask"]].any()  # absent = zeros, flagged by the mask
    assert "vision" not in tr and "text" not in tr

    with pytest.raises(ValueError, match="allow_pickle"):
        import_mmsa_pkl(pkl, tmp_path / "c2", dataset="back")
    assert not (tmp_path / "c2").exists()  # refused before touching anything
    key = import_mmsa_pkl(pkl, tmp_path / "c2", dataset="back", allow_pickle=True)
    assert Store(tmp_path / "c2").resolve("back", "mmsa") == key
    a = read_all(fs.path)
    b = read_all(tmp_path / "c2" / "sets" / key)
    order = [list(strs(b["ids"])).index(i) for i in strs(a["ids"])]
    for rel in ("split", "group", "label", "audio/pooled", "audio/present", "audio/seq", "audio/len",
                "meta/pooled", "meta/present"):
        np.testing.assert_array_equal(np.asarray(b[rel])[order], np.asarray(a[rel]), err_msg=rel)
    g = zarr.open_group(tmp_path / "c2" / "sets" / key, mode="r")
    assert g.attrs["mmemo"]["modalities"]["meta"]["kind"] == "vector"
    assert cachetools.verify(tmp_path / "c2")[0].clean


def test_mmsa_pkl_keeps_valence_and_arousal(tmp_path):
    # MMSA has a key for sentiment only; valence / arousal used to be dropped from the pickle
    from tests.pipeline.test_store import small_layout, static_for, unit_data

    n = 8
    static = static_for(n)
    valence = np.linspace(-1, 1, n).astype(np.float32)
    static |= {"targets/valence/value": valence, "targets/valence/present": np.arange(n) != 3,
               "targets/arousal/value": -valence, "targets/arousal/present": np.ones(n, bool)}
    store = Store(tmp_path / "c")
    layout = small_layout(n, 4)
    fs = store.create_set("va-1", layout, {"dataset": "va", "preset": "p", "targets": ["valence", "arousal"],
                                           "task": "regression"}, static)
    for u in range(layout.n_units):
        fs.commit_unit(u, unit_data(layout, u))
    pkl = export_set(tmp_path / "c", fs.key, tmp_path / "va.pkl", fmt="mmsa-pkl")
    with open(pkl, "rb") as f:
        raw = pickle.load(f)
    assert {"valence_labels", "valence_labels_mask", "arousal_labels"} <= set(raw["train"])
    assert "regression_labels" not in raw["train"]  # no sentiment in this set
    key = import_mmsa_pkl(pkl, tmp_path / "c2", dataset="back", allow_pickle=True)
    g = zarr.open_group(tmp_path / "c2" / "sets" / key, mode="r")
    assert g.attrs["mmemo"]["targets"] == ["valence", "arousal"]
    ids = list(strs(np.asarray(g["ids"][:])))
    order = [ids.index(f"c{i}") for i in range(n)]
    np.testing.assert_array_equal(np.asarray(g["targets/valence/present"][:])[order], np.arange(n) != 3)
    got = np.asarray(g["targets/valence/value"][:])[order]
    np.testing.assert_allclose(got[np.arange(n) != 3], valence[np.arange(n) != 3])
    np.testing.assert_allclose(np.asarray(g["targets/arousal/value"][:])[order], -valence)


def test_mmsa_pkl_in_the_mmsa_layout(tmp_path):
    rng = np.random.default_rng(1)

    def split(n, off):
        return {
            "id": [f"vid{(off + i) // 3}$_${i}" for i in range(n)],
            "text": rng.standard_normal((n, 5, 8)).astype(np.float32),
            "audio": rng.standard_normal((n, 5, 3)).astype(np.float32),
            "vision": rng.standard_normal((n, 5, 4)).astype(np.float32),
            "audio_lengths": np.full(n, 4),
            "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        }

    data = {"train": split(6, 0), "valid": split(3, 6), "test": split(3, 9)}
    p = tmp_path / "mmsa.pkl"
    with open(p, "wb") as f:
        pickle.dump(data, f)
    key = import_mmsa_pkl(p, tmp_path / "c", allow_pickle=True)
    g = zarr.open_group(tmp_path / "c" / "sets" / key, mode="r")
    attrs = g.attrs["mmemo"]
    assert set(attrs["modalities"]) == {"text", "audio", "visual"} and attrs["targets"] == ["sentiment"]
    assert strs(g["split"][:]).tolist() == ["train"] * 6 + ["valid"] * 3 + ["test"] * 3
    assert strs(g["ids"][:])[0] == "vid0___0"
    assert strs(g["group"][:])[:4].tolist() == ["vid0", "vid0", "vid0", "vid1"]
    np.testing.assert_allclose(np.asarray(g["targets/sentiment/value"][:]),
                               np.concatenate([data[s]["regression_labels"] for s in ("train", "valid", "test")]))
    assert np.asarray(g["audio/len"][:]).tolist() == [4] * 12
    assert np.asarray(g["visual/len"][:]).tolist() == [5] * 12
    np.testing.assert_allclose(np.asarray(g["visual/seq"][:6]).astype(np.float32), data["train"]["vision"], atol=4e-3)
    np.testing.assert_allclose(np.asarray(g["audio/pooled"][:6]).astype(np.float32),
                               data["train"]["audio"][:, :4].mean(1), atol=4e-3)


def test_cli_import_requires_allow_pickle_and_cache_commands(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    cache = tmp_path / "c"
    store, fs = make_set(cache)
    pkl = export_set(cache, "ds/p", tmp_path / "x.pkl", fmt="mmsa-pkl")
    runner = CliRunner()
    r = runner.invoke(app, ["import", "mmsa-pkl", str(pkl), "--cache", str(tmp_path / "c2")])
    assert r.exit_code == 2 and "--allow-pickle" in r.output
    assert not (tmp_path / "c2").exists()
    r = runner.invoke(app, ["import", "mmsa-pkl", str(pkl), "--allow-pickle", "--dataset", "back",
                            "--cache", str(tmp_path / "c2")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["cache", "verify", "--cache", str(tmp_path / "c2")])
    assert r.exit_code == 0 and "clean" in r.output, r.output
    flip = fs.path / next(iter(fs.read_done(0)["checksums"]))
    flip.write_bytes(flip.read_bytes()[:-1])
    r = runner.invoke(app, ["cache", "verify", "--cache", str(cache)])
    assert r.exit_code == 1 and "PROBLEMS" in r.output
    r = runner.invoke(app, ["cache", "ls", "--cache", str(tmp_path / "c2")], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "back/mmsa" in r.output, r.output
