"""Hybrid fusion in three layers, after the idea of CHFEN (a conditional hybrid fusion network
for emotion recognition in user-generated video).

1. Encoding layer: every modality is projected to `hidden` tokens; sequence modalities get a
   small transformer encoder (`layers` pre-norm blocks, padding masked), a vector modality is a
   single token.
2. Feature-fusion layer: the tightly coupled pairs (by default text<->visual and
   visual<->audio) exchange information by cross-attention in both directions — queries from
   one member, keys/values from the other, masked by the other's padding. A pair whose members
   are not both in the spec is skipped.
3. Decision-fusion layer: each modality (and the conditioning vector, if any) and each pair
   makes its own decision (pooled representation -> logits); the decisions are combined with
   learned weights, renormalised per row over the units whose inputs are present (a pair needs
   both members). Rows with nothing present return a learned prior.

The units' decisions come back in the output's `aux` (unit name -> (logits [B, n_out],
present [B]); pairs are named "text+visual"), for optional auxiliary losses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusion.data import InputSpec
from fusion.heads.base import (
    Block,
    FusionHead,
    HeadOutput,
    PooledPath,
    Tokens,
    VectorEncoder,
    check_spec,
    masked_mean,
    masked_softmax,
    mlp,
    pooled_mode,
    token_inputs,
)

PAIRS = (("text", "visual"), ("visual", "audio"))


class HybridFusion(FusionHead):
    def __init__(
        self,
        spec: InputSpec,
        n_out: int,
        hidden: int = 32,
        dropout: float = 0.2,
        layers: int = 1,
        heads: int = 2,
        max_tokens: int = 4,
        pairs: tuple[tuple[str, str], ...] = PAIRS,
        pooled: str = "token",  # measured: the gated residual path hurt hybrid's fusion (BENCHMARKS)
        pooled_hidden: int = 128,
    ):
        super().__init__()
        check_spec(spec)
        token, residual = pooled_mode("hybrid", pooled)
        if not 0 <= layers <= 4:
            raise ValueError(f"hybrid: layers must be in 0..4, got {layers}")
        self.names = spec.names
        self.pairs = tuple((a, b) for a, b in pairs if a in self.names and b in self.names)
        # 1. encoding layer
        self.tokens = nn.ModuleDict(
            {m.name: Tokens(m, hidden, max_tokens=max_tokens, pooled_token=token)
             for m in spec.modalities}
        )
        self.seq_inputs = token_inputs(self.tokens)
        self.encoder = nn.ModuleDict(
            {
                m.name: nn.ModuleList(Block(hidden, heads, dropout) for _ in range(layers))
                for m in spec.modalities
                if m.is_sequence
            }
        )
        # 2. feature-fusion layer: one cross-attention block per direction of each pair
        self.cross = nn.ModuleDict()
        for a, b in self.pairs:
            self.cross[f"{a}<-{b}"] = Block(hidden, heads, dropout, cross=True)
            self.cross[f"{b}<-{a}"] = Block(hidden, heads, dropout, cross=True)
        # 3. decision-fusion layer
        self.cond = VectorEncoder(spec.cond.pooled_dim, hidden) if spec.cond else None
        self.units = list(self.names) + [f"{a}+{b}" for a, b in self.pairs]
        if self.cond is not None:
            self.units.append("cond")
        self.decide = nn.ModuleDict()
        for unit in self.units:
            d_in = 2 * hidden if "+" in unit else hidden
            self.decide[unit] = mlp(d_in, hidden, n_out, dropout)
        self.unit_weights = nn.Parameter(torch.zeros(len(self.units)))
        self.prior = nn.Parameter(torch.zeros(n_out))
        self.pooled_path = PooledPath(spec, pooled_hidden, n_out, dropout) if residual else None
        # see FusionHead.add_pooled; only with the residual path
        self.seq_gate = nn.Parameter(torch.zeros(())) if residual else None

    def forward(self, batch: dict) -> HeadOutput:
        enc: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for name in self.names:
            x, pad, present = self.tokens[name](batch[name])
            for block in self.encoder[name] if name in self.encoder else ():
                x = block(x, pad)
            enc[name] = (x, pad, present)

        reps: dict[str, Tensor] = {}
        present: dict[str, Tensor] = {}
        for name, (x, pad, p) in enc.items():
            reps[name], present[name] = masked_mean(x, ~pad), p
        for a, b in self.pairs:
            (xa, pa, ya), (xb, pb, yb) = enc[a], enc[b]
            a_from_b = self.cross[f"{a}<-{b}"](xa, pa, xb, pb)
            b_from_a = self.cross[f"{b}<-{a}"](xb, pb, xa, pa)
            unit = f"{a}+{b}"
            reps[unit] = torch.cat([masked_mean(a_from_b, ~pa), masked_mean(b_from_a, ~pb)], -1)
            present[unit] = ya & yb
        if self.cond is not None:
            reps["cond"], present["cond"] = self.cond(batch["cond"])

        logits = torch.stack([self.decide[u](reps[u]) for u in self.units], dim=1)
        mask = torch.stack([present[u] for u in self.units], dim=1)
        aux = {u: (logits[:, i], mask[:, i]) for i, u in enumerate(self.units)}
        w = masked_softmax(self.unit_weights.expand_as(mask), mask)
        out = (w[..., None] * logits).sum(dim=1)
        nothing = ~mask.any(dim=1)
        out = torch.where(nothing[:, None], self.prior.expand_as(out), out)
        if self.pooled_path is not None:  # residual pooled path (see PooledPath, add_pooled)
            res = self.pooled_path(batch)
            aux["pooled"] = (res, torch.ones_like(nothing))
            out = res + self.seq_gate * out
        return HeadOutput(out, aux)
