"""Separate stage: split a clip's audio into vocals (speech/singing) and accompaniment.

Why: the audio embedding stage reads ``ctx.vocals`` when present, so background music in
short videos does not dominate the voice features. Output is float32 mono at
``media.sample_rate`` (the decode stage's rate), and ``vocals + accompaniment`` reconstructs
the input for the classical backends (the accompaniment is the residual).

Backends:
  ``repet``   offline (default): REPET-SIM (Rafii & Pardo 2012): a frame that repeats elsewhere
              in the clip (cosine nearest neighbours of the magnitude spectrogram, median of
              them) is accompaniment; what does not repeat is voice. On top of the plain soft
              mask: a longer window, a vocal band, a mask floor and a *gate* that passes clips
              with (almost) no repeating background through unchanged, so speech-only clips are
              never degraded. Parameters were chosen by measurement (bench/separation.py).
              The k nearest frames are found exactly (one similarity matrix per row block),
              within 30-s blocks of a longer clip, so memory and time stay bounded.
  ``hpss``    offline alternative after two-stage HPSS (Tachibana et al. 2014): long-window
              HPSS removes sustained instruments, the short-window harmonic mask of the rest
              keeps the voice. Gains on the songs (+1.5 dB) but cuts speech-only clips to
              10-16 dB SI-SDR and does less on speech over music; kept for comparison.
  ``none``    passthrough: vocals = the input audio, accompaniment not computed.
  ``demucs``  full: Hybrid Transformer Demucs (``htdemucs``) through demucs's own API.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from pipeline.stages import dsp
from pipeline.stages.base import (
    ClipContext,
    ClipError,
    ModelMissingError,
    Stage,
    StageConfig,
    register,
)

_EPS = 1e-12


# --- shared helpers ---------------------------------------------------------------------------
def _n_fft(sr: int, seconds: float) -> int:
    """The power of two nearest to `seconds` of audio: windows are set in seconds so that a
    parameter means the same at 16 kHz and 44.1 kHz."""
    return int(2 ** max(6, round(np.log2(max(seconds * sr, 64)))))


def _mono_input(audio: np.ndarray) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ClipError(f"separation expects mono audio, got an array of shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ClipError("audio contains NaN or Inf samples; cannot separate")
    return x


@dataclass
class Separation:
    """Result of a classical separator: both parts at the input rate, and what happened."""

    vocals: np.ndarray
    accompaniment: np.ndarray
    note: str


def _passthrough(x: np.ndarray, note: str) -> Separation:
    return Separation(x.copy(), np.zeros_like(x), note)


def _from_mask(x: np.ndarray, spec: np.ndarray, mask: np.ndarray, n_fft: int, note: str):
    vocals = dsp.istft(spec * mask, n_fft, n_fft // 4, len(x))
    vocals = vocals.astype(np.float32)
    return Separation(vocals, (x - vocals).astype(np.float32), note)


# --- REPET-SIM ----------------------------------------------------------------------------------
class RepetConfig(StageConfig):
    window: float = Field(0.128, gt=0, description="STFT window, seconds")
    width: float = Field(1.0, gt=0, description="min distance of a repeating neighbour, s")
    margin: float = Field(2.0, ge=0, description="voice must exceed margin x background")
    power: float = Field(2.0, gt=0, description="soft-mask exponent")
    band_low: float = Field(80.0, ge=0, description="Hz; below this nothing is voice")
    band_high: float = Field(8000.0, gt=0, description="Hz; above this nothing is voice")
    floor: float = Field(0.2, ge=0, le=1, description="minimum mask value (keeps some voice)")
    gate: float = Field(
        0.05, ge=0, le=1, description="pass through when the repeating part holds less energy"
    )
    block: float = Field(
        30.0, gt=0, description="repeating frames are looked for within blocks of this many "
        "seconds: the neighbour search grows with the square of the frames it compares",
    )


def repeating_background(mag: np.ndarray, width_frames: int, chunk: int = 256) -> np.ndarray:
    """Per frame, the median of its k most similar frames (cosine similarity of the magnitude
    columns), none closer in time than `width_frames`: the repeating part of REPET-SIM.

    k = 2 * ceil(sqrt(t - 2 * width + 1)) as in librosa's recurrence matrix. Computed with one
    similarity matrix and a partition per row block instead of librosa's per-frame loop over a
    sparse matrix (which also keeps k of its nearest frames in index order, not the k nearest);
    the whole REPET stage went from 110 to 35 ms per 3-s clip with it. A frame with no eligible
    neighbour keeps its own column; one with fewer than k takes the median of those it has.
    """
    t = mag.shape[1]
    x = mag.T.astype(np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = int(2 * np.ceil(np.sqrt(max(1, t - 2 * width_frames + 1))))
    out = mag.copy()
    for a in range(0, t, chunk):
        b = min(t, a + chunk)
        sim = x[a:b] @ x.T  # [c, t]
        sim[np.abs(np.arange(a, b)[:, None] - np.arange(t)[None, :]) < width_frames] = -np.inf
        eligible = np.isfinite(sim).sum(1)
        kk = min(k, int(eligible.max(initial=0)))
        if kk < 1:
            continue
        nbr = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # [c, kk], the kk most similar
        rows = np.flatnonzero(eligible >= kk)
        if len(rows):
            vals = mag[:, nbr[rows]]  # [F, r, kk]
            out[:, a + rows] = np.median(vals, axis=2)
        for r in np.flatnonzero((eligible > 0) & (eligible < kk)):  # near the edges of a short clip
            cols = np.flatnonzero(np.isfinite(sim[r]))
            out[:, a + r] = np.median(mag[:, cols], axis=1)
    return out


def repet_mask(mag: np.ndarray, width_frames: int, margin: float, power: float) -> np.ndarray:
    """REPET-SIM soft mask of the non-repeating (voice) part of a magnitude spectrogram."""
    background = np.minimum(mag, repeating_background(mag, width_frames))
    return dsp.softmask(mag - background, margin * background, power)


def repet_separate(audio: np.ndarray, sr: int, cfg: RepetConfig | None = None) -> Separation:
    """REPET-SIM with a vocal band, a mask floor and a passthrough gate (see module doc)."""
    cfg = cfg or RepetConfig()
    x = _mono_input(audio)
    n_fft = _n_fft(sr, cfg.window)
    if len(x) < n_fft:
        return _passthrough(x, "passthrough: clip too short or silent for REPET")
    spec = dsp.stft(x, n_fft, n_fft // 4)
    mag = np.abs(spec)
    n_frames = mag.shape[1]
    # nn_filter needs a neighbour at least `width` frames away on either side
    width = min(max(1, int(cfg.width * sr / (n_fft // 4))), (n_frames - 1) // 2 - 1)
    energy = float(np.sum(mag**2))
    if width < 1 or energy <= _EPS:
        return _passthrough(x, "passthrough: clip too short or silent for REPET")
    # a clip longer than `block` is masked block by block (equal blocks of at most `block`
    # seconds, one STFT and one inverse for the whole clip): on 10 minutes of audio the
    # whole-clip search (librosa nn_filter) took 116 s and 2.1 GB, 30-s blocks 40 s and 0.9 GB
    n_blocks = max(1, int(np.ceil(n_frames / max(1, int(cfg.block * sr / (n_fft // 4))))))
    edges = np.linspace(0, n_frames, n_blocks + 1).round().astype(int)
    mask = np.empty_like(mag)
    for a, b in zip(edges[:-1], edges[1:]):
        mask[:, a:b] = repet_mask(mag[:, a:b], width, cfg.margin, cfg.power)
    repeating = float(np.sum((1.0 - mask) * mag**2)) / energy
    if repeating < cfg.gate:
        return _passthrough(x, f"passthrough: repeating background {repeating:.1%} < gate")
    freqs = dsp.fft_frequencies(sr, n_fft)
    band = ((freqs >= cfg.band_low) & (freqs <= cfg.band_high)).astype(np.float32)
    mask = cfg.floor + (1.0 - cfg.floor) * mask * band[:, None]
    return _from_mask(x, spec, mask, n_fft, f"repet: repeating background {repeating:.1%}")


# --- two-stage HPSS -----------------------------------------------------------------------------
class HpssConfig(StageConfig):
    long_window: float = Field(0.2, gt=0, description="stage 1 window, seconds")
    short_window: float = Field(0.03, gt=0, description="stage 2 window, seconds")
    kernel: int = Field(17, ge=3, description="median filter length, bins/frames")
    margin: float = Field(1.0, ge=1.0)


def hpss_separate(audio: np.ndarray, sr: int, cfg: HpssConfig | None = None) -> Separation:
    """Voice = percussive at a long window (not sustained like chords) but harmonic at a
    short window (not transient like drums). The stage-2 mask is computed on the stage-1
    residual and applied to the mixture: applying it to the residual (the textbook cascade)
    measured worse here (-4.8 dB on 'Georgia Wonder - Siren' against -3.0 dB for the mixture)."""
    cfg = cfg or HpssConfig()
    x = _mono_input(audio)
    n1, n2 = _n_fft(sr, cfg.long_window), _n_fft(sr, cfg.short_window)
    if len(x) < n1 or float(np.sum(x.astype(np.float64) ** 2)) <= _EPS:
        return _passthrough(x, "passthrough: clip too short or silent for HPSS")
    import librosa  # only this comparison backend needs librosa (its decompose: scikit-learn)

    spec1 = librosa.stft(x, n_fft=n1, hop_length=n1 // 4)
    _, perc = librosa.decompose.hpss(spec1, kernel_size=cfg.kernel, margin=cfg.margin)
    rest = librosa.istft(perc, hop_length=n1 // 4, n_fft=n1, length=len(x))
    spec2 = librosa.stft(rest, n_fft=n2, hop_length=n2 // 4)
    mask, _ = librosa.decompose.hpss(spec2, kernel_size=cfg.kernel, margin=cfg.margin, mask=True)
    return _from_mask(x, librosa.stft(x, n_fft=n2, hop_length=n2 // 4), mask, n2, "hpss")


# --- classical stages ---------------------------------------------------------------------------
def _clip_audio(ctx: ClipContext) -> tuple[np.ndarray, int] | None:
    """The clip's audio and rate, or None (status set) when there is none."""
    media = ctx.media
    if media is None or not media.has_audio:
        ctx.status["separate"] = "no audio"
        return None
    return media.audio, media.sample_rate


