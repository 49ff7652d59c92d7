"""The linear path every registered head has: a linear model of the pooled vectors, with the
head's own computation added through a gate that starts closed.

    logits = linear([pooled_1, present_1, ..., pooled_M, present_M]) + gate * head(batch).logits

The linear map and the gate start at exactly zero, so an untrained head *is* a linear model
trained from zero by the trainer's gradient descent and early stopping: on a few dozen clips of
a few hundred standardised features per modality that is a strongly regularised, ridge-like
fit — what a logistic regression with a small C does, and what a randomly initialised MLP or
attention stack does not (it fits noise first). The head's own path then enters only as far as
it lowers the training loss, from the first step on (the gate's gradient is the head's logits).

Measured (BENCHMARKS.md "Heads on real data"): without this path every head fell below a
logistic regression on its own pooled features on the 120-clip sample (early, visual only:
0.533 against the probe's 0.600), while a zero-initialised linear model trained by the same
trainer, on the same folds, reached 0.642.

The trainer goes one step further (FitConfig.warm_start, on by default): before training, the
path is set to the fold's fitted linear probe (fusion/probe.py; the same rows, standardisation
mapped onto the head's), and that starting state is scored on validation as "epoch 0" — so early
stopping keeps the probe unless training improves on it by more than chance (train.departure_p,
FitConfig.depart_p). This is linear-probing-then-fine-tuning
(Kumar et al., ICLR 2022): the head's own path is trained against a good linear model instead of
beside a random one.

`linear="gated"` (the default of every registered head) or `"off"` (the head alone, as before
issue 15). The head's parameters live under `inner.`, the path's under `linear.` and `gate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from fusion.data import InputSpec
from fusion.heads.base import FusionHead, HeadOutput, clean_pooled, presence, relative_windows

if TYPE_CHECKING:
    from fusion.probe import ProbeFit

MODES = ("gated", "off")


class LinearPath(nn.Module):
    """Zero-initialised linear map from every input modality's pooled vector (zeros where absent)
    and its 0/1 presence flag to the logits: the linear probe's model (fusion/probe.py). The
    conditioning vector (title, dialogue context) is left to the head, as the probe leaves it:
    on the 120-clip sample, adding the title's 384 dimensions here cost visual-only early
    fusion 0.11 accuracy.

    With `windows` (modalities whose sequences the head reads) and `k` >= 1, the map also reads
    each of those sequences as k time windows (`relative_windows`: the clip's beginning, middle,
    end for k = 3) and a flag "has steps": what a pooled vector cannot say, the order of events
    in a clip. The trainer may start it from a probe of those columns too (ProbeFit blocks named
    `window_block`), when that probe beats the pooled one on validation beyond chance.
    """

    def __init__(self, spec: InputSpec, n_out: int, windows: tuple[str, ...] = (), k: int = 0):
        super().__init__()
        self.names = spec.names
        self.dims = {m.name: m.pooled_dim for m in spec.modalities}
        seq_dim = {m.name: m.seq_dim for m in spec.modalities if m.is_sequence}
        self.windows = tuple(m for m in windows if m in seq_dim) if k > 0 else ()
        self.k = int(k) if self.windows else 0
        for m in self.windows:
            self.dims[window_block(m, self.k)] = self.k * seq_dim[m]
        if self.windows:  # saved with the state, so a saved head is rebuilt with its windows
            self.register_buffer("window_k", torch.tensor(self.k))
        self.proj = nn.Linear(sum(d + 1 for d in self.dims.values()), n_out)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def window_entries(self, data: dict) -> dict[str, dict[str, Tensor]]:
        """Each windowed modality's k windows of its (raw) sequence, to add to its prepared
        entry: `seq@r<k>` and `len@r<k>` (k where the row has steps, else 0). apply_stats then
        scales them with the sequence's statistics, and forward reads them instead of it."""
        out = {}
        for m in self.windows:
            d = data.get(m)
            if d is not None and "seq" in d:
                w, has = relative_windows(d, self.k, torch.float32)
                out[m] = {f"seq@r{self.k}": w, f"len@r{self.k}": has.long() * self.k}
        return out

    def _windows(self, x: dict, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = f"seq@r{self.k}"
        if key in x:
            has = presence(x, x[key]) & (x[f"len@r{self.k}"] > 0)
            w = x[key].to(dtype)
        else:  # not prepared (a clip at predict time): windows of the scaled sequence
            w, has = relative_windows(x, self.k, dtype)
            has = has & presence(x, w)
        return w.masked_fill(~has[:, None, None], 0.0).flatten(1), has

    def forward(self, batch: dict) -> Tensor:
        parts: list[Tensor] = []
        dtype = self.proj.weight.dtype
        for name in self.names:
            v, present = clean_pooled(batch[name], dtype)
            parts += [v, present[:, None].to(v.dtype)]
        for name in self.windows:
            w, has = self._windows(batch[name], dtype)
            parts += [w, has[:, None].to(dtype)]
        return self.proj(torch.cat(parts, dim=-1))

    @torch.no_grad()
    def start_from(self, fit: ProbeFit, stats: dict[str, Tensor]) -> bool:
        """Set the map to a fitted probe's logits, re-expressed for this path's inputs.

        The probe reads z = (x·present - mean) / std per design column (x·present: zeros where
        absent, its own statistics); this path reads x̃ = present·(x - μ) / σ with the fold's
        training statistics (fusion/normalise.py) and the presence flag. Since
        x·present = present·(σ x̃ + μ), a probe weight w on column j becomes w σ_j / std_j on x̃_j,
        w μ_j / std_j on the flag and -w mean_j / std_j in the bias; a probe presence column
        (w on (flag - mean) / std) adds w / std to the flag and -w mean / std to the bias. A
        window block is the same with its sequence's μ, σ (one per feature, the same in every
        window) and its "has steps" flag. Exact: the path then gives the probe's logits on every
        row. Columns the probe does not have (the windows, for a pooled probe) stay zero.
        Returns False (nothing set) when the probe does not fit this path (other modalities or
        widths, other outputs).
        """
        w_out, d_in = self.proj.weight.shape
        if fit.coef.shape[0] != w_out or any(
                self.dims.get(m) != d for m, d, _ in fit.blocks) or not fit.blocks:
            return False
        weight = np.zeros((w_out, d_in))
        bias = np.array(fit.intercept, dtype=np.float64)
        offset = {}
        o = 0
        for name, d in self.dims.items():
            offset[name] = o
            o += d + 1
        c = 0
        for m, d, has_flag in fit.blocks:
            w = fit.coef[:, c:c + d]
            mean, std = fit.mean[c:c + d], fit.std[c:c + d]
            part = "seq" if "~" in m else "pooled"
            src = m.split("~")[0]
            reps = d // stats[f"{src}.{part}.mean"].numel()
            mu = np.tile(stats[f"{src}.{part}.mean"].double().numpy(), reps)
            sigma = np.tile(stats[f"{src}.{part}.std"].double().numpy(), reps)
            o = offset[m]
            weight[:, o:o + d] = w * (sigma / std)
            weight[:, o + d] = w @ (mu / std)
            bias -= w @ (mean / std)
            c += d
            if has_flag:
                wf, mf, sf = fit.coef[:, c], fit.mean[c], fit.std[c]
                weight[:, o + d] += wf / sf
                bias -= wf * mf / sf
                c += 1
        self.proj.weight.copy_(torch.from_numpy(weight))
        self.proj.bias.copy_(torch.from_numpy(bias))
        return True


def window_block(modality: str, k: int) -> str:
    """The name of a modality's k time windows as a probe block / LinearPath input."""
    return f"{modality}~w{k}"


class WithLinearPath(FusionHead):
    """`inner`'s logits through a learned gate (0 at the start) added to a LinearPath's.

    The inner head's hooks pass through: what it reads (`seq_inputs`), what it prepares once per
    fit (`prepare`), its validation-set step (`after_fit`, e.g. late's stacking), and its
    per-branch `aux` logits.
    """

    def __init__(self, inner: FusionHead, spec: InputSpec, n_out: int, windows: int = 0):
        super().__init__()
        self.inner = inner
        reads = inner.seq_inputs if inner.seq_inputs is not None else spec.names
        self.linear = LinearPath(spec, n_out, tuple(reads), windows)
        self.gate = nn.Parameter(torch.zeros(()))
        self.seq_inputs = inner.seq_inputs

    def prepare(self, data: dict) -> dict:
        prepared = self.inner.prepare(data)  # the inner head may drop the raw sequences
        extra = self.linear.window_entries(data)
        return prepared | {m: dict(prepared[m]) | e for m, e in extra.items() if m in prepared}

    def after_fit(self, val_batch: dict, val_y: Tensor) -> None:
        self.inner.after_fit(val_batch, val_y)

    def start_from(self, fit: ProbeFit, stats: dict[str, Tensor]) -> bool:
        """The linear path set to a fold's fitted probe (LinearPath.start_from); gate unchanged."""
        return self.linear.start_from(fit, stats)

    def forward(self, batch: dict) -> HeadOutput:
        out = self.inner(batch)
        return HeadOutput(self.linear(batch) + self.gate * out.logits, out.aux)


def with_linear(head: FusionHead, spec: InputSpec, n_out: int, mode: str,
                windows: int = 0) -> FusionHead:
    """`head` wrapped in its linear path (mode "gated"), or as it is ("off"); `windows` > 0
    gives the path that many time windows of each sequence the head reads."""
    if mode not in MODES:
        raise ValueError(f"linear must be one of {MODES}, got {mode!r}")
    return head if mode == "off" else WithLinearPath(head, spec, n_out, windows)


def linear_path(head: nn.Module) -> LinearPath | None:
    """The LinearPath of a head, through wrappers (a layer weighting keeps it under `inner`)."""
    while head is not None:
        if isinstance(head, WithLinearPath):
            return head.linear
        head = getattr(head, "inner", None)
    return None


def state_window_k(state: dict) -> int:
    """The time windows of a saved head's linear path (0: none, or saved before they existed)."""
    for key in ("linear.window_k", "inner.linear.window_k"):
        if key in state:
            return int(state[key])
    return 0


def state_has_linear(state: dict) -> bool:
    """Whether a saved head state has a linear path (runs before it existed have none); a
    layer-weighting wrapper (fusion/layers.py) puts it under `inner.`."""
    return any(k in ("linear.proj.weight", "inner.linear.proj.weight") for k in state)
