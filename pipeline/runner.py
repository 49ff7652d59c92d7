"""The runner: a `Plan` (pipeline/plan.py) → work units → stages → one committed chunk per
array per unit.

Stages know nothing of scheduling; this module does all of it (datatrove's split between
pipeline steps and executors):
- `run_extract` creates (or joins) the plan's set, then runs every unfinished unit on an
  executor: in-process, a local process pool, or Dask (a LocalCluster, or `--scheduler ADDR`).
- `run_unit` is the task (a `UnitTask`): claim the unit, decode clips in a thread pool that
  runs ahead of the model stages (so CPU decoding overlaps GPU work), run the stages batch by
  batch, then commit the unit's arrays, its ledger lines and, last, its completion marker.
A rerun skips finished units; a killed run loses at most its in-flight units. A claim is
renewed by a heartbeat while its unit is worked on, so the lease is short (minutes): a dead
writer's claim is taken over once it expires, or at once when the writer ran on this host
(its pid is gone). Clips are reported as each batch finishes (`on_clips`), across processes
through a queue; a Ctrl-C stops the workers and raises `Interrupted` with what was kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cacheformat as cachefmt
from pipeline.cacheformat import SetLayout
from pipeline.manifest import Clip, targets_present
from pipeline.plan import (  # noqa: F401 - plan_extract, resolve_unit_size: re-exported for callers
    CODE_VERSION,
    Plan,
    build_stages,
    plan_extract,
    resolve_unit_size,
    static_arrays,
)
from pipeline.presets import Preset, RunSettings, load_preset
from pipeline.stages.base import (
    WORKER_THREADS_ENV,
    ClipContext,
    ClipError,
    Feature,
    ModelMissingError,
    Stage,
    pad_or_pool,
)
from pipeline.store import FeatureSetStore, Heartbeat, LostClaim, Store, atomic_write

# --- the unit task ---------------------------------------------------------------------------
_STAGE_CACHE: dict[str, list[Stage]] = {}
# The units of one process share its loaded stages, and several of their models serve one call
# at a time (an OpenVINO infer request, a PocketSphinx decoder, rapidocr's detector size limit).
# A Dask worker started with several threads runs units side by side: their model work takes
# turns (decode threads still run ahead), instead of two threads driving one decoder.
_MODELS_LOCK = threading.Lock()


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
    force: bool = False  # redo the unit even when it is done (its marker is replaced at commit)
    # where to report finished clips: ("clips", unit, n, n_failed) tuples; a queue.Queue
    # (inline) or a multiprocessing manager queue (process pool); None: per unit only
    progress_queue: Any = field(default=None, compare=False)


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
        layers = np.zeros((n, m.n_layers, m.layer_dim), np.float16) if m.has_layers else None
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
            lay = None
            if m.has_layers and problem is None:
                lay = None if f.layers is None else np.asarray(f.layers, np.float32)
                if lay is None or lay.shape != (m.n_layers, m.layer_dim):
                    got = None if lay is None else lay.shape
                    problem = f"layers shape {got} != [{m.n_layers}, {m.layer_dim}]"
                elif not np.isfinite(lay).all() or np.abs(lay).max(initial=0) > 65000:
                    problem = "NaN/Inf (or beyond float16 range) in per-layer features"
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
            if layers is not None and lay is not None:
                layers[i] = lay.astype(np.float16)
        data[cachefmt.pooled(name)] = pooled
        data[cachefmt.present(name)] = present
        if m.is_sequence:
            data[cachefmt.seq(name)] = seq
            data[cachefmt.length(name)] = lens
        if layers is not None:
            data[cachefmt.layer_stack(name)] = layers
    return data


def process_clips(
    stages: list[Stage],
    ctxs: list[ClipContext],
    run: RunSettings | None = None,
    timings: dict[str, float] | None = None,
    on_clips: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every stage over the clips; returns ledger rows. ModelMissingError propagates.
    `on_clips(n, n_failed)` is called as each batch of clips has been through every stage."""
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
        if on_clips is not None:
            failed_ids = {f["id"] for f in failures}
            on_clips(len(batch), sum(1 for c in batch if c.id in failed_ids))
    return failures


