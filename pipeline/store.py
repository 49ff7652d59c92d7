"""The feature cache: content-addressed Zarr v3 feature sets, safe for a team on NFS.

Why it is built this way:
- NFS has no reliable locks, so nothing here locks. A work unit (a contiguous run of clips)
  is *claimed* by creating a claim file with O_EXCL (atomic on NFSv3+); the claim carries a
  short lease (minutes) that a heartbeat thread renews while the unit is worked on
  (`Heartbeat`), so a crashed worker's unit is taken over once the lease expires, and at once
  when the claim was made on this host by a process that is gone (pid check, `claim_state`).
- Every array is chunked along the clip axis by exactly one unit, so one unit = one chunk
  file per array = one writer per file. A unit's chunk files are encoded in a private staging
  folder and renamed into place (rename is atomic); the unit's `.done` marker, holding the
  sha256 of every file it wrote, is written last. Readers use only units with a marker.
- A feature set is created in a temporary folder and renamed to `sets/<key>`; whoever loses
  that race simply uses the winner's set (same key = same content by construction).
- Paths inside the cache are relative, so the root can be mounted anywhere.
The format itself (paths, layout, attributes, markers) is defined in `pipeline/cacheformat.py`,
the one module `fusion/` reads sets through; docs/ARCHITECTURE.md describes it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline import cacheformat as cf
from pipeline.cacheformat import ModalityLayout, SetAttrs, SetLayout

__all__ = ["FeatureSetStore", "Heartbeat", "LostClaim", "ModalityLayout", "SetLayout", "Store"]

DEFAULT_CACHE = Path("cache")


def safe_name(value: str, what: str = "name", leading_dot: bool = False) -> str:
    """A single path component built from outside input (key, dataset, preset, clip id).

    Every path the store makes from a name goes through here, so no name can point outside
    the cache root: no separators, no `..`, no control characters, and (unless allowed) no
    leading dot, which the store keeps for its own temporaries.
    """
    if not isinstance(value, str) or not value or len(value) > 255:
        raise ValueError(f"unsafe {what} {value!r}: must be a non-empty string of at most 255 characters")
    if (
        "/" in value
        or "\\" in value
        or ".." in value
        or (value.startswith(".") and not leading_dot)
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise ValueError(
            f"unsafe {what} {value!r}: no path separators, '..', leading dot or control "
            "characters (it becomes a file name in the cache)"
        )
    return value


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """--cache, else $MMEMO_CACHE, else ./cache."""
    return Path(path or os.environ.get("MMEMO_CACHE") or DEFAULT_CACHE)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- permissions: group-writable for a team, never world-writable -------------------------
def _no_world_write(path: Path) -> None:
    try:
        mode = path.stat().st_mode
        if mode & stat.S_IWOTH:
            os.chmod(path, mode & ~stat.S_IWOTH)
    except FileNotFoundError:
        pass


def make_dirs(path: Path) -> None:
    """mkdir -p with mode 2775 (setgid: the team's group is inherited) minus umask, minus o+w."""
    if path.is_dir():
        return
    make_dirs(path.parent) if not path.parent.is_dir() else None
    try:
        os.mkdir(path, 0o2775)
    except FileExistsError:
        return
    _no_world_write(path)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a unique temporary name in the same folder, then rename over `path`."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o664)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _no_world_write(tmp)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False, default=str).encode())


# --- layout (defined in pipeline.cacheformat) -----------------------------------------------


def _compressors(layout: SetLayout) -> Any:
    return codec(layout.compression, layout.level)


def codec(compression: str, level: int) -> Any:
    """The zarr compressor for a preset's `store.compression` / `store.level`."""
    if compression == "none":
        return None
    if compression == "zstd":
        return ZstdCodec(level=level)
    if compression.startswith("blosc"):
        cname = compression.split("-", 1)[1] if "-" in compression else "lz4"
        return BloscCodec(cname=cname, clevel=level, shuffle="shuffle")
    raise ValueError(f"unknown compression '{compression}' (zstd, blosc-lz4, none)")


# --- claims ------------------------------------------------------------------------------
DEFAULT_LEASE_S = 120.0  # defined here once; the presets' run.lease defaults to it


@dataclass
class Claim:
    path: Path
    token: str
    unit: int
    lease_s: float = DEFAULT_LEASE_S


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux /proc), to tell a reused pid apart."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return stat_line.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _claim_body(token: str, lease_s: float) -> dict[str, Any]:
    now = time.time()
    return {"token": token, "by": who(), "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _proc_start(os.getpid()), "lease": float(lease_s),
            "renewed": now, "expires": now + float(lease_s)}


