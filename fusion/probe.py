"""The linear-probe baseline: the simplest honest model on the very features a head sees.

Logistic regression (classes) or ridge regression (a regression target) on the pooled vectors
of the same modalities (concatenated; an absent modality is zeros plus a 0/1 presence column),
standardised with the training rows' statistics, on the same folds, scored with the same
metrics. Its strength C (alpha for ridge) is chosen from a small grid on the validation rows
by the fit's selection metric — the same rule the head's early stopping follows — then the
probe is refit on the training rows only. Classes are weighted exactly when the fit weights
them (`class_weight`). Deterministic; seconds on a CPU.

A head below this probe (or below the majority / mean baseline) on the headline metric is
flagged by the report: it learned less from the features than a linear model does.

Each fold's fitted probe is also kept (`ProbeFit`, when `fits` is given): the trainer starts
a head's linear path from it (fusion/heads/linear.py), as in linear-probing-then-fine-tuning.

`cached_probe` keeps each result under the runs folder, named by a hash of everything the probe
reads (design matrix, labels, folds, task, selection metric, weighting, grids, scikit-learn's
version): an ablation fits one probe per modality subset, not one per head, and a stale entry
cannot be hit.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fusion import metrics as M
from fusion.protocols import selection_score

if TYPE_CHECKING:
    from fusion.splits import Fold, Task

log = logging.getLogger(__name__)

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
ALPHA_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class ProbeFit:
    """One fold's fitted probe as logits: `coef @ ((x - mean) / std) + intercept`, x a row of
    the design matrix (pooled_matrix) whose column blocks `blocks` lists as (modality, pooled
    dim, has a presence column). coef [n_out, D] gives every class a row (classes missing from
    the training rows get a very low intercept); a ridge has n_out = 1."""

    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    blocks: list[tuple[str, int, bool]]


def pooled_blocks(raw: dict, mods: list[str]) -> list[tuple[str, int, bool]]:
    """(modality, pooled dim, has a presence column) for each block of pooled_matrix."""
    out = []
    for m in mods:
        present = np.asarray(raw[m]["present"], dtype=bool)
        out.append((m, int(np.prod(np.shape(raw[m]["pooled"])[1:])), not present.all()))
    return out


def pooled_matrix(raw: dict, mods: list[str]) -> np.ndarray:
    """[n, D] design matrix from loaded inputs: each modality's pooled vector (zeros where
    absent) and, when it is absent on some rows, a presence column (pooled_blocks)."""
    parts = []
    for m in mods:
        present = np.asarray(raw[m]["present"], dtype=bool)
        x = np.asarray(raw[m]["pooled"], dtype=np.float64).reshape(len(present), -1)
        parts.append(np.where(present[:, None], x, 0.0))
        if not present.all():
            parts.append(present[:, None].astype(np.float64))
    return np.concatenate(parts, axis=1)


def window_matrix(prepared: dict, windows: tuple[str, ...], k: int
                  ) -> tuple[np.ndarray, list[tuple[str, int, bool]]]:
    """[n, D'] design columns of the k time windows of each sequence in `windows`, read from a
    head's prepared (unscaled) data, where its linear path put them (`seq@r<k>` / `len@r<k>`,
    fusion/heads/linear.py): the windows (zeros where a row has no step), then a 0/1 "has steps"
    column; and their blocks."""
    from fusion.heads.linear import window_block

    parts, blocks = [], []
    for m in windows:
        w, n = prepared[m][f"seq@r{k}"], prepared[m][f"len@r{k}"]
        parts += [w.flatten(1).double().numpy(), (n > 0).double().numpy()[:, None]]
        blocks.append((window_block(m, k), int(w[0].numel()), True))
    return np.concatenate(parts, axis=1), blocks


def _moments(x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sd = x[train].std(axis=0)
    return x[train].mean(axis=0), np.where(sd > 1e-8, sd, 1.0)


def _as_logits(model, kind: str, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef [n_out, D], intercept [n_out]) whose logits _predict's argmax agrees with: a
    binary logistic regression's decision d becomes logits [0, d] (softmax = its sigmoid)."""
    if kind == "regression":
        return np.atleast_2d(model.coef_).astype(np.float64), np.atleast_1d(model.intercept_)
    coef, inter = model.coef_, model.intercept_
    if len(model.classes_) == 2:
        coef = np.concatenate([np.zeros_like(coef), coef])
        inter = np.concatenate([np.zeros_like(inter), inter])
    w = np.zeros((n_out, coef.shape[1]))
    b = np.full(n_out, float(np.min(inter)) - 10.0)  # a class never seen in training
    w[model.classes_], b[model.classes_] = coef, inter
    return w, b


