"""Behaviour of every fusion head: shapes on every modality subset, masking of absent rows and
padding, gradient flow, learning a small separable problem, and head-specific behaviour."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from fusion.data import InputSpec, ModalitySpec
from fusion.heads import HEADS, build_head, head_options
from fusion.heads.base import window_weights
from fusion.heads.tfn import auto_dim

# name: (seq_dim, pooled_dim, max_len); meta is a vector modality
DIMS = {"audio": (6, 10, 12), "text": (8, 12, 10), "visual": (5, 9, 8), "meta": (0, 7, 0)}
MODALITIES = tuple(DIMS)
COND = ModalitySpec("cond", pooled_dim=9)
SUBSETS = [c for r in range(1, 5) for c in itertools.combinations(MODALITIES, r)]
# linear="off": these tests are about each head's own computation; the linear path that every
# registered head has by default (its output is exactly 0 at initialisation) is tested in
# tests/fusion/test_heads_linear.py
SMALL = {"hidden": 32, "dropout": 0.1, "linear": "off"}

CONFIGS = [
    ("early", {"pool": "pooled"}),
    ("early", {"pool": "mean"}),
    ("early", {"pool": "attention"}),
    ("late", {"combine": "mean"}),
    ("late", {"combine": "learned"}),
    ("late", {"combine": "confidence"}),
    ("late", {"combine": "stacking"}),
    ("hybrid", {}),
    ("cquery", {}),
    ("tfn", {}),
    ("mult", {}),
    ("cfnsr", {}),
]
IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in CONFIGS]
configs = pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=IDS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_spec(names=MODALITIES, cond: bool = True) -> InputSpec:
    mods = tuple(ModalitySpec(n, DIMS[n][1], DIMS[n][0], DIMS[n][2]) for n in names)
    return InputSpec(modalities=mods, cond=COND if cond else None)


def make_head(name: str, opts: dict, spec: InputSpec, n_out: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return build_head(name, spec, n_out, **SMALL, **opts)


def make_batch(spec: InputSpec, b: int, g: torch.Generator, p_absent: float = 0.0) -> dict:
    """Random batch in the trainer's format: zero padding after len, zeros in absent rows."""
    batch = {}
    for m in (*spec.modalities, *([spec.cond] if spec.cond else [])):
        present = torch.rand(b, generator=g) >= p_absent
        x = {"pooled": torch.randn(b, m.pooled_dim, generator=g), "present": present}
        if m.is_sequence:
            lens = torch.randint(1, m.max_len + 1, (b,), generator=g)
            seq = torch.randn(b, m.max_len, m.seq_dim, generator=g)
            seq[torch.arange(m.max_len)[None, :] >= lens[:, None]] = 0.0
            x["seq"], x["len"] = seq, lens
        for key in ("pooled", "seq"):
            if key in x:
                x[key][~present] = 0.0
        if m.is_sequence:
            x["len"] = torch.where(present, x["len"], torch.zeros_like(x["len"]))
        batch["cond" if m is spec.cond else m.name] = x
    return batch


def run(head, batch: dict) -> torch.Tensor:
    head.eval()
    with torch.no_grad():
        return head(batch).logits


# ---- registry and construction --------------------------------------------------------------


def test_registry_has_the_interface_heads():
    assert set(HEADS) == {"early", "late", "hybrid", "cquery", "tfn", "mult", "cfnsr"}
    for name in HEADS:
        opts = head_options(name)
        # the token and tensor heads are sized for a CPU fit of a 10k-clip set in seconds: the
        # heads with several attention blocks per modality (hybrid, mult, cfnsr) are the smallest
        small = name in ("hybrid", "mult", "cfnsr")
        want = 128 if name in ("early", "late") else 32 if small else 64
        assert opts["hidden"] == want, name
        assert opts["dropout"] == 0.2
        if "max_tokens" in opts:
            assert opts["max_tokens"] == (4 if small else 8), name
        if "heads" in opts:
            assert opts["heads"] == (2 if small else 4), name