def run_unit(task: UnitTask) -> UnitResult:
    """One work unit, end to end."""
    t_start = time.perf_counter()
    store = Store(task.cache)
    u = task.unit
    fs = store.open(task.key)
    if fs.is_done(u) and not task.force:
        store.clear_stale_claim(task.key, u, task.lease)  # left by a writer stopped after commit
        return UnitResult(u, "skipped")
    claim = store.claim(task.key, u, lease_s=task.lease)
    if claim is None:
        return UnitResult(u, "busy")
    beat = Heartbeat(store, claim).__enter__()
    try:
        if fs.is_done(u) and not task.force:
            return UnitResult(u, "skipped")
        if task.threads:
            _limit_threads(task.threads)
        preset = load_preset(task.preset.data)
        timings: dict[str, float] = {}
        root = Path(task.root)
        ctxs = [ClipContext(clip=Clip.model_validate(c), root=root) for c in task.clips]
        run = preset.run
        if task.batch_size:
            run = run.model_copy(update={"batch_size": task.batch_size})
        q = task.progress_queue

        def on_clips(n: int, n_failed: int) -> None:
            if q is not None:
                try:
                    q.put(("clips", u, n, n_failed))
                except Exception:  # noqa: BLE001 - progress is never worth failing a unit
                    pass

        with _MODELS_LOCK:
            stages = _stages_for(preset, task.device, task.info, timings)
            failures = process_clips(stages, ctxs, run, timings=timings, on_clips=on_clips)
        data = _assemble(fs.layout, ctxs, failures)
        from pipeline.stages.asr import compose_srt, dumps_record

        for ctx in ctxs:
            srt_path = store.srt_path(task.key, ctx.id)
            if ctx.srt:
                atomic_write(srt_path, ctx.srt.encode("utf-8"))
            if ctx.asr is not None and ctx.asr.segments:
                atomic_write(store.srt_path(task.key, ctx.id, "asr"), compose_srt(ctx.asr.segments).encode("utf-8"))
            # which text fed the text modality, and the ASR result, per clip
            atomic_write(store.srt_path(task.key, ctx.id, "text"), dumps_record(ctx))
        absent = Counter(m for c in ctxs for m in c.absent)
        # numbers vary per clip ("3 cues"); the summary counts kinds of status, N for the number
        statuses = Counter(re.sub(r"\d+(\.\d+)?", "N", f"{s}: {v}") for c in ctxs for s, v in c.status.items())
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
        beat.__exit__()
        store.release(claim)


