"""Terminal side of `mmemo extract`: per-clip progress and the summary.

In a terminal: a rich bar (clips done / total, rate, ETA, failures so far). When stdout is not
a terminal (a batch job's log file): one plain timestamped line every MMEMO_PROGRESS_EVERY
seconds (default 30) with the same numbers. The rate is always this run's clips over this
run's time, the same number the summary reports.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter as ClipTally
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from pipeline import cacheformat as cachefmt
from pipeline.runner import Summary, plan_extract, run_extract
from pipeline.store import Store

DEFAULT_EVERY = 30.0


def progress_every() -> float:
    """Seconds between plain progress lines: $MMEMO_PROGRESS_EVERY (default 30)."""
    raw = os.environ.get("MMEMO_PROGRESS_EVERY")
    if not raw:
        return DEFAULT_EVERY
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"MMEMO_PROGRESS_EVERY={raw!r}: expected a number of seconds") from None
    if v <= 0:
        raise ValueError(f"MMEMO_PROGRESS_EVERY={raw!r}: must be > 0 seconds")
    return v


def _dur(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Counter:
    """Clips done / failed this run, thread-safe; what the bar and the lines show."""

    def __init__(self, total: int, already: int):
        self.total, self.already = total, already
        self.done = 0
        self.failed = 0
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    def add(self, n: int, n_failed: int) -> None:
        with self._lock:
            self.done += n
            self.failed += n_failed

    def reused(self, n: int) -> None:
        """n clips copied from another set: finished, but not this run's work (not in the rate)."""
        with self._lock:
            self.already += n

    def rate(self) -> float | None:
        dt = time.perf_counter() - self.t0
        return self.done / dt if self.done > 0 and dt > 0 else None

    def line(self) -> str:
        with self._lock:
            done, failed = self.already + self.done, self.failed
        rate = self.rate()
        left = max(0, self.total - done)
        eta = _dur(left / rate) if rate else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        rate_s = f"{rate:.2f} clips/s" if rate else "-- clips/s"
        return (f"{done}/{self.total} clips ({pct:.0f}%), {rate_s}, eta {eta}, "
                f"{failed} failed so far, elapsed {_dur(time.perf_counter() - self.t0)}")


class RateColumn(TextColumn):
    """This run's clips over this run's time (rich's own speed is a moving window)."""

    def __init__(self, counter: Counter) -> None:
        super().__init__("")
        self.counter = counter

    def render(self, task: Any):  # noqa: ANN201 - rich's type
        from rich.text import Text

        rate = self.counter.rate()
        left = max(0, self.counter.total - self.counter.already - self.counter.done)
        eta = _dur(left / rate) if rate else "?"
        txt = f"{rate:.2f} clips/s" if rate else "-- clips/s"
        return Text(f"{txt}  eta {eta}  {self.counter.failed} failed", style="cyan")


def _done_clips(store: Store, key: str) -> int:
    if not store.has_set(key):
        return 0
    return int(store.open(key).completed_rows().sum())


