"""Side-by-side comparison of finished runs (Markdown for files, rich for the terminal).

Every score is shown as mean ± std over seeds next to its trivial baseline and the sizes it
was measured on, so a reader sees at once whether a difference is larger than seed noise
and whether the model beats predicting the majority class (or the mean).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CLASSIFICATION_COLUMNS = (("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("uar", "UAR"))
REGRESSION_COLUMNS = (("mae", "MAE"), ("corr", "corr"), ("acc2", "Acc-2"), ("acc7", "Acc-7"),
                      ("f1", "F1"))


def fmt_pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    """'0.812 ± 0.013' (or '—' when the value is missing)."""
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std or 0.0:.{digits}f}"


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
    cols = REGRESSION_COLUMNS if regression else CLASSIFICATION_COLUMNS
    mean, std = m.get("mean", {}), m.get("std", {})
    row: dict[str, Any] = {
        "run": Path(m.get("run", "?")).name,
        "fusion": m.get("fusion", "?"),
        "modalities": "+".join(m.get("modalities", [])),
        "n train/test": f"{m.get('n_train', '?')}/{m.get('n_test', '?')}",
        "seeds": m.get("n_seeds", len(m.get("seeds", [])) or 1),
    }
    for key, label in cols:
        row[label] = fmt_pm(mean.get(key, m.get(key)), std.get(key))
    base = m.get("mean_baseline" if regression else "majority_baseline") or {}
    name = "mean baseline" if regression else "majority"
    shown = [(k, label) for k, label in cols[:3] if k in base]
    row[f"{name} ({' / '.join(label for _, label in shown)})" if shown else name] = (
        " / ".join(f"{base[k]:.3f}" for k, _ in shown) or "—")
    return row


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
        cols = CLASSIFICATION_COLUMNS if kind == "classification" else REGRESSION_COLUMNS
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
