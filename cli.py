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

_DEBUG = {"on": False}  # set by the global --debug option (see _root)


def error_line(e: BaseException) -> str:
    """One line for an exception: the file / key / value it names and the reason.

    OSErrors (missing files, permissions, HDF5 files that are not HDF5) name their file; a
    KeyError is shown as the key; a type this tool does not raise on purpose is labelled an
    internal error with the hint to rerun with --debug.
    """
    if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    elif isinstance(e, KeyError) and e.args:
        msg = f"no such key: {e.args[0]}" if len(str(e.args[0])) < 200 else str(e.args[0])
    else:
        msg = str(e) or type(e).__name__
    if not isinstance(e, (ValueError, OSError, KeyError, LookupError, RuntimeError, TypeError)):
        msg = f"{type(e).__name__}: {msg} (unexpected; rerun with --debug for the traceback)"
    return " ".join(msg.split())  # one line, whatever the message held


class _ErrorGroup(typer.core.TyperGroup):
    """The app's root group: any exception a command raises becomes one `error:` line and exit
    code 1 (a traceback only with `mmemo --debug ...`). It wraps every command and sub-command
    (cache, import) because they all run inside the root group's invoke."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except Exception as e:
            # usage errors, Exit and Abort (click's, or the click that typer vendors) are
            # already handled by typer: an exit code and its own message
            if _DEBUG["on"] or type(e).__module__.split(".")[0] in ("click", "typer"):
                raise
            _fail(error_line(e), code=1)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_ErrorGroup,
                  help="Multimodal emotion recognition: extract once, fuse fast.")
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
            _check_opt_type(item, h, name, value, head_options(h)[name])
            out.setdefault(h, {})[name] = value
    return out


def _check_opt_type(item: str, head: str, name: str, value: object, default: object) -> None:
    """A head option's value must have its default's type (an int where the default is an int,
    a number where it is a float, true/false for a flag), so `--opt hidden=abc` fails here,
    naming the option, rather than deep inside the head."""
    def kind(v: object) -> str | None:
        if isinstance(v, bool):
            return "true or false"
        if isinstance(v, int):
            return "an integer"
        if isinstance(v, float):
            return "a number"
        if isinstance(v, str):
            return "a string"
        return None

    want, got = kind(default), kind(value)
    ok = (want is None or want == got or (want == "a number" and got == "an integer"))
    if not ok:
        _fail(f"--opt {item!r}: option {name!r} of head {head!r} takes {want} "
              f"(default {default!r}), got {value!r}")


def _fail(msg: str, code: int = 2) -> None:
    # one line whatever the terminal width (no wrapping), and the message is text, not markup
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", envvar="MMEMO_DEBUG",
                                     help="Show the full traceback of an error instead of one line.")
          ) -> None:
    """Multimodal emotion recognition: extract once, fuse fast."""
    _DEBUG["on"] = debug


# --- data ------------------------------------------------------------------------------------
@app.command()
def sample(
    out: Path = typer.Option(..., "--out", help="Folder to write the synthetic dataset into."),
    n: int = typer.Option(160, "--n", help="Number of clips."),
    seed: int = typer.Option(0, "--seed"),
    shift: float = typer.Option(0.5, "--shift", min=0.0, max=1.0,
                                help="Share of clips that change emotion at their midpoint (labelled "
                                     "with the class they end in); 0: static clips."),
) -> None:
    """Write a small synthetic labelled video dataset (folder layout) with known signal."""
    from pipeline.sample import SampleSpec, make_sample

    path = make_sample(out, n=n, seed=seed, spec=SampleSpec(shift=shift))
    console.print(f"wrote {n} clips to {path}")


@app.command()
def prepare(
    recipe: str = typer.Argument(None, help="Recipe name (see --list)."),
    root: Path = typer.Option(None, "--root", help="Dataset root folder."),
    name: str = typer.Option(None, "--name", help="Dataset name (default: the recipe's)."),
    labels: str = typer.Option(None, "--labels", help="plutchik: rewrite the labels into Plutchik's wheel "
                               "(8 primaries + neutral, soft targets for dyads; default name RECIPE-plutchik); "
                               "folder recipe: a labels.csv kept outside the root."),
    opt: list[str] = typer.Option(None, "--opt", help="Recipe option KEY=VALUE, repeatable: "
                                  "cremad labels=av, ravdess folds=6, iemocap media=wav, mosi folds=FILE."),
    list_: bool = typer.Option(False, "--list", help="List the recipes, the layout each expects and its labels."),
    allow_failures: bool = typer.Option(False, "--allow-failures", help="Exit 0 although rows were "
                                        "skipped (they are still named)."),
    out: Path = ManifestsOpt,
) -> None:
    """Write JSONL manifests for a dataset on disk.

    A row that cannot become a clip (missing or refused media, an oversized field) is one
    `error:` line and is left out; the manifests hold the rest, and the exit code is 1 (0 with
    --allow-failures). A row kept with a gap (e.g. MELD without its video: transcript only) is
    a `warning:` line."""
    from rich.markup import escape

    from pipeline.recipes import RECIPES, describe
    from pipeline.recipes.common import LABEL_SPACES, to_label_space

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
    # --labels names a label space (plutchik) unless a file of that name exists (folder recipe)
    space = labels if labels in LABEL_SPACES and not Path(labels).exists() else None
    extra: dict = {"labels": Path(labels)} if labels is not None and space is None else {}
    if space is not None and name is None:
        name = f"{recipe}-{space}"  # the dataset's own-space manifests stay as they are
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
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        _fail(str(e))
    if space is not None:
        try:
            res = to_label_space(res, space, recipe=recipe)
        except (ValueError, KeyError) as e:
            _fail(str(e))
    t = Table(title=f"manifests for '{res.dataset}'")
    t.add_column("split")
    t.add_column("clips", justify="right")
    t.add_column("labelled", justify="right")
    for split, clips in res.splits.items():
        t.add_row(split, str(len(clips)), str(sum(c.labels.any_label() for c in clips)))
    console.print(t)
    console.print(_labels_line(res), markup=False, soft_wrap=True)
    skipped, gaps = res.left_out, res.kept_with_gaps
    for rows, tag in ((skipped, "[red]error:[/red]"), (gaps, "[yellow]warning:[/yellow]")):
        for cid, reason in rows[:10]:
            console.print(f"{tag} {escape(cid)}: {escape(reason)}", soft_wrap=True)
        if len(rows) > 10:
            what = "rows left out" if rows is skipped else "rows kept with a gap"
            console.print(f"{tag} ... and {len(rows) - 10} more {what}", soft_wrap=True)
    if space is not None:
        n = res.info["label_space_counts"]
        gone = n["left_out"]
        which = f" ({', '.join(f'{k}: {v}' for k, v in gone.items())})" if gone else ""
        console.print(escape(f"{space}: mapped {n['mapped']} ({n['soft']} soft), left out "
                             f"{sum(gone.values())}{which}"), soft_wrap=True)
    if skipped and not allow_failures:
        console.print(f"{len(skipped)} row(s) left out (above); the manifests hold the other "
                      f"{res.n_clips} clips. Exit 1; `--allow-failures` exits 0 with rows left out.",
                      markup=False, soft_wrap=True)
        raise typer.Exit(1)


def _labels_line(res) -> str:
    """What the manifests can be fit on, and where they are: the classes, the regression
    targets with how many clips carry each, or neither."""
    from pipeline.manifest import TARGETS

    clips = [c for cs in res.splits.values() for c in cs]
    classes = list(res.info.get("classes") or [])
    parts = []
    if classes:
        shown = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
        parts.append(f"classes: {shown} (mmemo fit)")
    for t in TARGETS:
        n = sum(getattr(c.labels, t) is not None for c in clips)
        if n:
            parts.append(f"target {t}: {n} clips (mmemo fit --target {t})")
    what = "; ".join(parts) or "no labels (features only: nothing to fit on)"
    where = res.paths["dataset"].parent if "dataset" in res.paths else None
    return what + (f"; manifests in {where}" if where is not None else "")


# --- extract ---------------------------------------------------------------------------------
@app.command()
def extract(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (manifests/<dataset>/)."),
    root: Path = typer.Option(None, "--root", help="Dataset root (default: from dataset.json)."),
    cache: Path = CacheOpt,
    preset: str = typer.Option("offline", "--preset", help="offline | full | path/to/preset.toml"),
    set_: list[str] = typer.Option(None, "--set", help="Override a preset value, repeatable: stage.key=value "
                                   "(e.g. --set run.lease=300 --set audio.feature_set=compare)."),
    workers: int = typer.Option(1, "--workers", help="Local worker processes (or Dask workers)."),
    scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler address (tcp://host:port)."),
    executor: str = typer.Option("auto", "--executor", help="auto (inline for 1 worker, process for more, "
                                 "dask with --scheduler) | inline | process | dask"),
    batch_size: int = typer.Option(None, "--batch-size", help="Clips per model call (default: the preset's run.batch_size)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    force: bool = typer.Option(False, "--force", help="Redo finished work units (each keeps its old data until "
                               "the replacement is committed)."),
    allow_failures: bool = typer.Option(False, "--allow-failures", help="Exit 0 although clips of the set "
                                        "failed (they stay in the ledger and the summary)."),
    strict: bool = typer.Option(False, "--strict", hidden=True, help="Exit 1 if any clip failed: the "
                                "default now, kept for scripts that pass it."),
    limit: int = typer.Option(None, "--limit", help="Only the first N clips (a quick look)."),
    manifests: Path = ManifestsOpt,
) -> None:
    """Run the staged extractor over a dataset into the feature cache (resumable).

    Progress: a bar in a terminal; otherwise a timestamped line every $MMEMO_PROGRESS_EVERY
    seconds (default 30). Ctrl-C keeps finished units; the same command resumes. A clip that
    fails (unreadable media, a stage error) is one `error:` line and a ledger row, the batch goes
    on, and the exit code is 1 while the set holds failed clips (0 with --allow-failures).
    """
    from pipeline.progress import extract_with_progress
    from pipeline.runner import Interrupted
    from pipeline.stages.base import ModelMissingError

    try:
        summary = extract_with_progress(
            dataset=dataset, root=root, cache=cache, preset=preset, overrides=set_ or [],
            workers=workers, scheduler=scheduler, executor=executor, batch_size=batch_size,
            device=device, force=force, limit=limit, manifests=manifests, console=console,
        )
    except Interrupted as e:
        s = e.summary
        console.print(f"interrupted: {e.units_kept} of {s.n_units} units finished and kept in "
                      f"{_cache(cache)}; run the same `mmemo extract --dataset {dataset} ...` command "
                      "again to resume (finished units are skipped)", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        console.print("interrupted before any unit was extracted; run the same command again to start",
                      markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except ModelMissingError as e:
        _fail(str(e))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    n_failed = summary.n_failed_in_set
    if n_failed and not allow_failures:
        console.print(f"{n_failed} of {summary.n_clips} clips failed (above, and all in the ledger); "
                      "the others are extracted. Exit 1; `--allow-failures` exits 0 with failed clips.",
                      markup=False, soft_wrap=True)
        raise typer.Exit(1)


# --- fusion ----------------------------------------------------------------------------------
OptOpt = typer.Option(None, "--opt", help="Head option KEY=VALUE (or HEAD.KEY=VALUE), repeatable: "
                      "--opt hidden=64 --opt hybrid.max_tokens=8.")
LrOpt = typer.Option(2e-3, "--lr", help="Learning rate at batch 128 (scaled with the auto batch).")
BatchOpt = typer.Option(None, "--batch-size", help="Rows per step (default: automatic).")
PatienceOpt = typer.Option(5, "--patience", help="Epochs without validation progress before stopping.")
ModDropOpt = typer.Option(0.1, "--modality-dropout", help="Chance a modality is hidden from a training row.")
ProtocolOpt = typer.Option(None, "--protocol", help="meld-official | iemocap-loso | iemocap6 | mosei-standard | mosi-standard | ravdess-6fold | ravdess-5fold | cremad-actor (sets split, labels, metric, class weights).")
LabelsOpt = typer.Option(None, "--labels", help="Fit-time label set: iemocap4 | iemocap6 | plutchik.")
WarmOpt = typer.Option(True, "--warm-start/--no-warm-start", help="Start each head's linear path "
                       "from the fold's fitted linear probe, kept unless training beats it on "
                       "validation (docs/ARCHITECTURE.md).")
DepartOpt = typer.Option(0.05, "--depart-p", help="A warm-started head leaves its probe only for a "
                         "validation gain whose paired permutation p-value is at most this "
                         "(1: any gain).")
NormOpt = typer.Option("global", "--normalise", help="global | speaker: with speaker, each "
                       "speaker's features are first standardised by that speaker's own clips "
                       "(no labels; a held-out speaker by its own; the set must be grouped by speaker).")
ThreadsOpt = typer.Option(None, "--threads", help="Torch threads (default: the cores, at most 4).")
SeedsOpt = typer.Option(3, "--seeds", help="How many seeds (0..N-1) to train; scores are mean ± std over them.")
GroupByOpt = typer.Option(None, "--group-by", help="Clip field that groups clips for validation and "
                          "folds (speaker, dialogue_id, ...; default: the set's; 'none': ungrouped).")
SplitOpt = typer.Option("official", "--split", help="official (the set's train/val/test) | kfold (grouped k-fold).")
FoldsOpt = typer.Option(5, "--folds", help="Folds for --split kfold.")
EpochsOpt = typer.Option(40, "--epochs", help="Most epochs (early stopping on validation).")
TargetOpt = typer.Option("label", "--target", help="label (the classes) | sentiment | valence | "
                         "arousal (a regression target of the set).")
RunsOpt = typer.Option(Path("runs"), "--runs", help="Folder the run folders are written under.")
PresetFitOpt = typer.Option("offline", "--preset", help="Which feature set of the dataset (the preset it was extracted with).")
PartialOpt = typer.Option(False, "--allow-partial", help="Train on a partly extracted feature set "
                          "(unfinished units); the coverage is recorded in metrics.json.")


@app.command()
def fit(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (its feature set is looked up by --preset)."),
    fusion: str = typer.Option("early", "--fusion", help="early | late | hybrid | cquery | tfn | mult | cfnsr"),
    modalities: str = typer.Option("all", "--modalities", help="Comma list (audio,text,visual,meta) or 'all'."),
    seeds: int = SeedsOpt,
    name: str = typer.Option(None, "--name", help="Run folder name (default: DATASET-FUSION-MODALITIES, "
                      "plus -TARGET for a regression target)."),
    cache: Path = CacheOpt,
    preset: str = PresetFitOpt,
    split: str = SplitOpt,
    folds: int = FoldsOpt,
    group_by: str = GroupByOpt,
    epochs: int = EpochsOpt,
    target: str = TargetOpt,
    device: str = typer.Option("cpu", "--device", help="Torch device: cpu | cuda | cuda:N."),
    runs: Path = RunsOpt,
    opt: list[str] = OptOpt,
    lr: float = LrOpt,
    batch_size: int = BatchOpt,
    patience: int = PatienceOpt,
    modality_dropout: float = ModDropOpt,
    warm_start: bool = WarmOpt,
    depart_p: float = DepartOpt,
    normalise: str = NormOpt,
    threads: int = ThreadsOpt,
    protocol: str = ProtocolOpt,
    labels: str = LabelsOpt,
    test_dataset: str = typer.Option(None, "--test-dataset", help="Test on another dataset's feature set (same preset; with --labels plutchik)."),
    allow_partial: bool = PartialOpt,
) -> None:
    """Fit a fusion head on cached features (never touches media or encoders)."""
    from fusion.config import FitConfig
    from fusion.data import DataError
    from fusion.progress import FitProgress
    from fusion.report import load_run, print_table, run_row
    from fusion.train import fit as do_fit

    mods = "all" if modalities == "all" else _split_list(modalities)
    head_opts = _head_opts(opt, [fusion]).get(fusion)
    try:
        cfg = FitConfig(seeds=seeds, split=split, folds=folds, group_by=group_by, epochs=epochs,
                        device=device, target=target, head_options=head_opts or {}, lr=lr,
                        batch_size=batch_size, patience=patience, warm_start=warm_start,
                        modality_dropout=modality_dropout, threads=threads, labels=labels,
                        normalise=normalise, depart_p=depart_p)
        progress = FitProgress(console)
        try:
            res = do_fit(_cache(cache), dataset, fusion, mods, cfg, name=name, runs_dir=runs,
                         preset=preset, protocol=protocol, test_dataset=test_dataset,
                         allow_partial=allow_partial, progress=progress)
        finally:
            progress.close()
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e))
    m = load_run(res.run_dir)
    print_table([run_row(m)], title=f"{dataset}: {fusion} on {'+'.join(m.get('modalities', []))}",
                console=table_console)
    console.print(m.get("paper", ""))
    for w in m.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
    plots = ("confusion.png (mean over seeds; confusion_normalised.png, confusion_seed*.png), "
             if (res.run_dir / "confusion.png").is_file() else "")  # none for a regression
    console.print(f"[dim]{res.run_dir}/metrics.json, config.toml, model.safetensors, {plots}"
                  "log.csv[/dim]")


@app.command()
def ablate(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (its feature set is looked up by --preset)."),
    fusion: str = typer.Option("early,late,hybrid,cquery", "--fusion",
                               help="Comma list of heads, or 'all' (every registered head)."),
    modalities: str = typer.Option("all-subsets", "--modalities", help="all-subsets | all,singles | "
                                   "sets separated by ';', each a comma list (audio,text;audio)."),
    seeds: int = SeedsOpt,
    name: str = typer.Option("ablation", "--name", help="Grid folder under --runs (a rerun resumes it)."),
    cache: Path = CacheOpt,
    preset: str = PresetFitOpt,
    workers: int = typer.Option(1, "--workers", help="Cells run at once (local processes)."),
    scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler address (tcp://host:port) to run the cells on."),
    split: str = SplitOpt,
    folds: int = FoldsOpt,
    group_by: str = GroupByOpt,
    epochs: int = EpochsOpt,
    runs: Path = RunsOpt,
    opt: list[str] = OptOpt,
    lr: float = LrOpt,
    batch_size: int = BatchOpt,
    patience: int = PatienceOpt,
    modality_dropout: float = ModDropOpt,
    warm_start: bool = WarmOpt,
    depart_p: float = DepartOpt,
    normalise: str = NormOpt,
    threads: int = typer.Option(None, "--threads", help="Torch threads per cell (default: the "
                                "cores shared among --workers)."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard this grid's earlier cells instead of resuming them."),
    target: str = TargetOpt,
    protocol: str = ProtocolOpt,
    labels: str = LabelsOpt,
    allow_partial: bool = PartialOpt,
) -> None:
    """Run a fusion × modality-subset × seed grid; resumable; writes csv, Markdown, plot.

    The whole grid (heads, options, modality names, the split) is checked before the first cell runs;
    the exit code is 1 when any cell failed."""
    from fusion.ablate import ablate as do_ablate
    from fusion.config import FitConfig
    from fusion.data import DataError
    from fusion.progress import CellProgress

    heads = _split_list(fusion) or []
    if heads == ["all"]:
        from fusion.heads import HEADS

        heads = list(HEADS)
    keywords = {"all-subsets", "all", "singles"}
    if set(_split_list(modalities) or []) <= keywords and ";" not in modalities:
        msets: object = modalities
    else:
        msets = [_split_list(s) for s in modalities.split(";")]
    try:
        cfg = FitConfig(seeds=seeds, split=split, folds=folds, group_by=group_by, epochs=epochs,
                        head_options=_head_opts(opt, heads), lr=lr, batch_size=batch_size,
                        patience=patience, modality_dropout=modality_dropout, threads=threads,
                        labels=labels, warm_start=warm_start, normalise=normalise,
                        depart_p=depart_p, target=target)
        if protocol:
            from fusion.protocols import get_protocol

            for line in get_protocol(protocol).overrides(cfg):
                console.print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True)
            cfg = get_protocol(protocol).config(cfg)
        progress = CellProgress(console)
        try:
            df = do_ablate(
                cache_root=_cache(cache), dataset=dataset, fusions=heads, modality_sets=msets,
                name=name, workers=workers, scheduler=scheduler, runs_dir=runs, preset=preset,
                fresh=fresh, cfg=cfg, allow_partial=allow_partial, progress=progress,
            )
        finally:
            progress.close()
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e))
    from fusion.report import collect, print_table, run_row

    cells = [runs / name / c for c in df["cell"]] if "cell" in df else []
    rows = [run_row(m) for m in collect([c for c in cells if (c / "metrics.json").exists()])]
    for r in rows:
        r.pop("run", None)
    if rows:
        base = "mean baseline" if any("mean baseline" in k for k in rows[0]) else "majority"
        print_table(rows, title=f"{dataset}: fusion × modalities (mean ± std over seeds; "
                    f"{base} = the trivial predictor)", console=table_console)
    failed = [r for r in df.to_dict(orient="records") if r.get("error")]
    for r in failed:
        console.print(f"[red]failed[/red] {r['cell']}: {r['error']}", soft_wrap=True)
    shown = "ablation.csv, ablation.md" + (", ablation.png" if rows else "")
    console.print(f"[dim]{runs / name}/{shown}[/dim]")
    if failed:
        _fail(f"{len(failed)} of {len(df)} cells failed (listed above; {runs / name}/ablation.md)",
              code=1)


@app.command()
def report(run: list[Path] = typer.Argument(..., help="Run folders (runs/<name>).")) -> None:
    """Compare runs side by side."""
    from fusion.report import report as do_report

    # Markdown as it is, for `mmemo report ... > report.md`: a rich console wraps long table
    # rows at its width (80 columns when stdout is a file) and reads [brackets] as markup
    typer.echo(do_report(run), nl=False)


@app.command()
def predict(
    video: Path = typer.Argument(..., help="A video (or audio) file."),
    run: Path = typer.Option(..., "--run", help="A run folder (runs/<name>) with model.safetensors."),
    text: str = typer.Option(None, "--text", help="Transcript, if known (else recognised speech / subtitles, "
                             "as the preset says)."),
    title: str = typer.Option(None, "--title", help="Title / context, if known (the conditioning text)."),
    preset: str = typer.Option(None, "--preset", help="offline | full | path/to/preset.toml "
                               "(default: the preset the run's feature set was extracted with)."),
) -> None:
    """Run the extractor on one new video and print the emotion distribution (a regression
    run: the predicted value)."""
    from pipeline.predict import predict_file

    try:
        out = predict_file(video, run, text=text, title=title, preset=preset)
    except (FileNotFoundError, ValueError, OSError) as e:
        _fail(str(e))
    regression = out.get("task") == "regression"
    t = Table(title=f"{video.name}: " + ("predicted value" if regression else "emotion distribution"))
    t.add_column("target" if regression else "class")
    t.add_column("value" if regression else "p", justify="right")
    for cls, p in sorted(out["probs"].items(), key=lambda kv: -kv[1]):
        t.add_row(cls, f"{p:.3f}")
    console.print(t)
    s = Table(title="modality shares (" + ("change in the predicted value" if regression else
                                           "drop in the top class's probability") + " when removed)")
    s.add_column("modality")
    s.add_column("present")
    s.add_column("share", justify="right")
    s.add_column("RMS z (training ≈ 1)", justify="right")
    dist = out.get("rms_z") or {}
    for m, info in out["shares"].items():
        z = dist.get(m)
        s.add_row(m, "yes" if info["present"] else "no", f"{info['share']:.2f}", "-" if z is None else f"{z:.1f}")
    console.print(s)
    from fusion.predict import FAR_RMS_Z

    far = {m: z for m, z in dist.items() if z is not None and z > FAR_RMS_Z}
    if far:
        said = ", ".join(f"{m} {z:.3g}" for m, z in far.items())
        console.print(f"warning: this clip lies far outside the run's training rows (RMS z-score {said}; "
                      f"about 1 for those rows, over {FAR_RMS_Z:g} is far): the "
                      + ("value above is" if regression else "probabilities above are")
                      + " an extrapolation, however confident they look", markup=False, soft_wrap=True)
    rec = out.get("text") or {}
    asr = rec.get("asr")
    console.print(f"text source: {rec.get('text_source') or 'none'}")
    for source, said in (out.get("text_used") or {}).items():
        shown = said if len(said) <= 300 else said[:300] + f"… ({len(said)} characters)"
        console.print(f"  {source}: {shown}", markup=False, soft_wrap=True)
    if asr is not None:
        said = asr["text"] or "(empty: " + asr["note"] + ")"
        console.print(f"recognised speech ({asr['backend']}, language {asr['language'] or '?'}, "
                      f"confidence {asr['confidence']:.2f}): {said}", markup=False)


# --- cache -----------------------------------------------------------------------------------
def _cache(cache: Path | None) -> Path:
    """--cache, else $MMEMO_CACHE (typer reads it), else ./cache. No pipeline import: `mmemo fit`
    must load nothing but fusion."""
    return cache if cache is not None else Path(os.environ.get("MMEMO_CACHE") or "cache")


def _existing_cache(cache: Path | None) -> Path:
    """The cache folder for commands that only read or tidy one: a folder that does not exist
    is an error (a mistyped --cache / $MMEMO_CACHE), not an empty cache."""
    root = _cache(cache)
    if not root.is_dir():
        _fail(f"{root}: no such cache folder (check --cache / $MMEMO_CACHE; `mmemo extract` "
              "creates one)")
    return root


@cache_app.command("ls")
def cache_ls(cache: Path = CacheOpt) -> None:
    """Feature sets: sizes, clip counts, completeness, who/when, preset."""
    from pipeline.cachetools import human_size, list_sets

    root = _existing_cache(cache)
    rows = list_sets(root)
    t = Table(title=f"feature sets in {root}")
    for col in ("key", "aliases", "clips", "units done", "failures", "size", "created"):
        t.add_column(col)
    for r in rows:
        size = r["size_h"] + (f" ({human_size(r['shared'])} shared)" if r.get("shared") else "")
        t.add_row(r["key"], ", ".join(r["aliases"]), str(r["n"]), f"{r['done']}/{r['units']}",
                  str(r["failures"]), size, f"{r['created_by']} {r['created_at']}")
    console.print(t)
    if any(r.get("shared") for r in rows):
        console.print("shared: files hard-linked with another set (a re-labelled set's copied "
                      "units); they take disk space once, and removing one set does not free "
                      "them", markup=False, soft_wrap=True)
    if not rows:
        console.print(f"no feature sets in {root} yet (`mmemo extract` writes them)", markup=False,
                      soft_wrap=True)


@cache_app.command("info")
def cache_info(
    key: str = typer.Argument(..., help="A key or dataset/preset alias."),
    as_json: bool = typer.Option(False, "--json", help="Everything recorded, as JSON (config, models, ledger)."),
    cache: Path = CacheOpt,
) -> None:
    """A short summary of one feature set (everything recorded with --json)."""
    from pipeline.cachetools import set_info

    try:
        info = set_info(_cache(cache), key)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    _print_set_summary(info)


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

    root = _existing_cache(cache)
    try:
        reports = verify(root, key)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if not reports:
        console.print(f"no feature sets in {root}: nothing to verify", markup=False, soft_wrap=True)
    bad = False
    for r in reports:
        status = "[green]clean[/green]" if r.clean else "[red]PROBLEMS[/red]"
        console.print(f"{r.key}: {status} ({r.files_checked} files, {r.units_done}/{r.units} units done)")
        for p in r.problems:
            console.print(f"  - {p}", markup=False, soft_wrap=True)
        if not r.clean:
            bad = True
            if repair:
                try:
                    n = repair_set(_cache(cache), r, root=root, manifests=manifests)
                except (FileNotFoundError, ValueError) as e:
                    _fail(f"repair of {r.key}: {e}")
                console.print(f"  repaired {n} unit(s)")
    if bad and not repair:
        raise typer.Exit(1)


@cache_app.command("claims")
def cache_claims(
    as_json: bool = typer.Option(False, "--json", help="The claims as JSON."),
    cache: Path = CacheOpt,
) -> None:
    """Work units claimed by running (or dead) extractors: who, pid, lease, live or stale."""
    import datetime as dt

    from pipeline.store import Store

    rows = Store(_cache(cache)).claims()
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    if not rows:
        console.print(f"no claims in {_cache(cache)}", markup=False)
        return
    t = Table(title=f"claims in {_cache(cache)}")
    for col in ("set", "unit", "by", "pid", "lease until", "state"):
        t.add_column(col)
    for r in rows:
        until = dt.datetime.fromtimestamp(float(r.get("expires", 0))).isoformat(sep=" ", timespec="seconds")
        state = {"live": "live", "expired": "stale (lease expired)",
                 "dead": "stale (process gone)"}.get(r["state"], r["state"])
        t.add_row(r["key"], str(r["unit"]), str(r.get("by", "?")), str(r.get("pid", "?")), until, state)
    table_console.print(t)


@cache_app.command("gc")
def cache_gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    keep_unreferenced: bool = typer.Option(False, "--keep-unreferenced", help="Keep sets no alias points to."),
    cache: Path = CacheOpt,
) -> None:
    """Remove stale claims, orphaned temporaries and (unless kept) unreferenced sets."""
    from pipeline.cachetools import gc

    root = _existing_cache(cache)
    actions = list(gc(root, dry_run=dry_run, keep_unreferenced=keep_unreferenced))
    for action in actions:
        console.print(("would remove " if dry_run else "removed ") + action, markup=False, soft_wrap=True)
    if not actions:
        console.print(f"nothing to remove in {root}", markup=False, soft_wrap=True)
    else:
        console.print(f"{len(actions)} item(s) {'would be removed' if dry_run else 'removed'} in {root}"
                      + (" (--dry-run: nothing was touched)" if dry_run else ""), markup=False, soft_wrap=True)


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
    dataset: str = typer.Option(None, "--dataset", help="Dataset name (default: file stem)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Required: unpickling runs code from the file."),
    cache: Path = CacheOpt,
) -> None:
    """Import MMSA features (the one place mmemo unpickles, only with --allow-pickle)."""
    from pipeline.importers import import_mmsa_pkl as do

    if not allow_pickle:
        _fail("a .pkl file can run arbitrary code when loaded; pass --allow-pickle if you trust this file")
    key = do(file, _cache(cache), dataset=dataset, allow_pickle=allow_pickle)
    console.print(f"imported {file} as feature set {key}")


EXPORT_FORMATS = ("hdf5", "mmsa-pkl")


@app.command()
def export(
    key: str = typer.Argument(..., help="Key or dataset/preset alias."),
    out: Path = typer.Option(..., "--out", help="File to write (replaced atomically when done)."),
    format: str = typer.Option("hdf5", "--format", help="hdf5 | mmsa-pkl"),
    cache: Path = CacheOpt,
) -> None:
    """Export a feature set for other trainers."""
    from pipeline.importers import export_set

    if format not in EXPORT_FORMATS:
        _fail(f"--format {format!r}: unknown export format; use one of {', '.join(EXPORT_FORMATS)}")
    export_set(_cache(cache), key, out, fmt=format)
    console.print(f"wrote {out}")



def _print_set_summary(info: dict) -> None:
    """`cache info`: a few lines a person reads (the JSON has everything)."""
    attrs = info.get("attrs", {})
    clips, units, ledger = info["clips"], info["units"], info["ledger"]
    lines = [
        f"set {info['key']}" + (f" ({', '.join(info['aliases'])})" if info.get("aliases") else ""),
        f"  path      {info['path']}",
        f"  dataset   {attrs.get('dataset', '?')}, preset {attrs.get('preset', '?')}, "
        f"{len(attrs.get('classes') or [])} classes, task {attrs.get('task', '?')}",
        f"  clips     {clips['n']} ({clips['in_done_units']} in finished units)",
        f"  units     {units['done']}/{units['total']} done, {units['unit_size']} clips each"
        + (f"; missing {_short_list(units['missing'])}" if units["missing"] else ""),
        f"  created   {attrs.get('created_by', '?')} {attrs.get('created_at', '?')}",
    ]
    for name, m in info["modalities"].items():
        prov = m.get("provenance") or {}
        dims = f"{m['pooled_dim']}" + (f", seq {m['max_len']}x{m['seq_dim']}" if m.get("seq_dim") else "")
        lines.append(f"  {name:<9} {prov.get('backend', '?')} [{dims}] present {m['present']}, absent {m['absent']}")
    lines.append(f"  failures  {ledger['clips']} clip(s), {ledger['rows']} ledger row(s)"
                 + (": " + ", ".join(f"{k} {v}" for k, v in list(ledger["by_error"].items())[:4])
                    if ledger["by_error"] else ""))
    lines.append("  (mmemo cache info KEY --json for configs, models and the full ledger summary)")
    for line in lines:
        console.print(line, markup=False, soft_wrap=True)


def _short_list(values: list, n: int = 8) -> str:
    return ", ".join(map(str, values[:n])) + (f" … (+{len(values) - n})" if len(values) > n else "")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
