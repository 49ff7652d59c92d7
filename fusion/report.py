"""What a fit reports: its metrics.json / outputs, and side-by-side comparison of runs.

`_seed_metrics` / `_summarise` turn the trainer's per-fold predictions into metrics.json (seed
means, std, pooled confusion, the trivial baseline); `_write_outputs` writes a run folder.
The comparison half reads finished runs (Markdown for files, rich for the terminal).

Every score is shown as mean ± std over seeds next to its trivial baseline and the sizes it
was measured on, so a reader sees at once whether a difference is larger than seed noise
and whether the model beats predicting the majority class (or the mean).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusion import metrics as M

if TYPE_CHECKING:
    from fusion.config import FitConfig
    from fusion.data import FeatureSet
    from fusion.splits import Fold, Task

CLASSIFICATION_COLUMNS = (("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("uar", "UAR"))
# sentiment on CMU-MOSI / MOSEI's [-3, 3] scale: the metrics those papers report
SENTIMENT_COLUMNS = (("mae", "MAE"), ("corr", "corr"), ("acc2", "Acc-2"), ("acc7", "Acc-7"),
                     ("f1", "F1"))
# any other continuous target (valence, arousal on their own scales: IEMOCAP's 1..5, [-1, 1]
# ratings): sign and rounding to 7 integers mean nothing there; CCC is the field's metric
AFFECT_COLUMNS = (("mae", "MAE"), ("corr", "corr"), ("ccc", "CCC"))


def regression_columns(targets: Iterable[str | None]) -> tuple[tuple[str, str], ...]:
    """The metric columns shown for regression runs of these targets: the MOSI set for
    sentiment alone, MAE / corr / CCC for other targets, both for a mix."""
    kinds = {t == "sentiment" for t in targets}
    if kinds == {True}:
        return SENTIMENT_COLUMNS
    if kinds == {False}:
        return AFFECT_COLUMNS
    return AFFECT_COLUMNS + SENTIMENT_COLUMNS[2:]


def metric_columns(m: dict) -> tuple[tuple[str, str], ...]:
    """The metric columns of one run (its task and target)."""
    if m.get("task") == "regression":
        return regression_columns([m.get("target")])
    return CLASSIFICATION_COLUMNS


def fmt_pm(mean: float | None, std: float | None, digits: int = 3,
           n_seeds: int | None = None) -> str:
    """'0.812 ± 0.013' ('0.812 ± n/a' for one seed: no spread was measured; '—' when the
    value is missing)."""
    if mean is None:
        return "—"
    if n_seeds == 1 or std is None:
        return f"{mean:.{digits}f} ± n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def load_run(path: Path | str) -> dict:
    """metrics.json of a run directory (or the file itself), with `run` set to its path."""
    p = Path(path)
    f = p / "metrics.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{p} is not a run: no metrics.json")
    m = json.loads(f.read_text())
    m["run"] = str(f.parent)
    return m


def collect(runs: Iterable[Path | str]) -> list[dict]:
    """Metrics of each run; a directory without metrics.json (an ablation) adds its cells."""
    out = []
    for r in runs:
        p = Path(r)
        if p.is_dir() and not (p / "metrics.json").exists():
            cells = sorted(c for c in p.iterdir() if (c / "metrics.json").is_file())
            if not cells:
                raise FileNotFoundError(f"{p} holds no run (no metrics.json in it or below)")
            out += [load_run(c) for c in cells]
        else:
            out.append(load_run(p))
    return out


def run_row(m: dict) -> dict[str, Any]:
    """One display row: identity, sizes, mean ± std per metric, baseline."""
    regression = m.get("task") == "regression"
    cols = metric_columns(m)
    mean, std = m.get("mean", {}), m.get("std", {})
    row: dict[str, Any] = {
        "run": Path(m.get("run", "?")).name,
        "fusion": m.get("fusion", "?"),
        "modalities": "+".join(m.get("modalities", [])),
        # k-fold: the training rows of one fold (their mean) and the test rows of all folds
        "n train/test": (f"{m.get('n_train', '?')}/{m.get('n_test', '?')}" if (m.get("folds") or 1) <= 1
                         else f"{m.get('n_train', '?')} per fold / {m.get('n_test', '?')} in all"),
        "seeds": m.get("n_seeds", len(m.get("seeds", [])) or 1),
    }
    for key, label in cols:
        row[label] = fmt_pm(mean.get(key, m.get(key)), std.get(key), n_seeds=row["seeds"])
    base = m.get("mean_baseline" if regression else "majority_baseline") or {}
    name = "mean baseline" if regression else "majority"
    shown = [(k, label) for k, label in cols[:3] if k in base]
    row[f"{name} ({' / '.join(label for _, label in shown)})" if shown else name] = (
        " / ".join(f"{base[k]:.3f}" for k, _ in shown) or "—")
    probe = m.get("linear_probe") or {}
    head = m.get("headline")
    if probe:
        pk = [(k, label) for k, label in cols[:3] if k in probe]
        if head and head not in dict(pk) and head in probe:
            pk.append((head, head.replace("_", " ")))
        row[f"linear probe ({' / '.join(label for _, label in pk)})"] = (
            " / ".join(f"{probe[k]:.3f}" for k, _ in pk))
    if head and head not in dict(cols) and head in mean:
        row[head.replace("_", " ")] = fmt_pm(mean.get(head), std.get(head))
    kept = probe_kept(m)
    if kept:
        row["probe kept"] = kept
    below = [k for k, v in (m.get("below_baseline") or {}).items() if v]
    row["flag"] = f"below {', '.join(below)} ({head})" if below else ""
    return row


def probe_kept(m: dict) -> str:
    """'k/n': of the n (seed, fold) runs whose linear path started from the fold's probe, the k
    that kept it (no later epoch scored better on validation: the head *is* the probe there);
    '' for runs without a warm start (fusion/heads/linear.py). Runs that started from the
    time-window probe instead are not counted in k and are named after it: 'k/n, w from time
    windows'."""
    runs = [(e, w, t) for s in m.get("seeds", []) if isinstance(s, dict)
            for e, w, t in zip(s.get("best_epoch", []), s.get("warm_start", []),
                               s.get("window_start") or [False] * len(s.get("best_epoch", [])))]
    warm = [(e, t) for e, w, t in runs if w]
    if not warm:
        return ""
    kept = sum(e == 0 and not t for e, t in warm)
    windows = sum(t for _, t in warm)
    return f"{kept}/{len(warm)}" + (f", {windows} from time windows" if windows else "")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub Markdown table of dict rows (the keys of the first row are the columns)."""
    if not rows:
        return "_no runs_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def report(runs: list[Path]) -> str:
    """Markdown comparison of runs (classification and regression runs in separate tables)."""
    ms = collect(runs)
    parts = ["# mmemo run comparison\n"]
    for kind, title in (("classification", "Classification"), ("regression", "Regression")):
        group = [m for m in ms if (m.get("task") or "classification") == kind]
        if not group:
            continue
        base = "majority" if kind == "classification" else "mean baseline"
        cols = (CLASSIFICATION_COLUMNS if kind == "classification"
                else regression_columns(m.get("target") for m in group))
        parts.append(f"## {title}\n")
        parts.append(f"Scores are mean ± std over seeds; `{base}` gives "
                     f"{' / '.join(lbl for _, lbl in cols[:3])} of the trivial predictor.\n")
        parts.append(markdown_table([run_row(m) for m in group]))
        sets = sorted({f"{m.get('dataset')}/{m.get('preset')} ({m.get('feature_set')})"
                       for m in group})
        parts.append("Feature sets: " + ", ".join(sets) + "\n")
    notes = [f"- {Path(m['run']).name}: {w}" for m in ms for w in m.get("warnings", [])]
    if notes:
        parts.append("## Warnings\n\n" + "\n".join(notes) + "\n")
    return "\n".join(parts)


def print_table(df_or_rows: Any, title: str | None = None, console: Any = None) -> None:
    """Print a pandas DataFrame or a list of dict rows as a rich table."""
    from rich.console import Console
    from rich.table import Table

    if hasattr(df_or_rows, "to_dict"):
        rows = df_or_rows.to_dict(orient="records")
    else:
        rows = list(df_or_rows)
    table = Table(title=title, show_lines=False)
    cols = list(rows[0]) if rows else []
    for c in cols:
        table.add_column(str(c), overflow="fold")
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    (console or Console()).print(table)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


# --- metrics over folds and seeds ---------------------------------------------------------
def _scalar_keys(task: Task) -> tuple[str, ...]:
    if task.kind == "classification":
        return M.SCALAR_KEYS_CLASSIFICATION
    return M.SCALAR_KEYS_REGRESSION


def baseline_key(task_kind: str) -> str:
    """Name of the trivial baseline in metrics.json for a task kind."""
    return "majority_baseline" if task_kind == "classification" else "mean_baseline"


def _score(task: Task, y: np.ndarray, pred: np.ndarray) -> dict:
    if task.kind == "classification":
        return M.classification_metrics(y, pred.argmax(-1), task.n_out, task.classes)
    return M.regression_metrics(y, pred)


def _aux_score(task: Task, y: np.ndarray, outs: list[dict], k: str) -> dict:
    """A head's per-branch (e.g. unimodal) predictions scored on the rows where it had input."""
    pred = np.concatenate([o["aux"][k][0] for o in outs])
    present = np.concatenate([o["aux"][k][1] for o in outs])
    keys = ("accuracy", "macro_f1", "uar") if task.kind == "classification" else ("mae", "corr")
    scored = _score(task, y[present], pred[present]) if present.any() else {}
    return {s: float(scored.get(s, 0.0)) for s in keys} | {"n": int(present.sum())}


