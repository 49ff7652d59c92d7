"""The runner: a `Plan` (pipeline/plan.py) → work units → stages → one committed chunk per
array per unit.

Stages know nothing of scheduling; this module does all of it (datatrove's split between
pipeline steps and executors):
- `run_extract` creates (or joins) the plan's set, then runs every unfinished unit on an
  executor: in-process, a local process pool, or Dask (a LocalCluster, or `--scheduler ADDR`).
- `run_unit` is the task (a `UnitTask`): claim the unit, decode clips in a thread pool that
  runs ahead of the model stages (so CPU decoding overlaps GPU work), run the stages batch by
  batch, then commit the unit's arrays, its ledger lines and, last, its completion marker.
A rerun skips finished units; a killed run loses at most its in-flight units, whose claims
expire and are taken over.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cacheformat as cachefmt
from pipeline.cacheformat import SetLayout
from pipeline.manifest import Clip
from pipeline.plan import (  # noqa: F401 - plan_extract, resolve_unit_size: re-exported for callers
    CODE_VERSION,
    TARGETS,
    Plan,
    build_stages,
    plan_extract,
    resolve_unit_size,
    static_arrays,
)
from pipeline.presets import Preset, RunSettings, load_preset
from pipeline.stages.base import (
    ClipContext,
    ClipError,
    Feature,
    ModelMissingError,
    Stage,
    pad_or_pool,
)
from pipeline.store import Store

# --- the unit task ---------------------------------------------------------------------------
_STAGE_CACHE: dict[str, list[Stage]] = {}


def _stages_for(preset: Preset | dict[str, Any], device: str, info: dict[str, Any] | None = None,
                timings: dict[str, float] | None = None) -> list[Stage]:
    """Stages are built and their models loaded once per worker process; the unit that pays
    for it gets the seconds as `timings["startup"]` (imports + model loads), the others nothing."""
    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    k = hashlib.sha256(json.dumps([preset.data, device, info], sort_keys=True, default=str).encode()).hexdigest()
    if k not in _STAGE_CACHE:
        t0 = time.perf_counter()
        stages = build_stages(preset, device=device, info=info)
        for s in stages:
            s.ensure_loaded()
        _STAGE_CACHE[k] = stages
        if timings is not None:
            timings["startup"] = timings.get("startup", 0.0) + time.perf_counter() - t0
    return _STAGE_CACHE[k]


@dataclass(frozen=True)
class UnitTask:
    """One work unit to run: plain picklable data, so any executor (process pool, Dask) can ship it.

    Unpickling does not validate, so the worker re-validates what crossed the process boundary:
    the clips (kept as JSON data, `Clip.model_dump(mode="json")`) and the preset's tables.
    """

    cache: str
    key: str
    unit: int
    root: str
    clips: list[dict[str, Any]]
    preset: Preset
    info: dict[str, Any]
    lease: float  # seconds the unit's claim lasts
    device: str = "cpu"
    batch_size: int | None = None  # overrides the preset's run.batch_size
    threads: int | None = None  # torch threads in the worker


@dataclass
class UnitResult:
    unit: int
    status: str  # done | skipped | busy | lost
    n: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    absent: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _fail_row(ctx: ClipContext, stage: str, err: BaseException) -> dict[str, Any]:
    return {
        "id": ctx.id,
        "stage": stage,
        "error": type(err).__name__,
        "message": str(err) or type(err).__name__,
        "file": ctx.clip.media,
    }


def _decode_all(decode: Stage, ctxs: list[ClipContext], workers: int) -> list[cf.Future]:
    """Start decoding every clip of the unit on daemon threads that run ahead of the models.

    Daemon threads, not a ThreadPoolExecutor: a decode that hangs past clip_timeout is given
    up on, and must not keep the process from exiting.
    """
    futs: list[cf.Future] = [cf.Future() for _ in ctxs]
    q: queue.Queue = queue.Queue()
    for item in zip(ctxs, futs):
        q.put(item)

    def worker() -> None:
        while True:
            try:
                ctx, fut = q.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                decode.process_one(ctx)
                fut.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting side
                fut.set_exception(e)

    for _ in range(max(1, workers)):
        threading.Thread(target=worker, daemon=True, name="mmemo-decode").start()
    return futs


def _assemble(layout: SetLayout, ctxs: list[ClipContext], failures: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-unit arrays from the clips' features; non-finite features become absent + a ledger line."""
    n = len(ctxs)
    data: dict[str, np.ndarray] = {}
    for name, m in layout.modalities.items():
        pooled = np.zeros((n, m.pooled_dim), np.float16)
        present = np.zeros(n, bool)
        seq = np.zeros((n, m.max_len, m.seq_dim), np.float16) if m.is_sequence else None
        lens = np.zeros(n, np.int32) if m.is_sequence else None
        for i, ctx in enumerate(ctxs):
            f: Feature | None = ctx.features.get(name)
            if f is None:
                continue
            p = np.asarray(f.pooled, np.float32).reshape(-1)
            problem = None
            if p.shape[0] != m.pooled_dim:
                problem = f"pooled dim {p.shape[0]} != {m.pooled_dim}"
            elif not np.isfinite(p).all() or np.abs(p).max(initial=0) > 65000:
                problem = "NaN/Inf (or beyond float16 range) in pooled features"
            s = None
            if m.is_sequence and problem is None:
                if f.seq is None or len(f.seq) == 0:
                    problem = "empty sequence"
                else:
                    s = np.asarray(f.seq, np.float32)
                    if s.ndim != 2 or s.shape[1] != m.seq_dim:
                        problem = f"sequence shape {s.shape} != [t, {m.seq_dim}]"
                    elif not np.isfinite(s).all() or np.abs(s).max(initial=0) > 65000:
                        problem = "NaN/Inf (or beyond float16 range) in sequence features"
            if problem:
                failures.append({"id": ctx.id, "stage": name, "error": "BadFeatures", "message": problem, "file": ctx.clip.media})
                ctx.absent[name] = problem
                continue
            pooled[i] = p.astype(np.float16)
            present[i] = True
            if m.is_sequence and s is not None:
                arr, ln = pad_or_pool(s, m.max_len)
                seq[i] = arr.astype(np.float16)
                lens[i] = ln
        data[cachefmt.pooled(name)] = pooled
        data[cachefmt.present(name)] = present
        if m.is_sequence:
            data[cachefmt.seq(name)] = seq
            data[cachefmt.length(name)] = lens
    return data


