"""mmemo command line: thin typer commands that parse, call one function, and print.

Imports are inside the commands so that `mmemo fit` never loads the extractor's libraries
(and `mmemo --help` is instant).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal emotion recognition: extract once, fuse fast.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and maintain the feature cache.")
import_app = typer.Typer(no_args_is_help=True, help="Import features made by other tools.")
app.add_typer(cache_app, name="cache")
app.add_typer(import_app, name="import")
console = Console()
# tables are wide; when output is not a terminal (make, CI logs) do not wrap them at 80 columns
table_console = console if console.is_terminal else Console(width=160)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CacheOpt = typer.Option(None, "--cache", envvar="MMEMO_CACHE", help="Cache root (default ./cache).")
ManifestsOpt = typer.Option(Path("manifests"), "--manifests", help="Manifest folder.")


def _split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _head_opts(opts: list[str] | None, heads: list[str]) -> dict[str, dict]:
    """`--opt` values -> {head: {option: value}}. `KEY=VALUE` goes to every head among `heads`
    that has option KEY; `HEAD.KEY=VALUE` to that head only. VALUE is read as TOML (64, 0.1,
    true, "mean"), else taken as a string."""
    import tomllib

    from fusion.heads import HEADS, head_options

    out: dict[str, dict] = {}
    for item in opts or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            _fail(f"--opt {item!r}: expected KEY=VALUE or HEAD.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        head, _, name = key.rpartition(".")
        if head and head not in HEADS:
            _fail(f"--opt {item!r}: unknown head {head!r}; known: {', '.join(HEADS)}")
        if head and head not in heads:
            _fail(f"--opt {item!r}: head {head!r} is not among --fusion {','.join(heads)}")
        candidates = [head] if head else [h for h in heads if h in HEADS]
        targets = [h for h in candidates if name in head_options(h)]
        if not targets:
            valid = {h: ", ".join(head_options(h)) for h in candidates}
            _fail(f"--opt {item!r}: no such option for {' / '.join(valid) or 'these heads'}; "
                  + "; ".join(f"{h}: {v}" for h, v in valid.items()))
        for h in targets:
            out.setdefault(h, {})[name] = value
    return out


def _fail(msg: str, code: int = 2) -> None:
    # one line whatever the terminal width (no wrapping), and the message is text, not markup
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(code)


# --- data ------------------------------------------------------------------------------------
@app.command()
def sample(
    out: Path = typer.Option(..., "--out", help="Folder to write the synthetic dataset into."),
    n: int = typer.Option(160, "--n", help="Number of clips."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a small synthetic labelled video dataset (folder layout) with known signal."""
    from pipeline.sample import make_sample

    path = make_sample(out, n=n, seed=seed)
    console.print(f"wrote {n} clips to {path}")


