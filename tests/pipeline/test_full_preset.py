"""The full preset end to end, offline: tiny random-initialised models of the real
architectures (wav2vec2, BERT, a CLIP vision tower) saved locally, demucs's own packaged
``demucs_unittest`` HDemucs, rapidocr and MTCNN, on real clips read in place.

Proves the loading path of every full backend works from local folders with no network
(sockets are refused while it runs), that the set's layout follows the models (hidden sizes),
that absent modalities are masked, and that provenance names the local model paths. A
missing model fails the CLI with one line naming the model and how to provide it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.recipes import RECIPES
from pipeline.runner import Plan, Summary, plan_extract, run_extract
from pipeline.stages.visual import pooled_dim
from tests.conftest import REPO, shared_path
from tests.helpers_tiny_models import (
    AUDIO_DIM,
    AUDIO_STATES,
    TEXT_DIM,
    TEXT_STATES,
    VISION_DIM,
    VISION_STATES,
    WHISPER_DIM,
    WHISPER_STATES,
    TinyModels,
    save_tiny_models,
)

DATASET = "fulltiny"
RAV = "ravdess-speech/Actor_01/03-01-05-02-01-01-01.wav"
# id, video, audio, text, title, label, speaker, split, views (-> metadata)
ROWS = [
    ("film", "video/film_zh_subs.mp4", "", "I am so happy today.", "what a day", "happy", "a", "train", "120"),
    ("ugc", "video/ugc_face_zh_subs.mp4", "", "we lost the game!", "", "sad", "b", "train", "7"),
    ("rav", "", RAV, "", "you want some milk?", "angry", "c", "train", "3"),
]
# Which modality each clip must have. film: everything. ugc: no title -> no cond.
# rav: audio-only (no visual), no transcript or subtitles: its text is the recognised speech
# (the tiny random Whisper's output, see the asr check below).
PRESENT = {
    "audio": [True, True, True],
    "text": [True, True, True],
    "cond": [True, False, True],
    "visual": [True, True, False],
    "meta": [True, True, True],
}


@dataclass
class FullRun:
    models: TinyModels
    manifests: Path
    cache: Path
    plan: Plan
    summary: Summary
    overrides: list[str]


def _write_dataset(tmp: Path) -> Path:
    data = shared_path("video", "film_zh_subs.mp4").parents[1]  # ../shared/data, read in place
    shared_path(RAV)
    lines = ["id,video,audio,text,title,label,speaker,split,views"]
    lines += [",".join(r) for r in ROWS]
    labels = tmp / "labels.csv"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    man = tmp / "manifests"
    res = RECIPES["folder"](root=data, out=man, name=DATASET, labels=labels)
    assert not res.missing, res.missing
    return man


def _no_network(*_a, **_k):
    raise OSError("network access attempted during an offline full-preset run")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    return save_tiny_models(tmp_path_factory.mktemp("tiny_models"), asr=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny: TinyModels) -> FullRun:
    tmp = tmp_path_factory.mktemp("full_preset")
    man = _write_dataset(tmp)
    overrides = [
        *tiny.overrides(),
        'separate.model="demucs_unittest"',  # demucs's packaged HDemucs: random weights, no download
        "decode.max_duration=4.0",  # bounds the CPU time of demucs (the 8 s clip is cut to 4 s)
    ]
    cache = tmp / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        plan = plan_extract(DATASET, preset="full", overrides=overrides, manifests=man)
        summary = run_extract(plan, cache=cache)  # inline: the patch covers the model loads
    return FullRun(tiny, man, cache, plan, summary, overrides)


@pytest.mark.slow  # ~30-50 s on 2 shared cores: demucs, rapidocr and MTCNN on real clips
def test_full_preset_runs_end_to_end_with_tiny_local_models(full_run: FullRun) -> None:
    s, plan = full_run.summary, full_run.plan
    assert s.done == plan.layout.n_units and not s.failures, s.failures
    g = zarr.open_group(full_run.cache / "sets" / plan.key, mode="r")
    attrs = dict(g.attrs["mmemo"])
    assert attrs["preset"] == "full" and attrs["dataset"] == DATASET and attrs["n"] == 3
    assert [str(i) for i in g["ids"][:]] == [r[0] for r in ROWS]

    # the layout follows the models: hidden sizes of the tiny wav2vec2 / BERT / CLIP tower
    mods = attrs["modalities"]
    visual_seq = 1 + VISION_DIM  # face flag + CLIP pooled output
    expected = {
        "audio": (AUDIO_DIM, AUDIO_DIM, 128),
        "text": (TEXT_DIM, TEXT_DIM, 32),
        "visual": (visual_seq, pooled_dim(visual_seq), 32),
    }
    for m, (seq_dim, pdim, max_len) in expected.items():
        assert (mods[m]["seq_dim"], mods[m]["pooled_dim"], mods[m]["max_len"]) == (seq_dim, pdim, max_len), m
        assert g[f"{m}/seq"].shape == (3, max_len, seq_dim)
        assert g[f"{m}/pooled"].shape == (3, pdim)
    assert mods["cond"]["pooled_dim"] == TEXT_DIM and g["cond/pooled"].shape == (3, TEXT_DIM)
    # every hidden state pooled per clip: layers [N, L+1, D], declared in the layout
    states = {"audio": (AUDIO_STATES, AUDIO_DIM), "text": (TEXT_STATES, TEXT_DIM),
              "visual": (VISION_STATES, VISION_DIM)}  # fmt: skip
    check_layers(g, mods, states)
    assert "n_layers" not in mods["cond"] and "cond/layers" not in g and "meta/layers" not in g

    # provenance names the local folders the models were loaded from
    local = {"audio": full_run.models.audio, "text": full_run.models.text,
             "cond": full_run.models.text, "visual": full_run.models.vision}  # fmt: skip
    for m, path in local.items():
        prov = mods[m]["provenance"]
        assert prov["config"]["model"] == str(path), m
        assert prov["models"][0]["id"] == str(path), m
    assert mods["audio"]["provenance"]["backend"] == "hf-audio"
    assert mods["text"]["provenance"]["backend"] == "hf-text"
    assert mods["visual"]["provenance"]["backend"] == "hf-vision"
    stages = {st["stage"]: st for st in attrs["stages"]}
    assert stages["separate"]["backend"] == "demucs"
    assert stages["separate"]["models"] == [{"id": "demucs:demucs_unittest", "revision": "packaged"}]
    assert stages["ocr"]["backend"] == "rapidocr" and stages["faces"]["backend"] == "mtcnn"
    assert s.statuses["separate: demucs:demucs_unittest"] == 3  # every clip went through demucs

    # present masks: absent is masked, never zero-filled as if real
    for m, want in PRESENT.items():
        assert g[f"{m}/present"][:].tolist() == want, m
    # the asr stage (Whisper) ran on every clip; only rav's text came from it
    assert stages["asr"]["backend"] == "whisper" and stages["asr"]["config"]["model"] == str(full_run.models.asr)
    recs = {r[0]: json.loads((full_run.cache / "srt" / full_run.plan.key / f"{r[0]}.text.json").read_text())
            for r in ROWS}  # fmt: skip
    assert recs["rav"]["text_source"] == "asr" and recs["rav"]["asr"]["text"]
    assert recs["film"]["text_source"].startswith("transcript") and recs["film"]["asr"]["backend"] == "whisper"
    for m in ("audio", "text", "visual"):
        present, lens = g[f"{m}/present"][:], g[f"{m}/len"][:]
        assert (lens[present] > 0).all() and (lens[~present] == 0).all(), m
        assert (lens <= mods[m]["max_len"]).all()
    # 3-4 s of audio at 20 ms per wav2vec2 frame overflows max_len 128: pooled into it
    assert g["audio/len"][:].tolist() == [128, 128, 128]

    # everything stored is finite, and present rows carry real (non-constant) features
    for m in ("audio", "text", "cond", "visual", "meta"):
        pooled = g[f"{m}/pooled"][:].astype(np.float32)
        assert np.isfinite(pooled).all(), m
        for i in np.flatnonzero(g[f"{m}/present"][:]):
            assert pooled[i].std() > 0, (m, i)
        if f"{m}/seq" in g:
            assert np.isfinite(g[f"{m}/seq"][:].astype(np.float32)).all(), m
    # different clips, different embeddings (the models really ran on each clip)
    a = g["audio/pooled"][:].astype(np.float32)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])

    # the OCR output of the full preset lands beside the set
    srt = full_run.cache / "srt" / plan.key / "film.srt"
    assert srt.is_file() and "-->" in srt.read_text(encoding="utf-8")

    # and the fusion side reads the set like any other
    from fusion.data import open_set

    fs = open_set(full_run.cache, DATASET, preset="full")
    assert fs.key == plan.key and fs.complete.all()
    assert {"audio", "text", "visual"} <= set(fs.available)


def check_layers(g: zarr.Group, mods: dict, states: dict[str, tuple[int, int]]) -> None:
    """`<m>/layers` has the declared shape, float16, finite, zero exactly on absent rows; for
    audio and text (pooled = the last layer's mean) its last state is the pooled vector."""
    for m, (n_states, dim) in states.items():
        assert (mods[m]["n_layers"], mods[m]["layer_dim"]) == (n_states, dim), m
        arr = g[f"{m}/layers"]
        assert arr.shape == (3, n_states, dim) and arr.dtype == np.float16, m
        lay = arr[:].astype(np.float32)
        present = g[f"{m}/present"][:]
        assert np.isfinite(lay).all() and (lay[~present] == 0).all(), m
        assert all(lay[i].std() > 0 for i in np.flatnonzero(present)), m
        if m in ("audio", "text"):
            np.testing.assert_allclose(lay[present, -1], g[f"{m}/pooled"][:][present].astype(np.float32),
                                       rtol=2e-3, atol=2e-3)  # fmt: skip


@pytest.mark.slow  # ~20 s: MTCNN on the real videos (separation and OCR left out)
def test_full_preset_with_the_whisper_encoder(tiny: TinyModels, tmp_path: Path) -> None:
    """audio.backend=whisper-encoder: the encoder of the tiny Whisper, its layers stored."""
    man = _write_dataset(tmp_path)
    assert tiny.asr is not None
    overrides = ["audio.backend=whisper-encoder", f'audio.model="{tiny.asr}"', f'text.model="{tiny.text}"',
                 f'visual.model="{tiny.vision}"', "asr.backend=none", "separate.backend=skip",
                 "ocr.backend=skip", "decode.max_duration=4.0"]  # fmt: skip
    plan = plan_extract(DATASET, preset="full", overrides=overrides, manifests=man)
    summary = run_extract(plan, cache=tmp_path / "cache")
    assert summary.done == plan.layout.n_units and not summary.failures, summary.failures
    g = zarr.open_group(tmp_path / "cache" / "sets" / plan.key, mode="r")
    mods = dict(g.attrs["mmemo"])["modalities"]
    assert mods["audio"]["provenance"]["backend"] == "whisper-encoder"
    assert (mods["audio"]["seq_dim"], mods["audio"]["pooled_dim"]) == (WHISPER_DIM, WHISPER_DIM)
    check_layers(g, mods, {"audio": (WHISPER_STATES, WHISPER_DIM), "text": (TEXT_STATES, TEXT_DIM),
                           "visual": (VISION_STATES, VISION_DIM)})  # fmt: skip
    # 3-4 s of audio at 20 ms per Whisper frame: 128 steps kept, not the 1500 of its 30 s window
    assert g["audio/len"][:].tolist() == [128, 128, 128]
    # the layers arrays are part of each unit's checksummed files: `cache verify` knows them
    from pipeline.cachetools import verify

    (report,) = verify(tmp_path / "cache", plan.key)
    assert report.clean, report.problems
    marker = json.loads((tmp_path / "cache" / "sets" / plan.key / "units" / "0.done").read_text())
    assert any(rel.startswith("audio/layers/") for rel in marker["checksums"])


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from cli import app; sys.argv = ['mmemo', *sys.argv[1:]]; app()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize("missing", ["audio", "separate"])
def test_missing_model_is_one_clear_line_from_the_cli(missing: str, tiny: TinyModels, tmp_path: Path) -> None:
    """audio: a local folder that is not there (fails while planning, before any clip runs).
    separate: the default htdemucs with an empty torch hub, offline (fails when the worker
    loads its models): both exit non-zero with one `error:` line and no traceback."""
    man = _write_dataset(tmp_path)
    sets = [f"--set={o}" for o in tiny.overrides()]
    env = {"HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "empty_torch"), "HF_HOME": str(tmp_path / "hf")}
    if missing == "audio":
        sets += ["--set=separate.model=demucs_unittest", "--set=audio.model=/nonexistent/dir"]
        name, how = "audio model '/nonexistent/dir'", "audio.model="
    else:
        name, how = "demucs model 'htdemucs'", "separate.model_dir="
    proc = _cli(["extract", "--dataset", DATASET, "--preset", "full", "--manifests", str(man),
                 "--cache", str(tmp_path / "cache"), "--limit", "1", *sets], env)  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stdout
    line = errors[0]
    assert name in line and how in line, line
    # the whole message is on that one line (no wrapping at the 80-column terminal width)
    assert proc.stdout.rstrip().endswith(line), proc.stdout
    if missing == "audio":
        assert proc.stdout.strip() == line  # nothing else: it failed before any work
        assert "no such local directory" in line
        assert not (tmp_path / "cache" / "sets").exists() or not any((tmp_path / "cache" / "sets").iterdir())
