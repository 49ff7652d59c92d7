"""Peak memory of extracting a long clip and a 4K clip stays bounded.

Each extraction runs `mmemo extract` as the child of a small wrapper process, which reports its
children's peak RSS (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`), so earlier test
subprocesses cannot inflate the number. The bound is relative to a baseline run of one tiny
clip with the same preset (models, libraries and interpreter are the same in both):

    peak(long or 4K) <= peak(baseline) + EXTRA_MIB   and   peak <= ABS_MIB

With the shipped decode limits, decoded media is bounded by max_frames * max_side^2 * 3 bytes
(64 * 960^2 * 3 ≈ 177 MB) + max_duration * 16 kHz * 4 bytes (600 s ≈ 38 MB); EXTRA_MIB leaves
room for the frame decoder's own buffers of 4K frames and the audio features.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.robustness.corpus import (
    CHEAP,
    face_frame,
    good_clips,
    mmemo_cmd,
    voice,
    write_av,
    write_dataset,
    write_long,
)

pytestmark = [pytest.mark.robustness, pytest.mark.slow]

EXTRA_MIB = 250  # above the baseline's peak (measured: +89 long, +76 4K)
ABS_MIB = 1536  # whatever the baseline

# the shipped decode limits (offline preset), eGeMAPS audio, no text model
PRESET = (CHEAP.replace("minilm", "skip").replace("max_side = 480", "max_side = 960")
          .replace("max_duration = 10.0", "max_duration = 600.0"))

_WRAPPER = (
    "import json, resource, subprocess, sys; "
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(json.dumps({'rc': p.returncode, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
    "'tail': (p.stdout + p.stderr)[-1500:]}))"
)


def _peak(tmp: Path, name: str, rows: list[dict], root: Path) -> dict:
    man = tmp / "manifests"
    write_dataset(man, name, root, rows)
    preset = tmp / "mem.toml"
    preset.write_text(PRESET)
    cmd = [*mmemo_cmd(), "extract", "--dataset", name, "--manifests", str(man), "--cache",
           str(tmp / "cache"), "--preset", str(preset), "--strict"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=600)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0, res["tail"]
    res["peak_mib"] = res["maxrss_kib"] / 1024
    return res


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, float]:
    tmp = tmp_path_factory.mktemp("mem")
    root = tmp / "data"
    base = good_clips(root, "base", n=1, with_faces=False)
    write_long(root / "long.mp4", seconds=180.0)
    write_av(root / "uhd.mp4", lambda t: face_frame(3840, 2160, 1, t), seconds=3.0, fps=5,
             size=(3840, 2160), audio=voice(3.0), crf=40)
    row = dict(base[0])
    peaks = {
        "baseline": _peak(tmp, "base", base, root)["peak_mib"],
        "long": _peak(tmp, "long", [{**row, "id": "long", "video": "long.mp4"}], root)["peak_mib"],
        "uhd": _peak(tmp, "uhd", [{**row, "id": "uhd", "video": "uhd.mp4"}], root)["peak_mib"],
    }
    print(f"peak RSS (MiB): {json.dumps({k: round(v) for k, v in peaks.items()})}")
    return peaks


@pytest.mark.parametrize("which", ["long", "uhd"])
def test_peak_rss_is_bounded(which, measured):
    peak, base = measured[which], measured["baseline"]
    assert peak <= base + EXTRA_MIB, f"{which}: peak {peak:.0f} MiB > baseline {base:.0f} + {EXTRA_MIB} MiB"
    assert peak <= ABS_MIB, f"{which}: peak {peak:.0f} MiB > {ABS_MIB} MiB"