@app.command()
def prepare(
    recipe: str = typer.Argument(None, help="Recipe name (see --list)."),
    root: Path = typer.Option(None, "--root", help="Dataset root folder."),
    name: str = typer.Option(None, "--name", help="Dataset name (default: the recipe's)."),
    labels: Path = typer.Option(None, "--labels", help="folder recipe: a labels.csv kept outside the root."),
    opt: list[str] = typer.Option(None, "--opt", help="Recipe option KEY=VALUE, repeatable: "
                                  "cremad labels=av, ravdess folds=6, iemocap media=wav, mosi folds=FILE."),
    list_: bool = typer.Option(False, "--list", help="List the recipes, the layout each expects and its labels."),
    out: Path = ManifestsOpt,
) -> None:
    """Write JSONL manifests for a dataset on disk."""
    from pipeline.recipes import RECIPES, describe

    if list_:
        t = Table(title="recipes (mmemo prepare RECIPE --root DIR)")
        for col in ("recipe", "expects under --root", "labels"):
            t.add_column(col, overflow="fold")
        for r in sorted(RECIPES):
            d = describe(r)
            t.add_row(r, str(d["layout"]), ", ".join(d["classes"]) or "(the dataset's own)")
        console.print(t)
        return
    if recipe is None or root is None:
        _fail("give a recipe and --root (or --list to see the recipes)")
    if recipe not in RECIPES:
        _fail(f"unknown recipe '{recipe}' (known: {', '.join(sorted(RECIPES))}; see --list)")
    extra: dict = {"labels": labels} if labels is not None else {}
    for item in opt or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--opt {item!r}: expected KEY=VALUE")
        v: object = value.strip()
        if isinstance(v, str) and v.lstrip("-").isdigit():
            v = int(v)
        extra[key.strip()] = v
    try:
        res = RECIPES[recipe](root=root, out=out, name=name, **extra)
    except TypeError as e:  # an option this recipe does not take
        _fail(f"{recipe}: {e}")
    except (FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))
    t = Table(title=f"manifests for '{res.dataset}'")
    t.add_column("split")
    t.add_column("clips", justify="right")
    t.add_column("labelled", justify="right")
    for split, clips in res.splits.items():
        labelled = sum(c.labels.emotion_idx is not None or c.labels.sentiment is not None
                       for c in clips)
        t.add_row(split, str(len(clips)), str(labelled))
    console.print(t)
    for cid, reason in res.missing[:10]:
        console.print(f"[yellow]missing media[/yellow] {cid}: {reason}")
    if len(res.missing) > 10:
        console.print(f"[yellow]... and {len(res.missing) - 10} more clips with missing media[/yellow]")


