"""The runner end to end: real RAVDESS clips through the folder recipe, resume after a kill,
an external Dask cluster, the error ledger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.manifest import Clip, Labels, write_dataset_info, write_manifest
from pipeline.presets import PRESET_DIR
from pipeline.runner import plan_extract, run_extract
from pipeline.store import Store
from tests.conftest import REPO, shared_path

CHEAP = """
name = "cheap"
[store]
unit_size = 2
inner_chunk = 64
compression = "zstd"
level = 3
max_len = { audio = 16, text = 4, visual = 4 }
[run]
batch_size = 4
clip_timeout = 120
[decode]
backend = "pyav"
[separate]
backend = "none"
[ocr]
backend = "skip"
[faces]
backend = "skip"
[audio]
backend = "egemaps"
[text]
backend = "skip"
[visual]
backend = "skip"
[metadata]
backend = "manifest"
"""


def _ravdess_dataset(tmp: Path, n: int = 6, name: str = "rav") -> tuple[Path, Path]:
    """A manifest over the real RAVDESS wavs (read in place) — no recipe involved."""
    src = shared_path("ravdess-speech", "Actor_01")
    root = src.parent
    wavs = sorted(src.glob("*.wav"))[:n]
    clips = [
        Clip(
            id=w.stem,
            dataset=name,
            split="train",
            audio=f"Actor_01/{w.name}",
            speaker="01",
            labels=Labels(emotion=w.stem.split("-")[2], emotion_idx=int(w.stem.split("-")[2]) - 1),
        )
        for w in wavs
    ]
    man = tmp / "manifests"
    write_manifest(clips, man / name / "train.jsonl")
    write_dataset_info(name, {"name": name, "root": str(root), "classes": [str(i) for i in range(1, 9)]}, man)
    preset = tmp / "cheap.toml"
    preset.write_text(CHEAP)
    return man, preset


def _arrays(cache: Path, key: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(cache / "sets" / key, mode="r")
    out = {}
    for mod in ("audio", "meta"):
        for part in ("pooled", "present", "seq", "len"):
            if f"{mod}/{part}" in g:
                out[f"{mod}/{part}"] = np.asarray(g[f"{mod}/{part}"][:])
    return out


def test_offline_preset_on_real_ravdess_through_folder_recipe(tmp_path):
    """Issue 2 acceptance: audio-only clips → audio present; visual/text absent (not zeros)."""
    from fusion.data import open_set
    from pipeline.recipes import RECIPES

    data = shared_path("ravdess-speech")  # read in place; the labels file lives elsewhere
    rows = ["id,audio,label,speaker"]
    for w in sorted(data.glob("Actor_*/*.wav"))[:12]:
        emo = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
               "06": "fearful", "07": "disgust", "08": "surprised"}[w.stem.split("-")[2]]
        rows.append(f"{w.stem},{w.parent.name}/{w.name},{emo},{w.stem.split('-')[-1]}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    man = tmp_path / "manifests"
    RECIPES["folder"](root=data, out=man, name="ravfolder", labels=labels)
    cache = tmp_path / "cache"
    plan = plan_extract("ravfolder", data, "offline", manifests=man)
    summary = run_extract(plan, cache=cache)
    assert summary.done == plan.layout.n_units and not summary.failures, summary.failures
    g = zarr.open_group(cache / "sets" / plan.key, mode="r")
    n = 12
    assert g["audio/present"][:].all()
    assert g["audio/seq"].shape[0] == n and g["audio/pooled"].shape[0] == n
    assert (g["audio/len"][:] > 0).all()
    # audio-only clips: no visual — marked absent, and the stored rows are not data
    assert not g["visual/present"][:].any()
    # no transcript in the manifest: the text modality is the recognised speech (asr stage)
    assert g["text/present"][:].all()
    folder = cache / "srt" / plan.key
    recs = [json.loads(p.read_text()) for p in folder.glob("*.text.json")]
    assert len(recs) == n and {r["text_source"] for r in recs} == {"asr"}
    assert sum("door" in r["asr"]["text"] for r in recs) >= 6  # bench/asr.py on the raw audio: 9 of these 12
    assert np.isfinite(g["audio/pooled"][:].astype(np.float32)).all()
    fs = open_set(cache, "ravfolder", "offline")
    assert fs.complete.all()


def test_kill_and_rerun_resumes_without_redoing_units(tmp_path):
    man, preset = _ravdess_dataset(tmp_path, n=8)
    ref_cache = tmp_path / "ref"
    plan = plan_extract("rav", None, str(preset), manifests=man)
    run_extract(plan, cache=ref_cache)
    ref = _arrays(ref_cache, plan.key)

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", (
        "import sys; from cli import app; sys.argv=['mmemo','extract','--dataset','rav','--preset',"
        f"{str(preset)!r},'--manifests',{str(man)!r},'--cache',{str(cache)!r}]; app()"
    )]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = cache / "sets" / plan.key / "units"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(units.glob("[0-9]*.done"))) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in units.glob("[0-9]*.done")}
    assert 1 <= len(first) < plan.layout.n_units, "the kill should land mid-run"

    plan2 = plan_extract("rav", None, str(preset), manifests=man)
    # the killed run's claim on its in-flight unit has a lease: take it over quickly
    for c in (cache / "claims" / plan.key).glob("*.claim"):
        body = json.loads(c.read_text() or "{}")
        body["expires"] = 0
        c.write_text(json.dumps(body))
    summary = run_extract(plan2, cache=cache)
    assert summary.skipped >= len(first)
    assert summary.done == plan.layout.n_units - len(first)
    for name, mtime in first.items():
        assert (units / name).stat().st_mtime_ns == mtime, f"unit {name} was redone"
    got = _arrays(cache, plan.key)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_rerun_clears_the_claim_a_stopped_writer_left_on_a_done_unit(tmp_path):
    """Ctrl-C between a unit's commit and its claim's release left a claim that no rerun
    removed (done units are skipped): the skip now clears it when its holder is gone."""
    man, preset = _ravdess_dataset(tmp_path, n=4)
    plan = plan_extract("rav", None, str(preset), manifests=man)
    cache = tmp_path / "cache"
    run_extract(plan, cache=cache)
    store = Store(cache)
    left = store.claim_path(plan.key, 0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left.write_text(json.dumps({"token": "x", "host": __import__("socket").gethostname(),
                                "pid": gone.pid, "expires": time.time() + 3600}))
    assert [c["state"] for c in store.claims()] == ["dead"]
    summary = run_extract(plan_extract("rav", None, str(preset), manifests=man), cache=cache)
    assert summary.done == 0 and summary.skipped == plan.layout.n_units
    assert not left.exists() and store.claims() == []


@pytest.mark.slow
def test_external_dask_cluster_gives_same_arrays(tmp_path):
    man, preset = _ravdess_dataset(tmp_path, n=6)
    plan = plan_extract("rav", None, str(preset), manifests=man)
    run_extract(plan, cache=tmp_path / "local")
    ref = _arrays(tmp_path / "local", plan.key)

    bindir = Path(sys.executable).parent
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        [str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
         "--scheduler-file", str(sched_file), "--no-dashboard"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        addr = json.loads(sched_file.read_text())["address"]
        assert addr.startswith("tcp://127.0.0.1:")
        for _ in range(2):
            procs.append(subprocess.Popen(
                [str(bindir / "dask"), "worker", addr, "--nthreads", "1", "--nworkers", "1",
                 "--no-dashboard", "--host", "127.0.0.1"],
                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(addr) as c:
            c.wait_for_workers(2, timeout=90)
        summary = run_extract(plan, cache=tmp_path / "dask", scheduler=addr)
        assert summary.done == plan.layout.n_units
        got = _arrays(tmp_path / "dask", plan.key)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_bad_clips_go_to_the_ledger_and_the_batch_goes_on(tmp_path):
    man, preset = _ravdess_dataset(tmp_path, n=3)
    root = tmp_path / "data"
    root.mkdir()
    src = shared_path("ravdess-speech", "Actor_01")
    good = sorted(src.glob("*.wav"))[0]
    shutil.copy(good, root / "good.wav")
    (root / "empty.wav").write_bytes(b"")
    (root / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    clips = [
        Clip(id="good", dataset="bad", audio="good.wav", labels=Labels(emotion="a", emotion_idx=0)),
        Clip(id="empty", dataset="bad", audio="empty.wav", labels=Labels(emotion="a", emotion_idx=0)),
        Clip(id="junk", dataset="bad", video="junk.mp4", labels=Labels(emotion="b", emotion_idx=1)),
        Clip(id="gone", dataset="bad", audio="missing.wav", labels=Labels(emotion="b", emotion_idx=1)),
    ]
    write_manifest(clips, man / "bad" / "train.jsonl")
    write_dataset_info("bad", {"name": "bad", "root": str(root), "classes": ["a", "b"]}, man)
    plan = plan_extract("bad", None, str(preset), manifests=man)
    cache = tmp_path / "cache"
    summary = run_extract(plan, cache=cache)
    assert summary.done == plan.layout.n_units
    by_id = {f["id"]: f for f in summary.failures}
    assert set(by_id) == {"empty", "junk", "gone"}
    assert all(f["stage"] == "decode" for f in by_id.values())
    assert "missing.wav" in by_id["gone"]["message"] or "not found" in by_id["gone"]["message"].lower()
    fs = Store(cache).open(plan.key)
    assert {f["id"] for f in fs.failures()} == {"empty", "junk", "gone"}
    g = zarr.open_group(cache / "sets" / plan.key, mode="r")
    assert g["audio/present"][:].tolist() == [True, False, False, False]
    # metadata does not need media, but these clips carry no metadata fields: absent, not zeros
    assert not g["meta/present"][:].any()


def test_presets_ship_with_the_package():
    assert (PRESET_DIR / "offline.toml").exists() and (PRESET_DIR / "full.toml").exists()


def test_auto_unit_size_grows_with_the_set_and_never_with_the_workers() -> None:
    from pipeline.runner import resolve_unit_size

    # small sets: at least 8 units, so that every worker of a small run has work
    assert [resolve_unit_size("auto", n) for n in (1, 6, 64, 160, 255, 256)] == [1, 1, 8, 20, 32, 32]
    assert [resolve_unit_size("auto", n) for n in (257, 1320, 2048)] == [32] * 3
    assert [resolve_unit_size("auto", n) for n in (2049, 4096, 4097, 10_000, 150_000)] == [
        64, 64, 128, 128, 128]
    assert resolve_unit_size(7, 10_000) == 7  # an explicit size is kept
    for bad in (0, -3, "big", 2.5, True):
        with pytest.raises(ValueError, match="unit_size"):
            resolve_unit_size(bad, 100)
    import tomllib

    for preset in ("offline", "full"):  # the shipped presets use it, unsharded up to 128
        st = tomllib.loads((REPO / "pipeline" / "presets" / f"{preset}.toml").read_text())["store"]
        assert st["unit_size"] == "auto" and st["inner_chunk"] >= 128


def test_a_workers_thread_budget_reaches_the_blas_pools() -> None:
    """_limit_threads(1) in a worker limits torch, numpy's OpenBLAS (already loaded) and the
    variables read by pools loaded later: with 2 workers on 2 cores, each worker's 2-thread
    OpenBLAS doubled the audio stage's time (BENCHMARKS.md, scaling)."""
    code = (
        "import numpy, json, os, torch\n"
        "from threadpoolctl import threadpool_info\n"
        "from pipeline.runner import _limit_threads\n"
        "_limit_threads(1)\n"
        "print(json.dumps({'blas': [p['num_threads'] for p in threadpool_info()\n"
        "                            if p['user_api'] == 'blas'],\n"
        "                  'torch': torch.get_num_threads(),\n"
        "                  'env': [os.environ[v] for v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS')]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["blas"] and set(got["blas"]) == {1}, got
    assert got["torch"] == 1 and got["env"] == ["1", "1"], got


def test_ctrl_c_outside_the_worker_pool_still_stops_the_workers_at_once(tmp_path) -> None:
    """A Ctrl-C that lands while the main process updates progress (outside the executor's
    generator) stops the worker processes there and then: before, the pool ran on until the
    interpreter exited (and _stop_pool, reading the processes after shutdown, stopped none)."""
    import psutil

    from pipeline.runner import Interrupted
    from tests.pipeline.test_cache_concurrency import Toy

    toy = Toy(tmp_path, n=40)  # the cheap preset: 40 one-clip units
    plan = toy.plan()
    cache = tmp_path / "cache"

    def progress(res, n_clips: int) -> None:
        raise KeyboardInterrupt  # as if the signal arrived while the progress line was drawn

    with pytest.raises(Interrupted) as caught:  # keeps the traceback (and run_extract's frame)
        run_extract(plan, cache=cache, workers=2, executor="process", progress=progress)
    kept = caught.value.units_kept
    assert 1 <= kept < plan.layout.n_units

    def workers() -> list:  # multiprocessing's resource tracker lives as long as this process
        return [p for p in psutil.Process().children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())]

    assert not workers()
    time.sleep(3)
    assert len(Store(cache).open(plan.key).done_units()) == kept  # nothing committed since


