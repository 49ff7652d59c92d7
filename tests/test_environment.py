"""The install must stay free of packages that do not import on these CPU machines."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_cuda_linked_torch_extras_are_not_installed():
    # torchvision/torchaudio/torchcodec install but fail to import here, and a broken one
    # breaks transformers and sentence-transformers; mmemo must not depend on them.
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed; remove it (see README)"


def test_torch_is_the_pinned_cpu_build():
    import torch

    assert torch.__version__.startswith("2.13."), torch.__version__


def test_transformers_and_sentence_transformers_import():
    # the failure mode of a broken torchvision is an ImportError deep inside these
    code = "import transformers, sentence_transformers; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_cli_help_is_fast_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from cli import app; sys.argv=['mmemo','--help']; app()"],
        capture_output=True, text=True, timeout=60,
    )
    for cmd in ("sample", "prepare", "extract", "fit", "ablate", "report", "predict", "cache", "import", "export"):
        assert cmd in out.stdout, f"'{cmd}' missing from mmemo --help"
