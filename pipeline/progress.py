"""Terminal side of `mmemo extract`: a rich progress bar (clips/s, ETA) and a summary table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline.runner import Summary, plan_extract, run_extract
from pipeline.store import Store


class RateColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Any):  # noqa: ANN201 - rich's type
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} clips/s" if speed else "-- clips/s", style="cyan")


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
) -> Summary:
    plan = plan_extract(dataset, root, preset, overrides, manifests, device=device, limit=limit)
    store = Store(cache)
    console.print(
        f"[bold]{dataset}[/bold]: {len(plan.clips)} clips, {plan.layout.n_units} units of "
        f"{plan.layout.unit_size}, preset [bold]{plan.preset_name}[/bold] → {store.root}/sets/{plan.key}"
    )
    with Progress(
        TextColumn("[bold]extract[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as prog:
        task = prog.add_task("clips", total=len(plan.clips) if units is None else None)

        def on_unit(res: Any, n: int) -> None:
            prog.advance(task, n)

        summary = run_extract(
            plan, cache=store.root, workers=workers, scheduler=scheduler, executor=executor,
            force=force, units=units, batch_size=batch_size, progress=on_unit,
        )
        prog.update(task, completed=len(plan.clips))
    print_summary(summary, store, console)
    return summary


def print_summary(summary: Summary, store: Store, console: Console) -> None:
    fs = store.open(summary.key)
    t = Table(title=f"extract summary — {summary.dataset} ({summary.key})")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("clips", str(summary.n_clips))
    t.add_row("units done now / skipped (already done)", f"{summary.done} / {summary.skipped}")
    t.add_row("clips with a failure (this run)", str(summary.n_failed_clips))
    for stage, n in Counter(f["stage"] for f in summary.failures).most_common():
        t.add_row(f"  failed at {stage}", str(n))
    for mod in fs.layout.modalities:
        t.add_row(f"modality '{mod}' absent", str(summary.absent.get(mod, 0)))
    for s, n in summary.statuses.most_common(8):
        t.add_row(f"status {s}", str(n))
    for stage, sec in summary.stage_seconds.most_common():
        t.add_row(f"time in {stage}", f"{sec:.1f} s")
    t.add_row("wall time", f"{summary.seconds:.1f} s")
    if summary.seconds > 0 and summary.done:
        t.add_row("clips/s", f"{summary.n_clips / summary.seconds:.2f}")
    console.print(t)
    for f in summary.failures[:10]:
        console.print("[yellow]ledger[/yellow] " + escape(f"{f['id']} [{f['stage']}] {f['error']}: {f['message']}"))
    if len(summary.failures) > 10:
        console.print(f"[yellow]... {len(summary.failures) - 10} more in {fs.path}/ledger/[/yellow]")
