"""Fit a fusion head on cached features: rigorous, deterministic, seconds on a CPU.

The trainer reads only the feature cache (fusion.data), never media or encoders. It loads
the needed arrays once, standardises them with training statistics, trains with AdamW on
full-tensor mini-batches (no DataLoader), early-stops on a validation split that respects
groups (speaker / dialogue / actor), restores the best state, and evaluates on the official
test split or over grouped k-fold, beside the majority (or mean) baseline. Each run writes
`runs/<name>/`: metrics.json, config.toml, model.safetensors, confusion.png, log.csv.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from fusion import metrics as M
from fusion.data import DataError, FeatureSet, open_set

log = logging.getLogger(__name__)

TRAIN, TEST = "train", "test"
VALID_NAMES = ("valid", "validation", "val", "dev")
UNGROUPED = ("none", "row", "rows")

HeadFactory = Callable[..., nn.Module]
Batch = dict[str, dict[str, Tensor]]


@dataclass
class RunResult:
    """What a fit returns: where it wrote, and the metrics.json content."""

    name: str
    run_dir: Path
    metrics: dict
    log: list[dict] = field(default_factory=list)


@dataclass
class Fold:
    """Row indices (into the feature set) of one train/validation/test partition."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    index: int = 0


@dataclass
class Task:
    """What is predicted: class indices (classification) or a float target (regression)."""

    target: str
    kind: Literal["classification", "regression"]
    y: np.ndarray  # over all N rows; -1 / NaN where unlabelled
    classes: list[str]

    @property
    def n_out(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1

    def labelled(self) -> np.ndarray:
        return self.y >= 0 if self.kind == "classification" else np.isfinite(self.y)


# --- public entry point -----------------------------------------------------------------
def fit(
    cache_root: Path | str,
    dataset: str | None,
    fusion: str | HeadFactory,
    modalities: list[str] | str = "all",
    seeds: int | list[int] = 3,
    name: str | None = None,
    runs_dir: Path | str = Path("runs"),
    split: Literal["official", "kfold"] = "official",
    folds: int = 5,
    group_by: str | None = None,
    epochs: int = 40,
    batch_size: int | None = None,
    lr: float = 2e-3,
    patience: int = 5,
    modality_dropout: float = 0.1,
    class_weight: bool = True,
    device: str = "cpu",
    head_options: dict | None = None,
    target: str = "label",
    preset: str = "offline",
    key: str | None = None,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.15,
    threads: int | None = None,
    aux_weight: float = 0.0,
) -> RunResult:
    """Train `fusion` on `modalities` of a cached feature set over `seeds`; write runs/<name>/.

    `fusion` is a registered head name (fusion.heads.HEADS) or a factory
    `(spec, n_out, **options) -> nn.Module`. `group_by=None` uses the set's grouping;
    "none" asks for row-level (ungrouped) validation and folds. `aux_weight` > 0 adds the
    loss of the head's `aux_logits` branches (late / hybrid heads). `batch_size=None` picks
    128 rows, or more on large training sets so that an epoch is at most MAX_STEPS optimiser
    steps; `lr` is then scaled by sqrt(batch / 128) (see `auto_batch`). A head's optional
    `seq_inputs` and `prepare` hooks (fusion/heads/base.py) decide which sequences are loaded
    and what is precomputed once per fold. Raises DataError before training when the data
    cannot support the fit.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(threads or default_threads())
    fs = open_set(cache_root, dataset, preset=preset, key=key)
    mods = fs.resolve(modalities)
    task = _task(fs, target)
    usable = np.flatnonzero(fs.complete & task.labelled())
    warnings = fs.check(mods, usable)
    groups = _groups(fs, group_by)
    plan = _plan(fs, task, usable, groups, split, folds, val_fraction)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must be a positive count or a non-empty list")
    fusion_name = fusion if isinstance(fusion, str) else getattr(fusion, "__name__", "custom")
    name = name or f"{fs.attrs.get('dataset', 'set')}-{fusion_name}-{'+'.join(mods)}"
    run_dir = Path(runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)

    rows = np.unique(np.concatenate([np.concatenate([f.train, f.val, f.test]) for f in plan]))
    spec = fs.spec(mods)
    # The first seed's head, built first: it says what to load (its seq_inputs) and prepares
    # the data once per fold; then it is the head trained for the first (fold, seed).
    torch.manual_seed(seed_list[0])
    probe = _make_head(fusion, spec, task.n_out, head_options or {})
    fresh: tuple[nn.Module, Tensor] | None = (probe, torch.get_rng_state())
    raw = load_inputs(fs, mods, rows, getattr(probe, "seq_inputs", None))
    n_train = int(round(np.mean([len(f.train) for f in plan])))
    bs, lr_used = (batch_size, lr) if batch_size else auto_batch(n_train, lr)
    hp = _Hyper(epochs, bs, lr_used, weight_decay, patience, modality_dropout, class_weight,
                aux_weight)
    trainer = _Trainer(fusion, spec, task, hp, torch.device(device), head_options or {})
    trainer.labels = task.y[rows]
    raw_t = to_tensors(raw)
    # parameter-free work (window averages) done once on the raw features, for every fold and
    # seed; each fold then scales the prepared tensors with its own training statistics
    prepared = probe.prepare(raw_t) if hasattr(probe, "prepare") else raw_t
    outs: dict[int, list[dict]] = {s: [] for s in seed_list}
    logs: list[dict] = []
    first_state = None
    for fold in plan:  # fold-major: each fold is standardised once, for every seed
        pos = _positions(rows, fold)
        stats = fit_stats(raw_t, pos.train)
        data = apply_stats(prepared, stats, inplace=len(plan) == 1)
        data = {m: {k: v.to(trainer.device) for k, v in d.items()} for m, d in data.items()}
        for seed in seed_list:
            out = trainer.run(data, pos, task, seed, fold.index, logs, fresh)
            fresh = None
            state = out.pop("state")
            if first_state is None:
                first_state = (state, stats)
            out["fold"] = fold
            outs[seed].append(out)
    per_seed = [_seed_metrics(s, outs[s], task) for s in seed_list]
    metrics = _summarise(per_seed, task, fs, mods, fusion_name, plan, split, warnings)
    metrics["elapsed_s"] = round(time.perf_counter() - t0, 3)
    metrics["run_dir"] = str(run_dir)
    _write_outputs(run_dir, metrics, logs, first_state, task, fs, mods, fusion_name, locals_cfg={
        "dataset": dataset, "fusion": fusion_name, "modalities": mods, "seeds": seed_list,
        "split": split, "folds": folds, "group_by": group_by, "epochs": epochs,
        "batch_size": bs, "lr": lr_used, "batch_size_asked": batch_size or "auto", "lr_base": lr,
        "patience": patience,
        "modality_dropout": modality_dropout, "class_weight": class_weight, "device": device,
        "target": target, "preset": preset, "weight_decay": weight_decay,
        "val_fraction": val_fraction, "aux_weight": aux_weight, "head_options": head_options or {},
        "feature_set": fs.key, "cache_root": str(cache_root)})
    log.info("fit %s: %s", name, {k: metrics.get(k) for k in _scalar_keys(task)})
    return RunResult(name=name, run_dir=run_dir, metrics=metrics, log=logs)


MAX_STEPS = 20  # auto batch size: at most this many optimiser steps per epoch
BASE_BATCH = 128


def auto_batch(n_train: int, lr: float, max_steps: int = MAX_STEPS) -> tuple[int, float]:
    """(batch size, learning rate) for `n_train` training rows when none is given.

    128 rows (at `lr`) while an epoch takes at most `max_steps` steps; beyond, the batch grows
    (a multiple of 32) to keep an epoch at `max_steps` steps, and the learning rate grows by
    sqrt(batch / 128), the usual rule for Adam. Fewer, larger steps cut the per-step overhead
    that dominates small heads on a CPU.
    """
    need = -(-n_train // max_steps)
    if need <= BASE_BATCH:
        return BASE_BATCH, lr
    bs = 32 * -(-need // 32)
    return bs, lr * math.sqrt(bs / BASE_BATCH)


def default_threads() -> int:
    """Intra-op threads of a single fit: the cores, at most 4. The heads are small, so more
    threads buy little (2 threads: 1.25-1.3x on the attention heads, nothing on the cheap
    ones); `ablate` gives each of its worker processes its share of the cores instead, because
    oversubscribed cores make spinning BLAS threads much slower."""
    return max(1, min(4, os.cpu_count() or 1))


def load_inputs(fs: FeatureSet, mods: list[str], rows: np.ndarray,
                seq_inputs: tuple[str, ...] | None) -> dict:
    """fs.load(mods, rows), reading the sequences only of the modalities in `seq_inputs`
    (`None`: a head that does not say what it reads gets everything). Sequences stay in their
    stored dtype (float16: half the memory); statistics, window averages and scaling read them
    in float32 chunks."""
    return fs.load(mods, rows, sequences=seq_inputs, seq_as_stored=True)


# --- task, groups, splits ---------------------------------------------------------------
def _task(fs: FeatureSet, target: str) -> Task:
    if target == "label":
        if not fs.classes:
            raise DataError(f"feature set {fs.name} has no classes; pick a regression target "
                            f"from {fs.target_names}")
        return Task("label", "classification", fs.label, fs.classes)
    if target not in fs.targets:
        raise DataError(f"feature set {fs.name} has no target {target!r} "
                        f"(targets: {['label', *fs.target_names]})")
    return Task(target, "regression", fs.targets[target], [target])


def _groups(fs: FeatureSet, group_by: str | None) -> np.ndarray:
    """Group id per row for grouped splits; each row its own group when ungrouped.

    Rows with an empty group string stand alone (they cannot leak across a split).
    """
    own = np.array([f"\x00row{i}" for i in range(fs.n)])
    if group_by is not None and group_by.lower() in UNGROUPED:
        return own
    if group_by is not None and group_by != fs.group_by:
        raise DataError(f"feature set {fs.name} is grouped by {fs.group_by!r} only; "
                        f"group_by={group_by!r} is not stored (use None or 'none')")
    if not fs.group_by:
        return own
    g = fs.group
    return np.where(g == "", own, g)


def _carve_val(train: np.ndarray, groups: np.ndarray, frac: float, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Move whole groups (≈frac of the rows) from train to validation, never splitting one."""
    uniq = np.unique(groups[train])
    if len(uniq) < 2:
        raise DataError("cannot carve a grouped validation split: the training rows hold "
                        f"{len(uniq)} group(s); pass group_by='none' for a row-level split")
    rng = np.random.default_rng(seed)
    order = rng.permutation(uniq)
    counts = {g: c for g, c in zip(*np.unique(groups[train], return_counts=True), strict=True)}
    want, got, chosen = max(1, round(frac * len(train))), 0, []
    for g in order[:-1]:  # always leave at least one group to train on
        if got >= want:
            break
        chosen.append(g)
        got += counts[g]
    is_val = np.isin(groups[train], chosen)
    return train[~is_val], train[is_val]


def _plan(fs: FeatureSet, task: Task, usable: np.ndarray, groups: np.ndarray, split: str,
          folds: int, val_fraction: float) -> list[Fold]:
    """The train/val/test partitions: one for the official split, `folds` for k-fold."""
    if split == "official":
        sp = fs.split[usable]
        train, test = usable[sp == TRAIN], usable[sp == TEST]
        val = usable[np.isin(sp, VALID_NAMES)]
        for nm, rows in (("train", train), ("test", test)):
            if len(rows) == 0:
                have = {str(k): int(c) for k, c in zip(*np.unique(sp, return_counts=True),
                                                       strict=True)}
                raise DataError(f"feature set {fs.name}: the {nm!r} split is empty among "
                                f"completed, labelled rows (splits: {have}); try split='kfold'")
        if len(val) == 0:
            train, val = _carve_val(train, groups, val_fraction)
        plan = [Fold(train, val, test)]
    elif split == "kfold":
        plan = _kfold(fs, task, usable, groups, folds, val_fraction)
    else:
        raise ValueError(f"split must be 'official' or 'kfold', not {split!r}")
    for f in plan:
        _check_fold(fs, task, f)
    return plan


def _kfold(fs: FeatureSet, task: Task, usable: np.ndarray, groups: np.ndarray, folds: int,
           val_fraction: float) -> list[Fold]:
    """Grouped (stratified for classes) k-fold: every test fold is a set of whole groups."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    g = groups[usable]
    n_groups = len(np.unique(g))
    if folds < 2 or n_groups < folds:
        raise DataError(f"feature set {fs.name}: {folds}-fold needs at least {max(folds, 2)} "
                        f"groups, there are {n_groups}")
    if task.kind == "classification":
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
        parts = splitter.split(usable, task.y[usable], g)
    else:
        parts = GroupKFold(n_splits=folds).split(usable, groups=g)
    plan = []
    for i, (tr, te) in enumerate(parts):
        train, val = _carve_val(usable[tr], groups, val_fraction, seed=i)
        plan.append(Fold(train, val, usable[te], index=i))
    return plan


def _check_fold(fs: FeatureSet, task: Task, f: Fold) -> None:
    where = f"feature set {fs.name}, fold {f.index}"
    for nm, rows in (("train", f.train), ("validation", f.val), ("test", f.test)):
        if len(rows) == 0:
            raise DataError(f"{where}: the {nm} split is empty")
    if task.kind == "classification":
        present = np.unique(task.y[f.train])
        if len(present) < 2:
            only = task.classes[int(present[0])] if len(present) else "none"
            raise DataError(f"{where}: the training rows hold a single class ({only!r}); "
                            "nothing to learn")
    elif float(np.std(task.y[f.train])) == 0.0:
        raise DataError(f"{where}: target {task.target!r} is constant on the training rows")


def _positions(rows: np.ndarray, f: Fold) -> Fold:
    """A fold re-indexed from feature-set rows to positions in the loaded arrays."""
    return Fold(np.searchsorted(rows, f.train), np.searchsorted(rows, f.val),
                np.searchsorted(rows, f.test), f.index)


# --- features ---------------------------------------------------------------------------
def _valid_mask(d: dict[str, Tensor], seq_key: str = "seq") -> Tensor:
    """[R, T] real time steps (present and before len) of a sequence, or of its prepared
    windows (`seq@w`, whose valid windows are counted by `len@w`)."""
    len_key = "len" + seq_key[3:]
    t = torch.arange(d[seq_key].shape[1], device=d[seq_key].device)
    return d["present"][:, None] & (t[None, :] < d[len_key][:, None])


def _moments(x: Tensor, w: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Per-dim mean/std of x [R, ..., D] (any float dtype) weighted by the 0/1 mask w [R, ...].

    One sweep over row chunks: sums of (x - shift) and its squares as matrix-vector products,
    in float64, with `shift` the mean of the first weighted rows — close to the true mean, so
    eGeMAPS-scale inputs (large means, small spreads) lose nothing to cancellation.
    """
    d = x.shape[-1]
    n = float(w.sum())
    if n == 0:
        return torch.zeros(d), torch.ones(d)
    first = int(torch.nonzero(w.reshape(len(w), -1).any(dim=1))[0])
    head = x[first:first + chunk].reshape(-1, d).float()
    hw = w[first:first + chunk].reshape(-1).float()
    shift = (hw @ head) / hw.sum().clamp(min=1)
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        wi = w[i:i + chunk].reshape(1, -1).float()
        c = x[i:i + chunk].reshape(-1, d).float() - shift
        s1 += (wi @ c).double()[0]
        s2 += (wi @ c.mul_(c)).double()[0]
    m1 = s1 / n
    mean = (shift.double() + m1).float()
    std = torch.sqrt((s2 / n - m1 * m1).clamp(min=0)).float()
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)  # constant dims: centred


