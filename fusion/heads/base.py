"""What every fusion head receives: an InputSpec (which modalities, their dims) and batches.

A batch is a dict: for each input modality m, batch[m] = {"pooled": [B, Dp] float,
"present": [B] bool, and for sequence modalities "seq": [B, T, D] float, "len": [B] long}.
batch["cond"] (when the feature set has a conditioning vector, e.g. the title embedding) has
the same keys as a vector modality. Absent rows have present=False: heads must mask them.

Every head derives from `FusionHead` (at the end of this file), whose defaults a head
overrides where it needs to:

* `forward(batch) -> HeadOutput` — the logits [B, n_out], and in `aux` any per-branch logits
  with the rows each branch saw (late / hybrid heads: name -> (logits [B, n_out], present [B])),
  which the trainer scores and may add to the loss (`aux_weight`). Nothing is kept on the module.
* `seq_inputs: tuple[str, ...] | None` — the modalities whose "seq"/"len" the head reads; a
  trainer may leave the sequences of the others unloaded. None (the default): every sequence.
* `prepare(data) -> data` — called once on the full, raw (not yet standardised) tensors of a
  fit, before folds and mini-batches are cut from them: parameter-free work the head would
  otherwise redo every step. The default does the window averaging of the head's `Tokens`
  (none: data unchanged), stored under keys of their own. It must depend only on the head's
  configuration, never on its parameters, so one result serves every fold and seed, and the
  head must give the same outputs on prepared rows as on raw ones. The trainer standardises the
  result per fold: `pooled` as usual, and `seq@<w>` keys with their sequence's statistics
  (valid windows counted by `len@<w>`), which is exact because window averages (weights summing
  to one) commute with per-feature affine scaling.
* `after_fit(val_batch, val_y)` — called once the best state is restored, on the validation
  rows (the late head fits its stacking meta-learner there); the default does nothing.

The input description, `InputSpec` / `ModalitySpec`, lives in fusion/data.py (the feature set
makes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.data import InputSpec, ModalitySpec

# ---------------------------------------------------------------------------------------------
# Building blocks shared by the heads. Two rules run through all of them:
#  * data that is not data (absent rows, positions at or after `len`) is excluded by masks: it is
#    zeroed (masked_fill) or given weight exactly 0 (window averages), and the zeros are never
#    counted as input — absent rows get learned "absent" embeddings, means divide by valid counts;
#  * no attention or softmax ever sees a row with every key masked: attention layers carry a
#    learned "null" key/value and masked softmaxes return zeros for empty rows.
# ---------------------------------------------------------------------------------------------


def check_spec(spec: InputSpec) -> None:
    """Fail early with a readable message on an unusable spec."""
    if not spec.modalities:
        raise ValueError("InputSpec.modalities is empty: a head needs at least one modality")
    names = spec.names
    if len(set(names)) != len(names):
        raise ValueError(f"InputSpec.modalities has duplicate names: {names}")
    if "cond" in names:
        raise ValueError("'cond' is reserved for InputSpec.cond, not a modality name")


def presence(x: dict, ref: Tensor) -> Tensor:
    """The [B] bool `present` mask of one modality's batch entry (on ref's device)."""
    return x["present"].to(device=ref.device, dtype=torch.bool)


def valid_positions(x: dict) -> Tensor:
    """[B, T] bool: True at real time steps (row present and position < len)."""
    seq = x["seq"]
    t = torch.arange(seq.shape[1], device=seq.device)
    return presence(x, seq)[:, None] & (t[None, :] < x["len"].to(seq.device)[:, None])


def clean_pooled(x: dict, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(pooled with absent rows zeroed, present [B]) for a vector input."""
    v = x["pooled"].to(dtype)
    present = presence(x, v)
    return v.masked_fill(~present[:, None], 0.0), present


