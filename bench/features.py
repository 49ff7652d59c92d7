"""Feature quality on real labelled data: what the cache's features carry about emotion.

    .venv/bin/python bench/features.py [--only audio,visual,text] [--save feats.npz] [--json out.json]

Features come through mmemo's own stage backends (decode -> faces -> visual; decode -> audio;
text), exactly what an extraction stores as `pooled`. Each is probed with standardise +
logistic regression beside a classic baseline computed here on the same clips, and the
majority class:

* audio: RAVDESS speech (8 classes), actors 01 and 02 held out in turn (training on the other
  one + the 60 actor-05 takes' audio). Backends: `egemaps` with feature_set egemaps / compare /
  both (one `both` pass, sliced: the layout is [88 eGeMAPS, 6,373 ComParE, 2 x 40 log-mel]);
  baseline MFCC (40) mean + std. Each with global standardisation and with per-speaker
  standardisation (each actor's clips by their own mean / std; no labels).
* visual: the 60 RAVDESS actor-05 face-crop takes (one subject; 4 folds, each holding out one
  statement x repetition group, so no sentence/repetition is seen in both train and test);
  backends `fer` and `face-geometry`; baseline HOG of the same grey 64x64 face crops (the face
  track's boxes), mean over frames. Plus the `fer` encoder's zero-shot argmax accuracy (mean
  expression probabilities over the track; RAVDESS calm -> neutral) on those 60 takes and on
  the 14 original 1280x720 takes.
* text: MELD dev (1,109 utterances, 7 classes), 5-fold grouped by dialogue; backend `minilm`;
  baseline TF-IDF (word 1-2 grams) + logistic regression.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.manifest import Clip  # noqa: E402
from pipeline.stages.base import ClipContext  # noqa: E402
from pipeline.stages.decode import DecodeConfig, decode_media  # noqa: E402

SHARED = Path(os.environ.get("MMEMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RAVDESS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
           "06": "fearful", "07": "disgust", "08": "surprised"}  # fmt: skip
# RAVDESS -> FER2013 label names (calm has no FER class: it is neutral)
TO_FER = {"neutral": "neutral", "calm": "neutral", "happy": "happy", "sad": "sad", "angry": "angry",
          "fearful": "fear", "disgust": "disgust", "surprised": "surprise"}  # fmt: skip
N_EGEMAPS, N_COMPARE = 88, 6373


# --- probes --------------------------------------------------------------------------------------
def probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, c: float = 1.0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    model.fit(np.nan_to_num(xtr), ytr)
    return model.predict(np.nan_to_num(xte))


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"acc": float(accuracy_score(y, pred)), "f1": float(f1_score(y, pred, average="macro", zero_division=0))}


def majority(ytr: np.ndarray, n: int) -> np.ndarray:
    vals, counts = np.unique(ytr, return_counts=True)
    return np.full(n, vals[counts.argmax()])


def folds_eval(x: np.ndarray | None, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
               fit=None) -> dict[str, float]:  # noqa: ANN001
    """Pooled predictions over the folds' test parts -> one accuracy / macro F1."""
    pred = np.empty(len(y), dtype=object)
    for tr, te in folds:
        pred[te] = fit(tr, te) if fit is not None else probe(x[tr], y[tr], x[te])
    return scores(y, pred.astype(y.dtype))


# --- audio ---------------------------------------------------------------------------------------
def audio_clips() -> list[tuple[Path, str, str]]:
    out = []
    for actor in ("01", "02"):
        for p in sorted((SHARED / "ravdess-speech" / f"Actor_{actor}").glob("*.wav")):
            out.append((p, RAVDESS[p.stem.split("-")[2]], actor))
    for p in sorted((SHARED / "ravdess-av-actor05" / "facecrops" / "audio").glob("*.wav")):
        out.append((p, RAVDESS[p.stem.split("-")[2]], "05"))
    return out


def audio_features() -> dict[str, np.ndarray]:
    import librosa

    from pipeline.stages.audio import EgemapsAudio

    stage = EgemapsAudio({"feature_set": "both"})
    stage.ensure_loaded()
    rows, mfcc, labels, actors = [], [], [], []
    for path, label, actor in audio_clips():
        media = decode_media(path, DecodeConfig())
        ctx = ClipContext(Clip(id=path.stem, dataset="bench"), path.parent, media=media)
        stage.process_one(ctx)
        rows.append(ctx.features["audio"].pooled)
        m = librosa.feature.mfcc(y=media.audio, sr=media.sample_rate, n_mfcc=40)
        mfcc.append(np.concatenate([m.mean(1), m.std(1)]))
        labels.append(label)
        actors.append(actor)
    both = np.stack(rows)
    logmel = both[:, N_EGEMAPS + N_COMPARE :]
    return {
        "audio:egemaps (egemaps)": np.concatenate([both[:, :N_EGEMAPS], logmel], 1),
        "audio:egemaps (compare)": both[:, N_EGEMAPS:],
        "audio:egemaps (both)": both,
        "audio:MFCC baseline": np.stack(mfcc),
        "audio:y": np.array(labels),
        "audio:group": np.array(actors),
    }