_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _limit_threads(n: int) -> None:
    """The worker's thread budget for every pool in the process: torch's intra-op threads, the
    BLAS / OpenMP pools already loaded (threadpoolctl: numpy's OpenBLAS, which the audio stage's
    log-mel uses), their environment variables for libraries loaded later,
    and the budget other pools read (stages.base.worker_threads: onnxruntime in OCR).

    Without the BLAS limit, 2 workers on 2 cores each ran a 2-thread OpenBLAS pool: the audio
    stage took 128 ms per clip instead of 65 (BENCHMARKS.md "scaling")."""
    os.environ[WORKER_THREADS_ENV] = str(n)
    for var in _BLAS_ENV:
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)  # stays in force for the life of the worker process
    except Exception:  # noqa: BLE001 - a missing or odd pool only costs speed
        pass
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
    # the whole set's ledger at the end of the run (this run's failures and earlier runs')
    set_failures: list[dict[str, Any]] = field(default_factory=list)
    # units copied from a set of the same features with other labels (see reuse_units)
    reused: int = 0
    reused_from: str | None = None

    @property
    def n_failed_clips(self) -> int:
        return len({f["id"] for f in self.failures})

    @property
    def n_failed_in_set(self) -> int:
        return len({f["id"] for f in self.set_failures})


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `run_extract`: the workers were stopped; `summary` says what was kept."""

    def __init__(self, summary: Summary, units_kept: int = 0):
        super().__init__("interrupted")
        self.summary = summary
        self.units_kept = units_kept  # finished units of the set, as on disk


def unit_tasks(plan: Plan, cache: Path, units: list[int], batch_size: int | None,
               lease: float, threads: int | None, force: bool = False,
               progress_queue: Any = None) -> list[UnitTask]:
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
                force=force,
                progress_queue=progress_queue,
            )
        )
    return tasks


def largest_first(plan: Plan, units: list[int]) -> list[int]:
    """Units in the order they are handed out: the most media bytes first (a cost estimate
    known without decoding), ties in unit order. Workers take the next unit when free, so the
    small units end the run and fill the gaps. In name order, the six real videos ended with
    an 8-s clip's unit that one worker started while the other, done with the 41-s clip,
    then idled 2 s."""
    sizes = plan.media_bytes
    if len(sizes) != len(plan.clips):
        return list(units)

    def size(u: int) -> int:
        a, b = plan.layout.unit_range(u)
        return sum(sizes[a:b])

    return sorted(units, key=lambda u: (-size(u), u))


def waiting_line(store: Store, key: str, unit: int, span: tuple[int, int]) -> str | None:
    """What a waiting extractor says: which unit, held by whom, until when."""
    h = store.holder(key, unit)
    if h is None:
        return None
    until = time.strftime("%H:%M:%S", time.localtime(float(h.get("expires", 0))))
    return (f"waiting for unit {unit} (clips {span[0]}-{span[1] - 1}) of {key}: held by "
            f"{h.get('by', '?')} pid {h.get('pid', '?')}, lease until {until} "
            f"(renewed while it works; taken over when it lapses or the process is gone)")


def find_donor(plan: Plan, store: Store) -> FeatureSetStore | None:
    """Another set of the cache with the plan's features_digest (the same media, settings and
    clips in the same order; other labels), the one with the most finished units."""
    if not plan.features_digest:
        return None
    best, best_done = None, 0
    for key in store.list_keys():
        if key == plan.key:
            continue
        try:
            other = store.open(key)
        except Exception:  # noqa: BLE001 - a damaged set of the cache never stops this one
            continue
        if other.attrs.get("features_digest") != plan.features_digest:
            continue
        done = len(other.done_units())
        if done > best_done:
            best, best_done = other, done
    return best


def reuse_units(plan: Plan, store: Store, fs: FeatureSetStore, units: list[int],
                lease: float) -> tuple[list[int], FeatureSetStore | None]:
    """Copy into `fs` each of `units` that a donor set (find_donor) has finished: its chunk
    files, ledger and subtitle files; the labels stay the plan's. Returns the units copied."""
    donor = find_donor(plan, store)
    if donor is None:
        return [], None
    copied = []
    for u in units:
        if not donor.is_done(u) or fs.is_done(u):
            continue
        claim = store.claim(plan.key, u, lease_s=lease)
        if claim is None:  # another extractor works on it
            continue
        try:
            if fs.is_done(u) or fs.adopt_unit(u, donor, claim) is None:
                continue
            a, b = plan.layout.unit_range(u)
            for c in plan.clips[a:b]:
                for kind in ("ocr", "asr", "text"):
                    src = store.srt_path(donor.key, c.id, kind)
                    if src.is_file():
                        atomic_write(store.srt_path(plan.key, c.id, kind), src.read_bytes())
            copied.append(u)
        finally:
            store.release(claim)
    return copied, donor


