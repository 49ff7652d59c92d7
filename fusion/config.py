"""FitConfig: every training setting of a fit, in one place.

`fit(cache, dataset, fusion, modalities, cfg)` trains with it, a run's `config.toml` records it
(beside what the run was: dataset, head, modalities, feature set, the batch size and learning
rate actually used), `FitConfig.from_toml` reads it back, and an ablation reuses a finished cell
only when `FitConfig.from_toml(cell / "config.toml") == cfg`. Two configs are equal when they
would record the same settings; `device` and `threads` change speed, not results, so they do
not count. Adding a training option is adding a field here (and reading it in fusion/train.py).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The keys under which config.toml records the asked-for learning rate and batch size ("lr" and
# "batch_size" hold the values used, after the automatic batch size scaled them).
LR_KEY, BATCH_KEY = "lr_base", "batch_size_asked"
# config.toml's key order (as runs have always written it); keys not listed follow
RECORD_ORDER = ("dataset", "fusion", "modalities", "seeds", "split", "folds", "group_by", "epochs",
                "batch_size", "lr", BATCH_KEY, LR_KEY, "patience", "modality_dropout",
                "class_weight", "device", "target", "preset", "weight_decay", "val_fraction",
                "aux_weight", "head_options", "feature_set", "cache_root")


NORMALISE = ("global", "speaker")


@dataclass(eq=False)
class FitConfig:
    """The settings of a fit. `seeds` is a count (seeds 0..n-1) or a list of seeds."""

    seeds: int | list[int] | tuple[int, ...] = 3
    split: str = "official"  # "official" | "kfold"
    folds: int = 5
    group_by: str | None = None  # None: the set's grouping; "none": row-level
    val_fraction: float = 0.15  # validation share carved from training groups when needed
    target: str = "label"  # "label" (classes) or a regression target of the set
    epochs: int = 40
    patience: int = 5
    batch_size: int | None = None  # None: automatic (see train.auto_batch)
    lr: float = 2e-3  # at batch 128; scaled with the automatic batch size
    weight_decay: float = 1e-2
    modality_dropout: float = 0.1
    class_weight: bool = True
    aux_weight: float = 0.0  # loss weight of a head's per-branch (aux) logits
    # start a registered head's linear path from the fold's fitted linear probe, scored on
    # validation as epoch 0 (fusion/heads/linear.py); False: from zero
    warm_start: bool = True
    # a warm-started head leaves its probe (epoch 0) only for an epoch whose validation gain
    # on the selection metric has a paired permutation p-value at most this (train.departure_p);
    # 1.0: any gain, as before this setting existed
    depart_p: float = 0.05
    # "speaker": each speaker's rows first standardised by that speaker's own statistics
    # (fusion.normalise.per_speaker; the set must be grouped by speaker); "global": not
    normalise: str = "global"
    labels: str | None = None  # fit-time label set: iemocap4 | iemocap6 | plutchik
    select_metric: str | None = None  # early stopping / selection (None: macro F1, or MAE)
    protocol: str | None = None  # the protocol (fusion/protocols.py) that set the above
    head_options: dict = field(default_factory=dict)
    device: str = "cpu"  # not compared: speed only
    threads: int | None = None  # not compared: speed only (None: train.default_threads)

    def __post_init__(self) -> None:
        if isinstance(self.seeds, int):
            self.seeds = list(range(self.seeds))
        else:
            self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("seeds must be a positive count or a non-empty list")
        self.head_options = dict(self.head_options or {})
        if not 0.0 < self.depart_p <= 1.0:
            raise ValueError(f"depart_p must be in (0, 1], not {self.depart_p!r}")
        if self.normalise not in NORMALISE:
            raise ValueError(f"normalise must be one of {', '.join(NORMALISE)}, not {self.normalise!r}")

    def settings(self) -> dict[str, Any]:
        """The settings that decide a fit's result, as config.toml records them."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("device", "threads", "lr", "batch_size")}
        out[LR_KEY] = self.lr
        out[BATCH_KEY] = self.batch_size or "auto"
        return toml_safe(out)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FitConfig):
            return NotImplemented
        return self.settings() == other.settings()

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def differences(self, other: FitConfig) -> dict[str, tuple[Any, Any]]:
        """{setting: (this value, other value)} for every setting that differs."""
        a, b = self.settings(), other.settings()
        return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
                if a.get(k) != b.get(k)}

    def record(self, **run: Any) -> dict[str, Any]:
        """What config.toml holds: `run` (dataset, fusion, modalities, feature set, the batch size
        and lr used, ...) and the settings, with `device`."""
        merged = {**run, **self.settings(), "device": self.device}
        rank = {k: i for i, k in enumerate(RECORD_ORDER)}
        return toml_safe(dict(sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank)))))

    def to_toml(self, path: Path | str, **run: Any) -> None:
        import tomli_w

        Path(path).write_text(tomli_w.dumps(self.record(**run)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], unrecorded_from: FitConfig | None = None) -> FitConfig:
        """A config from a recorded dict; keys that are not settings are ignored.

        A setting missing from `d` is None when its field may be None (config.toml leaves None
        out), `warm_start` False and `depart_p` 1.0 (runs from before they existed), else its
        default. Runs written before lr_base / batch_size_asked were recorded
        take those two from `unrecorded_from` when given (an ablation compares them only where
        recorded), else from the recorded lr / batch size used.
        """
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        kw.pop("lr", None)
        kw.pop("batch_size", None)
        for opt in ("group_by", "threads"):
            kw.setdefault(opt, None)
        # runs written before the linear path's warm start trained without it: an ablation
        # must not take them for cells of today's default
        kw.setdefault("warm_start", False)
        # runs from before the departure test left the probe on any validation gain
        kw.setdefault("depart_p", 1.0)
        if LR_KEY in d:
            kw["lr"] = d[LR_KEY]
        elif unrecorded_from is not None:
            kw["lr"] = unrecorded_from.lr
        elif "lr" in d:
            kw["lr"] = d["lr"]
        if BATCH_KEY in d:
            kw["batch_size"] = None if d[BATCH_KEY] == "auto" else d[BATCH_KEY]
        elif unrecorded_from is not None:
            kw["batch_size"] = unrecorded_from.batch_size
        elif "batch_size" in d:
            kw["batch_size"] = d["batch_size"]
        return cls(**kw)

    @classmethod
    def from_toml(cls, path: Path | str, unrecorded_from: FitConfig | None = None) -> FitConfig:
        """The config a run's config.toml records (see `from_dict`)."""
        return cls.from_dict(tomllib.loads(Path(path).read_text()), unrecorded_from)


def toml_safe(v: Any) -> Any:
    """tomli_w has no None and no Path: drop the former, stringify the latter; tuples -> lists."""
    if isinstance(v, dict):
        return {str(k): toml_safe(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [toml_safe(x) for x in v if x is not None]
    if isinstance(v, Path):
        return str(v)
    return v