def per_speaker(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Standardise each speaker's rows by that speaker's own mean / std (no labels used; a
    held-out speaker is normalised by its own unlabelled clips)."""
    x = x.astype(np.float64).copy()
    for s in np.unique(group):
        m = group == s
        x[m] = (x[m] - x[m].mean(0)) / (x[m].std(0) + 1e-6)
    return x


def audio_table(f: dict[str, np.ndarray]) -> list[dict]:
    y, g = f["audio:y"], f["audio:group"]
    out = []
    names = ("audio:egemaps (egemaps)", "audio:egemaps (compare)", "audio:egemaps (both)", "audio:MFCC baseline")
    for norm in ("global", "per-speaker"):
        for name in (*names, "majority"):
            if name == "majority" and norm != "global":
                continue
            x = None if name == "majority" else (f[name] if norm == "global" else per_speaker(f[name], g))
            res = {}
            for held in ("01", "02"):
                tr, te = np.where(g != held)[0], np.where(g == held)[0]
                pred = majority(y[tr], len(te)) if x is None else probe(x[tr], y[tr], x[te])
                res[held] = scores(y[te], pred)
            mean = {k: float(np.mean([res[h][k] for h in res])) for k in ("acc", "f1")}
            label = name.split(":")[-1] + ("" if x is None else f", {norm} standardisation")
            out.append({"set": "RAVDESS speech, actor 01 / 02 held out (8 cl.)", "features": label,
                        "dim": 0 if x is None else int(x.shape[1]), "per_fold": res, **mean})
    return out


# --- visual --------------------------------------------------------------------------------------
def av_takes(which: str) -> list[tuple[Path, str, str]]:
    root = SHARED / "ravdess-av-actor05" / which
    with open(root / "labels.csv", newline="") as fh:
        return [(root / r["video"], r["label"], r["id"]) for r in csv.DictReader(fh)]


def visual_features(which: str) -> dict[str, np.ndarray]:
    from pipeline.stages.faces import MtcnnFaces
    from pipeline.stages.visual import FaceGeometryVisual
    from pipeline.stages.visual_fer import PROB_SLICE, FerVisual, fer_crop

    faces, fer, geom = MtcnnFaces({}), FerVisual({}), FaceGeometryVisual({})
    hog = cv2.HOGDescriptor((64, 64), (16, 16), (8, 8), (8, 8), 9)
    rows: dict[str, list] = {"fer": [], "face-geometry": [], "HOG baseline": [], "zs": []}
    labels, ids, missing = [], [], []
    for path, label, cid in av_takes(which):
        media = decode_media(path, DecodeConfig())  # the offline preset's decode settings
        ctx = ClipContext(Clip(id=cid, dataset="bench"), path.parent, media=media)
        err = faces.process([ctx])[0]
        c2 = ClipContext(ctx.clip, ctx.root, media=media, face=ctx.face, status=dict(ctx.status))
        if err is not None or fer.process([ctx])[0] is not None or "visual" not in ctx.features:
            missing.append(cid)
            continue
        assert geom.process([c2]) == [None]
        seq = ctx.features["visual"].seq
        rows["fer"].append(ctx.features["visual"].pooled)
        rows["face-geometry"].append(c2.features["visual"].pooled)
        rows["zs"].append(seq[:, PROB_SLICE].mean(0))
        crops = [fer_crop(media.frames[t], b, fer.config.margin) for t, b in enumerate(ctx.face.boxes) if b is not None]
        rows["HOG baseline"].append(np.mean([hog.compute(c).reshape(-1) for c in crops], axis=0))
        labels.append(label)
        ids.append(cid)
    out = {f"visual-{which}:{k}": np.stack(v) for k, v in rows.items()}
    out[f"visual-{which}:y"] = np.array(labels)
    out[f"visual-{which}:id"] = np.array(ids)
    out[f"visual-{which}:missing"] = np.array(missing, dtype=str)
    return out


def zero_shot(f: dict[str, np.ndarray], which: str) -> dict[str, float]:
    from pipeline.stages.fer_model import FER_LABELS

    pred = np.array([FER_LABELS[i] for i in f[f"visual-{which}:zs"].argmax(1)])
    y = np.array([TO_FER[v] for v in f[f"visual-{which}:y"]])
    return {**scores(y, pred), "n": int(len(y)), "missing": int(len(f[f"visual-{which}:missing"]))}


def visual_table(f: dict[str, np.ndarray]) -> list[dict]:
    y, ids = f["visual-facecrops:y"], f["visual-facecrops:id"]
    group = np.array([i.split("-")[4] + i.split("-")[5] for i in ids])  # statement x repetition
    folds = [(np.where(group != g)[0], np.where(group == g)[0]) for g in sorted(set(group))]
    out = []
    for name in ("fer", "face-geometry", "HOG baseline", "majority"):
        if name == "majority":
            res = folds_eval(None, y, folds, fit=lambda tr, te: majority(y[tr], len(te)))
            dim = 0
        else:
            x = f[f"visual-facecrops:{name}"]
            res, dim = folds_eval(x, y, folds), int(x.shape[1])
        out.append({"set": f"RAVDESS AV actor 05, 60 face-crop takes, {len(folds)}-fold by statement x repetition (8 cl.)",
                    "features": name, "dim": dim, **res})
    return out


# --- text ----------------------------------------------------------------------------------------
def text_features() -> dict[str, np.ndarray]:
    from pipeline.stages.text import MiniLMText

    with open(SHARED / "meld" / "dev_sent_emo.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    stage = MiniLMText({})
    stage.ensure_loaded()
    ctxs = [ClipContext(Clip(id=f"d{r['Dialogue_ID']}u{r['Utterance_ID']}", dataset="bench", transcript=r["Utterance"]),
                        Path(".")) for r in rows]  # fmt: skip
    for i in range(0, len(ctxs), 64):
        stage.process(ctxs[i : i + 64])
    keep = [k for k, c in enumerate(ctxs) if "text" in c.features]
    return {
        "text:minilm": np.stack([ctxs[k].features["text"].pooled for k in keep]),
        "text:raw": np.array([rows[k]["Utterance"] for k in keep]),
        "text:y": np.array([rows[k]["Emotion"] for k in keep]),
        "text:group": np.array([rows[k]["Dialogue_ID"] for k in keep]),
        "text:n_absent": np.array(len(rows) - len(keep)),
    }


def text_table(f: dict[str, np.ndarray]) -> list[dict]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    y, g, raw = f["text:y"], f["text:group"], f["text:raw"]
    folds = list(GroupKFold(n_splits=5).split(raw, y, g))

    def tfidf(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
        clf = LogisticRegression(C=10.0, max_iter=3000)
        clf.fit(vec.fit_transform(raw[tr]), y[tr])
        return clf.predict(vec.transform(raw[te]))

    set_name = "MELD dev text, 5-fold grouped by dialogue (7 cl.)"
    return [
        {"set": set_name, "features": "minilm", "dim": int(f["text:minilm"].shape[1]), **folds_eval(f["text:minilm"], y, folds)},
        {"set": set_name, "features": "TF-IDF baseline", "dim": 0, **folds_eval(None, y, folds, fit=tfidf)},
        {"set": set_name, "features": "majority", "dim": 0,
         **folds_eval(None, y, folds, fit=lambda tr, te: majority(y[tr], len(te)))},
    ]


def markdown(rows: list[dict]) -> str:
    lines = ["| set | features | dim | accuracy | macro F1 |", "|---|---|---:|---:|---:|"]
    for r in rows:
        extra = ""
        if "per_fold" in r:
            extra = " (" + ", ".join(f"{k}: {v['acc']:.2f}" for k, v in r["per_fold"].items()) + ")"
        lines.append(f"| {r['set']} | {r['features']} | {r['dim'] or ''} | {r['acc']:.3f}{extra} | {r['f1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="audio,visual,text")
    ap.add_argument("--save", type=Path, help="npz of the extracted features (reused when present)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"error: {SHARED}: the shared real data is absent (set MMEMO_SHARED_DATA)")
    torch.set_num_threads(int(os.environ.get("MMEMO_THREADS", "1")))
    feats: dict[str, np.ndarray] = {}
    if args.save and args.save.is_file():
        feats = dict(np.load(args.save, allow_pickle=False))
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    if "audio" in only and "audio:y" not in feats:
        feats.update(audio_features())
    if "visual" in only and "visual-facecrops:y" not in feats:
        feats.update(visual_features("facecrops"))
        feats.update(visual_features("original"))
    if "text" in only and "text:y" not in feats:
        feats.update(text_features())
    if args.save:
        np.savez(args.save, **feats)
    print(f"features in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows: list[dict] = []
    result: dict = {"rows": rows}
    if "audio" in only:
        rows += audio_table(feats)
    if "visual" in only:
        rows += visual_table(feats)
        result["zero_shot"] = {w: zero_shot(feats, w) for w in ("facecrops", "original")}
    if "text" in only:
        rows += text_table(feats)
        result["text_absent"] = int(feats["text:n_absent"])
    print(markdown(rows))
    for w, z in result.get("zero_shot", {}).items():
        print(f"fer zero-shot argmax on {w} ({z['n']} takes with a face, {z['missing']} without): "
              f"accuracy {z['acc']:.3f}, macro F1 {z['f1']:.3f} (chance ~0.14)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
