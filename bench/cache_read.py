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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cacheformat as cf  # noqa: E402
from pipeline.store import ModalityLayout, SetLayout, Store  # noqa: E402

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


def load(set_path: Path, rows: np.ndarray | None, unit_size: int, how: str = "oindex") -> tuple[int, float]:
    """Read every modality's arrays for `rows` (None = all clips); returns (bytes, seconds).

    how="oindex": zarr orthogonal indexing of the rows; how="units": read each touched unit
    (= one shard/chunk) whole with a slice and select the rows in numpy."""
    t0 = time.perf_counter()
    g = zarr.open_group(set_path, mode="r")
    nbytes = 0
    for m in MODS:
        for part in (cf.SEQ, cf.POOLED, cf.PRESENT, cf.LEN):
            arr = g[cf.modality_array(m, part)]
            if rows is None:
                a = np.asarray(arr[:])
            elif how == "oindex":
                a = np.asarray(arr.oindex[rows])
            else:
                parts = []
                for u in np.unique(rows // unit_size):
                    lo, hi = int(u) * unit_size, min(arr.shape[0], (int(u) + 1) * unit_size)
                    sel = rows[(rows >= lo) & (rows < hi)] - lo
                    parts.append(np.asarray(arr[lo:hi])[sel])
                a = np.concatenate(parts)
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
    args = ap.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mmemo-bench-"))
    rng = np.random.default_rng(args.seed)
    subset = np.sort(rng.choice(args.n, size=max(1, args.n // 10), replace=False))
    rels = [cf.modality_array(m, p) for m in MODS for p in (cf.SEQ, cf.POOLED, cf.PRESENT, cf.LEN)]
    mb = 1e6
    print(f"# cache read bench: N={args.n} T={args.t} dims={ {m: d for m, (d, _) in MODS.items()} } "
          f"float16, unit_size={args.unit_size}, dir={base}")
    print("| codec | ratio | on disk MB | write s | read | cold MB/s | cold clips/s | warm MB/s | warm clips/s | raw cold MB/s (disk bytes) | raw warm MB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
            cold_ok = evict(files)
            rb, rsec = raw_read(files)
            rb2, rsec2 = raw_read(files)
            results = []
            for label, rows, how in (("all clips", None, ""), ("random 10%, oindex", subset, "oindex"),
                                     ("random 10%, whole units + select", subset, "units")):
                evict(files)
                nb, sec = load(path, rows, args.unit_size, how)
                nb2, sec2 = load(path, rows, args.unit_size, how)
                nclips = args.n if rows is None else len(rows)
                results.append((label, nb / mb / sec, nclips / sec, nb2 / mb / sec2, nclips / sec2))
            for i, (label, c_mbs, c_cps, w_mbs, w_cps) in enumerate(results):
                head = (f"| {codec} | {raw_bytes / disk:.2f} | {disk / mb:.0f} | {wsec:.1f}"
                        if i == 0 else "| | | |")
                raw = (f"{rb / mb / rsec:.0f} | {rb2 / mb / rsec2:.0f}" if i == 0 else " | ")
                print(f"{head} | {label} | {c_mbs:.0f} | {c_cps:.0f} | {w_mbs:.0f} | {w_cps:.0f} | {raw} |",
                      flush=True)
            if not cold_ok:
                print("(posix_fadvise unavailable: 'cold' reads may be served from the page cache)")
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print("MB/s of a load = decoded array bytes returned per second; raw = on-disk bytes per second; "
          "cold = after os.sync + POSIX_FADV_DONTNEED on every chunk file, warm = repeated read.")


if __name__ == "__main__":
    main()
