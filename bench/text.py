"""Text stage throughput beside sentence-transformers' own batched `encode` of the same strings.

MELD dev (1,109 utterances) as the MELD recipe builds it: transcript = the utterance, title =
the dialogue context (previous 5 turns). The stage embeds, per clip, the utterance's sentences
plus the context; this bench runs it exactly as the extractor does (runner batches of
`--clip-batch` clips, default the offline preset's run.batch_size) and, on the same threads,
`SentenceTransformer.encode` once over the very same strings (its own length sort, batch 64).
It also checks that both give the same vectors (cosine > 0.999): the stage runs the model in
plain torch (pipeline/stages/minilm_model.py), sentence-transformers through transformers.

    .venv/bin/python bench/text.py [--repeats 3] [--limit 1109] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.recipes import meld  # noqa: E402
from pipeline.stages.base import ClipContext  # noqa: E402
from pipeline.stages.text import MiniLMText, plan_clip  # noqa: E402

SHARED = Path(os.environ.get("MMEMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FLOOR = 0.8  # issue 16: the stage reaches >= 0.8x of sentence-transformers' batched encode


def meld_clips(limit: int | None) -> list:
    path = SHARED / "meld" / "dev_sent_emo.csv"
    if not path.is_file():
        sys.exit(f"error: {path}: MELD dev CSV not found (set MMEMO_SHARED_DATA)")
    clips = [meld._row_clip(r, "dev", "bench", path, i + 2) for i, r in enumerate(meld.read_csv(path))]
    meld._add_context(clips, 5)
    return clips[:limit] if limit else clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N utterances only (quick runs)")
    ap.add_argument("--clip-batch", type=int, default=16, help="clips per stage.process call (runner batch)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("MMEMO_THREADS", "1")))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    clips = meld_clips(args.limit)
    stage = MiniLMText({})
    t0 = time.perf_counter()
    stage.ensure_loaded()
    load_s = time.perf_counter() - t0
    from sentence_transformers import SentenceTransformer  # the reference, beside the stage

    model = SentenceTransformer(stage._model_path(), device="cpu")
    ctxs0 = [ClipContext(c, Path(".")) for c in clips]
    texts = [t for ctx in ctxs0 for t in plan_clip(ctx, ["transcript", "cues"], 64, True).texts()]
    n = len(texts)
    model.encode(texts[:64], batch_size=64)  # warm-up (allocator, first-call paths)

    def run_stage() -> tuple[float, list[ClipContext]]:
        ctxs = [ClipContext(c, Path(".")) for c in clips]
        t = time.perf_counter()
        for i in range(0, len(ctxs), args.clip_batch):
            errs = stage.process(ctxs[i:i + args.clip_batch])
            assert not any(errs), errs
        return time.perf_counter() - t, ctxs

    def run_st() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        v = model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return time.perf_counter() - t, v

    st_s, stage_s = [], []
    for _ in range(args.repeats):  # interleaved so both see the same load
        s, ref = run_st()
        st_s.append(s)
        s, ctxs = run_stage()
        stage_s.append(s)
    got = []
    for ctx in ctxs:
        if "text" in ctx.features:
            got.extend(ctx.features["text"].seq)
        if "cond" in ctx.features:
            got.append(ctx.features["cond"].pooled)
    got = np.asarray(got, dtype=np.float32)
    cos = float(np.min(np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))))
    st_rate, stage_rate = n / statistics.median(st_s), n / statistics.median(stage_s)
    ratio = stage_rate / st_rate
    print(f"# text bench: MELD dev, {len(clips)} clips -> {n} strings (utterance sentences + context), "
          f"threads={args.threads}, clip batch={args.clip_batch}, repeats={args.repeats} (medians), "
          f"model load {load_s:.1f} s, load average {os.getloadavg()[0]:.1f}")
    print(f"sentence-transformers encode(batch_size=64): {st_rate:.1f} strings/s "
          f"({statistics.median(st_s):.2f} s)")
    print(f"text stage (runner batches):                 {stage_rate:.1f} strings/s "
          f"({statistics.median(stage_s):.2f} s)")
    print(f"ratio stage / encode = {ratio:.2f} (floor {FLOOR}); min cosine stage vs encode = {cos:.5f}")
    print(f"goal text stage >= {FLOOR} x sentence-transformers encode: "
          f"{'HOLDS' if ratio >= FLOOR else 'does NOT hold'}")
    if cos < 0.999:
        sys.exit("error: the stage's vectors differ from encode's")


if __name__ == "__main__":
    main()
