"""The feature store's guarantees, exercised through its API (no extractor, no models).

Claims and leases, commit order (data, then marker), NaN refusal, what readers see, the
set-creation race between processes, aliases, relocatable cache roots, permissions, and the
maintenance tools built on the checksums (verify, gc, list/info).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import cachetools
from pipeline.store import (
    LostClaim,
    ModalityLayout,
    SetLayout,
    Store,
)


def small_layout(n: int = 10, unit_size: int = 4) -> SetLayout:
    return SetLayout(
        n=n,
        unit_size=unit_size,
        modalities={
            "audio": ModalityLayout("audio", pooled_dim=5, seq_dim=3, max_len=6),
            "meta": ModalityLayout("meta", pooled_dim=2),
        },
    )


def static_for(n: int) -> dict[str, np.ndarray]:
    return {
        "ids": np.array([f"c{i}" for i in range(n)], dtype=object),
        "split": np.array(["train" if i % 3 else "test" for i in range(n)], dtype=object),
        "group": np.array([f"g{i % 2}" for i in range(n)], dtype=object),
        "label": (np.arange(n) % 3).astype(np.int32),
    }


def unit_data(layout: SetLayout, u: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic per-unit arrays (different per unit, some clips absent)."""
    a, b = layout.unit_range(u)
    rng = np.random.default_rng(seed * 1000 + u)
    k = b - a
    out: dict[str, np.ndarray] = {}
    for name, m in layout.modalities.items():
        present = rng.random(k) > 0.2
        out[f"{name}/pooled"] = (rng.standard_normal((k, m.pooled_dim)) * present[:, None]).astype(np.float16)
        out[f"{name}/present"] = present
        if m.is_sequence:
            out[f"{name}/seq"] = rng.standard_normal((k, m.max_len, m.seq_dim)).astype(np.float16)
            out[f"{name}/len"] = rng.integers(1, m.max_len + 1, k).astype(np.int32)
    return out


def make_set(root: Path, key: str = "ds-0001", n: int = 10, unit_size: int = 4, commit: bool = True,
             seed: int = 0):
    store = Store(root)
    layout = small_layout(n, unit_size)
    fs = store.create_set(key, layout, {"dataset": "ds", "preset": "p"}, static_for(n))
    if commit:
        for u in range(layout.n_units):
            fs.commit_unit(u, unit_data(layout, u, seed))
    store.set_alias("ds", "p", key)
    return store, fs


def read_all(set_path: Path) -> dict[str, np.ndarray]:
    """Every array of a set, by relative path."""
    g = zarr.open_group(set_path, mode="r")
    out = {}

    def walk(grp, prefix=""):
        for name, item in grp.members():
            rel = f"{prefix}{name}"
            if isinstance(item, zarr.Array):
                out[rel] = np.asarray(item[:])
            else:
                walk(item, rel + "/")

    walk(g)
    return out


# --- claims ----------------------------------------------------------------------------------
def test_claim_is_exclusive_and_released(tmp_path):
    store, fs = make_set(tmp_path / "c", commit=False)
    c1 = store.claim(fs.key, 0, lease_s=60)
    assert c1 is not None and c1.path.exists()
    assert store.claim(fs.key, 0, lease_s=60) is None  # O_EXCL: a live claim blocks
    assert store.claim(fs.key, 1, lease_s=60) is not None  # other units are free
    body = json.loads(c1.path.read_text())
    assert body["pid"] == os.getpid() and body["expires"] > time.time()
    store.release(c1)
    assert not c1.path.exists()
    assert store.claim(fs.key, 0, lease_s=60) is not None


