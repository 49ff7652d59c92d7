"""`mmemo sample`: a small synthetic, labelled multimodal dataset in the folder recipe layout.

Why synthetic: the pipeline and the trainer need an end-to-end dataset with real video files
(H.264 + AAC mp4), burned-in subtitles, a real face and speech-like audio that anyone can make
offline in seconds, and whose labels are learnable from *every* modality but not perfectly
from any single one. Each modality's cue is drawn from the true class, or (with probability
`corrupt`, independently per modality) from a random other class, plus continuous noise, so
fusing modalities beats each one alone.

Emotion shifts (`shift`, half the clips by default): such a clip starts in another class — its
face, voice and first subtitle sentence — and changes at the midpoint to its cues above; its
label is the class it ends in, as a speaker who starts calm and ends angry is labelled angry.
A clip-level mean (a pooled vector) holds both classes and not their order; the time steps of
a sequence hold the order. So the sample has what the static clips before did not: a signal
only a model that reads time can use (the sequence heads, issue 15), beside the per-clip cues
every model can. `--shift 0` gives the static clips (the same files as before shifts existed).

Layout written under DIR:
    videos/<id>.mp4     320x240, 10 fps, ~3 s, H.264 video + AAC 16 kHz mono audio
    labels.csv          id,video,audio,text,title,label,speaker,split (split grouped by speaker)
    README.txt          what this is, the seed and the generator settings
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np
from scipy.signal import lfilter

CLASSES = ("happy", "sad", "angry", "neutral")
CSV_COLUMNS = ("id", "video", "audio", "text", "title", "label", "speaker", "split")

# --- per-class cue parameters (index = class) --------------------------------------------------
# visual: RGB tint added inside the face, vertical stretch of the face, brightness factor
_TINT = np.array([[34, 22, -14], [-22, -6, 36], [46, -20, -22], [0, 0, 0]], np.float32)
_STRETCH = np.array([0.88, 1.14, 1.0, 1.05], np.float32)
_BRIGHT = np.array([1.12, 0.82, 1.0, 0.95], np.float32)
# audio: pitch factor, pitch range (semitones), loudness, syllables per second, declination
_PITCH = np.array([1.25, 0.85, 1.12, 1.0])
_RANGE = np.array([4.5, 1.2, 3.5, 1.8])
_LOUD = np.array([0.65, 0.25, 0.9, 0.42])
_RATE = np.array([5.0, 2.6, 5.8, 3.8])
_DECLINE = np.array([0.0, -3.0, 1.0, -0.5])

# text: per-class templates; some templates and the topics are shared (vocabulary overlap)
_SHARED_TOPICS = (
    "the weather", "my job", "the trip", "our house", "the game", "my brother",
    "the news", "the party", "school", "dinner", "the movie", "my phone",
)
_TEMPLATES = {
    "happy": ("I am so {adj} about {topic}", "{topic} made me really {adj}",
              "we did it and I love {topic}", "what a {adj} day with {topic}"),
    "sad": ("I really miss {topic}", "{topic} made me feel so {adj}",
            "I am so {adj} about {topic}", "nothing is left of {topic}"),
    "angry": ("I am so {adj} about {topic}", "stop talking about {topic}",
              "{topic} made me really {adj}", "this is unfair, {topic} again"),
    "neutral": ("we talked about {topic} today", "{topic} is at noon",
                "I am {adj} about {topic}", "here is an update on {topic}"),
}
_ADJ = {
    "happy": ("happy", "glad", "thrilled", "excited", "delighted"),
    "sad": ("sad", "lonely", "down", "hopeless", "heartbroken"),
    "angry": ("angry", "furious", "annoyed", "mad", "upset"),
    "neutral": ("fine", "okay", "calm", "informed", "neutral"),
}
_FILLERS = ("to be honest", "you know", "I guess", "right now", "again")
_TITLE_HINT = {
    "happy": ("Best day ever", "Good news", "So much fun"),
    "sad": ("A hard week", "Missing home", "Bad news"),
    "angry": ("I am done", "Rant time", "This is wrong"),
    "neutral": ("Daily update", "Morning routine", "Quick notes"),
}
_TITLE_GENERIC = ("vlog", "story time", "my week", "life update", "episode")

_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
           (660, 1720, 2410))
_CHORDS = ((261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6),
           (196.0, 246.9, 293.7))

_FONT = cv2.FONT_HERSHEY_DUPLEX
_FONT_SCALE = 0.85  # ~19 px capital height: readable for OCR at 320 px width


@dataclass(frozen=True)
class SampleSpec:
    """Generator settings (written to README.txt so a sample can be re-made)."""

    seconds: float = 3.0
    width: int = 320
    height: int = 240
    fps: int = 10
    sample_rate: int = 16000
    n_speakers: int = 8
    corrupt: float = 0.35  # per-modality probability that the cue is from another class
    title_corrupt: float = 0.6  # the title is a weaker cue
    # probability that a clip shifts emotion halfway: its first half shows another class in
    # every modality, its second half the labelled one (the label is where the clip ends)
    shift: float = 0.5


@dataclass(frozen=True)
class _Speaker:
    name: str
    f0: float  # base pitch (Hz)
    formant: float  # vocal tract scale
    split: str


# --- planning ----------------------------------------------------------------------------------
def _cue(rng: np.random.Generator, label: int, p: float) -> int:
    """The class a modality shows: the true one, or with probability p another one."""
    if rng.random() >= p:
        return label
    others = [c for c in range(len(CLASSES)) if c != label]
    return int(rng.choice(others))


def _speakers(seed: int, n: int) -> list[_Speaker]:
    """Speakers with their own pitch; the split is by speaker (roughly 6/1/1 of 8)."""
    if n < 3:
        raise ValueError(f"n_speakers must be at least 3 (train/valid/test by speaker), got {n}")
    rng = np.random.default_rng([seed, 7001])
    order = rng.permutation(n)
    n_hold = max(1, round(n / 8))
    split_of = {}
    for rank, s in enumerate(order):
        split_of[int(s)] = "test" if rank < n_hold else "valid" if rank < 2 * n_hold else "train"
    out = []
    for s in range(n):
        female = s % 2 == 1
        f0 = rng.uniform(190, 235) if female else rng.uniform(100, 135)
        out.append(_Speaker(f"spk{s:02d}", float(f0), float(rng.uniform(0.92, 1.1) * (1.1 if female else 1.0)),
                            split_of[s]))
    return out


def _plan(n: int, seed: int, n_speakers: int) -> list[tuple[int, int]]:
    """(label, speaker) per clip: every speaker early on (so small samples still have all
    splits), classes balanced overall and within each speaker over each block of C*S clips."""
    n_cls = len(CLASSES)
    pairs = [((b % n_speakers + b // n_speakers) % n_cls, b % n_speakers)
             for b in (j % (n_cls * n_speakers) for j in range(n))]
    perm = np.random.default_rng([seed, 7002]).permutation(n)
    return [pairs[int(k)] for k in perm]


def _sentence(rng: np.random.Generator, cls: int) -> str:
    name = CLASSES[cls]
    template = str(rng.choice(_TEMPLATES[name]))
    text = template.format(adj=str(rng.choice(_ADJ[name])), topic=str(rng.choice(_SHARED_TOPICS)))
    if rng.random() < 0.3:
        text = f"{text} {rng.choice(_FILLERS)}"
    return text[0].upper() + text[1:]


def _title(rng: np.random.Generator, cls: int, k: int) -> str:
    generic = str(rng.choice(_TITLE_GENERIC))
    if rng.random() < 0.5:
        return f"{rng.choice(_TITLE_HINT[CLASSES[cls]])} | {generic} #{k}"
    return f"My {generic} #{k}"


# --- visual ------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _head() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's head from scikit-image (a real face photo), with a soft oval mask."""
    from skimage import data

    img = data.astronaut()[10:215, 135:295].astype(np.float32)  # hair to chin + neck
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = ((xx - w / 2) / (w * 0.48)) ** 2 + ((yy - h * 0.5) / (h * 0.5)) ** 2
    mask = np.clip((1.0 - d) / 0.15, 0.0, 1.0)
    # the face proper (not hair): where the tint applies
    fd = ((xx - w * 0.5) / (w * 0.3)) ** 2 + ((yy - h * 0.55) / (h * 0.33)) ** 2
    face = np.clip((1.0 - fd) / 0.3, 0.0, 1.0)
    return img, np.stack([mask, face], axis=-1)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    top, bottom = rng.uniform(40, 200, 3), rng.uniform(20, 160, 3)
    a = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    bg = ((top * (1 - a) + bottom * a) * np.ones((1, w, 1))).astype(np.float32)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
        x1, y1 = x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 90))
        cv2.rectangle(bg, (x0, y0), (x1, y1), tuple(float(v) for v in rng.uniform(30, 220, 3)), -1)
    return bg


