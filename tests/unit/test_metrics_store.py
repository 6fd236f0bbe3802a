"""MetricsStore: staleness, rates and recent means from successive samples, cold start,
forgetting a deleted pod, and the journal of changes routing follows."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from gateway_extproc.metrics import EngineSample, MetricsStore
from gateway_extproc.metrics import store as store_module
from gateway_extproc.models.registry import Pod


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def coldstart_count() -> float:
    return REGISTRY.get_sample_value("pod_coldstart_duration_seconds_count") or 0.0


def failures(pod: str, reason: str) -> float | None:
    return REGISTRY.get_sample_value(
        "gateway_metrics_scrape_failures_total", {"pod": pod, "reason": reason}
    )


def test_get_is_none_until_recorded_and_after_staleness() -> None:
    clock = Clock()
    store = MetricsStore(staleness=2.0, clock=clock)
    assert store.get("p") is None
    store.record("p", EngineSample(running=2, waiting=1, kv_cache_usage=0.5))
    got = store.get("p")
    assert got is not None and (got.running, got.waiting, got.kv_cache_usage) == (2, 1, 0.5)
    clock.now += 2.0
    assert store.get("p") is got  # exactly at the limit: still fresh
    clock.now += 0.01
    assert store.get("p") is None
    assert store.latest("p") is got  # kept (for /debug and fallback reasons), not served
    assert "p" not in store.fresh()
    assert "p" not in store.waiting()


def test_fresh_views_expire_in_scrape_order() -> None:
    clock = Clock()
    store = MetricsStore(staleness=1.0, clock=clock)
    store.record("a", EngineSample(waiting=1))
    clock.now += 0.6
    store.record("b", EngineSample(waiting=2))
    clock.now += 0.6
    assert dict(store.waiting()) == {"b": 2}
    store.record("a", EngineSample(waiting=3))  # re-recorded: fresh again, now newest
    clock.now += 0.5
    assert dict(store.waiting()) == {"a": 3}
    assert list(store.fresh()) == ["a"]


def test_unknown_fields_stay_none_rather_than_zero() -> None:
    store = MetricsStore()
    m = store.record("p", EngineSample(running=1))
    assert m.waiting is None and m.kv_cache_usage is None
    assert m.tokens_per_second is None and m.ttft_mean_recent is None


def test_rates_and_recent_means_from_successive_samples() -> None:
    clock = Clock()
    store = MetricsStore(rate_window=5.0, clock=clock)
    first = store.record(
        "p",
        EngineSample(
            prompt_tokens=1000, generation_tokens=500, ttft_sum=10.0, ttft_count=100,
            itl_sum=1.0, itl_count=50, e2e_sum=100.0, e2e_count=20,
            prefix_cache_queries=1000, prefix_cache_hits=100,
        ),
    )  # fmt: skip
    # One sample: no rate and no recent mean yet (a lifetime mean is not "recent").
    assert first.tokens_per_second is None and first.ttft_mean_recent is None
    clock.now += 1.0
    second = store.record(
        "p",
        EngineSample(
            prompt_tokens=1300, generation_tokens=600, ttft_sum=10.5, ttft_count=102,
            itl_sum=1.4, itl_count=60, e2e_sum=106.0, e2e_count=22,
            prefix_cache_queries=1400, prefix_cache_hits=400,
        ),
    )  # fmt: skip
    assert second.tokens_per_second == pytest.approx(400.0)
    assert second.prompt_tokens_per_second == pytest.approx(300.0)
    assert second.generation_tokens_per_second == pytest.approx(100.0)
    assert second.ttft_mean_recent == pytest.approx(0.25)
    assert second.itl_mean_recent == pytest.approx(0.04)
    assert second.e2e_mean_recent == pytest.approx(3.0)
    assert second.prefix_cache_hit_rate == pytest.approx(0.75)


def test_recent_mean_is_kept_while_nothing_completes() -> None:
    clock = Clock()
    store = MetricsStore(rate_window=1.0, clock=clock)
    store.record("p", EngineSample(ttft_sum=1.0, ttft_count=10))
    clock.now += 0.5
    assert store.record("p", EngineSample(ttft_sum=2.0, ttft_count=12)).ttft_mean_recent == 0.5
    for _ in range(5):  # idle: the counters stop moving, the window slides past them
        clock.now += 0.5
        m = store.record("p", EngineSample(ttft_sum=2.0, ttft_count=12))
        assert m.ttft_mean_recent == 0.5


def test_window_limits_how_far_back_rates_look() -> None:
    clock = Clock()
    store = MetricsStore(rate_window=2.0, clock=clock)
    total = 0.0
    # 100 tokens/s for 10 s, then 1000 tokens/s: after a full window only the new rate.
    for step in range(40):
        total += 50.0 if step < 20 else 500.0
        clock.now += 0.5
        m = store.record("p", EngineSample(prompt_tokens=total, generation_tokens=0))
    assert m.tokens_per_second == pytest.approx(1000.0)


def test_counter_reset_starts_over_instead_of_negative_rates() -> None:
    clock = Clock()
    store = MetricsStore(clock=clock)
    store.record("p", EngineSample(prompt_tokens=5000, generation_tokens=5000))
    clock.now += 1.0
    after_restart = store.record("p", EngineSample(prompt_tokens=10, generation_tokens=0))
    assert after_restart.tokens_per_second is None
    clock.now += 1.0
    m = store.record("p", EngineSample(prompt_tokens=110, generation_tokens=0))
    assert m.tokens_per_second == pytest.approx(100.0)


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf, -math.inf])
def test_nan_negative_and_infinite_values_count_as_missing(bad: float) -> None:
    store = MetricsStore()
    m = store.record("p", EngineSample(running=bad, waiting=bad, kv_cache_usage=bad, ttft_sum=bad))
    assert (m.running, m.waiting, m.kv_cache_usage, m.ttft_mean_recent) == (None,) * 4
    assert "p" not in store.waiting()


def test_cache_usage_above_one_is_clamped() -> None:
    assert MetricsStore().record("p", EngineSample(kv_cache_usage=1.5)).kv_cache_usage == 1.0


def test_first_routable_at_and_cold_start_observed_once() -> None:
    clock = Clock()
    store = MetricsStore(clock=clock)
    before = coldstart_count()
    store.mark_routable("p")
    clock.now += 5.0
    store.mark_routable("p")  # seen again: the first sighting counts
    assert store.first_routable_at("p") == 1000.0
    assert dict(store.cold()) == {"p": 1000.0}
    clock.now += 2.5
    store.record("p", EngineSample(running=0))
    assert coldstart_count() == before + 1
    assert store.cold() == {}
    clock.now += 1.0
    store.record("p", EngineSample(running=0))
    assert coldstart_count() == before + 1


def test_failures_are_counted_per_pod_and_reason_and_keep_last_good() -> None:
    clock = Clock()
    store = MetricsStore(clock=clock)
    good = store.record("ns/fail-pod", EngineSample(waiting=4))
    base = failures("ns/fail-pod", "timeout") or 0.0
    store.record_failure("ns/fail-pod", "timeout")
    store.record_failure("ns/fail-pod", "timeout")
    store.record_failure("ns/fail-pod", "http_5xx")
    assert failures("ns/fail-pod", "timeout") == base + 2
    assert store.failures("ns/fail-pod") == {"timeout": 2, "http_5xx": 1}
    assert store.get("ns/fail-pod") is good


def test_forget_drops_everything_about_a_pod() -> None:
    store = MetricsStore()
    pod = Pod(name="gone", namespace="ns", address="10.0.0.9:8000", models=("m",))
    store.mark_routable(pod.key)
    store.record(pod.key, EngineSample(waiting=1))
    store.record_failure(pod.key, "connect")
    assert failures(pod.key, "connect") == 1.0
    store.forget(pod)
    assert store.get(pod.key) is None and store.latest(pod.key) is None
    assert store.first_routable_at(pod.key) is None
    assert pod.key not in store.waiting() and pod.key not in store.snapshot()
    assert failures(pod.key, "connect") is None  # the label series is gone too


def test_journal_names_every_change_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing updates what it derived from the store at the pods named here, so every
    change `fresh()` / `waiting()` would show must be named: scrapes, expiry, forgetting;
    and a reader too far behind must be told to rebuild."""
    clock = Clock()
    store = MetricsStore(staleness=1.0, clock=clock)
    start = store.fresh_version()
    store.record("a", EngineSample(waiting=1))
    store.record("b", EngineSample(waiting=2))
    middle = store.version
    clock.now += 0.6
    store.record("a", EngineSample(waiting=3))
    store.record_failure("b", "timeout")  # keeps the last good values: no change
    store.mark_routable("c")  # nothing to read yet: no change
    assert store.changed_since(start) == ["a", "b", "a"]
    assert store.changed_since(middle) == ["a"]
    clock.now += 0.6  # "b" goes stale
    version = store.fresh_version()
    assert store.changed_since(middle) == ["a", "b"]
    store.forget("a")
    assert store.changed_since(version) == ["a"]
    assert store.changed_since(store.version) == []

    monkeypatch.setattr(store_module, "JOURNAL_KEEP", 4)
    mark = store.version
    for i in range(8):
        store.record(f"p{i}", EngineSample(waiting=i))
    assert store.changed_since(mark) is None  # trimmed: too far back
    assert store.changed_since(store.version - 2) == ["p6", "p7"]