def process_gone(host: str | None, pid: Any, pid_start: str | None = None) -> bool:
    """True only when the claim was made on this host and its process no longer exists (or
    the pid now belongs to another process). Claims from other hosts are judged by lease only."""
    if not host or host != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return False
    if pid_start is not None:
        now_start = _proc_start(pid)
        if now_start is not None and now_start != pid_start:
            return True  # the pid was reused by another process
    # a zombie (killed, not yet reaped by its parent) is gone too
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def claim_state(path: Path, lease_s: float = DEFAULT_LEASE_S) -> tuple[str, dict[str, Any]]:
    """(state, body) of a claim file: absent | live | expired (lease ran out) | dead (made on
    this host by a process that is gone). A file being written right now, or garbage, is
    judged by its age against `lease_s`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "absent", {}
    except OSError:
        return "live", {}
    try:
        body = json.loads(text or "{}")
        expires = float(body["expires"])
    except (ValueError, KeyError, TypeError):
        try:
            expires = path.stat().st_mtime + lease_s
        except FileNotFoundError:
            return "absent", {}
        body = {"expires": expires}
    if process_gone(body.get("host"), body.get("pid"), body.get("pid_start")):
        return "dead", body
    return ("expired" if time.time() > expires else "live"), body


class Heartbeat:
    """Renews a claim every lease/4 seconds on a daemon thread while the unit is worked on, so
    a lease can be short (minutes) and a dead writer's unit is free soon after it died."""

    def __init__(self, store: Store, claim: Claim, every: float | None = None):
        import threading

        self.store, self.claim = store, claim
        self.every = every if every is not None else max(0.05, claim.lease_s / 4)
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="mmemo-claim-heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not self.store.renew(self.claim):
                    self.lost = True
                    return
            except OSError:
                continue  # a transient NFS error: try again next beat

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class LostClaim(RuntimeError):
    """Another worker took this unit over (our lease expired): do not commit."""