def test_build_head_rejects_unknown_name_and_options():
    spec = make_spec()
    with pytest.raises(ValueError, match="unknown fusion head 'nope'.*early"):
        build_head("nope", spec, 3)
    with pytest.raises(ValueError, match="unknown option.*colour.*'early'.*pool="):
        build_head("early", spec, 3, colour="red")
    with pytest.raises(ValueError, match="pool must be one of"):
        build_head("early", spec, 3, pool="max")
    with pytest.raises(ValueError, match="combine must be one of"):
        build_head("late", spec, 3, combine="vote")
    with pytest.raises(ValueError, match="needs class probabilities"):
        build_head("late", spec, 1, combine="confidence")
    with pytest.raises(ValueError, match="divisible"):
        build_head("mult", spec, 3, hidden=30, heads=4)
    with pytest.raises(ValueError, match="empty"):
        build_head("early", InputSpec(modalities=()), 3)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_default_sizes_stay_modest(name):
    """Realistic dims (wav2vec2 768, MiniLM 384, CLIP 512, 64 steps) at hidden=128."""
    real = {"audio": (768, 768, 64), "text": (384, 384, 64), "visual": (512, 512, 64)}
    mods = [ModalitySpec(n, p, s, t) for n, (s, p, t) in real.items()]
    spec = InputSpec((*mods, ModalitySpec("meta", 32)), cond=ModalitySpec("cond", 384))
    n_params = sum(p.numel() for p in build_head(name, spec, 7).parameters())
    assert n_params < 3_000_000, n_params


# ---- shapes and finiteness ------------------------------------------------------------------


@configs
def test_output_shape_on_every_subset(name, opts):
    g = torch.Generator().manual_seed(1)
    cases = [(names, cond, 3) for names in SUBSETS for cond in (False, True)]
    if opts.get("combine") != "confidence":  # confidence needs classes
        cases.append((MODALITIES, True, 1))  # a regression score
    for names, cond, n_out in cases:
        spec = make_spec(names, cond)
        head = make_head(name, opts, spec, n_out)
        out = run(head, make_batch(spec, 5, g, p_absent=0.3))
        assert out.shape == (5, n_out), (names, cond, n_out)
        assert torch.isfinite(out).all(), (names, cond, n_out)


@configs
def test_finite_with_absent_rows_and_nothing_present(name, opts):
    g = torch.Generator().manual_seed(2)
    spec = make_spec()
    head = make_head(name, opts, spec)
    batch = make_batch(spec, 16, g, p_absent=0.5)
    for x in batch.values():  # row 0: every input absent
        x["present"][0] = False
        for key in ("pooled", "seq"):
            if key in x:
                x[key][0] = 0.0
        if "len" in x:
            x["len"][0] = 0
    assert torch.isfinite(run(head, batch)).all()
    head.train()
    out = head(batch).logits
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


# ---- masks, not zeros -----------------------------------------------------------------------


@configs
def test_absent_row_ignores_its_tensors(name, opts):
    """Garbage in an absent modality's row (any len) changes nothing in any row's output."""
    g = torch.Generator().manual_seed(3)
    spec = make_spec()
    head = make_head(name, opts, spec)
    batch = make_batch(spec, 6, g)
    for key in (*MODALITIES, "cond"):
        x = batch[key]
        x["present"][1] = False
        for k in ("pooled", "seq"):
            if k in x:
                x[k][1] = 0.0
        base = run(head, batch)
        dirty = copy.deepcopy(batch)
        dirty[key]["pooled"][1] = 100 * torch.randn(dirty[key]["pooled"].shape[1], generator=g)
        if "seq" in dirty[key]:
            dirty[key]["seq"][1] = 100 * torch.randn(dirty[key]["seq"].shape[1:], generator=g)
            dirty[key]["len"][1] = 4
        torch.testing.assert_close(run(head, dirty), base, msg=f"absent {key} leaked")
        x["present"][1] = True  # restore for the next modality (data unchanged: zeros)


