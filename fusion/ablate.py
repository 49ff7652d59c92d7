"""Ablation grids: every fusion head × every modality subset, each cell a full `fit`.

Cells run in parallel (processes, or a Dask cluster given its scheduler address) and are
resumable: a cell whose `runs/<name>/<cell>/metrics.json` exists is read back, not rerun, so
an interrupted grid continues where it stopped. The summary is `runs/<name>/ablation.csv`,
`ablation.md` (mean ± std per metric beside the trivial baseline) and `ablation.png`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusion.config import FitConfig
from fusion.data import open_set
from fusion.report import (
    CLASSIFICATION_COLUMNS,
    fmt_pm,
    markdown_table,
    metric_columns,
    probe_kept,
    regression_columns,
)

log = logging.getLogger(__name__)

ModalitySets = Sequence[Sequence[str]] | str


def modality_subsets(available: Sequence[str], sets: ModalitySets) -> list[list[str]]:
    """Expand a modality-set spec against the set's modalities.

    "all-subsets": every non-empty subset; "all,singles": all together plus each one alone;
    "all" / "singles": either half; a list of lists (or "a+b" strings) is taken as given.
    """
    avail = list(available)
    if isinstance(sets, str):
        words = {w.strip() for w in sets.split(",")} if sets != "all-subsets" else {"all-subsets"}
        out: list[list[str]] = []
        if "all-subsets" in words:
            out = [list(c) for r in range(1, len(avail) + 1)
                   for c in itertools.combinations(avail, r)]
        if "all" in words:
            out.append(avail)
        if "singles" in words:
            out += [[m] for m in avail]
        unknown = words - {"all-subsets", "all", "singles"}
        if unknown:
            raise ValueError(f"modality sets {sorted(unknown)}: use 'all-subsets', 'all,singles', "
                             "'all', 'singles' or a list of lists")
    else:
        out = []
        for s in sets:
            s = s.split("+") if isinstance(s, str) else list(s)
            if len(s) == 1 and s[0] in ("all-subsets", "all", "singles"):
                out += modality_subsets(avail, s[0])  # a keyword among explicit sets
            else:
                out.append(s)
    seen, uniq = set(), []
    for s in out:  # de-duplicate (e.g. 'all' == the single modality of a one-modality set)
        k = tuple(s)
        if k not in seen:
            seen.add(k)
            uniq.append(list(s))
    return uniq


def cell_name(fusion: str, mods: Sequence[str]) -> str:
    return f"{fusion}__{'+'.join(mods)}"


def _run_cell(cache_root: str, dataset: str | None, fusion: str, mods: list[str], cell: str,
              runs_dir: str, cfg: FitConfig, preset: str, set_key: str | None,
              allow_partial: bool = False) -> str:
    """Worker entry point (module level so process pools and Dask can pickle it).

    `cfg` is the cell's own config (its head's options, see `cell_config`).
    """
    from fusion.train import fit

    fit(cache_root, dataset, fusion, mods, cfg, name=cell, runs_dir=Path(runs_dir),
        preset=preset, key=set_key, allow_partial=allow_partial)
    return cell


def options_for(head_options: dict | None, fusion: str) -> dict:
    """The options of head `fusion` in an ablation's `head_options`: a dict keyed by head names
    gives each head its own ({"hybrid": {"hidden": 64}}); any other dict is shared by every head
    ({"hidden": 16})."""
    from fusion.heads import HEADS

    opts = head_options or {}
    if opts and all(k in HEADS for k in opts):
        return dict(opts.get(fusion) or {})
    return dict(opts)


def cell_config(cfg: FitConfig, fusion: str) -> FitConfig:
    """The config of the grid's cells of head `fusion`: the grid's, with that head's options."""
    return replace(cfg, head_options=options_for(cfg.head_options, fusion))


def _check_resumable(cell_dir: Path, want: FitConfig, feature_set: str) -> None:
    """A finished cell run with other settings must not be mixed into this grid silently.

    The cell's config.toml must record the same feature set and `FitConfig.from_toml(...) ==
    want`; settings that older runs did not record are not compared.
    """
    import tomllib

    cfg_path = cell_dir / "config.toml"
    if not cfg_path.is_file():
        return
    recorded = tomllib.loads(cfg_path.read_text())
    have = FitConfig.from_dict(recorded, unrecorded_from=want)
    diff = have.differences(want) if have != want else {}
    if recorded.get("feature_set") != feature_set:
        diff["feature_set"] = (recorded.get("feature_set"), feature_set)
    if want.warm_start and _before_windows(cell_dir):
        diff["time windows"] = ("none (run before they existed)", "a sequence head's start")
    if diff:
        shown = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{cell_dir} was run with other settings ({shown}); resume only repeats "
                         f"the same grid: choose another --name or delete {cell_dir.parent}")