# --- feature sets ------------------------------------------------------------------------
class FeatureSetStore:
    """One feature set on disk (writer side)."""

    def __init__(self, store: Store, key: str):
        self.store = store
        self.key = key
        self.path = store.sets_dir / key
        self._group = zarr.open_group(self.path, mode="r")
        info = SetAttrs.read(self._group.attrs.asdict(), str(self.path))
        self.attrs: dict[str, Any] = dict(info.raw)
        self.layout = info.layout()

    # units -------------------------------------------------------------------------------
    @property
    def units_dir(self) -> Path:
        return self.path / cf.UNITS

    def done_path(self, u: int) -> Path:
        return self.path / cf.done_marker(u)

    def is_done(self, u: int) -> bool:
        return self.done_path(u).exists()

    def done_units(self) -> set[int]:
        return set(cf.marker_files(self.path))

    def completed_rows(self) -> np.ndarray:
        """[n] bool: rows of units that have a completion marker."""
        return cf.completed_rows(
            self.layout.n, (self.layout.unit_range(u) for u in self.done_units() if u < self.layout.n_units)
        )

    def read_done(self, u: int) -> dict[str, Any]:
        return json.loads(self.done_path(u).read_text())

    def ids(self) -> list[str]:
        return [str(x) for x in self._group[cf.IDS][:]]

    def failures(self) -> list[dict[str, Any]]:
        """Every ledger line of the set (per-unit files, merged)."""
        rows: list[dict[str, Any]] = []
        ledger = self.path / cf.LEDGER
        if ledger.is_dir():
            for p in sorted(ledger.glob("*.jsonl"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
                rows.extend(json.loads(line) for line in p.read_text().splitlines() if line.strip())
        return rows

    def clear_unit(self, u: int) -> None:
        """Forget a unit (for --force / repair): its marker goes first, so readers stop using it."""
        self.done_path(u).unlink(missing_ok=True)
        (self.path / cf.ledger_file(u)).unlink(missing_ok=True)

    def commit_unit(
        self,
        u: int,
        data: dict[str, np.ndarray],
        failures: Iterable[dict[str, Any]] = (),
        claim: Claim | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write unit u's rows of every per-clip array, then its ledger, then the marker."""
        start, stop = self.layout.unit_range(u)
        expected = self.layout.unit_arrays()
        missing = set(expected) - set(data)
        if missing:
            raise ValueError(f"unit {u}: arrays missing from the commit: {sorted(missing)}")
        for rel, arr in data.items():
            shape, dtype = expected[rel]
            want = (stop - start, *shape[1:])
            if tuple(arr.shape) != want:
                raise ValueError(f"unit {u}: {rel} has shape {arr.shape}, expected {want}")
            if arr.dtype.kind == "f" and not np.isfinite(arr.astype(np.float32)).all():
                raise ValueError(f"unit {u}: {rel} holds NaN/Inf; refusing to write it")

        staging = self.path / cf.STAGING / f"u{u}.{uuid.uuid4().hex[:12]}"
        checksums: dict[str, str] = {}
        moves: list[tuple[Path, Path]] = []
        try:
            for rel, arr in data.items():
                src_meta = self.path / rel / cf.GROUP_META
                make_dirs(staging / rel)
                shutil.copyfile(src_meta, staging / rel / cf.GROUP_META)
                # every chunk file is written, even all-fill-value ones: a recommit (repair,
                # --force) must replace the old file, and the marker must list every file
                za = zarr.open_array(staging / rel, mode="r+").with_config({"write_empty_chunks": True})
                za[start:stop] = arr.astype(expected[rel][1], copy=False)
                for f in sorted((staging / rel).rglob("*")):
                    if f.is_file() and f.name != cf.GROUP_META:
                        relfile = f.relative_to(staging).as_posix()
                        checksums[relfile] = sha256_file(f)
                        moves.append((f, self.path / relfile))
            fail_rows = list(failures)
            ledger = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fail_rows).encode()
            return self._install(u, moves, checksums, ledger, len(fail_rows), claim, dict(extra or {}))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install(self, u: int, moves: list[tuple[Path, Path]], checksums: dict[str, str],
                 ledger: bytes, n_failures: int, claim: Claim | None,
                 extra: dict[str, Any]) -> dict[str, Any]:
        """The end of a commit: staged chunk files renamed into place, then the ledger, then
        the marker. A recommit (--force, repair) is fully staged before this, so only now does
        the old marker go (readers stop using the unit for the few renames)."""
        if claim is not None and not self.store.owns(claim):
            raise LostClaim(f"unit {u} of {self.key} was taken over by another worker")
        self.done_path(u).unlink(missing_ok=True)
        for src, dst in moves:
            make_dirs(dst.parent)
            _no_world_write(src)
            os.replace(src, dst)
        if ledger:
            atomic_write(self.path / cf.ledger_file(u), ledger)
        else:
            (self.path / cf.ledger_file(u)).unlink(missing_ok=True)
        start, stop = self.layout.unit_range(u)
        marker = cf.UnitMarker(unit=u, start=start, stop=stop, checksums=checksums,
                               n_failures=n_failures, by=who(), at=now_iso(), extra=extra).to_json()
        atomic_write_json(self.done_path(u), marker)
        return marker

    def adopt_unit(self, u: int, donor: FeatureSetStore, claim: Claim | None = None) -> dict[str, Any] | None:
        """Make unit u a copy of `donor`'s finished unit u: its chunk files (hard links, else
        byte-for-byte copies; each checked against the donor's marker), its ledger, then a
        marker naming the donor.

        For a set whose rows hold the same features as the donor's (plan.features_digest): only
        the labels differ, and those live in the static arrays. None, and nothing of the unit
        written, when the donor's unit is unfinished or a file does not match its checksum.
        """
        if not donor.is_done(u) or donor.layout.to_json() != self.layout.to_json():
            return None
        try:
            old = cf.UnitMarker.from_json(donor.read_done(u), donor.done_path(u).name,
                                          donor.layout.unit_size, donor.layout.n)
        except (OSError, ValueError):  # FormatError is a ValueError
            return None
        if (old.start, old.stop) != self.layout.unit_range(u):
            return None
        staging = self.path / cf.STAGING / f"u{u}.{uuid.uuid4().hex[:12]}"
        checksums = old.checksums
        moves: list[tuple[Path, Path]] = []
        try:
            for relfile, digest in checksums.items():
                tmp = staging / relfile
                make_dirs(tmp.parent)
                try:  # a hard link where the file system allows (no second copy on disk);
                    # writers replace chunk files by rename, so the donor never alters it
                    os.link(donor.path / relfile, tmp)
                except OSError:
                    try:
                        shutil.copyfile(donor.path / relfile, tmp)
                    except OSError:
                        return None
                if sha256_file(tmp) != digest:
                    return None  # a damaged donor file: extract this unit instead
                moves.append((tmp, self.path / relfile))
            ledger = donor.path / cf.ledger_file(u)
            fail_rows = ledger.read_bytes() if ledger.is_file() else b""
            return self._install(u, moves, checksums, fail_rows, old.n_failures, claim,
                                 {**old.extra, "reused_from": donor.key})
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class Store:
    """A cache root: feature sets, aliases, claims, OCR subtitle files."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = cache_root(root)
        self.sets_dir = self.root / cf.SETS
        self.aliases_dir = self.root / cf.ALIASES
        self.claims_dir = self.root / cf.CLAIMS
        self.srt_dir = self.root / cf.SRT

    # sets --------------------------------------------------------------------------------
    def has_set(self, key: str) -> bool:
        try:
            safe_name(key, "feature set key")
        except ValueError:
            return False  # a name that could leave the cache is never a set
        return cf.is_set(cf.set_dir(self.root, key))

    def open(self, key: str) -> FeatureSetStore:
        if not self.has_set(key):
            raise FileNotFoundError(f"no feature set '{key}' in {self.root}")
        return FeatureSetStore(self, key)

    def create_set(
        self,
        key: str,
        layout: SetLayout,
        attrs: dict[str, Any],
        static: dict[str, np.ndarray],
    ) -> FeatureSetStore:
        """Create (or join) feature set `key`; race-safe between processes and machines.

        `static` holds the arrays known from the manifest alone (ids, split, group, label,
        targets/...), written once here; per-unit arrays are created empty.
        """
        safe_name(key, "feature set key")
        if self.has_set(key):
            return self.open(key)
        make_dirs(self.sets_dir)
        tmp = self.sets_dir / f".tmp-{key}-{uuid.uuid4().hex[:12]}"
        try:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            comp = _compressors(layout)
            u = layout.unit_size
            inner = min(u, layout.inner_chunk)
            for rel, (shape, dtype) in layout.unit_arrays().items():
                chunks = (inner, *shape[1:])
                shards = (u, *shape[1:]) if inner < u else None
                group.create_array(
                    rel,
                    shape=shape,
                    dtype=dtype,
                    chunks=chunks,
                    shards=shards,
                    compressors=comp,
                    fill_value=0,
                )
            for rel, arr in static.items():
                if arr.dtype.kind in "OUS":
                    za = group.create_array(rel, shape=arr.shape, dtype=str, chunks=(max(1, len(arr)),))
                    za[:] = np.asarray([str(x) for x in arr], dtype=object)
                else:
                    za = group.create_array(
                        rel, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape or (1,), compressors=comp
                    )
                    za[...] = arr
            full = SetAttrs.new(key, layout, attrs, created_by=who(), created_at=now_iso()).raw
            group.attrs[cf.ATTRS_KEY] = full
            header = {
                p.relative_to(tmp).as_posix(): sha256_file(p)
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            atomic_write_json(tmp / cf.HEADER_MARKER, {"checksums": header, "at": now_iso()})
            for p in [tmp, *tmp.rglob("*")]:
                _no_world_write(p)
            try:
                os.rename(tmp, self.sets_dir / key)
            except OSError:
                if not self.has_set(key):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.open(key)

    def list_keys(self) -> list[str]:
        if not self.sets_dir.is_dir():
            return []
        return sorted(p.name for p in self.sets_dir.iterdir() if not p.name.startswith(".") and self.has_set(p.name))

    def remove_set(self, key: str) -> None:
        """Delete a set: rename it out of the way first so no reader sees a half-deleted set."""
        src = self.sets_dir / safe_name(key, "feature set key")
        trash = self.sets_dir / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(src, trash)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.claims_dir / key, ignore_errors=True)
        shutil.rmtree(self.srt_dir / key, ignore_errors=True)

    # aliases -----------------------------------------------------------------------------
    def alias_path(self, dataset: str, preset: str) -> Path:
        return cf.alias_file(self.root, safe_name(dataset, "dataset name"), safe_name(preset, "preset name"))

    def set_alias(self, dataset: str, preset: str, key: str) -> None:
        safe_name(key, "feature set key")
        atomic_write_json(self.alias_path(dataset, preset), cf.alias_json(key, who(), now_iso()))

    def resolve(self, dataset: str, preset: str = "offline") -> str:
        key = cf.read_alias(self.root, safe_name(dataset, "dataset name"), safe_name(preset, "preset name"))
        if key is None:
            raise FileNotFoundError(
                f"no feature set for dataset '{dataset}' preset '{preset}' in {self.root} "
                f"(run `mmemo extract --dataset {dataset} --preset {preset}` first)"
            )
        return key

    def aliases(self) -> dict[str, str]:
        return cf.all_aliases(self.root)

    # claims ------------------------------------------------------------------------------
    def claim_path(self, key: str, unit: int) -> Path:
        return cf.claim_file(self.root, safe_name(key, "feature set key"), unit)

    def claim(self, key: str, unit: int, lease_s: float = DEFAULT_LEASE_S) -> Claim | None:
        """Try to claim a unit; None if someone else holds a live claim.

        A claim is taken over when its lease ran out, or at once when it was made on this host
        by a process that no longer exists (killed, OOM): `claim_state` says which.
        """
        path = self.claim_path(key, unit)
        make_dirs(path.parent)
        for _ in range(2):
            token = uuid.uuid4().hex
            body = _claim_body(token, lease_s)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o664)
            except FileExistsError:
                if claim_state(path, lease_s)[0] == "live":
                    return None
                stale = path.with_name(f"{path.name}.stale.{token}")
                try:
                    os.rename(path, stale)  # only one taker wins this rename
                except FileNotFoundError:
                    return None
                stale.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(body))
            _no_world_write(path)
            return Claim(path=path, token=token, unit=unit, lease_s=float(lease_s))
        return None

    def renew(self, claim: Claim) -> bool:
        """Push the claim's expiry a lease ahead (the heartbeat); False when it is no longer ours."""
        if not self.owns(claim):
            return False
        atomic_write(claim.path, json.dumps(_claim_body(claim.token, claim.lease_s)).encode())
        return True

    def holder(self, key: str, unit: int) -> dict[str, Any] | None:
        """Who holds a unit's claim: its body plus `state` (live | expired | dead) and `path`."""
        path = self.claim_path(key, unit)
        state, body = claim_state(path)
        if state == "absent":
            return None
        return {**body, "state": state, "path": str(path)}

    def claims(self) -> list[dict[str, Any]]:
        """Every claim in the cache: key, unit, by, host, pid, expires, state (live | expired |
        dead: its process is gone from this host)."""
        rows: list[dict[str, Any]] = []
        if not self.claims_dir.is_dir():
            return rows
        for kdir in sorted(self.claims_dir.iterdir()):
            if not kdir.is_dir():
                continue
            for p in sorted(kdir.glob("*.claim"), key=lambda q: int(q.stem) if q.stem.isdigit() else -1):
                state, body = claim_state(p)
                if state == "absent":
                    continue
                rows.append({"key": kdir.name, "unit": int(p.stem) if p.stem.isdigit() else p.stem,
                             **body, "state": state, "path": p.relative_to(self.root).as_posix()})
        return rows

    def owns(self, claim: Claim) -> bool:
        try:
            return json.loads(claim.path.read_text()).get("token") == claim.token
        except (OSError, ValueError):
            return False

    def release(self, claim: Claim) -> None:
        if self.owns(claim):
            claim.path.unlink(missing_ok=True)

    def clear_stale_claim(self, key: str, unit: int, lease_s: float = DEFAULT_LEASE_S) -> bool:
        """Remove a finished unit's leftover claim when its holder is gone or its lease ran out.

        A writer stopped between committing a unit and releasing its claim (Ctrl-C, a kill at
        that instant) leaves the claim of a done unit; a rerun skips done units, so nothing
        else would ever remove it and `mmemo cache claims` would list it forever. A live claim
        is left alone (a `--force` rerun may hold it). True when one was removed.
        """
        path = self.claim_path(key, unit)
        if claim_state(path, lease_s)[0] not in ("dead", "expired"):
            return False
        stale = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(path, stale)  # as in claim(): only one remover wins
        except FileNotFoundError:
            return False
        stale.unlink(missing_ok=True)
        return True

    # subtitles ---------------------------------------------------------------------------
    def srt_path(self, key: str, clip_id: str, kind: str = "ocr") -> Path:
        return cf.srt_file(self.root, safe_name(key, "feature set key"),
                           safe_name(clip_id, "clip id", leading_dot=True), kind)