@configs
def test_absent_is_not_the_same_as_zero_features(name, opts):
    g = torch.Generator().manual_seed(4)
    spec = make_spec()
    head = make_head(name, opts, spec)
    batch = make_batch(spec, 4, g)
    for key in MODALITIES:
        absent, zeros = copy.deepcopy(batch), copy.deepcopy(batch)
        for x, flag in ((absent[key], False), (zeros[key], True)):
            x["present"][0] = flag
            x["pooled"][0] = 0.0
            if "seq" in x:
                x["seq"][0] = 0.0
                x["len"][0] = 0 if not flag else x["seq"].shape[1]
        a, z = run(head, absent), run(head, zeros)
        assert not torch.allclose(a[0], z[0], atol=1e-6), f"{key}: absent looks like zeros"


def check_padding_ignored(head, g: torch.Generator) -> None:
    batch = make_batch(make_spec(), 8, g, p_absent=0.2)
    base = run(head, batch)
    dirty = copy.deepcopy(batch)
    for m in MODALITIES:
        x = dirty[m]
        if "seq" in x:
            after = torch.arange(x["seq"].shape[1])[None, :] >= x["len"][:, None]
            x["seq"][after] = 50 * torch.randn(int(after.sum()), x["seq"].shape[2], generator=g)
    torch.testing.assert_close(run(head, dirty), base)
    # Shorter padding (fewer zero steps) gives the same answer: padding is masked, not averaged.
    short, cut = copy.deepcopy(batch), copy.deepcopy(batch)
    for m in MODALITIES:
        if "seq" in short[m]:
            short[m]["len"] = short[m]["len"].clamp(max=5)
            short[m]["seq"] = short[m]["seq"][:, :5].clone()
            cut[m]["len"] = cut[m]["len"].clamp(max=5)
            cut[m]["seq"][:, 5:] = 0.0
    torch.testing.assert_close(run(head, short), run(head, cut))


