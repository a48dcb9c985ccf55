import math

import numpy as np
import pytest

from medqm.label.quality import (
    DEFAULT_MAP,
    QualityMap,
    diagnostic_loss,
    likelihood_ratio,
    quality_to_loss,
)


def test_readable_anchor_points():
    assert DEFAULT_MAP(0.0) == pytest.approx(0.9)
    assert DEFAULT_MAP(math.log(2)) == pytest.approx(0.5)  # correct answer half as likely
    assert DEFAULT_MAP(2 * math.log(2)) == pytest.approx(0.1)  # a quarter as likely
    assert likelihood_ratio(0.5) == pytest.approx(2.0)


def test_monotone_bounded_and_stable():
    d = np.linspace(-50, 50, 2001)
    q = DEFAULT_MAP(d)
    assert np.all(np.diff(q) <= 0) and np.all(np.diff(q)[np.abs(d[1:]) < 5] < 0)
    assert q.min() >= 0 and q.max() <= 1 and np.isfinite(q).all()
    assert DEFAULT_MAP(1e6) == 0.0 and DEFAULT_MAP(-1e6) == 1.0


def test_inverse_round_trip():
    m = QualityMap(center=1.0, scale=0.5)
    d = np.linspace(-3, 5, 50)
    np.testing.assert_allclose(m.inverse(m(d)), d, atol=1e-9)
    assert quality_to_loss(0.9) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        quality_to_loss(1.5)
    with pytest.raises(ValueError):
        QualityMap(scale=0)


def test_diagnostic_loss_is_mean_nll_difference():
    assert diagnostic_loss([2.0, 3.0], [1.0, 1.0]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        diagnostic_loss([1.0], [1.0, 2.0])
