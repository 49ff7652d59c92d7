"""The linear probe is fitted once per set of inputs and runs folder (fusion.probe.cached_probe)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fusion.ablate import ablate
from fusion.probe import cached_probe, linear_probe, probe_key
from fusion.splits import Fold, Task
from tests.fusion.conftest import write_feature_set

FAST = {"epochs": 2, "patience": 1, "threads": 1, "head_options": {"hidden": 16}}


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 6)) + np.eye(3, 6)[y] * 1.5
    order = rng.permutation(120)
    fold = Fold(train=np.sort(order[:70]), val=np.sort(order[70:95]), test=np.sort(order[95:]))
    task = Task(target="label", kind="classification", y=y, classes=["a", "b", "c"])
    return x, y, [fold], task


def test_a_probe_is_read_back_for_the_same_inputs_and_refitted_for_others(tmp_path: Path,
                                                                         monkeypatch):
    x, y, folds, task = _problem()
    blocks = [("audio", 6, False)]
    fresh_fits: list = []
    fresh = linear_probe(x, y, folds, task, "macro_f1", False, fits=fresh_fits, blocks=blocks)

    fits: list = []
    first, reused = cached_probe(tmp_path, x, y, folds, task, "macro_f1", False, fits, blocks)
    assert not reused and len(list(tmp_path.glob("*.npz"))) == 1
    again: list = []
    second, reused = cached_probe(tmp_path, x, y, folds, task, "macro_f1", False, again, blocks)
    assert reused
    assert first == second == json.loads(json.dumps(fresh))
    for a, b in zip(fresh_fits, again):
        for name in ("coef", "intercept", "mean", "std"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert b.blocks == blocks

    # anything the probe reads is part of the name: one changed label, another selection
    # metric or class weighting is a new fit, never the stored one
    y2 = y.copy()
    y2[folds[0].train[0]] = (y2[folds[0].train[0]] + 1) % 3
    t2 = Task(target="label", kind="classification", y=y2, classes=task.classes)
    for args in ((x, y2, folds, t2, "macro_f1", False), (x, y, folds, task, "accuracy", False),
                 (x, y, folds, task, "macro_f1", True)):
        _, reused = cached_probe(tmp_path, *args, [], blocks)
        assert not reused
    assert len(list(tmp_path.glob("*.npz"))) == 4

    # an entry cut short (a full disk, a killed writer) is refitted and rewritten
    path = tmp_path / f"{probe_key(x, y, folds, task, 'macro_f1', False)}.npz"
    path.write_bytes(path.read_bytes()[:100])
    third, reused = cached_probe(tmp_path, x, y, folds, task, "macro_f1", False, [], blocks)
    assert not reused and third == first
    assert cached_probe(tmp_path, x, y, folds, task, "macro_f1", False, [], blocks)[1]

    # a folder that cannot be written costs the reuse, not the fit
    (tmp_path / "a-file").write_text("not a folder")
    fits = []
    lin, reused = cached_probe(tmp_path / "a-file" / "probes", x, y, folds, task, "macro_f1",
                               False, fits, blocks)
    assert not reused and lin == first and len(fits) == 1

    # a result JSON cannot hold (here: a set in it) is returned, only not kept
    import fusion.probe as P

    monkeypatch.setattr(P, "linear_probe", lambda *a, **k: linear_probe(*a, **k) | {"odd": {1, 2}})
    lin, reused = cached_probe(tmp_path / "odd", x, y, folds, task, "macro_f1", False, [], blocks)
    assert not reused and lin["odd"] == {1, 2} and not list((tmp_path / "odd").glob("*.npz"))


def test_an_ablation_fits_one_probe_per_modality_subset(tmp_path: Path):
    write_feature_set(tmp_path, n=160, n_groups=16)
    runs = tmp_path / "runs"
    df = ablate(tmp_path, "synth", ["early", "late"], "all,singles", seeds=1, name="g",
                runs_dir=runs, **FAST)
    assert (df["error"] == "").all()
    assert len(list((runs / "g" / ".probes").glob("*.npz"))) == 4  # 4 subsets, 2 heads each
    for mods in ("audio+text+visual", "audio", "text", "visual"):
        probes = [json.loads((runs / "g" / f"{h}__{mods}" / "metrics.json").read_text())
                  ["linear_probe"] for h in ("early", "late")]
        assert probes[0] == probes[1]


def test_the_probe_folder_keeps_its_recently_used_entries_within_its_size(tmp_path: Path,
                                                                          monkeypatch):
    import os
    import time

    from fusion import probe as P

    now = time.time()
    for i in range(6):  # a.npz the least recently used ... f.npz the most
        p = tmp_path / f"{'abcdef'[i]}.npz"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - 600 + 100 * i, now - 600 + 100 * i))
    stale, fresh = tmp_path / ".dead.1.tmp.npz", tmp_path / ".busy.2.tmp.npz"
    for p, age in ((stale, P.STALE_TMP_S + 60), (fresh, 5)):
        p.write_bytes(b"t")
        os.utime(p, (now - age, now - age))

    # 6,000 bytes over a 3,500-byte limit: the oldest go until the rest fit (b, c, d); a
    # stays although it is the oldest, because it is the entry just written
    assert P.prune_probes(tmp_path, limit=3500, keep=tmp_path / "a.npz") == 4
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [".busy.2.tmp.npz", "a.npz",
                                                               "e.npz", "f.npz"]
    assert not stale.exists() and fresh.exists()

    # a read marks an entry as used and a write prunes: of two older entries, the one read
    # back last survives the write of a third when there is room for two
    folder = tmp_path / "probes"
    x, y, folds, task = _problem()
    blocks = [("audio", 6, False)]
    args = [(x, y, folds, task, sel, False) for sel in ("macro_f1", "accuracy", "weighted_f1")]
    names = []
    for a in args[:2]:
        cached_probe(folder, *a, [], blocks)
        names.append(f"{probe_key(*a)}.npz")
    for k, name in enumerate(names):  # both used ten minutes ago, the macro-F1 one first
        os.utime(folder / name, (now - 600 + k, now - 600 + k))
    _, reused = cached_probe(folder, *args[0], [], blocks)  # read: now the most recent
    assert reused
    size = max((folder / n).stat().st_size for n in names)
    monkeypatch.setattr(P, "PROBE_CACHE_BYTES", 2 * size + size // 2)
    cached_probe(folder, *args[2], [], blocks)
    assert sorted(p.name for p in folder.glob("*.npz")) == sorted(
        [names[0], f"{probe_key(*args[2])}.npz"])
