"""The runner: manifest → work units → stages → one committed chunk per array per unit.

Stages know nothing of scheduling; this module does all of it (datatrove's split between
pipeline steps and executors):
- `plan_extract` reads the manifest and preset, builds the stages (without loading models),
  fingerprints the media and derives the content key of the feature set.
- `run_extract` creates (or joins) the set, then runs every unfinished unit on an executor:
  in-process, a local process pool, or Dask (a LocalCluster, or `--scheduler ADDR`).
- `run_unit` is the task: claim the unit, decode clips in a thread pool that runs ahead of the
  model stages (so CPU decoding overlaps GPU work), run the stages batch by batch, then commit
  the unit's arrays, its ledger lines and, last, its completion marker.
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
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.manifest import Clip, load_dataset, read_dataset_info
from pipeline.presets import STAGE_ORDER, load_preset, stage_config
from pipeline.stages.base import (
    ClipContext,
    ClipError,
    Feature,
    ModelMissingError,
    Stage,
    get_backend,
    pad_or_pool,
)
from pipeline.store import ModalityLayout, SetLayout, Store

CODE_VERSION = "1"
TARGETS = ("sentiment", "valence", "arousal")
FP_BYTES = 64 * 1024
# modalities whose sequence is stored (others are vectors)
SEQUENCE_MODALITIES = ("audio", "text", "visual")


# --- planning ------------------------------------------------------------------------------
def build_stages(preset: dict[str, Any], device: str = "cpu", info: dict[str, Any] | None = None) -> list[Stage]:
    """The preset's stages in DAG order ('skip' leaves a stage out); models are not loaded."""
    stages = []
    for name in STAGE_ORDER:
        backend, cfg = stage_config(preset, name)
        if backend == "skip":
            continue
        cls = get_backend(name, backend)
        stage = cls(cfg, device=device)
        stage.bind_dataset(info or {})
        stages.append(stage)
    return stages


def media_fingerprint(path: Path, root: Path | None = None) -> str:
    """size + mtime + hash of the first and last 64 KiB: cheap on NFS, catches re-encodes.

    Only regular files inside `root` (after following symlinks) are opened: a FIFO or device
    would block or never end, and a link out of the dataset root must not be read. Those get
    a marker instead; the decode stage then fails the clip with a ledger line.
    """
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError, OSError) as e:
        return f"missing:{type(e).__name__}"
    except RuntimeError:  # symlink loop (Python < 3.13)
        return "missing:loop"
    if not stat.S_ISREG(st.st_mode):
        return f"special:{stat.S_IFMT(st.st_mode):o}"
    if root is not None:
        try:
            if not path.resolve(strict=True).is_relative_to(Path(root).resolve()):
                return "outside-root"
        except (OSError, RuntimeError) as e:
            return f"unresolvable:{type(e).__name__}"
    h = hashlib.sha256()
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since stat(), open must not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "special:changed"
            h.update(f.read(FP_BYTES))
            if st.st_size > 2 * FP_BYTES:
                f.seek(-FP_BYTES, os.SEEK_END)
                h.update(f.read(FP_BYTES))
    except OSError as e:
        return f"unreadable:{type(e).__name__}"
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:16]}"


def clip_fingerprint(clip: Clip, root: Path) -> str:
    parts = []
    for rel in (clip.video, clip.audio):
        parts.append(media_fingerprint(root / rel, root) if rel else "-")
    return "|".join(parts)


@dataclass
class Plan:
    dataset: str
    preset: dict[str, Any]
    root: Path
    clips: list[Clip]
    info: dict[str, Any]
    stages: list[Stage]
    layout: SetLayout
    key: str
    device: str = "cpu"

    @property
    def preset_name(self) -> str:
        return str(self.preset.get("name", "custom"))


def resolve_unit_size(value: Any, n: int) -> int:
    """`store.unit_size`: clips per work unit (= per chunk file), or "auto".

    "auto" is 32 clips for sets of up to 2,048 clips, 64 up to 4,096, and 128 beyond (the
    size doubles while the set would still have more than 64 units). Small units keep a small set
    spread over many workers and make resumption fine-grained; on a large set they make
    thousands of small chunk files per array, and reading those, not decoding, becomes most of
    a fit's set-up (10k clips: 3.2 s at 32 clips per chunk, 0.8 s at 128; BENCHMARKS.md).
    Depends on n only, so the set key never depends on the number of workers.
    """
    if value == "auto":
        size = 32
        while size < 128 and n > size * 64:
            size *= 2
        return size
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'store.unit_size must be a positive integer or "auto", got {value!r}')
    return value