def _seed_metrics(seed: int, outs: list[dict], task: Task) -> dict:
    """One seed's metrics on the test rows pooled over folds (each row predicted once)."""
    y = np.concatenate([task.y[o["fold"].test] for o in outs])
    pred = np.concatenate([o["pred"] for o in outs])
    m = _score(task, y, pred)
    if task.kind == "classification":
        base = np.concatenate([np.full(len(o["fold"].test),
                                       M.majority_class(task.y[o["fold"].train], task.n_out))
                               for o in outs])
        b = M.classification_metrics(y, base, task.n_out)
        m["majority_baseline"] = {k: b[k] for k in ("accuracy", "macro_f1", "weighted_f1",
                                                     "uar")}
    else:
        base = np.concatenate([np.full(len(o["fold"].test), float(np.mean(task.y[o["fold"].train])))
                               for o in outs])
        b = M.regression_metrics(y, base)
        m["mean_baseline"] = {k: b[k] for k in M.SCALAR_KEYS_REGRESSION}
    aux_keys = outs[0]["aux"].keys() if all(o["aux"] for o in outs) else []
    if aux_keys:
        m["aux"] = {k: _aux_score(task, y, outs, k) for k in aux_keys}
    if len(outs) > 1:
        m["folds"] = [{k: v for k, v in _score(task, task.y[o["fold"].test], o["pred"]).items()
                       if k in _scalar_keys(task)} for o in outs]
    m["seed"] = seed
    m["best_epoch"] = [o["best_epoch"] for o in outs]
    m["epochs_run"] = [o["epochs_run"] for o in outs]
    # per fold: the linear path started from the fold's probe (best_epoch 0: the probe was kept)
    m["warm_start"] = [bool(o.get("warm_start")) for o in outs]
    # per fold: the path started from the probe of the pooled and time-window columns instead
    # (a sequence head, when that probe beat the pooled one on validation beyond chance)
    m["window_start"] = [o.get("start") == "window probe" for o in outs]
    return m