# --- extract ---------------------------------------------------------------------------------
@app.command()
def extract(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (manifests/<dataset>/)."),
    root: Path = typer.Option(None, "--root", help="Dataset root (default: from dataset.json)."),
    cache: Path = CacheOpt,
    preset: str = typer.Option("offline", "--preset", help="offline | full | path/to/preset.toml"),
    set_: list[str] = typer.Option(None, "--set", help="Override a preset value: stage.key=value"),
    workers: int = typer.Option(1, "--workers", help="Local worker processes (or Dask workers)."),
    scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler address (tcp://host:port)."),
    executor: str = typer.Option("auto", "--executor", help="auto | inline | process | dask"),
    batch_size: int = typer.Option(None, "--batch-size", help="Clips per model call."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    force: bool = typer.Option(False, "--force", help="Redo finished work units."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any clip failed."),
    limit: int = typer.Option(None, "--limit", help="Only the first N clips (a quick look)."),
    manifests: Path = ManifestsOpt,
) -> None:
    """Run the staged extractor over a dataset into the feature cache (resumable)."""
    from pipeline.progress import extract_with_progress
    from pipeline.stages.base import ModelMissingError

    try:
        summary = extract_with_progress(
            dataset=dataset, root=root, cache=cache, preset=preset, overrides=set_ or [],
            workers=workers, scheduler=scheduler, executor=executor, batch_size=batch_size,
            device=device, force=force, limit=limit, manifests=manifests, console=console,
        )
    except ModelMissingError as e:
        _fail(str(e))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if strict and summary.failures:
        raise typer.Exit(1)


# --- fusion ----------------------------------------------------------------------------------
OptOpt = typer.Option(None, "--opt", help="Head option KEY=VALUE (or HEAD.KEY=VALUE), repeatable: "
                      "--opt hidden=64 --opt hybrid.max_tokens=8.")
LrOpt = typer.Option(2e-3, "--lr", help="Learning rate at batch 128 (scaled with the auto batch).")
BatchOpt = typer.Option(None, "--batch-size", help="Rows per step (default: automatic).")
PatienceOpt = typer.Option(5, "--patience", help="Epochs without validation progress before stopping.")
ModDropOpt = typer.Option(0.1, "--modality-dropout", help="Chance a modality is hidden from a training row.")
ThreadsOpt = typer.Option(None, "--threads", help="Torch threads (default: the cores, at most 4).")


@app.command()
def fit(
    dataset: str = typer.Option(..., "--dataset"),
    fusion: str = typer.Option("early", "--fusion", help="early | late | hybrid | cquery | tfn | mult | cfnsr"),
    modalities: str = typer.Option("all", "--modalities", help="Comma list (audio,text,visual,meta) or 'all'."),
    seeds: int = typer.Option(3, "--seeds"),
    name: str = typer.Option(None, "--name"),
    cache: Path = CacheOpt,
    preset: str = typer.Option("offline", "--preset", help="Which feature set of the dataset."),
    split: str = typer.Option("official", "--split", help="official | kfold"),
    folds: int = typer.Option(5, "--folds"),
    group_by: str = typer.Option(None, "--group-by"),
    epochs: int = typer.Option(40, "--epochs", help="Most epochs (early stopping on validation)."),
    target: str = typer.Option("label", "--target", help="label | sentiment | valence | arousal"),
    device: str = typer.Option("cpu", "--device"),
    runs: Path = typer.Option(Path("runs"), "--runs"),
    opt: list[str] = OptOpt,
    lr: float = LrOpt,
    batch_size: int = BatchOpt,
    patience: int = PatienceOpt,
    modality_dropout: float = ModDropOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Fit a fusion head on cached features (never touches media or encoders)."""
    from fusion.config import FitConfig
    from fusion.data import DataError
    from fusion.report import load_run, print_table, run_row
    from fusion.train import fit as do_fit

    mods = "all" if modalities == "all" else _split_list(modalities)
    head_opts = _head_opts(opt, [fusion]).get(fusion)
    try:
        cfg = FitConfig(seeds=seeds, split=split, folds=folds, group_by=group_by, epochs=epochs,
                        device=device, target=target, head_options=head_opts or {}, lr=lr,
                        batch_size=batch_size, patience=patience,
                        modality_dropout=modality_dropout, threads=threads)
        res = do_fit(_cache(cache), dataset, fusion, mods, cfg, name=name, runs_dir=runs,
                     preset=preset)
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e))
    m = load_run(res.run_dir)
    print_table([run_row(m)], title=f"{dataset}: {fusion} on {'+'.join(m.get('modalities', []))}",
                console=table_console)
    for w in m.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"[dim]{res.run_dir}/metrics.json, config.toml, model.safetensors, confusion.png, log.csv[/dim]")


@app.command()
def ablate(
    dataset: str = typer.Option(..., "--dataset"),
    fusion: str = typer.Option("early,late,hybrid,cquery", "--fusion",
                               help="Comma list of heads, or 'all' (every registered head)."),
    modalities: str = typer.Option("all-subsets", "--modalities", help="all-subsets | all,singles | a;b,c"),
    seeds: int = typer.Option(3, "--seeds"),
    name: str = typer.Option("ablation", "--name"),
    cache: Path = CacheOpt,
    preset: str = typer.Option("offline", "--preset"),
    workers: int = typer.Option(1, "--workers"),
    scheduler: str = typer.Option(None, "--scheduler"),
    split: str = typer.Option("official", "--split", help="official | kfold (grouped)"),
    folds: int = typer.Option(5, "--folds"),
    epochs: int = typer.Option(40, "--epochs", help="Most epochs (early stopping on validation)."),
    runs: Path = typer.Option(Path("runs"), "--runs"),
    opt: list[str] = OptOpt,
    lr: float = LrOpt,
    batch_size: int = BatchOpt,
    patience: int = PatienceOpt,
    modality_dropout: float = ModDropOpt,
    fresh: bool = typer.Option(False, "--fresh", help="Discard this grid's earlier cells instead of resuming them."),
) -> None:
    """Run a fusion × modality-subset × seed grid; resumable; writes csv, Markdown, plot."""
    from fusion.ablate import ablate as do_ablate
    from fusion.config import FitConfig
    from fusion.data import DataError

    heads = _split_list(fusion) or []
    if heads == ["all"]:
        from fusion.heads import HEADS

        heads = list(HEADS)
    if modalities in ("all-subsets", "all,singles"):
        msets: object = modalities
    else:
        msets = [_split_list(s) for s in modalities.split(";")]
    try:
        cfg = FitConfig(seeds=seeds, split=split, folds=folds, epochs=epochs,
                        head_options=_head_opts(opt, heads), lr=lr, batch_size=batch_size,
                        patience=patience, modality_dropout=modality_dropout)
        df = do_ablate(
            cache_root=_cache(cache), dataset=dataset, fusions=heads, modality_sets=msets,
            name=name, workers=workers, scheduler=scheduler, runs_dir=runs, preset=preset,
            fresh=fresh, cfg=cfg,
        )
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e))
    from fusion.report import collect, print_table, run_row

    cells = [runs / name / c for c in df["cell"]] if "cell" in df else []
    rows = [run_row(m) for m in collect([c for c in cells if (c / "metrics.json").exists()])]
    for r in rows:
        r.pop("run", None)
    print_table(rows, title=f"{dataset}: fusion × modalities (mean ± std over seeds; majority = baseline)",
                console=table_console)
    for r in df.to_dict(orient="records"):
        if r.get("error"):
            console.print(f"[red]failed[/red] {r['cell']}: {r['error']}")
    console.print(f"[dim]{runs / name}/ablation.csv, ablation.md, ablation.png[/dim]")


@app.command()
def report(run: list[Path] = typer.Argument(..., help="Run folders (runs/<name>).")) -> None:
    """Compare runs side by side."""
    from fusion.report import report as do_report

    console.print(do_report(run))


@app.command()
def predict(
    video: Path = typer.Argument(..., help="A video (or audio) file."),
    run: Path = typer.Option(..., "--run", help="A run folder (runs/<name>) with model.safetensors."),
    text: str = typer.Option(None, "--text", help="Transcript, if known."),
    title: str = typer.Option(None, "--title", help="Title / context, if known."),
    preset: str = typer.Option(None, "--preset", help="Default: the preset the run was trained on."),
) -> None:
    """Run the extractor on one new video and print the emotion distribution."""
    from pipeline.predict import predict_file

    try:
        out = predict_file(video, run, text=text, title=title, preset=preset)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    t = Table(title=f"{video.name}: emotion distribution")
    t.add_column("class")
    t.add_column("p", justify="right")
    for cls, p in sorted(out["probs"].items(), key=lambda kv: -kv[1]):
        t.add_row(cls, f"{p:.3f}")
    console.print(t)
    s = Table(title="modality shares (drop in the top class's probability when removed)")
    s.add_column("modality")
    s.add_column("present")
    s.add_column("share", justify="right")
    for m, info in out["shares"].items():
        s.add_row(m, "yes" if info["present"] else "no", f"{info['share']:.2f}")
    console.print(s)
    rec = out.get("text") or {}
    asr = rec.get("asr")
    console.print(f"text source: {rec.get('text_source') or 'none'}")
    if asr is not None:
        said = asr["text"] or "(empty: " + asr["note"] + ")"
        console.print(f"recognised speech ({asr['backend']}, language {asr['language'] or '?'}, "
                      f"confidence {asr['confidence']:.2f}): {said}", markup=False)


# --- cache -----------------------------------------------------------------------------------
def _cache(cache: Path | None) -> Path:
    """--cache, else $MMEMO_CACHE (typer reads it), else ./cache. No pipeline import: `mmemo fit`
    must load nothing but fusion."""
    return cache if cache is not None else Path(os.environ.get("MMEMO_CACHE") or "cache")


@cache_app.command("ls")
def cache_ls(cache: Path = CacheOpt) -> None:
    """Feature sets: sizes, clip counts, completeness, who/when, preset."""
    from pipeline.cachetools import list_sets

    rows = list_sets(_cache(cache))
    t = Table(title=f"feature sets in {_cache(cache)}")
    for col in ("key", "aliases", "clips", "units done", "failures", "size", "created"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["key"], ", ".join(r["aliases"]), str(r["n"]), f"{r['done']}/{r['units']}",
                  str(r["failures"]), r["size_h"], f"{r['created_by']} {r['created_at']}")
    console.print(t)


@cache_app.command("info")
def cache_info(key: str = typer.Argument(..., help="A key or dataset/preset alias."), cache: Path = CacheOpt) -> None:
    """Everything recorded about one feature set (config, models, ledger summary)."""
    from pipeline.cachetools import set_info

    console.print_json(json.dumps(set_info(_cache(cache), key), default=str))


@cache_app.command("verify")
def cache_verify(
    key: str = typer.Argument(None, help="Key or alias (default: every set)."),
    repair: bool = typer.Option(False, "--repair", help="Re-extract the units found bad or missing."),
    root: Path = typer.Option(None, "--root", help="Dataset root for --repair (default: dataset.json)."),
    cache: Path = CacheOpt,
    manifests: Path = ManifestsOpt,
) -> None:
    """Check every chunk against its recorded checksum; find missing/incomplete units."""
    from pipeline.cachetools import repair_set, verify

    reports = verify(_cache(cache), key)
    bad = False
    for r in reports:
        status = "[green]clean[/green]" if r.clean else "[red]PROBLEMS[/red]"
        console.print(f"{r.key}: {status} ({r.files_checked} files, {r.units_done}/{r.units} units done)")
        for p in r.problems:
            console.print(f"  - {p}")
        if not r.clean:
            bad = True
            if repair:
                n = repair_set(_cache(cache), r, root=root, manifests=manifests)
                console.print(f"  repaired {n} unit(s)")
    if bad and not repair:
        raise typer.Exit(1)


@cache_app.command("gc")
def cache_gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    keep_unreferenced: bool = typer.Option(False, "--keep-unreferenced", help="Keep sets no alias points to."),
    cache: Path = CacheOpt,
) -> None:
    """Remove stale claims, orphaned temporaries and (unless kept) unreferenced sets."""
    from pipeline.cachetools import gc

    for action in gc(_cache(cache), dry_run=dry_run, keep_unreferenced=keep_unreferenced):
        console.print(("would remove " if dry_run else "removed ") + action)


@import_app.command("csd")
def import_csd(
    file: Path = typer.Argument(..., help="A CMU-MultimodalSDK .csd file (HDF5)."),
    dataset: str = typer.Option(None, "--dataset", help="Dataset name (default: file stem)."),
    cache: Path = CacheOpt,
) -> None:
    """Import a CMU-MultimodalSDK computational sequence as a feature set."""
    from pipeline.importers import import_csd as do

    key = do(file, _cache(cache), dataset=dataset)
    console.print(f"imported {file} as feature set {key}")


@import_app.command("mmsa-pkl")
def import_mmsa(
    file: Path = typer.Argument(..., help="An MMSA-style aligned .pkl (train/valid/test)."),
    dataset: str = typer.Option(None, "--dataset"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Required: unpickling runs code from the file."),
    cache: Path = CacheOpt,
) -> None:
    """Import MMSA features (the one place mmemo unpickles, only with --allow-pickle)."""
    from pipeline.importers import import_mmsa_pkl as do

    if not allow_pickle:
        _fail("a .pkl file can run arbitrary code when loaded; pass --allow-pickle if you trust this file")
    key = do(file, _cache(cache), dataset=dataset, allow_pickle=allow_pickle)
    console.print(f"imported {file} as feature set {key}")


@app.command()
def export(
    key: str = typer.Argument(..., help="Key or dataset/preset alias."),
    out: Path = typer.Option(..., "--out"),
    format: str = typer.Option("hdf5", "--format", help="hdf5 | mmsa-pkl"),
    cache: Path = CacheOpt,
) -> None:
    """Export a feature set for other trainers."""
    from pipeline.importers import export_set

    export_set(_cache(cache), key, out, fmt=format)
    console.print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
