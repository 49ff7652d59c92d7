"""The linear path every registered head has (fusion/heads/linear.py) and the trainer's warm
start from each fold's linear probe (issue 15): on a small, wide set — a few dozen rows of a
few hundred features, where the heads used to fit noise and land below a logistic regression on
their own inputs — a head is no longer below that probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fusion.data import InputSpec, ModalitySpec
from fusion.heads import HEADS, build_head
from fusion.heads.linear import WithLinearPath
from fusion.normalise import apply_stats, fit_stats, to_tensors
from fusion.probe import linear_probe, pooled_blocks, pooled_matrix
from fusion.report import probe_kept
from fusion.splits import Fold, Task
from fusion.train import fit
from tests.fusion.conftest import write_feature_set
from tests.fusion.test_heads import make_batch, make_spec, one_thread  # noqa: F401


def test_every_registered_head_starts_as_a_zero_linear_model():
    spec = make_spec()
    batch = make_batch(spec, 6, torch.Generator().manual_seed(0), p_absent=0.3)
    for name in HEADS:
        head = build_head(name, spec, 3)
        assert isinstance(head, WithLinearPath), name
        assert float(head.gate.detach()) == 0.0
        head.eval()
        with torch.no_grad():
            assert torch.equal(head(batch).logits, torch.zeros(6, 3)), name
        assert not isinstance(build_head(name, spec, 3, linear="off"), WithLinearPath)
    with pytest.raises(ValueError, match="linear must be one of"):
        build_head("early", spec, 3, linear="sometimes")


def test_gate_opens_and_the_head_reaches_its_own_path():
    spec = make_spec()
    head = build_head("hybrid", spec, 3)
    batch = make_batch(spec, 8, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(head(batch).logits, torch.arange(8) % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(head.gate.detach()) != 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.inner.parameters())


@pytest.mark.parametrize("n_classes", [2, 4])
def test_warm_start_gives_the_probes_logits_on_every_row(n_classes):
    """LinearPath.start_from re-expresses the probe (its own standardisation, zeros for absent
    rows, a presence column) in the path's inputs (the trainer's statistics): same logits."""
    rng = np.random.default_rng(3)
    n = 90
    y = rng.integers(0, n_classes, n)
    raw = {"a": {"pooled": (rng.normal(size=(n, 7)) * 5 + 3).astype(np.float32),
                 "present": rng.random(n) > 0.25},
           "b": {"pooled": (rng.normal(size=(n, 4)) + np.eye(n_classes)[y] @ rng.normal(size=(n_classes, 4))
                            ).astype(np.float32), "present": np.ones(n, dtype=bool)}}
    raw["a"]["pooled"][~raw["a"]["present"]] = 0.0
    idx = np.arange(n)
    f = Fold(idx[:60], idx[60:75], idx[75:])
    task = Task("label", "classification", y, [str(c) for c in range(n_classes)])
    mods = ["a", "b"]
    fits: list = []
    x = pooled_matrix(raw, mods)
    linear_probe(x, y, [f], task, "macro_f1", True, fits=fits, blocks=pooled_blocks(raw, mods))
    assert fits[0].blocks == [("a", 7, True), ("b", 4, False)]
    want = ((x - fits[0].mean) / fits[0].std) @ fits[0].coef.T + fits[0].intercept
    data = to_tensors(raw)
    stats = fit_stats(data, f.train)
    scaled = apply_stats(data, stats)
    head = build_head("early", InputSpec(modalities=(ModalitySpec("a", 7), ModalitySpec("b", 4))),
                      n_classes)
    assert head.start_from(fits[0], stats)
    with torch.no_grad():
        got = head.linear(scaled).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # a probe of other inputs is refused, nothing set
    other = build_head("early", InputSpec(modalities=(ModalitySpec("a", 8), ModalitySpec("b", 4))),
                       n_classes)
    assert not other.start_from(fits[0], stats)
    assert float(other.linear.proj.weight.detach().abs().sum()) == 0.0


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 rows, 4 balanced classes, one 300-d vector modality with a weak class signal: the
    regime of the 120-clip sample's visual features (p > n), where the issue was found."""
    root = tmp_path_factory.mktemp("wide")
    write_feature_set(root, n=120, n_groups=24, n_classes=4, absent_frac=0.0, seed=3,
                      modalities={"visual": (0, 300, 0, 0.12)}, splits=None)
    return root


def test_a_small_wide_set_is_not_fitted_below_its_probe(wide_cache: Path, tmp_path: Path):
    kw = dict(seeds=2, split="kfold", folds=4, threads=1, runs_dir=tmp_path)
    m = fit(wide_cache, "synth", "early", ["visual"], name="now", **kw).metrics
    probe, maj = m["linear_probe"]["macro_f1"], m["majority_baseline"]["macro_f1"]
    # measured: probe 0.389, head 0.394, the head as it was 0.307, majority 0.118 (macro F1)
    assert probe > maj + 0.15, (probe, maj)  # the set carries a learnable signal
    assert m["macro_f1"] >= probe - 0.03, (m["macro_f1"], probe)
    assert not m["below_baseline"]["majority"]
    assert all(all(s["warm_start"]) for s in m["seeds"])
    kept, runs = map(int, probe_kept(m).split("/"))  # shown in fit / ablate tables
    assert runs == 8 and 0 <= kept <= runs
    # the control: the head as it was (no linear path, no warm start) fits noise here
    old = fit(wide_cache, "synth", "early", ["visual"], name="old", warm_start=False,
              head_options={"linear": "off"}, **kw).metrics
    assert old["macro_f1"] < probe - 0.03, (old["macro_f1"], probe)
    assert probe_kept(old) == ""
