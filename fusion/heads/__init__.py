"""Fusion heads: the registry the trainer builds heads from.

Every head is `Head(spec: InputSpec, n_out: int, hidden=..., dropout=0.2, **head_options)`
(hidden 128 for early / late, 64 for cquery / tfn, and 32 with 4 tokens and 2 attention heads
for hybrid / mult / cfnsr, whose several attention blocks per modality make them the costliest:
sized so one fit of a 10k-clip set takes seconds on a CPU core; see BENCHMARKS.md) with
`forward(batch) -> HeadOutput` (logits [B, n_out] and per-branch `aux`), a `FusionHead`
subclass; see fusion/heads/base.py for the batch format and the hooks with defaults
(`seq_inputs`, `prepare`, `after_fit`).

The sequence heads (hybrid, cquery, cfnsr, mult) also read every modality's pooled vector
(option `pooled`): as a global token before the time-step tokens ("token": hybrid's default)
and, with "both" (cquery, cfnsr, mult), also through a residual pooled path (early fusion's
computation, `pooled_hidden` 128) that their own, gated, logits are added to — so a sequence
head never reads less than early fusion (issue 15; "none" gives the sequence-only heads of
before; BENCHMARKS.md "Heads on real data" has the measurement behind hybrid's default).

Every registered head also has a linear path (fusion/heads/linear.py, option `linear`): a
zero-initialised linear model of the pooled vectors, to which the head's own logits are added
through a learned gate that starts at 0 — so on a small set no head starts below the linear
model a logistic-regression baseline fits ("gated", the default; "off": the head alone).
A head that reads sequences gets `linear_windows` (3) time windows of each of them in that
path too (beginning, middle, end of the clip): the trainer starts the path from a probe of
those columns where it beats the pooled probe on validation beyond chance, so the order of
events in a clip, which no pooled vector holds, reaches the head from its first step.
"""

from __future__ import annotations

import inspect

from fusion.data import InputSpec
from fusion.heads.base import FusionHead, HeadOutput
from fusion.heads.cfnsr import CrossFusionSR
from fusion.heads.cquery import ConditionalQueryFusion
from fusion.heads.early import EarlyFusion
from fusion.heads.hybrid import HybridFusion
from fusion.heads.late import LateFusion
from fusion.heads.linear import MODES, state_has_linear, state_window_k, with_linear
from fusion.heads.mult import MulTLite
from fusion.heads.tfn import TensorFusion

LINEAR_WINDOWS = 3  # time windows of each sequence in a sequence head's linear path

HEADS: dict[str, type[FusionHead]] = {
    "early": EarlyFusion,
    "late": LateFusion,
    "hybrid": HybridFusion,
    "cquery": ConditionalQueryFusion,
    "tfn": TensorFusion,
    "mult": MulTLite,
    "cfnsr": CrossFusionSR,
}


def head_options(name: str) -> dict[str, object]:
    """The options head `name` accepts, with their defaults (spec and n_out excluded), plus
    the generic layer weighting `layer_mix`, also spelt `layers` (None: learned when an input
    has per-layer features; fusion/layers.py), the linear path `linear` ("gated" | "off";
    fusion/heads/linear.py) and its time windows `linear_windows` (0: none; used only by a head
    that reads sequences). A head with an integer `layers` option of its own (hybrid, cfnsr:
    block depth) keeps it: an integer goes to the head, a word to the weighting."""
    params = inspect.signature(HEADS[name].__init__).parameters
    out = {k: p.default for k, p in params.items() if k not in ("self", "spec", "n_out")}
    return {"layers": None, **out, "layer_mix": None, "linear": "gated",
            "linear_windows": LINEAR_WINDOWS}


def build_head(name: str, spec: InputSpec, n_out: int, **options) -> FusionHead:
    """Build head `name`; an unknown head or option is a ValueError naming what is valid."""
    if name not in HEADS:
        raise ValueError(f"unknown fusion head {name!r}; known heads: {', '.join(HEADS)}")
    valid = head_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for head {name!r}; "
            f"valid options: {', '.join(f'{k}={v!r}' for k, v in valid.items())}"
        )
    if n_out < 1:
        raise ValueError(f"n_out must be >= 1, got {n_out}")
    from fusion.layers import build_with_layers

    opts = dict(options)
    mode = opts.pop("linear", "gated")
    if mode not in MODES:
        raise ValueError(f"{name}: linear must be one of {MODES}, got {mode!r}")
    windows = opts.pop("linear_windows", LINEAR_WINDOWS)
    if not isinstance(windows, int) or isinstance(windows, bool) or windows < 0:
        raise ValueError(f"{name}: linear_windows must be an integer >= 0, got {windows!r}")
    return build_with_layers(
        lambda s, **o: with_linear(HEADS[name](s, n_out, **o), s, n_out, mode, windows), spec, opts)


def build_saved_head(name: str, spec: InputSpec, n_out: int, options: dict,
                     state: dict) -> FusionHead:
    """The head a run saved, its state loaded: a run written before the linear path existed
    (no `linear.` parameters, no `linear` option) is rebuilt without it."""
    opts = dict(options or {})
    if "linear" not in opts and not state_has_linear(state):
        opts["linear"] = "off"
    if "linear_windows" not in opts:  # saved before the windows existed, or without them
        opts["linear_windows"] = state_window_k(state)
    head = build_head(name, spec, n_out, **opts)
    head.load_state_dict(state)
    return head


__all__ = ["HEADS", "FusionHead", "HeadOutput", "build_head", "build_saved_head", "head_options"]
