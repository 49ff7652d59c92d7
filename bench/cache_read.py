"""How fast does the trainer load features from the cache, next to raw disk reads?

Builds a realistic feature set through the Store API (create_set + one commit_unit per work
unit, as the extractor does): N clips, three sequence modalities (audio D=25, text D=384,
visual D=300 by default), T=64, float16, with per-clip valid lengths so that the padding is
zeros as in real sets. Then, for each compression (zstd, blosc-lz4, none), it reports:

- write time and the compression ratio (bytes the arrays hold / bytes on disk);
- load throughput of whole modalities for all clips (seq + pooled + present + len, the way
  fusion/data.py reads them) and of a random 10% subset of clips (orthogonal indexing);
- the raw sequential read throughput of the same chunk files (a `cat`-like read).

Cold reads: there is no root here to write /proc/sys/vm/drop_caches, so the bench calls
`os.sync()` and then `posix_fadvise(POSIX_FADV_DONTNEED)` on every file of the set, which
evicts its clean pages from the page cache; it says when that is unavailable. Each read is
also repeated warm (pages cached) so both numbers are shown.

Random normal values are nearly incompressible in float16; the ratio comes from the zero
padding, which is what real sets have too (real features compress a little better).

    .venv/bin/python bench/cache_read.py                # N=8000 (about 2.5 min on 2 cores)
    .venv/bin/python bench/cache_read.py --n 20000      # the 20k-clip set
    .venv/bin/python bench/cache_read.py --n 4000 --codecs zstd
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cacheformat as cf  # noqa: E402
from pipeline.store import ModalityLayout, SetLayout, Store  # noqa: E402

FLOOR = 0.70  # issue 16: a load reaches at least 70 % of a raw read of the same files
MODS = {"audio": (25, 88), "text": (384, 384), "visual": (300, 300)}  # seq dim, pooled dim


def files_of(path: Path, rels: list[str]) -> list[Path]:
    out = []
    for rel in rels:
        out.extend(p for p in sorted((path / cf.chunk_prefix(rel)).rglob("*")) if p.is_file())
    return out


def evict(files: list[Path]) -> bool:
    """Drop these files' pages from the page cache (best effort, no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def raw_read(files: list[Path]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    buf = bytearray(1 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                n += k
    return n, time.perf_counter() - t0


def load(set_path: Path, rows: np.ndarray | None, reader: str) -> tuple[int, float]:
    """Read every modality's arrays for `rows` (None = all clips); returns (bytes, seconds).

    reader="zarr": zarr's own indexing (`arr[:]`, `arr.oindex[rows]`), the path before the
    fast reader; reader="mmemo": `cacheformat.read_rows` / `read_slice`, what fusion/data.py uses
    (whole unit files, chunks decoded on a thread pool, only the units holding `rows`)."""
    t0 = time.perf_counter()
    g = zarr.open_group(set_path, mode="r")
    nbytes = 0
    for m in MODS:
        for part in (cf.SEQ, cf.POOLED, cf.PRESENT, cf.LEN):
            arr = g[cf.modality_array(m, part)]
            if reader == "zarr":
                a = np.asarray(arr[:] if rows is None else arr.oindex[rows])
            else:
                a = cf.read_slice(arr, 0, arr.shape[0]) if rows is None else cf.read_rows(arr, rows)
            nbytes += a.nbytes
    return nbytes, time.perf_counter() - t0


