"""ASR stage: spoken words of a clip → transcript text, timed segments, language, confidence.

Runs after `separate` and reads the separated vocals when there are any (music and effects
hurt every recogniser), else the decoded audio. The result lands on `ctx.asr` (an
`AsrResult`); the runner writes it as `<id>.asr.srt` and `<id>.text.json` beside the OCR
`.srt` of the set, and the text stage uses its text for clips whose manifest has no
transcript (a manifest transcript is never replaced). It runs after `ocr`, so that a preset
can leave out clips whose burned-in subtitles already give their words
(``only_without_subtitles``).

Backends:
  ``pocketsphinx``  offline: CMU PocketSphinx with the en-us acoustic model, language model and
                    dictionary shipped in its wheel. Speech is found with silero-vad (its
                    weights ship in its wheel too); each speech segment is decoded at 16 kHz.
  ``whisper``       full: any Whisper checkpoint through transformers (hub id or a
                    save_pretrained folder), clips batched in 30-s windows, language detected
                    per window unless ``asr.language`` is given, segment timestamps.
  ``none`` (in a preset or ``--set asr.backend=none``): the stage is left out.

A clip without speech (music, silence) gets an empty transcript with ``speech = False`` and
status "no speech": not a failure. Audio that cannot be read is a per-clip error (ledger).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.stages.base import (
    ClipContext,
    ClipError,
    ModelMissingError,
    Stage,
    StageConfig,
    register,
)

SAMPLE_RATE = 16000
_FILLER = re.compile(r"^(<s>|</s>|<sil>|\[.*\]|\+\+.*\+\+)$")


# --- plain data --------------------------------------------------------------------------------
@dataclass
class AsrSegment:
    start: float  # seconds from the clip start
    end: float
    text: str
    confidence: float  # 0..1 (word posteriors or token probabilities, per backend)


@dataclass
class AsrResult:
    """What one clip says. `speech` False: the VAD found no speech (text is then empty)."""

    text: str
    segments: list[AsrSegment] = field(default_factory=list)
    language: str | None = None
    confidence: float = 0.0  # duration-weighted mean of the segments' confidences
    speech: bool = True
    source: str = "audio"  # "vocals" when the separated vocals were decoded
    backend: str = ""
    model: str = ""

    @property
    def empty(self) -> bool:
        return not self.text.strip()

    @property
    def note(self) -> str:
        """Short status for logs and `mmemo predict`."""
        if not self.speech:
            return "no speech"
        if self.empty:
            return "speech, no words recognised"
        return f"{len(self.segments)} segments"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["empty"] = self.empty
        d["note"] = self.note
        return d


def compose_srt(segments: list[AsrSegment]) -> str:
    """SRT of the segments with text; '' when none."""
    import srt

    subs = [
        srt.Subtitle(index=i, start=timedelta(seconds=s.start), end=timedelta(seconds=max(s.end, s.start)),
                     content=s.text)
        for i, s in enumerate((s for s in segments if s.text.strip()), start=1)
    ]
    return srt.compose(subs, reindex=False) if subs else ""


def join_segments(segments: list[AsrSegment]) -> tuple[str, float]:
    """Transcript text (segments joined by spaces) and the duration-weighted confidence."""
    kept = [s for s in segments if s.text.strip()]
    if not kept:
        return "", 0.0
    w = np.array([max(s.end - s.start, 1e-3) for s in kept])
    c = np.array([s.confidence for s in kept])
    return " ".join(s.text.strip() for s in kept), float((w * c).sum() / w.sum())


def clip_audio(ctx: ClipContext) -> tuple[np.ndarray, str] | None:
    """(mono float32 at 16 kHz, 'vocals'|'audio') of a clip, None when it has no audio."""
    media = ctx.media
    if media is None or not media.has_audio:
        return None
    if ctx.vocals is not None and ctx.vocals.size:
        audio, source = ctx.vocals, "vocals"
    else:
        audio, source = media.audio, "audio"
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim > 1:
        audio = audio.mean(axis=-1) if audio.shape[-1] < audio.shape[0] else audio.mean(axis=0)
    if not np.isfinite(audio).all():
        raise ClipError(f"{source} holds NaN/Inf samples; cannot recognise speech")
    sr = int(media.sample_rate)
    if sr != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, sr // g).astype(np.float32)
    return audio, source


def has_subtitles(ctx: ClipContext) -> bool:
    """OCR read at least one subtitle cue with a letter or digit in it."""
    from pipeline.stages.text import clean_text, readable

    return any(readable(clean_text(c.text)) for c in ctx.cues or ())


# --- voice activity --------------------------------------------------------------------------
_VAD: Any = None


def _vad_model() -> Any:
    """silero-vad's JIT model; its weights ship inside the silero-vad wheel (no download)."""
    global _VAD
    if _VAD is None:
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise ModelMissingError(
                "asr needs the silero-vad package for voice activity: pip install silero-vad"
            ) from None
        _VAD = load_silero_vad()
    return _VAD