def _layout(preset: dict[str, Any], stages: list[Stage], n: int) -> SetLayout:
    st = preset.get("store", {})
    max_len = st.get("max_len", {})
    mods: dict[str, ModalityLayout] = {}
    for s in stages:
        for mod, (seq_dim, pooled_dim) in s.output_dims().items():
            is_seq = mod in SEQUENCE_MODALITIES and seq_dim > 0
            mods[mod] = ModalityLayout(
                name=mod,
                pooled_dim=int(pooled_dim),
                seq_dim=int(seq_dim) if is_seq else 0,
                max_len=int(max_len.get(mod, 32)) if is_seq else 0,
                provenance=s.provenance(),
            )
    return SetLayout(
        n=n,
        unit_size=resolve_unit_size(st.get("unit_size", "auto"), n),
        modalities=mods,
        compression=str(st.get("compression", "zstd")),
        level=int(st.get("level", 3)),
        inner_chunk=int(st.get("inner_chunk", 64)),
    )


def plan_extract(
    dataset: str,
    root: str | os.PathLike | None = None,
    preset: str | dict[str, Any] = "offline",
    overrides: list[str] | None = None,
    manifests: str | os.PathLike = "manifests",
    device: str = "cpu",
    limit: int | None = None,
) -> Plan:
    clips = load_dataset(dataset, manifests)
    if limit:
        clips = clips[:limit]
    if not clips:
        raise ValueError(f"dataset '{dataset}' has no clips in {manifests}/{dataset}/")
    info = read_dataset_info(dataset, manifests)
    if root is None:
        if "root" not in info:
            raise ValueError(f"dataset '{dataset}': no --root given and dataset.json names none")
        root = info["root"]
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    pre = load_preset(preset, overrides)
    stages = build_stages(pre, device=device, info=info)
    layout = _layout(pre, stages, len(clips))
    with cf.ThreadPoolExecutor(8) as ex:
        fps = list(ex.map(lambda c: clip_fingerprint(c, root), clips))
    ident = {
        "format": 1,
        "code": CODE_VERSION,
        "stages": [s.provenance() for s in stages],
        "store": {k: v for k, v in pre.get("store", {}).items()},
        "decode_run": pre.get("run", {}).get("clip_timeout"),
        "classes": info.get("classes"),
        "clips": [c.model_dump(mode="json") for c in clips],
        "media": fps,
    }
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    key = f"{dataset}-{hashlib.sha256(blob).hexdigest()[:16]}"
    return Plan(dataset, pre, root, clips, info, stages, layout, key, device)


def static_arrays(plan: Plan) -> dict[str, np.ndarray]:
    """Arrays known from the manifest alone: ids, split, group, label, regression targets."""
    clips = plan.clips
    group_by = plan.info.get("group_by") or "speaker"
    groups = []
    for c in clips:
        g = getattr(c, group_by, None) if hasattr(c, group_by) else c.metadata.get(group_by)
        groups.append(str(g) if g is not None else c.id)
    out: dict[str, np.ndarray] = {
        "ids": np.array([c.id for c in clips], dtype=object),
        "split": np.array([c.split for c in clips], dtype=object),
        "group": np.array(groups, dtype=object),
        "label": np.array(
            [c.labels.emotion_idx if c.labels.emotion_idx is not None else -1 for c in clips],
            dtype=np.int32,
        ),
    }
    for t in TARGETS:
        vals = [getattr(c.labels, t) for c in clips]
        if any(v is not None for v in vals):
            out[f"targets/{t}/value"] = np.array([v if v is not None else 0.0 for v in vals], np.float32)
            out[f"targets/{t}/present"] = np.array([v is not None for v in vals], bool)
    return out


# --- the unit task ---------------------------------------------------------------------------
_STAGE_CACHE: dict[str, list[Stage]] = {}


def _stages_for(preset: dict[str, Any], device: str, info: dict[str, Any] | None = None) -> list[Stage]:
    """Stages are built and their models loaded once per worker process."""
    k = hashlib.sha256(json.dumps([preset, device, info], sort_keys=True, default=str).encode()).hexdigest()
    if k not in _STAGE_CACHE:
        stages = build_stages(preset, device=device, info=info)
        for s in stages:
            s.ensure_loaded()
        _STAGE_CACHE[k] = stages
    return _STAGE_CACHE[k]


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
        data[f"{name}/pooled"] = pooled
        data[f"{name}/present"] = present
        if m.is_sequence:
            data[f"{name}/seq"] = seq
            data[f"{name}/len"] = lens
    return data


