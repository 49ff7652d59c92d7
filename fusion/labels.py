"""Shared label spaces: Plutchik's wheel across datasets, and named fit-time label sets.

Pure Python (tomllib only, no pipeline imports). The facts are data files beside the recipes
that produce the labels: ``pipeline/recipes/plutchik.toml`` (the wheel and every recipe's
mapping, each choice commented there) and ``pipeline/recipes/labelsets.toml`` (``iemocap4``,
``iemocap6``). Both packages are installed side by side, so the files are found relative to
this one.

    >>> space = load_plutchik()
    >>> space.classes[:3], space.soft_targets("avamerg", ["contempt"])["contempt"][5:7]
    (['joy', 'trust', 'fear'], [0.5, 0.5])
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "recipes"
PLUTCHIK_FILE = DATA_DIR / "plutchik.toml"
LABELSETS_FILE = DATA_DIR / "labelsets.toml"
NEUTRAL = "neutral"
LEVELS = ("low", "basic", "high")


@dataclass
class Plutchik:
    """The wheel (8 primaries + neutral), intensity words, dyads, per-dataset mappings."""

    primaries: list[str]
    intensity: dict[str, list[str]]  # primary -> [low, basic, high]
    dyads: dict[str, list[str]]  # dyad -> [primary, primary]
    maps: dict[str, dict[str, object]]  # dataset -> label -> target
    unmapped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return [*self.primaries, NEUTRAL]

    def vector(self, target: object) -> list[float]:
        """The soft target (len 9, sums to 1) of a target name or an inline weight table."""
        out = [0.0] * len(self.classes)
        if isinstance(target, dict):
            total = sum(float(v) for v in target.values())
            for k, w in target.items():
                if k not in self.classes:
                    raise ValueError(f"plutchik weight on {k!r}, not one of {self.classes}")
                out[self.classes.index(k)] += float(w) / total
            return out
        name = str(target).lower()
        if name in self.classes:
            out[self.classes.index(name)] = 1.0
        elif name in self.dyads:
            for p in self.dyads[name]:
                out[self.classes.index(p)] += 1.0 / len(self.dyads[name])
        else:
            for p, words in self.intensity.items():
                if name in words:
                    out[self.classes.index(p)] = 1.0
                    return out
            raise ValueError(f"{target!r} is not a primary, an intensity word, a dyad or neutral")
        return out

    def intensity_of(self, target: object) -> str | None:
        """low / basic / high for an intensity word or primary; None for dyads and tables."""
        name = str(target).lower() if not isinstance(target, dict) else ""
        for words in self.intensity.values():
            if name in words:
                return LEVELS[words.index(name)]
        return None

    def target_of(self, dataset: str, label: str) -> object | None:
        """The mapping target of one of `dataset`'s labels (case-insensitive): a class name, an
        intensity word, a dyad or a weight table; None when plutchik.toml lists it as unmapped.
        A dataset without a table, or a label the table says nothing about, is a KeyError: the
        mapping file must say what happens to every label."""
        if dataset not in self.maps:
            raise KeyError(f"plutchik.toml has no [map.{dataset}] (known: {sorted(self.maps)})")
        key = str(label).lower()
        for k, v in self.maps[dataset].items():
            if k.lower() == key:
                return v
        if key in {u.lower() for u in self.unmapped.get(dataset, [])}:
            return None
        raise KeyError(f"plutchik.toml [map.{dataset}] does not say where {label!r} goes")

    def soft_targets(self, dataset: str, class_names: list[str]) -> dict[str, list[float] | None]:
        """Class name -> soft target in `classes` order, None for a label with no place
        (errors as `target_of`)."""
        out: dict[str, list[float] | None] = {}
        for c in class_names:
            t = self.target_of(dataset, c)
            out[c] = None if t is None else self.vector(t)
        return out


def load_plutchik(path: str | Path | None = None) -> Plutchik:
    """Read and check plutchik.toml: dyads name primaries, every mapping target resolves."""
    raw = tomllib.loads(Path(path or PLUTCHIK_FILE).read_text(encoding="utf-8"))
    maps: dict[str, dict[str, object]] = {}
    unmapped: dict[str, list[str]] = {}
    for ds, table in raw.get("map", {}).items():
        table = dict(table)
        unmapped[ds] = list(table.pop("unmapped", []))
        maps[ds] = table
    space = Plutchik(primaries=list(raw["primaries"]), intensity=dict(raw["intensity"]),
                     dyads=dict(raw["dyads"]), maps=maps, unmapped=unmapped)
    if len(space.primaries) != 8 or set(space.intensity) != set(space.primaries):
        raise ValueError("plutchik.toml: need the 8 primaries, each with [low, basic, high]")
    for name, pair in space.dyads.items():
        if len(pair) != 2 or not set(pair) <= set(space.primaries):
            raise ValueError(f"plutchik.toml: dyad {name} must name two primaries, got {pair}")
    for ds, table in maps.items():
        for label, target in table.items():
            try:
                space.vector(target)
            except ValueError as e:
                raise ValueError(f"plutchik.toml [map.{ds}] {label}: {e}") from None
    return space


@dataclass
class LabelSet:
    name: str
    dataset: str
    classes: list[str]
    mapping: dict[str, str]

    def index(self, raw: str | None) -> int | None:
        """The class index of a raw label under this set, None when the set leaves it out."""
        cls = self.mapping.get(raw) if raw is not None else None
        return self.classes.index(cls) if cls is not None else None


def load_label_set(name: str, path: str | Path | None = None) -> LabelSet:
    """A named label set (``iemocap4``, ``iemocap6``) from labelsets.toml."""
    raw = tomllib.loads(Path(path or LABELSETS_FILE).read_text(encoding="utf-8"))
    if name not in raw:
        raise KeyError(f"unknown label set {name!r} (known: {', '.join(sorted(raw))})")
    t = raw[name]
    classes, mapping = list(t["classes"]), dict(t["map"])
    bad = set(mapping.values()) - set(classes)
    if bad:
        raise ValueError(f"labelsets.toml [{name}]: map targets {sorted(bad)} not in classes")
    return LabelSet(name=name, dataset=t["dataset"], classes=classes, mapping=mapping)