def test_units_in_one_process_take_turns_on_the_models(tmp_path: Path, monkeypatch) -> None:
    """A Dask worker started with several threads runs units side by side in one process. They
    share its loaded stages (one PocketSphinx decoder, one OpenVINO infer request...), so their
    model work must not overlap (runner._MODELS_LOCK); both units still finish."""
    import threading

    from pipeline import runner
    from pipeline.runner import create_set, run_unit, unit_tasks
    from tests.robustness.corpus import CHEAP as CORPUS_CHEAP
    from tests.robustness.corpus import good_clips
    from tests.robustness.corpus import write_dataset as write_corpus

    root, man = tmp_path / "data", tmp_path / "manifests"
    write_corpus(man, "turns", root, good_clips(root, "turns", n=4, with_faces=False))
    preset = tmp_path / "p.toml"
    preset.write_text(CORPUS_CHEAP.replace("minilm", "skip").replace("unit_size = 8", "unit_size = 2"))
    cache = tmp_path / "cache"
    plan = plan_extract("turns", None, str(preset), manifests=man)
    create_set(plan, Store(cache))
    tasks = unit_tasks(plan, cache, [0, 1], None, 60.0, None)
    active, peak, guard = [0], [0], threading.Lock()
    real = runner.process_clips

    def watched(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.3)  # long enough for the other thread to arrive
            return real(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(runner, "process_clips", watched)
    results: list = []
    threads = [threading.Thread(target=lambda t=t: results.append(run_unit(t))) for t in tasks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert sorted(r.status for r in results) == ["done", "done"]
    assert peak[0] == 1


def test_pool_workers_leave_quickly_without_losing_their_output(tmp_path: Path) -> None:
    """Pool workers skip the interpreter's teardown at exit (runner._quick_exit_at_end), after
    the other exit handlers ran and with what they wrote to stdout / stderr still delivered."""
    script = tmp_path / "pool.py"
    script.write_text(
        "import atexit, concurrent.futures as cf, multiprocessing as mp, sys\n"
        "from pipeline.runner import _quick_exit_at_end\n"
        "INIT = _quick_exit_at_end if sys.argv[1] == 'quick' else None\n"
        "class Torn:\n"
        "    def __del__(self):\n"
        "        sys.stderr.write('teardown ')\n"
        "def work(i):\n"
        "    global KEPT\n"
        "    KEPT = Torn()\n"
        "    atexit.register(lambda: sys.stdout.write(f'handler{i} '))\n"
        "    sys.stdout.write(f'out{i} '); sys.stderr.write(f'err{i} ')\n"  # no newline, no flush
        "    return i\n"
        "if __name__ == '__main__':\n"
        "    ex = cf.ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'), initializer=INIT)\n"
        "    assert ex.submit(work, 7).result() == 7\n"
        "    procs = list(ex._processes.values())\n"
        "    ex.shutdown(wait=True)\n"
        "    print('codes', [p.exitcode for p in procs])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for how in ("quick", "plain"):
        out = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, env=env,
                             timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "out7 " in out.stdout and "handler7 " in out.stdout and "err7 " in out.stderr, out
        assert "codes [0]" in out.stdout
        # the teardown (module globals destroyed) is what the quick exit skips
        assert ("teardown" in out.stderr) == (how == "plain"), out


def test_units_with_the_most_media_are_handed_out_first(tmp_path: Path) -> None:
    """A long clip's unit starts first, so that short units fill the workers at the end; the
    cost estimate is the media bytes the plan's fingerprints record (a missing file: 0)."""
    from pipeline.plan import fingerprint_bytes
    from pipeline.runner import largest_first
    from tests.pipeline.test_cache_concurrency import Toy, _write_wav

    toy = Toy(tmp_path, n=8)
    _write_wav(toy.media / "w5.wav", 200, 3.0, 5)  # five times the others
    (toy.media / "w1.wav").unlink()  # a missing file costs nothing: its unit goes last
    plan = toy.plan(overrides=["store.unit_size=2"])
    assert plan.media_bytes[5] > 4 * plan.media_bytes[4] > 0 and plan.media_bytes[1] == 0
    assert largest_first(plan, [0, 1, 2, 3]) == [2, 1, 3, 0]
    assert fingerprint_bytes("12:3:ab|-") == 12 and fingerprint_bytes("missing:FileNotFoundError|-") == 0
    order: list[int] = []
    s = run_extract(plan, cache=tmp_path / "cache", executor="inline",
                    progress=lambda res, n: order.append(res.unit))
    assert order == [2, 1, 3, 0] and s.done == 4
