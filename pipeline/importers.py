"""Import features made by other tools into the cache, and export sets for other trainers.

Imports go through the Store API (`create_set` + one `commit_unit` per unit), so an imported
set has the same guarantees as an extracted one: content-addressed key (the sha256 of the
imported file plus the importer's version and options), per-unit checksums that `mmemo cache
verify` checks, NaN/Inf never stored, a `dataset/<format>` alias.

CMU-MultimodalSDK computational sequences (`.csd`, HDF5) — the mapping:
- the file holds one root group `<root name>/` with `data/<video_id>/{features [n, D],
  intervals [n, 2] seconds}` and `metadata/` (strings such as "dimension names").
- a *labels* sequence (D == 1 and the root name mentions "label", like
  `CMU_MOSI_Opinion_Labels.csd`) gives one clip per row = per labelled segment, id
  `<video_id>[<i>]` sanitised (so `<video_id>_<i>`), start/end from its interval stored as
  `segment/start`, `segment/end` [N] seconds, group = the raw video id (grouped folds never
  split a video), and the row value as the `sentiment` regression
  target. Such a set has no feature modality of its own.
- a *features* sequence gives one clip per video; its rows, ordered by interval start, are the
  modality's sequence (seq = rows, padded or average-pooled to `max_len`, len = rows kept) and
  their mean is the pooled vector. The modality is named after the root group, sanitised
  (`"COVAREP"` → `covarep`). With `labels=<labels .csd>` the clips are the labelled segments
  instead, and each segment's sequence is the feature rows whose interval overlaps it.
- a clip whose features hold NaN/Inf (COVAREP has -inf) or values beyond float16 has that
  modality *absent* with a ledger line, as in the extractor; never zero-filled as if real.
- CSD files carry no train/valid/test split: every clip is in split "train"; use grouped
  k-fold (group = video) or assign folds downstream.

MMSA aligned pickles (`{'train'|'valid'|'test': {'text','audio','vision': [N, T, D],
'regression_labels' or 'labels', 'id', ...}}`): the one place mmemo unpickles, and only with
an explicit `allow_pickle=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import cacheformat as cf
from pipeline.manifest import sanitize_id
from pipeline.stages.base import pad_or_pool  # lightweight: stage backends load on demand
from pipeline.store import ModalityLayout, SetLayout, Store, sha256_file

IMPORTER_VERSION = "1"
F16_MAX = 65000.0
MMSA_NAMES = {"text": "text", "audio": "audio", "vision": "visual"}  # MMSA key -> modality
OTHER_TARGETS = ("valence", "arousal")  # regression targets MMSA has no key for: <t>_labels
MMSA_SPLITS = {"valid": "valid", "val": "valid", "dev": "valid"}  # set split -> pkl key


def _key(dataset: str, parts: list[Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return f"{dataset}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _simple_name(raw: str, fallback: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.\-]+", "_", raw).replace("..", "_").strip("._-")
    return s or fallback


def _unique_ids(raw_ids: list[str]) -> list[str]:
    ids = [sanitize_id(r) for r in raw_ids]
    seen: dict[str, str] = {}
    for r, i in zip(raw_ids, ids):
        if i in seen and seen[i] != r:
            raise ValueError(f"ids '{seen[i]}' and '{r}' both become '{i}' once sanitised")
        if i in seen:
            raise ValueError(f"duplicate id '{r}'")
        seen[i] = r
    return ids


def _usable(x: np.ndarray) -> str | None:
    """Why an array cannot be stored as float16 features, or None if it can."""
    if x.size and not np.isfinite(x).all():
        return "NaN/Inf in the imported features"
    if x.size and np.abs(x).max() > F16_MAX:
        return "values beyond the float16 range in the imported features"
    return None


def _write_set(
    cache_root: str | os.PathLike,
    key: str,
    layout: SetLayout,
    attrs: dict[str, Any],
    static: dict[str, np.ndarray],
    rows: dict[str, np.ndarray],
    failures: list[dict[str, Any]],
    alias: tuple[str, str],
) -> str:
    """Create the set and commit it unit by unit (skipping units already done: an import
    interrupted half way resumes, and a re-import of the same file is a no-op)."""
    store = Store(cache_root)
    fs = store.create_set(key, layout, attrs, static)
    for u in range(layout.n_units):
        if fs.is_done(u):
            continue
        claim = store.claim(key, u, lease_s=600)
        if claim is None:  # someone else imports the same file right now
            continue
        try:
            if fs.is_done(u):
                continue
            a, b = layout.unit_range(u)
            ids = set(static[cf.IDS][a:b].tolist())
            fs.commit_unit(u, {k: v[a:b] for k, v in rows.items()},
                           [f for f in failures if f["id"] in ids], claim=claim)
        finally:
            store.release(claim)
    store.set_alias(alias[0], alias[1], key)
    return key


def _modality_rows(name: str, seqs: list[np.ndarray | None], max_len: int, ids: list[str],
                   failures: list[dict[str, Any]], pooled: list[np.ndarray | None] | None = None,
                   lens: list[int | None] | None = None) -> tuple[ModalityLayout, dict[str, np.ndarray]]:
    """Per-clip arrays of one sequence modality from variable-length [t, D] arrays (None = absent)."""
    dims = {s.shape[1] for s in seqs if s is not None}
    if len(dims) != 1:
        raise ValueError(f"modality {name}: feature dims {sorted(dims) or 'none'} (need exactly one)")
    d = dims.pop()
    dp = d
    if pooled is not None:
        pdims = {p.shape[0] for p in pooled if p is not None}
        dp = pdims.pop() if len(pdims) == 1 else d
    n = len(seqs)
    out = {
        cf.pooled(name): np.zeros((n, dp), np.float16),
        cf.present(name): np.zeros(n, bool),
        cf.seq(name): np.zeros((n, max_len, d), np.float16),
        cf.length(name): np.zeros(n, np.int32),
    }
    for i, s in enumerate(seqs):
        if s is None:
            continue
        s = np.asarray(s, np.float32)
        if lens is not None and lens[i] is not None:
            s = s[: int(lens[i])]
        why = "no rows" if len(s) == 0 else _usable(s)
        p = None
        if why is None:
            p = np.asarray(pooled[i], np.float32) if pooled is not None and pooled[i] is not None else s.mean(0)
            why = _usable(p)
        if why:
            failures.append({"id": ids[i], "stage": "import", "error": "BadFeatures",
                             "message": f"{name}: {why}", "file": None})
            continue
        arr, ln = pad_or_pool(s, max_len)
        out[cf.seq(name)][i] = arr.astype(np.float16)
        out[cf.length(name)][i] = ln
        out[cf.pooled(name)][i] = p.astype(np.float16)
        out[cf.present(name)][i] = True
    layout = ModalityLayout(name=name, pooled_dim=dp, seq_dim=d, max_len=max_len)
    return layout, out


# --- CMU-MultimodalSDK ---------------------------------------------------------------------------
def read_csd(path: Path) -> tuple[str, dict[str, str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(root name, metadata strings, video id -> (features, intervals)) of a .csd file."""
    import h5py

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file (a .csd is HDF5): {e}") from e
    with f:
        roots = list(f.keys())
        if len(roots) != 1:
            raise ValueError(f"{path}: expected one root group in a computational sequence, found {roots}")
        g = f[roots[0]]
        if "data" not in g:
            raise ValueError(f"{path}: no '{roots[0]}/data' group (not a CMU-MultimodalSDK .csd)")
        meta: dict[str, str] = {}
        for k, v in (g["metadata"].items() if "metadata" in g else []):
            val = v[()]
            if isinstance(val, np.ndarray):
                val = val.reshape(-1)[0] if val.size else ""
            meta[k] = val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)
        data = {}
        for vid, grp in g["data"].items():
            feats = np.asarray(grp["features"][:])
            ivals = np.asarray(grp["intervals"][:], np.float64)
            if feats.ndim == 1:
                feats = feats[:, None]
            if len(feats) != len(ivals):
                raise ValueError(f"{path}: video {vid}: {len(feats)} feature rows but {len(ivals)} intervals")
            data[vid] = (feats, ivals)
    return roots[0], meta, data


