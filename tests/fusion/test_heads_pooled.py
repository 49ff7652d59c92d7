"""The pooled-vector path of the sequence heads (issue 15): a sequence head also reads each
present modality's pooled vector (a global token and a residual pooled path), so it can never
know less than early fusion. Guarded on a set where only the pooled vectors carry the label."""

from __future__ import annotations

import pytest
import torch

from fusion.heads import build_head
from fusion.heads.base import POOLED_MODES
from tests.fusion.test_heads import accuracy, fit, make_batch, make_spec, one_thread  # noqa: F401

SEQ_HEADS = ("hybrid", "cquery", "cfnsr", "mult")
SPEC = make_spec(("audio", "text"), cond=False)  # two sequence modalities, nothing else


def pooled_only(n: int, g: torch.Generator, n_classes: int = 3) -> tuple[dict, torch.Tensor]:
    """The class is in the audio pooled vector only (a class-mean shift); every sequence, and the
    text pooled vector, is noise independent of the label."""
    y = torch.randint(0, n_classes, (n,), generator=g)
    batch = make_batch(SPEC, n, g)
    mu = 2.0 * torch.randn(n_classes, batch["audio"]["pooled"].shape[1],
                           generator=torch.Generator().manual_seed(5))
    batch["audio"]["pooled"] = batch["audio"]["pooled"] + mu[y]
    return batch, y


def trained_accuracy(name: str, **opts) -> float:
    g = torch.Generator().manual_seed(11)
    train, y_train = pooled_only(384, g)
    test, y_test = pooled_only(256, g)
    torch.manual_seed(0)
    # the head's own pooled path, without the linear path every head also has by default
    # (which alone would learn this task: tests/fusion/test_heads_linear.py)
    head = build_head(name, SPEC, 3, hidden=32, dropout=0.1, linear="off", **opts)
    fit(head, train, y_train)
    return accuracy(head, test, y_test)


@pytest.mark.parametrize("name", SEQ_HEADS)
def test_sequence_head_learns_a_label_only_the_pooled_vector_carries(name):
    assert trained_accuracy(name) >= 0.85  # chance is 1/3


@pytest.mark.parametrize("mode", ["token", "residual"])
def test_either_pooled_path_alone_carries_it(mode):
    assert trained_accuracy("hybrid", pooled=mode) >= 0.8


@pytest.mark.parametrize("name", SEQ_HEADS)
def test_without_the_pooled_path_the_label_is_out_of_reach(name):
    """The control: reading sequences only (the heads before issue 15) stays near chance, so the
    tests above measure the pooled path and not a leak."""
    assert trained_accuracy(name, pooled="none") < 0.5


def test_pooled_option_is_checked():
    assert POOLED_MODES == ("both", "token", "residual", "none")
    for name in SEQ_HEADS:
        with pytest.raises(ValueError, match="pooled must be one of"):
            build_head(name, SPEC, 3, pooled="sometimes")