def test_expired_lease_is_taken_over_and_stale_owner_cannot_commit(tmp_path):
    store, fs = make_set(tmp_path / "c", commit=False)
    stale = store.claim(fs.key, 0, lease_s=0.2)
    assert stale is not None
    assert store.claim(fs.key, 0, lease_s=60) is None  # still live
    time.sleep(0.3)
    fresh = store.claim(fs.key, 0, lease_s=60)
    assert fresh is not None and fresh.token != stale.token
    assert not store.owns(stale) and store.owns(fresh)
    with pytest.raises(LostClaim):
        fs.commit_unit(0, unit_data(fs.layout, 0), claim=stale)
    assert not fs.is_done(0)
    # the stale owner wrote nothing visible: no chunk file of unit 0 exists
    assert not list(fs.path.glob("*/*/c/0*")) and not list(fs.path.glob("*/*/c/0/**/*"))
    store.release(stale)  # releasing a lost claim must not delete the new owner's claim
    assert fresh.path.exists()
    fs.commit_unit(0, unit_data(fs.layout, 0), claim=fresh)
    assert fs.is_done(0)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import socket

    store, fs = make_set(tmp_path / "c", commit=False)
    held = store.claim(fs.key, 0, lease_s=3600)
    body = json.loads(held.path.read_text())
    assert body["host"] == socket.gethostname() and body["lease"] == 3600
    assert store.claim(fs.key, 0, lease_s=3600) is None  # our own process is alive: live
    assert store.holder(fs.key, 0)["state"] == "live"
    # the same claim, made by a process that is gone: an hour of lease left, taken at once
    body["pid"], body["pid_start"] = _dead_pid(), None
    held.path.write_text(json.dumps(body))
    assert store.holder(fs.key, 0)["state"] == "dead"
    assert [r["state"] for r in store.claims()] == ["dead"]
    fresh = store.claim(fs.key, 0, lease_s=3600)
    assert fresh is not None and store.owns(fresh) and not store.owns(held)
    # a claim from another host is judged by its lease only (its pid means nothing here)
    body2 = json.loads(fresh.path.read_text())
    body2.update(host="some-other-node", pid=_dead_pid())
    fresh.path.write_text(json.dumps(body2))
    assert store.holder(fs.key, 0)["state"] == "live"
    assert store.claim(fs.key, 0, lease_s=3600) is None


def test_a_done_units_leftover_claim_is_cleared_only_when_its_holder_is_gone(tmp_path):
    """A writer stopped between commit and release leaves a done unit's claim behind; it is
    removed once its holder is dead (or its lease ran out), never while it is live."""
    store, fs = make_set(tmp_path / "c", commit=False)
    held = store.claim(fs.key, 0, lease_s=3600)
    fs.commit_unit(0, unit_data(fs.layout, 0), claim=held)  # committed, not released
    assert fs.is_done(0) and held.path.exists()
    assert store.clear_stale_claim(fs.key, 0, 3600) is False  # our process is alive: live
    assert held.path.exists()
    body = json.loads(held.path.read_text())
    body["pid"], body["pid_start"] = _dead_pid(), None
    held.path.write_text(json.dumps(body))
    assert store.clear_stale_claim(fs.key, 0, 3600) is True
    assert not held.path.exists() and store.claims() == []
    assert store.clear_stale_claim(fs.key, 0, 3600) is False  # nothing left to clear


def test_heartbeat_renews_the_lease_while_the_unit_is_worked_on(tmp_path):
    from pipeline.store import Heartbeat

    store, fs = make_set(tmp_path / "c", commit=False)
    claim = store.claim(fs.key, 0, lease_s=0.6)
    first = json.loads(claim.path.read_text())["expires"]
    with Heartbeat(store, claim) as beat:
        time.sleep(1.5)  # 2.5 leases: without the heartbeat the claim would have expired
        assert store.claim(fs.key, 0, lease_s=60) is None
        assert json.loads(claim.path.read_text())["expires"] > first + 0.5
        assert not beat.lost
    time.sleep(0.8)  # the heartbeat stopped: the lease now runs out
    assert store.holder(fs.key, 0)["state"] == "expired"
    assert store.claim(fs.key, 0, lease_s=60) is not None


def test_a_taken_over_claim_stops_its_heartbeat(tmp_path):
    from pipeline.store import Heartbeat

    store, fs = make_set(tmp_path / "c", commit=False)
    claim = store.claim(fs.key, 0, lease_s=0.4)
    with Heartbeat(store, claim) as beat:
        claim.path.write_text(json.dumps({"token": "someone-else", "expires": time.time() + 60}))
        time.sleep(0.4)
        assert beat.lost  # it never overwrites another worker's claim
    assert json.loads(claim.path.read_text())["token"] == "someone-else"


# --- commits ---------------------------------------------------------------------------------
def test_commit_writes_data_then_marker_with_checksums(tmp_path):
    store, fs = make_set(tmp_path / "c", commit=False)
    order: list[str] = []
    real_replace = os.replace

    def spy(src, dst):
        order.append(Path(dst).relative_to(fs.path).as_posix())
        return real_replace(src, dst)

    os.replace = spy
    try:
        marker = fs.commit_unit(1, unit_data(fs.layout, 1))
    finally:
        os.replace = real_replace
    assert order[-1] == "units/1.done", order
    chunk_moves = [o for o in order if "/c/" in o and not o.startswith("tmp/")]  # not zarr's own
    assert set(chunk_moves) == set(marker["checksums"])
    # every per-unit array has its chunk, and the marker covers exactly rows 4:8
    assert {k.split("/c/")[0] for k in marker["checksums"]} == set(fs.layout.unit_arrays())
    assert (marker["start"], marker["stop"]) == (4, 8)
    got = read_all(fs.path)
    want = unit_data(fs.layout, 1)
    for rel, arr in want.items():
        np.testing.assert_array_equal(got[rel][4:8], arr)
    assert not any((fs.path / "tmp").iterdir())  # staging cleaned