def speech_segments(audio: np.ndarray, threshold: float = 0.5, pad_ms: int = 200,
                    min_speech_ms: int = 250, min_silence_ms: int = 300,
                    max_segment_s: float = 30.0) -> list[tuple[int, int]]:
    """(start, end) sample ranges of speech in 16-kHz audio, by silero-vad."""
    import torch
    from silero_vad import get_speech_timestamps

    if audio.size < SAMPLE_RATE // 10:
        return []
    with torch.inference_mode():
        ts = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(audio)), _vad_model(), threshold=threshold,
            sampling_rate=SAMPLE_RATE, min_speech_duration_ms=min_speech_ms,
            min_silence_duration_ms=min_silence_ms, speech_pad_ms=pad_ms,
            max_speech_duration_s=max_segment_s,
        )  # fmt: skip
    return [(int(t["start"]), int(t["end"])) for t in ts]


# --- config and the shared stage -------------------------------------------------------------
class AsrConfig(StageConfig):
    # true: recognise only clips whose manifest has no transcript (the offline preset: no
    # ASR cost on AvaMERG / MELD, which ship transcripts)
    only_without_transcript: bool = False
    # true: recognise only clips on which OCR read no subtitle (the offline preset). The
    # subtitles are then the clip's words, and PocketSphinx knows English only: on the six real
    # videos in ../shared (Chinese, Japanese and Russian speech under their subtitles) it wrote
    # English nonsense ("miracle so can get autism july"), which the text stage embedded beside
    # the subtitles. Needs the ocr stage (it runs first); without it every clip is recognised.
    only_without_subtitles: bool = False
    use_vocals: bool = True  # decode the separated vocals when the separate stage made them
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    # speech kept on each side of a VAD segment; 400 ms: WER 0.383 vs 0.400 at 200 ms and
    # 0.450 at 100 ms on the RAVDESS bench (BENCHMARKS.md), word onsets survive
    vad_pad_ms: int = Field(400, ge=0)
    vad_min_silence_ms: int = Field(300, ge=0)  # shorter pauses do not split a segment
    max_segment_s: float = Field(30.0, gt=1.0)


class _AsrStage(Stage):
    name: ClassVar[str] = "asr"
    config: AsrConfig

    def _wanted(self, ctx: ClipContext) -> bool:
        if self.config.only_without_transcript and ctx.clip.transcript is not None:
            ctx.status["asr"] = "skipped: manifest transcript"
            return False
        if self.config.only_without_subtitles and has_subtitles(ctx):
            ctx.status["asr"] = "skipped: subtitles"
            return False
        return True

    def _audio(self, ctx: ClipContext) -> tuple[np.ndarray, str] | None:
        if not self.config.use_vocals:
            saved, ctx.vocals = ctx.vocals, None
            try:
                return clip_audio(ctx)
            finally:
                ctx.vocals = saved
        return clip_audio(ctx)

    def _vad(self, audio: np.ndarray) -> list[tuple[int, int]]:
        c = self.config
        return speech_segments(audio, c.vad_threshold, c.vad_pad_ms, min_silence_ms=c.vad_min_silence_ms,
                               max_segment_s=c.max_segment_s)

    def _finish(self, ctx: ClipContext, result: AsrResult) -> None:
        ctx.asr = result
        ctx.status["asr"] = result.note


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


