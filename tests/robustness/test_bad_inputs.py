"""Broken and hostile inputs through `mmemo extract` (the runner) and `mmemo fit`.

Two extract runs over the corpus (tests/robustness/corpus.py), both through the CLI:
* the *cheap* run (decode, passthrough separation, eGeMAPS, MiniLM text, metadata) over every
  case that needs no faces, mixed with good clips of two classes, with the default exit;
* the *visual* run, the real offline preset (OCR, faces, visual) over the face/frame cases
  plus a few failing ones, with `--allow-failures`.
For every case: the ledger line (id, stage, reason) or the right modalities present/absent;
the batch goes on; the cache holds no NaN and no partial rows; the summary counts failures;
failed clips are `error:` lines and exit 1 unless `--allow-failures`. Then a fit on the
resulting sets.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import ManifestError, read_manifest
from tests.robustness.corpus import (
    CASE_NAMES,
    CHEAP,
    MANIFEST_CASE_NAMES,
    OFFLINE_LIMITS,
    Case,
    assert_clean_cache,
    good_clips,
    ids_of,
    ledger,
    make_corpus,
    manifest_cases,
    run_mmemo,
    set_key,
    start_mmemo,
    write_dataset,
)

pytestmark = [pytest.mark.robustness]
# the tests that share the two extract runs (~80 s together on 2 cores)
SLOW = pytest.mark.slow

# failing cases that also go through the visual run (so a run allowed to fail clips is seen)
VISUAL_EXTRA = ("empty_file", "oversize_frame", "wav_named_mp4")


@dataclass
class Run:
    """One `mmemo extract` run over part of the corpus."""

    name: str
    preset: str
    allow_failures: bool
    cases: list[Case]
    good: list[str]
    cache: Path
    key: str
    rc: int
    out: str
    seconds: float

    def case(self, name: str) -> Case | None:
        return next((c for c in self.cases if c.name == name), None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("robust")
    root = base / "data"
    cases = make_corpus(root, base / "outside")
    good = good_clips(root, "corpus", n=12)
    return {"base": base, "root": root, "cases": cases, "good": good}


def _start(corpus: dict, name: str, preset_args: list[str], cases: list[Case], good: list[dict],
           allow_failures: bool) -> tuple[subprocess.Popen, Callable[[], Run]]:
    """Launch `mmemo extract` over `good` + `cases`; returns the process and a collector."""
    base: Path = corpus["base"]
    man, cache = base / "manifests", base / "cache"
    rows = good + [r for c in cases for r in c.rows]
    write_dataset(man, name, corpus["root"], rows)
    args = ["extract", "--dataset", name, "--manifests", str(man), "--cache", str(cache), *preset_args]
    t0 = time.perf_counter()
    proc = start_mmemo(args + (["--allow-failures"] if allow_failures else []), cwd=base)

    def collect() -> Run:
        out, err = proc.communicate(timeout=600)
        secs = time.perf_counter() - t0
        assert "Traceback" not in out + err, out + err
        preset = "robust-cheap" if "robust-cheap" in " ".join(preset_args) else "offline"
        key = set_key(cache, name, preset)
        return Run(name, preset, allow_failures, cases, [r["id"] for r in good], cache, key, proc.returncode,
                   out, secs)

    return proc, collect


@pytest.fixture(scope="module")
def both_runs(corpus) -> dict[str, Run]:
    """The cheap and the visual run, started together (two cores, two processes)."""
    preset = corpus["base"] / "robust-cheap.toml"
    preset.write_text(CHEAP)
    cheap = [c for c in corpus["cases"] if not c.needs_visual]
    visual = [c for c in corpus["cases"] if c.needs_visual or c.name in VISUAL_EXTRA]
    sets = [a for kv in OFFLINE_LIMITS for a in ("--set", kv)]
    started = [
        _start(corpus, "cheap", ["--preset", str(preset)], cheap, corpus["good"], allow_failures=False),
        _start(corpus, "visual", ["--preset", "offline", *sets], visual, corpus["good"][:4], allow_failures=True),
    ]
    try:
        runs = [collect() for _, collect in started]
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
    return {"cheap": runs[0], "visual": runs[1]}


@pytest.fixture(scope="module")
def cheap_run(both_runs) -> Run:
    return both_runs["cheap"]


@pytest.fixture(scope="module")
def visual_run(both_runs) -> Run:
    return both_runs["visual"]


def _runs(request) -> list[Run]:
    return [request.getfixturevalue("cheap_run"), request.getfixturevalue("visual_run")]


# --- the corpus is what the issue asks for -------------------------------------------------------
def test_corpus_covers_the_issue(corpus):
    names = {c.name for c in corpus["cases"]} | {c.name for c in manifest_cases(corpus["base"] / "m")}
    must = {"empty_file", "truncated_mp4", "wav_named_mp4", "mp4_named_wav", "audio_only_container",
            "video_only_container", "undecodable_stream", "no_face", "several_faces", "uhd_4k",
            "long_clip", "silent_audio", "dc_audio", "clipped_full_scale", "nan_samples",
            "variable_frame_rate", "rotated_video", "non_utf8_transcript", "mixed_encoding_transcript",
            "empty_transcript", "duplicate_ids", "dotdot_id", "absolute_path", "symlink_loop",
            "missing_file"}
    assert must <= names, must - names
    assert len(names) >= 20
    sizes = [p.stat().st_size for p in corpus["root"].rglob("*") if p.is_file() and not p.is_symlink()]
    assert sum(sizes) < 8 * 2**20, "the corpus must stay small"


# --- exit codes and the summary --------------------------------------------------------------------
@SLOW
def test_failed_clips_make_a_nonzero_exit_unless_allowed(cheap_run, visual_run):
    n_fail = len({f["id"] for f in ledger(cheap_run.cache, cheap_run.key)})
    assert n_fail == sum(c.kind == "ledger" for c in cheap_run.cases)
    assert cheap_run.rc == 1, cheap_run.out[-3000:]
    # the same kind of run with --allow-failures: failures are reported, the exit code is 0
    assert any(c.kind == "ledger" for c in visual_run.cases)
    assert visual_run.rc == 0, visual_run.out[-3000:]


@SLOW
@pytest.mark.parametrize("which", ["cheap_run", "visual_run"])
def test_summary_counts_the_failed_clips(which, request):
    run: Run = request.getfixturevalue(which)
    expected = {cid for c in run.cases if c.kind == "ledger" for cid in c.ids}
    m = re.search(r"clips with a failure \(this run / whole set\)\D+(\d+)", run.out)
    assert m, run.out[-3000:]
    assert int(m.group(1)) == len(expected)
    for stage in {f["stage"] for f in ledger(run.cache, run.key)}:
        assert re.search(rf"failed at {stage}\D+\d+", run.out), stage
    shown = re.findall(r"^error: (\S+) \[", run.out, re.M)
    assert set(shown) <= expected and len(shown) == min(10, len(ledger(run.cache, run.key)))


@SLOW
@pytest.mark.parametrize("which", ["cheap_run", "visual_run"])
def test_batch_goes_on_and_cache_has_no_nan_or_partial_rows(which, request):
    run: Run = request.getfixturevalue(which)
    present = assert_clean_cache(run.cache, run.key)
    ids = ids_of(run.cache, run.key)
    good = np.isin(ids, run.good)
    assert good.sum() == len(run.good)
    assert present["audio"][good].all(), "a good clip lost its audio"
    assert present["meta"].all(), "metadata needs no media: present on every row"
    if "visual" in present:
        assert present["visual"][good].all(), "a good clip lost its face features"


# --- every case, one by one ------------------------------------------------------------------------
@SLOW
@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_defined_behaviour(name, request):
    runs = [r for r in _runs(request) if r.case(name)]
    assert runs, f"case {name} is in no run"
    for run in runs:
        case = run.case(name)
        assert case is not None
        rows = ledger(run.cache, run.key)
        mine = [f for f in rows if f["id"] in case.ids]
        ids = ids_of(run.cache, run.key)
        row = ids.index(case.ids[0])
        present = assert_clean_cache(run.cache, run.key)
        if case.kind == "ledger":
            assert mine, f"{name}: no ledger line in the {run.name} run"
            hit = [f for f in mine if re.fullmatch(case.stage, f["stage"])
                   and re.search(case.reason, f["message"], re.I)]
            assert hit, f"{name}: ledger lines {mine} do not match stage {case.stage!r} / {case.reason!r}"
            assert all(f["id"] == case.ids[0] and f["message"] and f["error"] for f in mine)
            media_mods = [m for m in ("audio", "visual") if m in present]
            assert not any(present[m][row] for m in media_mods), f"{name}: a failed clip has media features"
        else:
            assert not mine, f"{name}: expected success, ledger says {mine}"
            for m, want in case.present.items():
                if m in present:
                    assert bool(present[m][row]) == want, f"{name}: {m} present={present[m][row]}, want {want}"


# --- manifest-level problems ----------------------------------------------------------------------
@pytest.mark.parametrize("name", MANIFEST_CASE_NAMES)
def test_manifest_problems_fail_validation_with_file_line_field(name, tmp_path):
    root = tmp_path / "data"
    case = next(c for c in manifest_cases(root, "hostile") if c.name == name)
    man = tmp_path / "manifests"
    d = man / "hostile"
    d.mkdir(parents=True)
    path = d / "train.jsonl"
    path.write_bytes(case.manifest or b"")
    (d / "dataset.json").write_text(f'{{"name": "hostile", "root": "{root}", "classes": ["a", "b"]}}')
    with pytest.raises(ManifestError) as ei:
        read_manifest(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{case.line}: field '{case.field_name}'"), msg
    assert re.search(case.reason or "", msg), msg

    cache = tmp_path / "cache"
    proc = run_mmemo(["extract", "--dataset", "hostile", "--manifests", str(man), "--cache", str(cache)],
                     cwd=tmp_path)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert f"{path}:{case.line}: field '{case.field_name}'" in out, out
    assert "Traceback" not in out
    assert not cache.exists() or not any(cache.rglob("*")), "a refused manifest wrote to the cache"


# --- things that happen during a run ---------------------------------------------------------------
def _inline_dataset(tmp_path: Path, corpus: dict, rows: list[dict], name: str) -> tuple[Path, Path]:
    man = tmp_path / "manifests"
    write_dataset(man, name, corpus["root"], rows)
    preset = tmp_path / "p.toml"
    preset.write_text(CHEAP.replace("unit_size = 8", "unit_size = 2").replace("minilm", "skip"))
    return man, preset


def test_file_disappearing_mid_run_and_partial_media_status(tmp_path, corpus):
    """A file deleted after planning (between units) → ledger line; truncated / capped clips
    succeed and their status says so; the run's summary counts all of it."""
    from pipeline.runner import plan_extract, run_extract

    root: Path = corpus["root"]
    shutil.copy(root / "good" / "good00.mp4", root / "media" / "vanishing.mp4")
    by = {c.name: c for c in corpus["cases"]}
    g = corpus["good"]
    rows = [g[0], g[1], {**g[2], "id": "vanishing", "video": "media/vanishing.mp4"}, g[3],
            by["truncated_faststart"].rows[0], by["long_clip"].rows[0]]
    man, preset = _inline_dataset(tmp_path, corpus, rows, "vanish")
    plan = plan_extract("vanish", None, str(preset), manifests=man)
    assert not plan.key.endswith("missing")  # it was there when planned

    gone = root / "media" / "vanishing.mp4"

    def progress(res, n):  # once another unit is committed, the file of unit 1 goes away
        if res.unit != 1 and gone.exists():  # (units run largest first, not in index order)
            gone.unlink()

    cache = tmp_path / "cache"
    summary = run_extract(plan, cache=cache, progress=progress)
    assert summary.done == plan.layout.n_units == 3
    assert [(f["id"], f["stage"]) for f in summary.failures] == [("vanishing", "decode")]
    assert "not found" in summary.failures[0]["message"]
    assert summary.n_failed_clips == 1
    present = assert_clean_cache(cache, plan.key)
    assert present["audio"].tolist() == [True, True, False, True, True, True]
    st = " | ".join(summary.statuses)
    assert re.search(r"decode: truncated", st), st
    assert re.search(r"decode: only the first N s of N s were decoded \(max_duration\)", st), st


