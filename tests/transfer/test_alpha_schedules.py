"""Schedules of the source/target mixing weight alpha at progress 0, 1/2 and 1."""

from __future__ import annotations

import pytest

from mtl.transfer.alpha import SCHEDULES, alpha_at


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", (0.8, 0.8, 0.8)),
        ("linear", (0.8, 0.5, 0.2)),
        ("cosine", (0.8, 0.5, 0.2)),
        ("step", (0.8, 0.2, 0.2)),  # default milestone 0.5: switched at 0.5
    ],
)
def test_alpha_at_0_half_1(schedule: str, expected: tuple[float, float, float]) -> None:
    got = tuple(alpha_at(schedule, p, start=0.8, end=0.2) for p in (0.0, 0.5, 1.0))
    assert got == pytest.approx(expected)


def test_cosine_is_flat_at_the_ends_and_between_start_and_end() -> None:
    a = [alpha_at("cosine", p / 100, 1.0, 0.0) for p in range(101)]
    assert all(x >= y for x, y in zip(a, a[1:]))
    assert a[1] > 0.999 and a[99] < 0.001
    assert alpha_at("cosine", 0.25, 1.0, 0.0) == pytest.approx(0.5 + 0.5 * 2**-0.5)


def test_step_milestones() -> None:
    ms = [0.25, 0.75]
    assert alpha_at("step", 0.2, 1.0, 0.0, milestones=ms) == 1.0
    assert alpha_at("step", 0.25, 1.0, 0.0, milestones=ms) == 0.5
    assert alpha_at("step", 0.5, 1.0, 0.0, milestones=ms) == 0.5
    assert alpha_at("step", 0.75, 1.0, 0.0, milestones=ms) == 0.0
    assert alpha_at("step", 0.49, 0.8, 0.2) == 0.8


def test_progress_is_clamped() -> None:
    for s in SCHEDULES:
        assert alpha_at(s, -0.5, 0.8, 0.2) == alpha_at(s, 0.0, 0.8, 0.2)
        assert alpha_at(s, 1.5, 0.8, 0.2) == alpha_at(s, 1.0, 0.8, 0.2)


def test_errors_name_config_key() -> None:
    with pytest.raises(ValueError, match=r"alpha\.schedule must be one of"):
        alpha_at("exp", 0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"alpha\.start must be in \[0, 1\]"):
        alpha_at("linear", 0.5, 1.5, 0.0)
    with pytest.raises(ValueError, match=r"alpha\.milestones must be increasing"):
        alpha_at("step", 0.5, 1.0, 0.0, milestones=[0.7, 0.3])
    with pytest.raises(ValueError, match=r"alpha\.milestones only applies"):
        alpha_at("linear", 0.5, 1.0, 0.0, milestones=[0.5])
    with pytest.raises(ValueError, match="NaN"):
        alpha_at("linear", float("nan"), 1.0, 0.0)
