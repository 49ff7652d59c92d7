"""Word error rate of the offline ASR backend (PocketSphinx, default en-us LM) on the 30
shared RAVDESS speech clips.

The spoken sentence is in each file name (`03-01-EE-II-SS-RR-AA.wav`, SS statement):
01 "Kids are talking by the door", 02 "Dogs are sitting by the door". No vocabulary or
language model is fitted to these sentences. The clips go through the stage exactly as in an
extraction: audio resampled to 16 kHz, silero-vad speech segments, one utterance per segment.

    python bench/asr.py                       # the offline preset's settings
    python bench/asr.py --set decode=whole    # any asr config key (TOML literal values)
    python bench/asr.py --set vad_pad_ms=400 --set beam=1e-60
    python bench/asr.py --data ../shared/data/ravdess-av-actor05/original/audio  # held out

Prints per-clip hypotheses (with -v), the mean WER beside the goal (<= 0.4) and seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.manifest import Clip  # noqa: E402
from pipeline.presets import _parse_value  # noqa: E402
from pipeline.stages.asr import PocketSphinxAsr  # noqa: E402
from pipeline.stages.base import ClipContext, Media  # noqa: E402
from pipeline.stages.ocr import edit_distance  # noqa: E402

_SHARED = os.environ.get("MMEMO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = Path(_SHARED) / "ravdess-speech"
SENTENCES = {"01": "kids are talking by the door", "02": "dogs are sitting by the door"}
GOAL = 0.4


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c in " '" else " " for c in text.lower()).split()


def wer(ref: str, hyp: str) -> float:
    """(substitutions + deletions + insertions) / reference words (word-level Levenshtein)."""
    r = words(ref)
    return edit_distance(r, words(hyp)) / max(1, len(r))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--set", action="append", default=[], help="asr config key=value")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    # the speech set's Actor_NN folders, or a folder of RAVDESS wavs (the held-out actor-05
    # takes: --data ../shared/data/ravdess-av-actor05/original/audio)
    files = sorted(args.data.glob("Actor_*/*.wav")) or sorted(args.data.glob("03-*.wav"))
    if not files:
        print(f"error: no RAVDESS clips under {args.data}", file=sys.stderr)
        return 2
    cfg = {k: _parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    stage = PocketSphinxAsr(cfg)
    import soundfile as sf

    t0 = time.perf_counter()
    stage.ensure_loaded()
    rates = []
    for f in files:
        audio, sr = sf.read(f, dtype="float32", always_2d=True)
        media = Media(path=f, audio=audio.mean(axis=1), sample_rate=sr, duration=len(audio) / sr)
        ctx = ClipContext(clip=Clip(id=f.stem, dataset="ravdess", audio=f.name), root=f.parent, media=media)
        stage.process_one(ctx)
        ref = SENTENCES[f.stem.split("-")[4]]
        rates.append(wer(ref, ctx.asr.text))
        if args.verbose:
            print(f"{f.stem}  wer {rates[-1]:.2f}  conf {ctx.asr.confidence:.2f}  {ctx.asr.text!r}")
    secs = time.perf_counter() - t0
    mean = float(np.mean(rates))
    print(f"config {cfg or 'default'}: {len(rates)} clips, mean WER {mean:.3f} (goal <= {GOAL}: "
          f"{'met' if mean <= GOAL else 'missed'}), median {float(np.median(rates)):.3f}, "
          f"exact {sum(r == 0 for r in rates)}/{len(rates)}, {secs:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