def _summarise(per_seed: list[dict], task: Task, fs: FeatureSet, mods: list[str], fusion: str,
               plan: list[Fold], split: str, warnings: list[str]) -> dict:
    """metrics.json: seed means at top level, mean/std, pooled confusion, each seed's metrics."""
    keys = _scalar_keys(task)
    agg = M.aggregate(per_seed, keys)
    out: dict[str, Any] = {
        "feature_set": fs.key, "dataset": fs.attrs.get("dataset"), "preset": fs.attrs.get("preset"),
        "fusion": fusion, "modalities": mods, "target": task.target, "task": task.kind,
        "split": split, "folds": len(plan),
        **agg["mean"], "mean": agg["mean"], "std": agg["std"],
        baseline_key(task.kind): per_seed[0][baseline_key(task.kind)],
        "n_train": int(round(np.mean([len(f.train) for f in plan]))),
        "n_val": int(round(np.mean([len(f.val) for f in plan]))),
        "n_test": int(sum(len(f.test) for f in plan)),
        "n_seeds": len(per_seed),
        "warnings": list(warnings),
    }
    if task.kind == "classification":
        out |= _class_summary(per_seed, task, plan)
    if "aux" in per_seed[0]:
        out["aux"] = {k: M.aggregate([s["aux"][k] for s in per_seed])["mean"]
                      | {"n": per_seed[0]["aux"][k]["n"]} for k in per_seed[0]["aux"]}
    out["seeds"] = per_seed
    return out


