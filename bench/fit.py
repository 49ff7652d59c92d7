"""Benchmark the trainer: one fit per head on a synthetic 10k-clip set, and the ablation grid.

Writes a feature set per the cache contract (3 sequence modalities, T=64, float16, plus a
metadata vector and a conditioning vector; the offline preset's chunking and blosc-lz4 codec,
as extraction writes them), then measures — runs, never extrapolates — `fusion.train.fit` for
each registered head (one fit = one seed, repeated for seeds 0-2; the trainer's defaults:
early stopping, automatic batch size) and the 4 heads × 7 subsets × 3 seeds grid through
`fusion.ablate`. Goals: ≤ 10 s per fit, ≤ 5 min for the grid. Wall times on a shared machine
move with its load, so the load average is printed beside them. One-time imports are paid by a
warm-up fit before the timings (a fresh `mmemo fit` process pays them once, ~2-3 s).

    .venv/bin/python bench/fit.py [--n 10000] [--signal 0.2] [--heads early,late,...]
                                  [--workers 2] [--threads N] [--grid-threads N]
                                  [--grid run|skip]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tomllib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fusion.data import open_set  # noqa: E402
from fusion.heads import HEADS  # noqa: E402
from fusion.train import default_threads, fit  # noqa: E402
from pipeline.plan import resolve_unit_size  # noqa: E402
from pipeline.presets import load_preset  # noqa: E402
from pipeline.store import codec  # noqa: E402
from tests.fusion.conftest import write_feature_set  # noqa: E402  (the contract writer)

GOAL_FIT_S, GOAL_GRID_S = 10.0, 300.0
CORE_HEADS = ["early", "late", "hybrid", "cquery"]


def make_set(root: Path, n: int, t: int, signal: float) -> tuple[str, float]:
    """Write the synthetic set; returns its key and the seconds it took.

    `signal` scales the class signal of every modality. At 1.0 every head reaches macro F1
    ≈ 0.99 in its first epoch and early stopping ends each fit after the minimum 1 + patience
    epochs, which flatters the timings; the default 0.2 leaves the pooled vectors hard (early
    fusion ≈ 0.5 macro F1) while the sequences still carry the classes, so fits run the epoch
    counts a real set needs.
    """
    t0 = time.perf_counter()
    store = load_preset("offline").store  # the layout extraction writes: chunks, codec
    lens = {m: t or store.max_len[m] for m in ("audio", "text", "visual")}
    key = write_feature_set(
        root, dataset="bench", n=n, unit_size=resolve_unit_size(store.unit_size, n),
        inner_chunk=store.inner_chunk, n_classes=7, n_groups=max(20, n // 40),
        compressors=codec(store.compression, store.level),
        modalities={"audio": (25, 88, lens["audio"], 0.4 * signal),
                    "text": (384, 384, lens["text"], 0.4 * signal),
                    "visual": (64, 64, lens["visual"], 0.2 * signal)},
        meta_dim=16, cond_dim=384, class_probs=[0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05],
    )
    return key, time.perf_counter() - t0


def time_fit(root: Path, runs: Path, head: str, mods: list[str], seed: int, threads: int
             ) -> tuple[float, dict]:
    """Wall seconds of one `fit` (one seed) with the trainer's defaults, and its metrics. The
    fit pays for its linear probe: the probes an earlier fit left in `runs` are removed first."""
    shutil.rmtree(runs / ".probes", ignore_errors=True)
    t0 = time.perf_counter()
    r = fit(root, "bench", head, mods, seeds=[seed], runs_dir=runs, threads=threads,
            name=f"{head}-{'+'.join(mods)}-seed{seed}")
    return time.perf_counter() - t0, r.metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--t", type=int, default=64,
                    help="sequence length of every modality (0: the offline preset's max_len, "
                         "audio 64 / text 16 / visual 32; 64 everywhere is the heavier case)")
    ap.add_argument("--signal", type=float, default=0.2, help="class signal scale (see make_set)")
    ap.add_argument("--heads", default=",".join(dict.fromkeys(
        [h for h in CORE_HEADS if h in HEADS] + list(HEADS))))
    ap.add_argument("--grid", choices=["run", "skip"], default="run")
    ap.add_argument("--fit-seeds", type=int, default=3, help="single fits per head (seeds 0..)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the grid")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="torch threads of each single fit (default: as `mmemo fit`)")
    ap.add_argument("--grid-threads", type=int, default=0,
                    help="torch threads per grid worker (default: as `mmemo ablate`, the "
                         "cores / workers)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    heads = list(dict.fromkeys(h for h in args.heads.split(",") if h))

    work = args.dir or Path(tempfile.mkdtemp(prefix="mmemo-bench-"))
    print(f"machine: {os.cpu_count()} cores, load average {_load():.1f}; torch "
          f"{torch.__version__}, {args.threads} thread(s) per fit")
    key, s = make_set(work / "cache", args.n, args.t, args.signal)
    print(f"synthetic set: {args.n} clips × audio/text/visual "
          f"(T={args.t or 'offline preset max_len'}) + meta + cond, offline preset chunks and "
          f"codec, signal ×{args.signal}, key {key}, written in {s:.1f} s")

    fs = open_set(work / "cache", "bench")
    t0 = time.perf_counter()
    fs.load(["audio", "text", "visual"], fs.complete.nonzero()[0])
    print(f"cache read (3 modalities with sequences, all rows, f16→f32): "
          f"{time.perf_counter() - t0:.2f} s")

    mods = ["audio", "text", "visual"]
    fit(work / "cache", "bench", "early", ["audio"], seeds=1, epochs=1, runs_dir=work / "warm",
        threads=args.threads)  # one-time imports (torch._dynamo via the optimiser, matplotlib)
    print(f"\none fit = one seed on audio+text+visual with the trainer's defaults; each head "
          f"fitted with seeds {list(range(args.fit_seeds))} in turn, because early stopping "
          f"makes the epoch count (and so the time) vary with the seed (goal ≤ "
          f"{GOAL_FIT_S:.0f} s per fit)")
    print(f"  {'head':8s} {'mean s':>7s} {'min–max s':>11s}  goal  {'epochs':>8s} "
          f"{'s/epoch':>7s} {'set-up s':>8s} {'batch':>5s} {'macro F1':>8s} {'majority':>8s} "
          f"{'probe':>6s}  load")
    for h in heads:
        times, epochs, per_epoch, setup, f1 = [], [], [], [], []
        for seed in range(args.fit_seeds):
            dt, m = time_fit(work / "cache", work / "runs", h, mods, seed, args.threads)
            # epoch 0 (the warm start's probe, scored before any step) is set-up, not an epoch
            rows = [r for r in _log(m) if int(r["epoch"]) > 0]
            times.append(dt)
            epochs.append(len(rows))
            per_epoch.append(float(np.mean([r["epoch_s"] for r in rows])))
            setup.append(dt - sum(r["epoch_s"] for r in rows))
            f1.append(m["macro_f1"])
        batch = tomllib.loads((Path(m["run_dir"]) / "config.toml").read_text())["batch_size"]
        mean = float(np.mean(times))
        print(f"  {h:8s} {mean:7.2f} {min(times):5.1f}–{max(times):<5.1f}  "
              f"{'ok' if mean <= GOAL_FIT_S else 'OVER':4s}  "
              f"{'/'.join(map(str, epochs)):>8s} {np.mean(per_epoch):7.3f} "
              f"{np.mean(setup):8.2f} {batch:5d} {np.mean(f1):8.3f} "
              f"{m['majority_baseline']['macro_f1']:8.3f} {m['linear_probe']['macro_f1']:6.3f}  "
              f"{_load():.1f}")

    grid_heads = [h for h in CORE_HEADS if h in HEADS]
    subsets = [list(c) for r in (1, 2, 3) for c in itertools.combinations(mods, r)]
    n_fits = len(grid_heads) * len(subsets) * 3
    grid_threads = args.grid_threads or max(1, (os.cpu_count() or 1) // args.workers)
    print(f"\ngrid: {len(grid_heads)} heads ({','.join(grid_heads)}) × {len(subsets)} subsets × "
          f"3 seeds = {n_fits} fits, {args.workers} worker(s) × {grid_threads} thread(s) "
          f"(goal ≤ {GOAL_GRID_S:.0f} s; the heads of a subset share its linear probe)")
    if args.grid == "run":
        from fusion.ablate import ablate

        t0 = time.perf_counter()
        df = ablate(work / "cache", "bench", grid_heads, subsets, seeds=3, name="grid",
                    runs_dir=work / "runs", workers=args.workers, threads=grid_threads)
        dt = time.perf_counter() - t0
        failed = df["error"].fillna("").astype(str).str.len() > 0 if "error" in df else []
        print(f"  measured: {dt:.1f} s for {n_fits} fits ({dt / n_fits:.2f} s per fit)  "
              f"[{'ok' if dt <= GOAL_GRID_S else 'OVER GOAL'}]  failed cells: {int(sum(failed))}; "
              f"load average now {_load():.1f}")
        for h in grid_heads:  # each cell's fit (load + 3 seeds) as it ran inside the grid
            d = df[df["fusion"] == h]
            print(f"    {h:8s} cells {d['elapsed_s'].sum():6.1f} s in all "
                  f"({d['elapsed_s'].min():.1f}–{d['elapsed_s'].max():.1f} s per 3-seed cell), "
                  f"macro F1 {d['macro_f1_mean'].min():.3f}–{d['macro_f1_mean'].max():.3f} "
                  f"(majority {d['majority_macro_f1'].max():.3f})")
    else:
        print("  not run (--grid skip)")
    print(f"\nwork folder: {work}")


def _log(m: dict) -> list[dict]:
    """The run's log.csv rows (one per epoch), their numbers as floats (the warm start's `start`
    column stays a word, an empty cell None)."""
    import csv

    def num(k: str, v: str) -> object:
        return v if k == "start" else float(v) if v else None

    path = Path(m["run_dir"]) / "log.csv"
    return [{k: num(k, v) for k, v in r.items()} for r in csv.DictReader(path.open())]


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


if __name__ == "__main__":
    main()
