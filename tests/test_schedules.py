import math

import pytest

from lightning_compress.core.schedules import sparsity_at


@pytest.mark.parametrize("t", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_cubic_is_zhu_gupta(t):
    s_i, s_f = 0.05, 0.9
    assert sparsity_at(t, s_i, s_f, "cubic") == pytest.approx(s_f + (s_i - s_f) * (1 - t) ** 3, abs=1e-12)


def test_linear_and_endpoints():
    assert sparsity_at(0.0, 0.1, 0.9, "linear") == pytest.approx(0.1)
    assert sparsity_at(0.5, 0.1, 0.9, "linear") == pytest.approx(0.5)
    assert sparsity_at(1.0, 0.1, 0.9, "cubic") == pytest.approx(0.9)


def test_holds_after_the_ramp_and_before_it():
    assert sparsity_at(3.0, 0.0, 0.8) == pytest.approx(0.8)
    assert sparsity_at(-1.0, 0.2, 0.8) == pytest.approx(0.2)


def test_cubic_is_monotone_and_front_loaded():
    values = [sparsity_at(i / 100, 0.0, 0.9) for i in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[50] > sparsity_at(0.5, 0.0, 0.9, "linear")


def test_bad_schedule_and_nan():
    with pytest.raises(ValueError, match=r"`schedule` must be one of \('cubic', 'linear'\), got 'exp'"):
        sparsity_at(0.5, 0.0, 0.9, "exp")
    with pytest.raises(ValueError, match="NaN"):
        sparsity_at(math.nan, 0.0, 0.9)
