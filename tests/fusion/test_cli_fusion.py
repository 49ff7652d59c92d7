"""`mmemo fit` / `mmemo ablate` trainer and head options on the command line."""

from __future__ import annotations

import tomllib
from pathlib import Path

from typer.testing import CliRunner

from cli import app
from tests.fusion.conftest import write_feature_set

QUICK = ["--epochs", "2", "--patience", "1", "--seeds", "1", "--threads", "1"]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_fit_head_and_trainer_options_reach_the_run(tmp_path: Path) -> None:
    write_feature_set(tmp_path / "cache", n=120, n_groups=12)
    r = _invoke("fit", "--dataset", "synth", "--cache", str(tmp_path / "cache"), "--runs",
                str(tmp_path / "runs"), "--fusion", "hybrid", "--name", "h", "--opt", "hidden=8",
                "--opt", "max_tokens=2", "--opt", "hybrid.layers=0", "--lr", "0.01",
                "--batch-size", "32", "--modality-dropout", "0", *QUICK)
    assert r.exit_code == 0, r.output
    cfg = tomllib.loads((tmp_path / "runs" / "h" / "config.toml").read_text())
    assert cfg["head_options"] == {"hidden": 8, "max_tokens": 2, "layers": 0}
    assert cfg["batch_size"] == 32 and cfg["lr"] == 0.01 and cfg["patience"] == 1
    assert cfg["modality_dropout"] == 0


def test_bad_opt_is_a_one_line_error_naming_the_valid_options(tmp_path: Path) -> None:
    write_feature_set(tmp_path / "cache", n=60, n_groups=6)
    base = ["--dataset", "synth", "--cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs")]
    r = _invoke("fit", *base, "--fusion", "early", "--opt", "max_tokens=2", *QUICK)
    assert r.exit_code == 2 and "max_tokens" in r.output and "pool" in r.output, r.output
    r = _invoke("fit", *base, "--fusion", "early", "--opt", "hidden", *QUICK)
    assert r.exit_code == 2 and "KEY=VALUE" in r.output, r.output
    r = _invoke("ablate", *base, "--fusion", "early,late", "--opt", "hybrid.hidden=8")
    assert r.exit_code == 2 and "not among --fusion" in r.output, r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.json"))


def test_ablate_opts_go_to_the_heads_that_have_them(tmp_path: Path) -> None:
    write_feature_set(tmp_path / "cache", n=120, n_groups=12)
    r = _invoke("ablate", "--dataset", "synth", "--cache", str(tmp_path / "cache"), "--runs",
                str(tmp_path / "runs"), "--fusion", "early,cquery", "--modalities", "audio,text",
                "--name", "g", "--opt", "hidden=16", "--opt", "max_tokens=2", "--epochs", "2",
                "--patience", "1", "--seeds", "1")
    assert r.exit_code == 0, r.output
    early = tomllib.loads((tmp_path / "runs/g/early__audio+text/config.toml").read_text())
    cq = tomllib.loads((tmp_path / "runs/g/cquery__audio+text/config.toml").read_text())
    assert early["head_options"] == {"hidden": 16}  # early has no max_tokens
    assert cq["head_options"] == {"hidden": 16, "max_tokens": 2}