SEQ_STAT_ROWS = 2048  # sequence statistics come from at most this many training rows


def fit_stats(data: Batch, train_pos: np.ndarray) -> dict[str, Tensor]:
    """Per-feature mean/std of every modality's pooled vectors and real time steps, from the
    present training rows only (the test fold and zero-filled absent rows shape nothing).

    Sequences of large sets use a fixed random subset of SEQ_STAT_ROWS training rows (still
    ~10^5 steps per feature, so the estimates are within a percent or so of the full data's)
    instead of every step of every row, which is most of a fit's set-up time on 10k clips.
    """
    train_pos = np.asarray(train_pos, dtype=np.int64)
    n = next(iter(data.values()))["present"].shape[0]
    is_train = torch.zeros(n, dtype=torch.bool)
    is_train[torch.from_numpy(train_pos)] = True
    seq_rows = torch.from_numpy(np.sort(np.random.default_rng(0).choice(
        train_pos, SEQ_STAT_ROWS, replace=False))) if len(train_pos) > SEQ_STAT_ROWS else None
    stats: dict[str, Tensor] = {}
    for m, d in data.items():
        parts = [("pooled", d["present"], d["pooled"])]
        if "seq" in d:
            parts.append(("seq", _valid_mask(d), d["seq"]))
        for part, valid, x in parts:
            w = valid & is_train.view(-1, *([1] * (valid.dim() - 1)))
            if part == "seq" and seq_rows is not None:
                x, w = x[seq_rows], w[seq_rows]
            stats[f"{m}.{part}.mean"], stats[f"{m}.{part}.std"] = _moments(x, w)
    return stats


