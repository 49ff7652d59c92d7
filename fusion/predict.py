"""Apply a trained run to clips of a feature set: class probabilities and modality shares.

Reads a run folder (config.toml, model.safetensors, norm.safetensors) and a feature set
through the cache contract only — the same door training uses. `mmemo predict` first extracts
the new video into a small feature set (pipeline side), then calls `predict_set`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fusion.data import COND, open_set
from fusion.heads import build_saved_head
from fusion.normalise import apply_stats, per_speaker


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(config, model state, normalisation stats, model metadata) of a run folder."""
    run_dir = Path(run_dir)
    for f in ("config.toml", "model.safetensors", "norm.safetensors"):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"{run_dir} is not a complete run: {f} is missing")
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    with safe_open(str(run_dir / "model.safetensors"), "pt") as s:
        meta = dict(s.metadata() or {})
    return cfg, load_file(str(run_dir / "model.safetensors")), load_file(str(run_dir / "norm.safetensors")), meta


# A clip whose standardised pooled vector of a modality has a root mean square above this lies
# far outside the training rows: those have a mean square of 1 by construction (each feature has
# mean 0 and variance 1 over them; the demo's training rows: 0.95 median, 2.1 at most), so the
# head's probabilities for such a clip are an extrapolation, however confident they look.
FAR_RMS_Z = 4.0


def rms_z(batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Per modality, each row's root mean square of its standardised pooled vector (NaN where
    the modality is absent): about 1 for rows like the training rows."""
    out = {}
    for m, d in batch.items():
        if "pooled" not in d:
            continue
        z = d["pooled"].to(torch.float64)
        r = z.square().mean(-1).sqrt().numpy() if z.shape[-1] else np.zeros(len(z))
        out[m] = np.where(d["present"].numpy().astype(bool), r, np.nan)
    return out


def predict_set(run_dir: Path, cache_root: Path, key: str, rows: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per clip: probabilities per class (a regression run: {target: predicted value}), each
    present modality's share of the decision, and how far each modality lies from the
    training rows; `task` says which of the two the run is.

    A modality's share is how much the top class's probability drops when that modality is
    marked absent (the heads treat absence exactly like missing data), normalised to sum to 1
    over the present modalities. Its distance is `rms_z` (None where absent); above FAR_RMS_Z
    the clip is far outside what the run was trained on.
    """
    cfg, state, stats, meta = load_run(run_dir)
    classes = json.loads(meta.get("classes", "[]"))
    mods = list(cfg["modalities"])
    fs = open_set(cache_root, key=key)
    rows = np.flatnonzero(fs.complete) if rows is None else np.asarray(rows)
    spec = fs.spec(mods)
    n_out = len(classes) if classes else 1
    head = build_saved_head(cfg["fusion"], spec, n_out, cfg.get("head_options") or {}, state)
    head.eval()
    data = fs.load(mods, rows)
    if cfg.get("normalise", "global") == "speaker":  # as at fit time: each speaker's own scale
        per_speaker(data, fs.speakers[rows], skip=(COND,))
    batch = {m: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()} for m, d in data.items()}
    batch = apply_stats(batch, stats)  # absent rows and padding stay exactly zero

    def probs(b: dict) -> torch.Tensor:
        with torch.no_grad():
            out = head(b).logits
        return torch.softmax(out, -1) if n_out > 1 else out

    base = probs(batch)
    # only modalities the run standardised (a pooled vector left raw has no scale to compare)
    far = {m: v for m, v in rms_z(batch).items() if f"{m}.pooled.mean" in stats}
    results = []
    top = base.argmax(-1) if n_out > 1 else None
    drops: dict[str, torch.Tensor] = {}
    for m in mods:
        masked = {k: dict(v) for k, v in batch.items()}
        masked[m]["present"] = torch.zeros_like(masked[m]["present"])
        p = probs(masked)
        drops[m] = (base.gather(1, top[:, None])[:, 0] - p.gather(1, top[:, None])[:, 0]) if n_out > 1 else (base - p).abs()[:, 0]
    for i, r in enumerate(rows):
        present = {m: bool(batch[m]["present"][i]) for m in mods}
        raw = {m: max(0.0, float(drops[m][i])) if present[m] else 0.0 for m in mods}
        total = sum(raw.values())
        shares = {m: {"present": present[m], "share": (raw[m] / total) if total > 0 else 0.0} for m in mods}
        if n_out > 1:
            pr = {c: float(base[i, j]) for j, c in enumerate(classes)}
        else:  # a regression run: its one output is the target's value
            pr = {(classes[0] if classes else "score"): float(base[i, 0])}
        dist = {m: (None if np.isnan(v[i]) else float(v[i])) for m, v in far.items()}
        results.append({"id": fs.ids[r], "task": "classification" if n_out > 1 else "regression",
                        "probs": pr, "shares": shares, "rms_z": dist})
    return results