# --- pocketsphinx (offline) ------------------------------------------------------------------
class PocketSphinxConfig(AsrConfig):
    # "segments": decode each VAD speech segment; "whole": decode the clip in one utterance
    # (VAD still decides whether there is speech at all)
    decode: Literal["segments", "whole"] = "segments"
    hmm: str | None = None  # acoustic model folder; None: the wheel's en-us
    lm: str | None = None  # language model; None: the wheel's en-us.lm.bin
    dictionary: str | None = None  # pronunciations; None: the wheel's cmudict-en-us.dict
    # search knobs (None: PocketSphinx's defaults beam 1e-48, wbeam 7e-29, lw 6.5)
    beam: float | None = None
    wbeam: float | None = None
    lw: float | None = None
    # at most this many active HMMs per 10-ms frame (PocketSphinx's default 30000). Measured
    # (BENCHMARKS "Speech recognition"): 3000 decodes 35 % faster at the same WER on the 30
    # RAVDESS speech clips and the 14 held-out actor-05 takes; 1000 loses words; None (or
    # 30000) gives the old behaviour.
    maxhmmpf: int | None = Field(3000, ge=100)


@register
class PocketSphinxAsr(_AsrStage):
    """CMU PocketSphinx 5 (en-us models in the wheel) over silero-vad speech segments."""

    backend: ClassVar[str] = "pocketsphinx"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = PocketSphinxConfig
    config: PocketSphinxConfig

    def _paths(self) -> dict[str, str]:
        try:
            import pocketsphinx
        except ImportError:
            raise ModelMissingError(
                "asr backend 'pocketsphinx' needs the pocketsphinx package: pip install pocketsphinx "
                "(its wheel ships the en-us models), or --set asr.backend=none"
            ) from None
        root = Path(pocketsphinx.get_model_path())
        c = self.config
        return {
            "hmm": c.hmm or str(root / "en-us" / "en-us"),
            "lm": c.lm or str(root / "en-us" / "en-us.lm.bin"),
            "dict": c.dictionary or str(root / "en-us" / "cmudict-en-us.dict"),
        }

    def load(self) -> None:
        paths = self._paths()
        for what, p in paths.items():
            if not Path(p).exists():
                key = "dictionary" if what == "dict" else what
                raise ModelMissingError(f"pocketsphinx {what} '{p}' does not exist; set asr.{key} to "
                                        "a local file/folder or leave it unset for the wheel's en-us model")
        _vad_model()
        from pocketsphinx import Decoder

        kw: dict[str, Any] = {"samprate": SAMPLE_RATE, **paths}
        for k in ("beam", "wbeam", "lw", "maxhmmpf"):
            v = getattr(self.config, k)
            if v is not None:
                kw[k] = v
        self._decoder = Decoder(loglevel="FATAL", **kw)

    def models(self) -> list[dict[str, str]]:
        rev = f"pocketsphinx=={_version('pocketsphinx')}"
        out = []
        for what, p in self._paths().items():
            custom = getattr(self.config, "dictionary" if what == "dict" else what) is not None
            out.append({"id": f"pocketsphinx/{what}/{Path(p).name}", "revision": "local:" + p if custom else rev})
        out.append({"id": "silero-vad", "revision": f"silero-vad=={_version('silero-vad')}"})
        return out

    def _language(self) -> str | None:
        """"en" with the wheel's en-us models; None (not known) once any of hmm / lm / dictionary
        points elsewhere: those files do not say which language they are for."""
        c = self.config
        return "en" if c.hmm is None and c.lm is None and c.dictionary is None else None

    def _model_name(self) -> str:
        return "pocketsphinx/" + (Path(self.config.hmm).name if self.config.hmm else "en-us")

    def _decode(self, audio: np.ndarray, offset: float) -> AsrSegment | None:
        """One utterance; words with their posteriors (fillers and silences dropped)."""
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        d = self._decoder
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        words: list[tuple[str, int, int, float]] = []
        for s in d.seg() or []:
            w = re.sub(r"\(\d+\)$", "", s.word)
            if not _FILLER.match(w):
                words.append((w, s.start_frame, s.end_frame, float(s.prob)))
        if not words:
            return None
        fps = 100.0  # PocketSphinx's frame rate
        return AsrSegment(
            start=round(offset + words[0][1] / fps, 3),
            end=round(offset + (words[-1][2] + 1) / fps, 3),
            text=" ".join(w for w, *_ in words),
            confidence=float(np.clip(np.mean([p for *_, p in words]), 0.0, 1.0)),
        )

    def process_one(self, ctx: ClipContext) -> None:
        if not self._wanted(ctx):
            return
        got = self._audio(ctx)
        if got is None:
            ctx.status["asr"] = "no audio"
            return
        audio, source = got
        spans = self._vad(audio)
        res = AsrResult(text="", language=self._language(), speech=bool(spans), source=source,
                        backend=self.backend, model=self._model_name())
        if spans:
            if self.config.decode == "whole":
                pieces = [(0, audio.size)]
            else:
                pieces = spans
            for a, b in pieces:
                seg = self._decode(audio[a:b], a / SAMPLE_RATE)
                if seg is not None:
                    res.segments.append(seg)
            res.text, res.confidence = join_segments(res.segments)
        self._finish(ctx, res)