def _class_summary(per_seed: list[dict], task: Task, plan: list[Fold]) -> dict:
    """Confusion matrices and per-class scores that cannot be misread as counts over seeds.

    `confusion` is the mean over seeds of each seed's test confusion matrix (each row sums
    to that class's test support; each seed's own matrix is under `seeds[i].confusion`);
    `confusion_normalised` is its row-normalised form (recall on the diagonal). `per_class`
    precision / recall / F1 are means over seeds, and `support` is the test count, counted
    once. `support_by_split` gives per-class counts of train, val and test (test: every test
    row once; train / val: the mean over folds for k-fold).
    """
    k = len(task.classes)
    cms = np.stack([np.asarray(s["confusion"], dtype=np.float64) for s in per_seed])
    mean_cm = cms.mean(axis=0)
    norm = mean_cm / np.maximum(mean_cm.sum(axis=1, keepdims=True), 1e-12)
    per_class = {}
    for c in task.classes:
        rows = [s["per_class"][c] for s in per_seed]
        per_class[c] = {key: float(np.mean([r[key] for r in rows]))
                        for key in ("precision", "recall", "f1")}
        per_class[c]["support"] = int(rows[0]["support"])

    def counts(idx: np.ndarray) -> np.ndarray:
        return np.bincount(task.y[idx].astype(np.int64), minlength=k)[:k]

    support = {
        "train": np.mean([counts(f.train) for f in plan], axis=0),
        "val": np.mean([counts(f.val) for f in plan], axis=0),
        "test": np.sum([counts(f.test) for f in plan], axis=0),
    }
    by_split = {sp: {c: (int(v[i]) if float(v[i]).is_integer() else round(float(v[i]), 1))
                     for i, c in enumerate(task.classes)} for sp, v in support.items()}
    n = len(per_seed)
    return {
        "classes": task.classes, "per_class": per_class,
        "confusion": np.round(mean_cm, 3).tolist(),
        "confusion_normalised": np.round(norm, 4).tolist(),
        "support_by_split": by_split,
        "aggregation": (f"confusion: mean over {n} seed(s) of each seed's test confusion "
                        "(rows: true class, sums = test support; per seed: seeds[i].confusion); "
                        "per_class: precision/recall/F1 mean over seeds, support = test count once; "
                        "support_by_split: train/val mean over folds, test every row once"),
    }


# --- outputs --------------------------------------------------------------------------------
def _write_outputs(run_dir: Path, metrics: dict, logs: list[dict], first: tuple | None,
                   task: Task, fs: FeatureSet, mods: list[str], fusion: str, cfg: FitConfig,
                   run: dict) -> None:
    """metrics.json, config.toml (`cfg` and the `run` facts), log.csv, model / norm
    safetensors (the first seed's), confusion.png."""
    from safetensors.torch import save_file

    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    cfg.to_toml(run_dir / "config.toml", **run)
    with (run_dir / "log.csv").open("w", newline="") as fh:
        # start (epoch 0 of a warm start): "probe" or "window probe"; window_probe_p: the
        # departure test of the window probe against the pooled one, when it was run
        w = csv.DictWriter(fh, ["seed", "fold", "epoch", "train_loss", "val_loss", "val_metric",
                                "epoch_s", "start", "window_probe_p"])
        w.writeheader()
        w.writerows(logs)
    if first is not None:
        state, stats = first
        meta = {"fusion": fusion, "modalities": json.dumps(mods), "feature_set": fs.key,
                "classes": json.dumps(task.classes), "target": task.target,
                "seed": str(metrics["seeds"][0]["seed"])}
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                  str(run_dir / "model.safetensors"), metadata=meta)
        save_file({k: v.detach().cpu().contiguous() for k, v in stats.items()},
                  str(run_dir / "norm.safetensors"), metadata=meta)
    if task.kind == "classification":
        n_test, seeds = metrics["n_test"], metrics["seeds"]
        what = f"{fusion} · {'+'.join(mods)}\nn test = {n_test}"
        mean = "1 seed" if len(seeds) == 1 else f"mean of {len(seeds)} seeds"
        mean_cm = np.asarray(metrics["confusion"])
        plot_confusion(mean_cm, task.classes, run_dir / "confusion.png",
                       title=f"{what} · {mean} · counts")
        plot_confusion(mean_cm, task.classes, run_dir / "confusion_normalised.png",
                       title=f"{what} · {mean} · row-normalised", normalise=True)
        if len(seeds) > 1:
            for s in seeds:
                plot_confusion(np.asarray(s["confusion"]), task.classes,
                               run_dir / f"confusion_seed{s['seed']}.png",
                               title=f"{what} · seed {s['seed']} · counts")


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "",
                   normalise: bool = False) -> None:
    """A confusion matrix coloured by row fraction, annotated with counts (a mean over seeds
    may be fractional) or, with `normalise`, with the row fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4.2, 1.0 + 0.6 * k), max(3.6, 1.2 + 0.6 * k)), dpi=100)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            v = cm[i, j]
            txt = (f"{frac[i, j]:.2f}" if normalise else
                   str(int(v)) if float(v).is_integer() else f"{v:.1f}")
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