def process_clips(
    stages: list[Stage],
    ctxs: list[ClipContext],
    batch_size: int = 16,
    clip_timeout: float = 300.0,
    decode_workers: int = 2,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run every stage over the clips; returns ledger rows. ModelMissingError propagates."""
    timings = timings if timings is not None else {}
    failures: list[dict[str, Any]] = []
    decode = stages[0] if stages and stages[0].stage == "decode" else None
    rest = stages[1:] if decode else stages
    # transcript-only clips (no media in the manifest) are text/metadata data by design,
    # not failures: they skip decode and their media modalities are absent with a reason
    for c in ctxs:
        if c.clip.media is None:
            c.status["decode"] = "no media in the manifest"
            c.failed["decode"] = "no media"
    futs = _decode_all(decode, [c for c in ctxs if c.clip.media is not None], decode_workers) if decode else None
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
            needs_media = stage.stage not in ("text", "metadata")
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
            timings[stage.stage] = timings.get(stage.stage, 0.0) + time.perf_counter() - t0
            for ctx, err in zip(todo, errors):
                if err is None:
                    continue
                if isinstance(err, ModelMissingError):
                    raise err
                ctx.failed[stage.stage] = str(err)
                failures.append(_fail_row(ctx, stage.stage, err))
                for mod in stage.output_dims():
                    ctx.features.pop(mod, None)
                    ctx.absent.setdefault(mod, f"{stage.stage} failed: {err}")
    return failures


def run_unit(task: dict[str, Any]) -> UnitResult:
    """One work unit, end to end. `task` is plain data so any executor can ship it."""
    t_start = time.perf_counter()
    store = Store(task["cache"])
    u = int(task["unit"])
    fs = store.open(task["key"])
    if fs.is_done(u):  # --force clears markers before any task is made
        return UnitResult(u, "skipped")
    claim = store.claim(task["key"], u, lease_s=float(task.get("lease", 3600)))
    if claim is None:
        return UnitResult(u, "busy")
    try:
        if fs.is_done(u):
            return UnitResult(u, "skipped")
        if task.get("threads"):
            _limit_threads(int(task["threads"]))
        preset = task["preset"]
        stages = _stages_for(preset, task.get("device", "cpu"), task.get("info"))
        root = Path(task["root"])
        clips = [Clip.model_validate(c) for c in task["clips"]]
        ctxs = [ClipContext(clip=c, root=root) for c in clips]
        run = preset.get("run", {})
        timings: dict[str, float] = {}
        failures = process_clips(
            stages,
            ctxs,
            batch_size=int(task.get("batch_size") or run.get("batch_size", 16)),
            clip_timeout=float(run.get("clip_timeout", 300)),
            decode_workers=int(run.get("decode_workers", 2)),
            timings=timings,
        )
        data = _assemble(fs.layout, ctxs, failures)
        from pipeline.stages.asr import compose_srt, dumps_record
        from pipeline.store import atomic_write

        for ctx in ctxs:
            srt_path = store.srt_path(task["key"], ctx.id)
            if ctx.srt:
                atomic_write(srt_path, ctx.srt.encode("utf-8"))
            if ctx.asr is not None and ctx.asr.segments:
                atomic_write(srt_path.with_name(f"{ctx.id}.asr.srt"), compose_srt(ctx.asr.segments).encode("utf-8"))
            # which text fed the text modality, and the ASR result, per clip
            atomic_write(srt_path.with_name(f"{ctx.id}.text.json"), dumps_record(ctx))
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
               lease: float, threads: int | None) -> list[dict[str, Any]]:
    tasks = []
    for u in units:
        a, b = plan.layout.unit_range(u)
        tasks.append(
            {
                "cache": str(cache),
                "key": plan.key,
                "unit": u,
                "root": str(plan.root),
                "clips": [c.model_dump(mode="json") for c in plan.clips[a:b]],
                "preset": plan.preset,
                "info": plan.info,
                "device": plan.device,
                "batch_size": batch_size,
                "lease": lease,
                "threads": threads,
            }
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
        "preset_config": plan.preset,
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
    lease: float = 3600.0,
    wait: bool = True,
    progress: Any = None,
) -> Summary:
    """Extract every unfinished unit of the plan's feature set.

    executor: 'inline' (this process), 'process' (local pool of `workers`), 'dask'
    (LocalCluster of `workers`, or the cluster at `scheduler`), 'auto' (inline for 1 worker,
    dask when a scheduler is given, else process).
    """
    t0 = time.perf_counter()
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


def _execute(tasks: list[dict[str, Any]], executor: str, workers: int, scheduler: str | None):
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