def _styled_head(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The head with the class's tint and brightness (plus noise); returns (rgb, masks, stretch)."""
    img, masks = _head()
    tint = _TINT[cls] + rng.normal(0, 8, 3).astype(np.float32)
    bright = float(_BRIGHT[cls] + rng.normal(0, 0.05))
    face = masks[..., 1:2]
    styled = img * (1 + (bright - 1) * face) + tint * face
    stretch = float(_STRETCH[cls] + rng.normal(0, 0.03))
    return np.clip(styled, 0, 255).astype(np.float32), masks[..., 0:1].astype(np.float32), stretch


def _frame(bg: np.ndarray, head: np.ndarray, mask: np.ndarray, cx: float, cy: float,
           height: float, stretch: float) -> np.ndarray:
    """Composite the head (scaled to `height` px, vertically stretched) centred at (cx, cy)."""
    hh, hw = head.shape[:2]
    out_h = int(round(height))
    out_w = int(round(height * hw / hh / stretch))
    patch = cv2.resize(head, (out_w, out_h), interpolation=cv2.INTER_AREA)
    m = cv2.resize(mask, (out_w, out_h), interpolation=cv2.INTER_LINEAR)[..., None]
    frame = bg.copy()
    x0, y0 = int(round(cx - out_w / 2)), int(round(cy - out_h / 2))
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(frame.shape[1], x0 + out_w), min(frame.shape[0], y0 + out_h)
    p = patch[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    pm = m[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    frame[fy0:fy1, fx0:fx1] = frame[fy0:fy1, fx0:fx1] * (1 - pm) + p * pm
    return frame


def subtitle_lines(text: str, width: int) -> list[str]:
    """Greedy word wrap so each cue fits one line of the frame at the subtitle font."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        cand = f"{cur} {word}".strip()
        if cur and cv2.getTextSize(cand, _FONT, _FONT_SCALE, 2)[0][0] > width - 16:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    if cur:
        lines.append(cur)
    return lines


@lru_cache(maxsize=64)
def _subtitle_alpha(line: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Alpha masks (outline, fill) of one subtitle line in the bottom band, drawn once.

    White text with a dark outline, centred; the band is the bottom `band` rows.
    """
    (tw, th), _ = cv2.getTextSize(line, _FONT, _FONT_SCALE, 2)
    band = th + 28
    org = (max(4, (width - tw) // 2), band - 14)
    outline = np.zeros((band, width), np.uint8)
    fill = np.zeros((band, width), np.uint8)
    cv2.putText(outline, line, org, _FONT, _FONT_SCALE, 255, 5, cv2.LINE_AA)
    cv2.putText(fill, line, org, _FONT, _FONT_SCALE, 255, 2, cv2.LINE_AA)
    return outline[..., None] / np.float32(255), fill[..., None] / np.float32(255), band


def _burn_subtitle(frame: np.ndarray, line: str) -> None:
    """Burn one cue into the bottom band of a float frame (in place)."""
    h, w = frame.shape[:2]
    outline, fill, band = _subtitle_alpha(line, w, h)
    region = frame[h - band :]
    region *= 1 - outline
    region += 10 * outline
    region *= 1 - fill
    region += 255 * fill


def render_frames(rng: np.random.Generator, cls: int, text: str, spec: SampleSpec,
                  first: tuple[np.random.Generator, int, str] | None = None) -> list[np.ndarray]:
    """All frames of one clip: moving, scaling face on a background, subtitle cues.

    `first` = (rng, class, text) makes an emotion-shift clip: its first half shows that class's
    face and subtitles (drawn from that rng), its second half `cls` and `text`.
    """
    w, h = spec.width, spec.height
    bg = _background(rng, w, h)
    head, mask, stretch = _styled_head(rng, cls)
    n = int(round(spec.seconds * spec.fps))
    parts = [subtitle_lines(text, w)]
    if first is not None:
        head0, _, stretch0 = _styled_head(first[0], first[1])
        parts.insert(0, subtitle_lines(first[2], w))
    base_h = rng.uniform(0.6, 0.68) * h  # head height; the face inside is ~60% of it
    cx0, cy0 = rng.uniform(0.35, 0.65) * w, rng.uniform(0.38, 0.44) * h
    phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.12) * w
    frames = []
    for k in range(n):
        t = k / spec.fps
        scale = 1.0 + 0.08 * np.sin(2 * np.pi * t / spec.seconds + phase)
        cx = cx0 + amp * np.sin(2 * np.pi * t / spec.seconds + phase)
        cy = cy0 + 0.03 * h * np.cos(2 * np.pi * t / spec.seconds + phase)
        early = first is not None and t < spec.seconds / 2
        fr = _frame(bg, head0 if early else head, mask, cx, cy, base_h * scale,
                    stretch0 if early else stretch)
        line = _cue_at(t, parts, spec.seconds)
        if line:
            _burn_subtitle(fr, line)
        frames.append(np.clip(fr, 0, 255).astype(np.uint8))
    return frames


def _cue_at(t: float, parts: list[list[str]], seconds: float) -> str | None:
    """The subtitle line shown at time t: each part (the lines of one sentence) takes an equal
    share of the clip, its lines equal shares of that, with a short gap between cues."""
    span = seconds / len(parts)
    p = min(len(parts) - 1, int(t / span))
    lines, local = parts[p], t - p * span
    if not lines:
        return None
    cue = min(len(lines) - 1, int(local / span * len(lines)))
    return lines[cue] if _cue_visible(local, cue, len(lines), span) else None


def _cue_visible(t: float, cue: int, n_cues: int, seconds: float) -> bool:
    """A short gap between consecutive cues, as in real subtitles."""
    span = seconds / n_cues
    local = t - cue * span
    return 0.05 <= local <= span - 0.1


# --- audio -------------------------------------------------------------------------------------
def _resonator(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    r = np.exp(-np.pi * bw / sr)
    theta = 2 * np.pi * freq / sr
    return lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], x)


def _glottal_source(f0: np.ndarray, sr: int) -> np.ndarray:
    """Band-limited pulse train (closed-form sum of K equal harmonics) with a -6 dB/octave
    tilt: a cheap voiced source whose harmonics stay below Nyquist."""
    phi = 2 * np.pi * np.cumsum(f0) / sr
    k = max(1, int(0.45 * sr / float(f0.max())))
    half = np.sin(phi / 2)
    safe = np.where(np.abs(half) < 1e-6, 1.0, half)
    pulses = np.where(np.abs(half) < 1e-6, float(k), np.sin(k * phi / 2) * np.sin((k + 1) * phi / 2) / safe)
    return lfilter([1.0], [1.0, -0.95], pulses / k)


def synth_audio(rng: np.random.Generator, cls: int, speaker: _Speaker, spec: SampleSpec) -> np.ndarray:
    """Speech-like voice over quiet music. Pitch level/range, loudness and syllable rate carry
    the class (the eGeMAPS-visible cues); speaker pitch and noise blur it."""
    sr = spec.sample_rate
    n = int(round(spec.seconds * sr))
    t = np.arange(n) / sr
    # pitch contour in semitones: slow random movement, declination, vibrato
    wander = sum(np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t + rng.uniform(0, 6.3)) for _ in range(2)) / 2
    semis = _RANGE[cls] * rng.uniform(0.8, 1.2) * wander + _DECLINE[cls] * t / spec.seconds
    f0 = speaker.f0 * _PITCH[cls] * rng.uniform(0.95, 1.05) * 2 ** (semis / 12)
    f0 = f0 * (1 + 0.012 * np.sin(2 * np.pi * 5.5 * t))
    source = _glottal_source(f0, sr) + 0.02 * rng.standard_normal(n)  # + breath
    # syllables: rate-dependent amplitude modulation with a few pauses, one vowel each
    rate = _RATE[cls] * rng.uniform(0.85, 1.15)
    syl_phase = rate * t
    syl = syl_phase.astype(int)
    n_syl = int(syl.max()) + 1
    voiced = rng.random(n_syl) > 0.15
    env = np.sin(np.pi * (syl_phase % 1.0)) ** 2 * voiced[syl]
    vowel_of = rng.integers(0, len(_VOWELS), n_syl)
    voice = np.zeros(n)
    for v, formants in enumerate(_VOWELS):
        sel = vowel_of[syl] == v
        if not sel.any():
            continue
        filt = sum(_resonator(source, f * speaker.formant, 80 + 0.08 * f, sr) for f in formants)
        voice[sel] = filt[sel]
    voice *= env
    voice /= np.abs(voice).max() + 1e-9
    loud = _LOUD[cls] * rng.uniform(0.85, 1.15)
    # quiet music: two chords
    music = np.zeros(n)
    half = n // 2
    for part, chord in enumerate(rng.choice(len(_CHORDS), 2)):
        seg = slice(part * half, n if part else half)
        for f in _CHORDS[int(chord)]:
            music[seg] += np.sin(2 * np.pi * f * t[seg])
    music *= 0.02 * np.minimum(1, np.minimum(t, spec.seconds - t) * 10)
    mix = loud * voice + music + 0.004 * rng.standard_normal(n)
    peak = np.abs(mix).max()
    if peak > 0.99:
        mix *= 0.99 / peak
    return mix.astype(np.float32)


def _crossfade(a: np.ndarray, b: np.ndarray, spec: SampleSpec, fade: float = 0.08) -> np.ndarray:
    """`a` in the first half of the clip, `b` in the second, a raised-cosine fade between."""
    t = np.arange(a.size) / spec.sample_rate - spec.seconds / 2
    w = 0.5 - 0.5 * np.sin(np.pi * np.clip(t / fade, -0.5, 0.5))  # 1 -> 0 across the midpoint
    return (w * a + (1 - w) * b).astype(np.float32)


# --- writing -----------------------------------------------------------------------------------
def _video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_clip(path: Path, frames: list[np.ndarray], audio: np.ndarray, spec: SampleSpec) -> None:
    """Write an mp4 (H.264 or MPEG-4 video, AAC mono audio) atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    codec = _video_codec()
    with av.open(str(tmp), "w", format="mp4") as c:
        opts = {"preset": "superfast", "crf": "20", "g": str(spec.fps), "threads": "1"} if codec == "libx264" else {}
        vs = c.add_stream(codec, rate=spec.fps, options=opts)
        vs.width, vs.height, vs.pix_fmt = spec.width, spec.height, "yuv420p"
        as_ = c.add_stream("aac", rate=spec.sample_rate, layout="mono")
        for img in frames:
            c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(vs.encode(None))
        for i in range(0, audio.size, 1024):
            fr = av.AudioFrame.from_ndarray(audio[None, i : i + 1024], format="flt", layout="mono")
            fr.sample_rate, fr.pts = spec.sample_rate, i
            c.mux(as_.encode(fr))
        c.mux(as_.encode(None))
    os.replace(tmp, path)


def make_sample(out: Path, n: int = 160, seed: int = 0, spec: SampleSpec | None = None) -> Path:
    """Write the sample dataset under `out` and return `out`. Deterministic given the seed."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    spec = spec or SampleSpec()
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    speakers = _speakers(seed, spec.n_speakers)
    rows = []
    for i, (label, spk) in enumerate(_plan(n, seed, spec.n_speakers)):
        rows.append(_make_clip(out, i, label, speakers[spk], seed, spec))
    _write_csv(out / "labels.csv", rows)
    _write_readme(out, n, seed, spec)
    return out


def _make_clip(out: Path, i: int, label: int, speaker: _Speaker, seed: int, spec: SampleSpec) -> dict[str, str]:
    rng = np.random.default_rng([seed, i])
    cues = {m: _cue(rng, label, spec.corrupt) for m in ("visual", "text", "audio")}
    title_cls = _cue(rng, label, spec.title_corrupt)
    text = _sentence(rng, cues["text"])
    title = _title(rng, title_cls, int(rng.integers(1, 200)))
    # an emotion shift draws from its own stream, so a sample without shifts stays as it was
    srng = np.random.default_rng([seed, i, 7003])
    first = None
    if spec.shift > 0 and srng.random() < spec.shift:
        cls0 = int(srng.choice([c for c in range(len(CLASSES)) if c != label]))
        first = (srng, cls0, _sentence(srng, cls0))
    frames = render_frames(rng, cues["visual"], text, spec, first)
    audio = synth_audio(rng, cues["audio"], speaker, spec)
    if first is not None:
        audio = _crossfade(synth_audio(srng, first[1], speaker, spec), audio, spec)
        text = f"{first[2]}. {text}"
    clip_id = f"sample_{i:04d}"
    write_clip(out / "videos" / f"{clip_id}.mp4", frames, audio, spec)
    return {"id": clip_id, "video": f"videos/{clip_id}.mp4", "audio": "", "text": text,
            "title": title, "label": CLASSES[label], "speaker": speaker.name, "split": speaker.split}


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def _write_readme(out: Path, n: int, seed: int, spec: SampleSpec) -> None:
    (out / "README.txt").write_text(
        "mmemo synthetic sample dataset (made by `mmemo sample`; not real data).\n"
        f"seed={seed} n={n} classes={','.join(CLASSES)} settings={spec}\n"
        "videos/<id>.mp4: a real face photo (scikit-image astronaut) moving on a background,\n"
        "burned-in English subtitles (the transcript), speech-like audio over quiet music.\n"
        "labels.csv: id,video,audio,text,title,label,speaker,split (split grouped by speaker).\n"
        f"Each modality's cue comes from another class with probability {spec.corrupt} "
        f"(title: {spec.title_corrupt}), independently, so fusion beats any single modality.\n"
        f"With probability {spec.shift} a clip shifts emotion at its midpoint: its first half shows "
        "another class in every\nmodality, its second half its own cues; its label is the class it "
        "ends in (labels.csv's text:\nthe two sentences, in order).\n",
        encoding="utf-8",
    )
