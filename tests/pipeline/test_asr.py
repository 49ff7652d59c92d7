"""The asr stage: PocketSphinx on real RAVDESS speech, speech-free audio, Whisper through a tiny
random local model, which text fed the text modality, the .asr.srt files, backend none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.manifest import Clip, Labels, write_dataset_info, write_manifest
from pipeline.presets import load_preset
from pipeline.runner import build_stages, plan_extract, run_extract
from pipeline.stages.asr import AsrResult, AsrSegment, PocketSphinxAsr, WhisperAsr, compose_srt
from pipeline.stages.base import ClipContext, Cue, Media
from pipeline.stages.text import plan_clip
from pipeline.store import Store
from tests.conftest import shared_path

SENTENCES = {"01": "kids are talking by the door", "02": "dogs are sitting by the door"}


def _ctx(audio: np.ndarray, sr: int = 16000, cid: str = "c", transcript: str | None = None,
         vocals: np.ndarray | None = None) -> ClipContext:
    media = Media(path=None, audio=audio.astype(np.float32), sample_rate=sr, duration=audio.size / sr)
    ctx = ClipContext(clip=Clip(id=cid, dataset="t", audio=f"{cid}.wav", transcript=transcript),
                      root=Path("."), media=media)  # fmt: skip
    ctx.vocals = vocals
    return ctx


def _wav(path: Path) -> tuple[np.ndarray, int]:
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    return audio.mean(axis=1), sr


@pytest.fixture(scope="module")
def sphinx() -> PocketSphinxAsr:
    stage = PocketSphinxAsr()
    stage.ensure_loaded()
    return stage


# --- pocketsphinx on real speech ------------------------------------------------------------
def test_pocketsphinx_recognises_real_ravdess_speech(sphinx: PocketSphinxAsr) -> None:
    names = ["Actor_01/03-01-01-01-01-01-01.wav", "Actor_02/03-01-01-01-01-01-02.wav",
             "Actor_01/03-01-02-01-01-01-01.wav"]  # fmt: skip
    hits = 0
    for name in names:
        audio, sr = _wav(shared_path("ravdess-speech", name))
        ctx = _ctx(audio, sr, cid=Path(name).stem)
        sphinx.process_one(ctx)
        res = ctx.asr
        assert res.speech and not res.empty and res.language == "en"
        assert 0.0 < res.confidence <= 1.0
        dur = audio.size / sr
        for seg in res.segments:
            assert 0.0 <= seg.start < seg.end <= dur + 0.01 and seg.text
        ref = set(SENTENCES[Path(name).stem.split("-")[4]].split())
        hits += len(ref & set(res.text.lower().split()))
        assert ctx.status["asr"].endswith("segments")
    assert hits >= 6, "fewer than 6 of the 18 reference words recognised over three clips"


def test_pocketsphinx_search_knobs_reach_the_decoder(sphinx: PocketSphinxAsr) -> None:
    # the measured default (BENCHMARKS "A cap on active HMMs per frame"), and an override
    assert sphinx._decoder.config["maxhmmpf"] == 3000
    wide = PocketSphinxAsr({"maxhmmpf": 30000, "beam": 1e-60})
    wide.ensure_loaded()
    assert wide._decoder.config["maxhmmpf"] == 30000
    assert wide._decoder.config["beam"] == pytest.approx(1e-60)


def test_pocketsphinx_language_is_only_claimed_for_the_wheels_models(tmp_path: Path) -> None:
    """The wheel's en-us models say "en"; models given by path do not say their language, so
    the result leaves it unknown instead of claiming English (the model is named by its folder)."""
    import shutil

    import pocketsphinx

    audio, sr = _wav(shared_path("ravdess-speech", "Actor_01", "03-01-01-01-01-01-01.wav"))
    hmm = tmp_path / "xx-model"
    shutil.copytree(Path(pocketsphinx.get_model_path()) / "en-us" / "en-us", hmm)
    custom = PocketSphinxAsr({"hmm": str(hmm)})
    custom.ensure_loaded()
    ctx = _ctx(audio, sr)
    custom.process_one(ctx)
    assert ctx.asr.speech and ctx.asr.language is None and ctx.asr.model == "pocketsphinx/xx-model"
    default = PocketSphinxAsr()
    assert default._language() == "en" and default._model_name() == "pocketsphinx/en-us"


def test_vocals_are_preferred_and_resampled(sphinx: PocketSphinxAsr) -> None:
    audio, sr = _wav(shared_path("ravdess-speech", "Actor_01", "03-01-01-01-01-01-01.wav"))
    silent_mix = np.zeros_like(audio)
    ctx = _ctx(silent_mix, sr, vocals=audio)  # the vocals carry the speech, the mix does not
    sphinx.process_one(ctx)
    assert ctx.asr.source == "vocals" and not ctx.asr.empty


# --- speech-free audio ----------------------------------------------------------------------
def _music(sr: int = 16000, seconds: float = 4.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    notes = [220.0, 277.2, 329.6, 440.0]
    out = sum(0.15 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * 0.5 * t + i) > 0)
              for i, f in enumerate(notes))  # fmt: skip
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("kind", ["silence", "tones", "musdb-accompaniment"])
def test_speech_free_audio_gives_an_empty_marked_transcript(sphinx: PocketSphinxAsr, kind: str) -> None:
    if kind == "silence":
        audio, sr = np.random.default_rng(0).normal(0, 1e-4, 48000).astype(np.float32), 16000
    elif kind == "tones":
        audio, sr = _music(), 16000
    else:
        tracks = sorted(shared_path("separation", "musdb").glob("*/accompaniment.wav"))
        audio, sr = _wav(tracks[0])
    ctx = _ctx(audio, sr)
    sphinx.process_one(ctx)  # not an error
    assert ctx.asr.empty and ctx.asr.text == "" and not ctx.asr.speech
    assert ctx.status["asr"] == "no speech" and ctx.asr.to_json()["note"] == "no speech"


def test_no_audio_and_manifest_transcript_skip() -> None:
    stage = PocketSphinxAsr({"only_without_transcript": True})
    ctx = _ctx(np.zeros(16000), transcript="known words")
    stage.process_one(ctx)
    assert ctx.asr is None and ctx.status["asr"] == "skipped: manifest transcript"
    ctx = ClipContext(clip=Clip(id="v", dataset="t", video="v.mp4"), root=Path("."),
                      media=Media(path=None, audio=None))  # fmt: skip
    stage.process_one(ctx)
    assert ctx.asr is None and ctx.status["asr"] == "no audio"


def test_subtitled_clips_are_left_to_their_subtitles(sphinx: PocketSphinxAsr) -> None:
    """only_without_subtitles: a clip whose OCR cues hold a letter or digit is not recognised; a
    clip whose cues are punctuation only, or that has none, is."""
    wav = sorted(shared_path("ravdess-speech", "Actor_01").glob("*.wav"))[0]
    audio, sr = _wav(wav)
    stage = PocketSphinxAsr({"only_without_subtitles": True})
    stage.ensure_loaded()
    subtitled = _ctx(audio, sr)
    subtitled.cues = [Cue(start=0.0, end=1.0, text="..."), Cue(start=1.0, end=2.0, text="我进去帮他")]
    stage.process_one(subtitled)
    assert subtitled.asr is None and subtitled.status["asr"] == "skipped: subtitles"
    for cues in ([Cue(start=0.0, end=1.0, text=" ... ")], [], None):
        ctx = _ctx(audio, sr)
        ctx.cues = cues
        stage.process_one(ctx)
        assert ctx.asr is not None and {"door", "by"} & set(ctx.asr.text.split()), cues
    plain = _ctx(audio, sr)  # the option off (PocketSphinxAsr's default): subtitles change nothing
    plain.cues = subtitled.cues
    sphinx.process_one(plain)
    assert plain.asr is not None and plain.asr.text


def test_nan_audio_is_a_clip_error(sphinx: PocketSphinxAsr) -> None:
    audio = np.full(16000, np.nan, np.float32)
    errors = sphinx.process([_ctx(audio)])
    assert errors[0] is not None and "NaN" in str(errors[0])


# --- whisper through a tiny random local model ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    from tests.helpers_tiny_models import save_whisper

    return save_whisper(tmp_path_factory.mktemp("tiny") / "whisper")


def test_whisper_batched_full_path(tiny_whisper: Path) -> None:
    stage = WhisperAsr({"model": str(tiny_whisper), "max_new_tokens": 12, "vad": False, "batch_size": 2})
    rng = np.random.default_rng(0)
    long = rng.normal(0, 0.1, 16000 * 35).astype(np.float32)  # two 30-s windows
    ctxs = [_ctx(rng.normal(0, 0.1, 16000 * 3), cid="a"), _ctx(long, cid="b"),
            _ctx(rng.normal(0, 0.1, 48000 * 2), sr=48000, cid="c")]  # fmt: skip
    errors = stage.process(ctxs)
    assert errors == [None, None, None]
    for ctx in ctxs:
        res = ctx.asr
        assert res.backend == "whisper" and res.model == str(tiny_whisper)
        assert res.language == "en"  # detected: the tiny model's language table is en/zh/de
        dur = ctx.media.duration
        for seg in res.segments:
            assert 0.0 <= seg.start <= seg.end <= dur + 1e-6
            assert 0.0 <= seg.confidence <= 1.0
        assert res.text == " ".join(s.text.strip() for s in res.segments if s.text.strip())
    assert any(s.start >= 30.0 for s in ctxs[1].asr.segments), "second window's times are offset"
    # a given language is used as is
    forced = WhisperAsr({"model": str(tiny_whisper), "max_new_tokens": 4, "vad": False, "language": "zh"})
    ctx = _ctx(rng.normal(0, 0.1, 16000 * 2))
    assert forced.process([ctx]) == [None] and ctx.asr.language == "zh"


def test_whisper_vad_skips_speech_free_clips(tiny_whisper: Path) -> None:
    stage = WhisperAsr({"model": str(tiny_whisper), "max_new_tokens": 4})
    ctx = _ctx(np.zeros(32000, np.float32))
    assert stage.process([ctx]) == [None]
    assert not ctx.asr.speech and ctx.asr.empty and ctx.status["asr"] == "no speech"


def test_whisper_missing_weights_is_one_clear_line(tmp_path: Path) -> None:
    from pipeline.stages.base import ModelMissingError

    stage = WhisperAsr({"model": str(tmp_path / "nowhere")})
    with pytest.raises(ModelMissingError) as e:
        stage.ensure_loaded()
    msg = str(e.value)
    assert "\n" not in msg and "asr.model=" in msg and "no such local directory" in msg


# --- text source selection ------------------------------------------------------------------
def _with_asr(transcript: str | None, asr_text: str, cues=None) -> ClipContext:
    ctx = _ctx(np.zeros(10), transcript=transcript)
    ctx.asr = AsrResult(text=asr_text, segments=[AsrSegment(0.0, 1.0, asr_text, 0.9)] if asr_text else [],
                        speech=bool(asr_text))
    ctx.cues = cues
    return ctx


def test_text_source_selection() -> None:
    from pipeline.stages.base import Cue

    ctx = _with_asr("The manifest says this.", "recognised words")
    plan = plan_clip(ctx, ["transcript", "cues"], 16, True)
    assert plan.segments == ["The manifest says this."] and ctx.text_source == "transcript"
    ctx = _with_asr("", "recognised words")  # an empty manifest transcript is not replaced
    plan = plan_clip(ctx, ["transcript", "cues"], 16, True)
    assert plan.segments == [] and ctx.text_source == "none" and plan.absent_reason
    ctx = _with_asr(None, "recognised words", cues=[Cue(0.0, 1.0, "a subtitle")])
    plan = plan_clip(ctx, ["transcript", "cues"], 16, True)
    assert plan.segments == ["recognised words", "a subtitle"] and ctx.text_source == "asr+ocr"
    ctx = _with_asr(None, "")
    plan = plan_clip(ctx, ["transcript", "cues"], 16, True)
    assert ctx.text_source == "none" and "asr: no speech" in plan.absent_reason


def test_compose_srt() -> None:
    text = compose_srt([AsrSegment(0.5, 1.25, "hello there", 0.8), AsrSegment(2.0, 2.5, "  ", 0.1)])
    assert text.startswith("1\n00:00:00,500 --> 00:00:01,250\nhello there")
    assert "2\n" not in text and compose_srt([]) == ""


# --- presets, backend none, extraction --------------------------------------------------------
def test_presets_and_backend_none() -> None:
    off = load_preset("offline")
    assert off.stages["asr"].backend == "pocketsphinx" and off.stages["asr"].config.only_without_transcript is True
    assert off.stages["asr"].config.only_without_subtitles is True
    order = [s.name for s in build_stages(off)]
    assert order.index("ocr") < order.index("asr")  # the subtitles are known before ASR runs
    assert load_preset("full").stages["asr"].backend == "whisper"
    names = [s.name for s in build_stages(load_preset("offline", ["asr.backend=none"]))]
    assert "asr" not in names and names.index("text") > 0
    recorded = {k: v for k, v in off.data.items() if k != "asr"}  # a set recorded before the stage
    again = load_preset(recorded)
    assert again.data["asr"] == {"backend": "none"} and again.stages["asr"].skipped


def _dataset(tmp: Path, transcript_for: set[str]) -> Path:
    src = shared_path("ravdess-speech", "Actor_01")
    wavs = sorted(src.glob("*.wav"))[:2]
    clips = [Clip(id=w.stem, dataset="asr", audio=f"Actor_01/{w.name}",
                  transcript="A known line." if w.stem in transcript_for else None,
                  labels=Labels(emotion="x", emotion_idx=0)) for w in wavs]  # fmt: skip
    man = tmp / "manifests"
    write_manifest(clips, man / "asr" / "train.jsonl")
    write_dataset_info("asr", {"name": "asr", "root": str(src.parent), "classes": ["x"]}, man)
    return man


CHEAP = ["separate.backend=\"none\"", "ocr.backend=\"skip\"", "faces.backend=\"skip\"",
         "visual.backend=\"skip\"", "audio.backend=\"skip\"", "store.unit_size=2"]  # fmt: skip


def test_extraction_writes_asr_srt_and_text_source(tmp_path: Path) -> None:
    first = sorted(shared_path("ravdess-speech", "Actor_01").glob("*.wav"))[0].stem
    man = _dataset(tmp_path, transcript_for={first})
    plan = plan_extract("asr", preset="offline", overrides=CHEAP, manifests=man)
    s = run_extract(plan, cache=tmp_path / "cache")
    assert not s.failures
    folder = Store(tmp_path / "cache").srt_path(plan.key, first).parent
    recs = {p.name.split(".")[0]: json.loads(p.read_text()) for p in folder.glob("*.text.json")}
    assert len(recs) == 2
    other = next(k for k in recs if k != first)
    assert recs[first]["text_source"] == "transcript" and recs[first]["asr"] is None  # offline: no ASR cost
    assert recs[other]["text_source"] == "asr" and recs[other]["asr"]["text"]
    assert recs[other]["asr"]["backend"] == "pocketsphinx"
    srt_text = (folder / f"{other}.asr.srt").read_text()
    assert srt_text.startswith("1\n00:00:") and recs[other]["asr"]["segments"][0]["text"] in srt_text
    assert not (folder / f"{first}.asr.srt").exists()
    prov = [st for st in plan.stages if st.name == "asr"][0].provenance()
    assert prov["backend"] == "pocketsphinx" and any("pocketsphinx" in m["revision"] for m in prov["models"])
    # backend none: no asr, the clip without a transcript has no text
    plan2 = plan_extract("asr", preset="offline", overrides=[*CHEAP, "asr.backend=none"], manifests=man)
    assert plan2.key != plan.key
    s2 = run_extract(plan2, cache=tmp_path / "cache")
    assert s2.absent["text"] == 1
    rec = json.loads((Store(tmp_path / "cache").srt_path(plan2.key, other).with_name(f"{other}.text.json")).read_text())
    assert rec["text_source"] == "none" and rec["asr"] is None


def test_extraction_with_tiny_whisper(tmp_path: Path, tiny_whisper: Path) -> None:
    man = _dataset(tmp_path, transcript_for=set())
    over = [*CHEAP, "asr.backend=\"whisper\"", f'asr.model="{tiny_whisper}"', "asr.max_new_tokens=8",
            "asr.vad=false"]  # fmt: skip
    plan = plan_extract("asr", preset="offline", overrides=over, manifests=man)
    s = run_extract(plan, cache=tmp_path / "cache")
    assert not s.failures
    folder = Store(tmp_path / "cache").srt_path(plan.key, "x").parent
    recs = [json.loads(p.read_text()) for p in folder.glob("*.text.json")]
    assert len(recs) == 2 and all(r["asr"]["backend"] == "whisper" for r in recs)
    assert all(r["asr"]["language"] == "en" for r in recs)


def test_predict_shows_the_recognised_speech_of_a_video_without_text(tmp_path: Path) -> None:
    """`mmemo predict` on a real video with no subtitles and no transcript: the text modality
    comes from recognised speech, and the output says so and shows the words."""
    import os
    import subprocess
    import sys

    from fusion.train import fit

    video = shared_path("ravdess-av-actor05", "original", "video", "01-01-01-01-02-01-05.mp4")
    src = shared_path("ravdess-speech", "Actor_01")
    wavs = sorted(src.glob("*.wav"))[:6]
    splits = ["train", "train", "valid", "valid", "test", "test"]
    clips = [Clip(id=w.stem, dataset="asrp", split=splits[i], audio=f"Actor_01/{w.name}",
                  labels=Labels(emotion="ab"[i % 2], emotion_idx=i % 2)) for i, w in enumerate(wavs)]  # fmt: skip
    man = tmp_path / "manifests"
    write_manifest(clips, man / "asrp" / "all.jsonl")
    write_dataset_info("asrp", {"name": "asrp", "root": str(src.parent), "classes": ["a", "b"]}, man)
    plan = plan_extract("asrp", preset="offline", overrides=CHEAP, manifests=man)
    cache = tmp_path / "cache"
    assert not run_extract(plan, cache=cache).failures
    res = fit(cache, "asrp", "early", ["text"], seeds=1, epochs=2, runs_dir=tmp_path / "runs", key=plan.key)
    env = {**os.environ, "MMEMO_CACHE": str(cache), "MMEMO_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).with_name("mmemo")), "predict", str(video), "--run",
                           str(res.run_dir)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "text source: asr" in out, out
    spoken = {"dogs", "sitting", "door"}  # statement 02: "Dogs are sitting by the door"
    assert len(spoken & set(out.lower().replace(":", " ").split())) >= 2, out


def test_extraction_leaves_subtitled_videos_to_ocr(tmp_path: Path) -> None:
    """The offline preset on two real videos: anime_en_subs (a burned-in English subtitle over
    Japanese speech) takes its words from OCR and is not recognised; a RAVDESS take (English
    speech, no subtitle) is recognised."""
    anime = shared_path("video", "anime_en_subs.mp4")
    take = shared_path("ravdess-av-actor05", "original", "video", "01-01-01-01-02-01-05.mp4")
    root = tmp_path / "media"
    root.mkdir()
    for src in (anime, take):
        (root / src.name).symlink_to(src)
    clips = [Clip(id=p.stem, dataset="subs", video=p.name, labels=Labels(emotion="x", emotion_idx=0))
             for p in (anime, take)]
    man = tmp_path / "manifests"
    write_manifest(clips, man / "subs" / "train.jsonl")
    write_dataset_info("subs", {"name": "subs", "root": str(root), "classes": ["x"]}, man)
    cheap = [o for o in CHEAP if not o.startswith("ocr.")]
    plan = plan_extract("subs", preset="offline", overrides=cheap, manifests=man)
    s = run_extract(plan, cache=tmp_path / "cache")
    assert not s.failures
    folder = Store(tmp_path / "cache").srt_path(plan.key, anime.stem).parent
    recs = {p.name.split(".")[0]: json.loads(p.read_text()) for p in folder.glob("*.text.json")}
    assert recs[anime.stem]["text_source"] == "ocr" and recs[anime.stem]["asr"] is None
    assert not (folder / f"{anime.stem}.asr.srt").exists()
    assert "decided" in (folder / f"{anime.stem}.srt").read_text()
    assert recs[take.stem]["text_source"] == "asr" and "door" in recs[take.stem]["asr"]["text"]
