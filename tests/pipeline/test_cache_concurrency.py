"""The cache's concurrency guarantees with the real runner: many extractors on one cache root,
SIGKILL at random points, corruption found and repaired, configs side by side, and a second
user reusing the first one's results.

A cheap preset (decode pyav, separate none, audio egemaps, text minilm, metadata manifest;
ocr/faces/visual skipped; one clip per unit) runs over tiny generated 16 kHz wav files. Every
process runs torch with one thread so that results are bitwise comparable between runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline import cachetools
from pipeline.store import Store
from tests.conftest import REPO
from tests.pipeline.test_store import read_all

pytest.importorskip("opensmile")
pytest.importorskip("sentence_transformers")

N_CLIPS = 8
PY = sys.executable
MMEMO = str(Path(sys.executable).with_name("mmemo"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO)})
    return env


def _write_wav(path: Path, freq: float, seconds: float, seed: int) -> None:
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(len(t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def _preset(dst: Path, name: str = "cheap", unit_size: int = 1, extra: str = "") -> Path:
    text = (REPO / "pipeline" / "presets" / "offline.toml").read_text()
    for stage in ("ocr", "faces", "visual"):
        text = re.sub(rf'\[{stage}\]\nbackend = "[^"]+"', f'[{stage}]\nbackend = "skip"', text)
    text = re.sub(r'\[separate\]\nbackend = "[^"]+"', '[separate]\nbackend = "none"', text)
    text = re.sub(r'unit_size = (\d+|"auto")', f"unit_size = {unit_size}", text)
    text = text.replace('name = "offline"', f'name = "{name}"') + extra
    dst.write_text(text)
    return dst


class Toy:
    def __init__(self, base: Path, n: int = N_CLIPS):
        from pipeline.manifest import Clip, write_dataset_info, write_manifest

        self.base = base
        self.media = base / "media"
        self.media.mkdir()
        self.manifests = base / "manifests"
        clips = []
        for i in range(n):
            _write_wav(self.media / f"w{i}.wav", 140 + 25 * i, 0.6, i)
            clips.append(Clip(id=f"w{i}", dataset="toy", split="test" if i % 4 == 0 else "train",
                              audio=f"w{i}.wav", transcript=f"a short sentence number {i}",
                              speaker=f"s{i % 2}", labels={"emotion": "ab"[i % 2], "emotion_idx": i % 2}))
        write_manifest(clips, self.manifests / "toy" / "train.jsonl")
        write_dataset_info("toy", {"name": "toy", "root": str(self.media), "classes": ["a", "b"],
                                   "group_by": "speaker"}, self.manifests)
        self.preset = _preset(base / "cheap.toml")
        self.ids = [c.id for c in clips]

    def plan(self, preset: Path | None = None, root: Path | None = None, overrides: list[str] | None = None):
        from pipeline.runner import plan_extract

        return plan_extract("toy", root=root, preset=str(preset or self.preset), overrides=overrides,
                            manifests=self.manifests)

    def cli(self, cache: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [MMEMO, "extract", "--dataset", "toy", "--cache", str(cache), "--preset", str(self.preset),
             "--manifests", str(self.manifests), *extra],
            cwd=self.base, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return Toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def reference(toy):
    """The uninterrupted single-process run (inline, one torch thread)."""
    import torch

    from pipeline.runner import run_extract

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = toy.base / "ref-cache"
        plan = toy.plan()
        s = run_extract(plan, cache=cache, executor="inline")
        assert s.done == plan.layout.n_units and not s.failures, s.failures
    finally:
        torch.set_num_threads(threads)
    return plan.key, cache, read_all(cache / "sets" / plan.key)


def _assert_same(cache: Path, key: str, want: dict[str, np.ndarray]) -> None:
    got = read_all(cache / "sets" / key)
    assert got.keys() == want.keys()
    for rel, arr in want.items():
        assert got[rel].dtype == arr.dtype, rel
        assert np.array_equal(got[rel], arr), f"{rel} differs from the single-process run"


def _units_done_now(output: str) -> int:
    m = re.search(r"units done now / skipped \(already done\)\D+(\d+) / (\d+)", output)
    assert m, output[-3000:]
    return int(m.group(1))


@pytest.mark.slow
def test_four_extractors_and_a_dask_run_on_one_cache(toy, reference, tmp_path, monkeypatch):
    """4 CLI processes and a Dask LocalCluster extract the same set into one cache at once."""
    from pipeline.runner import run_extract

    monkeypatch.setenv("MMEMO_THREADS", "1")  # the reference ran with one torch thread

    key, _, want = reference
    cache = tmp_path / "shared-cache"
    procs = [toy.cli(cache) for _ in range(4)]
    plan = toy.plan()
    dask_summary = run_extract(plan, cache=cache, executor="dask", workers=1)
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    done = [_units_done_now(o) for o in outs] + [dask_summary.done]
    assert sum(done) == plan.layout.n_units, done  # every unit computed exactly once
    assert plan.key == key and Store(cache).list_keys() == [key]
    ids = [str(x) for x in Store(cache).open(key).ids()]
    assert ids == toy.ids  # every clip present exactly once
    rep = cachetools.verify(cache)[0]
    assert rep.clean, rep.problems
    _assert_same(cache, key, want)
    assert not list((cache / "claims" / key).glob("*.claim"))  # all claims released


DRIVER = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from pipeline.runner import plan_extract, run_extract, _stages_for
    base, preset, manifests, seed, cycles, max_delay, stop = sys.argv[1:8]
    plan = plan_extract("toy", preset=preset, manifests=manifests)
    _stages_for(plan.preset, "cpu")  # models load once; forked extractors inherit them
    rng = random.Random(int(seed))

    def extract(cache):
        pid = os.fork()
        if pid == 0:
            try:
                s = run_extract(plan, cache=cache, executor="inline", lease=1.0)
                with open(os.path.join(cache, "summary.json"), "w") as f:
                    json.dump({"done": s.done, "skipped": s.skipped}, f)
                os._exit(0)
            except BaseException:
                import traceback; traceback.print_exc(); os._exit(1)
        return pid

    def n_done(cache):
        units = os.path.join(cache, "sets", plan.key, "units")
        if not os.path.isdir(units):
            return 0
        return len([u for u in os.listdir(units) if u.endswith(".done") and u != "header.done"])

    out = []
    n_units = plan.layout.n_units
    for c in range(int(cycles)):
        cache = os.path.join(base, f"c{c}")
        os.makedirs(cache)
        # a random point: after a random number of committed units, plus a random delay
        # (machines here are shared and slow to start a run, so pure wall-clock delays
        # mostly hit start-up)
        after_units = rng.randint(0, n_units - 1)
        delay = rng.uniform(0.0, float(max_delay))
        pid = extract(cache)
        t0 = time.time()
        while n_done(cache) < after_units and time.time() - t0 < 200:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.005)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        done_at_kill = n_done(cache)
        pid = extract(cache)
        t0 = time.time()
        while True:
            r, status = os.waitpid(pid, os.WNOHANG)
            if r:
                break
            if time.time() - t0 > 240:
                os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); status = -1; break
            time.sleep(0.05)
        summary = json.load(open(os.path.join(cache, "summary.json"))) if status == 0 else None
        out.append({"cycle": c, "after_units": after_units, "delay": delay, "done_at_kill": done_at_kill, "status": status,
                    "rerun": summary, "cache": cache})
    open(stop, "w").write("stop")
    print("RESULT " + json.dumps({"key": plan.key, "n_units": plan.layout.n_units, "cycles": out}))
    """
)

