"""Protocols, the linear-probe baseline and its flag, fit-time label sets, plutchik across sets."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli import app
from fusion.heads.base import FusionHead, HeadOutput
from fusion.probe import below_baselines, linear_probe
from fusion.protocols import PROTOCOLS, get_protocol, paper_line, relabel
from fusion.splits import Fold, Task
from fusion.train import fit
from tests.fusion.conftest import write_feature_set

QUICK = dict(seeds=1, epochs=6, patience=3, threads=1)
MELD = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
AVAMERG = ["happy", "surprised", "angry", "fear", "sad", "disgusted", "contempt"]
IEMOCAP = ["ang", "hap", "exc", "neu", "sad", "fru", "xxx"]
MODS = {"text": (8, 8, 8, 1.5), "audio": (6, 10, 8, 0.0)}


def _set(root: Path, dataset: str, classes: list[str], **kw) -> str:
    return write_feature_set(root, dataset=dataset, n_classes=len(classes), modalities=MODS,
                             attrs_patch={"classes": classes}, **kw)


# --- the protocol table ---------------------------------------------------------------
def test_every_protocol_is_data_with_one_selection_metric() -> None:
    for name in ("meld-official", "iemocap-loso", "iemocap6", "mosei-standard",
                 "mosi-standard", "ravdess-6fold", "ravdess-5fold", "cremad-actor"):
        p = get_protocol(name)
        assert p.headline in p.reported and p.note
    meld = PROTOCOLS["meld-official"]
    assert (meld.split, meld.headline, meld.class_weight) == ("official", "weighted_f1", False)
    loso = PROTOCOLS["iemocap-loso"]
    assert (loso.split, loso.folds, loso.labels, loso.reported) == (
        "kfold", 5, "iemocap4", ("accuracy", "uar"))
    assert PROTOCOLS["mosei-standard"].reported == (
        "mae", "corr", "acc2", "acc2_nonzero", "f1", "f1_nonzero", "acc7")
    assert PROTOCOLS["ravdess-6fold"].folds == 6 and PROTOCOLS["ravdess-5fold"].folds == 5
    with pytest.raises(KeyError, match="meld-official"):
        get_protocol("meld")
    from fusion.config import FitConfig

    c = meld.config(FitConfig(labels="plutchik", class_weight=True, split="kfold"))
    assert (c.labels, c.class_weight, c.split, c.select_metric, c.protocol) == (
        "plutchik", False, "official", "weighted_f1", "meld-official")
    assert loso.config(FitConfig(labels="plutchik")).labels == "iemocap4"


def test_paper_line_prints_like_papers() -> None:
    m = {"modalities": ["text"], "weighted_f1": 0.5561, "accuracy": 0.581,
         "majority_baseline": {"weighted_f1": 0.31, "accuracy": 0.48},
         "linear_probe": {"weighted_f1": 0.54, "accuracy": 0.57}}
    line = paper_line(m, PROTOCOLS["meld-official"])
    assert line.startswith("meld-official · text · weighted F1 55.6 | WA 58.1")
    assert "probe 54.0 | 57.0" in line and "majority 31.0 | 48.0" in line
    assert "n test" not in line  # not known: not made up
    assert paper_line(m | {"n_test": 1109}, PROTOCOLS["meld-official"]).endswith("; n test 1109)")
    r = {"modalities": ["audio", "text"], "mae": 0.7123, "corr": 0.61, "acc2": 0.8,
         "acc2_nonzero": 0.82, "f1": 0.79, "f1_nonzero": 0.815, "acc7": 0.4}
    line = paper_line(r, PROTOCOLS["mosei-standard"])
    assert "MAE 0.712 | Corr 0.610 | Acc-2 80.0 | Acc-2 (non-0) 82.0" in line


# --- label sets ---------------------------------------------------------------------------
def test_iemocap4_merges_hap_exc_and_counts_what_it_leaves_out() -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 6, 2, -1])
    t, lost = relabel(Task("label", "classification", y, IEMOCAP), "iemocap", "iemocap4")
    assert t.classes == ["ang", "hap", "neu", "sad"]
    assert t.y.tolist() == [0, 1, 1, 2, 3, -1, -1, 1, -1]
    assert lost == {"fru": 1, "xxx": 1}
    t6, lost6 = relabel(Task("label", "classification", y, IEMOCAP), "iemocap", "iemocap6")
    assert len(t6.classes) == 6 and lost6 == {"xxx": 1}
    with pytest.raises(ValueError, match="iemocap"):
        relabel(Task("label", "classification", y, IEMOCAP), "meld", "iemocap4")


def test_plutchik_gives_soft_targets_for_dyads() -> None:
    y = np.arange(7)
    t, lost = relabel(Task("label", "classification", y, AVAMERG), "avamerg", "plutchik")
    assert lost == {} and t.n_out == 9 and t.soft is not None
    contempt = t.soft[6]
    assert contempt[t.classes.index("disgust")] == 0.5 == contempt[t.classes.index("anger")]
    assert t.classes[t.y[0]] == "joy" and np.allclose(t.soft.sum(1), 1.0)


# --- the probe ----------------------------------------------------------------------------
def test_probe_learns_signal_and_flags_a_head_below_it() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 6)) + 2.0 * np.eye(3)[y] @ rng.normal(size=(3, 6))
    idx = np.arange(300)
    f = Fold(idx[:180], idx[180:240], idx[240:])
    task = Task("label", "classification", y, ["a", "b", "c"])
    p = linear_probe(x, y, [f], task, "weighted_f1", class_weight=False)
    assert p["weighted_f1"] > 0.8 and p["model"] == "logistic regression"
    m = {"weighted_f1": 0.5, "majority_baseline": {"weighted_f1": 0.2}, "linear_probe": p}
    assert below_baselines(m, "weighted_f1") == {"majority": False, "linear_probe": True}
    reg = Task("sentiment", "regression", x[:, 0] * 2.0, ["sentiment"])
    pr = linear_probe(x, reg.y, [f], reg, "mae", class_weight=True)
    assert pr["model"] == "ridge" and pr["mae"] < 0.05 and not pr["class_weight"]
    assert below_baselines({"mae": 0.5, "linear_probe": pr}, "mae") == {"linear_probe": True}
    # a head that kept the probe scores it to float32 precision: a tie, not a flag
    tie = {"mae": 0.45629205118785515, "linear_probe": {"mae": 0.45629202280501224}}
    assert below_baselines(tie, "mae") == {"linear_probe": False}
    assert below_baselines({**tie, "mae": 0.4564}, "mae") == {"linear_probe": True}


class BiasOnly(FusionHead):
    """Learns class priors only: the best it can do is the majority class."""

    def __init__(self, spec, n_out: int, **_: object):
        super().__init__()
        self.names = spec.names
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, batch: dict) -> HeadOutput:
        n = batch[self.names[0]]["present"].shape[0]
        return HeadOutput(self.b.expand(n, -1))


def test_fit_under_protocol_reports_probe_flag_and_paper_line(tmp_path: Path) -> None:
    _set(tmp_path / "cache", "meld", MELD, n=420, n_groups=30)
    r = fit(tmp_path / "cache", "meld", "early", ["text"], protocol="meld-official",
            runs_dir=tmp_path / "runs", name="m", **QUICK)
    m = r.metrics
    assert (m["protocol"], m["headline"]) == ("meld-official", "weighted_f1")
    assert m["linear_probe"]["weighted_f1"] > m["majority_baseline"]["weighted_f1"]
    assert set(m["below_baseline"]) == {"majority", "linear_probe"}
    assert m["paper"].startswith("meld-official · text · weighted F1")
    cfg = tomllib.loads((r.run_dir / "config.toml").read_text())
    assert (cfg["protocol"], cfg["select_metric"], cfg["class_weight"]) == (
        "meld-official", "weighted_f1", False)
    # the same fit with a prior-only head is flagged below the probe (and never above majority)
    bad = fit(tmp_path / "cache", "meld", BiasOnly, ["text"], protocol="meld-official",
              runs_dir=tmp_path / "runs", name="bad", **QUICK).metrics
    assert bad["below_baseline"]["linear_probe"] is True
    saved = json.loads((tmp_path / "runs" / "bad" / "metrics.json").read_text())
    assert saved["below_baseline"]["linear_probe"] is True


def test_selection_metric_must_be_one_of_the_task(tmp_path: Path) -> None:
    write_feature_set(tmp_path / "cache", n=120, n_groups=12)
    with pytest.raises(ValueError, match="selection metric 'mae'"):
        fit(tmp_path / "cache", "synth", "early", ["text"], select_metric="mae",
            runs_dir=tmp_path / "runs", **QUICK)


def test_iemocap_loso_fit_uses_the_4_class_set(tmp_path: Path) -> None:
    _set(tmp_path / "cache", "iemocap", IEMOCAP, n=350, n_groups=5, splits=None)
    r = fit(tmp_path / "cache", "iemocap", "early", ["text"], protocol="iemocap-loso",
            runs_dir=tmp_path / "runs", name="loso", **QUICK)
    m = r.metrics
    assert m["classes"] == ["ang", "hap", "neu", "sad"] and m["folds"] == 5
    assert set(m["left_out"]) == {"fru", "xxx"}
    kept = 350 - sum(m["left_out"].values())
    assert m["n_test"] == kept  # every kept row tested once over the 5 sessions
    assert "WA" in m["paper"] and "UA" in m["paper"]


def test_plutchik_cross_dataset_fit(tmp_path: Path) -> None:
    _set(tmp_path / "cache", "meld", MELD, n=300, n_groups=20, seed=1)
    _set(tmp_path / "cache", "avamerg", AVAMERG, n=120, n_groups=10, seed=2)
    r = fit(tmp_path / "cache", "meld", "early", ["text"], labels="plutchik",
            test_dataset="avamerg", runs_dir=tmp_path / "runs", name="x", **QUICK)
    m = r.metrics
    assert m["classes"][:2] == ["joy", "trust"] and len(m["classes"]) == 9
    assert m["n_test"] == 120 and m["test_dataset"] == "avamerg"
    assert sum(c["support"] for c in m["per_class"].values()) == 120
    assert "linear_probe" in m and "per_class" in m["linear_probe"]
    with pytest.raises(ValueError, match="plutchik"):
        fit(tmp_path / "cache", "meld", "early", ["text"], test_dataset="avamerg",
            runs_dir=tmp_path / "runs", **QUICK)


WHEEL = ["joy", "trust", "fear", "surprise", "sadness", "disgust", "anger", "anticipation", "neutral"]


def test_plutchik_on_a_set_already_in_the_space_is_the_identity() -> None:
    y = np.array([0, 5, 8, -1])
    task = Task("label", "classification", y, WHEEL)
    t, lost = relabel(task, "avamerg-plutchik", "plutchik")  # no [map.avamerg-plutchik]: no lookup
    assert t is task and lost == {} and t.soft is None


def test_plutchik_prepared_sets_fit_and_cross_test(tmp_path: Path) -> None:
    """Sets prepared with `--labels plutchik` (their classes are the wheel's) fit as they are,
    and serve as the test set of a fit mapped with --labels plutchik, and the other way round."""
    c = tmp_path / "cache"
    _set(c, "meld", MELD, n=300, n_groups=20, seed=1)
    _set(c, "avamerg", AVAMERG, n=120, n_groups=10, seed=2)
    _set(c, "meld-plutchik", WHEEL, n=270, n_groups=18, seed=3)
    _set(c, "avamerg-plutchik", WHEEL, n=90, n_groups=9, seed=4)
    own = fit(c, "meld-plutchik", "early", ["text"], runs_dir=tmp_path / "runs", name="own", **QUICK)
    same = fit(c, "meld-plutchik", "early", ["text"], labels="plutchik", runs_dir=tmp_path / "runs",
               name="same", **QUICK)
    assert own.metrics["classes"] == WHEEL == same.metrics["classes"]
    assert same.metrics["left_out"] == {} and same.metrics["n_test"] == own.metrics["n_test"]
    assert same.metrics["macro_f1"] == own.metrics["macro_f1"]  # identity: the very same fit
    # MELD mapped at fit time (soft targets), tested on a Plutchik-prepared set (hard labels)
    r = fit(c, "meld", "early", ["text"], labels="plutchik", test_dataset="avamerg-plutchik",
            runs_dir=tmp_path / "runs", name="x1", **QUICK)
    assert r.metrics["n_test"] == 90 and r.metrics["test_dataset"] == "avamerg-plutchik"
    # ... and the training rows keep their soft targets (the test rows get one-hot ones)
    from fusion.config import FitConfig
    from fusion.data import open_set
    from fusion.protocols import open_cross
    from fusion.splits import _task

    fs = open_set(c, "meld")
    task, _ = relabel(_task(fs, "label"), "meld", "plutchik")
    cross = open_cross(c, "avamerg-plutchik", "offline", fs, ["text"], task,
                       FitConfig(labels="plutchik"))
    soft = cross.task.soft
    assert soft is not None and soft.shape == (fs.n + 90, 9)
    assert np.array_equal(soft[:fs.n], task.soft)
    test = cross.offset + cross.rows
    assert np.array_equal(soft[test].argmax(1), cross.task.y[test]) and (soft[test].max(1) == 1).all()
    # a Plutchik-prepared set trained as it is, tested on AvaMERG mapped at fit time
    r = fit(c, "meld-plutchik", "early", ["text"], labels="plutchik", test_dataset="avamerg",
            runs_dir=tmp_path / "runs", name="x2", **QUICK)
    assert r.metrics["n_test"] == 120 and r.metrics["classes"] == WHEEL
    # two Plutchik-prepared sets share their classes: no --labels needed
    r = fit(c, "meld-plutchik", "early", ["text"], test_dataset="avamerg-plutchik",
            runs_dir=tmp_path / "runs", name="x3", **QUICK)
    assert r.metrics["n_test"] == 90


def test_cli_protocol_labels_and_ablate_flags(tmp_path: Path) -> None:
    c = tmp_path / "cache"
    _set(c, "meld", MELD, n=300, n_groups=20, seed=1)
    _set(c, "avamerg", AVAMERG, n=100, n_groups=10, seed=2)
    quick = ["--epochs", "3", "--patience", "2", "--seeds", "1", "--threads", "1"]
    r = CliRunner().invoke(app, ["fit", "--dataset", "meld", "--cache", str(c), "--runs",
                                 str(tmp_path / "runs"), "--protocol", "meld-official",
                                 "--modalities", "text", "--name", "f", *quick])
    assert r.exit_code == 0, r.output
    assert "linear probe" in r.output and "meld-official · text · weighted F1" in r.output
    r = CliRunner().invoke(app, ["fit", "--dataset", "meld", "--cache", str(c), "--runs",
                                 str(tmp_path / "runs"), "--labels", "plutchik",
                                 "--test-dataset", "avamerg", "--modalities", "text", *quick])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["fit", "--dataset", "meld", "--cache", str(c), "--runs",
                                 str(tmp_path / "runs"), "--protocol", "nope", *quick])
    assert r.exit_code == 2 and "meld-official" in r.output
    r = CliRunner().invoke(app, ["ablate", "--dataset", "meld", "--cache", str(c), "--runs",
                                 str(tmp_path / "runs"), "--protocol", "meld-official",
                                 "--fusion", "early", "--modalities", "text;audio", "--name",
                                 "ab", "--epochs", "3", "--patience", "2", "--seeds", "1"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "runs" / "ab" / "ablation.md").read_text()
    assert "probe accuracy" in md and "| flag |" in md
    # audio is pure noise here: the head is at best the majority; a flag or not, the column
    # says it against the probe on the headline metric
    import pandas as pd

    df = pd.read_csv(tmp_path / "runs" / "ab" / "ablation.csv")
    assert set(df["headline"]) == {"weighted_f1"} and "probe_weighted_f1" in df


# --- real data: MELD text (official dev annotations) and AvaMERG text ----------------------
def _real_meld_avamerg(tmp_path: Path) -> Path:
    """MELD's dev CSV (1,109 utterances) cut by dialogue into train / dev / test (dialogues
    0-59 / 60-79 / 80-113: the release's test CSV is not here) and the labelled AvaMERG
    conversations, text only, offline preset, into one cache; the first 400 MELD rows."""
    from pipeline.recipes import RECIPES
    from pipeline.runner import plan_extract, run_extract
    from tests.conftest import shared_path

    meld_root = shared_path("meld", "dev_sent_emo.csv").parent
    ava_root = shared_path("avamerg")
    man, cache = tmp_path / "manifests", tmp_path / "cache"
    RECIPES["meld"](root=meld_root, out=man)
    RECIPES["avamerg"](root=ava_root, out=man)
    (man / "meld" / "train.jsonl").unlink()
    (man / "avamerg" / "test_unlabelled.jsonl").unlink(missing_ok=True)
    dev = [json.loads(x) for x in (man / "meld" / "dev.jsonl").read_text().splitlines()]
    for r in dev:
        d = int(r["dialogue_id"].split("dia")[1])
        r["split"] = "train" if d < 60 else "dev" if d < 80 else "test"
    (man / "meld" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    for ds, limit in (("meld", None), ("avamerg", None)):
        plan = plan_extract(ds, preset="offline", manifests=man, limit=limit,
                            overrides=["text.cond=false"])  # fmt: skip
        run_extract(plan, cache=cache)
    return cache


def test_real_meld_protocol_probe_and_plutchik_cross_to_avamerg(tmp_path: Path) -> None:
    cache = _real_meld_avamerg(tmp_path)
    r = fit(cache, "meld", "early", ["text"], protocol="meld-official", seeds=2, threads=1,
            runs_dir=tmp_path / "runs", name="meld")
    m = r.metrics
    assert (m["n_train"], m["n_val"], m["n_test"]) == (594, 221, 294)
    probe, base = m["linear_probe"]["weighted_f1"], m["majority_baseline"]["weighted_f1"]
    assert probe > base + 0.1  # MiniLM text vectors carry MELD's emotions
    # issue 14: the fit is not below its probe (the head's linear path starts from the probe)
    print("meld-official head / probe weighted F1:", m["weighted_f1"], probe)
    assert m["weighted_f1"] >= probe - 0.005, (m["weighted_f1"], probe)
    assert "weighted F1" in m["paper"] and "probe" in m["paper"]
    x = fit(cache, "meld", "early", ["text"], labels="plutchik", test_dataset="avamerg",
            seeds=1, threads=1, runs_dir=tmp_path / "runs", name="cross").metrics
    assert x["test_dataset"] == "avamerg" and x["n_test"] == 116
    assert len(x["per_class"]) == 9 and x["per_class"]["joy"]["support"] > 0
    assert x["accuracy"] > x["majority_baseline"]["accuracy"]


def test_a_protocol_names_the_settings_it_overrides() -> None:
    """`--protocol` replaces split / folds / labels / ...: a setting the user asked for that it
    replaces is a warning line (fit puts them in metrics.json's warnings; ablate prints them)."""
    from fusion.config import FitConfig

    meld = get_protocol("meld-official")
    assert meld.overrides(FitConfig()) == []  # defaults are not "asked for"
    lines = meld.overrides(FitConfig(split="kfold", folds=3, class_weight=True))
    assert [ln.split(" sets ")[1].split(" =")[0] for ln in lines] == ["split", "folds"]
    assert "'official'" in lines[0] and "'kfold'" in lines[0]
    assert meld.overrides(FitConfig(split="official")) == []  # what it sets anyway