def test_nan_and_bad_shapes_are_refused_and_leave_nothing(tmp_path):
    store, fs = make_set(tmp_path / "c", commit=False)
    bad = unit_data(fs.layout, 0)
    bad["audio/seq"][1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fs.commit_unit(0, bad)
    inf = unit_data(fs.layout, 0)
    inf["meta/pooled"][0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        fs.commit_unit(0, inf)
    short = unit_data(fs.layout, 0)
    short["audio/pooled"] = short["audio/pooled"][:2]
    with pytest.raises(ValueError, match="shape"):
        fs.commit_unit(0, short)
    missing = unit_data(fs.layout, 0)
    del missing["meta/present"]
    with pytest.raises(ValueError, match="missing"):
        fs.commit_unit(0, missing)
    assert not fs.is_done(0)
    header = json.loads((fs.units_dir / "header.done").read_text())["checksums"]
    written = [p.relative_to(fs.path).as_posix() for p in fs.path.rglob("*") if p.is_file()]
    assert sorted(set(written) - set(header)) == ["units/header.done"]


def test_recommit_replaces_every_chunk_even_all_zero_ones(tmp_path):
    """A repair/--force recommit whose data is all fill value must still replace the old file."""
    store, fs = make_set(tmp_path / "c")
    fs.clear_unit(0)
    zeros = {k: np.zeros_like(v) for k, v in unit_data(fs.layout, 0).items()}
    marker = fs.commit_unit(0, zeros)
    assert {k.split("/c/")[0] for k in marker["checksums"]} == set(fs.layout.unit_arrays())
    got = read_all(fs.path)
    for rel in zeros:
        assert not got[rel][0:4].any(), rel
    assert cachetools.verify(tmp_path / "c")[0].clean


def test_readers_use_only_units_with_markers(tmp_path, monkeypatch):
    """A writer killed between its chunk renames and its marker leaves rows readers skip."""
    import pipeline.store as st
    from fusion.data import open_set

    store, fs = make_set(tmp_path / "c", commit=False)
    fs.commit_unit(0, unit_data(fs.layout, 0))

    def crash(path, obj):
        raise KeyboardInterrupt("killed before the marker")

    monkeypatch.setattr(st, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        fs.commit_unit(1, unit_data(fs.layout, 1))
    monkeypatch.undo()
    assert list(fs.path.glob("audio/seq/c/1/*"))  # its data files are in place...
    fset = open_set(tmp_path / "c", key=fs.key)
    assert fset.complete.tolist() == [True] * 4 + [False] * 6  # ...but readers skip them
    rep = cachetools.verify(tmp_path / "c")[0]
    assert rep.missing_units == [1, 2] and rep.bad_units == [1, 2] and not rep.orphans
    assert not rep.clean and rep.header_ok


# --- creation race ---------------------------------------------------------------------------
def _create_worker(root: str, barrier, q) -> None:
    store = Store(root)
    barrier.wait()
    fs = store.create_set("race-1", small_layout(40, 8), {"dataset": "ds", "preset": "p"}, static_for(40))
    q.put((fs.attrs["created_at"], fs.attrs["created_by"], fs.ids()[:3]))


def test_set_creation_race_between_processes(tmp_path):
    root = tmp_path / "c"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    q = ctx.Queue()
    procs = [ctx.Process(target=_create_worker, args=(str(root), barrier, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len({r[0:2] for r in results}) == 1  # everyone uses the winner's set
    assert all(r[2] == ["c0", "c1", "c2"] for r in results)
    assert [p.name for p in (root / "sets").iterdir()] == ["race-1"]  # no temporaries left
    rep = cachetools.verify(root, "race-1")[0]
    assert rep.header_ok and rep.units_done == 0 and not rep.orphans


# --- aliases and lookups -----------------------------------------------------------------------
def test_aliases_resolve_and_explain_misses(tmp_path):
    store, fs = make_set(tmp_path / "c")
    store.set_alias("ds", "full", fs.key)
    assert store.resolve("ds", "p") == fs.key
    assert store.aliases() == {"ds/p": fs.key, "ds/full": fs.key}
    assert cachetools.resolve_key(tmp_path / "c", "ds/full") == fs.key
    assert cachetools.resolve_key(tmp_path / "c", fs.key) == fs.key
    with pytest.raises(FileNotFoundError, match="mmemo extract --dataset other"):
        store.resolve("other", "offline")
    with pytest.raises(FileNotFoundError, match="known"):
        cachetools.resolve_key(tmp_path / "c", "nope")
    rows = cachetools.list_sets(tmp_path / "c")
    assert len(rows) == 1
    r = rows[0]
    assert r["key"] == fs.key and sorted(r["aliases"]) == ["ds/full", "ds/p"]
    assert (r["n"], r["units"], r["done"], r["failures"]) == (10, 3, 3, 0)
    assert r["size"] > 0 and r["size_h"].endswith(("B", "KiB"))
    assert r["dataset"] == "ds" and r["preset"] == "p" and "@" in r["created_by"]


def test_set_info_counts_present_over_done_units_and_ledger(tmp_path):
    store, fs = make_set(tmp_path / "c", commit=False)
    d0 = unit_data(fs.layout, 0)
    fs.commit_unit(0, d0, failures=[{"id": "c1", "stage": "audio", "error": "ClipError", "message": "x"},
                                    {"id": "c2", "stage": "audio", "error": "ClipError", "message": "y"}])
    d2 = unit_data(fs.layout, 2)
    fs.commit_unit(2, d2)
    info = cachetools.set_info(tmp_path / "c", "ds/p")
    assert info["units"] == {"total": 3, "unit_size": 4, "done": 2, "missing": [1]}
    want = int(d0["audio/present"].sum() + d2["audio/present"].sum())
    assert info["modalities"]["audio"]["present"] == want
    assert info["modalities"]["audio"]["absent"] == 6 - want
    assert info["modalities"]["audio"]["seq_dim"] == 3 and info["modalities"]["meta"]["kind"] == "vector"
    assert info["ledger"]["by_stage"] == {"audio": 2} and info["ledger"]["clips"] == 2
    assert info["clips"] == {"n": 10, "in_done_units": 6}


# --- relocation and permissions ------------------------------------------------------------------
def test_cache_root_can_be_copied_and_moved(tmp_path):
    src = tmp_path / "orig" / "cache"
    store, fs = make_set(src)
    want = read_all(fs.path)
    for f in src.rglob("*"):  # no absolute path of the original root is recorded anywhere
        if f.is_file():
            assert str(src).encode() not in f.read_bytes(), f
    copied = tmp_path / "copy" / "elsewhere"
    shutil.copytree(src, copied)
    moved = tmp_path / "moved"
    os.rename(src, moved)
    for root in (copied, moved):
        rep = cachetools.verify(root)
        assert [r.clean for r in rep] == [True], rep
        s2 = Store(root)
        assert s2.resolve("ds", "p") == fs.key
        got = read_all(s2.open(fs.key).path)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("umask", [0o002, 0o000])
def test_files_group_writable_never_world_writable(tmp_path, umask):
    old = os.umask(umask)
    try:
        store, fs = make_set(tmp_path / "c")
        c = store.claim(fs.key, 0, lease_s=5)
        fs.commit_unit(1, unit_data(fs.layout, 1), failures=[{"id": "c4", "stage": "x", "error": "E", "message": "m"}])
        assert c is not None
    finally:
        os.umask(old)
    paths = [p for p in (tmp_path / "c").rglob("*")]
    assert len(paths) > 30
    for p in paths:
        mode = p.stat().st_mode
        assert not mode & stat.S_IWOTH, f"{p} is world-writable ({oct(mode)})"
        assert mode & stat.S_IWGRP, f"{p} is not group-writable ({oct(mode)})"


# --- verify and gc -------------------------------------------------------------------------------
def test_verify_finds_flipped_truncated_missing_tampered_and_orphans(tmp_path):
    root = tmp_path / "c"
    store, fs = make_set(root)
    assert cachetools.verify(root)[0].clean
    m1 = fs.read_done(1)
    flip = fs.path / sorted(k for k in m1["checksums"] if k.startswith("audio/seq"))[0]
    b = bytearray(flip.read_bytes())
    b[len(b) // 2] ^= 0x01
    flip.write_bytes(bytes(b))
    m2 = fs.read_done(2)
    trunc = fs.path / sorted(k for k in m2["checksums"] if k.startswith("meta/pooled"))[0]
    trunc.write_bytes(trunc.read_bytes()[:-3])
    gone = fs.path / sorted(k for k in fs.read_done(0)["checksums"] if k.startswith("audio/len"))[0]
    gone.unlink()
    meta = fs.path / "label" / "zarr.json"
    meta.write_text(meta.read_text().replace('"int32"', '"int64"'))
    orphan = fs.path / "audio" / "pooled" / "c" / "7" / "0"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"junk")
    (fs.path / "units" / ".2.done.deadbeef.tmp").write_text("{")  # a crashed atomic write: ignored

    rep = cachetools.verify(root, "ds/p")[0]
    text = "\n".join(rep.problems)
    assert not rep.clean and not rep.header_ok
    assert rep.bad_units == [0, 1, 2]
    assert f"unit 1: file {flip.relative_to(fs.path).as_posix()} does not match" in text
    assert f"unit 2: file {trunc.relative_to(fs.path).as_posix()} does not match" in text
    assert f"unit 0: file {gone.relative_to(fs.path).as_posix()} is missing" in text
    assert "header: file label/zarr.json does not match" in text
    assert rep.orphans == ["audio/pooled/c/7/0"]
    assert rep.files_checked > 20


def test_gc_removes_only_old_leftovers(tmp_path):
    root = tmp_path / "c"
    store, fs = make_set(root)
    _, other = make_set(root, key="ds-unref", seed=1)
    store.set_alias("ds", "p", fs.key)  # ds-unref is now unreferenced
    old = time.time() - 7200
    expired = store.claim(fs.key, 0, lease_s=-1)
    live = store.claim(fs.key, 1, lease_s=600)
    assert expired and live
    stale_tmp = store.sets_dir / ".tmp-ds-0001-abc"
    stale_tmp.mkdir()
    (stale_tmp / "zarr.json").write_text("{}")
    fresh_tmp = store.sets_dir / ".tmp-ds-0001-def"
    fresh_tmp.mkdir()
    staging = fs.path / "tmp" / "u0.123"
    staging.mkdir(parents=True)
    (staging / "x").write_bytes(b"1")
    trash = store.sets_dir / ".trash-gone-1"
    trash.mkdir()
    old_temp = fs.path / "units" / ".1.done.aaa.tmp"
    old_temp.write_text("{")
    new_temp = store.aliases_dir / "ds" / ".p.json.bbb.tmp"
    new_temp.write_text("{")
    for p in (stale_tmp / "zarr.json", stale_tmp, staging / "x", staging, trash, old_temp):
        os.utime(p, (old, old))
    for f in other.path.rglob("*"):
        os.utime(f, (old, old))
    os.utime(other.path, (old, old))

    dry = cachetools.gc(root, dry_run=True)
    assert stale_tmp.exists() and other.path.exists() and expired.path.exists()
    kept = cachetools.gc(root, keep_unreferenced=True)
    assert kept == [d for d in dry if "unreferenced" not in d]
    assert other.path.exists()
    assert not expired.path.exists() and live.path.exists()
    assert not stale_tmp.exists() and fresh_tmp.exists()
    assert not staging.exists() and not trash.exists()
    assert not old_temp.exists() and new_temp.exists()
    text = "\n".join(dry)
    for what in ("expired claim", "set-creation temporary", "unit staging", "stale trash",
                 "temporary file", "unreferenced set"):
        assert what in text, what
    removed = cachetools.gc(root)
    assert removed == ["unreferenced set (no alias points to it): sets/ds-unref"]
    assert not other.path.exists() and Store(root).list_keys() == [fs.key]
    assert cachetools.verify(root)[0].clean


def test_a_waiting_extractor_names_the_unit_the_holder_and_the_lease(tmp_path):
    from pipeline.runner import waiting_line
    from pipeline.store import who

    store, fs = make_set(tmp_path / "c", commit=False)
    assert waiting_line(store, fs.key, 1, (4, 8)) is None  # nobody holds it
    held = store.claim(fs.key, 1, lease_s=90)
    until = time.strftime("%H:%M:%S", time.localtime(json.loads(held.path.read_text())["expires"]))
    line = waiting_line(store, fs.key, 1, (4, 8))
    assert line.startswith(f"waiting for unit 1 (clips 4-7) of {fs.key}: held by {who()} pid {os.getpid()}, "
                           f"lease until {until}")
