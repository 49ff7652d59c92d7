"""Who is trained, validated and tested on: the task, groups, and train/val/test folds.

The official split when the set has one (a validation split carved from whole training groups
if it has none), or grouped, class-stratified k-fold. Every fold is checked before training: no
empty split, more than one class (or a non-constant target) on the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fusion.data import DataError, FeatureSet, row_groups

TRAIN, TEST = "train", "test"
VALID_NAMES = ("valid", "validation", "val", "dev")
UNGROUPED = ("none", "row", "rows")


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
    soft: np.ndarray | None = None  # [N, K] soft targets (fit-time plutchik labels), else None

    @property
    def n_out(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1

    def labelled(self) -> np.ndarray:
        return self.y >= 0 if self.kind == "classification" else np.isfinite(self.y)


# --- task, groups, splits ---------------------------------------------------------------
def _task(fs: FeatureSet, target: str) -> Task:
    if target == "label":
        if not fs.classes and not fs.target_names:
            raise DataError(f"feature set {fs.name} has no labels (no classes, no regression "
                            "targets): nothing to fit; give its manifest labels (for `prepare folder`: a "
                            "labels.csv with a `label` column) and extract it again")
        if not fs.classes:
            raise DataError(f"feature set {fs.name} has no classes; pick a regression target "
                            f"with --target, one of {fs.target_names}")
        return Task("label", "classification", fs.label, fs.classes)
    if target not in fs.targets:
        raise DataError(f"feature set {fs.name} has no target {target!r} "
                        f"(targets: {['label', *fs.target_names]})")
    return Task(target, "regression", fs.targets[target], [target])


def _groups(fs: FeatureSet, group_by: str | None) -> np.ndarray:
    """Group id per row for grouped splits; each row its own group when ungrouped.

    Rows with an empty group string stand alone (they cannot leak across a split).
    """
    own = row_groups(fs.n)
    if group_by is not None and group_by.lower() in UNGROUPED:
        return own
    if group_by is not None and group_by != fs.group_by:
        raise DataError(f"feature set {fs.name} is grouped by {fs.group_by!r} only; "
                        f"group_by={group_by!r} is not stored (use None or 'none')")
    return fs.group_ids if fs.group_by else own


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
                                f"completed, labelled rows (splits: {have}); try k-fold (--split kfold)")
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
        grouped = bool(fs.group_by) and n_groups < len(g)
        by = f"grouped by {fs.group_by!r}" if grouped else "one per clip"
        hint = (f"; lower --folds, or --group-by none to split clips instead (the same "
                f"{fs.group_by} then appears in training and test)" if grouped and folds >= 2 else "")
        raise DataError(f"feature set {fs.name}: {folds}-fold needs at least {max(folds, 2)} "
                        f"groups, there are {n_groups} ({by}){hint}")
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
