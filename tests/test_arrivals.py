"""Open-model load: a shape's arrival schedule, and the plan that hands arrivals to free users.

The end-to-end check (a slow application, the offered rate held; a cap too small, reported) is in
tests/test_rehearsal.py.
"""

from __future__ import annotations

import math

import pytest

from mailproof.load.arrivals import ArrivalCounts, ArrivalPlan
from mailproof.load.shapes_config import BURST, ShapeConfig, default_max_users


class FakeClock:
    """A clock that moves only when told (a user's sleep moves it to the arrival's due time)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def plan_for(offsets, clock: FakeClock, **kw) -> ArrivalPlan:
    return ArrivalPlan(offsets, max_users=kw.pop("max_users", 2), clock=clock, sleep=clock.sleep, **kw)


# -- the schedule --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate, duration", [(4, 8), (0.5, 10), (7.3, 3), (100, 2)])
def test_a_constant_rate_offers_rate_times_duration_evenly_spaced(rate, duration):
    offsets = ShapeConfig("constant", rate, duration).offsets()
    assert len(offsets) == round(rate * duration)
    gaps = {round(b - a, 6) for a, b in zip(offsets, offsets[1:])}
    assert gaps <= {round(1 / rate, 6)}, gaps
    assert offsets[0] == pytest.approx(0.5 / rate) and offsets[-1] < duration


def test_a_ramp_offers_each_stair_at_its_own_rate():
    config = ShapeConfig("ramp", 8, 20, ramp_steps=4)
    offsets = config.offsets()
    per_stair = [sum(1 for t in offsets if 5 * i <= t < 5 * (i + 1)) for i in range(4)]
    assert per_stair == [10, 20, 30, 40]  # 2, 4, 6, 8 flows/s for 5 s each
    assert [config.rate(t) for t in (0, 4.9, 5, 19.9, 20)] == [2, 2, 4, 8, 0]


def test_a_burst_offers_the_integral_of_its_rate():
    config = ShapeConfig("burst", 10, 100)
    expected = sum((f0 + f1) / 2 * (p1 - p0) for (p0, f0), (p1, f1) in zip(BURST, BURST[1:])) * 10 * 100
    assert abs(len(config.offsets()) - expected) <= 1
    assert config.rate(50) == 10 and config.rate(5) == pytest.approx(1.0)  # plateau, baseline 10 %
    assert config.rate(20) == pytest.approx(5.5)  # halfway up the climb (15 % -> 25 %)


def test_shape_round_trips_and_rejects_what_cannot_run():
    config = ShapeConfig("ramp", 2.5, 30, 3, 7)
    assert ShapeConfig.decode(config.encode()) == config
    assert ShapeConfig("constant", 3, 10).max_users == default_max_users(3) == 30
    assert ShapeConfig("constant", 0.2, 10).max_users == 10  # at least 10
    for bad in (dict(kind="spike"), dict(peak_rate=0), dict(peak_rate=math.inf), dict(duration=0),
                dict(ramp_steps=0), dict(max_users=-1)):
        args = {"kind": "constant", "peak_rate": 1.0, "duration": 5.0, **bad}
        with pytest.raises(ValueError):
            ShapeConfig(**args)
    assert ShapeConfig("constant", 4, 8).tick(7.9) == (40, 40.0) and ShapeConfig("constant", 4, 8).tick(8) is None


# -- the plan ------------------------------------------------------------------------------------


def test_free_users_start_arrivals_on_time_and_a_busy_cap_is_counted():
    clock = FakeClock()
    plan = plan_for([0.5, 1.0, 1.5, 2.0], clock)
    assert plan.claim() == 0.0 and clock.now == 100.5  # slept until it was due
    assert plan.claim() == 0.0 and clock.now == 101.0
    clock.now = 102.25  # both users were busy while 1.5 and 2.0 came due
    assert plan.claim() == pytest.approx(0.75)
    assert plan.claim() == pytest.approx(0.25)
    assert plan.claim() is None  # the schedule is spent
    plan.completed()
    counts = plan.counts()
    assert (counts.cap_hits, counts.not_started, counts.total_started, counts.total_completed) == (2, 0, 4, 1)
    assert counts.offered == [1, 2, 1] and counts.started == [1, 1, 2]
    assert counts.lag_percentile(50) == 0.0 and counts.lag_max == 0.75


def test_arrivals_due_before_the_stop_and_never_started_are_counted_later_ones_not_offered():
    clock = FakeClock()
    plan = plan_for([0.5, 1.0, 1.5, 2.0, 5.0], clock)
    assert plan.claim() == 0.0
    clock.now = 102.2  # the load stops with 1.0, 1.5 and 2.0 due and never claimed
    plan.stop()
    assert plan.claim() is None
    counts = plan.counts()
    assert (counts.total_offered, counts.total_started, counts.not_started) == (4, 1, 3)


def test_workers_share_the_schedule_without_overlap():
    offsets = ShapeConfig("constant", 5, 4).offsets()
    shares = [ArrivalPlan(offsets, max_users=1, index=i, count=3).offsets for i in range(3)]
    assert sorted(t for share in shares for t in share) == offsets
    assert [len(share) for share in shares] == [7, 7, 6]
    with pytest.raises(ValueError, match="index"):
        ArrivalPlan(offsets, max_users=1, index=3, count=3)


def test_counts_merge_second_by_second():
    a = ArrivalCounts(offered=[2, 2], started=[2, 1], completed=[0, 2], cap_hits=1, not_started=0, max_users=3,
                      lag_ms={"0": 2, "40": 1})
    b = ArrivalCounts(offered=[2, 2, 1], started=[2, 2, 1], completed=[1], cap_hits=0, not_started=1, max_users=3,
                      lag_ms={"0": 5})
    a.merge(b)
    assert (a.offered, a.started, a.completed) == ([4, 4, 1], [4, 3, 1], [1, 2])
    assert (a.cap_hits, a.not_started, a.max_users, a.lag_ms) == (1, 1, 6, {"0": 7, "40": 1})
    assert a.lag_percentile(100) == 0.04 and a.lag_percentile(50) == 0.0


def test_an_arrival_a_user_slept_towards_is_not_started_once_the_load_stopped_before_it_was_due():
    clock = FakeClock()
    plan = plan_for([0.5, 2.0], clock)

    def sleep_through_the_stop(seconds: float) -> None:
        plan.stop()  # the load stops while the user sleeps towards its arrival
        clock.sleep(seconds)

    assert plan.claim() == 0.0
    plan.sleep = sleep_through_the_stop
    assert plan.claim() is None
    counts = plan.counts()
    assert (counts.total_offered, counts.total_started, counts.not_started) == (1, 1, 0)

