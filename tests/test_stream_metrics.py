"""StreamTimer buckets inter-token gaps itself and adds them to the ITL histogram when the
stream ends (issue #32): what a scrape reads must be what one observe per gap gave."""

from __future__ import annotations

from bisect import bisect_left

import pytest
from prometheus_client import CollectorRegistry, Histogram

from services.rpc import metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for m in histogram.collect() for s in m.samples
            if not s.name.endswith("_created")}


def test_bucketed_observations_read_as_one_observe_each():
    values = [0.0, 0.0005, 0.001, 0.002, 0.01, 0.5, 1.0, 3.0, 7.5]
    one = Histogram("one", "per value", buckets=BUCKETS, registry=CollectorRegistry())
    bulk = Histogram("bulk", "bucketed", buckets=BUCKETS, registry=CollectorRegistry())
    for v in values:
        one.observe(v)
    counts = [0] * (len(BUCKETS) + 1)
    for v in values:
        counts[bisect_left(BUCKETS, v)] += 1
    metrics.observe_bucketed(bulk, counts, sum(values))
    assert {k[1:]: v for k, v in samples(bulk).items()} == {k[1:]: v for k, v in samples(one).items()}
    assert samples(bulk)[("bulk_bucket", "0.001")] == 3  # le is inclusive, as observe's
    assert samples(bulk)[("bulk_count", "")] == len(values)


def test_bucket_counts_must_match_the_histogram():
    bulk = Histogram("bulk", "bucketed", buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        metrics.observe_bucketed(bulk, [1, 2], 0.5)


def _itl() -> tuple[float, float]:
    got = {s.name: s.value for m in metrics.ITL.collect() for s in m.samples}
    return got["pdserve:inter_token_latency_seconds_count"], got["pdserve:inter_token_latency_seconds_sum"]


def test_stream_timer_adds_one_gap_per_message_after_the_first_when_the_stream_ends(monkeypatch):
    clock = iter([10.0, 10.5, 10.52, 10.6, 11.0, 12.0])
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    count0, sum0 = _itl()
    timer = metrics.StreamTimer()  # starts at 10.0
    assert timer.tokens(1) is True  # the first token at 10.5: TTFT, no gap
    assert timer.tokens(0) is False  # nothing new: no gap either
    assert timer.tokens(4) is False  # 10.52: a gap of 0.02
    assert timer.tokens(1) is False  # 10.6: 0.08
    assert _itl() == (count0, sum0)  # nothing per message
    timer.finished(["length"])  # 11.0 is e2e
    count1, sum1 = _itl()
    assert count1 - count0 == 2 and sum1 - sum0 == pytest.approx(0.1)
    assert timer.count == 6
    timer.aborted()  # after finishing: nothing more
    assert _itl() == (count1, sum1)


def test_stream_timer_flush_is_idempotent(monkeypatch):
    clock = iter([0.0, 1.0, 1.5])
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    count0, _ = _itl()
    timer = metrics.StreamTimer()
    timer.tokens(1)
    timer.tokens(1)
    timer.flush()
    timer.flush()
    assert _itl()[0] - count0 == 1