def _model(kind: str, strength: float, class_weight: bool, seed: int = 0):
    from sklearn.linear_model import LogisticRegression, Ridge

    if kind == "regression":
        return Ridge(alpha=strength)
    return LogisticRegression(C=strength, max_iter=2000, random_state=seed, warm_start=True,
                              class_weight="balanced" if class_weight else None)


def _predict(model, x: np.ndarray, kind: str, n_out: int) -> np.ndarray:
    """Scores like a head's outputs: [n, K] class scores (argmax = prediction) or [n]."""
    if kind == "regression":
        return model.predict(x)
    out = np.full((len(x), n_out), -np.inf)
    out[:, model.classes_] = model.decision_function(x).reshape(len(x), -1) \
        if len(model.classes_) > 2 else np.stack([-model.decision_function(x),
                                                  model.decision_function(x)], axis=1)
    return out


def _metric(task: Task, y: np.ndarray, pred: np.ndarray, key: str) -> float:
    if task.kind == "classification":
        return float(M.classification_metrics(y, pred.argmax(-1), task.n_out)[key])
    return float(M.regression_metrics(y, pred)[key])


def linear_probe(x: np.ndarray, y: np.ndarray, folds: list[Fold], task: Task, select: str,
                 class_weight: bool, fits: list[ProbeFit] | None = None,
                 blocks: list[tuple[str, int, bool]] | None = None) -> dict:
    """Fit the probe on each fold (positions into `x` / `y`), pool its test predictions and
    score them like a head's: the scalar metrics, plus the chosen strength per fold. With
    `fits` (a list) and `blocks` (pooled_blocks of x), each fold's fitted probe is appended."""
    from threadpoolctl import threadpool_limits

    # one BLAS thread: the products of a probe are small, and a threaded BLAS spends more time
    # waking threads than computing (a 100-row probe of 2,177 columns: 0.56 -> 0.03 s per fit
    # on two cores)
    with threadpool_limits(limits=1, user_api="blas"):
        return _linear_probe(x, y, folds, task, select, class_weight, fits, blocks)


def _linear_probe(x: np.ndarray, y: np.ndarray, folds: list[Fold], task: Task, select: str,
                  class_weight: bool, fits: list[ProbeFit] | None,
                  blocks: list[tuple[str, int, bool]] | None) -> dict:
    kind = task.kind
    grid = ALPHA_GRID if kind == "regression" else C_GRID
    preds, ys, chosen = [], [], []
    for f in folds:
        mu, sd = _moments(x, f.train)
        xs = (x - mu) / sd
        best, best_score = grid[0], -np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on tiny folds
            # one model along the grid (from the strongest regularisation to the weakest),
            # each fit starting from the previous solution (lbfgs warm start); the best fit is
            # kept, not refitted
            path = _model(kind, grid[0], class_weight)
            mdl = path
            for s in grid:
                path.set_params(**{"alpha" if kind == "regression" else "C": s})
                path.fit(xs[f.train], y[f.train])
                score = selection_score(select, _metric(task, y[f.val],
                                                        _predict(path, xs[f.val], kind, task.n_out),
                                                        select))
                if score > best_score + 1e-9:
                    best, best_score, mdl = s, score, copy.deepcopy(path)
        if fits is not None:
            fits.append(ProbeFit(*_as_logits(mdl, kind, task.n_out), mu, sd, list(blocks or [])))
        preds.append(_predict(mdl, xs[f.test], kind, task.n_out))
        ys.append(y[f.test])
        chosen.append(best)
    yt, pt = np.concatenate(ys), np.concatenate(preds)
    if kind == "classification":
        m = M.classification_metrics(yt, pt.argmax(-1), task.n_out, task.classes)
        keys = M.SCALAR_KEYS_CLASSIFICATION
        out = {k: m[k] for k in keys} | {"per_class": m["per_class"]}
    else:
        m = M.regression_metrics(yt, pt)
        out = {k: m[k] for k in M.SCALAR_KEYS_REGRESSION}
    out["model"] = "ridge" if kind == "regression" else "logistic regression"
    out["strength"] = chosen
    out["class_weight"] = bool(class_weight and kind == "classification")
    return out


