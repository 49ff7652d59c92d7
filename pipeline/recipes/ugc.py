"""User-generated short videos (CHFEN-style) with a conditional query -> manifests.

Expected layout: the folder recipe's, with a ``title`` column::

    <root>/labels.csv   id,video,audio,text,title,label,speaker,split[,plutchik,
                        plutchik_intensity,plutchik_dyads]
    <root>/**/*.mp4     media, paths relative to <root>

Decisions:

* Reading, media checks, ids, classes and splits are the folder recipe's (one CSV reader).
* ``title`` (the post's title: the conditional query of CHFEN-style models) is required as a
  column; a row with an empty title is kept and counted in ``info["untitled"]``.
* Optional Plutchik annotation: ``plutchik`` (one of the 8 primaries or ``neutral``),
  ``plutchik_intensity`` (``low`` / ``basic`` / ``high``, or 1 / 2 / 3), ``plutchik_dyads``
  (``;``-separated dyad names, e.g. ``love;contempt``). Names are checked against
  ``plutchik.toml`` (the same file fusion's label mapping reads); a wrong one is an error
  naming the line. They stay in ``metadata`` and are listed in ``label_derived``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pipeline.manifest import MANIFEST_DIR
from pipeline.recipes.common import PrepareResult, dataset_name, require_file, write_result
from pipeline.recipes.folder import clips_from_csv, read_rows, task_info

LAYOUT = ("labels.csv with id,video,title,label (+ text, audio, speaker, split; optional "
          "plutchik, plutchik_intensity, plutchik_dyads); media under the root")
CLASSES: list[str] = []  # the dataset's own labels; Plutchik names from plutchik.toml
PLUTCHIK_FILE = Path(__file__).with_name("plutchik.toml")
INTENSITY = {"1": "low", "2": "basic", "3": "high", "low": "low", "basic": "basic", "high": "high"}


def plutchik_names() -> tuple[set[str], set[str]]:
    """(primaries + neutral, dyad names) declared in plutchik.toml."""
    data = tomllib.loads(PLUTCHIK_FILE.read_text(encoding="utf-8"))
    return set(data["primaries"]) | {"neutral"}, set(data["dyads"])


def prepare(
    root: Path,
    out: Path = MANIFEST_DIR,
    name: str | None = None,
    *,
    keep_missing: bool = False,
    split_fractions: dict[str, float] | None = None,
) -> PrepareResult:
    """Write manifests for titled short videos described by labels.csv (folder format)."""
    root = Path(root)
    dataset = dataset_name(name, "ugc")
    csv_path = require_file(root, "labels.csv", "ugc")
    cols, rows = read_rows(csv_path)
    if "title" not in cols:
        raise ValueError(f"{csv_path}: ugc needs a 'title' column (the conditional query); "
                         f"found {cols}")
    primaries, dyads = plutchik_names()
    has_plutchik = "plutchik" in cols
    for line, row in rows:
        p = row.get("plutchik", "").strip().lower()
        if p and p not in primaries:
            raise ValueError(f"{csv_path}:{line}: field 'plutchik': {p!r} is not one of "
                             f"{sorted(primaries)}")
        i = row.get("plutchik_intensity", "").strip().lower()
        if i and i not in INTENSITY:
            raise ValueError(f"{csv_path}:{line}: field 'plutchik_intensity': {i!r} is not "
                             "low / basic / high (or 1 / 2 / 3)")
        for d in (x.strip().lower() for x in row.get("plutchik_dyads", "").split(";")):
            if d and d not in dyads:
                raise ValueError(f"{csv_path}:{line}: field 'plutchik_dyads': {d!r} is not a "
                                 f"dyad in plutchik.toml ({', '.join(sorted(dyads))})")
    clips, missing, classes = clips_from_csv(root, dataset, keep_missing, split_fractions, csv_path)
    if not clips:
        raise FileNotFoundError(f"ugc: no usable row in {csv_path}"
                                + (f"; first problem: {missing[0][1]}" if missing else ""))
    for c in clips:
        if "plutchik" in c.metadata:
            c.metadata["plutchik"] = str(c.metadata["plutchik"]).lower()
        if "plutchik_intensity" in c.metadata:
            c.metadata["plutchik_intensity"] = INTENSITY[str(c.metadata["plutchik_intensity"]).lower()]
        if "plutchik_dyads" in c.metadata:
            c.metadata["plutchik_dyads"] = [d.strip().lower() for d in
                                            str(c.metadata["plutchik_dyads"]).split(";") if d.strip()]
    splits: dict[str, list] = {}
    for c in clips:
        splits.setdefault(c.split, []).append(c)
    info = {
        "classes": classes, **task_info(classes, clips),
        "group_by": "speaker" if any(c.speaker for c in clips) else "id",
        "label_derived": ["plutchik", "plutchik_intensity", "plutchik_dyads"] if has_plutchik else [],
        "untitled": sum(c.title is None for c in clips), "conditioning": "title",
    }
    return write_result(dataset, root, Path(out), splits, missing, info)
