"""Issue 11, fusion side: each mistake driven through the CLI gives one `error:` line naming the
file / key / value and the reason, a non-zero exit, and writes nothing it should not; fit and
ablate report progress; results cannot be misread (mean over seeds, ± n/a, n test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import app
from tests.fusion.conftest import write_feature_set

QUICK = ["--epochs", "2", "--patience", "1", "--seeds", "1", "--threads", "1"]


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(r, *needles: str) -> str:
    """The output holds exactly one `error:` line, no traceback, and it names every needle."""
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    write_feature_set(tmp_path / "cache", n=120, n_groups=12)
    return tmp_path / "cache"


def test_report_of_a_missing_run_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = _invoke("report", tmp_path / "runs" / "nosuch")
    assert r.exit_code == 1
    _one_error_line(r, "nosuch", "no metrics.json")
    r = _invoke("--debug", "report", tmp_path / "runs" / "nosuch")
    assert r.exit_code != 0 and isinstance(r.exception, FileNotFoundError)


def test_export_unknown_format_names_it_and_writes_nothing(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "x.csv"
    r = _invoke("export", "synth/offline", "--out", out, "--format", "csv", "--cache", cache)
    assert r.exit_code == 2
    _one_error_line(r, "'csv'", "hdf5", "mmsa-pkl")
    assert not out.parent.exists()


def test_import_csd_of_a_non_hdf5_or_missing_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.csd"
    bad.write_text("this is not HDF5\n")
    cache = tmp_path / "cache"
    r = _invoke("import", "csd", bad, "--cache", cache)
    assert r.exit_code == 1
    _one_error_line(r, str(bad), "not a readable HDF5 file")
    r = _invoke("import", "csd", tmp_path / "nosuch.csd", "--cache", cache)
    assert r.exit_code == 1
    _one_error_line(r, "nosuch.csd", "no such file")
    assert not (cache / "sets").exists() or not any((cache / "sets").iterdir())


def test_fit_opt_of_the_wrong_type_names_option_and_value(cache: Path, tmp_path: Path) -> None:
    r = _invoke("fit", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--opt", "hidden=abc", *QUICK)
    assert r.exit_code == 2
    _one_error_line(r, "hidden", "'abc'", "integer")
    assert not (tmp_path / "runs").exists()


def test_unexpected_exception_is_one_line_with_the_debug_hint(cache: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    import fusion.train

    class Boom(Exception):
        pass

    def boom(*a, **k):
        raise Boom("something broke\nover two lines")

    monkeypatch.setattr(fusion.train, "fit", boom)
    r = _invoke("fit", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs", *QUICK)
    assert r.exit_code == 1
    _one_error_line(r, "Boom: something broke over two lines", "--debug")


def test_ablate_typo_in_heads_fails_before_any_fit(cache: Path, tmp_path: Path) -> None:
    r = _invoke("ablate", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--fusion", "early,hybird", "--modalities", "audio", "--name", "g", *QUICK)
    assert r.exit_code == 2
    _one_error_line(r, "'hybird'", "valid heads: early, late, hybrid")
    assert not (tmp_path / "runs").exists()  # not even the grid folder, let alone a plot


@pytest.mark.parametrize("mods,needle", [("audio;txt", "txt"), ("all,single", "single")])
def test_ablate_bad_modality_names_fail_before_any_fit(cache: Path, tmp_path: Path, mods: str,
                                                       needle: str) -> None:
    r = _invoke("ablate", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--fusion", "early", "--modalities", mods, "--name", "g", *QUICK)
    assert r.exit_code == 2
    _one_error_line(r, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("split,needle", [("official", "the 'test' split is empty"),
                                          ("kfold", "5-fold needs at least 5 groups")])
def test_ablate_on_a_set_it_cannot_split_is_one_error_before_any_cell(tmp_path: Path, split: str,
                                                                      needle: str) -> None:
    # every row in "train" (no test split) and 4 speakers (too few groups for 5 folds): the
    # split is the same for every cell, so it fails once, up front, not once per cell
    cache = tmp_path / "cache"
    write_feature_set(cache, n=60, n_groups=4, splits=None)
    r = _invoke("ablate", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--fusion", "early,hybrid", "--modalities", "all,singles", "--name", "g",
                "--split", split, "--folds", "5", *QUICK)
    assert r.exit_code != 0, r.output
    _one_error_line(r, needle)
    assert "cell 1/" not in r.output and not (tmp_path / "runs").exists()


def test_ablate_groups_like_fit_does(tmp_path: Path) -> None:
    # 4 speakers cannot make 5 speaker-disjoint folds; the error says what to change, and
    # ablate takes --group-by none as fit does: then the rows are split, not the speakers
    cache = tmp_path / "cache"
    write_feature_set(cache, n=60, n_groups=4, splits=None)
    args = ["ablate", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
            "--fusion", "early", "--modalities", "audio", "--name", "g", "--split", "kfold",
            "--folds", "5", *QUICK]
    _one_error_line(_invoke(*args), "there are 4 (grouped by", "--group-by none")
    r = _invoke(*args, "--group-by", "none")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "runs" / "g" / "early__audio" / "metrics.json").is_file()


def test_ablate_exits_nonzero_when_a_cell_failed_and_shows_progress(cache: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    import fusion.ablate as A

    real = A._run_cell

    def flaky(*args, **kw):
        if args[2] == "late":
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(A, "_run_cell", flaky)
    runs = tmp_path / "runs"
    r = _invoke("ablate", "--dataset", "synth", "--cache", cache, "--runs", runs, "--fusion",
                "early,late", "--modalities", "audio", "--name", "g", *QUICK)
    assert r.exit_code == 1, r.output
    _one_error_line(r, "1 of 2 cells failed")
    assert "cell 1/2: early__audio running" in r.output and "cell 2/2: late__audio failed" in r.output
    md = (runs / "g" / "ablation.md").read_text()
    assert "simulated crash" in md and "± n/a" in md and "| n test |" in md and "?" not in md
    assert (runs / "g" / "ablation.png").is_file()  # one cell finished: something to plot


def test_ablate_all_cells_failed_writes_no_empty_plot(cache: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    import fusion.ablate as A

    def crash(*args, **kw):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(A, "_run_cell", crash)
    runs = tmp_path / "runs"
    r = _invoke("ablate", "--dataset", "synth", "--cache", cache, "--runs", runs, "--fusion",
                "early", "--modalities", "audio", "--name", "g", *QUICK)
    assert r.exit_code == 1
    assert not (runs / "g" / "ablation.png").exists()
    md = (runs / "g" / "ablation.md").read_text()
    assert "No cell finished" in md and "?" not in md


def test_fit_refuses_a_half_extracted_set_unless_allow_partial(tmp_path: Path) -> None:
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    write_feature_set(cache, n=120, n_groups=12, unit_size=40, missing_done=(1,))
    base = ["fit", "--dataset", "synth", "--cache", cache, "--runs", runs, "--name", "p", *QUICK]
    r = _invoke(*base)
    assert r.exit_code == 2
    _one_error_line(r, "40 of 120 clips missing", "1 of 3 work units unfinished",
                    "mmemo extract --dataset synth", "--allow-partial")
    assert not runs.exists()
    r = _invoke(*base, "--allow-partial")
    assert r.exit_code == 0, r.output
    m = json.loads((runs / "p" / "metrics.json").read_text())
    assert m["coverage"]["clips"] == 120 and m["coverage"]["completed"] == 80
    assert m["coverage"]["missing"] == 40 and m["coverage"]["units"] == 3
    assert any("partial feature set" in w for w in m["warnings"])
    assert "partial feature set: trained on 80 of 120 clips" in r.output


def test_fit_prints_epoch_lines_and_readable_results(cache: Path, tmp_path: Path) -> None:
    r = _invoke("fit", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--name", "f", "--epochs", "3", "--patience", "3", "--seeds", "1", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "run 1/1 (seed 0) epoch 1/3: train loss" in r.output and "val macro F1" in r.output
    assert "stopped after epoch" in r.output and "± n/a" in r.output and "± 0.000" not in r.output
    m = json.loads((tmp_path / "runs" / "f" / "metrics.json").read_text())
    assert sum(map(sum, m["confusion"])) == pytest.approx(m["n_test"])
    assert "n test/train" in r.output or "n train/test" in r.output


def test_every_option_of_the_fusion_commands_has_help() -> None:
    root = typer.main.get_command(app)
    cmds = {name: root.commands[name] for name in ("fit", "ablate", "report", "export")}
    imp = root.commands["import"]
    cmds |= {f"import {n}": imp.commands[n] for n in ("csd", "mmsa-pkl")}
    missing = [f"{name} {p.name}" for name, cmd in cmds.items() for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing
    assert any(p.name == "debug" and p.help for p in root.params)


def _ev(run: int, epoch: int, event: str = "epoch") -> dict:
    return {"event": event, "run": run, "runs": 2, "seed": run - 1, "fold": 0, "folds": 1,
            "epoch": epoch, "epochs": 40, "train_loss": 0.5, "val_loss": 0.4, "val_metric": 0.7,
            "best_epoch": epoch, "task": "classification"}


def test_fit_progress_plain_lines_are_throttled_and_a_terminal_gets_a_bar() -> None:
    import io

    from rich.console import Console

    from fusion.progress import FitProgress

    buf = io.StringIO()
    p = FitProgress(Console(file=buf, width=200), every_s=3600, terminal=False)
    for e in range(1, 31):
        p(_ev(1, e))
    p(_ev(1, 30, "end"))
    lines = buf.getvalue().splitlines()
    # the first epoch, then nothing for an hour, then the end of the run
    assert len(lines) == 2 and "epoch 1/40" in lines[0] and "stopped after epoch 30/40" in lines[1]
    assert lines[0][:8].count(":") == 2  # a timestamp

    buf = io.StringIO()
    p = FitProgress(Console(file=buf, width=200, force_terminal=True), terminal=True)
    p(_ev(1, 1))
    assert p.bar is not None and p.bar.bar is not None  # a rich bar, not lines
    p(_ev(2, 3, "end"))  # the last run ended: the bar is closed
    assert p.bar is None


def test_fit_on_a_set_without_labels_says_what_is_missing() -> None:
    from types import SimpleNamespace

    from fusion.data import DataError
    from fusion.splits import _task

    bare = SimpleNamespace(name="real/offline", classes=[], target_names=[])
    with pytest.raises(DataError, match=r"has no labels .*nothing to fit.*`label` column"):
        _task(bare, "label")
    regression = SimpleNamespace(name="mosi/offline", classes=[], target_names=["sentiment"])
    with pytest.raises(DataError, match=r"pick a regression target with --target, one of \['sentiment'\]"):
        _task(regression, "label")


def test_cache_commands_on_a_mistyped_cache_folder_say_so(tmp_path: Path) -> None:
    # a cache folder that does not exist is an error, not an empty cache (a typo in --cache or
    # $MMEMO_CACHE used to list nothing, verify nothing and collect nothing, all with exit 0)
    missing = tmp_path / "cahce"
    for cmd in (["cache", "ls"], ["cache", "verify"], ["cache", "gc"], ["cache", "gc", "--dry-run"]):
        r = _invoke(*cmd, "--cache", missing)
        assert r.exit_code == 2, (cmd, r.output)
        _one_error_line(r, str(missing), "no such cache folder")
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd, said in ((["cache", "ls"], "no feature sets"), (["cache", "verify"], "nothing to verify"),
                      (["cache", "gc"], "nothing to remove")):
        r = _invoke(*cmd, "--cache", empty)
        assert r.exit_code == 0 and said in r.output, (cmd, r.output)


def test_the_run_row_says_how_kfold_counts_its_rows() -> None:
    from fusion.report import run_row

    one = run_row({"n_train": 80, "n_test": 20, "folds": 1, "seeds": [{}]})
    assert one["n train/test"] == "80/20"
    five = run_row({"n_train": 9, "n_test": 14, "folds": 5, "seeds": [{}]})
    assert five["n train/test"] == "9 per fold / 14 in all"


def test_regression_columns_follow_the_target() -> None:
    from fusion.report import AFFECT_COLUMNS, SENTIMENT_COLUMNS, regression_columns

    assert regression_columns(["sentiment"]) == SENTIMENT_COLUMNS  # MOSI's Acc-2 / Acc-7 / F1
    assert regression_columns(["valence", "arousal"]) == AFFECT_COLUMNS  # MAE / corr / CCC
    mixed = [k for k, _ in regression_columns(["sentiment", "valence"])]  # a report of both
    assert mixed == ["mae", "corr", "ccc", "acc2", "acc7", "f1"]


def test_a_valence_fit_reports_ccc_and_names_its_files(tmp_path: Path) -> None:
    # valence on [-1, 1]: MAE / corr / CCC, not MOSI's Acc-2 / Acc-7 (sign and rounding to
    # 7 integers of a [-3, 3] score); the run folder carries the target; no confusion.png
    # is promised for a regression run
    cache = tmp_path / "cache"
    write_feature_set(cache, n=120, n_groups=12, extra_targets=("valence",))
    r = _invoke("fit", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--target", "valence", "--fusion", "early", "--modalities", "audio", *QUICK)
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "synth-early-audio-valence"
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "regression" and 0 < m["ccc"] <= 1 and m["mean_baseline"]["ccc"] == 0.0
    assert "CCC" in r.output and "Acc-7" not in r.output and "Acc-2" not in r.output
    assert "confusion.png" not in r.output and not (run / "confusion.png").exists()
    assert f"MAE {m['mae']:.3f} | CCC {m['ccc']:.3f}   (probe " in m["paper"]
    from fusion.report import run_row

    row = run_row(m)
    assert {"MAE", "corr", "CCC", "mean baseline (MAE / corr / CCC)"} <= set(row)
    assert not {"Acc-2", "Acc-7", "F1"} & set(row)
    # ablate takes the target too (a regression-only set had no way into a grid)
    r = _invoke("ablate", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--target", "valence", "--fusion", "early,late", "--modalities", "audio",
                "--name", "va", *QUICK)
    assert r.exit_code == 0, r.output
    md = (tmp_path / "runs" / "va" / "ablation.md").read_text()
    assert "| CCC |" in md and "mean_baseline CCC" in md and "Acc-7" not in md
    assert "mean baseline = the trivial predictor" in r.output


def test_a_fit_on_few_test_clips_says_how_coarse_its_scores_are(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_feature_set(cache, n=40, n_groups=10)  # official split: 20 % of 10 speakers to test
    r = _invoke("fit", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--fusion", "early", "--modalities", "audio", *QUICK)
    assert r.exit_code == 0, r.output
    m = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    n = m["n_test"]
    assert n < 30 and f"n test {n})" in r.output, r.output
    warn = [w for w in m["warnings"] if "test clip(s) in all" in w]
    assert len(warn) == 1 and f"{100 / n:.0f} points" in warn[0] and "--split kfold" in warn[0]
    assert "warning: " + warn[0][:20] in r.output
    # a regression fit on the same few clips speaks of its error, not of accuracy
    r = _invoke("fit", "--dataset", "synth", "--cache", cache, "--runs", tmp_path / "runs",
                "--fusion", "early", "--modalities", "audio", "--target", "sentiment", *QUICK)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "runs" / "synth-early-audio-sentiment" / "metrics.json").read_text())
    warn = [w for w in m["warnings"] if "test clip(s) in all" in w]
    assert len(warn) == 1 and "of the error" in warn[0] and "accuracy" not in warn[0]


def test_fit_on_a_set_where_no_modality_is_present_says_so(tmp_path: Path) -> None:
    from fusion.data import DataError
    from fusion.train import fit

    cache = tmp_path / "cache"
    write_feature_set(cache, n=40, n_groups=10, absent_frac=1.0)  # as if every clip failed
    with pytest.raises(DataError, match=r"none of its modalities \(audio, text, visual\) is present"):
        fit(cache, "synth", "early", "all", runs_dir=tmp_path / "runs", epochs=1)
