"""Synthetic feature sets written exactly per the cache contract (docs/ARCHITECTURE.md).

`write_feature_set` builds `<root>/sets/<key>/` (zarr v3 group, attrs["mmemo"], arrays chunked
by unit, units/<u>.done markers written last) and `<root>/aliases/<dataset>/<preset>.json`,
without importing `pipeline`: the fusion side is tested against the contract, not the writer.
Signal is known: each modality given a `signal` > 0 carries class-dependent means, the others
are pure noise, so tests can assert that fusion beats the majority baseline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from fusion.heads.base import FusionHead, HeadOutput

DEFAULT_MODALITIES = {
    # name: (seq_dim, pooled_dim, max_len, signal)
    "audio": (6, 10, 8, 1.0),
    "text": (8, 8, 8, 1.0),
    "visual": (5, 5, 8, 0.0),
}


def write_feature_set(
    root: Path,
    *,
    dataset: str = "synth",
    preset: str = "offline",
    n: int = 240,
    unit_size: int = 40,
    n_classes: int = 3,
    n_groups: int = 24,
    modalities: dict[str, tuple[int, int, int, float]] | None = None,
    cond_dim: int = 0,
    meta_dim: int = 0,
    label_derived: list[str] | None = None,
    meta_fields: list[str] | None = None,
    splits: tuple[float, float, float] | None = (0.6, 0.2, 0.2),
    missing_done: tuple[int, ...] = (),
    absent_frac: float = 0.1,
    scale: float = 1.0,
    class_probs: list[float] | None = None,
    seed: int = 0,
    stages: list[dict] | None = None,
    attrs_patch: dict | None = None,
    key: str | None = None,
    compressors: object = "auto",
    inner_chunk: int | None = None,
    extra_targets: tuple[str, ...] = (),
) -> str:
    """Write a synthetic feature set; return its key.

    Groups (speakers) are assigned to splits whole, so official splits are speaker-disjoint.
    `splits=None` puts every row in "train" (for k-fold). `scale` multiplies every feature
    (plus a large offset) to mimic eGeMAPS-scale inputs that need standardising.
    `compressors` goes to zarr's create_array for the feature arrays (e.g. the store's
    blosc-lz4 codec, for benchmarks); `inner_chunk` < unit_size shards each unit's chunk file
    into inner chunks, as the store does. `extra_targets` (e.g. "valence") are continuous
    targets on [-1, 1] that follow the label, beside the [-3, 3] sentiment every set has.
    """
    rng = np.random.default_rng(seed)
    mods = dict(DEFAULT_MODALITIES if modalities is None else modalities)
    if meta_dim:
        mods["meta"] = (0, meta_dim, 0, 1.0)
    if cond_dim:
        mods["cond"] = (0, cond_dim, 0, 0.0)
    key = key or hashlib.sha256(f"{dataset}{preset}{n}{seed}{sorted(mods)}".encode()).hexdigest()[:16]
    path = root / "sets" / key
    g = zarr.open_group(str(path), mode="w", zarr_format=3)

    probs = np.asarray(class_probs or [1.0 / n_classes] * n_classes)
    label = rng.choice(n_classes, size=n, p=probs / probs.sum()).astype(np.int32)
    group = rng.integers(0, n_groups, size=n)
    split = _assign_splits(group, n_groups, splits, rng)
    static = {
        "ids": np.array([f"clip{i:05d}" for i in range(n)]),
        "split": split,
        "group": np.array([f"spk{x:03d}" for x in group]),
        "label": label,
        "targets/sentiment/value": ((label - (n_classes - 1) / 2) * 1.2
                                    + rng.normal(0, 0.3, n)).astype(np.float32),
        "targets/sentiment/present": rng.random(n) > 0.05,
    }
    for t in extra_targets:
        static[f"targets/{t}/value"] = np.clip((label - (n_classes - 1) / 2) / max(1, n_classes - 1)
                                               + rng.normal(0, 0.15, n), -1, 1).astype(np.float32)
        static[f"targets/{t}/present"] = np.ones(n, bool)
    for rel, arr in static.items():
        _write(g, rel, arr, (n,))

    provs = {}
    for m, (seq_dim, pooled_dim, max_len, signal) in mods.items():
        provs[m] = _write_modality(g, m, label, n_classes, seq_dim, pooled_dim, max_len, signal,
                                   absent_frac if m != "cond" else 0.0, scale, unit_size, rng,
                                   compressors, inner_chunk)
        if m == "meta" and meta_fields is not None:
            provs[m]["fields"] = meta_fields

    attrs = {
        "format": 1, "key": key, "dataset": dataset, "preset": preset, "n": n,
        "unit_size": unit_size, "classes": [f"c{i}" for i in range(n_classes)],
        "task": "classification", "group_by": "speaker",
        "label_derived": list(label_derived or []), "targets": ["sentiment", *extra_targets],
        "modalities": {
            m: {"seq_dim": s, "pooled_dim": p, "max_len": t,
                "kind": "sequence" if s and t else "vector", "provenance": provs[m]}
            for m, (s, p, t, _) in mods.items()
        },
        "stages": stages if stages is not None else list({p["stage"]: p for p in provs.values()}.values()),
        "created_by": "test@host", "created_at": "2025-01-01T00:00:00Z",
    }
    attrs.update(attrs_patch or {})
    g.attrs["mmemo"] = attrs

    units = path / "units"
    units.mkdir(parents=True, exist_ok=True)
    (units / "header.done").write_text(json.dumps({"checksums": {}}))
    for u in range((n + unit_size - 1) // unit_size):
        if u in missing_done:
            continue
        (units / f"{u}.done").write_text(json.dumps(
            {"unit": u, "start": u * unit_size, "stop": min(n, (u + 1) * unit_size),
             "checksums": {}, "failures": []}))
    alias = root / "aliases" / dataset / f"{preset}.json"
    alias.parent.mkdir(parents=True, exist_ok=True)
    alias.write_text(json.dumps({"key": key}))
    return key


def _assign_splits(group: np.ndarray, n_groups: int, splits, rng) -> np.ndarray:
    if splits is None:
        return np.array(["train"] * len(group))
    order = rng.permutation(n_groups)
    cuts = np.cumsum(np.asarray(splits) / sum(splits) * n_groups).round().astype(int)
    name_of = {}
    for i, gid in enumerate(order):
        name_of[gid] = "train" if i < cuts[0] else "valid" if i < cuts[1] else "test"
    return np.array([name_of[x] for x in group])


def _write(g: zarr.Group, rel: str, arr: np.ndarray, chunks: tuple[int, ...]) -> None:
    if arr.dtype.kind in "US":
        za = g.create_array(rel, shape=arr.shape, dtype=str, chunks=chunks)
        za[:] = arr.astype(object)
    else:
        za = g.create_array(rel, shape=arr.shape, dtype=arr.dtype, chunks=chunks)
        za[...] = arr


def _write_modality(g, m, label, n_classes, seq_dim, pooled_dim, max_len, signal, absent_frac,
                    scale, unit_size, rng, compressors="auto", inner_chunk=None) -> dict:
    """Class centroid + noise, stored float16 unit by unit; absent rows are zero, present=False.

    Generated one unit at a time (float32) so a 10k-clip benchmark set stays small in memory.
    """
    n = len(label)
    present = rng.random(n) >= absent_frac
    offset = np.float32(20.0 * scale if scale != 1.0 else 0.0)
    cent = rng.normal(0, 1, (n_classes, pooled_dim)).astype(np.float32)
    seq = bool(seq_dim and max_len)
    cs = rng.normal(0, 1, (n_classes, seq_dim)).astype(np.float32) if seq else None
    lens = rng.integers(max(1, max_len // 2), max_len + 1, size=n) * present if seq else None
    inner = min(unit_size, inner_chunk or unit_size)

    def layout(*shape: int) -> dict:
        if inner < unit_size:
            return {"chunks": (inner, *shape), "shards": (unit_size, *shape)}
        return {"chunks": (unit_size, *shape)}

    pooled_a = g.create_array(f"{m}/pooled", shape=(n, pooled_dim), dtype="float16",
                              compressors=compressors, **layout(pooled_dim))
    seq_a = g.create_array(f"{m}/seq", shape=(n, max_len, seq_dim), dtype="float16",
                           compressors=compressors, **layout(max_len, seq_dim)) if seq else None
    for a in range(0, n, unit_size):
        b = min(n, a + unit_size)
        y, pr = label[a:b], present[a:b]
        noise = rng.standard_normal((b - a, pooled_dim), dtype=np.float32)
        pooled_a[a:b] = ((signal * cent[y] + noise) * scale + offset) * pr[:, None]
        if seq:
            x = signal * cs[y][:, None, :] + rng.standard_normal((b - a, max_len, seq_dim),
                                                                 dtype=np.float32)
            valid = np.arange(max_len)[None, :] < lens[a:b, None]
            seq_a[a:b] = (x * scale + offset) * valid[..., None]
    _write(g, f"{m}/present", present, (unit_size,))
    if seq:
        _write(g, f"{m}/len", lens.astype(np.int32), (unit_size,))
    stage = "metadata" if m == "meta" else "text" if m == "cond" else m
    return {"stage": stage, "backend": "synthetic", "version": "1"}


class TinyHead(FusionHead):
    """A minimal head following the fusion interface: masked mean of pooled projections."""

    def __init__(self, spec, n_out: int, hidden: int = 16, **_: object):
        super().__init__()
        self.names = spec.names
        self.proj = nn.ModuleDict({m.name: nn.Linear(m.pooled_dim, hidden) for m in spec.modalities})
        self.out = nn.Linear(hidden, n_out)
        self.after_fit_calls = 0

    def forward(self, batch: dict) -> HeadOutput:
        zs, ws = [], []
        for m in self.names:
            p = batch[m]["present"].float()[:, None]
            zs.append(torch.relu(self.proj[m](batch[m]["pooled"])) * p)
            ws.append(p)
        return HeadOutput(self.out(sum(zs) / torch.clamp(sum(ws), min=1.0)))

    def after_fit(self, val_batch: dict, val_y: torch.Tensor) -> None:
        self.after_fit_calls += 1


def tiny_head(spec, n_out: int, **options) -> FusionHead:
    return TinyHead(spec, n_out, **options)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache root with the default synthetic set ('synth', preset 'offline')."""
    write_feature_set(tmp_path)
    return tmp_path
