"""Layer-wise encoder features: a weighting over hidden states feeding a head's pooled input.

A modality made by a transformer encoder of the full preset stores, besides the chosen layer's
sequence, every hidden state pooled over the clip: `layers` [N, L+1, Dl] (see
pipeline/cacheformat.py). Which layer carries emotion differs by model and task (the last layer
of a self-supervised speech model is among its worst), so, as in the SUPERB / EmoBox protocol,
the trainer can learn a softmax weighting over the (standardised) hidden states:

    mixed = sum_l softmax(w)_l * layers[:, l]          w: one learned scalar per hidden state

and `mixed` becomes the head's pooled input for that modality: it replaces `pooled` when both
have the same width (audio, text: pooled is the chosen layer's mean), and is appended to it
otherwise (visual: pooled also carries std, face coverage and the track count). Any head works
unchanged: it is built on a spec with the new pooled width and wrapped by `LayerMixedHead`.

The head option `layers` (`--opt layers=...`), or its unambiguous alias `layer_mix`, picks the
weighting (the hybrid and cfnsr heads have an integer option `layers` of their own, the depth
of their transformer blocks: an integer `layers` goes to the head, a word to the weighting):
  learned  softmax weights trained with the head (default when any input has `layers`)
  mean     every hidden state weighted equally
  last     the last hidden state only
  off      `layers` unused: the pooled vector as stored
A run with `learned` reports its weights in metrics.json ("layer_weights").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from fusion.data import InputSpec, ModalitySpec
from fusion.heads.base import FusionHead, HeadOutput

MODES = ("learned", "mean", "last", "off")
OPTION, ALIAS = "layers", "layer_mix"  # the head option's names
PARAM = "layer_logits"  # state-dict prefix of the learned weights: layer_logits.<modality>


def split_options(options: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the weighting asked for or None, the options left for the head)."""
    rest = dict(options)
    asked = rest.pop(ALIAS, None)
    if OPTION in rest and (rest[OPTION] is None or isinstance(rest[OPTION], str)):
        word = rest.pop(OPTION)
        if asked is not None and word is not None and word != asked:
            raise ValueError(f"head options layers={word!r} and layer_mix={asked!r} disagree")
        asked = asked if asked is not None else word
    return asked, rest


def layer_mode(spec: InputSpec, options: Mapping[str, Any]) -> str:
    """The weighting asked for in `options` (default: learned when an input has layers)."""
    asked, _ = split_options(options)
    with_layers = [m.name for m in spec.modalities if m.has_layers]
    if asked is None:
        return "learned" if with_layers else "off"
    if asked not in MODES:
        raise ValueError(f"head option layers={asked!r}: expected one of {', '.join(MODES)}")
    if asked != "off" and not with_layers:
        raise ValueError(f"head option layers={asked}: none of the modalities {list(spec.names)} "
                         "has per-layer features (only the full preset's transformer encoders "
                         "store a `layers` array); use layers=off or re-extract with the full preset")
    return str(asked)


def mixed_spec(m: ModalitySpec) -> ModalitySpec:
    """The spec the inner head sees for a mixed modality: the new pooled width, no layers."""
    width = m.layer_dim if m.layer_dim == m.pooled_dim else m.pooled_dim + m.layer_dim
    return replace(m, pooled_dim=width, n_layers=0, layer_dim=0)