@configs
def test_padding_is_ignored(name, opts):
    check_padding_ignored(make_head(name, opts, make_spec()), torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", ["hybrid", "cquery", "mult", "cfnsr"])
def test_padding_is_ignored_with_time_windows(name):
    """max_tokens=4 averages windows of 2-3 steps: windows must also skip the padding."""
    head = make_head(name, {"max_tokens": 4}, make_spec())
    assert head.tokens["audio"].window == 3 and head.tokens["visual"].window == 2
    check_padding_ignored(head, torch.Generator().manual_seed(14))


def test_window_weights_average_valid_steps_per_window():
    seq = torch.arange(7.0)[None, :, None].repeat(2, 1, 1)  # steps 0..6
    valid = torch.arange(7)[None, :] < torch.tensor([[5], [1]])  # len 5 and len 1
    w, ok = window_weights(valid, 3, torch.float32)
    assert ok.tolist() == [[True, True, False], [True, False, False]]
    assert (w @ seq)[..., 0].tolist() == [[1.0, 3.5, 0.0], [0.0, 0.0, 0.0]]


TOKEN_HEADS = ["hybrid", "cquery", "mult", "cfnsr"]


@pytest.mark.parametrize("name", TOKEN_HEADS)
@pytest.mark.parametrize("max_tokens", [4, 12])  # windows of 2-3 steps, and no windows (w=1)
def test_prepared_rows_give_the_same_outputs(name, max_tokens):
    """prepare() (once, all rows) then any rows == the raw rows, dropout-marked absent too."""
    g = torch.Generator().manual_seed(15)
    spec = make_spec()
    head = make_head(name, {"max_tokens": max_tokens}, spec)
    assert set(head.seq_inputs) == {"audio", "text", "visual"}  # meta is a vector modality
    batch = make_batch(spec, 10, g, p_absent=0.3)
    for m in ("audio", "visual"):  # garbage in the padding, which prepare must mask as well
        x = batch[m]
        after = torch.arange(x["seq"].shape[1])[None, :] >= x["len"][:, None]
        x["seq"][after] = 9.0
    prepared = head.prepare(batch)
    windowed = max_tokens == 4
    for m in ("audio", "text", "visual"):
        assert ("seq" in prepared[m]) != windowed, m  # the raw steps are gone when windowed
        assert any(k.startswith("seq@") for k in prepared[m]) == windowed, m
    torch.testing.assert_close(run(head, prepared), run(head, batch))
    rows = torch.tensor([7, 2, 2, 5])
    sub = {k: {kk: v[rows] for kk, v in x.items()} for k, x in prepared.items()}
    torch.testing.assert_close(run(head, sub), run(head, take(batch, rows)))
    # a row marked absent after preparing (modality dropout) is absent, not stale data
    sub["audio"]["present"][0] = False
    dropped = take(batch, rows)
    dropped["audio"]["present"][0] = False
    torch.testing.assert_close(run(head, sub), run(head, dropped))


def test_pooled_only_heads_read_no_sequence():
    spec = make_spec()
    assert make_head("late", {}, spec).seq_inputs == ()
    assert make_head("tfn", {}, spec).seq_inputs == ()
    assert make_head("early", {"pool": "pooled"}, spec).seq_inputs == ()
    assert make_head("early", {"pool": "mean"}, spec).seq_inputs == ("audio", "text", "visual")
    # ...and they answer the same without the sequences
    g = torch.Generator().manual_seed(16)
    batch = make_batch(spec, 6, g, p_absent=0.2)
    bare = {k: {kk: v for kk, v in x.items() if kk not in ("seq", "len")} for k, x in batch.items()}
    for name, opts in (("late", {}), ("tfn", {}), ("early", {})):
        head = make_head(name, opts, spec)
        torch.testing.assert_close(run(head, bare), run(head, batch))


def test_fast_dropout_keeps_the_expectation():
    from fusion.heads.base import Dropout

    drop = Dropout(0.25).train()
    torch.manual_seed(0)
    y = drop(torch.ones(200_000))
    zeros = float((y == 0).float().mean())
    assert 0.24 < zeros < 0.26
    torch.testing.assert_close(y.unique(), torch.tensor([0.0, 4 / 3]))
    assert abs(float(y.mean()) - 1.0) < 0.01
    assert torch.equal(drop.eval()(y), y)
    assert torch.equal(Dropout(1.0).train()(torch.ones(3)), torch.zeros(3))


# ---- gradients ------------------------------------------------------------------------------


@configs
def test_gradients_reach_parameters_and_every_modality(name, opts):
    g = torch.Generator().manual_seed(6)
    spec = make_spec()
    head = make_head(name, opts, spec)
    batch = make_batch(spec, 12, g, p_absent=0.3)
    for x in batch.values():
        x["present"][:2] = True  # every modality present in some rows
        x["present"][-1] = False  # and absent in one
        for k in ("pooled", "seq"):
            if k in x:
                x[k].requires_grad_(True)
    head.train()
    F.cross_entropy(head(batch).logits, torch.arange(12) % 3).backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None, f"no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), pname
    assert sum(float(p.grad.abs().sum()) for p in head.parameters()) > 0
    for key in (*MODALITIES, "cond"):
        grads = [batch[key][k].grad for k in ("pooled", "seq") if k in batch[key]]
        assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), f"{key} unused"
        for gr in grads:  # and nothing flows into rows that are not data
            if gr is not None:
                assert gr[~batch[key]["present"]].abs().sum() == 0, key


# ---- learning -------------------------------------------------------------------------------


LEARN_SPEC = make_spec(("audio", "text", "meta"))  # two sequences, a vector and cond


def separable(n: int, g: torch.Generator, n_classes: int = 3) -> tuple[dict, torch.Tensor]:
    """Each input (and cond) carries the class in a class-mean shift; 25% absent each."""
    spec = LEARN_SPEC
    y = torch.randint(0, n_classes, (n,), generator=g)
    batch = make_batch(spec, n, g, p_absent=0.25)
    gm = torch.Generator().manual_seed(123)  # class means shared by train and test
    for x in batch.values():
        mu = 2.0 * torch.randn(n_classes, x["pooled"].shape[1], generator=gm)
        x["pooled"] = torch.where(x["present"][:, None], x["pooled"] + mu[y], 0.0)
        if "seq" in x:
            mu_s = 2.0 * torch.randn(n_classes, x["seq"].shape[2], generator=gm)
            valid = torch.arange(x["seq"].shape[1])[None, :] < x["len"][:, None]
            x["seq"] = torch.where(valid[..., None], x["seq"] + mu_s[y][:, None], 0.0)
    return batch, y