READER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from pathlib import Path
    base, stop, report = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    checked, bad = 0, []
    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()
    while not stop.exists():
        for marker in base.glob("c*/sets/*/units/*.done"):
            if marker.name == "header.done":
                continue
            try:
                m = json.loads(marker.read_text())
            except (OSError, ValueError) as e:  # a marker is written atomically: never partial
                bad.append(f"{marker}: unreadable marker {e}")
                continue
            for rel, want in m["checksums"].items():
                p = marker.parent.parent / rel
                try:
                    ok = sha(p) == want
                except FileNotFoundError:
                    ok = False
                if not ok:
                    bad.append(f"{marker}: {rel} does not match while the marker exists")
                checked += 1
        time.sleep(0.02)
    report.write_text(json.dumps({"checked": checked, "bad": bad}))
    """
)


@pytest.mark.slow
def test_sigkill_at_random_points_loses_and_duplicates_nothing(toy, reference, tmp_path):
    """10 extract runs SIGKILLed at seeded random points (after a random number of committed
    units plus a random delay: mid-unit, mid-commit, between units), each rerun to completion (short
    leases so killed claims expire fast); a reader polls all the while and must never see a
    unit whose marker exists but whose data fails its checksum."""
    key, _, want = reference
    base = tmp_path / "kills"
    base.mkdir()
    stop = tmp_path / "stop"
    report = tmp_path / "reader.json"
    reader = subprocess.Popen([PY, "-c", READER, str(base), str(stop), str(report)], env=_env())
    try:
        drv = subprocess.run(
            [PY, "-c", DRIVER, str(base), str(toy.preset), str(toy.manifests), "1234", "10", "0.3", str(stop)],
            env=_env(), cwd=toy.base, capture_output=True, text=True, timeout=500,
        )
    finally:
        stop.touch()
        reader.wait(60)
    line = [x for x in drv.stdout.splitlines() if x.startswith("RESULT ")]
    assert drv.returncode == 0 and line, drv.stdout[-2000:] + drv.stderr[-4000:]
    res = json.loads(line[0][len("RESULT "):])
    assert res["key"] == key
    n_units = res["n_units"]
    kills_mid_run = 0
    for c in res["cycles"]:
        assert c["status"] == 0, c
        cache = Path(c["cache"])
        # nothing lost: the rerun finished every unit the killed run had not
        assert c["rerun"]["done"] + c["rerun"]["skipped"] == n_units, c
        assert c["rerun"]["done"] == n_units - c["done_at_kill"], c  # nothing recomputed
        kills_mid_run += 0 < c["done_at_kill"] < n_units
        assert [str(x) for x in Store(cache).open(key).ids()] == toy.ids  # nothing duplicated
        rep = cachetools.verify(cache)[0]
        assert rep.clean, (c, rep.problems)
        _assert_same(cache, key, want)
    assert kills_mid_run >= 3, res["cycles"]  # the delays really hit runs in progress
    seen = json.loads(report.read_text())
    assert seen["bad"] == [] and seen["checked"] > 50, seen


@pytest.mark.slow
def test_flipped_byte_is_found_and_repair_restores(toy, reference, tmp_path):
    key, ref_cache, want = reference
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    fs = Store(cache).open(key)
    m = fs.read_done(3)
    target = cache / "sets" / key / sorted(k for k in m["checksums"] if k.startswith("text/seq"))[0]
    b = bytearray(target.read_bytes())
    b[len(b) // 3] ^= 0x10
    target.write_bytes(bytes(b))
    (cache / "sets" / key / "units" / "5.done").unlink()  # and one unit lost its marker
    reps = cachetools.verify(cache, "toy/cheap")
    assert len(reps) == 1 and not reps[0].clean
    assert reps[0].bad_units == [3, 5] and reps[0].missing_units == [5]
    assert any("does not match its checksum" in p for p in reps[0].problems)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = cachetools.repair_set(cache, reps[0], manifests=toy.manifests)
    finally:
        torch.set_num_threads(threads)
    assert n == 2
    assert cachetools.verify(cache)[0].clean
    _assert_same(cache, key, want)
    # a repair refuses when the inputs changed (the key would differ)
    moved = tmp_path / "manifests"
    shutil.copytree(toy.manifests, moved)
    rows = (moved / "toy" / "train.jsonl").read_text().splitlines()
    (moved / "toy" / "train.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    (cache / "sets" / key / "units" / "0.done").unlink()
    with pytest.raises(ValueError, match="changed since it was made"):
        cachetools.repair_set(cache, cachetools.verify(cache)[0], manifests=moved)


@pytest.mark.slow
def test_two_configs_coexist_and_a_second_user_reuses_results(toy, reference, tmp_path):
    import torch

    from pipeline.runner import run_extract

    key, ref_cache, want = reference
    cache = tmp_path / "team-cache"
    shutil.copytree(ref_cache, cache)
    # a second config of the audio stage's storage (max_len) is another set, beside the first
    plan_b = toy.plan(preset=_preset(tmp_path / "short.toml", name="short"),
                      overrides=["store.max_len.audio=16"])
    assert plan_b.key != key
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_extract(plan_b, cache=cache, executor="inline")
    finally:
        torch.set_num_threads(threads)
    store = Store(cache)
    assert store.list_keys() == sorted([key, plan_b.key])
    assert store.resolve("toy", "cheap") == key and store.resolve("toy", "short") == plan_b.key
    assert all(r.clean for r in cachetools.verify(cache))
    b = read_all(cache / "sets" / plan_b.key)
    assert b["audio/seq"].shape[1] == 16 and want["audio/seq"].shape[1] == 64
    np.testing.assert_array_equal(b["text/seq"], want["text/seq"])  # same text config, same values
    _assert_same(cache, key, want)

    # another user: the cache through a symlink, the media through another path
    link_cache = tmp_path / "mnt" / "cache"
    link_cache.parent.mkdir()
    link_cache.symlink_to(cache)
    link_media = tmp_path / "elsewhere-media"
    link_media.symlink_to(toy.media)
    markers = {p.name: p.stat().st_mtime_ns for p in (cache / "sets" / key / "units").glob("*.done")}
    time.sleep(0.05)
    p = toy.cli(link_cache, "--root", str(link_media))
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert _units_done_now(out) == 0 and re.search(r"\b0 / 8\b", out), out  # nothing recomputed
    assert {q.name: q.stat().st_mtime_ns for q in (cache / "sets" / key / "units").glob("*.done")} == markers
    assert store.list_keys() == sorted([key, plan_b.key])
    _assert_same(cache, key, want)


def _claims_of(cache: Path, pid: int) -> list[Path]:
    out = []
    for p in cache.glob("claims/*/*.claim"):
        try:
            if json.loads(p.read_text()).get("pid") == pid:
                out.append(p)
        except (OSError, ValueError):
            continue
    return out


@pytest.mark.slow
def test_three_extractors_one_sigkilled_mid_unit_survivors_take_over_at_once(toy, reference, tmp_path):
    """Three CLI extractors on one cache with the default (un-shortened) lease; one is
    SIGKILLed while it holds a claim (mid-unit). Its process is gone from this host, so the
    survivors take its unit over at once: they finish every unit within a few minutes of the
    kill (not after a lease), and the arrays equal the clean single-process run."""
    import signal

    key, _, want = reference
    cache = tmp_path / "cache"
    procs = []
    for _ in range(3):
        env = {**_env(), "MMEMO_THREADS": "1"}
        procs.append(subprocess.Popen(
            [MMEMO, "extract", "--dataset", "toy", "--cache", str(cache), "--preset", str(toy.preset),
             "--manifests", str(toy.manifests)],
            cwd=toy.base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    victim = procs[0]
    t0 = time.time()
    held: list[Path] = []
    while time.time() - t0 < 240 and victim.poll() is None:
        held = _claims_of(cache, victim.pid)
        if held:
            break
        time.sleep(0.002)
    assert held, "the victim never claimed a unit"
    victim.send_signal(signal.SIGKILL)
    t_kill = time.time()
    victim.wait()
    held_unit = int(held[0].stem)
    outs = [p.communicate(timeout=300)[0] for p in procs[1:]]
    took = time.time() - t_kill
    assert [p.returncode for p in procs[1:]] == [0, 0], outs
    assert took < 180, f"survivors needed {took:.0f} s after the kill"
    plan = toy.plan()
    fs = Store(cache).open(key)
    assert fs.done_units() == set(range(plan.layout.n_units))
    assert fs.is_done(held_unit)  # the unit the victim held when it died
    # each unit computed once: what the survivors did plus what the victim committed
    assert sum(_units_done_now(o) for o in outs) <= plan.layout.n_units
    rep = cachetools.verify(cache)[0]
    assert rep.clean, rep.problems
    _assert_same(cache, key, want)
    assert not list((cache / "claims" / key).glob("*.claim"))  # the dead claim was taken over and released