class LayerMixedHead(FusionHead):
    """A head whose pooled inputs of modalities with `layers` are a weighting of those layers.

    `build(spec, **options)` makes the inner head; its parameters live under `inner.`, the
    learned weights under `layer_logits.<modality>`.
    """

    def __init__(self, build: Callable[..., FusionHead], spec: InputSpec, mode: str,
                 options: Mapping[str, Any]):
        super().__init__()
        if mode not in MODES or mode == "off":
            raise ValueError(f"LayerMixedHead needs a mode among learned, mean, last; got {mode!r}")
        self.mode = mode
        self.mixed = tuple(m.name for m in spec.modalities if m.has_layers)
        self.replaces = {m.name: m.layer_dim == m.pooled_dim for m in spec.modalities if m.has_layers}
        inner_spec = replace(spec, modalities=tuple(mixed_spec(m) if m.has_layers else m
                                                    for m in spec.modalities))
        self.inner = build(inner_spec, **options)
        n_layers = {m.name: m.n_layers for m in spec.modalities if m.has_layers}
        self.layer_logits = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(n)) for m, n in n_layers.items()} if mode == "learned" else {})
        self.n_layers = n_layers
        self.seq_inputs = self.inner.seq_inputs
        self.layer_inputs = self.mixed  # what the trainer loads "layers" of

    def weights(self, m: str) -> Tensor:
        """[L+1] weights of modality m's hidden states (sum to 1)."""
        n = self.n_layers[m]
        if self.mode == "learned":
            return torch.softmax(self.layer_logits[m], dim=0)
        if self.mode == "mean":
            return torch.full((n,), 1.0 / n)
        w = torch.zeros(n)
        w[-1] = 1.0
        return w

    def layer_weights(self) -> dict[str, list[float]]:
        return {m: [float(v) for v in self.weights(m).detach().cpu()] for m in self.mixed}

    def mix_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with each mixed modality's pooled input replaced (or extended) by the
        weighted sum of its hidden states; absent rows stay zero."""
        out = dict(batch)
        for m in self.mixed:
            x = batch[m]
            layers = x["layers"]
            w = self.weights(m).to(device=layers.device, dtype=layers.dtype)
            v = torch.einsum("l,bld->bd", w, layers)
            v = v * x["present"].to(device=v.device, dtype=v.dtype)[:, None]
            if not self.replaces[m]:
                v = torch.cat([x["pooled"].to(v.dtype), v], dim=1)
            out[m] = x.replace(pooled=v) if hasattr(x, "replace") else {**x, "pooled": v}
        return out

    def forward(self, batch: dict) -> HeadOutput:
        return self.inner(self.mix_batch(batch))

    def prepare(self, data: dict) -> dict:
        return self.inner.prepare(data)

    def after_fit(self, val_batch: dict, val_y: Tensor) -> None:
        with torch.no_grad():
            mixed = self.mix_batch(val_batch)
        self.inner.after_fit(mixed, val_y)


def build_with_layers(build: Callable[..., FusionHead], spec: InputSpec,
                      options: Mapping[str, Any]) -> FusionHead:
    """`build(spec, **options)` (without the `layers` option), wrapped in a LayerMixedHead
    unless the weighting is off (no input has layers, or `layers=off`)."""
    _, rest = split_options(options)
    mode = layer_mode(spec, options)
    if mode == "off":
        return build(spec, **rest)
    return LayerMixedHead(build, spec, mode, rest)


def weights_from_state(state: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Learned layer weights (softmax of `layer_logits.<m>`) from a head's state dict."""
    prefix = f"{PARAM}."
    return {k[len(prefix):]: [float(v) for v in torch.softmax(t.float(), 0)]
            for k, t in state.items() if k.startswith(prefix)}


def summarise_weights(runs: list[dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """metrics.json's "layer_weights": per modality the mean and std over (seed, fold) runs of
    each hidden state's weight, the strongest state, and every run's weights."""
    out: dict[str, dict[str, Any]] = {}
    for m in sorted({m for r in runs for m in r}):
        w = torch.tensor([r[m] for r in runs if m in r], dtype=torch.float64)
        mean = w.mean(0)
        out[m] = {"mean": [round(float(v), 4) for v in mean],
                  "std": [round(float(v), 4) for v in (w.std(0) if len(w) > 1 else torch.zeros_like(mean))],
                  "best_layer": int(mean.argmax()),
                  "runs": [[round(float(v), 4) for v in r] for r in w]}
    return out