def test_foreign_load_is_the_engines_requests_beyond_ours_at_the_scrape() -> None:
    """Another processor replica's requests show only in the engine's counts: the store
    notes, at each scrape, how many the engine holds beyond our own in-flight count then,
    so one alone never counts what it sent twice."""
    clock = Clock()
    store = MetricsStore(staleness=2.0, clock=clock)
    ours = {"a": 3, "b": 5}
    store.count_own(lambda key: ours.get(key, 0))
    store.record("a", EngineSample(running=6, waiting=2))  # 8 held, 3 ours
    store.record("b", EngineSample(running=4, waiting=0))  # ours not all arrived yet
    store.record("c", EngineSample(running=2))  # waiting unknown: running alone counts
    store.record("d", EngineSample(kv_cache_usage=0.5))  # neither count known
    assert dict(store.foreign()) == {"a": 5, "c": 2}
    ours["a"] = 9  # our count moves between scrapes; the note is the scrape's
    assert store.foreign()["a"] == 5
    store.record("a", EngineSample(running=9, waiting=0))
    assert "a" not in store.foreign()
    clock.now += 2.01  # stale: the engine's counts are unknown again
    assert dict(store.foreign()) == {}
    store.record("c", EngineSample(running=1, waiting=1))
    store.forget("c")
    assert "c" not in store.foreign()


def test_foreign_load_without_a_count_of_ours_is_the_engines_whole_count() -> None:
    store = MetricsStore()
    store.record("a", EngineSample(running=2, waiting=3))
    assert store.foreign()["a"] == 5
