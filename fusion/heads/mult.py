"""MulT-lite: a one-layer Multimodal Transformer (after Tsai et al. 2019, MulT).

MulT fuses unaligned sequences with crossmodal attention: for every target modality and every
other (source) modality, a crossmodal transformer block lets the target's time steps attend to
the source's time steps (keys/values from the source, masked by its padding), so the target is
repeatedly "reinforced" by the others without any alignment. Here each such block is one layer;
per target, the source-reinforced sequences are concatenated along features, projected back to
`hidden`, passed through one self-attention block, and mean-pooled over the target's valid
steps. Vector modalities take part as one-token sequences. The pooled targets (a learned
"absent" embedding for absent rows) and the projected conditioning vector, if any, are
concatenated and classified by an MLP.
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
    fill_absent,
    masked_mean,
    mlp,
    pooled_mode,
    token_inputs,
)


class MulTLite(FusionHead):
    def __init__(
        self,
        spec: InputSpec,
        n_out: int,
        hidden: int = 32,
        dropout: float = 0.2,
        heads: int = 2,
        max_tokens: int = 4,
        pooled: str = "both",
        pooled_hidden: int = 128,
    ):
        super().__init__()
        check_spec(spec)
        token, residual = pooled_mode("mult", pooled)
        self.names = spec.names
        self.tokens = nn.ModuleDict(
            {m.name: Tokens(m, hidden, max_tokens=max_tokens, pooled_token=token) for m in spec.modalities}
        )
        self.seq_inputs = token_inputs(self.tokens)
        self.cross = nn.ModuleDict(
            {
                f"{t}<-{s}": Block(hidden, heads, dropout, cross=True)
                for t in self.names
                for s in self.names
                if s != t
            }
        )
        k = len(self.names)
        self.merge = nn.ModuleDict(
            {t: nn.Linear(max(k - 1, 1) * hidden, hidden) for t in self.names}
        )
        self.self_attn = nn.ModuleDict({t: Block(hidden, heads, dropout) for t in self.names})
        self.absent = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(hidden) * 0.02) for t in self.names}
        )
        self.cond = VectorEncoder(spec.cond.pooled_dim, hidden) if spec.cond else None
        n_in = k + (self.cond is not None)
        self.head = mlp(n_in * hidden, hidden, n_out, dropout)
        self.pooled_path = PooledPath(spec, pooled_hidden, n_out, dropout) if residual else None
        self.seq_gate = nn.Parameter(torch.zeros(()))  # see FusionHead.add_pooled

    def forward(self, batch: dict) -> HeadOutput:
        toks = {name: self.tokens[name](batch[name]) for name in self.names}
        parts: list[Tensor] = []
        for t, (xt, pt, yt) in toks.items():
            reinforced = [
                self.cross[f"{t}<-{s}"](xt, pt, xs, ps) for s, (xs, ps, _) in toks.items() if s != t
            ] or [xt]  # a single modality is only self-attended
            h = self.self_attn[t](self.merge[t](torch.cat(reinforced, dim=-1)), pt)
            parts.append(fill_absent(masked_mean(h, ~pt), yt, self.absent[t]))
        if self.cond is not None:
            parts.append(self.cond(batch["cond"])[0])
        return HeadOutput(self.add_pooled(self.head(torch.cat(parts, dim=-1)), batch))
