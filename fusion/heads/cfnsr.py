"""CFN-SR-style fusion: self-attention on the audio, then a residual cross-modal block.

After the cross-modal fusion network with self-attention and residual structure (CFN-SR, Fu et
al. 2021): the audio sequence (the "anchor") is first refined by self-attention over its own
time steps; then, in a residual cross-modal block, the audio steps attend to the tokens of all
other modalities together (their sequences, or one token for a vector modality; each masked by
its own padding and presence), and the result is added back to the audio stream, so the other
modalities enrich the audio representation without replacing it. The fused audio (mean over its
valid steps), the other modalities' own pooled tokens and the conditioning vector (if any) are
concatenated and classified by an MLP; absent inputs use learned "absent" embeddings.

When the spec has no audio, the anchor falls back to the first sequence modality in the spec
(or its first modality), so the head still works on every subset.
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


class CrossFusionSR(FusionHead):
    def __init__(
        self,
        spec: InputSpec,
        n_out: int,
        hidden: int = 32,
        dropout: float = 0.2,
        heads: int = 2,
        max_tokens: int = 4,
        anchor: str = "audio",
        layers: int = 1,
        pooled: str = "both",
        pooled_hidden: int = 128,
    ):
        super().__init__()
        check_spec(spec)
        token, residual = pooled_mode("cfnsr", pooled)
        if not 1 <= layers <= 4:
            raise ValueError(f"cfnsr: layers must be in 1..4, got {layers}")
        if anchor not in spec.names:
            seqs = [m.name for m in spec.modalities if m.is_sequence]
            anchor = (seqs or list(spec.names))[0]
        self.anchor = anchor
        self.others = tuple(n for n in spec.names if n != anchor)
        self.tokens = nn.ModuleDict(
            {m.name: Tokens(m, hidden, max_tokens=max_tokens, pooled_token=token) for m in spec.modalities}
        )
        self.seq_inputs = token_inputs(self.tokens)
        self.self_attn = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(layers))
        self.cross = nn.ModuleList(
            Block(hidden, heads, dropout, cross=True) for _ in range(layers if self.others else 0)
        )
        names = (anchor, *self.others)
        self.absent = nn.ParameterDict({n: nn.Parameter(torch.randn(hidden) * 0.02) for n in names})
        self.cond = VectorEncoder(spec.cond.pooled_dim, hidden) if spec.cond else None
        n_in = len(names) + (self.cond is not None)
        self.head = mlp(n_in * hidden, hidden, n_out, dropout)
        self.pooled_path = PooledPath(spec, pooled_hidden, n_out, dropout) if residual else None
        self.seq_gate = nn.Parameter(torch.zeros(()))  # see FusionHead.add_pooled

    def forward(self, batch: dict) -> HeadOutput:
        xa, pa, ya = self.tokens[self.anchor](batch[self.anchor])
        for block in self.self_attn:
            xa = block(xa, pa)
        parts: list[Tensor] = []
        if self.others:
            toks = [self.tokens[n](batch[n]) for n in self.others]
            ctx = torch.cat([x for x, _, _ in toks], dim=1)
            ctx_pad = torch.cat([p for _, p, _ in toks], dim=1)
            for block in self.cross:
                xa = block(xa, pa, ctx, ctx_pad)  # residual inside the block
            for n, (x, p, y) in zip(self.others, toks):
                parts.append(fill_absent(masked_mean(x, ~p), y, self.absent[n]))
        fused = fill_absent(masked_mean(xa, ~pa), ya, self.absent[self.anchor])
        parts.insert(0, fused)
        if self.cond is not None:
            parts.append(self.cond(batch["cond"])[0])
        return HeadOutput(self.add_pooled(self.head(torch.cat(parts, dim=-1)), batch))
