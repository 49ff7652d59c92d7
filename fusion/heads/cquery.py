"""Conditional-query fusion, after CHFEN's conditional query.

In user-generated video the title (or, in dialogue, the preceding context or the speaker's
profile) says what a clip is about. Here that conditioning vector, projected to `hidden`, is
the query of a multi-head cross-attention over each modality's own time sequence (padding
masked), so the context decides which moments of the audio, text and face to read before the
modalities are fused. Because every modality is read through the same query and contributes one
vector of the same size, a dominant modality cannot simply drown out the others — the
counter-imbalance role the conditional query plays in CHFEN.

The attended vectors of present modalities (a learned "absent" embedding otherwise) and the
query are concatenated and classified by an MLP. When the feature set has no conditioning
vector, or a row's is absent, a learned query stands in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusion.data import InputSpec
from fusion.heads.base import (
    Attention,
    FusionHead,
    HeadOutput,
    PooledPath,
    Tokens,
    check_spec,
    clean_pooled,
    fill_absent,
    mlp,
    pooled_mode,
    token_inputs,
)


class ConditionalQueryFusion(FusionHead):
    def __init__(
        self,
        spec: InputSpec,
        n_out: int,
        hidden: int = 64,
        dropout: float = 0.2,
        heads: int = 4,
        max_tokens: int = 8,
        pooled: str = "both",
        pooled_hidden: int = 128,
    ):
        super().__init__()
        check_spec(spec)
        token, residual = pooled_mode("cquery", pooled)
        self.names = spec.names
        self.query_proj: nn.Module | None = None
        if spec.cond is not None:
            d = spec.cond.pooled_dim
            self.query_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden))
        self.learned_query = nn.Parameter(torch.randn(hidden) * 0.02)
        self.tokens = nn.ModuleDict(
            {m.name: Tokens(m, hidden, max_tokens=max_tokens, pooled_token=token) for m in spec.modalities}
        )
        self.seq_inputs = token_inputs(self.tokens)
        self.ln_kv = nn.ModuleDict({name: nn.LayerNorm(hidden) for name in self.names})
        self.attn = nn.ModuleDict({name: Attention(hidden, heads) for name in self.names})
        self.absent = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(hidden) * 0.02) for name in self.names}
        )
        self.head = mlp((len(self.names) + 1) * hidden, hidden, n_out, dropout)
        self.pooled_path = PooledPath(spec, pooled_hidden, n_out, dropout) if residual else None
        self.seq_gate = nn.Parameter(torch.zeros(()))  # see FusionHead.add_pooled

    def query(self, batch: dict) -> Tensor:
        """[B, hidden]: the projected conditioning vector, or the learned query where absent."""
        if self.query_proj is None:
            b = batch[self.names[0]]["present"].shape[0]
            return self.learned_query.expand(b, -1)
        c, present = clean_pooled(batch["cond"], self.learned_query.dtype)
        return fill_absent(self.query_proj(c), present, self.learned_query)

    def forward(self, batch: dict) -> HeadOutput:
        q = self.query(batch)
        parts: list[Tensor] = []
        for name in self.names:
            x, pad, present = self.tokens[name](batch[name])
            kv = self.ln_kv[name](x)
            a = self.attn[name](q[:, None], kv, pad)[:, 0]
            parts.append(fill_absent(a, present, self.absent[name]))
        return HeadOutput(self.add_pooled(self.head(torch.cat([q, *parts], dim=-1)), batch))
