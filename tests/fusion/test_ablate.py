"""ablate(): the grid, its outputs, resumability, parallel workers; report() and print_table()."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from fusion.ablate import ablate, modality_subsets
from fusion.report import print_table, report
from tests.fusion.conftest import write_feature_set

FAST = {"epochs": 3, "patience": 2, "threads": 1, "head_options": {"hidden": 16}}


def test_modality_subsets_forms() -> None:
    mods = ["audio", "text", "visual"]
    assert modality_subsets(mods, "all,singles") == [mods, ["audio"], ["text"], ["visual"]]
    subs = modality_subsets(mods, "all-subsets")
    assert len(subs) == 7 and ["audio", "visual"] in subs and mods in subs
    assert modality_subsets(["audio"], "all,singles") == [["audio"]]  # deduplicated
    assert modality_subsets(mods, ["audio+text", ["visual"]]) == [["audio", "text"], ["visual"]]
    with pytest.raises(ValueError, match="pairs"):
        modality_subsets(mods, "pairs")


def test_ablate_grid_outputs_and_resume(tmp_path: Path) -> None:
    write_feature_set(tmp_path, n=200, n_groups=20)
    runs = tmp_path / "runs"
    df = ablate(tmp_path, "synth", ["early", "late"], "all,singles", seeds=2, name="g",
                runs_dir=runs, **FAST)
    assert len(df) == 8 and not df["resumed"].any() and (df["error"] == "").all()
    assert {"accuracy_mean", "accuracy_std", "macro_f1_mean", "uar_mean", "majority_accuracy",
            "n_test", "n_seeds"} <= set(df.columns)
    assert (df["n_seeds"] == 2).all()
    out = runs / "g"
    for f in ("ablation.csv", "ablation.md", "ablation.png"):
        assert (out / f).is_file(), f
    assert len(pd.read_csv(out / "ablation.csv")) == 8
    md = (out / "ablation.md").read_text()
    assert "| early | audio+text+visual |" in md and " ± " in md and "majority accuracy" in md
    mtimes = {c: (out / c / "metrics.json").stat().st_mtime_ns for c in df["cell"]}

    # Remove one cell: the second call reruns only that one and reads the rest back.
    (out / "late__text" / "metrics.json").unlink()
    df2 = ablate(tmp_path, "synth", ["early", "late"], "all,singles", seeds=2, name="g",
                 runs_dir=runs, **FAST)
    assert df2.set_index("cell")["resumed"].to_dict() == {c: c != "late__text" for c in df["cell"]}
    for c, t in mtimes.items():
        if c != "late__text":
            assert (out / c / "metrics.json").stat().st_mtime_ns == t
    pd.testing.assert_series_equal(df2["accuracy_mean"].drop(5), df["accuracy_mean"].drop(5))


def test_ablate_failed_cell_is_recorded_not_fatal(tmp_path: Path, monkeypatch) -> None:
    import fusion.ablate as A

    write_feature_set(tmp_path, n=120, n_groups=12)
    real = A._run_cell

    def flaky(*args, **kw):  # a cell that passes validation but fails while fitting
        if args[2] == "late":
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(A, "_run_cell", flaky)
    df = ablate(tmp_path, "synth", ["early", "late"], [["audio"]], seeds=1, name="f",
                runs_dir=tmp_path / "runs", **FAST)
    errs = df.set_index("fusion")["error"]
    assert errs["early"] == "" and "out of memory (simulated)" in errs["late"]
    assert "Failed cells" in (tmp_path / "runs" / "f" / "ablation.md").read_text()


def test_ablate_validates_the_grid_before_the_first_fit(tmp_path: Path) -> None:
    write_feature_set(tmp_path, n=120, n_groups=12)
    with pytest.raises(ValueError, match=r"'nosuchhead'.*valid heads: early"):
        ablate(tmp_path, "synth", ["early", "nosuchhead"], [["audio"]], seeds=1, name="v",
               runs_dir=tmp_path / "runs", **FAST)
    with pytest.raises(ValueError, match=r"txt"):
        ablate(tmp_path, "synth", ["early"], [["audio"], ["txt"]], seeds=1, name="v",
               runs_dir=tmp_path / "runs", **FAST)
    with pytest.raises(ValueError, match=r"cell early__audio: unknown option"):
        ablate(tmp_path, "synth", ["early"], [["audio"]], seeds=1, name="v",
               runs_dir=tmp_path / "runs", **{**FAST, "head_options": {"nosuch": 1}})
    assert not list((tmp_path / "runs").rglob("metrics.json"))
    # 'singles' among explicit sets expands to each modality alone
    assert modality_subsets(["audio", "text"], [["singles"], ["audio", "text"]]) == [
        ["audio"], ["text"], ["audio", "text"]]


def test_ablate_parallel_processes(tmp_path: Path) -> None:
    write_feature_set(tmp_path, n=120, n_groups=12)
    df = ablate(tmp_path, "synth", ["early"], [["audio"], ["text"]], seeds=1, name="p",
                runs_dir=tmp_path / "runs", workers=2, **FAST)
    assert (df["error"] == "").all() and df["accuracy_mean"].notna().all()


def test_report_side_by_side_and_print_table(tmp_path: Path) -> None:
    write_feature_set(tmp_path, n=160, n_groups=16)
    runs = tmp_path / "runs"
    df = ablate(tmp_path, "synth", ["early"], [["audio"], ["visual"]], seeds=2, name="r",
                runs_dir=runs, **FAST)
    md = report([runs / "r" / "early__audio", runs / "r" / "early__visual"])
    assert md.count("| early |") == 2 and "majority" in md and " ± " in md
    assert report([runs / "r"]).count("| early |") == 2  # an ablation dir expands to its cells
    with pytest.raises(FileNotFoundError):
        report([tmp_path / "nothing"])
    # through the CLI into a file: every table row stays one line (rich wrapped them at 80)
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["report", str(runs / "r")])
    assert r.exit_code == 0 and r.output == report([runs / "r"])
    rows = [ln for ln in r.output.splitlines() if ln.startswith("|")]
    assert len(rows) == 4 and all(ln.endswith("|") for ln in rows) and len(rows[0]) > 80
    buf = io.StringIO()
    print_table(df[["fusion", "modalities", "accuracy_mean"]], title="t",
                console=Console(file=buf, width=120))
    assert "early" in buf.getvalue() and "accuracy_mean" in buf.getvalue()


def test_ablate_per_head_options_and_resume_refuses_other_settings(tmp_path: Path) -> None:
    """Options keyed by head go to that head only; a finished cell run with other settings is
    not mixed into a grid silently (resume repeats the same grid), and the error says what
    differs."""
    import tomllib

    write_feature_set(tmp_path, n=120, n_groups=12)
    runs = tmp_path / "runs"
    kw = {k: v for k, v in FAST.items() if k != "head_options"}
    opts = {"early": {"hidden": 16}, "hybrid": {"hidden": 8, "max_tokens": 2}}
    df = ablate(tmp_path, "synth", ["early", "hybrid"], [["audio", "text"]], seeds=1, name="o",
                runs_dir=runs, head_options=opts, **kw)
    assert (df["error"] == "").all(), df["error"].tolist()
    for cell, want in (("early__audio+text", opts["early"]), ("hybrid__audio+text", opts["hybrid"])):
        cfg = tomllib.loads((runs / "o" / cell / "config.toml").read_text())
        assert cfg["head_options"] == want, cell
    # the same grid resumes (nothing reruns) ...
    df2 = ablate(tmp_path, "synth", ["early", "hybrid"], [["audio", "text"]], seeds=1, name="o",
                 runs_dir=runs, head_options=opts, **kw)
    assert df2["resumed"].all()
    # ... another one under the same name is refused, naming the setting
    with pytest.raises(ValueError, match=r"head_options: was .*hidden.*16.*now .*32"):
        ablate(tmp_path, "synth", ["early"], [["audio", "text"]], seeds=1, name="o",
               runs_dir=runs, head_options={"early": {"hidden": 32}}, **kw)
    with pytest.raises(ValueError, match=r"seeds: was \[0\], now \[0, 1\]"):
        ablate(tmp_path, "synth", ["early"], [["audio", "text"]], seeds=2, name="o",
               runs_dir=runs, head_options=opts, **kw)
    with pytest.raises(ValueError, match=r"lr_base: was 0.002, now 0.01"):
        ablate(tmp_path, "synth", ["early"], [["audio", "text"]], seeds=1, name="o",
               runs_dir=runs, head_options=opts, **{**kw, "lr": 0.01})
    # a cell from before the sequence heads' time windows (its runs record no window_start)
    m_path = runs / "o" / "hybrid__audio+text" / "metrics.json"
    m = json.loads(m_path.read_text())
    for s in m["seeds"]:
        s.pop("window_start")
    m_path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"time windows: was 'none \(run before they existed\)'"):
        ablate(tmp_path, "synth", ["early", "hybrid"], [["audio", "text"]], seeds=1, name="o",
               runs_dir=runs, head_options=opts, **kw)
    # --fresh discards the grid's old cells and runs the new settings
    df3 = ablate(tmp_path, "synth", ["early"], [["audio", "text"]], seeds=2, name="o",
                 runs_dir=runs, head_options=opts, fresh=True, **kw)
    assert not df3["resumed"].any() and (df3["n_seeds"] == 2).all()
    assert (runs / "o" / "hybrid__audio+text" / "metrics.json").is_file()  # not in this grid
