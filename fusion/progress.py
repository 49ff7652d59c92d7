"""Progress of `mmemo fit` (per epoch) and `mmemo ablate` (per cell) for a person watching.

On a terminal: a rich bar whose text names where the run is (seed, fold, epoch, loss,
validation metric; or the current cell). Elsewhere (a batch job's log file): plain
timestamped lines, not too chatty — the first epoch, the end of each (seed, fold) run, and
in between at most one line per `every_s` seconds.
"""

from __future__ import annotations

import time
from typing import Any

_NAMES = {"macro_f1": "macro F1", "weighted_f1": "weighted F1", "mae": "MAE", "accuracy": "accuracy",
          "uar": "UAR", "corr": "corr", "ccc": "CCC", "acc2": "Acc-2", "acc7": "Acc-7"}


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


class _Bar:
    """A rich progress bar on a terminal, or throttled plain lines elsewhere."""

    def __init__(self, console: Any, total: float, label: str, every_s: float = 10.0,
                 terminal: bool | None = None):
        self.console, self.every_s = console, every_s
        self.terminal = console.is_terminal if terminal is None else terminal
        self.last = -float("inf")
        self.bar = None
        if self.terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed:.0f}/{task.total:.0f}"),
                                TimeElapsedColumn(), console=console, transient=True)
            self.task = self.bar.add_task(label, total=total)
            self.bar.start()

    def update(self, text: str, completed: float, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text, completed=completed)
            return
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            self.console.print(f"{_stamp()} {text}", soft_wrap=True, markup=False,
                               highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class FitProgress:
    """`fit(..., progress=FitProgress(console))`: a bar over epochs of every (seed, fold) run
    (early stopping moves it to the end of the run), or one line per `every_s` seconds."""

    def __init__(self, console: Any, every_s: float = 10.0, terminal: bool | None = None):
        self.console, self.every_s, self.terminal = console, every_s, terminal
        self.bar: _Bar | None = None

    def __call__(self, ev: dict) -> None:
        runs, epochs = ev["runs"], ev["epochs"]
        if self.bar is None:
            self.bar = _Bar(self.console, runs * epochs, "fit", self.every_s, self.terminal)
        default = "macro_f1" if ev.get("task") == "classification" else "mae"
        name = str(ev.get("metric", default))
        metric = "val " + _NAMES.get(name, name.replace("_", " "))
        value = ev["val_metric"]
        where = f"seed {ev['seed']}" + (f" fold {ev['fold'] + 1}/{ev['folds']}"
                                         if ev.get("folds", 1) > 1 else "")
        text = (f"run {ev['run']}/{runs} ({where}) epoch {ev['epoch']}/{epochs}: "
                f"train loss {ev['train_loss']:.4f}, val loss {ev['val_loss']:.4f}, "
                f"{metric} {value:.4f}")
        done = (ev["run"] - 1) * epochs + ev["epoch"]
        if ev["event"] == "end":
            text = (f"run {ev['run']}/{runs} ({where}) stopped after epoch {ev['epoch']}/{epochs}"
                    f", best epoch {ev['best_epoch']}; last {metric} {value:.4f}")
            done = ev["run"] * epochs
        self.bar.update(text, done, force=ev["event"] == "end" or ev["epoch"] == 1)
        if ev["event"] == "end" and ev["run"] == runs:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CellProgress:
    """`ablate(..., progress=CellProgress(console))`: a bar over the grid's cells naming the
    current one; in a log, one line as each cell starts (inline) or finishes."""

    def __init__(self, console: Any, terminal: bool | None = None):
        self.console, self.terminal = console, terminal
        self.bar: _Bar | None = None

    def __call__(self, ev: dict) -> None:
        total = ev["total"]
        if self.bar is None:
            self.bar = _Bar(self.console, total, "ablate", 0.0, self.terminal)
        if ev["event"] == "start":
            text = f"cell {ev['index']}/{total}: {ev['cell']} running"
        else:
            status = f"failed: {ev['error']}" if ev.get("error") else "done"
            text = f"cell {ev['index']}/{total}: {ev['cell']} {status}"
        self.bar.update(text, ev["done"], force=True)
        if ev["event"] == "end" and ev["done"] == total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
