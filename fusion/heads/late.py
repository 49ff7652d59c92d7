"""Late (decision-level) fusion: one classifier per modality, decisions combined.

Each modality (and the conditioning vector, when the feature set has one) gets its own small
classifier on its pooled vector; only the classifiers of present modalities take part in the
combination, which is one of:

* "mean":       the plain average of the present classifiers' logits;
* "learned":    a softmax over learned per-modality weights, renormalised over present ones;
* "confidence": per row, each classifier is weighted by its confidence (1 - normalised entropy
                of its predicted distribution; detached) through a softmax with a learned
                temperature, so a sure modality outvotes an unsure one (classification only);
* "stacking":   a multinomial logistic regression (ridge regression for n_out == 1) on the
                concatenated per-modality probabilities and presence flags, fitted in
                `after_fit` on validation predictions; until then the head averages ("mean").

Rows with no present input return a learned prior. The per-modality logits come back in the
output's `aux` (name -> (logits [B, n_out], present [B])), so a trainer can add per-modality
auxiliary losses on the present rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.data import InputSpec
from fusion.heads.base import FusionHead, HeadOutput, check_spec, clean_pooled, masked_softmax, mlp

COMBINES = ("mean", "learned", "confidence", "stacking")


class LateFusion(FusionHead):
    def __init__(
        self,
        spec: InputSpec,
        n_out: int,
        hidden: int = 128,
        dropout: float = 0.2,
        combine: str = "mean",
        stack_l2: float = 1e-3,
    ):
        super().__init__()
        check_spec(spec)
        if combine not in COMBINES:
            raise ValueError(f"late: combine must be one of {COMBINES}, got {combine!r}")
        if combine == "confidence" and n_out < 2:
            raise ValueError("late: combine='confidence' needs class probabilities (n_out >= 2)")
        self.combine = combine
        self.n_out = n_out
        self.stack_l2 = stack_l2
        inputs = [(m.name, m.pooled_dim) for m in spec.modalities]
        if spec.cond is not None:
            inputs.append(("cond", spec.cond.pooled_dim))
        self.names = tuple(name for name, _ in inputs)
        self.seq_inputs: tuple[str, ...] = ()  # pooled vectors only: no sequence is loaded
        self.clf = nn.ModuleDict({name: mlp(d, hidden, n_out, dropout) for name, d in inputs})
        self.prior = nn.Parameter(torch.zeros(n_out))  # answer when nothing is present
        k = len(inputs)
        if combine == "learned":
            self.weight_logits = nn.Parameter(torch.zeros(k))
        if combine == "confidence":
            self.log_temp = nn.Parameter(torch.tensor(math.log(4.0)))
        # Stacking meta-learner: fitted in closed loop by after_fit, not by the optimiser.
        n_feat = k * (n_out + 1)
        self.register_buffer("stack_w", torch.zeros(n_feat, n_out))
        self.register_buffer("stack_b", torch.zeros(n_out))
        self.register_buffer("stacked", torch.tensor(False))

    def unimodal(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Per-input logits [B, k, n_out] and presence [B, k]."""
        logits, present = [], []
        for name in self.names:
            v, p = clean_pooled(batch[name], self.prior.dtype)
            logits.append(self.clf[name](v))
            present.append(p)
        return torch.stack(logits, dim=1), torch.stack(present, dim=1)

    def stack_features(self, logits: Tensor, present: Tensor) -> Tensor:
        """[B, k * (n_out + 1)]: each input's probabilities (scores) zeroed if absent + flag."""
        p = logits.softmax(dim=-1) if self.n_out > 1 else logits
        p = torch.where(present[..., None], p, torch.zeros_like(p))
        return torch.cat([p, present[..., None].to(p.dtype)], dim=-1).flatten(1)

    def forward(self, batch: dict) -> HeadOutput:
        logits, present = self.unimodal(batch)
        aux = {name: (logits[:, i], present[:, i]) for i, name in enumerate(self.names)}
        if self.combine == "stacking" and bool(self.stacked):
            return HeadOutput(self.stack_features(logits, present) @ self.stack_w + self.stack_b,
                              aux)
        if self.combine == "learned":
            w = masked_softmax(self.weight_logits.expand_as(present), present)
        elif self.combine == "confidence":
            probs = logits.detach().softmax(dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
            confidence = 1.0 - entropy / math.log(self.n_out)
            w = masked_softmax(self.log_temp.exp() * confidence, present)
        else:  # "mean", and "stacking" before after_fit
            w = masked_softmax(torch.zeros_like(present, dtype=logits.dtype), present)
        out = (w[..., None] * logits).sum(dim=1)
        nothing = ~present.any(dim=1)
        return HeadOutput(torch.where(nothing[:, None], self.prior.expand_as(out), out), aux)

    def after_fit(self, val_batch: dict, val_y: Tensor) -> None:
        """Fit the stacking meta-learner on validation predictions (no-op for other combines)."""
        if self.combine != "stacking":
            return
        was_training = self.training
        self.eval()
        with torch.no_grad():
            feats = self.stack_features(*self.unimodal(val_batch))
        self.train(was_training)
        if feats.shape[0] == 0:
            raise ValueError("late: after_fit got an empty validation set")
        w = torch.zeros_like(self.stack_w, requires_grad=True)
        b = torch.zeros_like(self.stack_b, requires_grad=True)
        if self.n_out > 1:
            y = val_y.to(feats.device).long().view(-1)

            def data_loss(out: Tensor) -> Tensor:
                return F.cross_entropy(out, y)
        else:
            y = val_y.to(feats.device, feats.dtype).view(-1, 1)

            def data_loss(out: Tensor) -> Tensor:
                return F.mse_loss(out, y)

        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = data_loss(feats @ w + b) + self.stack_l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.stack_w.copy_(w.detach())
        self.stack_b.copy_(b.detach())
        self.stacked.fill_(True)
