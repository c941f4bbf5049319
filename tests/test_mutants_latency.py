"""Latency histograms, exactly: what benchmarks/mutation.py found no test checking.

Below 2,048 µs an HdrHistogram of 3 significant digits keeps every microsecond, so latencies of
1 to 2 ms come back exactly (in seconds), not only to 0.1 %.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

from mailproof.load.latency import LatencyHistograms


def test_millisecond_latencies_come_back_to_the_microsecond():
    hist = LatencyHistograms()
    for micros in (1000, 1200, 1500, 1800, 2000):
        hist.record("f", micros / 1e6)
    row = hist.summary()["f"]
    assert row.count == 5
    assert (row.p50, row.p90, row.p95, row.p99) == (0.0015, 0.002, 0.002, 0.002)
    assert row.max == 0.002
    assert row.mean == 0.0015


def test_latencies_are_clamped_to_the_histograms_range():
    hist = LatencyHistograms()
    hist.record("fast", -3.0)  # a clock step: recorded as the lowest value, never dropped
    hist.record("fast", 0.0)
    row = hist.summary()["fast"]
    assert row.count == 2
    assert row.max == 1e-6


def test_a_flow_with_no_sample_is_left_out_and_the_flows_after_it_are_kept():
    hist = LatencyHistograms()
    empty = HdrHistogram(1, 3_600_000_000, 3).encode().decode("ascii")
    hist.merge({"a_empty": empty})  # a worker that ran the flow and measured nothing
    hist.record("b", 0.001)
    hist.record("c", 0.002)
    assert set(hist.summary()) == {"b", "c"}
    assert hist.summary()["c"].max == 0.002


def test_merging_adds_counts_per_flow():
    one, two = LatencyHistograms(), LatencyHistograms()
    one.record("f", 0.001)
    two.record("f", 0.002)
    two.record("g", 0.0015)
    one.merge(two.encode())
    summary = one.summary()
    assert summary["f"].count == 2 and summary["f"].max == 0.002
    assert summary["g"].count == 1 and summary["g"].p50 == 0.0015