# --- whisper (full) --------------------------------------------------------------------------
class WhisperConfig(AsrConfig):
    model: str = "openai/whisper-small"  # hub id or a save_pretrained folder
    revision: str | None = None
    language: str | None = None  # e.g. "en", "zh"; None: detected per 30-s window
    task: Literal["transcribe", "translate"] = "transcribe"
    batch_size: int = Field(8, ge=1)  # 30-s windows per generate call (across clips)
    max_new_tokens: int = Field(220, ge=1, le=440)
    num_beams: int = Field(1, ge=1)
    vad: bool = True  # a clip where silero-vad finds no speech is not decoded (Whisper
    # hallucinates text on music and silence)


def _whisper_missing(model: str, error: BaseException) -> ModelMissingError:
    import os

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        first = "no such local directory"
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return ModelMissingError(
        f"whisper model '{model}' is not available ({first[:160]}); provide it with "
        f"--set asr.model=/local/dir (a save_pretrained folder) or download it into "
        f"HF_HOME={hf_home} on a machine with internet"
    )


@register
class WhisperAsr(_AsrStage):
    """Whisper (transformers) over 30-s windows of speech, batched across the clips of a batch."""

    backend: ClassVar[str] = "whisper"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = WhisperConfig
    config: WhisperConfig
    WINDOW = 30 * SAMPLE_RATE

    def _kwargs(self) -> dict[str, Any]:
        return {"revision": self.config.revision} if self.config.revision else {}

    def load(self) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        name = self.config.model
        try:
            self._proc = WhisperProcessor.from_pretrained(name, **self._kwargs())
            self._model = WhisperForConditionalGeneration.from_pretrained(name, **self._kwargs())
        except (OSError, ValueError) as e:
            raise _whisper_missing(name, e) from None
        self._model.eval().to(self.device)
        if self.config.vad:
            _vad_model()
        lang = self.config.language
        if lang is not None:
            table = getattr(self._model.generation_config, "lang_to_id", None) or {}
            if table and f"<|{lang}|>" not in table and lang not in table:
                raise ValueError(f"asr.language='{lang}' is not a language of '{name}'")

    def models(self) -> list[dict[str, str]]:
        local = Path(self.config.model).is_dir()
        rev = self.config.revision or ("local" if local else "main")
        return [{"id": self.config.model, "revision": rev}]

    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        """Windows of every clip go through generate together; errors stay per clip."""
        self.ensure_loaded()
        errors: list[BaseException | None] = [None] * len(batch)
        jobs: list[tuple[int, float, np.ndarray]] = []  # (clip index, offset s, window)
        results: dict[int, AsrResult] = {}
        for i, ctx in enumerate(batch):
            try:
                if not self._wanted(ctx):
                    continue
                got = self._audio(ctx)
                if got is None:
                    ctx.status["asr"] = "no audio"
                    continue
                audio, source = got
                speech = bool(self._vad(audio)) if self.config.vad else audio.size > 0
                results[i] = AsrResult(text="", speech=speech, source=source, backend=self.backend,
                                       model=self.config.model, language=self.config.language)
                if speech:
                    for a in range(0, audio.size, self.WINDOW):
                        jobs.append((i, a / SAMPLE_RATE, audio[a : a + self.WINDOW]))
            except Exception as e:  # noqa: BLE001 - per-clip isolation
                errors[i] = e
        langs: dict[int, list[str]] = {}
        bs = self.config.batch_size
        for j in range(0, len(jobs), bs):
            chunk = jobs[j : j + bs]
            try:
                outs = self._transcribe([w for _, _, w in chunk])
            except Exception as e:  # noqa: BLE001 - fail the clips of this call only
                for i, _, _ in chunk:
                    errors[i] = errors[i] or e
                continue
            for (i, offset, w), (segs, lang) in zip(chunk, outs, strict=True):
                dur = w.size / SAMPLE_RATE
                for s in segs:
                    start = min(max(s.start, 0.0), dur)
                    s.start = round(offset + start, 3)
                    s.end = round(offset + min(max(s.end, start), dur), 3)
                results[i].segments.extend(segs)
                if lang:
                    langs.setdefault(i, []).append(lang)
        for i, res in results.items():
            if errors[i] is not None:
                continue
            if langs.get(i) and not self.config.language:
                res.language = max(set(langs[i]), key=langs[i].count)
            res.text, res.confidence = join_segments(res.segments)
            self._finish(batch[i], res)
        return errors

    def process_one(self, ctx: ClipContext) -> None:
        err = self.process([ctx])[0]
        if err is not None:
            raise err

    def _transcribe(self, windows: list[np.ndarray]) -> list[tuple[list[AsrSegment], str | None]]:
        """Per window: timed segments (seconds within the window) and the language code."""
        import torch

        feats = self._proc.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        x = feats.input_features.to(self.device, dtype=self._model.dtype)
        gc = self._model.generation_config
        kw: dict[str, Any] = {
            "return_timestamps": True, "task": self.config.task, "return_dict_in_generate": True,
            "max_new_tokens": self.config.max_new_tokens, "num_beams": self.config.num_beams,
        }  # fmt: skip
        with torch.inference_mode():
            if self.config.language:
                langs: list[str | None] = [self.config.language] * len(windows)
            elif getattr(gc, "is_multilingual", False) and getattr(gc, "lang_to_id", None):
                by_id = {v: k.strip("<|>") for k, v in gc.lang_to_id.items()}
                langs = [by_id.get(int(t)) for t in self._model.detect_language(x)]
            else:  # an English-only checkpoint (*.en)
                langs = ["en"] * len(windows)
            if getattr(gc, "is_multilingual", False) and all(langs):
                kw["language"] = langs
            else:
                kw.pop("task")
            out = self._model.generate(x, **kw)
        tok = self._proc.tokenizer
        ts_begin = int(gc.no_timestamps_token_id) + 1
        res = []
        for k, segs in enumerate(out["segments"]):
            probs = self._token_probs(x[k : k + 1], segs)
            found = []
            for seg in segs:
                ids = [int(t) for t in seg["tokens"]]
                text = tok.decode([t for t in ids if t < ts_begin], skip_special_tokens=True).strip()
                if not text:
                    continue
                a, b = seg.get("idxs", (0, 0))
                seq_ids = [int(t) for t in seg["result"]["sequences"]] if "result" in seg else []
                p = [probs[i] for i in range(a, min(b, len(probs))) if seq_ids[i] < ts_begin]
                found.append(AsrSegment(float(seg["start"]), float(seg["end"]), text,
                                        float(np.mean(p)) if p else 0.0))
            res.append((found, langs[k]))
        return res

    def _token_probs(self, x: Any, segs: list[dict[str, Any]]) -> list[float]:
        """The model's probability of each token of the window's output (one teacher-forced
        pass; index i = the token at position i of the output sequence, prompt included)."""
        import torch

        if not segs or "result" not in segs[0]:
            return []
        seq = segs[0]["result"]["sequences"]
        seq = (seq if torch.is_tensor(seq) else torch.tensor(seq)).to(x.device)[None, :].long()
        if seq.shape[1] < 2:
            return []
        with torch.inference_mode():
            logits = self._model(input_features=x, decoder_input_ids=seq[:, :-1]).logits
            p = torch.softmax(logits.float(), dim=-1).gather(-1, seq[:, 1:, None])[0, :, 0]
        return [float("nan")] + p.cpu().tolist()


def text_record(ctx: ClipContext) -> dict[str, Any]:
    """What the cache keeps per clip about its text: the source that fed the text modality
    and the ASR result (when the stage ran)."""
    return {
        "id": ctx.id,
        "text_source": getattr(ctx, "text_source", None),
        "asr": ctx.asr.to_json() if getattr(ctx, "asr", None) is not None else None,
    }


def dumps_record(ctx: ClipContext) -> bytes:
    return json.dumps(text_record(ctx), ensure_ascii=False, indent=1).encode("utf-8")
