"""fit(): learns known signal, writes every output, seeds, grouped splits, no media imports."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fusion.data import DataError, open_set
from fusion.heads import build_head
from fusion.normalise import _moments, apply_stats, drop_modalities, fit_stats, to_tensors
from fusion.splits import Task, _groups, _plan
from fusion.train import auto_batch, fit, load_inputs, loss_min_delta
from tests.fusion.conftest import TinyHead, tiny_head, write_feature_set

REPO = Path(__file__).resolve().parents[2]
QUICK = {"epochs": 15, "patience": 4, "threads": 1, "head_options": {"hidden": 32}}


@pytest.fixture(scope="module")
def signal_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    write_feature_set(root, n=360, n_groups=30, cond_dim=4, scale=200.0,
                      class_probs=[0.5, 0.3, 0.2])
    return root


@pytest.fixture(scope="module")
def early_run(signal_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("runs")
    return fit(signal_cache, "synth", "early", "all", seeds=3, runs_dir=runs, name="e", **QUICK)


def test_fit_beats_majority_and_writes_outputs(early_run) -> None:
    m, d = early_run.metrics, early_run.run_dir
    assert {p.name for p in d.iterdir()} >= {"metrics.json", "config.toml", "model.safetensors",
                                             "confusion.png", "log.csv"}
    on_disk = json.loads((d / "metrics.json").read_text())
    for k in ("accuracy", "macro_f1", "weighted_f1", "uar", "majority_baseline", "per_class",
              "confusion", "n_train", "n_test", "mean", "std", "seeds", "fusion", "modalities",
              "feature_set", "warnings", "elapsed_s"):
        assert k in on_disk, k
    assert set(on_disk["majority_baseline"]) >= {"accuracy", "macro_f1", "uar"}
    # Features carry class signal (audio, text): far above the majority floor.
    assert m["macro_f1"] > m["majority_baseline"]["macro_f1"] + 0.3
    assert m["accuracy"] > m["majority_baseline"]["accuracy"] + 0.2
    assert m["modalities"] == ["audio", "text", "visual"] and m["fusion"] == "early"
    assert len(m["feature_set"]) == 16
    # the confusion is the mean over the 3 seeds (not their sum): it totals n_test, its rows
    # the test support per class, and each seed's own matrix is kept
    cm = np.asarray(m["confusion"])
    assert cm.sum() == pytest.approx(m["n_test"]) and len(m["seeds"]) == 3
    per_seed = np.stack([np.asarray(s["confusion"]) for s in m["seeds"]])
    assert np.allclose(cm, per_seed.mean(axis=0), atol=1e-3)
    assert [m["per_class"][c]["support"] for c in m["classes"]] == cm.sum(axis=1).round().tolist()
    assert np.allclose(np.asarray(m["confusion_normalised"]).sum(axis=1), 1.0, atol=1e-3)
    assert sum(m["support_by_split"]["test"].values()) == m["n_test"]
    assert sum(m["support_by_split"]["train"].values()) == m["n_train"]
    assert m["coverage"]["missing"] == 0 and "mean over 3 seed" in m["aggregation"]
    assert {f"confusion_seed{s}.png" for s in range(3)} | {"confusion_normalised.png"} <= {
        p.name for p in d.iterdir()}
    assert (d / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_mean_std_and_per_seed(early_run, signal_cache: Path, tmp_path: Path) -> None:
    m = early_run.metrics
    accs = [s["accuracy"] for s in m["seeds"]]
    assert [s["seed"] for s in m["seeds"]] == [0, 1, 2]
    assert m["mean"]["accuracy"] == pytest.approx(np.mean(accs)) == pytest.approx(m["accuracy"])
    assert m["std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
    assert m["std"]["macro_f1"] >= 0
    # seeds really differ: a warm-started run that keeps its probe (or takes the first step,
    # which the closed gate makes the same for every seed) is the same for every seed, so the
    # seeds' own effect (the head's initialisation, batch order) is checked without it
    cold = fit(signal_cache, "synth", "early", "all", seeds=3, runs_dir=tmp_path, name="cold",
               warm_start=False, **QUICK).metrics
    assert len({s["accuracy"] for s in cold["seeds"]}) > 1


def test_log_config_and_model_files(early_run) -> None:
    d = early_run.run_dir
    rows = list(csv.DictReader((d / "log.csv").open()))
    assert set(rows[0]) == {"seed", "fold", "epoch", "train_loss", "val_loss", "val_metric",
                           "epoch_s", "start", "window_probe_p"}
    # epoch 0 of each warm-started run names its start; early reads no sequence: the probe
    assert {r["start"] for r in rows if r["epoch"] == "0"} == {"probe"}
    assert {r["start"] for r in rows if r["epoch"] != "0"} == {""}
    assert {r["seed"] for r in rows} == {"0", "1", "2"}
    cfg = tomllib.loads((d / "config.toml").read_text())
    assert cfg["fusion"] == "early" and cfg["seeds"] == [0, 1, 2] and cfg["epochs"] == 15
    state = load_file(str(d / "model.safetensors"))
    fs = open_set(cfg["cache_root"], key=cfg["feature_set"])
    model = build_head("early", fs.spec(cfg["modalities"]), 3, hidden=32)
    model.load_state_dict(state)  # strict: the file is exactly the head's state
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert f.metadata()["feature_set"] == fs.key


def test_deterministic_given_seed(signal_cache: Path, tmp_path: Path) -> None:
    kw = {"seeds": [5], "runs_dir": tmp_path, "epochs": 4, "patience": 10, "threads": 1}
    a = fit(signal_cache, "synth", tiny_head, ["audio", "text"], name="a", **kw).metrics
    b = fit(signal_cache, "synth", tiny_head, ["audio", "text"], name="b", **kw).metrics
    assert a["confusion"] == b["confusion"] and a["accuracy"] == b["accuracy"]
    la, lb = (list(csv.DictReader((tmp_path / x / "log.csv").open())) for x in "ab")
    for row in la + lb:
        row.pop("epoch_s")  # wall-clock time is the one column that may differ
    assert la == lb


def test_noise_modality_stays_near_baseline_and_regression_target(signal_cache: Path,
                                                                  tmp_path: Path) -> None:
    kw = {"runs_dir": tmp_path, "threads": 1, "epochs": 15, "patience": 4}
    noise = fit(signal_cache, "synth", tiny_head, ["visual"], seeds=2, **kw).metrics
    assert noise["macro_f1"] < 0.55  # no signal in visual: no miracle either
    import io

    from rich.console import Console

    from fusion.progress import FitProgress

    buf = io.StringIO()
    res = fit(signal_cache, "synth", "early", ["audio", "text"], seeds=1, runs_dir=tmp_path,
              target="sentiment", progress=FitProgress(Console(file=buf, width=200), every_s=0,
                                                       terminal=False), **QUICK)
    reg = res.metrics
    assert reg["task"] == "regression"
    # the target is in the default run name (a valence fit must not overwrite a sentiment one)
    assert res.run_dir.name == "synth-early-audio+text-sentiment"
    # the printed progress shows the MAE as log.csv writes it: positive (it was printed negated)
    logged = list(csv.DictReader((res.run_dir / "log.csv").open()))
    shown = [float(v) for v in re.findall(r"val MAE (-?[\d.]+)", buf.getvalue())]
    assert shown and all(v > 0 for v in shown), buf.getvalue()
    assert set(shown) <= {round(float(r["val_metric"]), 4) for r in logged}
    assert set(reg["mean"]) >= {"mae", "corr", "acc2", "acc2_nonzero", "acc7", "f1"}
    assert reg["mae"] < reg["mean_baseline"]["mae"] - 0.2 and reg["corr"] > 0.5


def test_after_fit_hook_gets_validation_rows(signal_cache: Path, tmp_path: Path) -> None:
    made: list[TinyHead] = []

    def factory(spec, n_out, **opts):
        made.append(TinyHead(spec, n_out, **opts))
        return made[-1]

    m = fit(signal_cache, "synth", factory, ["audio"], seeds=2, runs_dir=tmp_path, epochs=2,
            threads=1).metrics
    assert [h.after_fit_calls for h in made] == [1, 1]
    assert m["n_val"] > 0


def test_late_head_reports_branch_metrics_and_aux_loss(signal_cache: Path, tmp_path: Path) -> None:
    m = fit(signal_cache, "synth", "late", ["audio", "visual"], seeds=1, runs_dir=tmp_path,
            aux_weight=0.5, **QUICK).metrics
    assert set(m["aux"]) >= {"audio", "visual"}
    assert m["aux"]["audio"]["macro_f1"] > m["aux"]["visual"]["macro_f1"]
    assert m["aux"]["visual"]["n"] < m["n_test"]  # branches are scored on rows they saw


def test_saved_state_includes_after_fit_changes(signal_cache: Path, tmp_path: Path) -> None:
    opts = {**QUICK, "head_options": {"hidden": 32, "combine": "stacking"}}
    r = fit(signal_cache, "synth", "late", ["audio", "text"], seeds=1, runs_dir=tmp_path, **opts)
    state = load_file(str(r.run_dir / "model.safetensors"))
    assert state["inner.stack_w"].abs().sum() > 0  # the meta-learner fit in after_fit was saved
    assert r.metrics["macro_f1"] > r.metrics["majority_baseline"]["macro_f1"] + 0.3


@pytest.mark.parametrize("split", ["official", "kfold"])
def test_grouped_splits_never_share_a_group(tmp_path: Path, split: str) -> None:
    key = write_feature_set(tmp_path, n=300, n_groups=20, splits=None if split == "kfold" else (1, 0, 1))
    fs = open_set(tmp_path, key=key)
    task = Task("label", "classification", fs.label, fs.classes)
    usable = np.flatnonzero(fs.complete)
    groups = _groups(fs, None)
    plan = _plan(fs, task, usable, groups, split, 4, 0.15)
    assert len(plan) == (4 if split == "kfold" else 1)
    tested = []
    for f in plan:
        tr, va, te = (set(groups[x]) for x in (f.train, f.val, f.test))
        assert not tr & te and not tr & va and not va & te
        assert len(va) >= 1  # carved from train by whole groups (no official valid here)
        tested += list(f.test)
    if split == "kfold":
        assert sorted(tested) == list(usable)  # each row tested exactly once


def test_ungrouped_when_asked(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path, n_groups=2, splits=(1, 0, 1))  # one speaker in train
    fs = open_set(tmp_path, key=key)
    task = Task("label", "classification", fs.label, fs.classes)
    usable = np.flatnonzero(fs.complete)
    with pytest.raises(DataError, match="training rows hold 1 group.*group_by='none'"):
        _plan(fs, task, usable, _groups(fs, None), "official", 5, 0.15)
    with pytest.raises(DataError, match="3-fold needs at least 3 groups, there are 2"):
        _plan(fs, task, usable, _groups(fs, None), "kfold", 3, 0.15)
    (f,) = _plan(fs, task, usable, _groups(fs, "none"), "official", 5, 0.15)
    assert len(f.val) > 0 and not set(f.val) & set(f.train)  # row-level carve-out, as asked
    assert len(_plan(fs, task, usable, _groups(fs, "none"), "kfold", 3, 0.15)) == 3


def test_standardise_uses_train_stats_and_keeps_absent_zero(tmp_path: Path) -> None:
    key = write_feature_set(tmp_path, scale=1000.0)
    fs = open_set(tmp_path, key=key)
    rows = np.arange(fs.n)
    raw = fs.load(["audio"], rows)
    train = rows[fs.split == "train"]
    stats = fit_stats(to_tensors(raw), train)
    data = apply_stats(to_tensors(raw), stats)
    out = {k: v.numpy() for k, v in data["audio"].items()}
    assert raw["audio"]["pooled"].max() > 1000  # the input really is eGeMAPS-scale
    pres = raw["audio"]["present"]
    tp = out["pooled"][train][pres[train]]
    assert np.abs(tp.mean(0)).max() < 1e-3 and np.abs(tp.std(0) - 1).max() < 1e-2
    assert (out["pooled"][~pres] == 0).all()
    valid = pres[:, None] & (np.arange(8)[None] < raw["audio"]["len"][:, None])
    assert (out["seq"][~valid] == 0).all()
    assert np.abs(out["seq"][train][valid[train]].mean(0)).max() < 1e-3


def test_moments_match_float64_numpy_at_egemaps_scale() -> None:
    """One pass with a shift: no cancellation for large means with small spreads."""
    g = torch.Generator().manual_seed(0)
    x = (5e4 + 0.01 * torch.randn(3000, 6, 5, generator=g)).to(torch.float16).float()
    w = torch.rand(3000, 6, generator=g) > 0.3
    mean, std = _moments(x, w.float(), chunk=256)
    xs = x.numpy().astype(np.float64)[w.numpy()]
    np.testing.assert_allclose(mean.numpy(), xs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), xs.std(0), rtol=1e-3, atol=1e-6)
    m16, s16 = _moments(x.half(), w.float())  # float16 input is read in float32 chunks
    np.testing.assert_allclose(m16.numpy(), mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(s16.numpy(), xs.std(0), rtol=1e-3, atol=1e-6)


def test_sequence_stats_of_a_large_set_come_from_a_subset_close_to_the_full_data() -> None:
    import fusion.normalise as T

    g = torch.Generator().manual_seed(1)
    n, t, d = 6000, 12, 5
    seq = (300 + 7 * torch.randn(n, t, d, generator=g)).half()
    lens = torch.randint(1, t + 1, (n,), generator=g)
    present = torch.rand(n, generator=g) > 0.1
    valid = present[:, None] & (torch.arange(t)[None] < lens[:, None])
    seq = seq * valid[..., None]  # the cache's zero padding
    data = {"a": {"present": present, "pooled": torch.randn(n, 3, generator=g), "seq": seq,
                  "len": lens}}
    train = np.arange(0, n, 2)  # 3000 training rows > SEQ_STAT_ROWS
    assert len(train) > T.SEQ_STAT_ROWS
    stats = fit_stats(data, train)
    full_mean, full_std = _moments(seq[train], valid[train].float())
    torch.testing.assert_close(stats["a.seq.mean"], full_mean, rtol=2e-3, atol=0.0)
    torch.testing.assert_close(stats["a.seq.std"], full_std, rtol=3e-2, atol=0.0)
    assert fit_stats(data, train)["a.seq.mean"].equal(stats["a.seq.mean"])  # a fixed subset


@pytest.mark.parametrize("head", ["hybrid", "cfnsr"])
def test_prepare_on_raw_then_scale_equals_scale_then_prepare(tmp_path: Path, head: str) -> None:
    """The trainer prepares window averages once on raw features and scales them per fold; a
    head must see the same numbers as if it had averaged standardised steps itself."""
    from fusion.heads import build_head

    key = write_feature_set(tmp_path, scale=300.0)
    fs = open_set(tmp_path, key=key)
    rows = np.arange(fs.n)
    mods = ["audio", "text", "visual"]
    raw = to_tensors(fs.load(mods, rows))
    train = rows[fs.split == "train"]
    torch.manual_seed(0)
    model = build_head(head, fs.spec(mods), 3, max_tokens=3).eval()
    stats = fit_stats(raw, train)
    via_prepare = apply_stats(model.prepare(raw), stats)
    assert "seq" not in via_prepare["audio"] and "seq@3" in via_prepare["audio"]
    scaled = apply_stats(raw, stats)
    with torch.no_grad():
        a, b = model(via_prepare).logits, model(scaled).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    pad = ~_valid_windows(via_prepare["audio"])
    assert (via_prepare["audio"]["seq@3"][pad] == 0).all()  # non-data windows stay zero


def _valid_windows(d: dict) -> torch.Tensor:
    t = torch.arange(d["seq@3"].shape[1])
    return d["present"][:, None] & (t[None, :] < d["len@3"][:, None])


def test_modality_dropout_never_empties_a_row() -> None:
    g = torch.Generator().manual_seed(0)
    b = {m: {"present": torch.rand(4000, generator=g) > 0.3} for m in ("a", "b", "c")}
    before = torch.stack([b[m]["present"] for m in "abc"])
    out = drop_modalities(b, ["a", "b", "c"], 0.5, g)
    after = torch.stack([out[m]["present"] for m in "abc"])
    assert not (after & ~before).any()  # only ever flips present -> absent
    assert (after.any(0) == before.any(0)).all()  # a row with input keeps some input
    rate = 1 - after.sum() / before.sum()
    assert 0.2 < float(rate) < 0.5
    assert drop_modalities(b, ["a"], 0.5, g) is b  # a single modality is never dropped


def test_label_derived_warning_in_metrics(tmp_path: Path) -> None:
    write_feature_set(tmp_path, meta_dim=3, label_derived=["chain_of_empathy.*"],
                      meta_fields=["chain_of_empathy.cause"])
    m = fit(tmp_path, "synth", tiny_head, ["audio", "meta"], seeds=1, runs_dir=tmp_path / "r",
            epochs=2, threads=1).metrics
    assert len(m["warnings"]) == 1 and "chain_of_empathy.cause" in m["warnings"][0]


def test_fit_imports_no_media_or_encoder(signal_cache: Path, tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "from fusion.train import fit\n"
        f"fit({str(signal_cache)!r}, 'synth', 'late', 'all', seeds=1, epochs=2, threads=1, "
        f"runs_dir={str(tmp_path)!r})\n"
        "bad = ['av', 'opensmile', 'transformers', 'sentence_transformers', 'cv2',"
        " 'librosa', 'demucs', 'rapidocr']\n"
        "pipe = [m for m in sys.modules if m.split('.')[0] == 'pipeline'"
        " and m not in ('pipeline', 'pipeline.cacheformat')]\n"  # the format is fusion's only pipeline import
        "print(json.dumps([m for m in bad if m in sys.modules] + sorted(pipe)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_auto_batch_keeps_epochs_short_and_scales_lr() -> None:
    assert auto_batch(200, 2e-3) == (128, 2e-3)  # small sets: the usual 128
    assert auto_batch(20 * 128, 2e-3) == (128, 2e-3)
    bs, lr = auto_batch(8500, 2e-3)
    assert bs % 32 == 0 and -(-8500 // bs) <= 20 and bs - 8500 / 20 < 32  # just big enough
    assert lr == pytest.approx(2e-3 * (bs / 128) ** 0.5)


def test_loss_tie_break_needs_a_real_improvement() -> None:
    assert loss_min_delta(float("inf")) == 0.0  # the first epoch always counts
    assert loss_min_delta(0.0006) == 1e-3  # noise-sized creeping of a saturated model: no
    assert loss_min_delta(0.5) == pytest.approx(5e-3)


def test_load_inputs_reads_only_the_sequences_a_head_uses(signal_cache: Path) -> None:
    fs = open_set(signal_cache, "synth")
    rows = np.flatnonzero(fs.complete)
    full = fs.load(["audio", "text"], rows)
    part = load_inputs(fs, ["audio", "text"], rows, ("text",))
    assert list(part) == list(full) == ["audio", "text", "cond"]
    assert set(part["audio"]) == {"present", "pooled"} and "seq" in part["text"]
    for m in part:
        for k, v in part[m].items():
            np.testing.assert_array_equal(v, full[m][k])
    assert {k for d in load_inputs(fs, ["audio"], rows, ()).values() for k in d} == {
        "present", "pooled"}
    assert load_inputs(fs, ["audio"], rows, None)["audio"].keys() == full["audio"].keys()
    # the trainer keeps sequences as stored (float16: half the memory); pooled are float32
    assert part["text"]["seq"].dtype == np.float16 and full["text"]["seq"].dtype == np.float32
    assert part["text"]["pooled"].dtype == np.float32


def test_finite_check_does_not_overflow_on_large_float16_sums() -> None:
    from fusion.data import _all_finite

    big = np.full((400, 64, 384), 3000.0, dtype=np.float16)  # sums far past float16's 65504
    assert _all_finite(big)
    big[3, 5, 7] = np.nan
    assert not _all_finite(big)
    big[3, 5, 7] = np.inf
    assert not _all_finite(big) and not _all_finite(-big)
    # the float16 test reads in blocks: a bad value in the last, partial block counts too
    odd = np.zeros(3 * (1 << 20) + 5, dtype=np.float16)
    assert _all_finite(odd)
    odd[-1] = -np.inf
    assert not _all_finite(odd)
    assert _all_finite(odd[:-1]) and not _all_finite(odd[::-1][::2])  # views, strided


def test_token_head_fit_prepares_once_and_learns(signal_cache: Path, tmp_path: Path) -> None:
    calls: list[int] = []
    made = []

    def factory(spec, n_out, **opts):
        head = build_head("cquery", spec, n_out, **opts)
        inner = head.prepare
        head.prepare = lambda data: calls.append(1) or inner(data)
        made.append(head)
        return head

    m = fit(signal_cache, "synth", factory, ["audio", "text"], seeds=2, runs_dir=tmp_path,
            **{**QUICK, "head_options": {"hidden": 32, "max_tokens": 4}}).metrics
    assert len(calls) == 1 and len(made) == 2  # once per fold, not per seed; no spare head
    assert m["macro_f1"] > m["majority_baseline"]["macro_f1"] + 0.3


def test_a_factory_must_return_a_fusion_head(signal_cache: Path, tmp_path: Path) -> None:
    def plain(spec, n_out, **_):
        return torch.nn.Linear(2, n_out)

    with pytest.raises(TypeError, match="not a fusion.heads.base.FusionHead"):
        fit(signal_cache, "synth", plain, ["audio"], seeds=1, runs_dir=tmp_path, epochs=1)