def test_clip_timeout_gives_up_on_a_hanging_decode(tmp_path, corpus, monkeypatch):
    """`[run] clip_timeout`: a decode that hangs is given up on; the batch goes on."""
    import pipeline.stages.decode as dec
    from pipeline.runner import plan_extract, run_extract

    real = dec.decode_clip

    def slow(root, clip, config):
        if clip.id == "hangs":
            time.sleep(6)  # a stuck network read, say
        return real(root, clip, config)

    monkeypatch.setattr(dec, "decode_clip", slow)
    g = corpus["good"]
    rows = [g[0], {**g[1], "id": "hangs"}, g[2]]
    man, preset = _inline_dataset(tmp_path, corpus, rows, "hang")
    preset.write_text(preset.read_text().replace("clip_timeout = 120", "clip_timeout = 1.5"))
    plan = plan_extract("hang", None, str(preset), manifests=man)
    t0 = time.perf_counter()
    summary = run_extract(plan, cache=tmp_path / "cache")
    assert time.perf_counter() - t0 < 30
    assert [(f["id"], f["stage"]) for f in summary.failures] == [("hangs", "decode")]
    assert "clip_timeout=1.5" in summary.failures[0]["message"]
    present = assert_clean_cache(tmp_path / "cache", plan.key)
    assert present["audio"].tolist() == [True, False, True]


# --- mmemo fit on what the corpus left ------------------------------------------------------------
@SLOW
def test_fit_on_the_corpus_set_through_the_cli(cheap_run, corpus):
    runs = corpus["base"] / "runs"
    proc = run_mmemo(["fit", "--dataset", "cheap", "--preset", "robust-cheap", "--cache", str(cheap_run.cache),
                      "--fusion", "early", "--seeds", "1", "--epochs", "5", "--runs", str(runs),
                      "--name", "corpus-fit"], cwd=corpus["base"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    metrics = json.loads((runs / "corpus-fit" / "metrics.json").read_text())
    flat = [v for v in _numbers(metrics)]
    assert flat and all(np.isfinite(flat))


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []
