"""Training must not depend on the process's global autograd mode (extractors may change it)."""

from __future__ import annotations

import torch

from fusion.train import fit
from tests.fusion.conftest import write_feature_set


def test_fit_trains_even_if_grad_was_switched_off_globally(tmp_path):
    key = write_feature_set(tmp_path, n=120, n_groups=12)
    prev = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        res = fit(tmp_path, "synth", "early", seeds=1, epochs=3, runs_dir=tmp_path / "runs", key=key)
    finally:
        torch.set_grad_enabled(prev)
    assert res.metrics["n_test"] > 0


def test_loading_a_model_stage_leaves_grad_mode_alone(tmp_path):
    """An encoder's load() once switched autograd off process-wide, which broke every later
    fit in the same process (predict, tests that extract then fit)."""
    from pipeline.stages.audio import HfAudio
    from tests.helpers_tiny_models import save_wav2vec2

    model_dir = save_wav2vec2(tmp_path / "w2v")
    stage = HfAudio({"model": str(model_dir)})
    stage.ensure_loaded()
    assert torch.is_grad_enabled()
