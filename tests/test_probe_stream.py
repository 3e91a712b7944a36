"""The noised-latent probe's pieces (issue 32 item 2; the probe itself: results/ablations/probe_stream)."""
from __future__ import annotations

import numpy as np

from vb_train.toy import probe


def test_normal_quantile_inverts_the_cdf():
    for x in (-2.0, -0.3, 0.0, 1.3, 2.5):
        assert abs(probe._phi_inv(float(probe._phi(x))) - x) < 1e-6


def test_pair_interval_takes_colour_pairs_as_the_unit():
    # 4 rows of pair a/b (all correct), 4 of c/d (all wrong): 2 units, mean 0.5, a wide interval
    correct = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float64)
    lo, hi = probe.pair_interval(correct, ["a/b"] * 4 + ["c/d"] * 4)
    assert lo < -1 and hi > 2            # t with 1 degree of freedom over 2 pair means {1, 0}
    lo, hi = probe.pair_interval(np.array([1, 0, 1, 0.0]), ["a/b", "a/b", "c/d", "c/d"])
    assert lo == hi == 0.5               # every pair at 0.5: no spread
