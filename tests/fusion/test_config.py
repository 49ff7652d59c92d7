"""FitConfig: one record of the training settings, written to config.toml and read back."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from fusion.config import FitConfig

# what config.toml has recorded since lr_base / batch_size_asked were added (report, predict,
# bench and ablation resume read these keys)
RECORDED = {"dataset", "fusion", "modalities", "seeds", "split", "folds", "epochs", "batch_size",
            "lr", "batch_size_asked", "lr_base", "patience", "modality_dropout", "class_weight",
            "device", "target", "preset", "weight_decay", "val_fraction", "aux_weight",
            "head_options", "feature_set", "cache_root", "warm_start", "normalise", "depart_p"}


def test_round_trip_through_config_toml(tmp_path: Path) -> None:
    cfg = FitConfig(seeds=[3, 5], split="kfold", folds=4, group_by="speaker", epochs=7, lr=0.01,
                    batch_size=64, head_options={"hidden": 16, "pairs": (("a", "b"),)},
                    device="cpu", threads=2)
    cfg.to_toml(tmp_path / "config.toml", dataset="d", fusion="early", modalities=["audio"],
                batch_size=64, lr=0.01, preset="offline", feature_set="k", cache_root=tmp_path)
    back = FitConfig.from_toml(tmp_path / "config.toml")
    assert back == cfg
    assert back.seeds == [3, 5] and back.group_by == "speaker" and back.batch_size == 64
    assert back.threads is None  # not recorded: speed only
    raw = tomllib.loads((tmp_path / "config.toml").read_text())
    assert raw["lr_base"] == 0.01 and raw["batch_size_asked"] == 64 and raw["dataset"] == "d"


def test_equality_is_over_the_settings_that_change_results() -> None:
    assert FitConfig(seeds=2) == FitConfig(seeds=[0, 1])
    assert FitConfig(device="cuda", threads=8) == FitConfig()
    assert FitConfig(epochs=40.0) == FitConfig(epochs=40)  # type: ignore[arg-type]
    assert FitConfig(lr=0.01) != FitConfig()
    assert FitConfig(head_options={"dim": None}) == FitConfig()  # TOML has no None
    diff = FitConfig(seeds=1, lr=0.01).differences(FitConfig())
    assert diff == {"seeds": ([0], [0, 1, 2]), "lr_base": (0.01, 0.002)}
    with pytest.raises(ValueError, match="seeds"):
        FitConfig(seeds=0)


def test_old_and_foreign_config_toml_are_read(tmp_path: Path) -> None:
    """Unknown keys are ignored; a run from before lr_base / batch_size_asked falls back to the
    recorded values, or (ablation resume) to the config it is compared with."""
    path = tmp_path / "config.toml"
    path.write_text('dataset = "d"\nseeds = [0]\nepochs = 3\nlr = 0.004\nbatch_size = 256\n'
                    'some_future_key = "x"\n')
    old = FitConfig.from_toml(path)
    assert old.epochs == 3 and old.lr == 0.004 and old.batch_size == 256 and old.seeds == [0]
    want = FitConfig(seeds=1, epochs=3)
    # ... except the linear path's warm start, which no run before it had: not today's cell
    assert FitConfig.from_toml(path, unrecorded_from=want) == replace(want, warm_start=False,
                                                                      depart_p=1.0)
    assert FitConfig.from_toml(path, unrecorded_from=want) != want


def test_fit_writes_the_same_config_toml_keys(tmp_path: Path) -> None:
    from fusion.train import fit
    from tests.fusion.conftest import write_feature_set

    write_feature_set(tmp_path / "cache", n=120, n_groups=12)
    r = fit(tmp_path / "cache", "synth", "early", ["audio"], FitConfig(seeds=1, epochs=1, threads=1),
            runs_dir=tmp_path / "runs")
    raw = tomllib.loads((r.run_dir / "config.toml").read_text())
    assert set(raw) == RECORDED  # group_by None: left out, as before
    assert raw["batch_size_asked"] == "auto" and raw["lr_base"] == 0.002
    assert FitConfig.from_toml(r.run_dir / "config.toml") == FitConfig(seeds=1, epochs=1)
