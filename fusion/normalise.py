"""Feature scaling with training statistics, and lazy row selection of in-memory tensors.

`fit_stats` measures per-feature mean/std on the present training rows (real time steps only
for sequences); `apply_stats` scales every row with them, absent rows and padding staying
exactly zero. `per_speaker` (fit option `normalise="speaker"`) first standardises each
speaker's rows by that speaker's own statistics. `take` / `Rows` select a mini-batch without copying what a head does not read;
`drop_modalities` is modality dropout on such a batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

Batch = dict[str, dict[str, Tensor]]


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
    """Per-feature mean/std of every modality's pooled vectors, real time steps and (when
    loaded) per-hidden-state vectors `layers`, from the present training rows only (the test fold and zero-filled absent rows shape nothing).

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
        if "layers" in d:  # per hidden state and feature: [L+1, Dl] flattened
            parts.append(("layers", d["present"], d["layers"].reshape(len(d["layers"]), -1)))
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
            part = key if key in ("pooled", "layers") else "seq" if key.split("@")[0] == "seq" else None
            mean = stats.get(f"{m}.{part}.mean")
            if part is None or mean is None:
                continue
            if part == "layers":  # [R, L+1, Dl], statistics per hidden state and feature
                x = d[key].to(torch.float32, copy=not inplace)
                o[key] = x.sub_(mean.view(x.shape[1:])).mul_(1.0 / stats[f"{m}.layers.std"].view(x.shape[1:]))
                o[key].mul_(d["present"].view(-1, 1, 1))
                continue
            valid = d["present"] if part == "pooled" else _valid_mask(d, key)
            x = d[key].to(torch.float32, copy=not inplace)  # float16 sequences: a new tensor
            o[key] = x.sub_(mean).mul_(1.0 / stats[f"{m}.{part}.std"]).mul_(valid.unsqueeze(-1))
        out[m] = o
    return out


SPEAKER_MIN_ROWS = 3  # a speaker with fewer present rows is scaled by the set-wide statistics


def _moments_np(x: np.ndarray, valid: np.ndarray, present: np.ndarray, idx: np.ndarray,
                min_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """float32 mean / std over the valid entries of rows idx (None: fewer than min_rows present)."""
    v = valid[idx]
    if int(present[idx].sum()) < min_rows or not v.any():
        return None
    sel = x[idx][v].astype(np.float64)  # [n, D] or [n, L, D]
    std = sel.std(0)
    return sel.mean(0).astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)


def per_speaker(raw: dict, speakers: np.ndarray, skip: tuple[str, ...] = (),
                min_rows: int = SPEAKER_MIN_ROWS) -> dict:
    """Standardise each speaker's rows by that speaker's own per-feature mean / std, in place.

    Speaker normalisation (as in cross-speaker speech emotion work): what stays is how a clip
    differs from the same person's other clips, not the voice, face or loudness that tells
    people apart. No labels are read, and every row of the speaker counts, test rows included
    (a held-out speaker is scaled by its own unlabelled clips: transductive, as in that
    literature). `raw` is fs.load's numpy dict, rows aligned with `speakers`; statistics come
    from present rows (real time steps for sequences, per hidden state for `layers`); absent
    rows and padding stay zero; a speaker with fewer than `min_rows` present rows in a modality
    is scaled by the statistics of all rows. Modalities in `skip` (the conditioning vector) are
    left as they are. The global training-set scaling (fit_stats) still follows.
    """
    speakers = np.asarray(speakers)
    by_speaker = [np.flatnonzero(speakers == s) for s in np.unique(speakers)]
    for m, d in raw.items():
        if m in skip:
            continue
        present = np.asarray(d["present"], dtype=bool)
        for key in ("pooled", "seq", "layers"):
            if key not in d:
                continue
            x = d[key] if d[key].flags.writeable else d[key].copy()
            d[key] = x
            if key == "seq":
                valid = present[:, None] & (np.arange(x.shape[1])[None, :] < d["len"][:, None])
            else:
                valid = present
            overall = _moments_np(x, valid, present, np.arange(len(x)), 1)
            if overall is None:  # no present row at all: nothing to scale
                continue
            for idx in by_speaker:
                mean, std = _moments_np(x, valid, present, idx, min_rows) or overall
                z = (x[idx].astype(np.float32) - mean) / std
                z *= valid[idx].reshape(valid[idx].shape + (1,) * (z.ndim - valid.ndim))
                x[idx] = z.astype(x.dtype)
    return raw


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