@register
class NoSeparation(Stage):
    """Passthrough: the voice is the whole audio (no separation cost, no separation risk)."""

    name: ClassVar[str] = "separate"
    backend: ClassVar[str] = "none"

    def process_one(self, ctx: ClipContext) -> None:
        got = _clip_audio(ctx)
        if got is None:
            return
        ctx.vocals = _mono_input(got[0]).copy()
        ctx.accompaniment = None
        ctx.status["separate"] = "passthrough"


class _MaskSeparation(Stage):
    """A classical mask separator: `separate(audio, sr, config)` on the clip's audio."""

    name: ClassVar[str] = "separate"
    version: ClassVar[str] = "1"
    separate: ClassVar[Any]

    def load(self) -> None:
        # repet runs on pipeline/stages/dsp.py; hpss needs librosa, whose submodules load on
        # first use (scipy.signal, scikit-learn: 1-3 s), paid here rather than in the first
        # clip's separation time
        if self.backend == "hpss":
            import librosa

            _ = (librosa.stft, librosa.istft, librosa.decompose.hpss)

    def process_one(self, ctx: ClipContext) -> None:
        got = _clip_audio(ctx)
        if got is None:
            return
        sep = type(self).separate(got[0], got[1], self.config)
        ctx.vocals, ctx.accompaniment = sep.vocals, sep.accompaniment
        ctx.status["separate"] = sep.note


