"""Audio stage: paralinguistic features of the voice (``features['audio']``).

Reads ``ctx.vocals`` when the separate stage produced it, else ``ctx.media.audio``. A clip
without an audio stream is *absent* (``ctx.absent['audio']``); an audio stream with no
samples, or with NaN/Inf samples, is a ``ClipError``. Nothing non-finite ever leaves here.

Backends:
  ``egemaps``  offline: openSMILE eGeMAPSv02 — 25 low-level descriptors every 10 ms (the
               sequence) and the 88 functionals — plus mean and std of a log-mel
               spectrogram (pooled = 88 + 2 * n_mels). ``feature_set = compare`` puts the
               ComParE_2016 functionals (6,373) in place of the 88, ``both`` keeps both
               (88 + 6,373); the sequence stays the eGeMAPS LLDs.
  ``hf-audio`` full: wav2vec2 / WavLM / HuBERT through transformers ``AutoModel`` (default
               microsoft/wavlm-base-plus); sequence = one hidden-state layer per 20 ms frame,
               pooled = its mean over the frames, layers = every hidden state's mean [L+1, D].
  ``whisper-encoder`` full: the encoder of a Whisper model (transformers ``WhisperModel``,
               decoder unused; pipeline/stages/audio_whisper.py), same outputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.stages import dsp
from pipeline.stages.base import (
    ClipContext,
    ClipError,
    Feature,
    ModelMissingError,
    Stage,
    StageConfig,
    register,
)

N_LLD = 25  # eGeMAPSv02 low-level descriptors
N_FUNCTIONALS = 88  # eGeMAPSv02 functionals
N_COMPARE = 6373  # ComParE_2016 functionals
LLD_FRAME = 0.020  # seconds; eGeMAPS energy/spectral frames (10 ms hop)


# --- input ------------------------------------------------------------------------------------
def embed_windows(stage: Stage, batch: list[ClipContext],
                  windows_of: Callable[[np.ndarray], list[tuple[int, np.ndarray]]],
                  feature_of: Callable[[list], Feature]) -> list[BaseException | None]:
    """The batch flow of the windowed audio encoders (hf-audio, whisper-encoder): every clip's
    voice signal at the stage's rate, cut by `windows_of` into (start, signal) windows, all
    windows of the batch through `stage._run_windows`, then `feature_of` per clip. A failing
    batch is retried clip by clip so that the error lands on its clip."""
    stage.ensure_loaded()
    errors: list[BaseException | None] = [None] * len(batch)
    windows: list[tuple[int, int, np.ndarray]] = []  # (clip index, start sample, signal)
    for i, ctx in enumerate(batch):
        try:
            got = voice_signal(ctx)
            if got is not None:
                windows += [(i, s, w) for s, w in windows_of(to_rate(*got, stage.sr))]
        except ClipError as e:
            errors[i] = e
    try:
        outs = stage._run_windows([w for _, _, w in windows])
    except Exception as e:  # noqa: BLE001 - retry clip by clip so the error lands on its clip
        if len({i for i, _, _ in windows}) <= 1:
            for i, _, _ in windows:
                errors[i] = e
            return errors
        return [embed_windows(stage, [c], windows_of, feature_of)[0] for c in batch]
    per_clip: dict[int, list[tuple[int, tuple[np.ndarray, np.ndarray]]]] = {}
    for (i, start, _), out in zip(windows, outs, strict=True):
        per_clip.setdefault(i, []).append((start, out))
    for i, parts in per_clip.items():
        try:
            batch[i].features["audio"] = feature_of(parts)
        except ClipError as e:
            errors[i] = e
    return errors


def voice_signal(ctx: ClipContext) -> tuple[np.ndarray, int] | None:
    """The signal to describe: separated vocals if any, else the decoded audio.

    Returns None (and marks the modality absent) when the clip has no audio stream at all.
    """
    media = ctx.media
    if media is None or (media.audio is None and ctx.vocals is None):
        ctx.absent["audio"] = "no audio stream"
        return None
    x = ctx.vocals if ctx.vocals is not None else media.audio
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.size == 0:
        raise ClipError("audio stream has no samples (empty or cut to nothing); nothing to embed")
    if not np.all(np.isfinite(x)):
        raise ClipError("audio contains NaN or Inf samples (decoder or separation fault)")
    return x, int(media.sample_rate)


def egemaps_lld_and_functionals(smile: Any, x: np.ndarray, sr: int
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """eGeMAPSv02 LLDs [T, 25], their start times [T] (s) and the 88 functionals of one signal
    from a single openSMILE run.

    `smile` is an `opensmile.Smile` of the eGeMAPSv02 functionals (its config file and config
    root). The functionals are computed from the same LLDs, so one run with openSMILE's own
    two-level external output (the `standard_external_data_output_multi` config the package
    ships) gives both; `Smile.process_signal` per level would compute the LLDs twice. The
    values are bit-identical to the two `process_signal` calls (a test checks it on real
    speech), at half the cost. An empty level (a signal shorter than openSMILE's windows)
    comes back as NaN, as `process_signal` returns it.
    """
    import pandas as pd
    from opensmile.core.config import config as smile_config
    from opensmile.core.lib import OpenSMILE

    root = smile.default_config_root
    options = {
        **smile.options,
        "source": os.path.join(root, smile_config.EXTERNAL_INPUT_CONFIG),
        "sink": os.path.join(root, smile_config.EXTERNAL_OUTPUT_MULTI_CONFIG),
        "sinkLevelLLD": "lld", "sinkLevelFunc": "func",
        "bufferModeRbConf": os.path.join(root, "shared/BufferModeRb.conf.inc"),
        "frameModeFunctionalsConf": os.path.join(root, "shared/FrameModeFunctionals.conf.inc"),
        "sampleRate": sr, "nBits": 16,
    }
    lld: list[np.ndarray] = []
    starts: list[float] = []
    fun: list[np.ndarray] = []
    engine = OpenSMILE()
    engine.initialize(config_file=smile.config_path, options=options, loglevel=0, log_file="", debug=False)
    try:
        engine.external_sink_set_callback_ex(
            "extsinklld", lambda data, meta: (lld.append(data.copy()), starts.append(meta.time)))
        engine.external_sink_set_callback_ex("extsinkfunc", lambda data, meta: fun.append(data.copy()))
        engine.external_audio_source_write_data(
            "extsource", bytes((np.asarray(x, np.float32) * 32768).astype(np.int16)))
        engine.external_audio_source_set_eoi("extsource")
        engine.run()
    finally:
        engine.free()
    lld_arr = np.vstack(lld).astype(np.float32) if lld else np.full((1, N_LLD), np.nan, np.float32)
    # start times as process_signal gives them (whole nanoseconds)
    start_arr = pd.to_timedelta(np.asarray(starts if lld else [0.0], np.float64), "s").total_seconds().to_numpy()
    fun_arr = (np.vstack(fun).astype(np.float32).reshape(-1) if fun
               else np.full(N_FUNCTIONALS, np.nan, np.float32))
    return lld_arr, start_arr, fun_arr


def to_rate(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return x
    return dsp.resample(x, sr, target).astype(np.float32)


# --- eGeMAPS ----------------------------------------------------------------------------------
class EgemapsConfig(StageConfig):
    sample_rate: int = Field(16000, ge=8000, description="features are computed at this rate")
    n_mels: int = Field(40, ge=1, le=256, description="log-mel bands (pooled mean + std)")
    # openSMILE returns NaN for every value of a clip shorter than its 60 ms pitch window
    # ("segment too short"). Shorter clips than this are tiled (repeated) up to it first:
    # a repeated sound keeps its level, spectral and pitch statistics (what eGeMAPS means and
    # percentiles measure); only rate features (peaks/s, segment lengths) see the seams.
    # 0.5 s gives ~50 LLD frames, enough for the 20-80th percentile functionals.
    min_seconds: float = Field(0.5, gt=0.06)
    # which openSMILE functionals go into `pooled` (see BENCHMARKS.md, "Feature quality")
    feature_set: Literal["egemaps", "compare", "both"] = "egemaps"


@register
class EgemapsAudio(Stage):
    """openSMILE eGeMAPSv02 LLDs + functionals and log-mel statistics."""

    name: ClassVar[str] = "audio"
    backend: ClassVar[str] = "egemaps"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = EgemapsConfig
    config: EgemapsConfig

    def load(self) -> None:
        import opensmile

        fs = opensmile.FeatureSet.eGeMAPSv02
        self._lld = opensmile.Smile(feature_set=fs, feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
        self._fun = opensmile.Smile(feature_set=fs, feature_level=opensmile.FeatureLevel.Functionals)
        self._compare = None
        if self.config.feature_set != "egemaps":
            self._compare = opensmile.Smile(
                feature_set=opensmile.FeatureSet.ComParE_2016, feature_level=opensmile.FeatureLevel.Functionals
            )

    def models(self) -> list[dict[str, str]]:
        import opensmile

        out = [{"id": "opensmile:eGeMAPSv02", "revision": opensmile.__version__}]
        if self.config.feature_set != "egemaps":
            out.append({"id": "opensmile:ComParE_2016 functionals", "revision": opensmile.__version__})
        return out

    def provenance(self) -> dict[str, Any]:
        # the default (eGeMAPS) keeps the provenance, hence the feature-set key, it had before
        # `feature_set` existed: only a changed choice re-keys the audio features
        prov = super().provenance()
        if self.config.feature_set == "egemaps":
            prov["config"].pop("feature_set", None)
        return prov

    def n_functionals(self) -> int:
        fs = self.config.feature_set
        return {"egemaps": N_FUNCTIONALS, "compare": N_COMPARE, "both": N_FUNCTIONALS + N_COMPARE}[fs]

    def output_dims(self) -> dict[str, tuple[int, int]]:
        return {"audio": (N_LLD, self.n_functionals() + 2 * self.config.n_mels)}

    def process_one(self, ctx: ClipContext) -> None:
        self.ensure_loaded()
        got = voice_signal(ctx)
        if got is None:
            return
        x = to_rate(*got, self.config.sample_rate)
        ctx.features["audio"] = self.describe(x, ctx)

    def describe(self, x: np.ndarray, ctx: ClipContext | None = None) -> Feature:
        """Features of one signal at `config.sample_rate`; notes go to ctx.status['audio']."""
        sr = self.config.sample_rate
        notes: list[str] = []
        duration = len(x) / sr
        need = int(math.ceil(self.config.min_seconds * sr))
        if len(x) < need:
            x = np.resize(x, need)  # tiles the clip
            notes.append(f"{duration:.3f} s clip tiled to {self.config.min_seconds} s for openSMILE")
        funs = []
        if self.config.feature_set != "compare":
            lld_all, starts, fun = egemaps_lld_and_functionals(self._fun, x, sr)
            funs.append(fun)
        else:
            lld = self._lld.process_signal(x, sr)
            starts = lld.index.get_level_values("start").total_seconds().to_numpy()
            lld_all = lld.to_numpy(dtype=np.float32)
        keep = max(1, int(np.sum(starts < duration)))  # frames of the real (untiled) clip
        seq = lld_all[:keep]
        times = (starts[:keep] + LLD_FRAME / 2).astype(np.float32)  # frame centres
        if self._compare is not None:
            funs.append(self._compare.process_signal(x, sr).to_numpy(dtype=np.float32).reshape(-1))
        pooled = np.concatenate([*funs, logmel_stats(x, sr, self.config.n_mels)])
        seq, pooled = _finite(seq, notes, "LLD"), _finite(pooled, notes, "pooled")
        if ctx is not None and notes:
            ctx.status["audio"] = "; ".join(notes)
        return Feature(pooled=pooled, seq=seq, times=times)


def logmel_stats(x: np.ndarray, sr: int, n_mels: int) -> np.ndarray:
    """Mean and std over time of a log-mel spectrogram (25 ms window, 10 ms hop), in dB with a
    fixed -100 dB floor so silence is a finite, level-comparable value."""
    n_fft = int(2 ** math.ceil(math.log2(0.025 * sr)))
    db = dsp.log_mel(x, sr, n_fft, int(0.010 * sr), int(0.025 * sr), n_mels, amin=1e-10)
    return np.concatenate([db.mean(axis=1), db.std(axis=1)]).astype(np.float32)


def _finite(a: np.ndarray, notes: list[str], what: str) -> np.ndarray:
    """Last guard: openSMILE marks undefined values (e.g. F0 of unvoiced frames) as 0, so a
    stray NaN/Inf becomes 0 too, and the count is reported in the clip's status."""
    bad = ~np.isfinite(a)
    if bad.any():
        notes.append(f"{int(bad.sum())} non-finite {what} values set to 0")
        a = np.where(bad, 0.0, a).astype(np.float32)
    return a


# --- transformers (wav2vec2 / WavLM / HuBERT) -------------------------------------------------
class HfAudioConfig(StageConfig):
    # hub id or a local save_pretrained directory. WavLM-base-plus is the emotion-oriented
    # default (SUPERB ER); stronger and larger: microsoft/wavlm-large, facebook/hubert-large-ll60k,
    # or the Whisper encoder (backend "whisper-encoder", e.g. openai/whisper-large-v3)
    model: str = "microsoft/wavlm-base-plus"
    revision: str | None = None  # hub commit/tag; None = the default branch
    layer: int = -1  # index into hidden_states (0 = CNN features, -1 = last layer)
    batch_size: int = Field(8, ge=1)
    max_seconds: float = Field(20.0, gt=0, description="longer clips run in windows of this")


def _missing_model(model: str, revision: str | None, err: BaseException) -> ModelMissingError:
    import os

    rev = f" (revision {revision})" if revision else ""
    why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        why = "no such local directory"  # not the hub's "Repo id must be in the form ..."
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return ModelMissingError(
        f"audio model '{model}'{rev} is not available locally ({why}); download it once with "
        f"`hf download {model}` into HF_HOME={home}, or set audio.model=<local dir saved with "
        "save_pretrained>"
    )


def hf_model_config(model: str, revision: str | None) -> Any:
    """The checkpoint's transformers config (no weights), or the one-line missing-model error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise _missing_model(model, revision, e) from None


def frames_for(n_samples: int, kernels: list[int], strides: list[int]) -> int:
    """Number of frames the convolutional feature encoder makes from n samples."""
    n = n_samples
    for k, s in zip(kernels, strides, strict=True):
        n = (n - k) // s + 1 if n >= k else 0
    return n


@register
class HfAudio(Stage):
    """Self-supervised speech encoders through transformers, batched across clips.

    Models whose feature encoder normalises over the whole input (``feat_extract_norm =
    "group"``, e.g. wav2vec2-base) give different outputs when zero-padded, which is why
    their feature extractor does not return an attention mask: such models only batch
    windows of equal length. Layer-norm models (``"layer"``: wav2vec2-large-lv60, WavLM-large,
    HuBERT-large) batch any lengths with an attention mask.
    """

    name: ClassVar[str] = "audio"
    backend: ClassVar[str] = "hf-audio"
    version: ClassVar[str] = "2"  # 2: stores every hidden state's clip mean (`layers`)
    Config: ClassVar[type[StageConfig]] = HfAudioConfig
    config: HfAudioConfig

    _model_config: Any = None

    def _hf_config(self) -> Any:
        if self._model_config is None:
            self._model_config = hf_model_config(self.config.model, self.config.revision)
        return self._model_config

    def load(self) -> None:
        from transformers import AutoFeatureExtractor, AutoModel

        c = self.config
        hc = self._hf_config()
        n_states = hc.num_hidden_layers + 1
        if not -n_states <= c.layer < n_states:
            raise ValueError(f"audio.layer={c.layer} out of range for '{c.model}' ({n_states} hidden states)")
        try:
            self.extractor = AutoFeatureExtractor.from_pretrained(c.model, revision=c.revision)
            self.model = AutoModel.from_pretrained(c.model, revision=c.revision)
        except (OSError, ValueError) as e:
            raise _missing_model(c.model, c.revision, e) from None
        self.model.eval().to(self.device)
        self.sr = int(self.extractor.sampling_rate)
        self.kernels, self.strides = list(hc.conv_kernel), list(hc.conv_stride)
        self.receptive = frames_needed(self.kernels, self.strides)
        self.hop = int(np.prod(self.strides))
        self.pad_ok = bool(getattr(self.extractor, "return_attention_mask", False)) and (
            getattr(hc, "feat_extract_norm", "layer") == "layer"
        )

    def models(self) -> list[dict[str, str]]:
        c = self.config
        local = Path(c.model).expanduser().is_dir()
        return [{"id": c.model, "revision": c.revision or ("local" if local else "default")}]

    def output_dims(self) -> dict[str, tuple[int, int]]:
        d = int(self._hf_config().hidden_size)
        return {"audio": (d, d)}

    def layer_dims(self) -> dict[str, tuple[int, int]]:
        hc = self._hf_config()
        return {"audio": (int(hc.num_hidden_layers) + 1, int(hc.hidden_size))}

    # --- batching ------------------------------------------------------------------------------
    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        return embed_windows(self, batch, lambda x: self._windows(x), self._feature)

    def process_one(self, ctx: ClipContext) -> None:
        err = self.process([ctx])[0]
        if err is not None:
            raise err

    def _windows(self, x: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Bounded-memory windows of max_seconds; a clip shorter than the encoder's receptive
        field (25 ms) is zero-padded to it so that it yields one frame."""
        if len(x) < self.receptive:
            x = np.pad(x, (0, self.receptive - len(x)))
        step = max(self.receptive, int(self.config.max_seconds * self.sr))
        starts = range(0, len(x), step)
        wins = [(s, x[s : s + step]) for s in starts]
        if len(wins) > 1 and len(wins[-1][1]) < self.receptive:
            wins = wins[:-1]  # a sliver shorter than one frame adds nothing
        return wins

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Indices batched together: by length order, equal lengths only unless padding is safe."""
        order = sorted(range(len(lengths)), key=lambda k: lengths[k])
        groups: list[list[int]] = []
        for k in order:
            g = groups[-1] if groups else None
            if g and len(g) < self.config.batch_size and (self.pad_ok or lengths[g[0]] == lengths[k]):
                g.append(k)
            else:
                groups.append([k])
        return groups

    def _run_windows(self, signals: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per signal: hidden states [frames, D] (float32) of the configured layer, and every
        hidden state's mean over those frames [L+1, D]."""
        import torch

        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(signals)
        for group in self._groups([len(s) for s in signals]):
            inputs = self.extractor(
                [signals[k] for k in group], sampling_rate=self.sr, return_tensors="pt",
                padding=True, return_attention_mask=self.pad_ok,
            )  # fmt: skip
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                states = self.model(**inputs, output_hidden_states=True).hidden_states
            stack = torch.stack(states, dim=1)  # [B, L+1, frames, D]
            for row, k in enumerate(group):
                n = frames_for(len(signals[k]), self.kernels, self.strides)
                mine = stack[row, :, :n].float()
                out[k] = (mine[self.config.layer].cpu().numpy(), mine.mean(dim=1).cpu().numpy())
        return out  # type: ignore[return-value]

    def _feature(self, parts: list[tuple[int, tuple[np.ndarray, np.ndarray]]]) -> Feature:
        return window_feature(parts, self.hop, self.receptive / 2, self.sr)


def window_feature(parts: list[tuple[int, tuple[np.ndarray, np.ndarray]]], hop: int, centre: float,
                   sr: int) -> Feature:
    """One clip's Feature from its windows (start sample, (chosen layer [n, D], per-layer
    means [L+1, D])): the frames in time order, pooled = their mean, layers = every hidden
    state's mean over all frames (windows weighted by their frame counts)."""
    parts = sorted(parts, key=lambda p: p[0])
    seq = np.concatenate([h for _, (h, _) in parts]).astype(np.float32)
    times = np.concatenate(
        [(s + np.arange(len(h)) * hop + centre) / sr for s, (h, _) in parts]
    ).astype(np.float32)
    counts = np.array([len(h) for _, (h, _) in parts], np.float64)
    layers = np.tensordot(counts / counts.sum(), np.stack([m for _, (_, m) in parts]), axes=1)
    layers = layers.astype(np.float32)
    if not (np.all(np.isfinite(seq)) and np.all(np.isfinite(layers))):
        raise ClipError("the audio model produced NaN/Inf hidden states for this clip")
    return Feature(pooled=seq.mean(axis=0), seq=seq, times=times, layers=layers)


def frames_needed(kernels: list[int], strides: list[int]) -> int:
    """Receptive field in samples of one output frame of the conv feature encoder."""
    field, jump = 1, 1
    for k, s in zip(kernels, strides, strict=True):
        field += (k - 1) * jump
        jump *= s
    return field


# registered here so that get_backend("audio", ...) finds it; its code is in its own file
from pipeline.stages import audio_whisper as _audio_whisper  # noqa: E402, F401