def apply_stats(data: Batch, stats: dict[str, Tensor], inplace: bool = False) -> Batch:
    """Features scaled by `stats` (see fit_stats); absent rows and padding exactly zero.

    Besides "pooled" and "seq", prepared window averages (`seq@w` keys, see a head's
    `prepare`) are scaled with their sequence's statistics: an average of steps whose weights
    sum to 1 is affine-equivariant, so scaling the averages equals averaging scaled steps.
    """
    out: Batch = {}
    for m, d in data.items():
        o = dict(d)
        for key in d:
            part = "pooled" if key == "pooled" else "seq" if key.split("@")[0] == "seq" else None
            mean = stats.get(f"{m}.{part}.mean")
            if part is None or mean is None:
                continue
            valid = d["present"] if part == "pooled" else _valid_mask(d, key)
            x = d[key].to(torch.float32, copy=not inplace)  # float16 sequences: a new tensor
            o[key] = x.sub_(mean).mul_(1.0 / stats[f"{m}.{part}.std"]).mul_(valid.unsqueeze(-1))
        out[m] = o
    return out


def to_tensors(data: dict, device: torch.device | str = "cpu") -> Batch:
    """numpy batch dict -> torch (shares memory on CPU)."""
    return {m: {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in d.items()}
            for m, d in data.items()}