@register
class RepetSeparation(_MaskSeparation):
    """Offline default: REPET-SIM with a passthrough gate (see `repet_separate`)."""

    backend: ClassVar[str] = "repet"
    version: ClassVar[str] = "2"  # 2: the k nearest frames found exactly; long clips masked per block
    Config: ClassVar[type[StageConfig]] = RepetConfig
    separate = staticmethod(repet_separate)


@register
class HpssSeparation(_MaskSeparation):
    """Two-stage HPSS (see `hpss_separate`); measured worse than REPET, kept for comparison."""

    backend: ClassVar[str] = "hpss"
    Config: ClassVar[type[StageConfig]] = HpssConfig
    separate = staticmethod(hpss_separate)


# --- Demucs -------------------------------------------------------------------------------------
class DemucsConfig(StageConfig):
    model: str = "htdemucs"  # a demucs model/bag name (or "hf://namespace/name")
    model_dir: str | None = None  # local repo: <name>.yaml + <sig>[-<checksum>].th files
    device: str | None = None  # None: the device the runner gives the stage
    segment: float | None = Field(None, gt=0, description="seconds per chunk (model default)")
    shifts: int = Field(1, ge=0, description="random-shift averaging passes (demucs default)")
    overlap: float = Field(0.25, ge=0, lt=1)
    batch_size: int = Field(4, ge=1, description="clips per forward pass")
    # Demucs normalises each chunk it sees and overlap-adds chunks, so a clip zero-padded to
    # a longer batch mate comes out slightly different from the clip alone (measured: up to
    # 5x the output std with random weights). False: only equal-length clips share a forward
    # pass (results independent of the batch). True: pad to the longest (faster on a GPU).
    pad_batch: bool = False
    seed: int = 0  # seeds the random shifts, so that the cache is reproducible


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _torch_hub_files(name: str) -> list[Path] | None:
    """Where demucs's legacy download would cache the weights of a packaged bag, or None
    when `name` is not one of demucs's packaged bags."""
    import torch
    import yaml
    from demucs.pretrained import REMOTE_ROOT, _parse_remote_files

    bag = REMOTE_ROOT / f"{name}.yaml"
    if not bag.exists():
        return None
    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")
    sigs = yaml.safe_load(bag.read_text())["models"]
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    return [ckpt / urls[s].rsplit("/", 1)[1] for s in sigs if s in urls]


