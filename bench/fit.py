"""Benchmark the trainer: one fit per head on a synthetic 10k-clip set, and the ablation grid.

Writes a feature set per the cache contract (3 sequence modalities, T=64, float16, plus a
metadata vector), then times `fusion.train.fit` for each registered head (defaults: 60
epochs max, early stopping, batch 128) and the 4 heads × 7 subsets × 3 seeds grid. The grid
is run for real with --grid run, otherwise extrapolated from measured single fits (and the
output says so). Goals: ≤ 10 s per fit, ≤ 5 min for the grid.

    .venv/bin/python bench/fit.py [--n 10000] [--heads early,late,hybrid,cquery] [--grid run]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from fusion.data import open_set  # noqa: E402
from fusion.heads import HEADS  # noqa: E402
from fusion.train import default_threads, fit  # noqa: E402
from tests.fusion.conftest import write_feature_set  # noqa: E402  (the contract writer)

GOAL_FIT_S, GOAL_GRID_S = 10.0, 300.0
CORE_HEADS = ["early", "late", "hybrid", "cquery"]


def make_set(root: Path, n: int, t: int) -> tuple[str, float]:
    """Write the synthetic set; returns its key and the seconds it took."""
    t0 = time.perf_counter()
    key = write_feature_set(
        root, dataset="bench", n=n, unit_size=512, n_classes=7, n_groups=max(20, n // 40),
        modalities={"audio": (25, 88, t, 0.4), "text": (384, 384, t, 0.4),
                    "visual": (64, 64, t, 0.2)},
        meta_dim=16, cond_dim=384, class_probs=[0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05],
    )
    return key, time.perf_counter() - t0


def time_fit(root: Path, runs: Path, head: str, mods: list[str], seeds: int, threads: int,
             epochs: int = 60) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = fit(root, "bench", head, mods, seeds=seeds, runs_dir=runs, threads=threads,
            epochs=epochs, name=f"{head}-{'+'.join(mods)}-{seeds}-{epochs}")
    return time.perf_counter() - t0, r.metrics


def measure_head(root: Path, runs: Path, head: str, threads: int, cap_s: float
                 ) -> tuple[float, str]:
    """Seconds for one default fit (1 seed, all modalities): measured, or extrapolated.

    A 2-epoch probe gives the fixed cost and the time per epoch; when the default fit
    (≤ 60 epochs, early stopping) could exceed `cap_s`, its time is extrapolated to the
    worst case of 60 epochs instead of being run, and the line says so.
    """
    mods = ["audio", "text", "visual"]
    dt2, m2 = time_fit(root, runs, head, mods, 1, threads, epochs=2)
    per_epoch = float(np.mean([r["epoch_s"] for r in _log(m2)]))
    fixed = max(0.0, dt2 - 2 * per_epoch)
    worst = fixed + 60 * per_epoch
    if worst > cap_s:
        return worst, (f"EXTRAPOLATED {fixed:.1f} s fixed + 60 × {per_epoch:.2f} s/epoch "
                       "(worst case: no early stop)")
    dt, m = time_fit(root, runs, head, mods, 1, threads)
    ep = m["seeds"][0]["epochs_run"][0]
    return dt, (f"measured, {ep} epochs ({per_epoch:.3f} s/epoch), macro F1 {m['macro_f1']:.3f} "
                f"vs majority {m['majority_baseline']['macro_f1']:.3f}")


def _log(m: dict) -> list[dict]:
    import csv

    path = Path(m["run_dir"]) / "log.csv"
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(path.open())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--t", type=int, default=64)
    ap.add_argument("--heads", default=",".join(dict.fromkeys(
        [h for h in CORE_HEADS if h in HEADS] + list(HEADS))))
    ap.add_argument("--grid", choices=["estimate", "run"], default="estimate")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--cap", type=float, default=120.0,
                    help="extrapolate a head's fit instead of running it past this many seconds")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    heads = list(dict.fromkeys(h for h in args.heads.split(",") if h))

    work = args.dir or Path(tempfile.mkdtemp(prefix="mmemo-bench-"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f}; torch threads {args.threads}")
    key, s = make_set(work / "cache", args.n, args.t)
    print(f"synthetic set: {args.n} clips × audio/text/visual (T={args.t}) + meta + cond, "
          f"key {key}, written in {s:.1f} s")

    fs = open_set(work / "cache", "bench")
    t0 = time.perf_counter()
    fs.load(["audio", "text", "visual"], fs.complete.nonzero()[0])
    print(f"cache read (3 modalities, all rows, f16→f32): {time.perf_counter() - t0:.2f} s")

    per_fit: dict[str, float] = {}
    print(f"\none fit per head (1 seed, all modalities, defaults; goal ≤ {GOAL_FIT_S:.0f} s):")
    for h in heads:
        dt, how = measure_head(work / "cache", work / "runs", h, args.threads, args.cap)
        per_fit[h] = dt
        flag = "ok" if dt <= GOAL_FIT_S else "OVER GOAL"
        print(f"  {h:8s} {dt:8.2f} s  [{flag}]  {how}")

    grid_heads = [h for h in CORE_HEADS if h in per_fit]
    subsets = [list(c) for r in (1, 2, 3) for c in itertools.combinations(
        ["audio", "text", "visual"], r)]
    n_fits = len(grid_heads) * len(subsets) * 3
    print(f"\ngrid: {len(grid_heads)} heads × {len(subsets)} subsets × 3 seeds = {n_fits} fits "
          f"(goal ≤ {GOAL_GRID_S:.0f} s)")
    if args.grid == "run":
        from fusion.ablate import ablate

        t0 = time.perf_counter()
        ablate(work / "cache", "bench", grid_heads, subsets, seeds=3, name="grid",
               runs_dir=work / "runs", workers=args.workers)
        dt = time.perf_counter() - t0
        print(f"  measured: {dt:.1f} s with {args.workers} worker(s)  "
              f"[{'ok' if dt <= GOAL_GRID_S else 'OVER GOAL'}]")
    else:
        est = sum(per_fit[h] for h in grid_heads) * len(subsets) * 3
        print(f"  EXTRAPOLATED (not run): ≈ {est:.0f} s sequential = sum of the measured "
              f"all-modality single fits × {len(subsets)} subsets × 3 seeds (an upper bound: "
              f"subsets with fewer modalities are cheaper); ≈ {est / max(1, args.workers):.0f} s "
              f"over {args.workers} worker(s)  [{'ok' if est <= GOAL_GRID_S else 'OVER GOAL'}]")
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