def _is_labels(root_name: str, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> bool:
    dims = {f.shape[1] for f, _ in data.values()}
    return dims == {1} and "label" in root_name.lower()


def import_csd(
    file: str | os.PathLike,
    cache_root: str | os.PathLike,
    dataset: str | None = None,
    labels: str | os.PathLike | None = None,
    max_len: int = 64,
    unit_size: int = 256,
) -> str:
    """Import a CMU-MultimodalSDK computational sequence as a feature set; returns its key.

    A labels .csd gives per-segment clips with the `sentiment` target; a features .csd gives a
    sequence modality (per video, or per labelled segment when `labels` names a labels .csd).
    The mapping is described in this module's docstring. Alias: `<dataset>/csd`.
    """
    path = Path(file)
    dataset = _simple_name(dataset or path.stem, "csd")
    root_name, meta, data = read_csd(path)
    vids = sorted(data)
    failures: list[dict[str, Any]] = []
    rows: dict[str, np.ndarray] = {}
    mods: dict[str, ModalityLayout] = {}
    targets: list[str] = []
    sources = [{"file": path.name, "sha256": sha256_file(path), "root": root_name, "metadata": meta}]

    seg_source: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    if _is_labels(root_name, data):
        seg_source, feat_source = data, None
    elif labels is not None:
        lroot, lmeta, ldata = read_csd(Path(labels))
        if not _is_labels(lroot, ldata):
            raise ValueError(f"{labels}: not a labels computational sequence (root '{lroot}')")
        sources.append({"file": Path(labels).name, "sha256": sha256_file(Path(labels)), "root": lroot,
                        "metadata": lmeta})
        seg_source, feat_source = ldata, (root_name, data)
    else:
        feat_source = (root_name, data)

    if seg_source is not None:
        raw_ids, groups, spans, values = [], [], [], []
        for vid in sorted(seg_source):
            feats, ivals = seg_source[vid]
            order = np.argsort(ivals[:, 0], kind="stable")
            for i in order:
                raw_ids.append(f"{vid}[{int(i)}]")
                groups.append(vid)
                spans.append((vid, float(ivals[i, 0]), float(ivals[i, 1])))
                values.append(float(feats[i, 0]))
        ids = _unique_ids(raw_ids)
        vals = np.asarray(values, np.float32)
        ok = np.isfinite(vals)
        static_targets = {cf.target_value("sentiment"): np.where(ok, vals, 0).astype(np.float32),
                          cf.target_present("sentiment"): ok}
        targets = ["sentiment"]
    else:
        ids = _unique_ids(vids)
        groups = list(vids)
        spans = [(v, -np.inf, np.inf) for v in vids]
        static_targets = {}

    if feat_source is not None:
        fname, fdata = feat_source
        mod = sanitize_id(fname).lower().replace(".", "_").replace("-", "_") or "features"
        seqs: list[np.ndarray | None] = []
        for vid, a, b in spans:
            if vid not in fdata:
                seqs.append(None)
                failures.append({"id": ids[len(seqs) - 1], "stage": "import", "error": "Missing",
                                 "message": f"{mod}: video {vid} not in {path.name}", "file": None})
                continue
            feats, ivals = fdata[vid]
            order = np.argsort(ivals[:, 0], kind="stable")
            feats, ivals = feats[order], ivals[order]
            keep = (ivals[:, 1] > a) & (ivals[:, 0] < b) if np.isfinite(a) else np.ones(len(feats), bool)
            seqs.append(np.asarray(feats[keep], np.float32))
        mlay, arrs = _modality_rows(mod, seqs, max_len, ids, failures)
        mlay.provenance = {"stage": "import", "backend": "csd", "source": fname, "metadata": meta}
        mods[mod] = mlay
        rows.update(arrs)

    n = len(ids)
    static = {
        cf.IDS: np.asarray(ids, dtype=object),
        cf.SPLIT: np.asarray(["train"] * n, dtype=object),
        cf.GROUP: np.asarray(groups, dtype=object),  # the raw video id: not a file name
        cf.LABEL: np.full(n, -1, np.int32),
        **static_targets,
    }
    if seg_source is not None:  # segment bounds in seconds within the video (the csd intervals)
        static[cf.SEGMENT_START] = np.asarray([s[1] for s in spans], np.float64)
        static[cf.SEGMENT_END] = np.asarray([s[2] for s in spans], np.float64)
    key = _key(dataset, ["csd", IMPORTER_VERSION, dataset, max_len, unit_size,
                         [s["sha256"] for s in sources]])
    attrs = {
        "dataset": dataset,
        "preset": "csd",
        "classes": [],
        "task": "regression" if targets else "features",
        "group_by": "video",
        "label_derived": [],
        "targets": targets,
        "stages": [{"stage": "import", "backend": "csd", "version": IMPORTER_VERSION, "sources": sources}],
        "imported": {"format": "cmu-multimodalsdk-csd", "sources": sources,
                     "segments": seg_source is not None},
    }
    layout = SetLayout(n=n, unit_size=unit_size, modalities=mods)
    return _write_set(cache_root, key, layout, attrs, static, rows, failures, (dataset, "csd"))


# --- MMSA pickles ------------------------------------------------------------------------------
def import_mmsa_pkl(
    file: str | os.PathLike,
    cache_root: str | os.PathLike,
    dataset: str | None = None,
    allow_pickle: bool = False,
    unit_size: int = 256,
) -> str:
    """Import an MMSA aligned pickle as a feature set; returns its key. Alias `<dataset>/mmsa`.

    Unpickling runs arbitrary code from the file, so this refuses (ValueError) unless the
    caller passes `allow_pickle=True` — the CLI only does with `--allow-pickle`. This is the
    only place mmemo unpickles.

    Mapping: every top-level dict is a split (`valid` stays `valid`); `text`/`audio`/`vision`
    [N, T, D] become the `text`/`audio`/`visual` sequence modalities (T = max_len); lengths come
    from `<key>_lengths` (MMSA's `audio_lengths`, `vision_lengths`) else T; the pooled vector
    is `<key>_pooled` when present (written by `export_set`) else the mean over valid steps;
    `<key>_mask` [N] bool (False = absent) when present. `regression_labels` (or a float
    `labels`) → `sentiment`; `classification_labels` (or an integer `labels`) → `label`. Ids
    from `id` (sanitised: `vid$_$3` → `vid_3`), group from `group` if present, else the part
    of the id before `$_$`. A top-level
    `_mmemo` dict (written by `export_set`) restores class names, task and the extra modalities
    it lists.
    """
    if not allow_pickle:
        raise ValueError("refusing to unpickle: a .pkl file can run arbitrary code when loaded; "
                         "pass allow_pickle=True (CLI: --allow-pickle) only for files you trust")
    path = Path(file)
    dataset = _simple_name(dataset or path.stem, "mmsa")
    digest = sha256_file(path)
    with open(path, "rb") as f:
        obj = pickle.load(f)  # noqa: S301 - explicit opt-in above
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of splits, got {type(obj).__name__}")
    extra = obj.get("_mmemo") if isinstance(obj.get("_mmemo"), dict) else {}
    splits = [k for k, v in obj.items() if isinstance(v, dict) and k != "_mmemo"]
    if not splits:
        raise ValueError(f"{path}: no split dicts (train/valid/test) found")
    mod_keys = dict(MMSA_NAMES)
    for m in extra.get("modalities", []):
        mod_keys.setdefault(m, m)

    raw_ids: list[str] = []
    groups: list[str] = []
    split_col: list[str] = []
    reg: dict[str, list[float]] = {}  # regression target -> value per row (0 where absent)
    reg_ok: dict[str, list[bool]] = {}
    cls: list[int] = []
    per_mod: dict[str, dict[str, list[Any]]] = {}
    for sp in splits:
        d = obj[sp]
        n = None
        for k in mod_keys:
            if k in d:
                n = len(d[k])
                break
        if n is None:
            for k in ("regression_labels", "labels", "id"):
                if k in d:
                    n = len(d[k])
                    break
        if n is None:
            continue
        ids = [str(x) for x in d["id"]] if "id" in d else [f"{sp}_{i}" for i in range(n)]
        raw_ids.extend(ids)
        if "group" in d:
            groups.extend(str(x) for x in d["group"])
        else:
            groups.extend(sanitize_id(r.split("$_$", 1)[0]) for r in ids)
        split_col.extend([_simple_name(sp, "train")] * n)
        r = d.get("regression_labels")
        c = d.get("classification_labels")
        lab = d.get("labels")
        if lab is not None:
            lab = np.asarray(lab).reshape(n, -1)[:, 0]
            if r is None and lab.dtype.kind == "f":
                r = lab
            elif c is None:
                c = lab
        sources = {"sentiment": (r, "regression_labels")}
        sources |= {t: (d.get(f"{t}_labels"), f"{t}_labels") for t in OTHER_TARGETS}
        for t, (values, key) in sources.items():
            got, ok = reg.setdefault(t, []), reg_ok.setdefault(t, [])
            if values is None:
                got.extend([0.0] * n)
                ok.extend([False] * n)
                continue
            values = np.asarray(values, np.float32).reshape(n, -1)[:, 0]
            vmask = np.asarray(d.get(f"{key}_mask", np.isfinite(values)), bool).reshape(-1)
            got.extend(np.where(vmask, values, 0).tolist())
            ok.extend(vmask.tolist())
        cls.extend(np.asarray(c).reshape(n, -1)[:, 0].astype(int).tolist() if c is not None else [-1] * n)
        for k, m in mod_keys.items():
            pm = per_mod.setdefault(m, {"seq": [], "pooled": [], "len": [], "src": k})
            if k not in d:
                pm["seq"].extend([None] * n)
                pm["pooled"].extend([None] * n)
                pm["len"].extend([None] * n)
                continue
            x = np.asarray(d[k], np.float32)
            if x.ndim == 2:  # a vector modality stored [N, D]: one step
                x = x[:, None, :]
            mask = np.asarray(d.get(f"{k}_mask", np.ones(n, bool)), bool).reshape(-1)
            lens = d.get(f"{k}_lengths")
            pooled = d.get(f"{k}_pooled")
            for i in range(n):
                pm["seq"].append(x[i] if mask[i] else None)
                pm["pooled"].append(np.asarray(pooled[i], np.float32) if pooled is not None else None)
                pm["len"].append(int(lens[i]) if lens is not None else None)
    ids = _unique_ids(raw_ids)
    n = len(ids)
    failures: list[dict[str, Any]] = []
    mods: dict[str, ModalityLayout] = {}
    rows: dict[str, np.ndarray] = {}
    kinds = extra.get("kinds", {})
    for m, pm in per_mod.items():
        if all(s is None for s in pm["seq"]):
            continue
        t = max(s.shape[0] for s in pm["seq"] if s is not None)
        has_pooled = any(p is not None for p in pm["pooled"])
        mlay, arrs = _modality_rows(m, pm["seq"], t, ids, failures,
                                    pooled=pm["pooled"] if has_pooled else None, lens=pm["len"])
        if kinds.get(m) == "vector":  # exported pooled-only: keep it a vector modality
            mlay = ModalityLayout(name=m, pooled_dim=mlay.pooled_dim)
            arrs = {k: v for k, v in arrs.items() if k in (cf.pooled(m), cf.present(m))}
        mlay.provenance = {"stage": "import", "backend": "mmsa-pkl", "source": pm["src"]}
        mods[m] = mlay
        rows.update(arrs)
    static: dict[str, np.ndarray] = {
        cf.IDS: np.asarray(ids, dtype=object),
        cf.SPLIT: np.asarray(split_col, dtype=object),
        cf.GROUP: np.asarray(groups, dtype=object),
        cf.LABEL: np.asarray(cls, np.int32),
    }
    targets = [t for t in reg if any(reg_ok[t])]
    for t in targets:
        static[cf.target_value(t)] = np.asarray(reg[t], np.float32)
        static[cf.target_present(t)] = np.asarray(reg_ok[t], bool)
    n_cls = int(max(cls)) + 1 if cls and max(cls) >= 0 else 0
    classes = extra.get("classes") or [str(i) for i in range(n_cls)]
    key = _key(dataset, ["mmsa-pkl", IMPORTER_VERSION, dataset, unit_size, digest])
    attrs = {
        "dataset": dataset,
        "preset": "mmsa",
        "classes": classes,
        "task": extra.get("task") or ("regression" if targets else "classification"),
        "group_by": extra.get("group_by") or "video",
        "label_derived": [],
        "targets": targets,
        "stages": [{"stage": "import", "backend": "mmsa-pkl", "version": IMPORTER_VERSION}],
        "imported": {"format": "mmsa-pkl", "file": path.name, "sha256": digest, "splits": splits},
    }
    layout = SetLayout(n=n, unit_size=unit_size, modalities=mods)
    return _write_set(cache_root, key, layout, attrs, static, rows, failures, (dataset, "mmsa"))


# --- export ------------------------------------------------------------------------------------
def _open_complete(cache_root: str | os.PathLike, key_or_alias: str) -> tuple[str, dict[str, Any], zarr.Group, np.ndarray]:
    from pipeline.cachetools import resolve_key

    store = Store(cache_root)
    key = resolve_key(cache_root, key_or_alias)
    fs = store.open(key)
    return key, fs.attrs, zarr.open_group(fs.path, mode="r"), np.flatnonzero(fs.completed_rows())


def export_set(cache_root: str | os.PathLike, key_or_alias: str, out: str | os.PathLike, fmt: str = "hdf5") -> Path:
    """Write the completed rows (units with a `.done` marker) of a set for other trainers.

    hdf5: `/ids`, `/split`, `/group` (utf-8 strings), `/label` int32, `/targets/<t>/{value,
    present}`, and one group per modality `/<m>/{pooled, present, seq, len}` exactly as
    cached (float16), with the set's attrs as JSON in the root attribute `mmemo`.

    mmsa-pkl: `{'train'|'valid'|'test'|<other split>: {...}}` with `id`, `text`/`audio`/`vision`
    [N, T, D] float32 (our `visual` is MMSA's `vision`; other modalities under their own
    name), `<key>_lengths`, `<key>_pooled` [N, Dp], `regression_labels` (sentiment, 0 where
    absent, `regression_labels_mask`), every other regression target as `<target>_labels` /
    `<target>_labels_mask` (valence, arousal: MMSA has no key for them, `import_mmsa_pkl`
    reads them back) and `classification_labels` (-1 = unlabelled). A clip
    whose modality is absent gets zeros there AND False in `<key>_mask` [N] bool — MMSA code
    that ignores masks would read those zeros as data, so use the mask. A top-level `_mmemo`
    dict keeps class names, task and modality kinds so `import_mmsa_pkl` restores the set.
    """
    out = Path(out)
    key, attrs, g, rows = _open_complete(cache_root, key_or_alias)
    if len(rows) == 0:
        raise ValueError(f"set {key} has no completed units to export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")

    def col(rel: str) -> np.ndarray:
        a = np.asarray(g[rel][:])
        if a.dtype.kind not in "biuf":  # zarr v3 strings come back as numpy StringDType
            a = np.asarray([str(x) for x in a], dtype=object)
        return a[rows]

    mods = attrs.get("modalities", {})
    targets = list(attrs.get("targets") or [])
    try:
        if fmt == "hdf5":
            import h5py

            with h5py.File(tmp, "w") as h:
                h.attrs[cf.ATTRS_KEY] = json.dumps({**attrs, "exported_rows": int(len(rows))}, default=str)
                sdt = h5py.string_dtype("utf-8")
                for name in cf.STRING_ARRAYS:
                    h.create_dataset(name, data=col(name), dtype=sdt)
                h.create_dataset(cf.LABEL, data=col(cf.LABEL).astype(np.int32))
                for t in targets:
                    for rel in (cf.target_value(t), cf.target_present(t)):
                        h.create_dataset(rel, data=col(rel))
                for m, info in mods.items():
                    for rel in cf.ModalityLayout.from_json(m, info).paths():
                        h.create_dataset(rel, data=col(rel), compression="gzip")
        elif fmt == "mmsa-pkl":
            split = col(cf.SPLIT)
            ids = col(cf.IDS)
            label = col(cf.LABEL).astype(np.int64)
            group = col(cf.GROUP)
            rev = {v: k for k, v in MMSA_NAMES.items()}
            cols = {m: {rel.rsplit("/", 1)[1]: col(rel) for rel in cf.ModalityLayout.from_json(m, info).paths()}
                    for m, info in mods.items()}
            res: dict[str, Any] = {}
            for sp in dict.fromkeys(split.tolist()):
                sel = split == sp
                d: dict[str, Any] = {"id": ids[sel].tolist(), "group": group[sel].tolist(),
                                     "classification_labels": label[sel]}
                for t in targets:
                    k = "regression_labels" if t == "sentiment" else f"{t}_labels"
                    d[k] = col(cf.target_value(t))[sel].astype(np.float32)
                    d[f"{k}_mask"] = col(cf.target_present(t))[sel]
                for m, c in cols.items():
                    k = rev.get(m, m)
                    present = c["present"][sel]
                    if "seq" in c:
                        d[k] = np.where(present[:, None, None], c["seq"][sel].astype(np.float32), 0)
                        d[f"{k}_lengths"] = np.where(present, c["len"][sel], 0)
                    else:
                        d[k] = np.where(present[:, None], c["pooled"][sel].astype(np.float32), 0)
                    d[f"{k}_pooled"] = np.where(present[:, None], c["pooled"][sel].astype(np.float32), 0)
                    d[f"{k}_mask"] = present
                res[MMSA_SPLITS.get(sp, sp)] = d
            res["_mmemo"] = {
                "key": key,
                "classes": attrs.get("classes"),
                "task": attrs.get("task"),
                "group_by": attrs.get("group_by"),
                "modalities": [m for m in mods if m not in MMSA_NAMES.values()],
                "kinds": {m: info.get("kind") for m, info in mods.items()},
            }
            with open(tmp, "wb") as f:
                pickle.dump(res, f, protocol=4)
        else:
            raise ValueError(f"unknown export format '{fmt}' (hdf5, mmsa-pkl)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
