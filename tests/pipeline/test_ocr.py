"""OCR stage: hard subtitles → cues/SRT, on synthetic frames with known text and on real clips."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import srt

from pipeline.manifest import Clip
from pipeline.stages.base import ClipContext, Cue, Media, ModelMissingError
from pipeline.stages.decode import DecodeConfig, decode_media
from pipeline.stages.ocr import (
    BandSignature,
    Line,
    OcrConfig,
    PaddleOcr,
    RapidOcr,
    Reading,
    TextBox,
    band_change,
    band_signature,
    choose_band,
    compose_srt,
    edit_distance,
    group_lines,
    join_lines,
    merge_readings,
    similarity,
    static_lines,
    subtitle_lines,
    text_cover,
)
from tests.conftest import shared_path

CJK = re.compile(r"[\u4e00-\u9fff]")


# --- helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage() -> RapidOcr:
    s = RapidOcr()
    s.ensure_loaded()
    return s


@cache
def _media(name: str, fps: float = 2.0) -> Media:
    """Decoded once per session (frames only); skips when the shared media is absent."""
    return decode_media(shared_path("video", name), DecodeConfig(fps=fps), audio=False)


def _ctx(media: Media | None) -> ClipContext:
    return ClipContext(clip=Clip(id="c1", dataset="t"), root=Path("."), media=media)


def _run(stage: RapidOcr, media: Media) -> ClipContext:
    ctx = _ctx(media)
    stage.process_one(ctx)
    return ctx


def _check_times(cues: list[Cue], duration: float) -> None:
    for c in cues:
        assert 0.0 <= c.start < c.end <= duration + 1e-6, c
    for a, b in zip(cues, cues[1:]):
        assert a.end <= b.start, (a, b)


def _srt_round_trip(ctx: ClipContext) -> list[srt.Subtitle]:
    subs = list(srt.parse(ctx.srt))
    assert [s.content for s in subs] == [c.text for c in ctx.cues]
    for s, c in zip(subs, ctx.cues):
        assert abs(s.start.total_seconds() - c.start) < 1e-3
        assert abs(s.end.total_seconds() - c.end) < 1e-3
    return subs


def read_reference(path: Path) -> list[srt.Subtitle]:
    """The reference .srt writes the hour as `0:`; pad it to two digits before parsing."""
    text = path.read_text(encoding="utf-8-sig")
    text = re.sub(r"(?m)(^|--> )(\d):", r"\g<1>0\2:", text)
    return list(srt.parse(text))


def _box(x1, y1, x2, y2, text, score=0.99) -> TextBox:
    return TextBox(float(x1), float(y1), float(x2), float(y2), text, score)


def _frame(text: str | None, seed: int, logos: bool = True, w: int = 960, h: int = 400):
    """A textured frame with an optional centred white subtitle (black outline) near the
    bottom, and two static overlays: a logo in the bottom-right corner on the subtitle row,
    and a centred channel name higher up (both inside the region searched for the band)."""
    rng = np.random.default_rng(seed)
    img = np.ascontiguousarray(
        cv2.resize(rng.integers(40, 140, (h // 20, w // 20, 3), dtype=np.uint8), (w, h))
    )
    font = cv2.FONT_HERSHEY_SIMPLEX
    if logos:
        cv2.putText(img, "TVLOGO", (w - 160, h - 30), font, 0.8, (250, 250, 250), 2)
        cv2.putText(img, "NEWS CHANNEL", (w // 2 - 120, 250), font, 0.9, (250, 250, 250), 2)
    if text:
        scale, thick = 1.2, 2
        (tw, _), _ = cv2.getTextSize(text, font, scale, thick)
        org = ((w - tw) // 2, h - 30)
        cv2.putText(img, text, org, font, scale, (0, 0, 0), thick + 4, cv2.LINE_AA)
        cv2.putText(img, text, org, font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return img


def _synthetic_media(script: list[str | None], fps: float = 2.0, logos: bool = True) -> Media:
    frames = [_frame(t, seed=i, logos=logos) for i, t in enumerate(script)]
    times = [i / fps for i in range(len(script))]
    return Media(path=None, frames=frames, frame_times=times, duration=len(script) / fps,
                 width=960, height=400, info={"effective_fps": fps})


# --- text helpers ------------------------------------------------------------------------------
def test_edit_distance_and_similarity():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert similarity("Yes?", "yes") == pytest.approx(0.75)
    # full-width punctuation and spaces do not count as differences
    assert similarity("是两个 对吧？", "是两个对吧?") == 1.0
    assert similarity("我进去帮他", "你们接着善后") < 0.2


def test_lines_are_read_top_to_bottom_left_to_right():
    boxes = [
        _box(500, 338, 700, 359, "shopping."),
        _box(150, 315, 555, 345, "我要去杂货店"),
        _box(150, 338, 480, 359, "I'm going grocery"),
    ]
    lines = group_lines(boxes)
    assert [ln.text for ln in lines] == ["我要去杂货店", "I'm going grocery shopping."]
    text, score = join_lines(lines)
    assert text == "我要去杂货店\nI'm going grocery shopping."
    assert score == pytest.approx(0.99)


def test_corner_and_off_centre_text_is_not_a_subtitle():
    cfg = OcrConfig()
    boxes = [
        _box(10, 340, 90, 370, "logo"),  # centred in the left strip: rejected as a box
        _box(300, 340, 660, 370, "the subtitle"),  # centred
        _box(840, 345, 940, 365, "TV"),  # right strip, on the subtitle row: rejected
        _box(600, 280, 900, 300, "side text"),  # own row, centred at 0.78 W: not a subtitle
        _box(300, 300, 660, 320, "weak", score=0.3),  # below min_score
        _box(450, 250, 500, 270, "。"),  # punctuation alone is not a subtitle
    ]
    lines = subtitle_lines(boxes, 960, cfg)
    assert [ln.text for ln in lines] == ["the subtitle"]


def test_band_ignores_a_static_logo_and_covers_both_subtitle_lines():
    logo = Line([_box(420, 250, 540, 270, "CHANNEL")])
    probes = [
        [logo, Line([_box(300, 330, 660, 350, "第一句")]), Line([_box(320, 352, 640, 370, "first")])],
        [logo, Line([_box(280, 330, 680, 350, "第二句")]), Line([_box(300, 352, 660, 370, "second")])],
        [logo],
        [logo, Line([_box(300, 331, 660, 351, "第三句")])],
    ]
    statics = static_lines(probes)
    assert [s.text for s in statics] == ["CHANNEL"]
    top, bottom = choose_band(probes, statics, 400)
    assert 310 <= top <= 330 and 370 <= bottom <= 400
    # a centred text that never changes and is all there is: kept (a clip-long subtitle)
    only = [[logo], [logo], [logo]]
    assert choose_band(only, static_lines(only), 400) == (230, 280)
    assert choose_band([[], []], [], 400) is None


def test_merge_fuzzy_variants_into_one_cue_and_times():
    cfg = OcrConfig()
    r = [
        Reading(0.0, "", 0.0, True),
        Reading(0.5, "Yes?", 0.99, True),
        Reading(1.0, "Yes", 0.70, True),
        Reading(1.5, "Yes?", 0.98, True),
        Reading(2.0, "", 0.0, True),
        Reading(2.5, "我进去帮他", 0.99, True),
        Reading(3.0, "你们接着善后", 0.99, True),
    ]
    cues = merge_readings(r, step=0.5, duration=3.3, cfg=cfg)
    assert [(c.start, c.end, c.text) for c in cues] == [
        (0.5, 2.0, "Yes?"),
        (2.5, 3.0, "我进去帮他"),
        (3.0, 3.3, "你们接着善后"),  # last frame: + 1/fps, capped at the clip duration
    ]


def test_merge_drops_only_noise_among_short_cues():
    cfg = OcrConfig(min_duration=0.6, noise_score=0.9)
    r = [
        Reading(0.0, "口", 0.62, True),  # one char, low score, one frame: noise
        Reading(0.5, "", 0.0, True),
        Reading(1.0, "好", 0.97, True),  # one char but confident: a real (short) cue
        Reading(1.5, "", 0.0, True),
    ]
    cues = merge_readings(r, step=0.5, duration=None, cfg=cfg)
    assert [c.text for c in cues] == ["好"]


def test_band_change_sees_text_not_background_motion():
    def band(text, seed):
        return _frame(text, seed, logos=False)[330:400]

    same = band_change(band_signature(band("HELLO THERE", 1)), band_signature(band("HELLO THERE", 2)))
    changed = band_change(band_signature(band("HELLO THERE", 1)), band_signature(band("GOOD NIGHT", 1)))
    gone = band_change(band_signature(band("HELLO THERE", 1)), band_signature(band(None, 3)))
    thr = OcrConfig().change_threshold
    assert same < thr < changed and thr < gone
    # a short subtitle appearing over a busy, static background (city lights) must count
    rng = np.random.default_rng(0)
    lights = np.full((60, 960, 3), 10, np.uint8)
    ys, xs = rng.integers(0, 60, 4000), rng.integers(0, 960, 4000)
    lights[ys, xs] = 255
    lights[5:55, 400:560] = 10  # a dark patch where the subtitle lands
    with_text = lights.copy()
    cv2.putText(with_text, "OK", (440, 45), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 3)
    assert band_change(band_signature(lights), band_signature(with_text)) > thr
    assert band_change(band_signature(lights), band_signature(lights.copy())) == 0.0
    empty = BandSignature(np.zeros((10, 10), np.uint8), np.zeros((10, 10), bool))
    assert band_change(empty, empty) == 0.0


def test_compose_srt_round_trips_and_empty_is_empty():
    cues = [Cue(0.0, 0.5, "第一句"), Cue(0.5, 1.25, "中文\nEnglish line")]
    subs = list(srt.parse(compose_srt(cues)))
    assert [s.content for s in subs] == ["第一句", "中文\nEnglish line"]
    assert subs[1].end.total_seconds() == pytest.approx(1.25)
    assert compose_srt([]) == ""


def test_config_validates_band():
    assert OcrConfig(band=[0.7, 1.0]).band == (0.7, 1.0)
    with pytest.raises(ValueError):
        OcrConfig(band=[0.9, 0.5])
    with pytest.raises(ValueError):
        OcrConfig(bnad="auto")


# --- the stage on synthetic frames -------------------------------------------------------------
def test_no_video_and_no_frames(stage):
    ctx = _ctx(None)
    stage.process_one(ctx)
    assert ctx.status["ocr"] == "no video" and ctx.cues is None and ctx.srt is None
    audio_only = Media(path=None, audio=np.zeros(16000, np.float32), duration=1.0)
    ctx = _run(stage, audio_only)
    assert ctx.status["ocr"] == "no video" and ctx.cues is None


def test_clip_without_text_gives_no_subtitles(stage):
    ctx = _run(stage, _synthetic_media([None] * 6, logos=False))
    assert ctx.cues == [] and ctx.srt == ""
    assert ctx.status["ocr"] == "no subtitles"


def test_synthetic_subtitles_logo_band_and_skipping(stage):
    script = [None, "HELLO THERE", "HELLO THERE", "HELLO THERE", "HELLO THERE",
              None, "GOOD NIGHT", "GOOD NIGHT", "GOOD NIGHT", "GOOD NIGHT"]
    ctx = _run(stage, _synthetic_media(script))
    result = stage.last_result
    texts = [c.text.upper() for c in ctx.cues]
    assert texts == ["HELLO THERE", "GOOD NIGHT"], texts  # no logo, no channel name
    assert [(c.start, c.end) for c in ctx.cues] == [(0.5, 2.5), (3.0, 5.0)]
    top, bottom = result.band
    assert top > 270 and bottom <= 400  # the subtitle row, not the static channel name (y<260)
    assert result.n_probe_ocr == 3
    # the band is OCR'd where it changed (frames 0, 1, 5, 6), the others reuse the text
    assert result.skip_rate >= 0.5 and result.n_band_ocr <= 5
    assert ctx.status["ocr"] == "2 cues"
    _srt_round_trip(ctx)


def test_blank_bands_read_as_no_text_without_ocr(stage):
    """blank_cover: a changed band without text-like pixels is not sent to the engine, and the
    cues are those of a run that OCRs every changed band."""
    script = [None, "HELLO THERE", "HELLO THERE", "HELLO THERE", None, "GOOD NIGHT", "GOOD NIGHT"]
    media = _synthetic_media(script, logos=False)
    results = {}
    for cover in (0.0, OcrConfig().blank_cover):
        s = RapidOcr({"blank_cover": cover})
        s.engine, s._loaded = stage.engine, True
        results[cover] = s.read_subtitles(media.frames, media.frame_times, media.duration, 2.0)
    every, default = results[0.0], results[OcrConfig().blank_cover]
    assert [c.text.upper() for c in default.cues] == ["HELLO THERE", "GOOD NIGHT"]
    assert [(c.start, c.end, c.text) for c in default.cues] == [(c.start, c.end, c.text) for c in every.cues]
    assert every.n_blank == 0 and every.n_band_ocr == 4  # frames 0, 1, 4, 5
    assert default.n_blank == 2 and default.n_band_ocr == 2  # frames 0 and 4 were blank
    assert [r.blank for r in default.readings] == [True, False, False, False, True, False, False]
    band = _frame("HELLO THERE", 1, logos=False)[330:400]
    assert text_cover(band_signature(band)) > 0.1
    assert text_cover(band_signature(_frame(None, 1, logos=False)[330:400])) < OcrConfig().blank_cover


def test_probes_detect_at_half_width_find_the_same_lines_and_restore_the_detector(stage):
    """probe_scale: the band probes' text detection runs at half width (a third of the cost)
    and finds the same subtitle and logo lines; the detector's limit is back afterwards, also
    when a read fails."""
    media = _synthetic_media(["HELLO THERE"] * 3 + [None] + ["GOOD NIGHT"] * 3)
    det = stage.engine._load_det_model()
    full_limit = det.limit_side_len
    lines = {}
    for scale in (1.0, 0.5):
        probe = RapidOcr({"probe_scale": scale})
        probe.engine, probe._loaded = stage.engine, True
        found = probe._probe(media.frames, 960)
        lines[scale] = [[ln.text.upper() for ln in p] for p in found.values()]
        assert det.limit_side_len == full_limit
    assert lines[0.5] == lines[1.0], lines
    assert any("HELLO THERE" in p for p in lines[0.5]) and any("NEWS CHANNEL" in p for p in lines[0.5])
    seen = []
    real_read = stage._read

    def failing_read(image):
        seen.append(det.limit_side_len)
        raise RuntimeError("engine failed")

    stage._read = failing_read
    try:
        with pytest.raises(RuntimeError):
            stage._read_coarse(media.frames[0][200:], 0.5)
    finally:
        stage._read = real_read
    assert seen == [480] and det.limit_side_len == full_limit


def test_fixed_band_reads_only_that_band(stage):
    script = ["HELLO THERE"] * 3
    media = _synthetic_media(script)
    top_only = RapidOcr({"band": [0.0, 0.5]})
    top_only.engine = stage.engine  # share the loaded engine
    top_only._loaded = True
    result = top_only.read_subtitles(media.frames, media.frame_times, media.duration, 2.0)
    assert result.band == (0, 200) and result.cues == []  # no subtitle in the top half
    bottom = RapidOcr({"band": [0.75, 1.0]})
    bottom.engine, bottom._loaded = stage.engine, True
    result = bottom.read_subtitles(media.frames, media.frame_times, media.duration, 2.0)
    assert [c.text.upper() for c in result.cues] == ["HELLO THERE"]


def test_provenance_names_rapidocr_and_its_models():
    models = RapidOcr().models()
    ids = [m["id"] for m in models]
    assert models[0]["id"] == "rapidocr" and re.match(r"\d+\.\d+", models[0]["revision"])
    assert any(i.startswith("rapidocr/det/") and i.endswith(".onnx") for i in ids)
    assert any(i.startswith("rapidocr/rec/") and i.endswith(".onnx") for i in ids)
    assert all(m["revision"].startswith("sha256:") for m in models[1:-1])
    # the detector's runtime and its version: openvino by default, onnxruntime on request
    assert models[-1]["id"] == "rapidocr/det-runtime/openvino"
    assert re.match(r"\d+\.\d+", models[-1]["revision"])
    assert RapidOcr({"det_engine": "onnxruntime"}).models()[-1]["id"] == "rapidocr/det-runtime/onnxruntime"
    assert RapidOcr().fingerprint() == RapidOcr().fingerprint()
    assert RapidOcr().fingerprint() != RapidOcr({"min_score": 0.9}).fingerprint()


def test_the_detector_runs_on_openvino_with_the_same_cues_as_onnxruntime(stage):
    """det_engine: the default runs rapidocr's text detector on OpenVINO (the same ONNX file of
    the wheel, several times faster here); onnxruntime on request. Both read the same cues."""
    from rapidocr.inference_engine.onnxruntime.main import OrtInferSession
    from rapidocr.inference_engine.openvino.main import OpenVINOInferSession

    media = _synthetic_media([None, "HELLO THERE", "HELLO THERE", None, "GOOD NIGHT", "GOOD NIGHT"])
    cues, band = {}, {}
    for engine, session in (("openvino", OpenVINOInferSession), ("onnxruntime", OrtInferSession)):
        s = stage if engine == "openvino" else RapidOcr({"det_engine": engine})
        s.ensure_loaded()
        assert isinstance(s.engine._load_det_model().session, session)
        r = s.read_subtitles(media.frames, media.frame_times, media.duration, 2.0)
        cues[engine], band[engine] = [(c.start, c.end, c.text) for c in r.cues], r.band
    assert cues["openvino"] == cues["onnxruntime"] and band["openvino"] == band["onnxruntime"]
    assert [t.upper() for _, _, t in cues["openvino"]] == ["HELLO THERE", "GOOD NIGHT"]


def test_loading_the_openvino_detector_sends_no_telemetry():
    """`import openvino` alone would send a usage event from a spawned process and write a
    client id under $HOME; the stage imports it with openvino's no-op telemetry stub instead.
    A fresh interpreter, because this test session may have imported openvino already."""
    code = (
        "import multiprocessing.process as mpp, sys, time\n"
        "started = []\n"
        "orig = mpp.BaseProcess.start\n"
        "mpp.BaseProcess.start = lambda self: (started.append(self), orig(self))[1]\n"
        "from pipeline.stages.ocr import RapidOcr\n"
        "RapidOcr().ensure_loaded()\n"
        "time.sleep(0.5)\n"
        "from openvino.tools.ovc import telemetry_utils\n"
        "print(len(started), telemetry_utils.tm.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "openvino.tools.ovc.telemetry_stub"], out.stdout


def test_openvino_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ModelMissingError, match="det_engine 'openvino' needs the openvino package"):
        RapidOcr().load()


def test_unknown_rec_language_is_a_clear_error():
    with pytest.raises(ValueError, match="not a rapidocr recognition language"):
        RapidOcr({"lang": "klingon"}).models()


def test_rec_model_not_shipped_is_model_missing_not_a_download():
    stage = RapidOcr({"lang": "cyrillic"})
    rec = stage._model_files()["rec"]
    if Path(rec["path"]).is_file():
        pytest.skip(f"{rec['file']} is present here; the missing-model message cannot be checked")
    with pytest.raises(ModelMissingError) as e:
        stage.ensure_loaded()
    msg = str(e.value)
    assert rec["file"] in msg and "cyrillic" in msg and "\n" not in msg


def test_paddleocr_missing_is_one_clear_line():
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("paddleocr is installed here; the missing-package message cannot be checked")
    with pytest.raises(ModelMissingError) as e:
        PaddleOcr().ensure_loaded()
    msg = str(e.value)
    assert "pip install paddleocr" in msg and "rapidocr" in msg and "\n" not in msg


# --- real media --------------------------------------------------------------------------------
def test_film_zh_matches_reference_srt(stage):
    ref = read_reference(shared_path("video", "film_zh_subs.reference.srt"))
    assert [s.start.total_seconds() for s in ref][:1] == [0.041]  # the `0:` hour parsed
    media = _media("film_zh_subs.mp4")
    ctx = _run(stage, media)
    cues = ctx.cues
    assert len(cues) == len(ref), [c.text for c in cues]
    ref_texts = [s.content.strip() for s in ref]
    joined = difflib.SequenceMatcher(None, "".join(c.text for c in cues), "".join(ref_texts)).ratio()
    per_cue = np.mean([
        max(difflib.SequenceMatcher(None, c.text, r).ratio() for c in cues) for r in ref_texts
    ])
    assert joined >= 0.8 and per_cue >= 0.8, (joined, per_cue, [c.text for c in cues])
    # each reference cue's middle falls in the matching OCR cue, within one sampling step
    for c, r in zip(cues, ref):
        mid = (r.start + r.end).total_seconds() / 2
        assert c.start - 0.5 <= mid <= c.end + 0.5, (c, r)
    _check_times(cues, media.duration)
    _srt_round_trip(ctx)


def test_anime_subtitle_without_watermark(stage):
    media = _media("anime_en_subs.mp4")
    ctx = _run(stage, media)
    flat = [re.sub(r"\s+", "", c.text).lower() for c in ctx.cues]
    assert any("decided" in t and "rem" in t for t in flat), ctx.cues
    assert not any("yami" in t or "sukehiro" in t for t in flat), ctx.cues  # the watermark
    _check_times(ctx.cues, media.duration)
    _srt_round_trip(ctx)


def test_bilingual_keeps_both_lines(stage):
    media = _media("film_bilingual_subs.mp4")
    ctx = _run(stage, media)
    text = "\n".join(c.text for c in ctx.cues)
    assert "grocery" in text.lower() and "milk" in text.lower(), ctx.cues
    both = [c for c in ctx.cues if "milk" in c.text.lower()]
    assert any(CJK.search(c.text) and "\n" in c.text for c in both), both  # one cue, 2 lines
    assert not any("公众号" in c.text for c in ctx.cues)  # the corner account logo
    _check_times(ctx.cues, media.duration)
    _srt_round_trip(ctx)


def test_onnxruntime_threads_follow_the_workers_budget(monkeypatch) -> None:
    """ocr.threads = 0 takes the thread budget the runner gives each worker process (2 workers
    on 2 cores: 1 each) instead of onnxruntime's every-core default in every worker, which made
    OCR twice as slow with 2 workers (BENCHMARKS.md); an explicit ocr.threads wins."""
    key = "EngineConfig.onnxruntime.intra_op_num_threads"
    monkeypatch.delenv("MMEMO_WORKER_THREADS", raising=False)
    assert key not in RapidOcr()._params()  # one worker, no budget: onnxruntime's default
    monkeypatch.setenv("MMEMO_WORKER_THREADS", "1")
    assert RapidOcr()._params()[key] == 1
    assert RapidOcr(OcrConfig(threads=3))._params()[key] == 3
    ov_key = "EngineConfig.openvino.inference_num_threads"  # the detector's runtime too
    assert RapidOcr()._params()[ov_key] == 1 and RapidOcr(OcrConfig(threads=3))._params()[ov_key] == 3
    # unpinned: two workers' detectors pinned to the same core took turns on it (BENCHMARKS)
    assert RapidOcr()._params()["EngineConfig.openvino.enable_cpu_pinning"] is False
    # the runner's budget, set in a worker process (here a child: it also limits the BLAS
    # pools and their variables for the rest of the process)
    code = ("from pipeline.runner import _limit_threads; _limit_threads(2); "
            f"from pipeline.stages.ocr import RapidOcr; print(RapidOcr()._params()[{key!r}])")
    monkeypatch.delenv("MMEMO_WORKER_THREADS")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "2", out.stderr[-2000:]