def create_set(plan: Plan, store: Store):
    attrs = {
        "dataset": plan.dataset,
        "preset": plan.preset_name,
        "classes": plan.info.get("classes", []),
        "task": plan.info.get("task", "classification"),
        "group_by": plan.info.get("group_by"),
        "label_derived": plan.info.get("label_derived", []),
        "targets": targets_present(plan.clips),
        "stages": [s.provenance() for s in plan.stages],
        "preset_config": plan.preset.data,
        "code_version": CODE_VERSION,
        "features_digest": plan.features_digest,
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
    on_clips: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
    on_reused: Callable[[int], None] | None = None,
) -> Summary:
    """Extract every unfinished unit of the plan's feature set.

    Units another set of the cache has finished with the same features (a re-labelled
    dataset: plan.features_digest) are copied from it first, not extracted (not with
    `force`); on_reused(n_clips) and notify(line) say how many.

    executor: 'inline' (this process), 'process' (local pool of `workers`), 'dask'
    (LocalCluster of `workers`, or the cluster at `scheduler`), 'auto' (inline for 1 worker,
    dask when a scheduler is given, else process). lease: seconds a unit's claim lasts
    unless renewed (default: the preset's run.lease). force: redo finished units; each keeps
    its old data and marker until its replacement is committed.
    progress(res, n): called per finished unit; on_clips(n, n_failed): per finished batch of
    clips (per unit under Dask); notify(line): a waiting extractor's messages.
    Ctrl-C raises `Interrupted` (a KeyboardInterrupt) once the workers are stopped.
    """
    t0 = time.perf_counter()
    lease = plan.preset.run.lease if lease is None else lease
    store = Store(cache)
    fs = create_set(plan, store)
    all_units = list(range(plan.layout.n_units)) if units is None else sorted(units)
    summary = Summary(plan.key, plan.dataset, len(plan.clips), plan.layout.n_units)
    unfinished = [u for u in all_units if not fs.is_done(u)]
    if unfinished and not force:  # a re-labelled dataset: its features are in another set
        copied, donor = reuse_units(plan, store, fs, unfinished, lease)
        if copied and donor is not None:
            summary.reused, summary.reused_from = len(copied), donor.key
            n_copied = sum(b - a for a, b in map(plan.layout.unit_range, copied))
            if notify is not None:
                notify(f"copied {len(copied)} finished unit(s), {n_copied} clips, from {donor.key}: "
                       "the same media, settings and clips with other labels (--force extracts "
                       "them again)")
            if on_reused is not None:
                on_reused(n_copied)
    pending = list(all_units) if force else [u for u in all_units if not fs.is_done(u)]
    summary.skipped = len(all_units) - len(pending) - summary.reused
    for u in sorted(set(all_units) - set(pending)):  # a writer stopped after commit left these
        store.clear_stale_claim(plan.key, u, lease)
    if executor == "auto":
        executor = "dask" if scheduler else ("inline" if workers <= 1 else "process")
    # torch threads per worker: results are bitwise reproducible only at a fixed thread count,
    # so MMEMO_THREADS pins it (tests, cross-executor comparisons); else share the cores.
    env_threads = os.environ.get("MMEMO_THREADS")
    if env_threads:
        threads: int | None = max(1, int(env_threads))
    else:
        # the workers that will have a unit to run share the cores (a 1-unit set on 2 workers
        # runs in one process, which gets both cores)
        busy = max(1, min(workers, len(pending)))
        threads = None if executor == "inline" else max(1, (os.cpu_count() or 1) // busy)

    # per-clip progress: workers put ("clips", unit, n, n_failed) on a queue, drained here
    counted: Counter = Counter()  # clips reported so far per unit
    settled: set[int] = set()  # units whose count was made exact (late messages are ignored)
    lock = threading.Lock()
    manager = None
    pq: Any = None
    drain: threading.Thread | None = None
    stop_drain = threading.Event()
    if on_clips is not None and executor in ("inline", "process"):
        if executor == "inline":
            pq = queue.Queue()
        else:
            import multiprocessing as mp
            import signal
            from multiprocessing.managers import SyncManager

            # the queue's server process ignores Ctrl-C: the terminal sends SIGINT to the whole
            # process group, and a manager that died of it made the interrupted run end with
            # "error: [Errno 9] Bad file descriptor" (exit 1) instead of the resume line
            manager = SyncManager(ctx=mp.get_context("spawn"))
            manager.start(signal.signal, (signal.SIGINT, signal.SIG_IGN))
            pq = manager.Queue()

        def drain_queue() -> None:
            while not stop_drain.is_set() or not pq.empty():
                try:
                    _, unit, n, n_failed = pq.get(timeout=0.2)
                except queue.Empty:
                    continue
                except (EOFError, OSError):
                    return
                with lock:
                    if unit in settled:
                        continue
                    counted[unit] += n
                on_clips(n, n_failed)

        drain = threading.Thread(target=drain_queue, daemon=True, name="mmemo-progress")
        drain.start()

    def settle(res: UnitResult) -> None:
        """A unit is back: make the clip count exact (a lost unit's clips are taken back)."""
        if on_clips is None:
            return
        a, b = plan.layout.unit_range(res.unit)
        with lock:
            have = counted.pop(res.unit, 0)
            if res.status in ("done", "skipped"):
                settled.add(res.unit)
        want = (b - a) if res.status == "done" else 0
        n_failed = len({f["id"] for f in res.failures}) if res.status == "done" else 0
        reported_failed = 0 if drain is not None and have else n_failed
        if want != have or reported_failed:
            on_clips(want - have, reported_failed)

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

    said: dict[int, tuple[str, float]] = {}
    rounds = 0
    results: Any = None
    try:
        while pending:
            tasks = unit_tasks(plan, store.root, largest_first(plan, pending), batch_size, lease,
                               threads, force=force, progress_queue=pq)
            results = _execute(tasks, executor, workers, scheduler)
            busy = []
            for res in results:
                if drain is not None:
                    time.sleep(0)  # let the drain thread see the unit's last batch first
                    _flush(pq, drain)
                settle(res)
                if res.status in ("busy", "lost"):
                    busy.append(res.unit)
                else:
                    absorb(res)
            pending = [u for u in busy if force or not fs.is_done(u)]
            summary.skipped += len(busy) - len(pending)
            if not pending or not wait:
                break
            if notify is not None:
                for u in pending:
                    line = waiting_line(store, plan.key, u, plan.layout.unit_range(u))
                    last = said.get(u)
                    # say it when the holder changes, then once a minute
                    if line and (last is None or last[0] != line or time.time() - last[1] > 60):
                        notify(line)
                        said[u] = (line, time.time())
            rounds += 1
            time.sleep(min(5.0, 0.2 * rounds))  # another worker holds them: wait for it or its lease
    except KeyboardInterrupt:
        # a Ctrl-C that lands outside the executor's generator (progress, settle, _flush) must
        # stop the workers now too: left to garbage collection, the pool ran on until exit.
        # Closed here, not only in `finally`: the units kept are counted below, and a worker
        # still running could commit one more after the count
        if results is not None:
            results.close()
        summary.seconds = time.perf_counter() - t0
        raise Interrupted(summary, len(fs.done_units())) from None
    finally:
        if results is not None:
            results.close()  # a generator that finished or was closed: nothing to do
        stop_drain.set()
        if drain is not None:
            drain.join(timeout=2)
        if manager is not None:
            try:
                manager.shutdown()
            except (OSError, EOFError):  # already gone: nothing to shut down
                pass
    summary.seconds = time.perf_counter() - t0
    summary.set_failures = fs.failures()
    return summary


def _flush(pq: Any, drain: threading.Thread) -> None:
    """Wait (briefly) until the drain thread has taken every queued progress message."""
    deadline = time.time() + 1.0
    while time.time() < deadline and drain.is_alive():
        try:
            if pq.empty():
                return
        except (EOFError, OSError):
            return
        time.sleep(0.01)


def _quick_exit_at_end() -> None:
    """A pool worker leaves without tearing down its interpreter.

    With torch, OpenVINO, onnxruntime and the rest loaded, a normal interpreter exit took
    1.6 s, and the pool's shutdown waits for it: 8 % of a 20-s extraction of the six real
    videos. Registered first, this runs after every other exit handler (they run in reverse
    order); multiprocessing's own clean-up has already run by then. Every unit a worker ran
    was committed before its result was returned.
    """
    import atexit

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream has nothing to flush
                pass
        os._exit(0)

    atexit.register(leave)


def _stop_pool(ex: cf.ProcessPoolExecutor) -> None:
    """Ctrl-C: cancel queued units and stop the running ones now. A killed worker's claim
    names a pid that is gone, so the next run on this host takes its unit over at once."""
    # the worker processes, taken before shutdown: shutdown() drops the executor's reference to
    # them, and the loops below then terminated nothing (the pool ran its queue to the end)
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        try:
            proc.terminate()
        except Exception:  # noqa: BLE001
            pass
    for proc in procs:
        try:
            proc.join(timeout=3)
        except Exception:  # noqa: BLE001
            pass


def _execute(tasks: list[UnitTask], executor: str, workers: int, scheduler: str | None):
    if executor == "inline":
        for t in tasks:
            yield run_unit(t)
        return
    if executor == "process":
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_quick_exit_at_end)
        ok = False
        try:
            futs = [ex.submit(run_unit, t) for t in tasks]
            for f in cf.as_completed(futs):
                yield f.result()
            ok = True
        finally:
            if ok:
                ex.shutdown(wait=True)
            else:
                _stop_pool(ex)
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
