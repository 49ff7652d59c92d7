"""Applying a trained run to cached clips: probabilities, modality shares, absent modalities."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.predict import load_run, predict_set
from fusion.train import fit
from tests.fusion.conftest import write_feature_set


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_predict_set_matches_training_signal(tmp_path, fusion):
    key = write_feature_set(tmp_path, n=240, n_groups=24, absent_frac=0.2)
    res = fit(tmp_path, "synth", fusion, seeds=1, runs_dir=tmp_path / "runs", key=key, epochs=30)
    cfg, state, stats, meta = load_run(res.run_dir)
    assert cfg["fusion"] == fusion and state and stats
    out = predict_set(res.run_dir, tmp_path, key)
    assert len(out) == 240
    labels = np.asarray([int(x) for x in __import__("zarr").open_group(tmp_path / "sets" / key, mode="r")["label"][:]])
    correct = 0
    for row, lab in zip(out, labels):
        p = np.array(list(row["probs"].values()))
        assert np.isclose(p.sum(), 1.0, atol=1e-5) and (p >= 0).all()
        shares = row["shares"]
        for m, s in shares.items():
            if not s["present"]:
                assert s["share"] == 0.0, f"absent {m} must have no share"
        total = sum(s["share"] for s in shares.values())
        assert total == 0.0 or np.isclose(total, 1.0)
        correct += int(np.argmax(p) == lab)
    # the synthetic set carries strong signal: the saved model must reproduce it
    assert correct / len(out) > 0.6


def test_predict_refuses_an_incomplete_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text('fusion = "early"\n')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_run(tmp_path / "run")


def test_predict_set_of_a_regression_run_names_its_target(tmp_path):
    # a valence run predicts a value: {"valence": v}, not a one-class "distribution"
    key = write_feature_set(tmp_path, n=240, n_groups=24, extra_targets=("valence",))
    res = fit(tmp_path, "synth", "early", ["audio"], seeds=1, runs_dir=tmp_path / "runs", key=key,
              target="valence", epochs=5)
    out = predict_set(res.run_dir, tmp_path, key)
    assert {r["task"] for r in out} == {"regression"} and all(list(r["probs"]) == ["valence"] for r in out)
    truth = __import__("zarr").open_group(tmp_path / "sets" / key, mode="r")["targets/valence/value"][:]
    pred = np.array([r["probs"]["valence"] for r in out])
    assert np.corrcoef(pred, truth)[0, 1] > 0.5  # the target follows the label: the run learned it
    classified = predict_set(fit(tmp_path, "synth", "early", ["audio"], seeds=1, key=key, epochs=2,
                                 runs_dir=tmp_path / "runs").run_dir, tmp_path, key)
    assert classified[0]["task"] == "classification"
