"""Learning-rate schedules shared by every trainer: constant, cosine to 0, linear warm-up."""

from __future__ import annotations

import math

import pytest

from rcl_dist.train.schedule import lr_factor


def test_constant_cosine_and_warmup():
    assert [lr_factor("constant", s, 10) for s in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert [lr_factor("cosine", s, 100, warmup=4) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_factor("cosine", 4 + 48, 100, warmup=4) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor("constant", 2, 100, warmup=4) == 0.5
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor("linear", 1, 10)
