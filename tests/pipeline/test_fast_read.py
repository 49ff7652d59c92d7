"""cacheformat's fast unit reader returns exactly what zarr returns, for every layout mmemo writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline import cacheformat as cf
from pipeline.store import codec


def _array(tmp_path, compression, shape, unit, inner, dtype, rows_written):
    g = zarr.open_group(tmp_path / f"g-{compression}-{unit}-{inner}-{np.dtype(dtype).name}", mode="w",
                        zarr_format=3)
    chunks = (min(unit, inner), *shape[1:])
    shards = (unit, *shape[1:]) if inner < unit else None
    a = g.create_array("m/seq", shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                       compressors=codec(compression, 3), fill_value=0)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(shape) * 10).astype(dtype)
    for lo, hi in rows_written:  # whole units, as commit_unit writes them; the rest stays unwritten
        a[lo:hi] = data[lo:hi]
    return a


@pytest.mark.parametrize("compression", ["zstd", "blosc-lz4", "none"])
@pytest.mark.parametrize("unit,inner", [(40, 8), (40, 40), (32, 128)])
@pytest.mark.parametrize("dtype", ["float16", "int32", "bool"])
def test_fast_reads_equal_zarr(tmp_path, compression, unit, inner, dtype):
    n = 150  # last unit partial; unit 1 never written (fill value)
    shape = (n, 7, 3) if dtype == "float16" else (n,)
    units = [(u * unit, min(n, (u + 1) * unit)) for u in range(-(-n // unit)) if u != 1]
    a = _array(tmp_path, compression, shape, unit, inner, dtype, units)
    assert cf._fast_layout(a) is not None
    ref = np.asarray(a[:])
    np.testing.assert_array_equal(cf.read_slice(a, 0, n), ref)
    np.testing.assert_array_equal(cf.read_slice(a, 5, 133), ref[5:133])
    np.testing.assert_array_equal(cf.read_slice(a, n - 3, n), ref[n - 3:])
    rng = np.random.default_rng(1)
    for k in (1, 9, 60):
        rows = np.sort(rng.choice(n, k, replace=False))
        np.testing.assert_array_equal(cf.read_rows(a, rows), ref[rows])
        np.testing.assert_array_equal(cf.read_units(a, rows), ref[rows])


def test_corrupt_shard_index_is_an_error(tmp_path):
    a = _array(tmp_path, "zstd", (80, 4), 40, 8, "float16", [(0, 40), (40, 80)])
    f = tmp_path / "g-zstd-40-8-float16" / "m" / "seq" / "c" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # inside the index: the crc32c no longer matches
    f.write_bytes(bytes(raw))
    with pytest.raises(cf.FormatError, match="checksum"):
        cf.read_slice(a, 0, 80)


def test_unsupported_layouts_fall_back_to_zarr(tmp_path):
    g = zarr.open_group(tmp_path / "s", mode="w", zarr_format=3)
    a = g.create_array("ids", shape=(5,), dtype=str, chunks=(5,))
    a[:] = np.array(list("abcde"), dtype=object)
    assert cf._fast_layout(a) is None
    b = g.create_array("cols", shape=(6, 4), dtype="float32", chunks=(3, 2))  # chunked along D too
    b[:] = np.arange(24, dtype="float32").reshape(6, 4)
    assert cf._fast_layout(b) is None
    np.testing.assert_array_equal(cf.read_slice(b, 1, 5), np.arange(24).reshape(6, 4)[1:5])


def test_read_units_any_order(tmp_path):
    a = _array(tmp_path, "zstd", (90, 3), 30, 10, "float16", [(0, 30), (30, 60), (60, 90)])
    ref = np.asarray(a[:])
    rows = np.array([70, 3, 45, 3, 89, 0])
    np.testing.assert_array_equal(cf.read_units(a, rows), ref[rows])


def test_reads_in_a_forked_child_after_the_parent_used_the_pool(tmp_path):
    import multiprocessing as mp

    a = _array(tmp_path, "zstd", (90, 3), 30, 10, "float16", [(0, 30), (30, 60), (60, 90)])
    ref = np.asarray(a[:])
    np.testing.assert_array_equal(cf.read_slice(a, 0, 90), ref)  # the parent's pool now exists
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_read, (str(tmp_path / "g-zstd-30-10-float16"),)).get(timeout=60)
    np.testing.assert_array_equal(got, ref)


def _child_read(path: str) -> np.ndarray:
    g = zarr.open_group(path, mode="r")
    return cf.read_slice(g["m/seq"], 0, 90)
