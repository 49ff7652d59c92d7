"""Time windows in a sequence head's linear path (issue 15): the order of events in a clip,
which no pooled vector holds, reaches hybrid / cquery / cfnsr / mult from their first step
through a probe of k windows of each sequence they read; the trainer starts from that probe only
where it beats the pooled one on validation beyond chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fusion.data import InputSpec, ModalitySpec
from fusion.heads import build_head, build_saved_head
from fusion.heads.base import relative_windows
from fusion.normalise import apply_stats, fit_stats, to_tensors
from fusion.probe import linear_probe, pooled_blocks, pooled_matrix, window_matrix
from fusion.splits import Fold, Task
from fusion.train import fit
from tests.fusion.conftest import write_feature_set
from tests.fusion.test_heads import one_thread  # noqa: F401


def test_windows_split_each_rows_own_steps_into_equal_parts():
    seq = torch.arange(12.0).reshape(1, 6, 2).repeat(4, 1, 1)
    x = {"seq": seq, "len": torch.tensor([6, 2, 0, 6]),
         "present": torch.tensor([True, True, True, False])}
    w, has = relative_windows(x, 3, torch.float32)
    assert has.tolist() == [True, True, False, False]
    # six steps: two per part; two steps in three parts: the middle one shares them
    assert w[0].tolist() == [[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]
    assert w[1].tolist() == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert w[2].abs().sum() == 0 and w[3].abs().sum() == 0  # no step, absent: zeros
    # padding never leaks in, NaN included
    seq[1, 2:] = float("nan")
    assert torch.equal(relative_windows(x, 3, torch.float32)[0][1], w[1])


def order_raw(n: int, rng: np.random.Generator, n_classes: int = 3, d: int = 6, t: int = 10
              ) -> tuple[dict, np.ndarray]:
    """The label is the class a clip *ends* in: its first steps show another class, its last
    the label; the pooled vector (the mean of the steps) cannot tell which came first."""
    y = rng.integers(0, n_classes, n)
    first = (y + rng.integers(1, n_classes, n)) % n_classes
    cent = rng.normal(0, 1.5, (n_classes, d))
    lens = rng.integers(t // 2, t + 1, n)
    seq = rng.normal(0, 0.5, (n, t, d))
    for i in range(n):
        half = lens[i] // 2
        seq[i, :half] += cent[first[i]]
        seq[i, half:lens[i]] += cent[y[i]]
        seq[i, lens[i]:] = 0.0
    pooled = np.stack([seq[i, :lens[i]].mean(0) for i in range(n)])
    return {"audio": {"seq": seq.astype(np.float32), "len": lens.astype(np.int32),
                      "pooled": pooled.astype(np.float32), "present": np.ones(n, bool)}}, y


def test_a_window_probe_start_gives_the_probes_logits_prepared_or_not():
    """LinearPath.start_from maps the pooled and window blocks onto the trainer's scaling:
    the path gives the probe's logits on every row, from the prepared windows (training) and
    from the scaled sequence itself (a clip at predict time)."""
    rng = np.random.default_rng(4)
    raw, y = order_raw(120, rng)
    idx = np.arange(120)
    f = Fold(idx[:80], idx[80:100], idx[100:])
    task = Task("label", "classification", y, ["a", "b", "c"])
    spec = InputSpec(modalities=(ModalitySpec("audio", 6, seq_dim=6, max_len=10),))
    head = build_head("hybrid", spec, 3)
    data = to_tensors(raw)
    ready = head.prepare(data)  # the windows, computed once: the probe's columns come from here
    xw, wblocks = window_matrix(ready, ("audio",), 3)
    assert wblocks == [("audio~w3", 18, True)]
    lens = raw["audio"]["len"]
    i = int(np.flatnonzero(lens % 3 == 0)[0])  # a row whose thirds are whole steps
    third = lens[i] // 3
    for j in range(3):
        np.testing.assert_allclose(xw[i, 6 * j:6 * (j + 1)],
                                   raw["audio"]["seq"][i, j * third:(j + 1) * third].mean(0),
                                   rtol=1e-5, atol=1e-6)
    assert (xw[:, -1] == 1).all()  # every row has steps
    x = np.concatenate([pooled_matrix(raw, ["audio"]), xw], axis=1)
    fits: list = []
    linear_probe(x, y, [f], task, "accuracy", True, fits=fits,
                 blocks=pooled_blocks(raw, ["audio"]) + wblocks)
    want = ((x - fits[0].mean) / fits[0].std) @ fits[0].coef.T + fits[0].intercept
    stats = fit_stats(data, f.train)
    assert head.start_from(fits[0], stats)
    head.eval()
    with torch.no_grad():
        prepared = head.linear(apply_stats(ready, stats)).double().numpy()
        direct = head.linear(apply_stats(data, stats)).double().numpy()
    np.testing.assert_allclose(prepared, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(direct, want, rtol=1e-4, atol=1e-4)
    # the windows are saved with the head: a saved state is rebuilt with them
    again = build_saved_head("hybrid", spec, 3, {}, head.state_dict())
    assert again.linear.k == 3 and again.linear.windows == ("audio",)
    # a pooled-only head (early) has no windows; linear_windows=0 turns them off
    assert build_head("early", spec, 3).linear.windows == ()
    assert build_head("hybrid", spec, 3, linear_windows=0).linear.windows == ()
    with pytest.raises(ValueError, match="linear_windows"):
        build_head("hybrid", spec, 3, linear_windows=-1)


@pytest.fixture(scope="module")
def order_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cached set whose label only the order of a sequence's steps carries."""
    root = tmp_path_factory.mktemp("order")
    key = write_feature_set(root, n=240, n_classes=3, absent_frac=0.0, seed=2,
                            modalities={"audio": (6, 6, 10, 0.0)})
    g = zarr.open_group(str(root / "sets" / key), mode="r+")
    raw, y = order_raw(240, np.random.default_rng(9))
    g["label"][...] = y.astype(np.int32)  # the generator's labels replace the stored ones
    for k in ("seq", "len", "pooled"):
        arr = g[f"audio/{k}"]
        arr[...] = raw["audio"][k].astype(arr.dtype)
    g["audio/present"][...] = True
    return root


