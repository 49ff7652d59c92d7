"""Bench the OCR stage on the real clips: seconds per sampled frame, skip rate, cues.

    .venv/bin/python bench/ocr.py [--fps 2] [--threads 0] [--probe-scale S] [clip.mp4 ...]

Each clip is decoded once (frames only) and read twice: with change detection (the stage's
defaults) and without it (`change_threshold=0`, every frame OCR'd), so the table shows what
skipping saves and whether it changes the cues. Also times one OCR call on the band crop vs
on the whole lower half of a frame. Reads ../shared/data/video in place.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.stages.decode import DecodeConfig, decode_media  # noqa: E402
from pipeline.stages.ocr import RapidOcr  # noqa: E402

VIDEO = Path(os.environ.get("MMEMO_SHARED_DATA", REPO.parent / "shared" / "data")) / "video"
CLIPS = [
    "film_zh_subs.mp4",
    "anime_en_subs.mp4",
    "film_bilingual_subs.mp4",
    "ugc_face_zh_subs.mp4",
    "portrait_laugh_ru_caption.mp4",
    "animation_long_41s.mp4",
]


def _stage(engine_owner: RapidOcr | None, **config) -> RapidOcr:
    """A configured stage sharing one loaded engine (loading costs ~1.5 s)."""
    stage = RapidOcr(config)
    if engine_owner is None:
        stage.ensure_loaded()
    else:
        stage.engine, stage._loaded = engine_owner.engine, True
    return stage


def _call_seconds(stage: RapidOcr, image, repeats: int = 3) -> tuple[float, float]:
    """(wall, CPU) seconds of one OCR call; CPU time (all threads) is the steadier number
    on a shared machine."""
    stage._read(image)  # warm-up (first call per input shape is slower)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        stage._read(image)
    return (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats


def bench_clip(name: str, fps: float, base: RapidOcr, threads: int, **opts) -> None:
    media = decode_media(VIDEO / name, DecodeConfig(fps=fps), audio=False)
    eff = media.info.get("effective_fps")
    rows = []
    for label, cfg in (("skip", {}), ("all", {"change_threshold": 0.0, "blank_cover": 0.0})):
        stage = _stage(base, threads=threads, **opts, **cfg)
        cpu0 = time.process_time()
        r = stage.read_subtitles(media.frames, media.frame_times, media.duration, eff)
        cpu = (time.process_time() - cpu0) / max(1, r.n_frames)
        rows.append((label, r))
        print(
            f"{name:32s} {label:4s} frames={r.n_frames:3d} probes={r.n_probe_ocr} "
            f"band_ocr={r.n_band_ocr:3d} blank={r.n_blank:3d} skip={r.skip_rate:5.2f} wall_s/frame={r.seconds_per_frame:6.3f} "
            f"cpu_s/frame={cpu:6.3f} total={r.seconds:6.2f}s band={r.band} cues={len(r.cues)}"
        )
    same = [c.text for c in rows[0][1].cues] == [c.text for c in rows[1][1].cues]
    band = rows[0][1].band
    frame = media.frames[len(media.frames) // 2]
    half = frame[frame.shape[0] // 2 :]
    crop = frame[band[0] : band[1]]
    (bw, bc), (hw, hc) = _call_seconds(base, crop), _call_seconds(base, half)
    print(
        f"{'':32s} one call (wall/cpu s): band {crop.shape[1]}x{crop.shape[0]} {bw:.3f}/{bc:.3f}, "
        f"lower half {half.shape[1]}x{half.shape[0]} {hw:.3f}/{hc:.3f}; "
        f"cues identical with and without skipping: {same}"
    )
    for c in rows[0][1].cues:
        print(f"{'':32s}   {c.start:6.2f}-{c.end:6.2f} {c.text!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="*", default=CLIPS)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--probe-scale", type=float, default=None,
                    help="ocr.probe_scale (default: the stage's; 1 = probes detected at full width)")
    args = ap.parse_args()
    opts = {} if args.probe_scale is None else {"probe_scale": args.probe_scale}
    t0 = time.perf_counter()
    base = _stage(None, threads=args.threads)
    print(f"load: {time.perf_counter() - t0:.2f}s  models: {base.models()}")
    for name in args.clips:
        if not (VIDEO / name).exists():
            print(f"{name}: absent under {VIDEO}, skipped")
            continue
        bench_clip(name, args.fps, base, args.threads, **opts)


if __name__ == "__main__":
    main()
