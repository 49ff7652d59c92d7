"""Peak memory and stage times of one worker on a 10-minute 1080p video (issue 16, item 3).

    .venv/bin/python bench/long_video.py [--video FILE] [--minutes 10] [--keep DIR]

Without --video it first writes one (about 1.5 min on 2 cores): the frames of
../shared/data/video/portrait_laugh_ru_caption.mp4 (a real face and caption) upscaled to
1920x1080 at 10 fps, H.264, with ../shared/data/separation/speech_music_sample.wav (speech and
music alternating) tiled under it as AAC. Then one worker (inline, as `mmemo extract
--workers 1` runs it) extracts it with the offline preset into a fresh cache while a thread
samples the process's resident memory every 50 ms. ASR runs although the caption is a
subtitle (`asr.only_without_subtitles=false`): the worst case, ten minutes of speech to recognise. Prints the peak beside the budget and
the seconds per stage.

Why it is bounded: decode keeps at most `max_frames` (64) frames of at most `max_side` (960)
pixels and `max_duration` (600 s) of 16 kHz audio, whatever the input; the separation stage
masks long audio in 30-s blocks. What grows with the media's length is the audio-side work
(separation, ASR, openSMILE), in time, not beyond those caps in memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("MMEMO_SHARED_DATA", REPO.parent / "shared" / "data"))
BUDGET_MIB = 4096  # per worker: 2 workers + the OS in 24 GiB with room, 4 workers in 16 GiB


def make_video(out: Path, minutes: float, fps: int = 10) -> None:
    import av
    import cv2
    import numpy as np
    import soundfile as sf

    with av.open(str(SHARED / "video" / "portrait_laugh_ru_caption.mp4")) as src:
        frames = [cv2.resize(f.to_ndarray(format="rgb24"), (1920, 1080))
                  for i, f in enumerate(src.decode(video=0)) if i % 5 == 0]
    audio, sr = sf.read(SHARED / "separation" / "speech_music_sample.wav", dtype="float32")
    seconds = int(minutes * 60)
    with av.open(str(out), "w") as dst:
        vs = dst.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 1920, 1080, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "30"}
        aus = dst.add_stream("aac", rate=sr)
        aus.layout = "mono"
        for i in range(seconds * fps):
            for p in vs.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")):
                dst.mux(p)
        n = seconds * sr
        tiled = np.tile(audio, n // len(audio) + 1)[:n]
        for i in range(0, n, 1024):
            af = av.AudioFrame.from_ndarray(tiled[None, i:i + 1024], format="flt", layout="mono")
            af.sample_rate = sr
            for p in aus.encode(af):
                dst.mux(p)
        for s in (vs, aus):
            for p in s.encode():
                dst.mux(p)


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", type=Path, default=None)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp dir)")
    a = ap.parse_args()
    if a.video is None and not (SHARED / "video").is_dir():
        sys.exit(f"error: {SHARED}: shared data not found (set MMEMO_SHARED_DATA) and no --video given")
    from pipeline.recipes import RECIPES
    from pipeline.runner import plan_extract, run_extract

    with tempfile.TemporaryDirectory(prefix="mmemo-long-") as tmp:
        work = a.keep or Path(tmp)
        media = work / "media"
        media.mkdir(parents=True, exist_ok=True)
        video = media / "long1080.mp4"
        if a.video is not None:
            video.unlink(missing_ok=True)
            video.symlink_to(a.video.resolve())
        elif not video.exists():
            t = time.perf_counter()
            print(f"writing a {a.minutes:g}-minute 1920x1080 video ...", flush=True)
            make_video(video, a.minutes)
            print(f"  {video.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t:.0f} s", flush=True)
        RECIPES["folder"](root=media, out=work / "manifests", name="longvideo")
        # the worst case: the portrait's caption is a subtitle to OCR, and the offline preset
        # would then leave the ten minutes of speech unrecognised; here they are recognised
        plan = plan_extract("longvideo", preset="offline", manifests=work / "manifests", root=media,
                            overrides=["asr.only_without_subtitles=false"])
        peak = [rss_mib()]
        stop = threading.Event()

        def watch() -> None:  # samples memory; a plain line every 30 s (the run takes minutes)
            t_line = time.perf_counter()
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib())
                if time.perf_counter() - t_line >= 30:
                    t_line = time.perf_counter()
                    print(f"{time.strftime('%H:%M:%S')} extracting: {t_line - t:.0f} s, resident "
                          f"{rss_mib():.0f} MiB, peak {peak[0]:.0f} MiB", flush=True)
                time.sleep(0.05)

        before = rss_mib()
        t = time.perf_counter()
        threading.Thread(target=watch, daemon=True).start()
        summary = run_extract(plan, cache=work / "cache", workers=1)
        wall = time.perf_counter() - t
        stop.set()
        secs = dict(summary.stage_seconds)
        print(f"one worker, offline preset: {wall:.1f} s wall for {a.minutes:g} min of media "
              f"({a.minutes * 60 / wall:.2f}x real time); failures: {len(summary.failures)}")
        for name, s in sorted(secs.items(), key=lambda kv: -kv[1]):
            print(f"  {name:10s} {s:7.1f} s")
        verdict = "HOLDS" if peak[0] <= BUDGET_MIB else "does NOT hold"
        print(f"peak resident memory of the worker: {peak[0]:.0f} MiB (before extracting: {before:.0f} MiB); "
              f"budget <= {BUDGET_MIB} MiB -> {verdict}")


if __name__ == "__main__":
    main()
