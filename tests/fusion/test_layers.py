"""Layer-wise features in fusion (fusion/layers.py): `layers` arrays are read, standardised and
weighted (learned / mean / last / off); a learned weighting is reported in metrics.json; sets
without `layers` (every set written before them) load and train exactly as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from fusion.data import open_set
from fusion.heads import build_head
from fusion.layers import LayerMixedHead, layer_mode
from fusion.normalise import apply_stats, fit_stats, to_tensors
from fusion.train import fit
from pipeline import cacheformat as cf
from tests.fusion.conftest import write_feature_set

N_LAYERS, LAYER_DIM, SIGNAL_LAYER = 4, 6, 1


def add_layers(root, key: str, m: str = "audio", dim: int = LAYER_DIM, seed: int = 1) -> None:
    """Give modality m of a written set a `layers` array [N, N_LAYERS, dim] (declared in its
    attrs as the cache contract says) where only hidden state SIGNAL_LAYER carries the class;
    the others are noise on a large, different offset per state (what real encoders look like)."""
    g = zarr.open_group(str(cf.set_dir(root, key)), mode="r+")
    attrs = dict(g.attrs["mmemo"])
    label = np.asarray(g["label"][:])
    present = np.asarray(g[cf.present(m)][:])
    n, unit = len(label), int(attrs["unit_size"])
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((int(label.max()) + 1, dim)) * 3.0
    x = rng.standard_normal((n, N_LAYERS, dim)) + 20.0 * np.arange(N_LAYERS)[None, :, None]
    x[:, SIGNAL_LAYER] += cent[label]
    x *= present[:, None, None]
    arr = g.create_array(cf.layer_stack(m), shape=x.shape, dtype="float16", chunks=(unit, N_LAYERS, dim))
    arr[:] = x.astype(np.float16)
    attrs["modalities"] = dict(attrs["modalities"])
    attrs["modalities"][m] = {**attrs["modalities"][m], "n_layers": N_LAYERS, "layer_dim": dim}
    g.attrs["mmemo"] = attrs


@pytest.fixture
def layered(tmp_path):
    # audio carries no class signal in pooled/seq: only its layers (state 1) do
    mods = {"audio": (6, LAYER_DIM, 8, 0.0), "text": (8, 8, 8, 0.0)}
    key = write_feature_set(tmp_path, modalities=mods, n=240, unit_size=40)
    add_layers(tmp_path, key)
    return tmp_path, key


def test_layers_are_declared_read_and_standardised(layered):
    root, key = layered
    fs = open_set(root, key=key)
    spec = fs.spec(["audio", "text"])
    assert (spec["audio"].n_layers, spec["audio"].layer_dim) == (N_LAYERS, LAYER_DIM)
    assert not spec["text"].has_layers
    fs.check(["audio", "text"])  # the shape check knows the layers array
    rows = np.flatnonzero(fs.complete)
    data = fs.load(["audio", "text"], rows)
    assert data["audio"]["layers"].shape == (len(rows), N_LAYERS, LAYER_DIM) and "layers" not in data["text"]
    assert "layers" not in fs.load(["audio"], rows, layers=())["audio"]
    cached = cf.open_set(root, key=key)
    np.testing.assert_array_equal(cached.layers("audio"), data["audio"]["layers"])
    assert cached.modality("audio")["layers"].shape == (len(rows), N_LAYERS, LAYER_DIM)
    assert cached.to_xarray(["audio"])["audio_layers"].dims == ("clip", "audio_layer", "audio_layer_feature")
    # standardised per hidden state and feature on the present training rows; absent rows zero
    t = to_tensors(data)
    pres = t["audio"]["present"]
    scaled = apply_stats(t, fit_stats(t, np.arange(len(rows))))["audio"]["layers"]
    assert torch.allclose(scaled[pres].mean(0), torch.zeros(N_LAYERS, LAYER_DIM), atol=1e-3)
    assert torch.allclose(scaled[pres].std(0, unbiased=False), torch.ones(N_LAYERS, LAYER_DIM), atol=1e-2)
    assert (scaled[~pres] == 0).all()


def test_modes_and_their_errors(layered):
    root, key = layered
    spec = open_set(root, key=key).spec(["audio", "text"])
    assert layer_mode(spec, {}) == "learned"  # on by default when layers are present
    plain = open_set(root, key=key).spec(["text"])
    assert layer_mode(plain, {}) == "off"
    with pytest.raises(ValueError, match="expected one of learned, mean, last, off"):
        layer_mode(spec, {"layers": "first"})
    with pytest.raises(ValueError, match="none of the modalities.*per-layer"):
        build_head("early", plain, 3, layers="learned")
    head = build_head("early", spec, 3)
    assert isinstance(head, LayerMixedHead) and head.layer_inputs == ("audio",)
    assert not isinstance(build_head("early", spec, 3, layers="off"), LayerMixedHead)
    # hybrid's own integer `layers` (block depth) still reaches it; the weighting has its alias
    hy = build_head("hybrid", spec, 3, layers=2, layer_mix="mean")
    assert isinstance(hy, LayerMixedHead) and hy.mode == "mean" and len(hy.inner.inner.encoder["audio"]) == 2  # inner: the linear path's wrapper
    assert build_head("hybrid", spec, 3, layers="last").mode == "last"
    with pytest.raises(ValueError, match="disagree"):
        build_head("early", spec, 3, layers="last", layer_mix="mean")
    b = 5
    batch = {"audio": {"pooled": torch.zeros(b, LAYER_DIM), "present": torch.tensor([1, 1, 0, 1, 1]).bool(),
                       "layers": torch.arange(N_LAYERS, dtype=torch.float32)[None, :, None].expand(b, N_LAYERS, LAYER_DIM)},
             "text": {"pooled": torch.zeros(b, 8), "present": torch.ones(b, dtype=torch.bool)}}
    for mode, want in (("last", N_LAYERS - 1.0), ("mean", (N_LAYERS - 1) / 2), ("learned", (N_LAYERS - 1) / 2)):
        h = build_head("early", spec, 3, layers=mode)
        mixed = h.mix_batch(batch)["audio"]["pooled"]
        assert torch.allclose(mixed[[0, 1, 3, 4]], torch.full((4, LAYER_DIM), want)), mode
        assert (mixed[2] == 0).all()  # absent row stays zero
        assert h(batch).logits.shape == (b, 3)
    # a modality whose pooled vector is wider than a layer gets the mixture appended
    wide = open_set(root, key=key).spec(["audio"])
    wide = type(wide)(modalities=(type(wide["audio"])(name="audio", pooled_dim=9, n_layers=N_LAYERS,
                                                       layer_dim=LAYER_DIM),))
    h = build_head("early", wide, 3, layers="mean")
    wb = {"audio": {**batch["audio"], "pooled": torch.ones(b, 9)}}
    assert h.mix_batch(wb)["audio"]["pooled"].shape == (b, 9 + LAYER_DIM)


def test_learned_weights_find_the_informative_layer_and_reach_metrics_json(layered, tmp_path):
    root, key = layered
    res = fit(root, None, "early", ["audio", "text"], key=key, seeds=2, epochs=30, patience=30,
              runs_dir=tmp_path / "runs", name="lw", lr=1e-2, modality_dropout=0.0,
              head_options={"layers": "learned"})
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert m["layer_mode"] == "learned"
    lw = m["layer_weights"]["audio"]
    assert len(lw["mean"]) == N_LAYERS and abs(sum(lw["mean"]) - 1) < 1e-3
    assert len(lw["runs"]) == 2  # one per (fold, seed)
    # the class lives in hidden state SIGNAL_LAYER only: the weighting moves towards it
    assert lw["best_layer"] == SIGNAL_LAYER and lw["mean"][SIGNAL_LAYER] > 1 / N_LAYERS
    # pooled and seq carry nothing (3 classes: chance about 0.33): this is the layers' doing
    assert m["accuracy"] > 0.5
    off = fit(root, None, "early", ["audio", "text"], key=key, seeds=1, epochs=15, lr=1e-2,
              runs_dir=tmp_path / "runs", name="off", modality_dropout=0.0,
              head_options={"layers": "off"})
    assert "layer_weights" not in off.metrics and off.metrics["accuracy"] < m["accuracy"] - 0.1
    # predict rebuilds the same wrapped head from config.toml and the saved state
    from fusion.predict import predict_set

    out = predict_set(res.run_dir, root, key)
    assert len(out) == len(np.flatnonzero(open_set(root, key=key).complete))


def test_sets_without_layers_still_load_and_train(tmp_path):
    key = write_feature_set(tmp_path, n=120, unit_size=40)  # written as before layers existed
    fs = open_set(tmp_path, key=key)
    attrs = fs.meta.raw["modalities"]["audio"]
    assert "n_layers" not in attrs and not fs.meta.modality("audio").has_layers
    assert not fs.spec("all")["audio"].has_layers
    data = fs.load("all", np.flatnonzero(fs.complete))
    assert all("layers" not in d for d in data.values())
    res = fit(tmp_path, None, "early", "all", key=key, seeds=1, epochs=3, runs_dir=tmp_path / "runs")
    assert "layer_weights" not in res.metrics and "layer_mode" not in res.metrics
    with pytest.raises(KeyError, match="no layers array"):
        cf.open_set(tmp_path, key=key).layers("audio")
