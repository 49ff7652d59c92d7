"""Scaling core for core: one worker process pinned to one core against two workers on both.

    MMEMO_THREADS=1 .venv/bin/python bench/scaling.py [--n 256]

Runs bench/extract.py twice on the same synthetic sample size (MMEMO_THREADS=1, as `make bench`):
`taskset -c 0 ... --workers 1 --executor process` (one worker process that pays its start-up
inside the timed run, as each of the two does) and `--workers 2`, and prints the wall-time
ratio beside the issue-16 floor (>= 1.7x). Each worker's start-up (imports, model loads) is a
fixed cost per process, so small runs scale worse: measured 1.57x at 64 clips, 1.66x at 128,
1.84x at 256 (BENCHMARKS.md). About 3.5 minutes at 256 clips.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 1.7
WALL = re.compile(r"^full extract :\s+([\d.]+) s", re.M)
STARTUP = re.compile(r"^worker start-up .*?: ([\d.]+) s summed", re.M)


def run(label: str, cmd: list[str]) -> tuple[float, float]:
    print(f"{time.strftime('%H:%M:%S')} {label}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "MMEMO_THREADS": os.environ.get("MMEMO_THREADS", "1")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, start = WALL.search(out.stdout), STARTUP.search(out.stdout)
    if out.returncode != 0 or wall is None:
        sys.exit(f"error: {label}: bench/extract.py failed (exit {out.returncode}): "
                 f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    print(f"{time.strftime('%H:%M:%S')} {label}: {float(wall.group(1)):.1f} s wall", flush=True)
    return float(wall.group(1)), float(start.group(1)) if start else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="synthetic clips (default 256)")
    a = ap.parse_args()
    if shutil.which("taskset") is None:
        sys.exit("error: taskset not found (util-linux): it pins the single worker to one core")
    if (os.cpu_count() or 1) < 2:
        sys.exit("error: this machine has one core: nothing to scale to")
    extract = [sys.executable, str(ROOT / "bench" / "extract.py"), "--n", str(a.n)]
    one, s1 = run("1 worker pinned to core 0", ["taskset", "-c", "0", *extract, "--workers", "1",
                                                "--executor", "process"])
    two, s2 = run("2 workers", [*extract, "--workers", "2"])
    ratio = one / two
    print(f"{a.n} synthetic clips: 1 pinned worker {one:.1f} s (start-up {s1:.1f} s), 2 workers "
          f"{two:.1f} s (start-up {s2:.1f} s summed)")
    print(f"goal scaling 1 pinned worker vs 2 workers >= {FLOOR:g}x: {ratio:.2f}x -> "
          f"{'HOLDS' if ratio >= FLOOR else 'does NOT hold'}")


if __name__ == "__main__":
    main()
