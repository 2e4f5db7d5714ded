"""IdleBackoff: idle polling loops slow down while they find nothing, and snap back."""

from __future__ import annotations

import pytest

from serve_app.gateway.idle import IdleBackoff


def test_empty_polls_double_the_wait_up_to_the_ceiling():
    wait = IdleBackoff(1.0, 15.0)
    assert [wait.next(0) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_finding_work_returns_to_the_base_period():
    wait = IdleBackoff(1.0, 15.0)
    for _ in range(5):
        wait.next(0)
    assert wait.next(3) == 1.0
    assert wait.next(0) == 1.0  # and grows again from there
    assert wait.next(0) == 2.0


def test_reset_returns_to_the_base_period():
    wait = IdleBackoff(0.5, 8.0)
    for _ in range(5):
        wait.next(0)
    wait.reset()
    assert wait.next(0) == 0.5


@pytest.mark.parametrize("base, ceiling, factor", [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_nonsense_settings_are_refused(base, ceiling, factor):
    with pytest.raises(ValueError):
        IdleBackoff(base, ceiling, factor)