PROBE_CACHE_VERSION = 1  # raise when linear_probe's result changes for the same inputs
# the probe folder keeps its most recently used entries up to this many bytes (an entry is 50 KB
# to a few MB: per fold the coefficients, means and stds); older ones are removed after a write
PROBE_CACHE_BYTES = 512 * 2**20
STALE_TMP_S = 3600.0  # a writer's temporary file this old was left by a killed process


def probe_key(x: np.ndarray, y: np.ndarray, folds: list[Fold], task: Task, select: str,
              class_weight: bool) -> str:
    """Hash of everything linear_probe's result depends on."""
    import sklearn

    h = hashlib.blake2b(digest_size=20)
    for part in (PROBE_CACHE_VERSION, sklearn.__version__, task.kind, task.n_out,
                 list(task.classes), select, bool(class_weight), C_GRID, ALPHA_GRID):
        h.update(repr(part).encode() + b"\0")
    arrays = [x, y] + [a for f in folds for a in (f.train, f.val, f.test)]
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()


def cached_probe(cache_dir: Path | None, x: np.ndarray, y: np.ndarray, folds: list[Fold],
                 task: Task, select: str, class_weight: bool, fits: list[ProbeFit],
                 blocks: list[tuple[str, int, bool]]) -> tuple[dict, bool]:
    """linear_probe(...) with `fits` filled, read from `cache_dir` when the same inputs were
    probed before (then the second value is True), else computed and stored there (an
    unreadable entry is recomputed; None: no cache)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{probe_key(x, y, folds, task, select, class_weight)}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                lin = json.loads(str(z["result"]))
                got = [ProbeFit(z[f"coef{i}"], z[f"intercept{i}"], z[f"mean{i}"], z[f"std{i}"],
                                list(blocks)) for i in range(len(folds))]
            fits.extend(got)
            with contextlib.suppress(OSError):
                os.utime(path)  # last use: pruning removes the least recently used first
            return lin, True
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # absent, or unreadable (written by another version, cut short): recompute
    new: list[ProbeFit] = []
    lin = linear_probe(x, y, folds, task, select, class_weight, fits=new, blocks=blocks)
    fits.extend(new)
    if path is not None:
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp.npz")  # per writer
        try:
            arrays = {"result": np.array(json.dumps(lin, default=_plain))}
            for i, f in enumerate(new):
                arrays |= {f"coef{i}": f.coef, f"intercept{i}": f.intercept, f"mean{i}": f.mean,
                           f"std{i}": f.std}
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **arrays)
            os.replace(tmp, path)  # whole or absent: a concurrent reader never sees half a file
            prune_probes(path.parent, keep=path)
        except (OSError, TypeError, ValueError) as e:  # a full or read-only disk, a value JSON
            # cannot hold: either costs the reuse, never the fit
            log.warning("linear probe not kept in %s: %s", path.parent, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
    return lin, False


def prune_probes(folder: Path, limit: int | None = None, keep: Path | None = None) -> int:
    """Remove the least recently used entries of a probe folder until it holds at most `limit`
    bytes (default PROBE_CACHE_BYTES), and temporary files of writers that died; `keep` (the
    entry just written) stays. Returns the number of files removed. Entries another process
    removes meanwhile are skipped; a removed entry is only fitted again when next needed."""
    limit = PROBE_CACHE_BYTES if limit is None else limit
    now, entries, removed = time.time(), [], 0
    for p in Path(folder).glob("*.npz"):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.name.startswith("."):  # a writer's temporary file
            if now - st.st_mtime > STALE_TMP_S:
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):  # oldest use first
        if total <= limit:
            break
        if keep is not None and p == keep:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed += 1
        total -= size
    return removed


def _plain(o: object) -> object:
    """A numpy scalar as its Python value, for json.dumps."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot store {type(o).__name__} in a probe cache entry")


def below_baselines(m: dict, headline: str) -> dict[str, bool]:
    """{baseline: head below it on `headline`} for the trivial baseline and the probe.

    A head that kept its warm-start probe predicts in float32 what the probe predicts in
    float64: its MAE differs from the probe's in the 8th digit (0.45629205 against
    0.45629202 on a real valence fit). Differences below a millionth of the score (scores
    print to three decimals) are ties, not a head below its baseline."""
    out = {}
    v = m.get(headline)
    for name, key in (("majority", "majority_baseline"), ("mean", "mean_baseline"),
                      ("linear_probe", "linear_probe")):
        b = (m.get(key) or {}).get(headline)
        if v is not None and b is not None:
            tol = 1e-6 * max(1.0, abs(b))
            out[name] = bool(selection_score(headline, v) < selection_score(headline, b) - tol)
    return out
