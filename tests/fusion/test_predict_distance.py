"""How far a clip lies from a run's training rows (fusion.predict.rms_z)."""

from __future__ import annotations

import numpy as np
import torch

from fusion.predict import FAR_RMS_Z, rms_z


def test_rows_standardised_on_themselves_have_a_mean_square_of_one_and_far_rows_stand_out():
    rng = np.random.default_rng(0)
    raw = rng.gamma(2.0, 3.0, size=(500, 40)) * rng.uniform(0.1, 10, size=40)  # skewed, scaled
    z = (raw - raw.mean(0)) / raw.std(0)
    far_row = (raw[:1] * 30 - raw.mean(0)) / raw.std(0)
    pooled = torch.from_numpy(np.vstack([z, far_row, z[:1]]))
    present = torch.ones(len(pooled), dtype=torch.bool)
    present[-1] = False
    got = rms_z({"audio": {"pooled": pooled, "present": present}})["audio"]
    assert abs(np.mean(got[:500] ** 2) - 1.0) < 1e-9  # by construction, whatever the shapes
    assert got[:500].max() < FAR_RMS_Z < got[500]
    assert np.isnan(got[501])  # absent: no distance