class Rows(Mapping):
    """One modality's tensors at a set of rows, each selected on first access.

    A head that reads only `pooled` never pays for copying the [B, T, D] sequences of the
    batch; `present` can be replaced (modality dropout) without touching the rest.
    """

    def __init__(self, src: dict[str, Tensor], idx: Tensor, override: dict | None = None):
        self._src, self._idx, self._got = src, idx, dict(override or {})

    def __getitem__(self, k: str) -> Tensor:
        if k not in self._got:
            self._got[k] = self._src[k].index_select(0, self._idx)
        return self._got[k]

    def __iter__(self):
        return iter(self._src)

    def __len__(self) -> int:
        return len(self._src)

    def replace(self, **kv: Tensor) -> Rows:
        return Rows(self._src, self._idx, {**self._got, **kv})


def take(data: Batch, idx: Tensor) -> dict[str, Rows]:
    """Rows idx of every modality (the mini-batch), selected lazily: no copies of the rest."""
    return {m: Rows(d, idx) for m, d in data.items()}


def drop_modalities(batch: Batch, names: list[str], p: float, gen: torch.Generator) -> Batch:
    """Modality dropout: mark each input modality absent on a random p of the rows.

    A row never loses all its present modalities (that would be a row with no input); the
    conditioning vector is never dropped.
    """
    if p <= 0 or len(names) < 2:
        return batch
    before = torch.stack([batch[m]["present"] for m in names])  # [M, B]
    drop = (torch.rand(before.shape, generator=gen) < p).to(before.device)
    after = before & ~drop
    keep_row = after.any(0) | ~before.any(0)
    after = torch.where(keep_row[None, :], after, before)
    out = dict(batch)
    for i, m in enumerate(names):
        x = batch[m]
        out[m] = x.replace(present=after[i]) if isinstance(x, Rows) else {**x, "present": after[i]}
    return out


