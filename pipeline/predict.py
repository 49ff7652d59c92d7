"""`mmemo predict VIDEO --run RUN`: extract one new video exactly as the run's training set was
extracted (same stage configs, read from that feature set's attributes), into a private
temporary cache, then hand the cache to `fusion.predict` — the cache stays the only contract.

A file that cannot be decoded is an error naming the file (never a prediction from the text
alone passed off as the video's); the text the prediction used (transcript, recognised
speech, on-screen subtitles, title) is returned with it.
"""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path
from typing import Any

from pipeline import cacheformat as cf
from pipeline.manifest import Clip
from pipeline.runner import plan_extract, run_extract
from pipeline.store import cache_root as default_cache


def _training_preset(run_cfg: dict[str, Any]) -> dict[str, Any]:
    cache = Path(run_cfg.get("cache_root") or default_cache())
    key = run_cfg.get("feature_set")
    path = cf.set_dir(cache, str(key))
    if not cf.is_set(path):
        raise FileNotFoundError(
            f"the run's feature set {key} is not in {cache}; pass --preset to extract with a preset instead"
        )
    attrs = cf.SetReader(path).attrs
    return dict(attrs.raw["preset_config"]), dict(attrs.raw)


def _text_record(cache: Path, key: str, clip_id: str) -> dict[str, Any]:
    """The clip's text record from the cache: which source fed the text modality, ASR result."""
    import json

    from pipeline.store import Store

    p = Store(cache).srt_path(key, clip_id, "text")
    return json.loads(p.read_text()) if p.is_file() else {"text_source": None, "asr": None}


class PredictError(ValueError):
    """The file could not be used (decode failure): one line naming the file and the reason."""


def _srt_text(path: Path) -> str | None:
    """The cue text of an .srt file (numbers and timing lines dropped), or None."""
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    text = [ln for ln in lines if ln and not ln.isdigit() and "-->" not in ln]
    return " / ".join(text) or None


def text_used(record: dict[str, Any], transcript: str | None, title: str | None,
              ocr_srt: Path) -> dict[str, str]:
    """What fed the text modality, by source, with the title (conditioning) beside it."""
    source = str(record.get("text_source") or "none")
    used: dict[str, str] = {}
    if "transcript" in source and transcript:
        used["transcript"] = transcript
    asr = record.get("asr") or {}
    if "asr" in source and asr.get("text"):
        used["asr"] = str(asr["text"])
    if "ocr" in source:
        ocr = _srt_text(ocr_srt)
        if ocr:
            used["ocr"] = ocr
    if title:
        used["title"] = title
    return used


def predict_file(video: Path, run: Path, text: str | None = None, title: str | None = None,
                 preset: str | None = None) -> dict[str, Any]:
    from fusion.predict import predict_set

    video = Path(video).resolve()
    if not video.is_file():
        raise FileNotFoundError(f"{video}: not found (or not a regular file)")
    cfg_path = Path(run) / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found; --run must be a run folder made by `mmemo fit`")
    try:
        run_cfg = tomllib.loads(cfg_path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a readable run config ({e})") from None
    if run_cfg.get("normalise", "global") == "speaker":
        raise PredictError(f"{run}: this run standardises each speaker's features by that "
                           "speaker's own clips (normalise = speaker); a single file has no such "
                           "statistics. Predict with a run fit with --normalise global, or extract "
                           "the speaker's clips as a set and use fusion.predict.predict_set")
    if preset is None:
        preset_cfg, attrs = _training_preset(run_cfg)
    else:
        preset_cfg, attrs = None, {}
    with tempfile.TemporaryDirectory(prefix="mmemo-predict-") as d:
        tmp = Path(d)
        is_audio = video.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg", ".m4a")
        clip = Clip(id="predict", dataset="predict", split="test",
                    video=None if is_audio else video.name, audio=video.name if is_audio else None,
                    transcript=text, title=title)
        info = {"name": "predict", "root": str(video.parent), "classes": attrs.get("classes", []),
                "label_derived": attrs.get("label_derived", []), "group_by": attrs.get("group_by")}
        plan = plan_extract("predict", video.parent, preset_cfg if preset is None else preset,
                            clips=[clip], info=info)
        summary = run_extract(plan, cache=tmp / "cache")
        decode = [f for f in summary.failures if f.get("stage") == "decode"]
        if decode:
            raise PredictError(f"{video}: cannot be decoded: {decode[0]['message']}")
        out = predict_set(Path(run), tmp / "cache", plan.key)[0]
        out["failures"] = summary.failures
        out["text"] = _text_record(tmp / "cache", plan.key, clip.id)
        from pipeline.store import Store

        out["text_used"] = text_used(out["text"], text, title,
                                     Store(tmp / "cache").srt_path(plan.key, clip.id))
        return out
