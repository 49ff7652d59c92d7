"""Early fusion: one vector per modality, concatenated, then an MLP.

The simplest fusion baseline. Each modality is summarised by a single vector (the stored pooled
vector, a masked mean of its sequence, or learned attention pooling over its sequence),
normalised and projected to `hidden`, and concatenated with its presence flag. An absent
modality contributes a learned "absent" embedding and flag 0 instead of its zeros, so the MLP
can tell "missing" from "measured and small". The conditioning vector (title / dialogue
context), when the feature set has one, is one more such input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusion.data import InputSpec
from fusion.heads.base import (
    AttentionPool,
    FusionHead,
    HeadOutput,
    VectorEncoder,
    check_spec,
    clean_pooled,
    clean_seq,
    fill_absent,
    masked_mean,
    mlp,
)

POOLS = ("pooled", "mean", "attention")


class EarlyFusion(FusionHead):
    def __init__(
        self,
        spec: InputSpec,
        n_out: int,
        hidden: int = 128,
        dropout: float = 0.2,
        pool: str = "pooled",
    ):
        super().__init__()
        check_spec(spec)
        if pool not in POOLS:
            raise ValueError(f"early: pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        self.names = spec.names
        # Which modalities are summarised from their sequence (vector modalities always pooled).
        self.from_seq = {m.name: pool != "pooled" and m.is_sequence for m in spec.modalities}
        self.seq_inputs = tuple(n for n, from_seq in self.from_seq.items() if from_seq)
        self.proj = nn.ModuleDict()
        self.absent = nn.ParameterDict()
        self.attn_pool = nn.ModuleDict()
        for m in spec.modalities:
            d_in = m.seq_dim if self.from_seq[m.name] else m.pooled_dim
            self.proj[m.name] = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden))
            self.absent[m.name] = nn.Parameter(torch.randn(hidden) * 0.02)
            if self.from_seq[m.name] and pool == "attention":
                self.attn_pool[m.name] = AttentionPool(d_in)
        self.cond = VectorEncoder(spec.cond.pooled_dim, hidden) if spec.cond else None
        n_in = len(self.names) + (self.cond is not None)
        self.head = mlp(n_in * (hidden + 1), hidden, n_out, dropout)

    def summarise(self, name: str, x: dict) -> tuple[Tensor, Tensor]:
        """(vector [B, D_in], present [B]) for one modality, following the `pool` option."""
        dtype = self.proj[name][1].weight.dtype
        if not self.from_seq[name]:
            return clean_pooled(x, dtype)
        seq, valid, present = clean_seq(x, dtype)
        if self.pool == "mean":
            return masked_mean(seq, valid), present
        return self.attn_pool[name](seq, valid), present

    def forward(self, batch: dict) -> HeadOutput:
        parts = []
        for name in self.names:
            v, present = self.summarise(name, batch[name])
            z = fill_absent(self.proj[name](v), present, self.absent[name])
            parts += [z, present[:, None].to(z.dtype)]
        if self.cond is not None:
            z, present = self.cond(batch["cond"])
            parts += [z, present[:, None].to(z.dtype)]
        return HeadOutput(self.head(torch.cat(parts, dim=-1)))