def clean_seq(x: dict, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(seq with non-data zeroed, valid [B, T], present [B]) for a sequence input.

    A row marked present but with len == 0 has no data and is reported as not present.
    """
    seq = x["seq"].to(dtype)
    valid = valid_positions(x)
    return seq.masked_fill(~valid[..., None], 0.0), valid, valid.any(dim=1)


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of x [B, L, D] over positions where valid [B, L]; zeros for rows with none."""
    n = valid.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
    return x.masked_fill(~valid[..., None], 0.0).sum(dim=1) / n


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over entries where mask is True; exactly 0 elsewhere and for all-masked rows."""
    any_ = mask.any(dim=dim, keepdim=True)
    s = scores.masked_fill(~mask, float("-inf"))
    s = torch.where(any_, s, torch.zeros_like(s))  # empty rows: finite, zeroed below
    w = torch.softmax(s, dim=dim)
    return torch.where(mask, w, torch.zeros_like(w))


def fill_absent(z: Tensor, present: Tensor, token: Tensor) -> Tensor:
    """Rows of z [B, H] where present is False are replaced by the learned token [H]."""
    return torch.where(present[:, None], z, token.expand_as(z))


def mlp(d_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: the classifier every head ends with."""
    return nn.Sequential(
        nn.LayerNorm(d_in),
        nn.Linear(d_in, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_out),
    )


class Dropout(nn.Dropout):
    """nn.Dropout with its mask drawn by torch.rand: the same distribution, about twice as fast
    on a CPU as the bernoulli_ sampling nn.Dropout uses (it is a tenth of an attention head's
    training step)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep.mul_(1.0 / (1.0 - self.p))


class AttentionPool(nn.Module):
    """Learned attention pooling over time: score_t = w . tanh(W x_t), masked softmax, sum."""

    def __init__(self, dim: int, attn_dim: int = 64):
        super().__init__()
        self.proj = nn.Linear(dim, attn_dim)
        self.score = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        w = masked_softmax(self.score(torch.tanh(self.proj(x))).squeeze(-1), valid)
        return (w[..., None] * x.masked_fill(~valid[..., None], 0.0)).sum(dim=1)


class VectorEncoder(nn.Module):
    """A vector input -> [B, hidden]: LayerNorm + Linear, a learned embedding for absent rows."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden))
        self.absent = nn.Parameter(torch.randn(hidden) * 0.02)

    def forward(self, x: dict) -> tuple[Tensor, Tensor]:
        v, present = clean_pooled(x, self.absent.dtype)
        return fill_absent(self.proj(v), present, self.absent), present


def window_weights(valid: Tensor, window: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Weights [B, T', T] that average the valid steps of each window, and valid [B, T'].

    Window j covers steps [j*w, (j+1)*w), whatever T is, so trailing padding never shifts
    windows; a window with no valid step is invalid (all-zero weights). `weights @ seq` reads
    the sequence once and gives every non-data step weight exactly 0.
    """
    t = valid.shape[1]
    n = -(-t // window)
    steps = torch.arange(t, device=valid.device)
    member = (steps[None, :] // window) == torch.arange(n, device=valid.device)[:, None]
    member = member[None] & valid[:, None, :]  # [B, T', T]
    count = member.sum(dim=-1)
    return member.to(dtype) / count.clamp(min=1)[..., None].to(dtype), count > 0


def relative_windows(x: Mapping[str, Tensor], k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """([B, k, D] means of k equal parts of each row's valid steps, has_steps [B]).

    Part j covers [j*n/k, (j+1)*n/k) of a row's n valid steps, in the row's own time: the
    first part is the clip's beginning whatever its length. A step split between two parts
    counts in each by its share, so no part is empty while n >= 1 (n = 1: every part is that
    step). The weights of a part sum to 1, so per-feature scaling commutes with it. Rows
    without a valid step (absent, len 0) are zeros with has_steps False.
    """
    seq = x["seq"]
    valid = valid_positions(x)
    n = valid.sum(dim=1).to(torch.float64)  # [B]
    t = torch.arange(seq.shape[1], device=seq.device, dtype=torch.float64)
    j = torch.arange(k, device=seq.device, dtype=torch.float64)
    lo, hi = (j[None] * n[:, None] / k), ((j[None] + 1) * n[:, None] / k)  # [B, k]
    overlap = (torch.minimum(t + 1, hi[..., None]) - torch.maximum(t, lo[..., None])).clamp(min=0)
    weights = overlap / (n / k).clamp(min=1e-12)[:, None, None]  # [B, k, T], rows sum to 1
    data = seq.to(dtype).masked_fill(~valid[..., None], 0.0)
    return weights.to(dtype) @ data, n > 0


class Tokens(nn.Module):
    """One modality as tokens: ([B, L, hidden], pad [B, L] True = ignore, present [B]).

    A sequence modality gives its time steps — averaged over fixed windows of valid steps when
    max_len exceeds `max_tokens`, so attention stays cheap — through LayerNorm + Linear plus
    learned positions; a vector modality (or use_seq=False) gives a single token from the pooled
    vector. Absent rows and padding are zeroed and flagged in `pad`, so attention and pooling
    skip them.

    `prepare` does the window averaging once for a whole data set (under the keys `seq@<w>` /
    `len@<w>`, w the window); `forward` reads those when present, with the same result as
    averaging the raw steps of each batch.
    """

    def __init__(
        self,
        m: ModalitySpec,
        hidden: int,
        use_seq: bool = True,
        max_tokens: int | None = None,
        pooled_token: bool = False,
    ):
        super().__init__()
        self.name = m.name
        self.use_seq = use_seq and m.is_sequence
        # A sequence's pooled vector (the set's own summary of the clip: for audio the eGeMAPS
        # functionals and log-mel statistics, richer than any average of the low-level
        # descriptors) as one more, global token before the time steps.
        self.global_proj: nn.Module | None = None
        if self.use_seq and pooled_token:
            self.global_proj = nn.Sequential(nn.LayerNorm(m.pooled_dim),
                                             nn.Linear(m.pooled_dim, hidden))
            self.global_pos = nn.Parameter(torch.randn(hidden) * 0.02)
        self.max_len = m.max_len
        self.window = 1
        if self.use_seq and max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
            self.window = -(-m.max_len // max_tokens)  # ceil
        self.n_tokens = -(-m.max_len // self.window) if self.use_seq else 1
        self.n_out_tokens = self.n_tokens + (self.global_proj is not None)
        d_in = m.seq_dim if self.use_seq else m.pooled_dim
        self.proj = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden))
        if self.use_seq:
            self.pos = nn.Parameter(torch.randn(self.n_tokens, hidden) * 0.02)

    @property
    def keys(self) -> tuple[str, str]:
        """Where `prepare` puts the window averages and their counts of valid windows."""
        return f"seq@{self.window}", f"len@{self.window}"

    @torch.no_grad()
    def prepare(self, x: Mapping[str, Tensor], chunk: int = 1024) -> dict[str, Tensor]:
        """This modality's entry for all rows, with only what `forward` reads.

        A vector token drops the sequence; a windowed sequence is replaced by its window
        averages [N, T', D] (non-data windows exactly zero) and the number of valid windows
        (valid steps form a prefix, so valid windows do too). Present flags stay as they are:
        a trainer may still mark rows absent later (modality dropout).
        """
        out = {k: v for k, v in x.items() if k not in ("seq", "len")}
        if not self.use_seq:
            return out
        if self.window == 1:
            return dict(x)
        seq = x["seq"]
        dtype = self.proj[1].weight.dtype
        if seq.shape[1] > self.max_len:
            raise ValueError(f"{self.name}: sequence length {seq.shape[1]} exceeds max_len "
                             f"{self.max_len}")
        n = seq.shape[0]
        pooled = seq.new_zeros((n, -(-seq.shape[1] // self.window), seq.shape[2]), dtype=dtype)
        count = torch.zeros(n, dtype=torch.long, device=seq.device)
        for i in range(0, n, chunk):
            part = {"seq": seq[i:i + chunk], "len": x["len"][i:i + chunk],
                    "present": x["present"][i:i + chunk]}
            weights, valid = window_weights(valid_positions(part), self.window, dtype)
            pooled[i:i + chunk] = weights @ part["seq"].to(dtype)
            count[i:i + chunk] = valid.sum(dim=1)
        key_seq, key_len = self.keys
        out[key_seq], out[key_len] = pooled, count
        return out

    def forward(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        dtype = self.proj[1].weight.dtype
        if not self.use_seq:
            v, present = clean_pooled(x, dtype)
            return self.proj(v)[:, None, :], ~present[:, None], present
        toks, pad, present = self.seq_tokens(x, dtype)
        if self.global_proj is None:
            return toks, pad, present
        v, has = clean_pooled(x, dtype)
        g = self.global_proj(v) + self.global_pos
        return torch.cat([g[:, None], toks], dim=1), torch.cat([~has[:, None], pad], 1), present | has

    def seq_tokens(self, x: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The time-step tokens of a sequence modality (windowed), their pad mask and presence."""
        key_seq, key_len = self.keys
        if self.window > 1 and key_seq in x:  # prepared: windows averaged already
            seq = x[key_seq].to(dtype)
            if seq.shape[1] > self.n_tokens:
                raise ValueError(f"{self.name}: {seq.shape[1]} prepared windows exceed "
                                 f"{self.n_tokens}")
            valid = valid_positions({"seq": seq, "len": x[key_len], "present": x["present"]})
            return self.proj(seq) + self.pos[: seq.shape[1]], ~valid, valid.any(dim=1)
        t = x["seq"].shape[1]
        if t > self.max_len:
            raise ValueError(f"{self.name}: sequence length {t} exceeds max_len {self.max_len}")
        if self.window == 1:
            seq, valid, present = clean_seq(x, dtype)
        else:
            valid = valid_positions(x)
            present = valid.any(dim=1)
            weights, valid = window_weights(valid, self.window, dtype)
            seq = weights @ x["seq"].to(dtype)
        return self.proj(seq) + self.pos[: seq.shape[1]], ~valid, present


def token_inputs(tokens: Mapping[str, Tokens]) -> tuple[str, ...]:
    """The modalities whose sequences these Tokens read (a head's `seq_inputs`)."""
    return tuple(name for name, tok in tokens.items() if tok.use_seq)


def prepare_tokens(tokens: Mapping[str, Tokens], data: Mapping[str, Mapping]) -> dict:
    """`data` (all rows) with each tokenised modality prepared by its Tokens (see `prepare`)."""
    out = dict(data)
    for name, tok in tokens.items():
        if name in out:
            out[name] = tok.prepare(out[name])
    return out


class Attention(nn.Module):
    """Multi-head attention of queries x [B, Lq, H] over keys/values ctx [B, Lk, H].

    Keys where ctx_pad [B, Lk] is True are masked. A learned "null" key/value pair is always
    attendable, so a row whose keys are all masked (an absent modality) reads the null value
    instead of producing NaN — and a query that finds nothing relevant has somewhere to go.
    """

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.null_kv = nn.Parameter(torch.randn(2, 1, 1, dim) * 0.02)

    def forward(self, x: Tensor, ctx: Tensor, ctx_pad: Tensor) -> Tensor:
        b, lq, dim = x.shape
        k, v = self.kv(ctx).chunk(2, dim=-1)
        k = torch.cat([self.null_kv[0].expand(b, 1, dim), k], dim=1)
        v = torch.cat([self.null_kv[1].expand(b, 1, dim), v], dim=1)
        keep = torch.cat([torch.ones_like(ctx_pad[:, :1]), ~ctx_pad], dim=1)  # [B, 1 + Lk]

        def split(t: Tensor) -> Tensor:  # [B, L, H] -> [B, heads, L, H / heads]
            return t.view(b, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(k), split(v), attn_mask=keep[:, None, None, :]
        )
        return self.out(y.transpose(1, 2).reshape(b, lq, dim))


class Block(nn.Module):
    """Pre-norm transformer block: attention then feed-forward, both residual.

    Self-attention when `ctx` is None, otherwise cross-attention (queries from x, keys and
    values from ctx, masked by ctx_pad). `pad` marks x's own padding (its keys in
    self-attention); outputs at padded positions are meaningless and must be masked by callers.
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1, cross: bool = False):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim, heads)
        self.drop = Dropout(dropout)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(
        self, x: Tensor, pad: Tensor, ctx: Tensor | None = None, ctx_pad: Tensor | None = None
    ) -> Tensor:
        q = self.ln_q(x)
        if ctx is None:
            kv, kv_pad = q, pad
        else:
            assert self.ln_kv is not None and ctx_pad is not None, "cross block needs ctx_pad"
            kv, kv_pad = self.ln_kv(ctx), ctx_pad
        x = x + self.drop(self.attn(q, kv, kv_pad))
        return x + self.drop(self.ff(self.ln_ff(x)))


@dataclass
class HeadOutput:
    """What a head's forward returns: logits [B, n_out], and per-branch side outputs `aux`
    (branch name -> (logits [B, n_out], present [B] bool): the rows that branch had input)."""

    logits: Tensor
    aux: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


class FusionHead(nn.Module):
    """Base class of the fusion heads: `Head(spec, n_out, **options)`, `forward(batch) ->
    HeadOutput`, with the defaults of the optional hooks (see the module docstring)."""

    seq_inputs: tuple[str, ...] | None = None  # None: reads every sequence

    def forward(self, batch: dict) -> HeadOutput:
        raise NotImplementedError

    def prepare(self, data: dict) -> dict:
        """Window-average once, for all rows, the sequences this head's Tokens read (see
        Tokens.prepare); data as it is for a head without Tokens."""
        tokens = {t.name: t for t in self.modules() if isinstance(t, Tokens)}
        return prepare_tokens(tokens, data) if tokens else data

    def after_fit(self, val_batch: dict, val_y: Tensor) -> None:
        """Hook after training (best state restored) with the validation rows: nothing here."""

    def add_pooled(self, logits: Tensor, batch: dict) -> Tensor:
        """The head's own logits combined with its residual pooled path (`self.pooled_path`, a
        PooledPath), when it has one: pooled logits + seq_gate * the head's logits, the gate a
        learned scalar starting at 0 (as in ReZero), so training starts from early fusion and the
        sequence path enters as far as it helps — on a few dozen real clips an untrained
        attention path otherwise adds noise to a decision early fusion gets right."""
        path = getattr(self, "pooled_path", None)
        return logits if path is None else path(batch) + self.seq_gate * logits


POOLED_MODES = ("both", "token", "residual", "none")


def pooled_mode(head: str, pooled: str) -> tuple[bool, bool]:
    """(global token?, residual path?) for a sequence head's `pooled` option."""
    if pooled not in POOLED_MODES:
        raise ValueError(f"{head}: pooled must be one of {POOLED_MODES}, got {pooled!r}")
    return pooled in ("both", "token"), pooled in ("both", "residual")


class PooledPath(nn.Module):
    """The residual pooled path of a sequence head: every present modality's pooled vector (and
    the conditioning vector), each LayerNorm + Linear with its presence flag (a learned "absent"
    embedding for absent rows), concatenated -> MLP -> logits that the head adds to its own.

    It is early fusion's computation inside the sequence head, so a sequence head always has at
    least what early fusion reads; its sequence path then only has to learn what the pooled
    vectors miss. Cheap: one vector per modality, no attention.
    """

    def __init__(self, spec: InputSpec, hidden: int, n_out: int, dropout: float):
        super().__init__()
        self.names = spec.names
        self.enc = nn.ModuleDict({m.name: VectorEncoder(m.pooled_dim, hidden)
                                  for m in spec.modalities})
        self.cond = VectorEncoder(spec.cond.pooled_dim, hidden) if spec.cond else None
        n_in = len(self.names) + (self.cond is not None)
        self.head = mlp(n_in * (hidden + 1), hidden, n_out, dropout)

    def forward(self, batch: dict) -> Tensor:
        parts: list[Tensor] = []
        encs = [(self.enc[n], batch[n]) for n in self.names]
        if self.cond is not None:
            encs.append((self.cond, batch["cond"]))
        for enc, x in encs:
            z, present = enc(x)
            parts += [z, present[:, None].to(z.dtype)]
        return self.head(torch.cat(parts, dim=-1))
