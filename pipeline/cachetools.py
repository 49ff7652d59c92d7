"""Maintenance of a cache root: list, inspect, verify, repair and garbage-collect feature sets.

Why these exist: the cache lives on a shared NFS volume that many people write to, so it has
to be checkable without trusting any single writer. Every completed work unit records the
sha256 of each file it wrote (`units/<u>.done`) and set creation records the checksums of
the static arrays and metadata (`units/header.done`); `verify` recomputes all of them, so a
truncated or flipped chunk, a deleted file or an edited `zarr.json` is found, and
`repair_set` re-extracts exactly the damaged units with the preset stored in the set (the
content key proves the result is the same set). `gc` removes what crashed writers leave
behind, using an age threshold so that a live writer's temporaries are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import cacheformat as cf
from pipeline.store import FeatureSetStore, Store, claim_state, sha256_file

GC_MIN_AGE_S = 3600.0  # temporaries younger than this may belong to a live writer


def human_size(n: float) -> str:
    """Bytes as a short human string (1024-based, like `du -h`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


def _dir_size(path: Path) -> tuple[int, int]:
    """(bytes of the files under `path`, the part of them in files hard-linked elsewhere too:
    a re-labelled set's units copied from another set, which removing this set does not free)."""
    total = shared = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                total += st.st_size
                shared += st.st_size if st.st_nlink > 1 else 0
        except FileNotFoundError:  # removed while we walked (a concurrent writer's temp)
            continue
    return total, shared


def resolve_key(cache_root: str | os.PathLike, key_or_alias: str) -> str:
    """A set key from a key, a `dataset/preset` alias or a bare dataset name (preset offline)."""
    store = Store(cache_root)
    if store.has_set(key_or_alias):
        return key_or_alias
    if "/" in key_or_alias:
        dataset, preset = key_or_alias.split("/", 1)
        return store.resolve(dataset, preset)
    if store.alias_path(key_or_alias, "offline").exists():
        return store.resolve(key_or_alias, "offline")
    known = store.list_keys() + sorted(store.aliases())
    shown = ", ".join(known[:10]) + (f" … (+{len(known) - 10})" if len(known) > 10 else "")
    raise FileNotFoundError(f"no feature set or alias '{key_or_alias}' in {store.root} (known: {shown or 'none'}; see `mmemo cache ls`)")


def _aliases_by_key(store: Store) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, key in sorted(store.aliases().items()):
        out.setdefault(key, []).append(name)
    return out


def _markers(fs: FeatureSetStore) -> dict[int, dict[str, Any] | None]:
    """unit -> parsed marker (None when the marker is unreadable)."""
    out: dict[int, dict[str, Any] | None] = {}
    for u in sorted(fs.done_units()):
        try:
            out[u] = fs.read_done(u)
        except (OSError, ValueError):
            out[u] = None
    return out


# --- ls / info ---------------------------------------------------------------------------------
def list_sets(cache_root: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per feature set: identity, aliases, completeness, failures, size, provenance."""
    store = Store(cache_root)
    by_key = _aliases_by_key(store)
    rows = []
    for key in store.list_keys():
        path = store.sets_dir / key
        size, shared = _dir_size(path)
        try:
            fs = store.open(key)
        except Exception as e:  # noqa: BLE001 - a damaged set is still listed, with why
            rows.append({"key": key, "aliases": by_key.get(key, []), "n": 0, "units": 0, "done": 0,
                         "failures": 0, "size": size, "size_h": human_size(size), "created_by": "?",
                         "created_at": "?", "dataset": "?", "preset": "?", "error": str(e)})
            continue
        markers = _markers(fs)
        failures = sum(int((m or {}).get("n_failures", 0)) for m in markers.values())
        a = fs.attrs
        rows.append(
            {
                "key": key,
                "aliases": by_key.get(key, []),
                "n": int(a.get("n", fs.layout.n)),
                "units": fs.layout.n_units,
                "done": len(markers),
                "failures": failures,
                "size": size,
                "size_h": human_size(size),
                "shared": shared,
                "created_by": a.get("created_by", "?"),
                "created_at": a.get("created_at", "?"),
                "dataset": a.get("dataset", "?"),
                "preset": a.get("preset", "?"),
            }
        )
    return rows


def _done_rows(fs: FeatureSetStore) -> np.ndarray:
    return fs.completed_rows()


def set_info(cache_root: str | os.PathLike, key_or_alias: str) -> dict[str, Any]:
    """Everything recorded about one set: attrs (stage configs and models), per-modality dims
    and present counts over completed units, the ledger summarised by stage and error, and
    which units are done or missing."""
    store = Store(cache_root)
    key = resolve_key(cache_root, key_or_alias)
    fs = store.open(key)
    group = zarr.open_group(fs.path, mode="r")
    done = _done_rows(fs)
    mods: dict[str, Any] = {}
    for name, m in fs.attrs.get("modalities", {}).items():
        present = np.asarray(group[cf.present(name)][:], bool)
        mods[name] = {
            "kind": m.get("kind"),
            "pooled_dim": m.get("pooled_dim"),
            "seq_dim": m.get("seq_dim"),
            "max_len": m.get("max_len"),
            "present": int((present & done).sum()),
            "absent": int((~present & done).sum()),
            "provenance": m.get("provenance", {}),
        }
    ledger = fs.failures()
    done_units = sorted(fs.done_units())
    all_units = range(fs.layout.n_units)
    return {
        "key": key,
        "path": str(fs.path),
        "aliases": _aliases_by_key(store).get(key, []),
        "attrs": fs.attrs,
        "stages": fs.attrs.get("stages", []),
        "modalities": mods,
        "clips": {"n": fs.layout.n, "in_done_units": int(done.sum())},
        "units": {
            "total": fs.layout.n_units,
            "unit_size": fs.layout.unit_size,
            "done": len(done_units),
            "missing": [u for u in all_units if u not in set(done_units)],
        },
        "ledger": {
            "rows": len(ledger),
            "clips": len({r.get("id") for r in ledger}),
            "by_stage": dict(Counter(r.get("stage", "?") for r in ledger).most_common()),
            "by_error": dict(Counter(f"{r.get('stage', '?')}: {r.get('error', '?')}" for r in ledger).most_common()),
        },
        "size": _dir_size(fs.path)[0],
    }


# --- verify ------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """The result of checking one set. `bad_units` = damaged ∪ incomplete: what repair redoes."""

    key: str
    clean: bool
    problems: list[str]
    files_checked: int
    units: int
    units_done: int
    bad_units: list[int]
    missing_units: list[int] = field(default_factory=list)  # no marker (incomplete)
    header_ok: bool = True  # static arrays and metadata as created
    orphans: list[str] = field(default_factory=list)


def _is_temp(rel: str) -> bool:
    """Temporaries readers never see: staging, atomic-write temps, claim takeover leftovers."""
    name = rel.rsplit("/", 1)[-1]
    return rel.startswith(f"{cf.STAGING}/") or (name.startswith(".") and name.endswith(".tmp"))


def _check_files(root: Path, checksums: dict[str, str], problems: list[str], what: str) -> tuple[int, bool]:
    checked, ok = 0, True
    for rel, want in sorted(checksums.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{what}: file {rel} is missing")
            ok = False
            continue
        checked += 1
        if sha256_file(p) != want:
            problems.append(f"{what}: file {rel} does not match its checksum (changed, truncated or corrupt)")
            ok = False
    return checked, ok


def verify_set(store: Store, key: str) -> VerifyReport:
    """Recompute every recorded checksum of one set and account for every file in it."""
    path = store.sets_dir / key
    problems: list[str] = []
    try:
        fs = store.open(key)
    except Exception as e:  # noqa: BLE001 - report, don't crash the whole verify
        return VerifyReport(key, False, [f"cannot open the set: {type(e).__name__}: {e}"], 0, 0, 0, [],
                            header_ok=False)
    layout = fs.layout
    known: set[str] = set()
    files_checked = 0

    header_ok = True
    header = path / cf.HEADER_MARKER
    if not header.is_file():
        problems.append(f"{cf.HEADER_MARKER} is missing: the set's creation did not finish")
        header_ok = False
    else:
        try:
            sums = json.loads(header.read_text())["checksums"]
        except (OSError, ValueError, KeyError) as e:
            sums = {}
            problems.append(f"{cf.HEADER_MARKER} is unreadable: {e}")
            header_ok = False
        n, ok = _check_files(path, sums, problems, "header")
        files_checked += n
        header_ok &= ok
        known.update(sums)

    expected_arrays = sorted(layout.unit_arrays())
    bad: set[int] = set()
    markers = _markers(fs)
    for u, m in markers.items():
        what = f"unit {u}"
        if u >= layout.n_units:
            problems.append(f"{what}: marker for a unit beyond the set's {layout.n_units} units")
            continue
        if m is None:
            problems.append(f"{what}: marker is unreadable")
            bad.add(u)
            continue
        a, b = layout.unit_range(u)
        if (m.get("start"), m.get("stop")) != (a, b):
            problems.append(f"{what}: marker covers rows {m.get('start')}:{m.get('stop')}, layout says {a}:{b}")
            bad.add(u)
        sums = m.get("checksums", {})
        for rel in expected_arrays:
            if not any(k.startswith(cf.chunk_prefix(rel)) for k in sums):
                problems.append(f"{what}: marker lists no chunk of {rel}")
                bad.add(u)
        n, ok = _check_files(path, sums, problems, what)
        files_checked += n
        if not ok:
            bad.add(u)
        known.update(sums)
        ledger = path / cf.ledger_file(u)
        n_lines = len([x for x in ledger.read_text().splitlines() if x.strip()]) if ledger.is_file() else 0
        if n_lines != int(m.get("n_failures", n_lines)):
            problems.append(f"{what}: ledger has {n_lines} lines, marker says {m.get('n_failures')}")
            bad.add(u)

    missing = [u for u in range(layout.n_units) if u not in markers]
    for u in missing:
        problems.append(f"unit {u}: no marker (incomplete; readers skip rows {layout.unit_range(u)[0]}:"
                        f"{layout.unit_range(u)[1]})")

    # every other file must be explained: a chunk of an incomplete unit, or an orphan
    orphans: list[str] = []
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(path).as_posix()
        if rel in known or _is_temp(rel) or rel.startswith((f"{cf.UNITS}/", f"{cf.LEDGER}/")):
            continue
        if cf.CHUNKS in rel:
            arr, rest = rel.split(cf.CHUNKS, 1)
            idx = rest.split("/", 1)[0]
            if arr in expected_arrays and idx.isdigit() and int(idx) in missing:
                continue  # written by a unit that never committed its marker: invisible to readers
        orphans.append(rel)
    for rel in orphans:
        problems.append(f"orphan file {rel} (listed by no marker)")

    bad_units = sorted(bad | set(missing))
    return VerifyReport(
        key=key,
        clean=not problems,
        problems=problems,
        files_checked=files_checked,
        units=layout.n_units,
        units_done=len(markers),
        bad_units=bad_units,
        missing_units=missing,
        header_ok=header_ok,
        orphans=orphans,
    )


def verify(cache_root: str | os.PathLike, key_or_alias: str | None = None) -> list[VerifyReport]:
    """Verify one set (by key or alias) or, with None, every set in the cache."""
    store = Store(cache_root)
    keys = [resolve_key(cache_root, key_or_alias)] if key_or_alias else store.list_keys()
    return [verify_set(store, k) for k in keys]


# --- repair ------------------------------------------------------------------------------------
def repair_set(
    cache_root: str | os.PathLike,
    report: VerifyReport,
    root: str | os.PathLike | None = None,
    manifests: str | os.PathLike = Path("manifests"),
    executor: str = "inline",
    workers: int = 1,
) -> int:
    """Re-extract the report's bad units with the preset recorded in the set; returns how many
    units were written. The plan must reproduce the set's key, which proves that the manifest,
    the media and the preset are still the ones the set was made from."""
    from pipeline.runner import plan_extract, run_extract

    if not report.bad_units:
        return 0
    if not report.header_ok:
        raise ValueError(f"set {report.key}: its header (ids, labels, metadata) is damaged; a unit "
                         "repair cannot fix that — remove the set and extract it again")
    store = Store(cache_root)
    fs = store.open(report.key)
    preset = fs.attrs.get("preset_config")
    if not preset:
        raise ValueError(f"set {report.key} was not made by the extractor (no preset_config; "
                         f"imported?): import it again instead of repairing")
    plan = plan_extract(fs.attrs["dataset"], root=root, preset=dict(preset), manifests=manifests)
    if plan.key != report.key:
        raise ValueError(f"set {report.key}: the manifest, media or preset changed since it was made "
                         f"(they now give key {plan.key}); extract again instead of repairing")
    for u in report.bad_units:
        fs.clear_unit(u)
    summary = run_extract(plan, cache=store.root, units=list(report.bad_units), executor=executor,
                          workers=workers)
    return summary.done


# --- gc ----------------------------------------------------------------------------------------
def _age(p: Path) -> float:
    """Seconds since the last change of p (for a folder: of anything inside it)."""
    try:
        newest = p.lstat().st_mtime
        if p.is_dir():
            for q in p.rglob("*"):
                try:
                    newest = max(newest, q.lstat().st_mtime)
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return 0.0
    return time.time() - newest


def _claim_expired(p: Path, min_age_s: float) -> bool:
    """An expired lease, or a claim whose process is gone from this host; garbage (or a claim
    being written) is judged by age."""
    state, _ = claim_state(p, lease_s=min_age_s)
    return state in ("expired", "dead")


def gc(
    cache_root: str | os.PathLike,
    dry_run: bool = False,
    keep_unreferenced: bool = False,
    min_age_s: float = GC_MIN_AGE_S,
) -> list[str]:
    """Remove expired claims, orphaned temporaries, stale trash and (unless kept) sets that no
    alias points to. Temporaries, trash and unreferenced sets are only removed once nothing in
    them changed for `min_age_s`, so a live writer is never disturbed. Returns what was (or,
    with dry_run, would be) removed, as paths relative to the cache root with a reason."""
    store = Store(cache_root)
    root = store.root
    actions: list[tuple[str, Path]] = []

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    # claims: expired leases, claim-takeover leftovers, claims of sets that no longer exist
    if store.claims_dir.is_dir():
        for kdir in sorted(store.claims_dir.iterdir()):
            if not kdir.is_dir():
                continue
            if not store.has_set(kdir.name) and _age(kdir) > min_age_s:
                actions.append((f"claims of a removed set: {rel(kdir)}", kdir))
                continue
            for p in sorted(kdir.iterdir()):
                if p.name.endswith(".claim") and _claim_expired(p, min_age_s):
                    actions.append((f"expired claim: {rel(p)}", p))
                elif ".claim.stale." in p.name and _age(p) > min_age_s:
                    actions.append((f"stale claim takeover leftover: {rel(p)}", p))

    # temporaries: set creation, unit staging, atomic-write temps anywhere
    if store.sets_dir.is_dir():
        for p in sorted(store.sets_dir.iterdir()):
            if p.name.startswith(".tmp-") and _age(p) > min_age_s:
                actions.append((f"orphaned set-creation temporary: {rel(p)}", p))
            elif p.name.startswith(".trash-") and _age(p) > min_age_s:
                actions.append((f"stale trash: {rel(p)}", p))
            elif p.is_dir() and (p / cf.STAGING).is_dir():
                for q in sorted((p / cf.STAGING).iterdir()):
                    if _age(q) > min_age_s:
                        actions.append((f"orphaned unit staging: {rel(q)}", q))
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                p = Path(dirpath) / name
                if _age(p) > min_age_s and not any(p.is_relative_to(q) for _, q in actions):
                    actions.append((f"orphaned temporary file: {rel(p)}", p))

    # sets no alias points to
    if not keep_unreferenced:
        referenced = set(store.aliases().values())
        for key in store.list_keys():
            if key not in referenced and _age(store.sets_dir / key) > min_age_s:
                actions.append((f"unreferenced set (no alias points to it): sets/{key}", store.sets_dir / key))

    out = []
    for what, p in actions:
        out.append(what)
        if dry_run:
            continue
        if what.startswith("unreferenced set"):
            store.remove_set(p.name)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return out
