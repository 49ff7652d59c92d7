"""Evaluation protocols: how the literature splits, labels and scores each benchmark.

A protocol is data (the `PROTOCOLS` table below), not branches in the trainer: it fixes the
split, the label set, the target, the metric papers report (the *headline*), the metric early
stopping and model selection use (the same one), and whether the loss weights classes.
`fit(..., protocol="meld-official")` / `mmemo fit --protocol meld-official` apply it on top of
the defaults; `paper_line` prints a run's result the way papers print it.

Fit-time label sets (`labels=`) live here too: `iemocap4` / `iemocap6` (fusion/labels.py reads
labelsets.toml; rows whose raw label is outside the set are left out and counted) and
`plutchik` (every dataset's labels mapped onto Plutchik's wheel, soft targets for dyads).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fusion.config import FitConfig
    from fusion.splits import Task

# metrics where lower is better; every other metric is higher-is-better
LOWER_IS_BETTER = ("mae",)
# how papers name the metric keys of metrics.json
PAPER_NAMES = {"accuracy": "WA", "uar": "UA", "weighted_f1": "weighted F1", "macro_f1": "macro F1",
               "mae": "MAE", "corr": "Corr", "acc2": "Acc-2", "acc2_nonzero": "Acc-2 (non-0)",
               "f1": "F1", "f1_nonzero": "F1 (non-0)", "acc7": "Acc-7", "ccc": "CCC"}


@dataclass(frozen=True)
class Protocol:
    """One benchmark protocol (see the table below and README "Protocols")."""

    name: str
    dataset: str  # the recipe whose feature sets it applies to
    split: str  # "official" | "kfold"
    folds: int
    labels: str | None  # fit-time label set (None: the set's own classes)
    target: str  # "label" or a regression target
    headline: str  # the metric papers report first; early stopping selects on it too
    reported: tuple[str, ...]  # the metrics papers report, in their order
    class_weight: bool
    note: str  # where the protocol comes from / what it fixes

    def config(self, cfg: FitConfig) -> FitConfig:
        """`cfg` with this protocol's split, folds, labels, target, selection and weighting
        (a protocol without a label set keeps `cfg.labels`, e.g. plutchik for a cross-dataset
        test under meld-official)."""
        return replace(cfg, split=self.split, folds=self.folds, labels=self.labels or cfg.labels,
                       target=self.target, select_metric=self.headline,
                       class_weight=self.class_weight, protocol=self.name)

    def overrides(self, cfg: FitConfig) -> list[str]:
        """One line per setting the user asked for (a value other than FitConfig's default)
        that this protocol replaces, e.g. `--split kfold` under meld-official: a fit warns
        with them instead of overriding silently."""
        from fusion.config import FitConfig

        fixed = self.config(cfg)
        default = FitConfig()
        out = []
        for key in ("split", "folds", "labels", "target", "select_metric", "class_weight"):
            asked, used = getattr(cfg, key), getattr(fixed, key)
            if asked != getattr(default, key) and asked != used:
                out.append(f"protocol {self.name} sets {key} = {used!r}; the asked {key} = "
                           f"{asked!r} is not used")
        return out


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("meld-official", "meld", "official", 1, None, "label", "weighted_f1",
             ("weighted_f1", "accuracy"), False,
             "official train / dev / test; 7 emotions; weighted F1 (MELD, Poria et al. 2019); "
             "no class weights: weighted F1 rewards the frequent classes the weights would "
             "trade away"),
    Protocol("iemocap-loso", "iemocap", "kfold", 5, "iemocap4", "label", "uar",
             ("accuracy", "uar"), True,
             "leave-one-session-out over the 5 sessions (the set is grouped by session); "
             "4 classes ang / hap+exc / neu / sad (5,531 turns); WA (accuracy) and UA (mean "
             "recall) pooled over the 5 test sessions; class-weighted, selected on UA"),
    Protocol("iemocap6", "iemocap", "kfold", 5, "iemocap6", "label", "accuracy",
             ("accuracy", "weighted_f1"), False,
             "leave-one-session-out; 6 classes ang / hap / exc / sad / fru / neu; accuracy "
             "and weighted F1 (the conversational ERC convention)"),
    Protocol("mosei-standard", "mosei", "official", 1, None, "sentiment", "mae",
             ("mae", "corr", "acc2", "acc2_nonzero", "f1", "f1_nonzero", "acc7"), False,
             "the CMU-MultimodalSDK standard train / valid / test folds; sentiment regression "
             "in [-3, 3]; MAE, Corr, Acc-2 and F1 with zeros (negative vs non-negative) and "
             "without (negative vs positive), Acc-7; L1 loss, selected on MAE"),
    Protocol("mosi-standard", "mosi", "official", 1, None, "sentiment", "mae",
             ("mae", "corr", "acc2", "acc2_nonzero", "f1", "f1_nonzero", "acc7"), False,
             "as mosei-standard, on CMU-MOSI's standard folds"),
    Protocol("ravdess-6fold", "ravdess", "kfold", 6, None, "label", "accuracy",
             ("accuracy", "macro_f1"), False,
             "6 actor folds of 4 actors (prepare ravdess --opt folds=6; the set is grouped by "
             "fold); 8 emotions, balanced by design, accuracy over all folds"),
    Protocol("ravdess-5fold", "ravdess", "kfold", 5, None, "label", "accuracy",
             ("accuracy", "macro_f1"), False,
             "5 actor folds (5/5/5/5/4 actors; prepare ravdess --opt folds=5); accuracy"),
    Protocol("cremad-actor", "cremad", "kfold", 5, None, "label", "accuracy",
             ("accuracy", "uar"), True,
             "5 actor-disjoint folds (actor-grouped; prepare cremad --opt folds=5 fixes them); "
             "6 emotions; accuracy and UA; class-weighted (neutral is over-represented)"),
)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r} (known: {', '.join(sorted(PROTOCOLS))})")
    return PROTOCOLS[name]


def better(metric: str, a: float, b: float) -> bool:
    """Whether score `a` is strictly better than `b` on `metric`."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def selection_score(metric: str, value: float) -> float:
    """A higher-is-better score for early stopping (−MAE for MAE)."""
    return -value if metric in LOWER_IS_BETTER else value


def default_headline(task_kind: str) -> str:
    return "macro_f1" if task_kind == "classification" else "mae"


def paper_line(m: dict, protocol: Protocol | None = None) -> str:
    """One result as papers print it: percentages for rates, 3 decimals for MAE / Corr,
    with the linear-probe and trivial baselines in brackets.

    e.g. ``meld-official · text · weighted F1 55.6 | WA 58.1   (probe 54.0 | 57.2; majority …;
    n test 2610)``
    """
    keys = protocol.reported if protocol else (m.get("headline"),)
    if not protocol and m.get("task") == "regression" and m.get("target") != "sentiment":
        # valence / arousal: the concordance papers report beside the error
        keys = tuple(dict.fromkeys((*keys, "ccc")))
    base = m.get("majority_baseline") or m.get("mean_baseline") or {}
    probe = m.get("linear_probe") or {}

    def show(d: dict, k: str) -> str:
        v = d.get(k)
        if v is None:
            return "—"
        return f"{v:.3f}" if k in ("mae", "corr", "ccc") else f"{100 * v:.1f}"

    head = " | ".join(f"{PAPER_NAMES.get(k, k)} {show(m, k)}" for k in keys)
    tail = [f"probe {' | '.join(show(probe, k) for k in keys)}"] if probe else []
    if base:
        tail.append(f"{'majority' if 'majority_baseline' in m else 'mean'} "
                    f"{' | '.join(show(base, k) for k in keys)}")
    if m.get("n_test") is not None:
        tail.append(f"n test {m['n_test']}")
    name = protocol.name if protocol else (m.get("protocol") or m.get("dataset") or "")
    if m.get("test_dataset"):
        name = f"{m.get('dataset')} → {m['test_dataset']} ({m.get('labels') or 'same classes'})"
    norm = " · per-speaker standardised" if m.get("normalise") == "speaker" else ""
    return f"{name} · {'+'.join(m.get('modalities', []))}{norm} · {head}   ({'; '.join(tail)})"


# --- fit-time label sets ------------------------------------------------------------------
LABEL_SETS = ("iemocap4", "iemocap6", "plutchik")


def relabel(task: Task, dataset: str, labels: str) -> tuple[Task, dict[str, int]]:
    """The task under a fit-time label set, and how many labelled rows each left-out raw label
    lost (`{raw label: rows}`; they become unlabelled, -1).

    `iemocap4` / `iemocap6` map raw labels through labelsets.toml (hap + exc merged in
    iemocap4). `plutchik` maps the dataset's classes onto the 8 primaries + neutral; a label
    that maps to a dyad or a weight table gets a soft target (`Task.soft`), its hard label
    (for scoring) being its heaviest class, the first on ties. A set already in the space
    (prepared with `--labels plutchik`: its classes are the wheel's 9) is kept as it is, with
    its hard labels (the identity).
    """
    from fusion.labels import load_label_set, load_plutchik
    from fusion.splits import Task

    if task.kind != "classification":
        raise ValueError(f"--labels {labels} needs a classification target, not {task.target!r}")
    if labels not in LABEL_SETS:
        raise KeyError(f"unknown label set {labels!r} (known: {', '.join(LABEL_SETS)})")
    y = np.full(len(task.y), -1, dtype=np.int64)
    lost: dict[str, int] = {}
    has = task.y >= 0
    if labels == "plutchik":
        space = load_plutchik()
        if task.classes == space.classes:
            # already in the space (`prepare --labels plutchik`): the identity, never a second
            # mapping. The cache keeps the hard label only (the manifest's soft target in
            # metadata["plutchik"] is not cached), so the set trains on its hard labels.
            return task, lost
        table = space.soft_targets(dataset, task.classes)
        soft = np.zeros((len(task.y), len(space.classes)), dtype=np.float32)
        for i, c in enumerate(task.classes):
            rows = has & (task.y == i)
            if table[c] is None:
                if rows.any():
                    lost[c] = int(rows.sum())
                continue
            vec = np.asarray(table[c], dtype=np.float32)
            soft[rows] = vec
            y[rows] = int(np.argmax(vec))
        return Task(task.target, "classification", y, space.classes, soft=soft), lost
    ls = load_label_set(labels)
    if ls.dataset != dataset:
        raise ValueError(f"label set {labels} is for dataset {ls.dataset!r}, not {dataset!r}")
    for i, c in enumerate(task.classes):
        rows = has & (task.y == i)
        j = ls.index(c)
        if j is None:
            if rows.any():
                lost[c] = int(rows.sum())
        else:
            y[rows] = j
    return Task(task.target, "classification", y, list(ls.classes)), lost


# --- cross-dataset tests in a shared label space ------------------------------------------
def one_hot(task: Task) -> np.ndarray:
    """[N, K] one-hot targets of a classification task (zero rows where unlabelled)."""
    out = np.zeros((len(task.y), len(task.classes)), dtype=np.float32)
    has = np.flatnonzero(task.y >= 0)
    out[has, task.y[has]] = 1.0
    return out


class CrossTest:
    """A second feature set to test on: its rows sit after the training set's in one index
    space (row i of the test set is `offset + i`), so folds, loading and scoring stay as for
    one set. Built by `open_cross`."""

    def __init__(self, fs, rows, task: Task, offset: int, left_out: dict[str, int], mods):
        self.fs, self.rows, self.task, self.offset = fs, rows, task, offset
        self.left_out, self.mods = left_out, mods

    def fold(self, train_fs, task: Task, usable: np.ndarray, groups: np.ndarray,
             val_fraction: float):
        """Train on the training set's non-validation rows, validate on its validation split
        (carved from whole training groups when it has none), test on the other set."""
        from fusion.data import DataError
        from fusion.splits import VALID_NAMES, Fold, _carve_val

        is_val = np.isin(train_fs.split[usable], VALID_NAMES)
        train, val = usable[~is_val], usable[is_val]
        if len(val) == 0:
            train, val = _carve_val(train, groups, val_fraction)
        if len(np.unique(task.y[train])) < 2:
            raise DataError(f"feature set {train_fs.name}: fewer than 2 classes to train on")
        return Fold(train, val, self.offset + self.rows)

    def extend(self, raw: dict, rows: np.ndarray, seq_inputs, layer_inputs=()) -> tuple[dict, np.ndarray]:
        """The training set's loaded inputs with the test set's rows appended."""
        from fusion.data import DataError
        from fusion.train import load_inputs

        other = load_inputs(self.fs, self.mods, self.rows, seq_inputs, tuple(layer_inputs))
        out = {}
        for m, d in raw.items():
            if m not in other:
                raise DataError(f"feature set {self.fs.name} has no {m!r} inputs to test on")
            out[m] = {}
            for k, v in d.items():
                w = other[m][k]
                if v.shape[1:] != w.shape[1:]:
                    raise DataError(f"{m}/{k} is {tuple(v.shape[1:])} in the training set but "
                                    f"{tuple(w.shape[1:])} in {self.fs.name}: the two sets "
                                    "must come from the same preset")
                out[m][k] = np.concatenate([v, w.astype(v.dtype)])
        return out, np.concatenate([rows, self.offset + self.rows])


def open_cross(cache_root, dataset: str, preset: str, train_fs, mods: list[str], task: Task,
               cfg: FitConfig) -> CrossTest:
    """Open `dataset` as the test set of a fit on `train_fs`: the same modalities with the same
    dims, its labels in the training task's space (`plutchik`, or the same class list)."""
    from fusion.data import DataError, open_set
    from fusion.splits import Task as TaskT
    from fusion.splits import _task

    other = open_set(cache_root, dataset, preset=preset)
    for m in mods:
        a, b = train_fs.modality_spec(m), (other.modality_spec(m) if m in other.modalities
                                           else None)
        if b is None or (a.pooled_dim, a.seq_dim) != (b.pooled_dim, b.seq_dim):
            raise DataError(f"feature set {other.name}: modality {m!r} does not match "
                            f"{train_fs.name} (absent or other dims); use the same preset")
    if train_fs.has_cond != other.has_cond:
        raise DataError(f"{train_fs.name} and {other.name}: one has a conditioning vector, "
                        "the other not")
    t2 = _task(other, cfg.target)
    left: dict[str, int] = {}
    if cfg.labels == "plutchik":
        t2, left = relabel(t2, other.meta.dataset or dataset, "plutchik")
    elif cfg.labels or t2.classes != task.classes:
        raise ValueError(f"a cross-dataset test needs --labels plutchik or the same classes "
                         f"({task.classes} vs {t2.classes})")
    rows = np.flatnonzero(other.complete & t2.labelled())
    if len(rows) == 0:
        raise DataError(f"feature set {other.name}: no completed, labelled rows to test on")
    other.check(mods, rows)
    y = np.concatenate([task.y, t2.y])
    soft = None
    if task.soft is not None:  # the test rows' targets are one-hot where the set has no soft ones
        soft = np.concatenate([task.soft, t2.soft if t2.soft is not None else one_hot(t2)])
    combined = TaskT(task.target, task.kind, y, task.classes, soft=soft)
    return CrossTest(other, rows, combined, train_fs.n, left, mods)
