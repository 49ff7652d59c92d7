"""Per-speaker standardisation (FitConfig.normalise = "speaker", fusion.normalise.per_speaker)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from fusion.config import FitConfig
from fusion.data import DataError
from fusion.normalise import per_speaker
from fusion.train import fit
from tests.fusion.conftest import write_feature_set


def test_per_speaker_scales_each_speaker_by_its_own_rows():
    rng = np.random.default_rng(0)
    spk = np.array(["a"] * 5 + ["b"] * 5 + ["c"] * 2)
    pooled = rng.normal(0, 1, (12, 3)).astype(np.float32)
    pooled[spk == "b"] = pooled[spk == "b"] * 10 + 50  # another voice: other scale and level
    present = np.ones(12, bool)
    present[0] = False
    pooled[0] = 0
    seq = rng.normal(0, 1, (12, 4, 2)).astype(np.float16)
    lens = np.array([0, 4, 3, 2, 4, 1, 4, 4, 4, 4, 2, 3])
    seq[np.arange(4)[None, :] >= lens[:, None]] = 0
    cond = rng.normal(0, 1, (12, 2)).astype(np.float32)
    raw = {"audio": {"present": present, "pooled": pooled.copy(), "seq": seq.copy(), "len": lens},
           "cond": {"present": present, "pooled": cond.copy()}}
    out = per_speaker(raw, spk, skip=("cond",), min_rows=3)["audio"]
    for s in ("a", "b"):
        rows = (spk == s) & present
        np.testing.assert_allclose(out["pooled"][rows].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(out["pooled"][rows].std(0), 1, atol=1e-4)
    assert not out["pooled"][0].any()  # absent rows stay zero
    valid = np.arange(4)[None, :] < lens[:, None]
    assert not out["seq"][~valid].any()  # padding stays zero
    assert out["seq"].dtype == np.float16  # stored dtype kept
    b = (spk == "b")[:, None] & valid
    np.testing.assert_allclose(out["seq"][b].astype(np.float32).mean(0), 0, atol=2e-3)
    # speaker c has 2 rows (< min_rows): scaled by the statistics of all present rows
    allp = pooled[present]
    want = (pooled[spk == "c"] - allp.mean(0)) / allp.std(0)
    np.testing.assert_allclose(out["pooled"][spk == "c"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(raw["cond"]["pooled"], cond)  # skipped


def _speaker_confounded_set(root, seed=0):
    """A set whose label signal is small next to each speaker's own offset and gain."""
    key = write_feature_set(root, n=480, n_groups=24, seed=seed,
                            modalities={"audio": (0, 12, 0, 0.6)}, absent_frac=0.0)
    g = zarr.open_group(str(root / "sets" / key), mode="r+")
    group = np.asarray([str(x) for x in g["group"][:]])
    x = np.asarray(g["audio/pooled"][:], dtype=np.float32)
    rng = np.random.default_rng(seed + 1)
    for s in np.unique(group):
        rows = group == s
        x[rows] = x[rows] * rng.uniform(0.5, 2.0) + rng.normal(0, 5.0, x.shape[1])
    g["audio/pooled"][:] = x.astype(np.float16)
    return key


def test_fit_with_speaker_normalisation_beats_global_on_held_out_speakers(tmp_path):
    _speaker_confounded_set(tmp_path)
    got = {}
    for norm in ("global", "speaker"):
        r = fit(tmp_path, "synth", "early", ["audio"], FitConfig(seeds=1, epochs=15, normalise=norm),
                runs_dir=tmp_path / "runs", name=f"n-{norm}")
        got[norm] = r.metrics
    assert got["speaker"]["normalise"] == "speaker"
    assert "per-speaker standardised" in got["speaker"]["paper"]
    assert "per-speaker" not in got["global"]["paper"]
    # the test split's speakers are unseen in training (official split is speaker-disjoint)
    assert got["speaker"]["mean"]["accuracy"] >= got["global"]["mean"]["accuracy"] + 0.1
    assert got["speaker"]["linear_probe"]["accuracy"] >= got["global"]["linear_probe"]["accuracy"] + 0.1
    cfg = FitConfig.from_toml(tmp_path / "runs" / "n-speaker" / "config.toml")
    assert cfg.normalise == "speaker"
    assert FitConfig.from_dict({}).normalise == "global"  # runs from before the option


def test_speaker_normalisation_needs_a_speaker_grouped_set(tmp_path):
    write_feature_set(tmp_path, attrs_patch={"group_by": "dialogue_id"})
    with pytest.raises(DataError, match="grouped by 'dialogue_id', not by speaker"):
        fit(tmp_path, "synth", "early", ["audio"], FitConfig(seeds=1, epochs=2, normalise="speaker"),
            runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="normalise must be one of"):
        FitConfig(normalise="per-actor")


def test_predict_set_applies_the_runs_speaker_normalisation(tmp_path):
    from fusion.predict import predict_set

    key = _speaker_confounded_set(tmp_path)
    r = fit(tmp_path, "synth", "early", ["audio"], FitConfig(seeds=1, epochs=10, normalise="speaker"),
            runs_dir=tmp_path / "runs", name="spk")
    fs_label = np.asarray(zarr.open_group(str(tmp_path / "sets" / key), mode="r")["label"][:])
    out = predict_set(r.run_dir, tmp_path, key)
    pred = np.array([int(max(o["probs"], key=o["probs"].get)[1:]) for o in out])
    # the whole set (training rows included), scaled per speaker as at fit time: well above
    # chance (1/3); without the per-speaker step the offsets would swamp the signal
    assert (pred == fs_label).mean() > 0.6


def test_cli_normalise_speaker_reaches_fit_and_ablate_and_predict_refuses_one_file(tmp_path):
    import json
    import tomllib

    from typer.testing import CliRunner

    from cli import app
    from pipeline.predict import PredictError, predict_file

    write_feature_set(tmp_path / "cache", n=120, n_groups=12)
    base = ["--dataset", "synth", "--cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"),
            "--epochs", "2", "--patience", "1", "--seeds", "1", "--threads", "1"]
    r = CliRunner().invoke(app, ["fit", *base, "--fusion", "early", "--name", "s", "--normalise", "speaker"])
    assert r.exit_code == 0, r.output
    assert "per-speaker standardised" in r.output
    run = tmp_path / "runs" / "s"
    assert tomllib.loads((run / "config.toml").read_text())["normalise"] == "speaker"
    assert json.loads((run / "metrics.json").read_text())["normalise"] == "speaker"
    r = CliRunner().invoke(app, ["ablate", *base, "--fusion", "early", "--modalities", "audio",
                                 "--name", "g", "--normalise", "speaker"])
    assert r.exit_code == 0, r.output
    cells = list((tmp_path / "runs" / "g").rglob("config.toml"))
    assert cells and all(tomllib.loads(c.read_text())["normalise"] == "speaker" for c in cells)
    r = CliRunner().invoke(app, ["fit", *base, "--fusion", "early", "--normalise", "per-actor"])
    assert r.exit_code != 0 and "normalise must be one of" in r.output
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")
    with pytest.raises(PredictError, match="normalise = speaker"):
        predict_file(clip, run)