def process_clips(
    stages: list[Stage],
    ctxs: list[ClipContext],
    run: RunSettings | None = None,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run every stage over the clips; returns ledger rows. ModelMissingError propagates."""
    run = run if run is not None else RunSettings()
    batch_size, clip_timeout = run.batch_size, run.clip_timeout
    timings = timings if timings is not None else {}
    failures: list[dict[str, Any]] = []
    decode = stages[0] if stages and stages[0].name == "decode" else None
    rest = stages[1:] if decode else stages
    # transcript-only clips (no media in the manifest) are text/metadata data by design,
    # not failures: they skip decode and their media modalities are absent with a reason
    for c in ctxs:
        if c.clip.media is None:
            c.status["decode"] = "no media in the manifest"
            c.failed["decode"] = "no media"
    futs = _decode_all(decode, [c for c in ctxs if c.clip.media is not None], run.decode_workers) if decode else None
    if futs is not None:
        it = iter(futs)
        futs = [next(it) if c.clip.media is not None else None for c in ctxs]
    for b0 in range(0, len(ctxs), max(1, batch_size)):
        batch = ctxs[b0 : b0 + batch_size]
        if futs is not None:
            t0 = time.perf_counter()
            for ctx, fut in zip(batch, futs[b0 : b0 + batch_size]):
                if fut is None:
                    continue
                try:
                    fut.result(timeout=clip_timeout)
                except cf.TimeoutError:
                    err = ClipError(f"decoding took longer than clip_timeout={clip_timeout:g}s; clip skipped")
                    ctx.media = None
                    ctx.failed["decode"] = str(err)
                    failures.append(_fail_row(ctx, "decode", err))
                except Exception as e:  # noqa: BLE001 - per-clip isolation
                    ctx.media = None
                    ctx.failed["decode"] = str(e)
                    failures.append(_fail_row(ctx, "decode", e))
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
        for stage in rest:
            needs_media = stage.needs_media
            ok = [c for c in batch if c.media is not None and "decode" not in c.failed]
            todo = ok if needs_media else list(batch)
            for c in batch:
                if needs_media and c not in ok:
                    why = "no media in the manifest" if c.clip.media is None else "media could not be decoded"
                    for mod in stage.output_dims():
                        c.absent.setdefault(mod, why)
            if not todo:
                continue
            t0 = time.perf_counter()
            try:
                errors = stage.process(todo)
            except ModelMissingError:
                raise
            except Exception as e:  # noqa: BLE001 - a batch-level crash: fail each clip
                errors = [e] * len(todo)
            timings[stage.name] = timings.get(stage.name, 0.0) + time.perf_counter() - t0
            for ctx, err in zip(todo, errors):
                if err is None:
                    continue
                if isinstance(err, ModelMissingError):
                    raise err
                ctx.failed[stage.name] = str(err)
                failures.append(_fail_row(ctx, stage.name, err))
                for mod in stage.output_dims():
                    ctx.features.pop(mod, None)
                    ctx.absent.setdefault(mod, f"{stage.name} failed: {err}")
    return failures


def run_unit(task: UnitTask) -> UnitResult:
    """One work unit, end to end."""
    t_start = time.perf_counter()
    store = Store(task.cache)
    u = task.unit
    fs = store.open(task.key)
    if fs.is_done(u):  # --force clears markers before any task is made
        return UnitResult(u, "skipped")
    claim = store.claim(task.key, u, lease_s=task.lease)
    if claim is None:
        return UnitResult(u, "busy")
    try:
        if fs.is_done(u):
            return UnitResult(u, "skipped")
        if task.threads:
            _limit_threads(task.threads)
        preset = load_preset(task.preset.data)
        timings: dict[str, float] = {}
        stages = _stages_for(preset, task.device, task.info, timings)
        root = Path(task.root)
        ctxs = [ClipContext(clip=Clip.model_validate(c), root=root) for c in task.clips]
        run = preset.run
        if task.batch_size:
            run = run.model_copy(update={"batch_size": task.batch_size})
        failures = process_clips(stages, ctxs, run, timings=timings)
        data = _assemble(fs.layout, ctxs, failures)
        from pipeline.stages.asr import compose_srt, dumps_record
        from pipeline.store import atomic_write

        for ctx in ctxs:
            srt_path = store.srt_path(task.key, ctx.id)
            if ctx.srt:
                atomic_write(srt_path, ctx.srt.encode("utf-8"))
            if ctx.asr is not None and ctx.asr.segments:
                atomic_write(store.srt_path(task.key, ctx.id, "asr"), compose_srt(ctx.asr.segments).encode("utf-8"))
            # which text fed the text modality, and the ASR result, per clip
            atomic_write(store.srt_path(task.key, ctx.id, "text"), dumps_record(ctx))
        absent = Counter(m for c in ctxs for m in c.absent)
        # numbers vary per clip ("3 cues"); the summary counts kinds of status
        statuses = Counter(re.sub(r"\d+(\.\d+)?", "#", f"{s}: {v}") for c in ctxs for s, v in c.status.items())
        from pipeline.store import LostClaim

        try:
            fs.commit_unit(
                u,
                data,
                failures,
                claim=claim,
                extra={"timings": {k: round(v, 3) for k, v in timings.items()}, "absent": dict(absent)},
            )
        except LostClaim:
            return UnitResult(u, "lost")
        return UnitResult(
            u,
            "done",
            n=len(ctxs),
            failures=failures,
            absent=dict(absent),
            statuses=dict(statuses),
            seconds=time.perf_counter() - t_start,
            stage_seconds=timings,
        )
    finally:
        store.release(claim)


def _limit_threads(n: int) -> None:
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:  # noqa: BLE001
        pass


# --- the whole run ---------------------------------------------------------------------------
@dataclass
class Summary:
    key: str
    dataset: str
    n_clips: int
    n_units: int
    done: int = 0
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    absent: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    stage_seconds: Counter = field(default_factory=Counter)

    @property
    def n_failed_clips(self) -> int:
        return len({f["id"] for f in self.failures})


def unit_tasks(plan: Plan, cache: Path, units: list[int], batch_size: int | None,
               lease: float, threads: int | None) -> list[UnitTask]:
    tasks = []
    for u in units:
        a, b = plan.layout.unit_range(u)
        tasks.append(
            UnitTask(
                cache=str(cache),
                key=plan.key,
                unit=u,
                root=str(plan.root),
                clips=[c.model_dump(mode="json") for c in plan.clips[a:b]],
                preset=plan.preset,
                info=plan.info,
                lease=float(lease),
                device=plan.device,
                batch_size=batch_size,
                threads=threads,
            )
        )
    return tasks


def create_set(plan: Plan, store: Store):
    attrs = {
        "dataset": plan.dataset,
        "preset": plan.preset_name,
        "classes": plan.info.get("classes", []),
        "task": plan.info.get("task", "classification"),
        "group_by": plan.info.get("group_by"),
        "label_derived": plan.info.get("label_derived", []),
        "targets": [t for t in TARGETS if any(getattr(c.labels, t) is not None for c in plan.clips)],
        "stages": [s.provenance() for s in plan.stages],
        "preset_config": plan.preset.data,
        "code_version": CODE_VERSION,
    }
    fs = store.create_set(plan.key, plan.layout, attrs, static_arrays(plan))
    store.set_alias(plan.dataset, plan.preset_name, plan.key)
    return fs


def run_extract(
    plan: Plan,
    cache: str | os.PathLike | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    executor: str = "auto",
    force: bool = False,
    units: list[int] | None = None,
    batch_size: int | None = None,
    lease: float | None = None,
    wait: bool = True,
    progress: Any = None,
) -> Summary:
    """Extract every unfinished unit of the plan's feature set.

    executor: 'inline' (this process), 'process' (local pool of `workers`), 'dask'
    (LocalCluster of `workers`, or the cluster at `scheduler`), 'auto' (inline for 1 worker,
    dask when a scheduler is given, else process). lease: seconds a unit's claim lasts
    (default: the preset's run.lease).
    """
    t0 = time.perf_counter()
    lease = plan.preset.run.lease if lease is None else lease
    store = Store(cache)
    fs = create_set(plan, store)
    all_units = list(range(plan.layout.n_units)) if units is None else sorted(units)
    if force:
        for u in all_units:
            fs.clear_unit(u)
    pending = [u for u in all_units if not fs.is_done(u)]
    summary = Summary(plan.key, plan.dataset, len(plan.clips), plan.layout.n_units)
    summary.skipped = len(all_units) - len(pending)
    if executor == "auto":
        executor = "dask" if scheduler else ("inline" if workers <= 1 else "process")
    # torch threads per worker: results are bitwise reproducible only at a fixed thread count,
    # so MMEMO_THREADS pins it (tests, cross-executor comparisons); else share the cores.
    env_threads = os.environ.get("MMEMO_THREADS")
    if env_threads:
        threads: int | None = max(1, int(env_threads))
    else:
        threads = None if executor == "inline" else max(1, (os.cpu_count() or 1) // max(1, workers))

    def absorb(res: UnitResult) -> None:
        if res.status == "done":
            summary.done += 1
            summary.failures.extend(res.failures)
            summary.absent.update(res.absent)
            summary.statuses.update(res.statuses)
            summary.stage_seconds.update(res.stage_seconds)
        elif res.status == "skipped":
            summary.skipped += 1
        if progress is not None:
            a, b = plan.layout.unit_range(res.unit)
            progress(res, b - a)

    rounds = 0
    while pending:
        tasks = unit_tasks(plan, store.root, pending, batch_size, lease, threads)
        results = _execute(tasks, executor, workers, scheduler)
        busy = []
        for res in results:
            if res.status in ("busy", "lost"):
                busy.append(res.unit)
            else:
                absorb(res)
        pending = [u for u in busy if not fs.is_done(u)]
        summary.skipped += len(busy) - len(pending)
        if not pending or not wait:
            break
        rounds += 1
        time.sleep(min(5.0, 0.2 * rounds))  # another worker holds them: wait for it or its lease
    summary.seconds = time.perf_counter() - t0
    return summary


def _execute(tasks: list[UnitTask], executor: str, workers: int, scheduler: str | None):
    if executor == "inline":
        for t in tasks:
            yield run_unit(t)
        return
    if executor == "process":
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futs = [ex.submit(run_unit, t) for t in tasks]
            for f in cf.as_completed(futs):
                yield f.result()
        return
    if executor == "dask":
        from distributed import Client, LocalCluster, as_completed

        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
        try:
            futs = client.map(run_unit, tasks, pure=False)
            for f in as_completed(futs):
                yield f.result()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return
    raise ValueError(f"unknown executor '{executor}' (inline, process, dask, auto)")