def take(batch: dict, idx: torch.Tensor) -> dict:
    return {k: {kk: v[idx] for kk, v in x.items()} for k, x in batch.items()}


def fit(head, batch: dict, y: torch.Tensor, steps: int = 200, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = F.cross_entropy(head(take(batch, idx)).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(head, batch: dict, y: torch.Tensor) -> float:
    return float((run(head, batch).argmax(-1) == y).float().mean())


@configs
def test_learns_a_separable_problem(name, opts):
    g = torch.Generator().manual_seed(7)
    train, y_train = separable(384, g)
    test, y_test = separable(256, g)
    head = make_head(name, opts, LEARN_SPEC)
    fit(head, train, y_train)
    assert accuracy(head, test, y_test) >= 0.9


# ---- head-specific --------------------------------------------------------------------------


def test_late_stacking_fits_a_meta_learner_in_after_fit():
    g = torch.Generator().manual_seed(8)
    train, y_train = separable(384, g)
    val, y_val = separable(256, g)
    spec = LEARN_SPEC
    head = make_head("late", {"combine": "stacking"}, spec)
    fit(head, train, y_train, steps=100)
    # The validation labels are a relabelling the classifiers never saw: only a meta-learner
    # fitted on the validation predictions can recover it.
    y_perm = (y_val + 1) % 3
    mean_head = make_head("late", {"combine": "mean"}, spec)
    mean_head.load_state_dict(head.state_dict())
    torch.testing.assert_close(run(head, val), run(mean_head, val))  # before: falls back to mean
    assert accuracy(head, val, y_perm) < 0.3
    head.after_fit(val, y_perm)
    assert bool(head.stacked)
    assert accuracy(head, val, y_perm) > 0.85
    # The fitted meta-learner is part of the state dict.
    again = make_head("late", {"combine": "stacking"}, spec, seed=9)
    again.load_state_dict(head.state_dict())
    torch.testing.assert_close(run(again, val), run(head, val))
    # other combines ignore after_fit
    before = run(mean_head, val)
    mean_head.after_fit(val, y_perm)
    torch.testing.assert_close(run(mean_head, val), before)


def test_late_stacking_regression_is_a_ridge_on_scores():
    g = torch.Generator().manual_seed(10)
    spec = make_spec(("audio", "text"), cond=False)
    head = make_head("late", {"combine": "stacking"}, spec, n_out=1)
    val = make_batch(spec, 200, g)
    head.eval()
    with torch.no_grad():
        aux = head(val).aux
    target = 3 * aux["audio"][0] - aux["text"][0] + 0.5
    head.train()
    head.after_fit(val, target.view(-1))
    assert head.training  # after_fit restores the mode it found
    err = F.mse_loss(run(head, val), target)
    assert err < 1e-2 * target.var()


@pytest.mark.parametrize("combine", ["mean", "learned", "confidence", "stacking"])
def test_late_uses_only_present_classifiers(combine):
    g = torch.Generator().manual_seed(11)
    spec = make_spec()
    head = make_head("late", {"combine": combine}, spec)
    batch = make_batch(spec, 4, g)
    for key in (*MODALITIES[1:], "cond"):
        batch[key]["present"][0] = False
    head.eval()
    with torch.no_grad():
        res = head(batch)
    out = res.logits
    assert set(res.aux) == {*MODALITIES, "cond"}
    assert res.aux["audio"][0].shape == (4, 3)
    assert res.aux["text"][1].tolist() == [False, True, True, True]
    torch.testing.assert_close(out[0], res.aux["audio"][0][0])  # only audio present


def test_hybrid_pairs_follow_the_spec():
    full = make_head("hybrid", {}, make_spec())
    assert full.pairs == (("text", "visual"), ("visual", "audio"))
    no_visual = make_head("hybrid", {}, make_spec(("audio", "text"), cond=False))
    assert no_visual.pairs == () and len(no_visual.cross) == 0
    g = torch.Generator().manual_seed(12)
    batch = make_batch(make_spec(), 3, g)
    batch["visual"]["present"][0] = False
    full.eval()
    with torch.no_grad():
        aux = full(batch).aux
    assert aux["text+visual"][1].tolist() == [False, True, True]
    assert aux["visual+audio"][1].tolist() == [False, True, True]


def test_cquery_follows_cond_when_present_and_works_without():
    g = torch.Generator().manual_seed(13)
    spec = make_spec()
    # The residual pooled path reads cond with its presence flag (as early fusion does), so the
    # "absent cond = no cond" equivalence below is the attention path's: measured without it.
    opts = {"pooled": "token"}
    head = make_head("cquery", opts, spec)
    batch = make_batch(spec, 4, g)
    batch["cond"]["present"][3] = False
    batch["cond"]["pooled"][3] = 0.0
    base = run(head, batch)
    other = copy.deepcopy(batch)
    other["cond"]["pooled"][:3] = torch.randn(3, COND.pooled_dim, generator=g)
    changed = run(head, other)
    assert not torch.allclose(changed[:3], base[:3], atol=1e-4), "cond is ignored"
    torch.testing.assert_close(changed[3], base[3])  # absent cond: the learned query, unchanged
    # Without a conditioning vector in the spec: the learned query, and the same modalities.
    spec_nc = make_spec(cond=False)
    head_nc = make_head("cquery", opts, spec_nc)
    assert head_nc.query_proj is None
    batch_nc = {k: v for k, v in batch.items() if k != "cond"}
    assert run(head_nc, batch_nc).shape == (4, 3)
    # ...and a row whose cond is absent is answered as if the spec had none.
    head_nc.load_state_dict(head.state_dict(), strict=False)
    torch.testing.assert_close(run(head_nc, batch_nc)[3], base[3])


def test_tfn_dim_keeps_the_tensor_small():
    assert auto_dim(1, 8192) == 32
    for k in range(1, 6):
        assert (auto_dim(k, 8192) + 1) ** k <= 8192
    head = make_head("tfn", {}, make_spec())  # 4 modalities + cond
    assert head.dim == auto_dim(5, 2048) == 3  # the default max_tensor: 4 ** 5 = 1024 entries
    assert make_head("tfn", {"max_tensor": 8192}, make_spec()).dim == auto_dim(5, 8192) == 5
    with pytest.raises(ValueError, match="lower dim"):
        build_head("tfn", make_spec(), 3, dim=16)


def test_cfnsr_anchor_falls_back_when_audio_is_missing():
    assert make_head("cfnsr", {}, make_spec()).anchor == "audio"
    assert make_head("cfnsr", {}, make_spec(("meta", "text"), cond=False)).anchor == "text"
    assert make_head("cfnsr", {}, make_spec(("meta",), cond=False)).anchor == "meta"


# ---- the head interface -----------------------------------------------------------------------


def test_every_head_is_a_fusion_head_with_the_default_hooks():
    from fusion.heads import FusionHead, HeadOutput

    spec = make_spec()
    g = torch.Generator().manual_seed(13)
    batch = make_batch(spec, 4, g)
    for name, cls in HEADS.items():
        assert issubclass(cls, FusionHead), name
        head = make_head(name, {}, spec)
        out = head(batch)
        assert isinstance(out, HeadOutput) and out.logits.shape == (4, 3), name
        for k, (logits, present) in out.aux.items():
            assert logits.shape == (4, 3) and present.shape == (4,), (name, k)
        assert not hasattr(head, "aux_logits"), name  # side outputs are returned, not kept
    # heads without Tokens: prepare leaves the data as it is; after_fit does nothing
    tfn = make_head("tfn", {}, spec)
    assert tfn.prepare(batch) is batch
    before = {k: v.clone() for k, v in tfn.state_dict().items()}
    tfn.after_fit(batch, torch.zeros(4, dtype=torch.long))
    assert all(before[k].equal(v) for k, v in tfn.state_dict().items())