def _before_windows(cell_dir: Path) -> bool:
    """Whether a finished, warm-started cell was run before a sequence head's linear path had
    time windows (its runs record no `window_start`): its heads never had that start, so it is
    not today's cell."""
    try:
        m = json.loads((cell_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    seeds = [s for s in m.get("seeds", []) if isinstance(s, dict)]
    return any(any(s.get("warm_start", [])) and "window_start" not in s for s in seeds)


def validate_grid(fs: Any, fusions: Sequence[str], subsets: list[list[str]], cfg: FitConfig
                  ) -> None:
    """Check the whole grid before the first fit: every head name, every head's options, every
    modality name, that each head can be built on each modality subset, and the split: it is
    the same for every cell, so a set it cannot be split into (an empty test split, too few
    groups for k folds) is one DataError here instead of one per cell. A ValueError /
    DataError names the first bad head, option or modality and what is valid."""
    from fusion.heads import HEADS, build_head
    from fusion.protocols import get_protocol
    from fusion.train import labelled_rows, plan_folds

    if not fusions:
        raise ValueError(f"no fusion heads given; valid heads: {', '.join(HEADS)}")
    unknown = [f for f in fusions if f not in HEADS]
    if unknown:
        raise ValueError(f"--fusion: unknown head(s) {', '.join(repr(f) for f in unknown)}; "
                         f"valid heads: {', '.join(HEADS)}")
    if not subsets:
        raise ValueError(f"no modality sets to run (the set has {list(fs.available)})")
    if cfg.protocol:  # as fit applies it
        cfg = get_protocol(cfg.protocol).config(cfg)
    n_out = labelled_rows(fs, cfg)[0].n_out
    for f in fusions:
        opts = options_for(cfg.head_options, f)
        for mods in subsets:
            try:
                build_head(f, fs.spec(mods), n_out, **opts)
            except (TypeError, ValueError) as e:
                raise ValueError(f"cell {cell_name(f, mods)}: {e}") from e
    plan_folds(fs, cfg)


def ablate(
    cache_root: Path | str,
    dataset: str | None,
    fusions: list[str],
    modality_sets: ModalitySets = "all,singles",
    seeds: int | list[int] | None = None,
    name: str = "ablation",
    runs_dir: Path | str = Path("runs"),
    workers: int = 1,
    scheduler: str | None = None,
    preset: str = "offline",
    key: str | None = None,
    fresh: bool = False,
    cfg: FitConfig | None = None,
    allow_partial: bool = False,
    progress: Any = None,
    **settings: Any,
) -> pd.DataFrame:
    """Run (or resume) the fusion × modality-subset grid; write and return the summary table.

    `cfg` (its defaults when None; `seeds` and keyword `settings`, FitConfig fields, override it) is every cell's
    config; its `head_options` may also map head names to their own options (see
    `options_for`). A finished cell is reused only if its config.toml records the same feature
    set and settings (`FitConfig.from_toml(...) == cfg`); otherwise a ValueError says what
    differs. `fresh` discards the grid's earlier cells instead. A failing cell (e.g. a
    DataError for one subset) is recorded in the table's `error` column and the grid goes on.
    The grid is validated first (`validate_grid`; a partial feature set is refused unless
    `allow_partial`), so a typo fails before any cell runs. `progress(event)` is told when a
    cell starts (inline runs) and ends: {event, cell, index, total, done, error}.
    """
    t0 = time.perf_counter()
    if seeds is not None:
        settings["seeds"] = seeds
    cfg = replace(cfg or FitConfig(), **settings)
    fs = open_set(cache_root, dataset, preset=preset, key=key)
    fs.require_complete(allow_partial)
    subsets = [fs.resolve(s) for s in modality_subsets(fs.available, modality_sets)]
    validate_grid(fs, fusions, subsets, cfg)
    out_dir = Path(runs_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = [(f, mods, cell_name(f, mods)) for f in fusions for mods in subsets]
    if fresh:  # this grid's earlier cells are discarded, not resumed
        for _, _, c in cells:
            shutil.rmtree(out_dir / c, ignore_errors=True)
    done = {c for _, _, c in cells if (out_dir / c / "metrics.json").is_file()}
    for f, _, c in cells:
        if c in done:
            _check_resumable(out_dir / c, cell_config(cfg, f), fs.key)
    todo = [c for c in cells if c[2] not in done]
    log.info("ablation %s: %d cells, %d already done, %d to run", name, len(cells), len(done),
             len(todo))
    errors = _execute(todo, str(cache_root), dataset, str(out_dir), cfg, preset, fs.key, workers,
                      scheduler, allow_partial, progress)
    df = summary_table(out_dir, cells, done, errors)
    write_outputs(out_dir, df, title=f"{fs.attrs.get('dataset')}/{preset} ({fs.key})",
                  elapsed=time.perf_counter() - t0)
    return df


def _execute(todo: list, cache_root: str, dataset: str | None, out_dir: str, cfg: FitConfig,
             preset: str, key: str, workers: int, scheduler: str | None,
             allow_partial: bool = False, progress: Any = None) -> dict[str, str]:
    """Run the cells; returns {cell: error message} for the ones that failed."""
    errors: dict[str, str] = {}
    if not todo:
        return errors
    total, done, say = len(todo), [0], progress is None

    def tell(event: str, cell: str, index: int, error: str = "") -> None:
        if event == "end":
            done[0] += 1
        if progress is not None:
            progress({"event": event, "cell": cell, "index": index, "total": total,
                      "done": done[0], "error": error})

    if scheduler:
        return _execute_dask(todo, cache_root, dataset, out_dir, cfg, preset, key, scheduler,
                             allow_partial, tell, say)
    if workers <= 1:
        for i, (f, mods, c) in enumerate(todo, 1):
            tell("start", c, i)
            try:
                _run_cell(cache_root, dataset, f, mods, c, out_dir, cell_config(cfg, f), preset,
                          key, allow_partial)
            except Exception as e:  # one bad cell must not lose the grid
                errors[c] = _err(c, e, say)
            tell("end", c, i, errors.get(c, ""))
        return errors
    # Each process gets a fair share of the cores: oversubscribed BLAS threads are far slower.
    if cfg.threads is None:
        cfg = replace(cfg, threads=max(1, (os.cpu_count() or 1) // workers))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(_run_cell, cache_root, dataset, f, mods, c, out_dir,
                            cell_config(cfg, f), preset, key, allow_partial): c
                for f, mods, c in todo}
        index = {c: i for i, (_, _, c) in enumerate(todo, 1)}
        for fut in as_completed(futs):
            try:
                fut.result()
            except Exception as e:
                errors[futs[fut]] = _err(futs[fut], e, say)
            tell("end", futs[fut], index[futs[fut]], errors.get(futs[fut], ""))
    return errors


def _execute_dask(todo: list, cache_root: str, dataset: str | None, out_dir: str,
                  cfg: FitConfig, preset: str, key: str, scheduler: str,
                  allow_partial: bool = False, tell: Any = None, say: bool = True
                  ) -> dict[str, str]:
    from distributed import Client
    from distributed import as_completed as dask_completed

    errors: dict[str, str] = {}
    with Client(scheduler) as client:
        futs = {client.submit(_run_cell, cache_root, dataset, f, mods, c, out_dir,
                              cell_config(cfg, f), preset, key, allow_partial,
                              pure=False, key=f"mmemo-{c}-{time.time_ns()}"): c
                for f, mods, c in todo}
        index = {c: i for i, (_, _, c) in enumerate(todo, 1)}
        for fut in dask_completed(list(futs)):
            try:
                fut.result()
            except Exception as e:
                errors[futs[fut]] = _err(futs[fut], e, say)
            if tell is not None:
                tell("end", futs[fut], index[futs[fut]], errors.get(futs[fut], ""))
    return errors


def _err(cell: str, e: BaseException, say: bool = True) -> str:
    """The cell's error as the table records it; logged unless a progress callback already
    tells the person (`mmemo ablate` prints each failed cell once as it ends, and lists them)."""
    msg = f"{type(e).__name__}: {e}"
    if say:
        log.warning("ablation cell %s failed: %s", cell, msg)
    return msg


def summary_table(out_dir: Path, cells: list, resumed: set[str], errors: dict[str, str]
                  ) -> pd.DataFrame:
    """One row per cell from its metrics.json: mean/std per metric, baseline, sizes."""
    rows = []
    for f, mods, c in cells:
        row: dict[str, Any] = {"fusion": f, "modalities": "+".join(mods), "cell": c,
                               "resumed": c in resumed, "error": errors.get(c, "")}
        mpath = out_dir / c / "metrics.json"
        if mpath.is_file() and not row["error"]:
            row |= _metric_columns(json.loads(mpath.read_text()))
        rows.append(row)
    return pd.DataFrame(rows)


def _metric_columns(m: dict) -> dict[str, Any]:
    regression = m.get("task") == "regression"
    cols = metric_columns(m)
    keys = [k for k, _ in cols] + ([] if regression else ["weighted_f1"])
    out: dict[str, Any] = {"task": m.get("task", "classification"),
                           "target": m.get("target", "label")}
    for k in keys:
        out[f"{k}_mean"] = m["mean"].get(k, m.get(k))
        out[f"{k}_std"] = m["std"].get(k, 0.0)
    base = m.get("mean_baseline" if regression else "majority_baseline") or {}
    prefix = "mean_baseline" if regression else "majority"
    for k, _ in cols:
        if k in base:
            out[f"{prefix}_{k}"] = base[k]
    probe = m.get("linear_probe") or {}
    for k in keys:
        if k in probe:
            out[f"probe_{k}"] = probe[k]
    out["headline"] = m.get("headline")
    out["probe_kept"] = probe_kept(m)
    out["below"] = flag_text(m)
    out |= {"n_train": m.get("n_train"), "n_test": m.get("n_test"),
            "n_seeds": m.get("n_seeds"), "elapsed_s": m.get("elapsed_s"),
            "warnings": len(m.get("warnings", []))}
    return out


def flag_text(m: dict) -> str:
    """'below majority, linear_probe (weighted_f1)' when the head is below a baseline on its
    headline metric (metrics.json's `below_baseline`), else ''."""
    below = [k for k, v in (m.get("below_baseline") or {}).items() if v]
    return f"below {', '.join(below)} ({m.get('headline')})" if below else ""


def write_outputs(out_dir: Path, df: pd.DataFrame, title: str = "", elapsed: float = 0.0) -> None:
    """ablation.csv, ablation.md and ablation.png from the summary table."""
    df.to_csv(out_dir / "ablation.csv", index=False)
    (out_dir / "ablation.md").write_text(ablation_markdown(df, title, elapsed))
    ok = df[df["error"] == ""] if "error" in df else df
    if len(ok) and "n_seeds" in ok:
        plot_ablation(df, out_dir / "ablation.png", title)
    else:  # nothing finished: no empty plot (and none left from an earlier grid)
        (out_dir / "ablation.png").unlink(missing_ok=True)


def ablation_markdown(df: pd.DataFrame, title: str = "", elapsed: float = 0.0) -> str:
    regression = "task" in df and (df["task"] == "regression").any()
    cols = _regression_cols(df) if regression else CLASSIFICATION_COLUMNS
    prefix = "mean_baseline" if regression else "majority"
    rows = []
    for r in df.to_dict(orient="records"):
        n_test = _num(r.get("n_test"))
        row = {"fusion": r["fusion"], "modalities": r["modalities"],
               "n test": "—" if n_test is None else str(int(n_test))}
        n_seeds = _num(r.get("n_seeds"))
        for k, label in cols:
            row[label] = (fmt_pm(_num(r.get(f"{k}_mean")), _num(r.get(f"{k}_std")),
                                 n_seeds=None if n_seeds is None else int(n_seeds))
                          if not r.get("error") else "failed")
        for k, label in cols[:3]:
            v = _num(r.get(f"{prefix}_{k}"))
            row[f"{prefix} {label}"] = "—" if v is None else f"{v:.3f}"
        for k, label in cols[:3]:
            v = _num(r.get(f"probe_{k}"))
            row[f"probe {label}"] = "—" if v is None else f"{v:.3f}"
        kept = r.get("probe_kept")
        row["probe kept"] = kept if isinstance(kept, str) and kept else "—"
        below = r.get("below")
        row["flag"] = below if isinstance(below, str) else ""  # NaN when read from the csv
        rows.append(row)
    head = f"# Ablation: {title}\n\n" if title else "# Ablation\n\n"
    seeds = df["n_seeds"].dropna().unique().tolist() if "n_seeds" in df else []
    n_failed = int((df["error"] != "").sum()) if "error" in df else 0
    counts = (f"{len(df)} cells ({int(df['resumed'].sum())} resumed, {n_failed} failed), "
              f"{elapsed:.1f} s.")
    if seeds:
        spread = ("± n/a: one seed, no spread measured" if seeds == [1]
                  else f"mean ± std over {', '.join(str(int(s)) for s in seeds)} seeds")
        note = (f"Scores: {spread}; `n test`: test clips per cell; `{prefix}` columns: the "
                f"trivial predictor on the same test rows; `probe`: a linear model on the same "
                f"pooled features and folds (fusion/probe.py); `probe kept`: of the (seed, fold) "
                f"runs, those whose head kept the probe it started from (nothing scored better "
                f"on validation: the head is that linear model there), and \"N from time "
                f"windows\": runs of a sequence head that started from a probe of the pooled "
                f"vectors and 3 time windows of each sequence instead (it beat the pooled probe "
                f"on validation beyond chance); `flag`: the head is "
                f"below a baseline on the headline metric. {counts}\n\n")
    else:
        note = f"No cell finished, so there is nothing to compare. {counts}\n\n"
    fails = [f"- {r['cell']}: {r['error']}" for r in df.to_dict(orient="records") if r.get("error")]
    tail = ("\n## Failed cells\n\n" + "\n".join(fails) + "\n") if fails else ""
    return head + note + markdown_table(rows) + tail


def _regression_cols(df: pd.DataFrame) -> tuple[tuple[str, str], ...]:
    """The regression columns for the grid's target(s) (a csv written before the target column
    was kept held sentiment runs: the only regression target then reported)."""
    done = df[df["task"] == "regression"] if "task" in df else df
    targets = done["target"].dropna().tolist() if "target" in done else []
    return regression_columns(targets or ["sentiment"])


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else f


def plot_ablation(df: pd.DataFrame, path: Path, title: str = "") -> None:
    """Grouped bars (subsets × fusions) with std error bars; the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regression = "task" in df and (df["task"] == "regression").any()
    # regression: Acc-2 for sentiment, CCC for other targets (the third column), and corr
    panels = ([_regression_cols(df)[2], ("corr", "corr")] if regression
              else [("accuracy", "accuracy"), ("macro_f1", "macro F1")])
    prefix = "mean_baseline" if regression else "majority"
    ok = df[df["error"] == ""] if "error" in df else df
    subsets = list(dict.fromkeys(ok["modalities"])) if len(ok) else []
    fusions = list(dict.fromkeys(ok["fusion"])) if len(ok) else []
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 1.2 * len(subsets) * len(panels) + 2), 4),
                             dpi=100, squeeze=False)
    width = 0.8 / max(1, len(fusions))
    one_seed = "n_seeds" in ok and set(ok["n_seeds"].dropna().astype(int)) == {1}
    for ax, (k, label) in zip(axes[0], panels, strict=True):
        for i, f in enumerate(fusions):
            sub = ok[ok["fusion"] == f].set_index("modalities").reindex(subsets)
            x = np.arange(len(subsets)) + (i - (len(fusions) - 1) / 2) * width
            below = sub.get("below", pd.Series("", index=subsets)).fillna("").astype(str)
            bars = ax.bar(x, sub.get(f"{k}_mean", pd.Series(np.nan, index=subsets)).astype(float),
                          width, label=f, capsize=3,
                          yerr=None if one_seed else sub.get(f"{k}_std", pd.Series(0.0, index=subsets)
                                                             ).astype(float))
            for b, flagged in zip(bars, below != "", strict=True):
                if flagged:  # below the majority / probe on the headline metric
                    b.set_hatch("//")
                    b.set_edgecolor("red")
        pcol = f"probe_{k}"
        if pcol in ok and ok[pcol].notna().any():
            probe = ok.groupby("modalities")[pcol].mean().reindex(subsets).astype(float)
            ax.scatter(np.arange(len(subsets)), probe, marker="_", s=600, color="red", zorder=3,
                       label="linear probe")
        bcol = f"{prefix}_{k}"
        if bcol in ok and ok[bcol].notna().any():
            ax.axhline(float(ok[bcol].dropna().mean()), color="k", ls="--", lw=1,
                       label="mean baseline" if regression else "majority baseline")
        ax.set_xticks(np.arange(len(subsets)), subsets, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
    axes[0][0].legend(fontsize=7)
    n_test = sorted({int(v) for v in ok["n_test"].dropna()}) if "n_test" in ok else []
    seeds = sorted({int(v) for v in ok["n_seeds"].dropna()}) if "n_seeds" in ok else []
    facts = (f"n test = {'/'.join(map(str, n_test)) or '?'}; "
             + ("1 seed (no error bars)" if seeds == [1]
                else f"mean ± std over {'/'.join(map(str, seeds))} seeds"))
    fig.suptitle(f"{title}\n{facts}" if title else facts, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
