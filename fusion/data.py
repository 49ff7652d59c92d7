"""Read-only access to one cached feature set (the Zarr v3 group described in ARCHITECTURE.md).

This module is the trainer's only door to data. Of the pipeline it imports only
`pipeline.cacheformat` (the cache format and its low-level reader), and it never touches media
or encoders. It reads only the rows of work units that
carry a completion marker — anything else may be half written — and only the arrays a fit
asks for. Problems that would make a fit meaningless (a mixed or inconsistent
set, an empty split, one class, a modality with no data or non-finite values) raise
`DataError` naming the set, before any training starts.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline import cacheformat as cf
from pipeline.cacheformat import COND, FormatError, read_rows

log = logging.getLogger(__name__)

__all__ = ["COND", "DataError", "FeatureSet", "open_set", "row_groups"]


def row_groups(n: int) -> np.ndarray:
    """One group per row: ids no stored group can take (ungrouped splits, rows without one)."""
    return np.array([f"\x00row{i}" for i in range(n)])


class DataError(FormatError):
    """A feature set cannot be used as asked; the message names the set and the problem."""


def open_set(
    cache_root: Path | str,
    dataset: str | None = None,
    preset: str = "offline",
    key: str | None = None,
) -> FeatureSet:
    """Open a feature set by content key, or by its alias `aliases/<dataset>/<preset>.json`."""
    try:
        path = cf.resolve_set(cache_root, dataset, preset, key)
    except FormatError as e:
        raise DataError(str(e)) from e
    return FeatureSet(path)


@dataclass
class FeatureSet:
    """One feature set opened read-only. Row arrays cover all N rows; use `complete` to mask."""

    path: Path
    _group: zarr.Group = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            self._reader = cf.SetReader(self.path)
        except FormatError as e:
            raise DataError(str(e)) from e
        self._group = self._reader.group
        self.meta: cf.SetAttrs = self._reader.attrs  # typed view over `attrs`
        self.attrs: dict = self.meta.raw

    # --- identity and metadata -------------------------------------------------------
    @property
    def key(self) -> str:
        return self._reader.key

    @property
    def name(self) -> str:
        """How errors name the set: dataset/preset and the key."""
        return self._reader.name

    @property
    def n(self) -> int:
        return self._reader.n

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def group_by(self) -> str | None:
        return self.meta.group_by

    @property
    def label_derived(self) -> list[str]:
        return self.meta.label_derived

    @property
    def modalities(self) -> tuple[str, ...]:
        """Fusion inputs: every stored modality except the conditioning vector."""
        return tuple(m for m in self.meta.modality_names if m != COND)

    @cached_property
    def available(self) -> tuple[str, ...]:
        """Modalities present on at least one completed row: what 'all' means.

        A modality the extractor could not produce for any clip (audio-only data has no
        visual; a folder dataset without metadata fields has no meta) is left out of 'all'
        and of ablation grids instead of failing them; naming it explicitly still errors.
        """
        rows = np.flatnonzero(self.complete)
        out = []
        for m in self.modalities:
            if len(rows) and read_rows(self._group[cf.present(m)], rows).any():
                out.append(m)
        return tuple(out)

    @property
    def has_cond(self) -> bool:
        return COND in self.meta.modality_names

    @property
    def target_names(self) -> list[str]:
        return self.meta.targets

    # --- row arrays (small, read whole) -----------------------------------------------
    @cached_property
    def ids(self) -> np.ndarray:
        return self._reader.strings(cf.IDS)

    @cached_property
    def split(self) -> np.ndarray:
        return self._reader.strings(cf.SPLIT)

    @cached_property
    def group(self) -> np.ndarray:
        return self._reader.strings(cf.GROUP)

    @cached_property
    def label(self) -> np.ndarray:
        return np.asarray(self._group[cf.LABEL][:], dtype=np.int64)

    @cached_property
    def group_ids(self) -> np.ndarray:
        """The stored group of every row, a row without one standing alone (its own id)."""
        g = self.group
        return np.where(g == "", row_groups(len(g)), g)

    @property
    def speakers(self) -> np.ndarray:
        """The speaker of every row: `group_ids` of a set grouped by speaker. DataError for
        other groupings."""
        if self.group_by != "speaker":
            raise DataError(f"feature set {self.name} is grouped by {self.group_by!r}, not by "
                            "speaker, so it does not record who speaks (per-speaker "
                            "standardisation needs it; prepare the set grouped by speaker)")
        return self.group_ids

    @cached_property
    def targets(self) -> dict[str, np.ndarray]:
        """Regression targets by name, float32 with NaN where the target is not present."""
        out = {}
        for t in self.target_names:
            v = np.asarray(self._group[cf.target_value(t)][:], dtype=np.float32)
            p = np.asarray(self._group[cf.target_present(t)][:], dtype=bool)
            out[t] = np.where(p, v, np.float32(np.nan)).astype(np.float32)
        return out

    @cached_property
    def units(self) -> list[cf.UnitMarker]:
        """The completion markers of finished work units (header excluded), by start row."""
        try:
            return self._reader.markers()
        except FormatError as e:
            raise DataError(str(e)) from e

    @cached_property
    def complete(self) -> np.ndarray:
        """Rows whose unit has a `.done` marker (and whose header finished): the only usable rows."""
        if not self._reader.header_done():
            return np.zeros(self.n, dtype=bool)
        return cf.completed_rows(self.n, self.units)

    def coverage(self) -> dict:
        """How much of the set is usable: clips, completed clips, missing, units done / total,
        and the same per split. fit records it in metrics.json and refuses a partial set."""
        comp = self.complete
        split = self.split
        size = (self.attrs.get("layout") or {}).get("unit_size") or self.attrs.get("unit_size")
        out: dict = {"clips": int(self.n), "completed": int(comp.sum()),
                     "missing": int(self.n - comp.sum()), "units_done": len(self.units)}
        if size:
            out["units"] = int(-(-self.n // int(size)))
        out["by_split"] = {str(sp): {"clips": int((split == sp).sum()),
                                     "completed": int((comp & (split == sp)).sum())}
                           for sp in dict.fromkeys(split.tolist())}
        return out

    def require_complete(self, allow_partial: bool = False) -> dict:
        """The coverage; a DataError naming the missing clips' count (and how to finish the set)
        when some clips are missing, unless `allow_partial`."""
        cov = self.coverage()
        # nothing completed at all: `check` says "no completed rows", --allow-partial cannot help
        if cov["missing"] and cov["completed"] and not allow_partial:
            units = (f"{cov['units'] - cov['units_done']} of {cov['units']} work units unfinished"
                     if "units" in cov else f"{cov['units_done']} work units finished")
            per = ", ".join(f"{sp} {d['clips'] - d['completed']} of {d['clips']}"
                            for sp, d in cov["by_split"].items() if d["clips"] > d["completed"])
            ds, preset = self.attrs.get("dataset", "DATASET"), self.attrs.get("preset", "PRESET")
            raise DataError(
                f"feature set {self.name} is partial: {cov['missing']} of {cov['clips']} clips "
                f"missing ({units}; {per}); finish it with `mmemo extract --dataset {ds} "
                f"--preset {preset}`, or pass --allow-partial to train on the "
                f"{cov['completed']} completed clips")
        return cov

    # --- inputs ----------------------------------------------------------------------
    def resolve(self, modalities: list[str] | tuple[str, ...] | str) -> list[str]:
        """'all' → every input modality; otherwise check the names exist."""
        if isinstance(modalities, str):
            modalities = list(self.available) if modalities == "all" else modalities.split(",")
        mods = [m.strip() for m in modalities if m.strip()]
        if not mods and not self.modalities:
            raise DataError(f"feature set {self.name} has no feature modalities, only labels or "
                            "targets (e.g. an imported labels .csd): nothing to fit on; import the "
                            "features beside it or extract the media")
        if not mods and not self.available:
            raise DataError(f"feature set {self.name}: none of its modalities "
                            f"({', '.join(self.modalities)}) is present on any finished clip "
                            "(did every clip fail? `mmemo cache info` shows the ledger)")
        if not mods:
            raise DataError(f"feature set {self.name}: no modalities asked for")
        unknown = [m for m in mods if m not in self.modalities]
        if unknown:
            raise DataError(f"feature set {self.name} has no modality {unknown} "
                            f"(it has {list(self.modalities)})")
        return mods

    def modality_spec(self, m: str) -> ModalitySpec:
        lay = self.meta.modality(m)
        return ModalitySpec(name=m, pooled_dim=lay.pooled_dim, seq_dim=lay.seq_dim,
                            max_len=lay.max_len if lay.seq_dim else 0,
                            n_layers=lay.n_layers if lay.has_layers else 0,
                            layer_dim=lay.layer_dim if lay.has_layers else 0)

    def spec(self, modalities: list[str] | str) -> InputSpec:
        mods = self.resolve(modalities)
        cond = self.modality_spec(COND) if self.has_cond else None
        return InputSpec(modalities=tuple(self.modality_spec(m) for m in mods), cond=cond,
                         extra={"dataset": self.meta.dataset, "key": self.key,
                                "classes": self.classes})

    def load(self, modalities: list[str] | str, rows: np.ndarray, cond: bool = True,
             sequences: tuple[str, ...] | None = None, seq_as_stored: bool = False,
             layers: tuple[str, ...] | None = None) -> dict:
        """The batch-format dict (numpy, float32) for `rows` of the asked modalities.

        Reads only those modalities' arrays and the chunks holding `rows`; `sequences` names
        the modalities whose [N, T, D] sequences are wanted (None: all) — they are most of a
        set's bytes, and a head that reads pooled vectors only never needs them.
        `seq_as_stored` leaves sequences in their stored float dtype (float16 in mmemo's
        caches: half the memory of float32). `layers` names the modalities whose per-hidden-
        state vectors [N, L+1, Dl] ("layers", float32) are wanted (None: every modality that
        has them; sets and backends without them simply have no "layers" entry). Rows must be
        complete; present rows must be finite (else DataError).
        """
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if len(rows) and not self.complete[rows].all():
            raise DataError(f"feature set {self.name}: asked for rows of unfinished units")
        names = self.resolve(modalities) + ([COND] if cond and self.has_cond else [])
        return {m: self._load_modality(m, rows, sequences is None or m in sequences,
                                       seq_as_stored, layers is None or m in layers)
                for m in names}

    def _load_modality(self, m: str, rows: np.ndarray, with_seq: bool = True,
                       seq_as_stored: bool = False, with_layers: bool = True) -> dict:
        spec = self.modality_spec(m)
        g = self._group
        out = {"present": read_rows(g[cf.present(m)], rows).astype(bool),
               "pooled": _f32(read_rows(g[cf.pooled(m)], rows))}
        if spec.is_sequence and with_seq:
            seq = read_rows(g[cf.seq(m)], rows)
            out["seq"] = seq if seq_as_stored and seq.dtype.kind == "f" else _f32(seq)
            out["len"] = read_rows(g[cf.length(m)], rows).astype(np.int64)
        if spec.has_layers and with_layers:
            out["layers"] = _f32(read_rows(g[cf.layer_stack(m)], rows))
        pres = out["present"]
        for part in ("pooled", "seq", "layers"):
            if part in out and not _all_finite(out[part]) and not _all_finite(out[part][pres]):
                bad = ~np.isfinite(out[part][pres].reshape(int(pres.sum()), -1)).all(axis=1)
                first = self.ids[rows[pres][bad][0]]
                raise DataError(f"feature set {self.name}: modality {m!r} has non-finite "
                                f"{part} values in {int(bad.sum())} present rows (first: {first})")
        return out

    # --- pre-training checks ----------------------------------------------------------
    def check(self, modalities: list[str] | str, rows: np.ndarray | None = None) -> list[str]:
        """Everything that can be checked before loading features; returns warnings.

        Raises DataError for: arrays whose length or dims disagree with attrs, modalities
        built by different stage configurations, no completed rows, a modality absent on
        every used row. Warns when label-derived metadata is among the inputs.
        """
        mods = self.resolve(modalities)
        self._check_shapes(mods + ([COND] if self.has_cond else []))
        self._check_provenance(mods)
        if rows is None:
            rows = np.flatnonzero(self.complete)
        if len(rows) == 0:
            raise DataError(f"feature set {self.name}: no completed rows (no unit has a "
                            ".done marker, or header.done is missing)")
        for m in mods:
            if not read_rows(self._group[cf.present(m)], np.sort(rows)).any():
                raise DataError(f"feature set {self.name}: modality {m!r} is absent on every "
                                f"one of the {len(rows)} rows used (see the set's ledger)")
        fields = self.label_derived_inputs(mods)
        if fields:
            msg = (f"inputs include metadata derived from the label annotation: {fields} "
                   f"(feature set {self.name}); scores will overstate what the model infers")
            log.warning(msg)
            return [msg]
        return []

    def _check_shapes(self, mods: list[str]) -> None:
        n = int(self.meta.n if self.meta.n is not None else self.n)
        for name in cf.ROW_ARRAYS:
            if self._group[name].shape[0] != n:
                raise DataError(f"feature set {self.name}: {name} has "
                                f"{self._group[name].shape[0]} rows, attrs say n={n}")
        for m in mods:
            spec = self.modality_spec(m)
            want = {cf.POOLED: (n, spec.pooled_dim), cf.PRESENT: (n,)}
            if spec.is_sequence:
                want |= {cf.SEQ: (n, spec.max_len, spec.seq_dim), cf.LEN: (n,)}
            if spec.has_layers:
                want |= {cf.LAYERS: (n, spec.n_layers, spec.layer_dim)}
            for part, shape in want.items():
                try:
                    got = tuple(self._group[cf.modality_array(m, part)].shape)
                except KeyError as e:
                    raise DataError(f"feature set {self.name}: array {m}/{part} is missing") from e
                if got != shape:
                    raise DataError(f"feature set {self.name}: {m}/{part} has shape {got} but "
                                    f"attrs say {shape} (seq_dim/pooled_dim/max_len mismatch)")

    def _check_provenance(self, mods: list[str]) -> None:
        """Modalities must come from one configuration of each stage (no mixed versions)."""
        by_stage: dict[str, dict] = {}
        for s in self.meta.stages:
            name = s.get("stage")
            if name in by_stage and by_stage[name] != s:
                raise DataError(f"feature set {self.name}: stage {name!r} is recorded with two "
                                f"configurations ({_diff(by_stage[name], s)}); re-extract")
            by_stage[name] = s
        for m in mods:
            prov = self.meta.modality_info(m).get("provenance") or {}
            ref = by_stage.get(prov.get("stage"))
            if ref is None:
                continue
            d = _diff(ref, prov, only_shared=True)
            if d:
                raise DataError(f"feature set {self.name}: modality {m!r} was built by a "
                                f"different {prov['stage']!r} stage configuration than the set "
                                f"records ({d}); mixed configurations, re-extract")
        seen: dict | None = None
        for u in self.units:
            stamp = u.get("stages")
            if stamp is None:
                continue
            if seen is not None and stamp != seen:
                raise DataError(f"feature set {self.name}: unit {u.unit} was written by "
                                f"different stage versions than earlier units "
                                f"({_diff(seen, stamp)}); mixed configurations, re-extract")
            seen = stamp

    def label_derived_inputs(self, mods: list[str]) -> list[str]:
        """Label-derived metadata fields among the inputs (per the set's `label_derived`).

        A metadata modality whose provenance lists its `fields` is matched field by field;
        without that list every label-derived pattern counts, to err on the loud side.
        """
        if not self.label_derived:
            return []
        hits: list[str] = []
        for m in mods:
            prov = self.meta.modality_info(m).get("provenance") or {}
            if m != "meta" and prov.get("stage") != "metadata":
                continue
            fields = prov.get("fields")
            if fields is None:
                hits += [p for p in self.label_derived if p not in hits]
                continue
            hits += [f for f in fields
                     if any(fnmatch.fnmatchcase(f, p) for p in self.label_derived)
                     and f not in hits]
        return hits


def _f32(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch (vectorised; numpy's f16 cast is several times slower)."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).numpy()


_FINITE_STEP = 1 << 20  # float16 values per block of the exponent test


def _all_finite(x: np.ndarray) -> bool:
    """True when every value is finite: float16 by its exponent bits, wider floats by one
    reduction (NaN/Inf propagate through a sum; float16-range values cannot overflow it).

    The float16 test runs block by block through one small scratch buffer: a whole-array
    temporary (2 bytes per value) is fresh memory, and a fresh process pays its page faults at
    0.3-0.4 GB/s here: 2.3 s of a 10k-clip fit's set-up, against 0.06 s in blocks."""
    if not x.size:
        return True
    if x.dtype == np.float16:  # exponent bits all ones <=> inf / nan; no float conversion
        flat = np.ascontiguousarray(x).reshape(-1).view(np.uint16)
        tmp = np.empty(min(_FINITE_STEP, flat.size), dtype=np.uint16)
        for s in range(0, flat.size, _FINITE_STEP):
            block = flat[s:s + _FINITE_STEP]
            part = tmp[:len(block)]
            np.bitwise_and(block, np.uint16(0x7C00), out=part)
            if part.max() == 0x7C00:
                return False
        return True
    return bool(torch.isfinite(torch.from_numpy(x).sum(dtype=torch.float32)))


def _diff(a: dict, b: dict, only_shared: bool = False) -> str:
    keys = (a.keys() & b.keys()) if only_shared else (a.keys() | b.keys())
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(keys)
                     if a.get(k) != b.get(k))


# --- what a head is told about its inputs (FeatureSet.spec makes one) ---------------------
@dataclass(frozen=True)
class ModalitySpec:
    name: str
    pooled_dim: int
    seq_dim: int = 0  # 0: a vector modality (no sequence)
    max_len: int = 0
    n_layers: int = 0  # hidden states in the "layers" input [B, n_layers, layer_dim]; 0: none
    layer_dim: int = 0

    @property
    def is_sequence(self) -> bool:
        return self.seq_dim > 0 and self.max_len > 0

    @property
    def has_layers(self) -> bool:
        return self.n_layers > 0 and self.layer_dim > 0


@dataclass(frozen=True)
class InputSpec:
    modalities: tuple[ModalitySpec, ...]  # the inputs the head fuses (any non-empty subset)
    cond: ModalitySpec | None = None  # conditioning vector (title / dialogue context), if any
    extra: dict = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def __getitem__(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)