def _missing(name: str, why: str) -> ModelMissingError:
    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return ModelMissingError(
        f"demucs model '{name}' is not available locally ({why}); provide it by running "
        f"`python -m demucs -n {name} <any.wav>` once online (fills {hub}, or the HF cache), "
        f"or set separate.model_dir=<folder with {name}.yaml and its .th files>"
    )


def load_demucs(name: str, model_dir: str | None = None) -> Any:
    """Load a demucs model without network when offline; any failure becomes one
    `ModelMissingError` line (demucs itself would print and `sys.exit`, or raise URLError)."""
    from demucs.pretrained import get_model

    if model_dir is not None:
        repo = Path(model_dir).expanduser()
        if not repo.is_dir():
            raise _missing(name, f"model_dir {repo} is not a directory")
        try:
            return get_model(name, repo=repo)
        except Exception as e:  # noqa: BLE001 - demucs raises several types for "not there"
            raise _missing(name, f"not in {repo}: {str(e).splitlines()[0][:120]}") from None
    if _offline() and not name.startswith("hf://") and name != "demucs_unittest":
        files = _torch_hub_files(name)
        if files is not None and not all(f.exists() for f in files):
            # the legacy path would try to download; only the HF cache can still serve it
            try:
                from demucs.hf import get_hf_model

                return get_hf_model(name).eval()
            except Exception:  # noqa: BLE001
                raise _missing(name, "offline, not in the torch hub or HF cache") from None
    try:
        return get_model(name)
    except Exception as e:  # noqa: BLE001
        raise _missing(name, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None


def _resample(x: Any, old_sr: int, new_sr: int, length: int | None = None) -> Any:
    """Band-limited resampling along the last axis of a torch tensor (julius, no torchaudio)."""
    import julius

    if old_sr == new_sr:
        return x if length is None else x[..., :length]
    if length is None:  # keep every sample: the way back trims to the original length
        return julius.resample_frac(x, old_sr, new_sr, full=True)
    return julius.resample_frac(x, old_sr, new_sr, output_length=length)


def batch_groups(lengths: list[int], size: int, pad: bool) -> list[list[int]]:
    """Indices that share a forward pass: in length order, at most `size`, and of equal
    length unless padding is allowed."""
    groups: list[list[int]] = []
    for k in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        last = groups[-1] if groups else None
        if last and len(last) < size and (pad or lengths[last[0]] == lengths[k]):
            last.append(k)
        else:
            groups.append([k])
    return groups


@register
class DemucsSeparation(Stage):
    """Full backend: demucs (``htdemucs`` by default), batched across clips.

    Each clip is resampled to the model's rate and channel count, normalised like demucs's
    own CLI (zero mean, unit std of the mono mix), batched with clips of the same length
    (or zero-padded to the longest, see ``pad_batch``), separated, and brought back to mono at the clip's rate. Vocals = the model's
    ``vocals`` source; accompaniment = the sum of the others.
    """

    name: ClassVar[str] = "separate"
    backend: ClassVar[str] = "demucs"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = DemucsConfig
    config: DemucsConfig

    def load(self) -> None:

        self.model = load_demucs(self.config.model, self.config.model_dir)
        if "vocals" not in self.model.sources:
            raise ModelMissingError(
                f"demucs model '{self.config.model}' has no 'vocals' source "
                f"(sources: {self.model.sources}); choose a vocals model such as htdemucs"
            )
        self.model.to(self._device())

    def _device(self) -> str:
        return self.config.device or self.device

    def models(self) -> list[dict[str, str]]:
        return [{"id": f"demucs:{self.config.model}", "revision": self.config.model_dir or "packaged"}]

    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        self.ensure_loaded()
        errors: list[BaseException | None] = [None] * len(batch)
        todo: list[int] = []
        for i, ctx in enumerate(batch):
            try:
                if _clip_audio(ctx) is not None:
                    _mono_input(ctx.media.audio)  # type: ignore[union-attr]
                    todo.append(i)
            except ClipError as e:
                errors[i] = e
        lengths = [len(batch[i].media.audio) for i in todo]  # type: ignore[union-attr]
        for idx in batch_groups(lengths, self.config.batch_size, self.config.pad_batch):
            members = [todo[k] for k in idx]
            try:
                self._separate([batch[i] for i in members])
            except Exception as e:  # noqa: BLE001 - retry alone, so the error lands on its clip
                if len(members) == 1:
                    errors[members[0]] = e
                    continue
                for i in members:
                    try:
                        self._separate([batch[i]])
                    except Exception as e2:  # noqa: BLE001
                        errors[i] = e2
        return errors

    def process_one(self, ctx: ClipContext) -> None:
        err = self.process([ctx])[0]
        if err is not None:
            raise err

    def _separate(self, group: list[ClipContext]) -> None:
        """Separate clips of one batch in a single forward pass and store the results."""
        import torch
        from demucs.apply import apply_model

        model, c = self.model, self.config
        msr, chans = int(model.samplerate), int(model.audio_channels)
        waves, stats = [], []
        for ctx in group:
            media = ctx.media
            x = torch.from_numpy(np.ascontiguousarray(media.audio, dtype=np.float32))
            x = _resample(x, media.sample_rate, msr)
            mean, std = x.mean(), x.std() + 1e-8
            waves.append((x - mean) / std)
            stats.append((mean, std))
        longest = max(w.shape[-1] for w in waves)
        mix = torch.zeros(len(group), chans, longest)
        for b, w in enumerate(waves):
            mix[b, :, : w.shape[-1]] = w
        state = random.getstate()
        random.seed(c.seed)
        try:
            with torch.no_grad():
                out = apply_model(
                    model, mix, shifts=c.shifts, split=True, overlap=c.overlap,
                    segment=c.segment, device=self._device(), progress=False,
                )  # fmt: skip
        finally:
            random.setstate(state)
        voc = model.sources.index("vocals")
        for b, ctx in enumerate(group):
            media, (mean, std) = ctx.media, stats[b]
            n = waves[b].shape[-1]
            src = out[b, :, :, :n].mean(dim=1) * std + mean / len(model.sources)  # [S, n] mono
            back = _resample(src, msr, media.sample_rate, length=len(media.audio))
            vocals = back[voc]
            accomp = back.sum(dim=0) - vocals
            ctx.vocals = vocals.numpy().astype(np.float32)
            ctx.accompaniment = accomp.numpy().astype(np.float32)
            ctx.status["separate"] = f"demucs:{c.model}"