def extract_with_progress(
    dataset: str,
    root: Path | None,
    cache: Path | None,
    preset: str,
    overrides: list[str],
    workers: int,
    scheduler: str | None,
    executor: str,
    batch_size: int | None,
    device: str,
    force: bool,
    limit: int | None,
    manifests: Path,
    console: Console,
    units: list[int] | None = None,
    terminal: bool | None = None,
) -> Summary:
    every = progress_every()
    plan = plan_extract(dataset, root, preset, overrides, manifests, device=device, limit=limit)
    store = Store(cache)
    console.print(
        f"[bold]{escape(dataset)}[/bold]: {len(plan.clips)} clips, {plan.layout.n_units} units of "
        f"{plan.layout.unit_size}, preset [bold]{escape(plan.preset_name)}[/bold] → "
        f"{escape(str(store.root / cachefmt.SETS / plan.key))}", soft_wrap=True
    )
    terminal = console.is_terminal if terminal is None else terminal
    total = len(plan.clips)
    counter = Counter(total, 0 if force else _done_clips(store, plan.key))

    def notify(line: str) -> None:
        console.print(f"[yellow]{escape(line)}[/yellow]", soft_wrap=True)

    if terminal:
        with Progress(
            TextColumn("[bold]extract[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(counter),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as prog:
            task = prog.add_task("clips", total=total, completed=counter.already)

            def on_clips(n: int, n_failed: int) -> None:
                counter.add(n, n_failed)
                prog.update(task, completed=counter.already + counter.done)

            def on_reused(n: int) -> None:
                counter.reused(n)
                prog.update(task, completed=counter.already + counter.done)

            summary = run_extract(
                plan, cache=store.root, workers=workers, scheduler=scheduler, executor=executor,
                force=force, units=units, batch_size=batch_size, on_clips=on_clips, notify=notify,
                on_reused=on_reused,
            )
    else:
        stop = threading.Event()

        def say() -> None:
            stamp = datetime.now().astimezone().isoformat(timespec="seconds")
            print(f"{stamp} extract {dataset}: {counter.line()}", flush=True)

        def ticker() -> None:
            while not stop.wait(every):
                say()

        say()
        th = threading.Thread(target=ticker, daemon=True, name="mmemo-progress-lines")
        th.start()
        try:
            summary = run_extract(
                plan, cache=store.root, workers=workers, scheduler=scheduler, executor=executor,
                force=force, units=units, batch_size=batch_size, on_clips=counter.add, notify=notify,
                on_reused=counter.reused,
            )
        finally:
            stop.set()
            th.join(timeout=2)
        say()
    print_summary(summary, store, console, rate=counter.rate())
    return summary


def failure_line(f: dict[str, Any]) -> str:
    """A ledger row as a person reads it: clip id, stage, the media file unless the message
    already names it, and the reason."""
    where = f"{f['id']} [{f['stage']}]"
    file, msg = f.get("file"), str(f.get("message", ""))
    if file and str(file) not in msg:
        where += f" {file}"
    if f.get("error") not in (None, "ClipError"):
        msg = f"{f['error']}: {msg}"
    return f"{where}: {msg}"


def set_overview(store: Store, key: str, ledger: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole set as it stands: clips in finished units, per-modality present counts over
    them, and the ledger's failed clips (every run, not just this one; `ledger`: the rows
    already read, else they are read here)."""
    import zarr

    fs = store.open(key)
    done = fs.completed_rows()
    group = zarr.open_group(fs.path, mode="r")
    present = {m: int((np.asarray(group[cachefmt.present(m)][:], bool) & done).sum())
               for m in fs.layout.modalities}
    ledger = fs.failures() if ledger is None else ledger
    return {"n": fs.layout.n, "done_clips": int(done.sum()), "done_units": len(fs.done_units()),
            "units": fs.layout.n_units, "present": present,
            "failed_clips": len({r.get("id") for r in ledger}), "path": fs.path}


def print_summary(summary: Summary, store: Store, console: Console, rate: float | None = None) -> None:
    ov = set_overview(store, summary.key, summary.set_failures)  # run_extract read the ledger
    t = Table(title=f"extract summary — {summary.dataset} ({summary.key})")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("clips in the set / in finished units", f"{ov['n']} / {ov['done_clips']}")
    t.add_row("units done now / skipped (already done)", f"{summary.done} / {summary.skipped}")
    if summary.reused:
        t.add_row(f"units copied from {summary.reused_from} (same features, other labels)",
                  str(summary.reused))
    t.add_row("units finished in the set", f"{ov['done_units']} / {ov['units']}")
    t.add_row("clips with a failure (this run / whole set)", f"{summary.n_failed_clips} / {ov['failed_clips']}")
    for stage, n in ClipTally(f["stage"] for f in summary.failures).most_common():
        t.add_row(f"  failed at {stage} (this run)", str(n))
    for mod, n_present in ov["present"].items():
        n_done = ov["done_clips"]
        if n_done == 0:
            value = "no finished clips"
        elif n_present == 0:
            value = f"absent for all {n_done} clips"
        elif n_present == n_done:
            value = f"present for all {n_done} clips"
        else:
            value = f"present {n_present}, absent {n_done - n_present}"
        t.add_row(f"modality '{mod}'", value)
    for s, n in summary.statuses.most_common(8):
        t.add_row(f"status {s} (this run)", str(n))
    for stage, sec in summary.stage_seconds.most_common():
        t.add_row(f"time in {stage} (this run)", f"{sec:.1f} s")
    t.add_row("wall time (this run)", f"{summary.seconds:.1f} s")
    if summary.done and rate is not None:
        t.add_row("clips/s (this run; as the progress shows)", f"{rate:.2f}")
    console.print(t)
    this_run = {f["id"] for f in summary.failures}
    rows = [(f, "") for f in summary.failures] + [
        (f, " (recorded by an earlier run; its unit is finished, `--force` retries it)")
        for f in summary.set_failures if f["id"] not in this_run]
    for f, note in rows[:10]:
        console.print("[red]error:[/red] " + escape(failure_line(f) + note), soft_wrap=True)
    if len(rows) > 10:
        console.print(f"[red]error:[/red] ... {len(rows) - 10} more failures in the ledger", soft_wrap=True)
    path = Path(ov["path"])
    console.print(f"feature set: {path}", markup=False, soft_wrap=True)
    console.print(f"subtitles (.srt, .asr.srt, .text.json): {store.srt_dir / summary.key}",
                  markup=False, soft_wrap=True)
    console.print(f"failure ledger (one .jsonl per unit): {path / cachefmt.LEDGER}",
                  markup=False, soft_wrap=True)