def build(root: Path, n: int, t: int, unit_size: int, compression: str, seed: int) -> tuple[Path, float]:
    store = Store(root)
    mods = {m: ModalityLayout(m, pooled_dim=dp, seq_dim=d, max_len=t) for m, (d, dp) in MODS.items()}
    layout = SetLayout(n=n, unit_size=unit_size, modalities=mods, compression=compression, level=3)
    static = {
        cf.IDS: np.array([f"clip{i:06d}" for i in range(n)], dtype=object),
        cf.SPLIT: np.array(["train"] * n, dtype=object),
        cf.GROUP: np.array([f"g{i % 97}" for i in range(n)], dtype=object),
        cf.LABEL: (np.arange(n) % 7).astype(np.int32),
    }
    t0 = time.perf_counter()
    fs = store.create_set(f"bench-{compression}", layout, {"dataset": "bench", "preset": compression}, static)
    rng = np.random.default_rng(seed)
    for u in range(layout.n_units):
        a, b = layout.unit_range(u)
        k = b - a
        data: dict[str, np.ndarray] = {}
        for m, (d, dp) in MODS.items():
            lens = rng.integers(8, t + 1, k).astype(np.int32)
            seq = rng.standard_normal((k, t, d), dtype=np.float32).astype(np.float16)
            seq[np.arange(t)[None, :] >= lens[:, None]] = 0  # zero padding after the valid length
            data[cf.seq(m)] = seq
            data[cf.length(m)] = lens
            data[cf.pooled(m)] = rng.standard_normal((k, dp), dtype=np.float32).astype(np.float16)
            data[cf.present(m)] = rng.random(k) > 0.05
        fs.commit_unit(u, data)
    return fs.path, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8000,
                    help="clips (default 8000: about 2.5 min here; 20000 takes about 6 min)")
    ap.add_argument("--t", type=int, default=64, help="sequence length T")
    ap.add_argument("--unit-size", type=int, default=256, help="clips per unit = per shard file")
    ap.add_argument("--codecs", default="zstd,blosc-lz4,none")
    ap.add_argument("--dir", default=None, help="where to build the sets (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each read (medians reported)")
    args = ap.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mmemo-bench-"))
    rng = np.random.default_rng(args.seed)
    subset = np.sort(rng.choice(args.n, size=max(1, args.n // 10), replace=False))
    rels = [cf.modality_array(m, p) for m in MODS for p in (cf.SEQ, cf.POOLED, cf.PRESENT, cf.LEN)]
    mb = 1e6
    med = statistics.median
    print(f"# cache read bench: N={args.n} T={args.t} dims={ {m: d for m, (d, _) in MODS.items()} } "
          f"float16, unit_size={args.unit_size}, repeats={args.repeats} (medians), "
          f"read threads={cf._read_threads()}, load average {os.getloadavg()[0]:.1f}, dir={base}")
    print("speed = raw sequential read time of the same files / load time (floor 0.70 = "
          f"{FLOOR:.0%} of raw); MB/s = decoded bytes per second")
    print("| codec | ratio | on disk MB | write s | read | reader | cold MB/s | cold speed | warm MB/s | warm speed | raw cold / warm MB/s (disk bytes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    held: dict[str, list[bool]] = {}
    try:
        for codec in args.codecs.split(","):
            root = base / codec
            path, wsec = build(root, args.n, args.t, args.unit_size, codec, args.seed)
            files = files_of(path, rels)
            disk = sum(p.stat().st_size for p in files)
            raw_bytes = 0
            g = zarr.open_group(path, mode="r")
            for rel in rels:
                a = g[rel]
                raw_bytes += int(np.prod(a.shape)) * a.dtype.itemsize
            cold_ok = True
            rows_out = []
            for label, rows in (("all clips", None), ("random 10%", subset)):
                # the same files a load touches: all of them (10% random rows hit almost every unit)
                units = set() if rows is None else set((rows // args.unit_size).tolist())
                touched = files if rows is None else [f for f in files if _unit_of(f) in units]
                raw_c, raw_w = [], []
                res: dict[str, tuple[list[float], list[float], int]] = {"zarr": ([], [], 0), "mmemo": ([], [], 0)}
                for _ in range(args.repeats):
                    cold_ok = evict(touched) and cold_ok
                    rb, rsec = raw_read(touched)
                    raw_c.append(rsec)
                    raw_w.append(raw_read(touched)[1])
                    for reader in ("zarr", "mmemo"):
                        evict(touched)
                        nb, sec = load(path, rows, reader)
                        nb2, sec2 = load(path, rows, reader)
                        res[reader][0].append(sec)
                        res[reader][1].append(sec2)
                        res[reader] = (res[reader][0], res[reader][1], nb)
                for k, reader in enumerate(("zarr", "mmemo")):
                    cs, ws, nb = res[reader]
                    c_speed, w_speed = med(raw_c) / med(cs), med(raw_w) / med(ws)
                    if reader == "mmemo":
                        held.setdefault(codec, []).extend([c_speed >= FLOOR, w_speed >= FLOOR])
                    head = (f"| {codec} | {raw_bytes / disk:.2f} | {disk / mb:.0f} | {wsec:.1f}"
                            if not rows_out else "| | | |")
                    what = f"{label} ({len(touched)} files)" if k == 0 else ""
                    raw = (f"{rb / mb / med(raw_c):.0f} / {rb / mb / med(raw_w):.0f}" if k == 0 else "")
                    line = (f"{head} | {what} | {reader} | {nb / mb / med(cs):.0f} | {c_speed:.2f} | "
                            f"{nb / mb / med(ws):.0f} | {w_speed:.2f} | {raw} |")
                    rows_out.append(line)
                    print(line, flush=True)
            if not cold_ok:
                print("(posix_fadvise unavailable: 'cold' reads may be served from the page cache)")
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print("cold = after os.sync + POSIX_FADV_DONTNEED on every file read, warm = repeated read; "
          "raw = a cat-like read of the same chunk files.")
    for codec, ok in held.items():
        print(f"goal cache load >= {FLOOR:.2f} x raw read (mmemo reader, cold and warm, all + 10%), "
              f"{codec}: {'HOLDS' if all(ok) else 'does NOT hold'}")


def _unit_of(f: Path) -> int:
    """The unit (first chunk-grid coordinate) of a chunk file .../<array>/c/<u>[/0/0]."""
    parts = f.parts
    return int(parts[parts.index("c", len(parts) - 5) + 1])


if __name__ == "__main__":
    main()