# --- training ---------------------------------------------------------------------------
@dataclass
class _Hyper:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    modality_dropout: float
    class_weight: bool
    aux_weight: float = 0.0


def _make_head(fusion: str | HeadFactory, spec, n_out: int, options: dict) -> nn.Module:
    if callable(fusion):
        return fusion(spec, n_out, **options)
    try:
        from fusion.heads import build_head
    except ImportError as e:
        raise RuntimeError(f"fusion head {fusion!r}: fusion.heads has no build_head yet") from e
    return build_head(fusion, spec, n_out, **options)


class _Trainer:
    """Trains one head per (seed, fold) on tensors already in memory."""

    def __init__(self, fusion, spec, task: Task, hp: _Hyper, device: torch.device,
                 options: dict):
        self.fusion, self.spec, self.task, self.hp = fusion, spec, task, hp
        self.device, self.options = device, options
        self.names = list(spec.names)
        self.labels: np.ndarray = np.empty(0)  # task.y at the loaded rows, set by fit

    def _loss_fn(self, y_train: np.ndarray) -> nn.Module:
        if self.task.kind == "regression":
            return nn.L1Loss()
        if not self.hp.class_weight:
            return nn.CrossEntropyLoss()
        k = self.task.n_out
        counts = np.bincount(y_train, minlength=k).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
        return nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32,
                                                       device=self.device))

    def _y(self, rows_y: np.ndarray) -> Tensor:
        if self.task.kind == "classification":
            return torch.from_numpy(rows_y.astype(np.int64)).to(self.device)
        return torch.from_numpy(rows_y.astype(np.float32)).to(self.device)

    def _out(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1) if self.task.kind == "regression" else logits

    @torch.no_grad()
    def predict(self, model: nn.Module, data: Batch, pos: np.ndarray, chunk: int = 2048
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs for rows pos (eval mode, in chunks), and any `aux_logits` the head exposes."""
        model.eval()
        outs, aux = [], {}
        for i in range(0, len(pos), chunk):
            idx = torch.from_numpy(pos[i:i + chunk]).to(self.device)
            outs.append(self._out(model(take(data, idx))))
            present = getattr(model, "aux_present", None) or {}
            for k, v in (getattr(model, "aux_logits", None) or {}).items():
                p = present.get(k, torch.ones(len(v), dtype=torch.bool, device=v.device))
                aux.setdefault(k, []).append((self._out(v.detach()), p.bool()))
        return torch.cat(outs), {k: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v]))
                                 for k, v in aux.items()}

    def _aux_loss(self, model: nn.Module, loss_fn: nn.Module, y: Tensor) -> Tensor:
        """Mean loss of the head's branch logits (`aux_logits`) on the rows they saw.

        Trains each unimodal branch of a late / hybrid head to predict on its own, which
        keeps a branch useful when the others are absent.
        """
        logits = getattr(model, "aux_logits", None) or {}
        present = getattr(model, "aux_present", None) or {}
        terms = []
        for k, v in logits.items():
            p = present.get(k, torch.ones(len(v), dtype=torch.bool, device=v.device)).bool()
            if p.any():
                terms.append(loss_fn(self._out(v)[p], y[p]))
        return torch.stack(terms).mean() if terms else torch.zeros((), device=y.device)

    def _val_score(self, pred: Tensor, y: np.ndarray) -> float:
        """Early-stopping score, higher is better: macro F1, or −MAE for regression."""
        if self.task.kind == "classification":
            p = pred.argmax(-1).cpu().numpy()
            return M.classification_metrics(y, p, self.task.n_out)["macro_f1"]
        return -float(np.mean(np.abs(pred.cpu().numpy() - y)))

    def run(self, data: Batch, f: Fold, task: Task, seed: int, fold: int, logs: list[dict],
            fresh: tuple[nn.Module, Tensor] | None = None) -> dict:
        """Train with early stopping, restore the best state, call after_fit, predict test.

        `fresh` is an untrained head built just after torch.manual_seed(seed), with the RNG
        state that followed; training it is the same as building one here. Gradients are
        switched on explicitly: a library that turned them off globally in this process (an
        encoder loaded by `mmemo predict`, say) must not break training.
        """
        with torch.enable_grad():
            return self._run(data, f, task, seed, fold, logs, fresh)

    def _run(self, data: Batch, f: Fold, task: Task, seed: int, fold: int, logs: list[dict],
             fresh: tuple[nn.Module, Tensor] | None = None) -> dict:
        if fresh is None:
            torch.manual_seed(seed)
            model = _make_head(self.fusion, self.spec, task.n_out, self.options)
        else:
            model, rng = fresh
            torch.set_rng_state(rng)
        model = model.to(self.device)
        gen = torch.Generator().manual_seed(seed)
        y_tr, y_va = self.labels[f.train], self.labels[f.val]
        # fused: one kernel for all parameters instead of ~10 small ops per tensor per step
        # (about 5 ms of a 40 ms step of an attention head on a CPU core)
        opt = torch.optim.AdamW(model.parameters(), lr=self.hp.lr,
                                weight_decay=self.hp.weight_decay,
                                fused=self.device.type in ("cpu", "cuda"))
        loss_fn = self._loss_fn(y_tr)
        yt, yv = self._y(y_tr), self._y(y_va)
        best_score, best_loss = -math.inf, math.inf
        best_state, best_epoch, bad = _state(model), 0, 0
        n, bs = len(f.train), self.hp.batch_size
        train_pos = torch.from_numpy(f.train).to(self.device)
        for epoch in range(1, self.hp.epochs + 1):
            t_epoch = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=gen).to(self.device)
            total = 0.0
            for i in range(0, n, bs):
                sel = perm[i:i + bs]
                batch = drop_modalities(take(data, train_pos[sel]), self.names,
                                        self.hp.modality_dropout, gen)
                loss = loss_fn(self._out(model(batch)), yt[sel])
                if self.hp.aux_weight > 0:
                    loss = loss + self.hp.aux_weight * self._aux_loss(model, loss_fn, yt[sel])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(sel)
            pv, _ = self.predict(model, data, f.val)
            val_loss = float(loss_fn(pv, yv))
            score = self._val_score(pv, y_va)
            logs.append({"seed": seed, "fold": fold, "epoch": epoch,
                         "train_loss": round(total / n, 6), "val_loss": round(val_loss, 6),
                         "val_metric": round(score if task.kind == "classification" else -score, 6),
                         "epoch_s": round(time.perf_counter() - t_epoch, 4)})
            if score > best_score + 1e-4 or (abs(score - best_score) <= 1e-4
                                             and val_loss < best_loss - loss_min_delta(best_loss)):
                best_score, best_loss = score, val_loss
                best_state, best_epoch, bad = _state(model), epoch, 0
            else:
                bad += 1
                if bad >= self.hp.patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
        if hasattr(model, "after_fit"):  # e.g. a stacking meta-learner fit on validation
            model.after_fit(take(data, torch.from_numpy(f.val).to(self.device)), yv)
        pt, aux = self.predict(model, data, f.test)
        return {"pred": pt.cpu().numpy(),
                "aux": {k: (v.cpu().numpy(), p.cpu().numpy()) for k, (v, p) in aux.items()},
                "best_epoch": best_epoch, "epochs_run": epoch,
                "state": _state(model)}  # after after_fit: what was evaluated is what is saved


def loss_min_delta(best_loss: float) -> float:
    """How much lower a tied epoch's validation loss must be to count as progress: 1e-3 or 1%.

    Once the metric saturates (e.g. F1 0.9995 on easy data) the loss keeps creeping down by
    noise-sized steps; counting those reset patience for tens of epochs that change nothing.
    """
    return max(1e-3, 1e-2 * best_loss) if math.isfinite(best_loss) else 0.0


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- metrics over folds and seeds ---------------------------------------------------------
def _scalar_keys(task: Task) -> tuple[str, ...]:
    if task.kind == "classification":
        return M.SCALAR_KEYS_CLASSIFICATION
    return M.SCALAR_KEYS_REGRESSION


def baseline_key(task_kind: str) -> str:
    """Name of the trivial baseline in metrics.json for a task kind."""
    return "majority_baseline" if task_kind == "classification" else "mean_baseline"


def _score(task: Task, y: np.ndarray, pred: np.ndarray) -> dict:
    if task.kind == "classification":
        return M.classification_metrics(y, pred.argmax(-1), task.n_out, task.classes)
    return M.regression_metrics(y, pred)


def _aux_score(task: Task, y: np.ndarray, outs: list[dict], k: str) -> dict:
    """A head's per-branch (e.g. unimodal) predictions scored on the rows where it had input."""
    pred = np.concatenate([o["aux"][k][0] for o in outs])
    present = np.concatenate([o["aux"][k][1] for o in outs])
    keys = ("accuracy", "macro_f1", "uar") if task.kind == "classification" else ("mae", "corr")
    scored = _score(task, y[present], pred[present]) if present.any() else {}
    return {s: float(scored.get(s, 0.0)) for s in keys} | {"n": int(present.sum())}


def _seed_metrics(seed: int, outs: list[dict], task: Task) -> dict:
    """One seed's metrics on the test rows pooled over folds (each row predicted once)."""
    y = np.concatenate([task.y[o["fold"].test] for o in outs])
    pred = np.concatenate([o["pred"] for o in outs])
    m = _score(task, y, pred)
    if task.kind == "classification":
        base = np.concatenate([np.full(len(o["fold"].test),
                                       M.majority_class(task.y[o["fold"].train], task.n_out))
                               for o in outs])
        b = M.classification_metrics(y, base, task.n_out)
        m["majority_baseline"] = {k: b[k] for k in ("accuracy", "macro_f1", "uar")}
    else:
        base = np.concatenate([np.full(len(o["fold"].test), float(np.mean(task.y[o["fold"].train])))
                               for o in outs])
        b = M.regression_metrics(y, base)
        m["mean_baseline"] = {k: b[k] for k in ("mae", "corr", "acc2", "acc7", "f1")}
    aux_keys = outs[0]["aux"].keys() if all(o["aux"] for o in outs) else []
    if aux_keys:
        m["aux"] = {k: _aux_score(task, y, outs, k) for k in aux_keys}
    if len(outs) > 1:
        m["folds"] = [{k: v for k, v in _score(task, task.y[o["fold"].test], o["pred"]).items()
                       if k in _scalar_keys(task)} for o in outs]
    m["seed"] = seed
    m["best_epoch"] = [o["best_epoch"] for o in outs]
    m["epochs_run"] = [o["epochs_run"] for o in outs]
    return m


def _summarise(per_seed: list[dict], task: Task, fs: FeatureSet, mods: list[str], fusion: str,
               plan: list[Fold], split: str, warnings: list[str]) -> dict:
    """metrics.json: seed means at top level, mean/std, pooled confusion, each seed's metrics."""
    keys = _scalar_keys(task)
    agg = M.aggregate(per_seed, keys)
    out: dict[str, Any] = {
        "feature_set": fs.key, "dataset": fs.attrs.get("dataset"), "preset": fs.attrs.get("preset"),
        "fusion": fusion, "modalities": mods, "target": task.target, "task": task.kind,
        "split": split, "folds": len(plan),
        **agg["mean"], "mean": agg["mean"], "std": agg["std"],
        baseline_key(task.kind): per_seed[0][baseline_key(task.kind)],
        "n_train": int(round(np.mean([len(f.train) for f in plan]))),
        "n_val": int(round(np.mean([len(f.val) for f in plan]))),
        "n_test": int(sum(len(f.test) for f in plan)),
        "n_seeds": len(per_seed),
        "warnings": list(warnings),
    }
    if task.kind == "classification":
        cm = np.sum([np.asarray(s["confusion"]) for s in per_seed], axis=0)
        pooled = M.metrics_from_confusion(cm, task.classes)
        out |= {"classes": task.classes, "per_class": pooled["per_class"],
                "confusion": pooled["confusion"]}
    if "aux" in per_seed[0]:
        out["aux"] = {k: M.aggregate([s["aux"][k] for s in per_seed])["mean"]
                      | {"n": per_seed[0]["aux"][k]["n"]} for k in per_seed[0]["aux"]}
    out["seeds"] = per_seed
    return out


# --- outputs --------------------------------------------------------------------------------
def _toml_safe(v: Any) -> Any:
    """tomli_w has no None and no Path: drop the former, stringify the latter."""
    if isinstance(v, dict):
        return {str(k): _toml_safe(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_toml_safe(x) for x in v if x is not None]
    if isinstance(v, Path):
        return str(v)
    return v


def _write_outputs(run_dir: Path, metrics: dict, logs: list[dict], first: tuple | None,
                   task: Task, fs: FeatureSet, mods: list[str], fusion: str, locals_cfg: dict
                   ) -> None:
    import tomli_w
    from safetensors.torch import save_file

    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (run_dir / "config.toml").write_text(tomli_w.dumps(_toml_safe(locals_cfg)))
    with (run_dir / "log.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["seed", "fold", "epoch", "train_loss", "val_loss", "val_metric",
                                "epoch_s"])
        w.writeheader()
        w.writerows(logs)
    if first is not None:
        state, stats = first
        meta = {"fusion": fusion, "modalities": json.dumps(mods), "feature_set": fs.key,
                "classes": json.dumps(task.classes), "target": task.target,
                "seed": str(metrics["seeds"][0]["seed"])}
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                  str(run_dir / "model.safetensors"), metadata=meta)
        save_file({k: v.detach().cpu().contiguous() for k, v in stats.items()},
                  str(run_dir / "norm.safetensors"), metadata=meta)
    if task.kind == "classification":
        plot_confusion(np.asarray(metrics["confusion"]), task.classes, run_dir / "confusion.png",
                       title=f"{fusion} · {'+'.join(mods)}")


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix with counts, pooled over seeds (and folds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=100)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
