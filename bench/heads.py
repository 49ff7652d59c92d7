"""The head table on the shared real sets and the demo: every fusion head beside the majority
baseline and the linear probe, mean ± std of 3 seeds on the same split (issue 15; BENCHMARKS.md "Heads on real data").

    python bench/heads.py --work /tmp/heads_bench [--sets ravdess01,ravdess02,av05,meld,demo]
        [--demo-root DIR] [--heads early,late,hybrid,cquery,cfnsr,mult,tfn] [--seeds 3]

Extracts (once, resumable) into <work>/cache with the offline preset:
  ravdess01 / ravdess02  ../shared/data/ravdess-speech, actor 01 (02) held out as test, the
                         other actor's strong-intensity takes as validation; audio
  rav3-01 / -02 / -05    three actors: ravdess-speech's Actor_01 and Actor_02 (15 clips each) and
                         the 60 actor-05 takes' audio (ravdess-av-actor05/facecrops/audio),
                         linked into <work>/ravdess3-root as Actor_XX (read in place); the
                         actor named held out as test, the others' strong takes as validation;
                         audio. With --normalise speaker each actor is standardised by its own
                         clips (fusion.normalise.per_speaker)
  av05                   ../shared/data/ravdess-av-actor05/original via the folder recipe and
                         its labels.csv (14 takes, one actor): row-level 5-fold; all modalities
  meld                   ../shared/data/meld dev_sent_emo.csv, text-only, dialogue context (the 5
                         previous turns) as the conditioning vector; dialogue-grouped 5-fold
  demo                   an extracted `mmemo sample --n 160` set in --demo-root (its cache at
                         <demo-root>/cache): 5-fold, all modalities
and prints one table per set. Slow on a busy CPU (minutes per set); nothing here is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HEADS = ("early", "late", "hybrid", "cquery", "cfnsr", "mult", "tfn")


def shared() -> Path:
    p = Path(os.environ.get("MMEMO_SHARED_DATA") or ROOT.parent / "shared" / "data")
    if not p.is_dir():
        sys.exit(f"error: {p}: shared data not found (set MMEMO_SHARED_DATA)")
    return p


def extract_ravdess(work: Path, held_out: int) -> str:
    from pipeline.recipes import RECIPES
    from pipeline.runner import plan_extract, run_extract

    man, name = work / "manifests", f"ravdess{held_out:02d}"
    # validation carved within the training actor: its strong-intensity takes
    RECIPES["ravdess"](root=shared() / "ravdess-speech", out=man, name=name,
                       test_actors=[held_out], valid_intensity="strong")
    run_extract(plan_extract(name, preset="offline", manifests=man), cache=work / "cache")
    return name


def extract_ravdess3(work: Path, held_out: int) -> str:
    from pipeline.recipes import RECIPES
    from pipeline.runner import plan_extract, run_extract

    root = work / "ravdess3-root"  # links, not copies: the data stays in ../shared
    root.mkdir(parents=True, exist_ok=True)
    links = {"Actor_01": shared() / "ravdess-speech" / "Actor_01",
             "Actor_02": shared() / "ravdess-speech" / "Actor_02",
             "Actor_05": shared() / "ravdess-av-actor05" / "facecrops" / "audio"}
    for name, target in links.items():
        if not (root / name).exists():
            (root / name).symlink_to(target.resolve(), target_is_directory=True)
    man, name = work / "manifests", f"rav3-{held_out:02d}"
    RECIPES["ravdess"](root=root, out=man, name=name, test_actors=[held_out], valid_intensity="strong")
    run_extract(plan_extract(name, preset="offline", manifests=man), cache=work / "cache")
    return name


def extract_av05(work: Path) -> str:
    from pipeline.recipes import RECIPES
    from pipeline.runner import plan_extract, run_extract

    man, root = work / "manifests", shared() / "ravdess-av-actor05" / "original"
    RECIPES["folder"](root=root, out=man, name="av05", labels=root / "labels.csv")
    run_extract(plan_extract("av05", preset="offline", manifests=man, root=root),
                cache=work / "cache", workers=1)
    return "av05"


def extract_meld(work: Path) -> str:
    from pipeline.recipes import RECIPES
    from pipeline.runner import plan_extract, run_extract

    man = work / "manifests"
    RECIPES["meld"](root=shared() / "meld", out=man)
    (man / "meld" / "train.jsonl").unlink(missing_ok=True)  # the head300 excerpt: dev only
    run_extract(plan_extract("meld", preset="offline", manifests=man), cache=work / "cache")
    return "meld"


# set -> (extract, fit settings)
SETS = {
    "ravdess01": (lambda w: extract_ravdess(w, 1), dict(split="official", mods=["audio"])),
    "ravdess02": (lambda w: extract_ravdess(w, 2), dict(split="official", mods=["audio"])),
    **{f"rav3-{a:02d}": (lambda w, a=a: extract_ravdess3(w, a), dict(split="official", mods=["audio"]))
       for a in (1, 2, 5)},
    "av05": (extract_av05, dict(split="kfold", group_by="none", mods="all")),
    "meld": (extract_meld, dict(split="kfold", mods=["text"])),
    "demo": (None, dict(split="kfold", mods="all")),
}


def table(cache: Path, dataset: str, heads, seeds: int, settings: dict, runs: Path, **cfg_kw):
    from fusion.config import FitConfig
    from fusion.report import probe_kept
    from fusion.train import fit

    s = dict(settings)
    mods = s.pop("mods")
    cfg = FitConfig(seeds=seeds, **s, **cfg_kw)
    rows = []
    for i, head in enumerate(heads, 1):
        r = fit(cache, dataset, head, mods, cfg, runs_dir=runs,
                name=f"{dataset}-{head}-{cfg.normalise}-p{cfg.depart_p:g}")
        m = r.metrics
        print(f"{dataset}: {head} done ({i}/{len(heads)}, {m['elapsed_s']:.0f} s)",
              file=sys.stderr, flush=True)  # a fit of a slow head takes minutes on 2 cores
        rows.append((head, m["mean"]["accuracy"], m["std"]["accuracy"], m["mean"]["macro_f1"],
                     m["std"]["macro_f1"], m["majority_baseline"], m["linear_probe"],
                     probe_kept(m) or "—", m["elapsed_s"]))
    maj, probe = rows[0][5], rows[0][6]
    print(f"\n## {dataset} ({mods}, {s['split']}, {seeds} seeds, n_test={m['n_test']}, "
          f"{cfg.normalise} standardisation, depart_p {cfg.depart_p:g})")
    print("| head | accuracy | macro F1 | runs that kept the probe | fit s |\n|---|---|---|---|---|")
    print(f"| majority | {maj['accuracy']:.3f} | {maj['macro_f1']:.3f} | | |")
    print(f"| linear probe | {probe['accuracy']:.3f} | {probe['macro_f1']:.3f} | | |")
    for head, a, sa, f, sf, _, _, k, t in rows:
        print(f"| {head} | {a:.3f} ± {sa:.3f} | {f:.3f} ± {sf:.3f} | {k} | {t:.0f} |")
    sys.stdout.flush()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmemo_heads_bench"))
    ap.add_argument("--sets", default="ravdess01,ravdess02,av05,meld,demo")
    ap.add_argument("--demo-root", type=Path, default=None)
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--normalise", default="global", help="global | speaker (FitConfig.normalise)")
    ap.add_argument("--depart-p", type=float, default=0.05,
                    help="FitConfig.depart_p (1: a head leaves its probe on any validation gain)")
    ap.add_argument("--extract-only", action="store_true")
    a = ap.parse_args()
    heads = [h for h in a.heads.split(",") if h]
    for name in a.sets.split(","):
        if name not in SETS:
            sys.exit(f"error: unknown set {name!r}; known: {', '.join(SETS)}")
        extract, settings = SETS[name]
        if extract is None:
            if a.demo_root is None:
                print("error: demo: --demo-root not given; skipped", file=sys.stderr)
                continue
            cache, dataset = a.demo_root / "cache", "sample"
        else:
            cache, dataset = a.work / "cache", extract(a.work)
        if not a.extract_only:
            table(cache, dataset, heads, a.seeds, settings, a.work / "runs", normalise=a.normalise,
                  depart_p=a.depart_p)


if __name__ == "__main__":
    main()
