"""What `mmemo extract`, `prepare`, `predict` and `cache info|verify|claims` tell a person,
driven through the CLI: progress lines in a batch log, Ctrl-C, --force, where things went,
one-line errors (message, exit code, nothing written that should not be), hostile rows.

Uses the cheap preset and tiny wav clips of tests/pipeline/test_cache_concurrency.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import cachetools
from pipeline.store import Store
from tests.pipeline.test_cache_concurrency import MMEMO, Toy, _env, _units_done_now

pytest.importorskip("opensmile")
pytest.importorskip("sentence_transformers")

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* extract toy: (\d+)/(\d+) clips \(\d+%\), "
    r"(?:\d+\.\d\d|--) clips/s, eta \S+, (\d+) failed so far, elapsed \S+$"
)


def _mmemo(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 400,
           stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([MMEMO, *args], cwd=cwd, env={**_env(), "MMEMO_THREADS": "1", **(env or {})},
                          stdout=stdout, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _extract_args(toy: Toy, cache: Path, *extra: str) -> list[str]:
    return ["extract", "--dataset", "toy", "--cache", str(cache), "--preset", str(toy.preset),
            "--manifests", str(toy.manifests), *extra]


def _error_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("error:")]


N = 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """16 clips; labels re-dealt so that train, validation and test each hold both classes."""
    from pipeline.manifest import read_manifest, write_manifest

    t = Toy(tmp_path_factory.mktemp("fbtoy"), n=N)
    path = t.manifests / "toy" / "train.jsonl"
    clips = read_manifest(path)
    for i, c in enumerate(clips):
        c.labels.emotion, c.labels.emotion_idx = "ab"[(i // 4) % 2], (i // 4) % 2
    write_manifest(clips, path)
    return t


@pytest.fixture(scope="module")
def extracted(toy, tmp_path_factory):
    """The toy set extracted through the CLI with stdout to a file (a batch job's log)."""
    cache = tmp_path_factory.mktemp("fbcache")
    log = toy.base / "extract.log"
    with open(log, "w") as f:
        proc = _mmemo(_extract_args(toy, cache), toy.base, env={"MMEMO_PROGRESS_EVERY": "0.3"}, stdout=f)
    return cache, proc.returncode, log.read_text()


def test_extract_to_a_file_prints_timestamped_progress_lines_and_names_its_outputs(extracted):
    cache, rc, out = extracted
    assert rc == 0, out
    lines = [LINE.match(ln) for ln in out.splitlines()]
    lines = [m for m in lines if m]
    assert len(lines) >= 2, out  # one at the start, one at the end, more in between
    done = [int(m.group(1)) for m in lines]
    assert done == sorted(done) and done[0] == 0 and done[-1] == N and int(lines[-1].group(2)) == N
    assert "\x1b[" not in out  # no terminal control codes in a log file
    key = Store(cache).resolve("toy", "cheap")
    assert f"feature set: {cache / 'sets' / key}" in out
    assert f"subtitles (.srt, .asr.srt, .text.json): {cache / 'srt' / key}" in out
    assert f"failure ledger (one .jsonl per unit): {cache / 'sets' / key / 'ledger'}" in out


def test_rerun_summary_describes_the_set(toy, extracted):
    cache, rc, _ = extracted
    assert rc == 0
    out = _mmemo(_extract_args(toy, cache), toy.base).stdout
    assert _units_done_now(out) == 0 and re.search(rf"\b0 / {N}\b", out), out
    assert "clips in the set / in finished units" in out and re.search(rf"\b{N} / {N}\b", out)
    # the whole set is described, not this run's (empty) share of it
    assert re.search(rf"modality 'audio'\W+present for all {N} clips", out), out
    assert re.search(rf"modality 'meta'\W+absent for all {N} clips", out), out
    assert not re.search(r"absent\s+0\b", out), out
    assert "clips/s (this run" not in out  # nothing was extracted: no summary rate is shown


def test_progress_every_must_be_a_positive_number(toy, tmp_path):
    proc = _mmemo(_extract_args(toy, tmp_path / "cache"), toy.base, env={"MMEMO_PROGRESS_EVERY": "soon"})
    assert proc.returncode == 2 and _error_lines(proc.stdout) == [
        "error: MMEMO_PROGRESS_EVERY='soon': expected a number of seconds"], proc.stdout
    assert not (tmp_path / "cache").exists()  # nothing written


@pytest.mark.slow
def test_ctrl_c_stops_keeps_finished_units_and_says_how_to_resume(tmp_path):
    (tmp_path / "big").mkdir()
    big = Toy(tmp_path / "big", n=48)
    cache = tmp_path / "cache"
    # SIGINT back to its default in the child, as in a terminal: a test suite started as a
    # background job (`make test &`, nohup) runs with SIGINT ignored, the child inherits that,
    # and the run then finished untouched (rc 0), which looked like a lost Ctrl-C
    proc = subprocess.Popen([MMEMO, *_extract_args(big, cache)], cwd=big.base,
                            env={**_env(), "MMEMO_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    units = lambda: [p for p in cache.glob("sets/*/units/*.done") if p.name != "header.done"]  # noqa: E731
    t0 = time.time()
    while len(units()) < 2 and time.time() - t0 < 300 and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    t_int = time.time()
    out = proc.communicate(timeout=60)[0]
    assert time.time() - t_int < 10, f"took {time.time() - t_int:.1f} s to stop"
    assert proc.returncode == 130, out
    kept = {p.name: p.stat().st_mtime_ns for p in units()}
    assert 2 <= len(kept) < 48
    said = [ln for ln in out.splitlines() if ln.startswith("interrupted:")]
    assert len(said) == 1 and "run the same `mmemo extract --dataset toy" in said[0] and "resume" in said[0], out
    assert f"{len(kept)} of 48 units finished and kept" in said[0]
    assert "Traceback" not in out
    # the rerun resumes: finished units are kept as they are, the rest is done
    again = _mmemo(_extract_args(big, cache), big.base)
    assert again.returncode == 0 and _units_done_now(again.stdout) == 48 - len(kept), again.stdout
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in units() if p.name in kept)
    assert cachetools.verify(cache)[0].clean
    assert not list(cache.glob("claims/*/*.claim"))


@pytest.mark.slow
def test_force_never_removes_finished_units_before_their_replacement(toy, extracted, tmp_path):
    import shutil

    src, rc, _ = extracted
    assert rc == 0
    cache = tmp_path / "cache"
    shutil.copytree(src, cache)
    key = Store(cache).resolve("toy", "cheap")
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "sets" / key / "units").glob("[0-9]*.done")}
    assert len(before) == N
    proc = subprocess.Popen([MMEMO, *_extract_args(toy, cache, "--force")], cwd=toy.base,
                            env={**_env(), "MMEMO_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    markers = cache / "sets" / key / "units"
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None:
        now = {p.name: p.stat().st_mtime_ns for p in markers.glob("[0-9]*.done")}
        if any(now.get(k) != v for k, v in before.items() if k in now) and len(now) == N:
            break  # at least one unit was recommitted
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    # killed mid-force: every unit still has a marker (old or new) and verifies clean
    assert len(list(markers.glob("[0-9]*.done"))) == N
    rep = cachetools.verify(cache)[0]
    assert rep.clean, rep.problems


def test_cache_info_is_short_json_is_complete_unknown_names_are_one_error(toy, extracted):
    cache, rc, _ = extracted
    assert rc == 0
    out = _mmemo(["cache", "info", "toy/cheap", "--cache", str(cache)], toy.base)
    assert out.returncode == 0, out.stdout
    lines = out.stdout.strip().splitlines()
    assert len(lines) <= 20 and lines[0].startswith("set ") and "(toy/cheap)" in lines[0]
    assert any(re.search(rf"units\s+{N}/{N} done", ln) for ln in lines), out.stdout
    js = _mmemo(["cache", "info", "toy/cheap", "--json", "--cache", str(cache)], toy.base)
    assert json.loads(js.stdout)["units"]["done"] == N
    listing = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    for cmd in (["cache", "info", "nosuch"], ["cache", "verify", "nosuch"], ["cache", "info", "toy/nosuch"]):
        bad = _mmemo([*cmd, "--cache", str(cache)], toy.base)
        assert bad.returncode == 2, bad.stdout
        errs = _error_lines(bad.stdout)
        assert len(errs) == 1 and "nosuch" in errs[0] and "Traceback" not in bad.stdout, bad.stdout
        assert len(bad.stdout.strip().splitlines()) == 1, bad.stdout
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == listing  # nothing written


def test_cache_claims_lists_live_and_stale_claims(toy, extracted, tmp_path):
    import shutil
    import socket
    import sys

    src, rc, _ = extracted
    cache = tmp_path / "cache"
    shutil.copytree(src, cache)
    key = Store(cache).resolve("toy", "cheap")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    d = cache / "claims" / key
    d.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    live = {"token": "a", "by": "ann@" + host, "host": host, "pid": os.getpid(), "expires": time.time() + 100}
    dead = {"token": "b", "by": "bob@" + host, "host": host, "pid": gone.pid, "expires": time.time() + 100}
    old = {"token": "c", "by": "cy@elsewhere", "host": "elsewhere", "pid": 1, "expires": time.time() - 5}
    for u, body in ((1, live), (2, dead), (3, old)):
        (d / f"{u}.claim").write_text(json.dumps(body))
    out = _mmemo(["cache", "claims", "--cache", str(cache)], toy.base)
    assert out.returncode == 0, out.stdout
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(rf"{key}\s+│?\s*(\d)\s.*?(live|stale \([^)]*\))", out.stdout)}
    assert rows == {1: "live", 2: "stale (process gone)", 3: "stale (lease expired)"}, out.stdout
    js = json.loads(_mmemo(["cache", "claims", "--json", "--cache", str(cache)], toy.base).stdout)
    assert [(r["unit"], r["state"]) for r in js] == [(1, "live"), (2, "dead"), (3, "expired")]


def test_prepare_reports_hostile_rows_and_prepares_every_other_row(tmp_path):
    root = tmp_path / "data"
    (root / "clips").mkdir(parents=True)
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    for n in ("a.mp4", "b.mp4", "c.wav"):
        (root / "clips" / n).write_bytes(b"x")
    (other_disk / "far.mp4").write_bytes(b"x")
    (root / "clips" / "far.mp4").symlink_to(other_disk / "far.mp4")  # media on another disk
    (root / "clips" / "loop1.mp4").symlink_to(root / "clips" / "loop2.mp4")
    (root / "clips" / "loop2.mp4").symlink_to(root / "clips" / "loop1.mp4")
    huge = "word " * 40_000  # 200,000 characters
    rows = [
        "id,video,audio,text,label,speaker",
        "a,clips/a.mp4,,hello,happy,ann",
        f'big,clips/b.mp4,,"{huge}",sad,ann',
        "loop,clips/loop1.mp4,,,sad,bob",
        "far,clips/far.mp4,,,sad,bob",
        "c,,clips/c.wav,,happy,cy",
        "esc,../other-disk/far.mp4,,,sad,bob",
        f"abs,{other_disk / 'far.mp4'},,,sad,bob",
    ]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    man = tmp_path / "manifests"
    proc = _mmemo(["prepare", "folder", "--root", str(root), "--name", "mine", "--manifests", str(man)], tmp_path)
    assert proc.returncode == 1, proc.stdout  # rows were left out: said, and not a success
    out = proc.stdout
    assert "Traceback" not in out
    # each left-out row is one error: line; the manifests hold the rest; --allow-failures
    # writes the same and exits 0
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 4 and all(ln.endswith("skipped") for ln in errors), out
    assert "4 row(s) left out (above); the manifests hold the other 3 clips" in out, out
    again = _mmemo(["prepare", "folder", "--root", str(root), "--name", "mine", "--manifests", str(man),
                    "--allow-failures"], tmp_path)
    assert again.returncode == 0 and _error_lines(again.stdout) == errors, again.stdout
    assert re.search(r"labels\.csv:3: field 'text' is 200,000 characters \(at most 131,072\); skipped", out), out
    assert re.search(r"labels\.csv:4: media 'clips/loop1\.mp4' is a symlink loop", out), out
    assert re.search(r"labels\.csv:7: path must stay inside the dataset root", out), out
    assert re.search(r"labels\.csv:8: path must be relative to the dataset root", out), out
    from pipeline.manifest import load_dataset

    clips = {c.id: c for c in load_dataset("mine", man)}
    assert sorted(clips) == ["a", "c", "far"]  # every other row, incl. the symlinked media
    assert clips["far"].video == "clips/far.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "manifests", "other-disk"]


def test_predict_on_a_file_that_is_not_media_is_one_error_naming_it(toy, extracted, tmp_path):
    from fusion.train import fit

    cache, rc, _ = extracted
    assert rc == 0
    key = Store(cache).resolve("toy", "cheap")
    res = fit(cache, "toy", "early", ["audio", "text"], seeds=1, runs_dir=tmp_path / "runs", key=key,
              epochs=2, preset="cheap")
    bad = tmp_path / "notavideo.mp4"
    bad.write_text("this is not a video\n" * 50)
    proc = _mmemo(["predict", str(bad), "--run", str(res.run_dir)], tmp_path, env={"MMEMO_CACHE": str(cache)})
    assert proc.returncode == 2, proc.stdout
    errs = _error_lines(proc.stdout)
    assert len(errs) == 1 and str(bad) in errs[0] and "cannot be decoded" in errs[0], proc.stdout
    assert not re.search(r"emotion\s+distribution", proc.stdout) and "Traceback" not in proc.stdout
    # a real clip: the prediction shows the text it used
    good = _mmemo(["predict", str(toy.media / "w1.wav"), "--run", str(res.run_dir), "--text", "a quiet word"],
                  tmp_path, env={"MMEMO_CACHE": str(cache)})
    assert good.returncode == 0, good.stdout
    assert re.search(r"emotion\s+distribution", good.stdout) and "text source: transcript" in good.stdout
    assert re.search(r"^\s+transcript: a quiet word$", good.stdout, re.M), good.stdout
    # a training clip sits where the training rows do; one unlike any of them (loud noise
    # instead of a soft tone) is flagged as an extrapolation
    assert "RMS z" in good.stdout and "warning:" not in good.stdout, good.stdout
    import wave

    import numpy as np

    noise = tmp_path / "noise.wav"
    x = np.random.default_rng(0).uniform(-1, 1, 16000)
    with wave.open(str(noise), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    far = _mmemo(["predict", str(noise), "--run", str(res.run_dir), "--text", "a quiet word"],
                 tmp_path, env={"MMEMO_CACHE": str(cache)})
    assert far.returncode == 0, far.stdout
    warn = [ln for ln in far.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "audio" in warn[0] and "extrapolation" in warn[0], far.stdout


def test_a_clip_that_fails_is_an_error_line_and_exit_1_until_allowed(toy, tmp_path):
    """An unreadable clip: one `error:` line naming it, the file and the reason; the batch goes
    on; exit 1. A rerun (its unit is finished, so not retried) names it again, as an earlier
    run's failure, and exits 1; `--allow-failures` exits 0 with the same lines."""
    import shutil

    from pipeline.manifest import Clip, write_dataset_info, write_manifest

    media = tmp_path / "media"
    media.mkdir()
    for i in (0, 1):
        shutil.copy(toy.media / f"w{i}.wav", media / f"w{i}.wav")
    (media / "empty.wav").write_bytes(b"")
    clips = [Clip(id=f"w{i}", dataset="mixed", split="train", audio=f"w{i}.wav", transcript="a word")
             for i in (0, 1)]
    clips.append(Clip(id="hollow", dataset="mixed", split="train", audio="empty.wav", transcript="a word"))
    man = tmp_path / "manifests"
    write_manifest(clips, man / "mixed" / "train.jsonl")
    write_dataset_info("mixed", {"name": "mixed", "root": str(media)}, man)
    cache = tmp_path / "cache"
    args = ["extract", "--dataset", "mixed", "--cache", str(cache), "--preset", str(toy.preset),
            "--manifests", str(man)]

    first = _mmemo(args, tmp_path)
    assert first.returncode == 1, first.stdout
    errs = _error_lines(first.stdout)
    assert len(errs) == 1 and errs[0].startswith("error: hollow [decode]"), first.stdout
    assert "empty.wav" in errs[0] and "empty (0 bytes)" in errs[0], errs
    assert "1 of 3 clips failed" in first.stdout and "--allow-failures" in first.stdout
    assert "Traceback" not in first.stdout
    fs = Store(cache).open(Store(cache).resolve("mixed", "cheap"))
    assert [f["id"] for f in fs.failures()] == ["hollow"]
    assert int(fs.completed_rows().sum()) == 3  # the batch went on: every unit finished

    again = _mmemo(args, tmp_path)
    assert again.returncode == 1 and _units_done_now(again.stdout) == 0, again.stdout
    (err,) = _error_lines(again.stdout)
    assert err.startswith("error: hollow [decode]") and "earlier run" in err and "--force" in err

    allowed = _mmemo([*args, "--allow-failures"], tmp_path)
    assert allowed.returncode == 0, allowed.stdout
    assert _error_lines(allowed.stdout) == [err]