def test_sequence_heads_read_the_order_early_fusion_cannot(order_cache: Path, tmp_path: Path):
    r_early = fit(order_cache, "synth", "early", ["audio"], runs_dir=tmp_path, seeds=[0])
    m_early = r_early.metrics
    assert m_early["linear_probe"]["accuracy"] < 0.75  # the pooled vector: pairs, not order
    assert not any(m_early["seeds"][0]["window_start"])
    for head in ("hybrid", "cquery"):
        m = fit(order_cache, "synth", head, ["audio"], runs_dir=tmp_path, seeds=[0]).metrics
        assert all(m["seeds"][0]["window_start"]), head
        assert m["mean"]["accuracy"] >= m_early["mean"]["accuracy"] + 0.2, head
        assert m["mean"]["accuracy"] >= 0.85, head
    # without the windows the head starts from the pooled probe, as early does
    m = fit(order_cache, "synth", "cquery", ["audio"], runs_dir=tmp_path, seeds=[0],
            name="no-windows", head_options={"linear_windows": 0}).metrics
    assert not any(m["seeds"][0]["window_start"])


def test_a_saved_run_predicts_with_its_windows(order_cache: Path, tmp_path: Path):
    """The run's head is rebuilt with its windows (linear.window_k) and reads them from each
    clip's scaled sequence, unprepared: its predictions on the set keep the order signal."""
    from fusion.predict import predict_set

    r = fit(order_cache, "synth", "hybrid", ["audio"], runs_dir=tmp_path, seeds=[0])
    assert all(r.metrics["seeds"][0]["window_start"])
    key = next((order_cache / "sets").iterdir()).name  # the one set
    out = predict_set(r.run_dir, order_cache, key)
    y = np.asarray(zarr.open_group(str(order_cache / "sets" / key), mode="r")["label"][:])
    pred = np.array([int(np.argmax(list(row["probs"].values()))) for row in out])
    assert (pred == y).mean() >= 0.85  # early fusion's pooled probe: < 0.75
