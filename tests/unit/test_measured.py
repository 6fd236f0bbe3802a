"""Latency the gateway measures itself (routing/measured.py): per-pod decayed means, the
fleet's TTFT line, each pod's slowness, cold pods and bad values."""

from __future__ import annotations

import math

import pytest

from gateway_extproc.routing.measured import (
    DEFAULT_BASE_S,
    DEFAULT_S_PER_CHAR,
    MeasuredLatency,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(**kwargs: float) -> tuple[MeasuredLatency, Clock]:
    clock = Clock()
    return MeasuredLatency(clock=clock, **kwargs), clock


def test_a_slow_pod_is_seen_from_its_responses_alone() -> None:
    measured, clock = tracker()
    for _ in range(4):
        for pod in ("a", "b", "c"):
            measured.observe(pod, ttft=0.040, uncached_chars=1000)
        measured.observe("slow", ttft=0.160, uncached_chars=1000)
        clock.now += 1
    fast = measured.expected_ttft("a", 1000)
    assert measured.expected_ttft("slow", 1000) > 2 * fast
    assert measured.slowness("slow") > 2 * measured.slowness("b")


def test_the_line_learns_base_and_per_character_cost() -> None:
    measured, clock = tracker()
    for i in range(60):
        chars = (i % 6) * 1000
        measured.observe("a", ttft=0.02 + 3e-5 * chars, uncached_chars=chars)
        clock.now += 0.1
    base, per_char = measured.line()
    assert base == pytest.approx(0.02, rel=0.1)
    assert per_char == pytest.approx(3e-5, rel=0.05)
    # So a request whose prompt is mostly cached is expected to start much sooner.
    assert measured.expected_ttft("a", 200) < measured.expected_ttft("a", 5000) / 4


def test_with_one_prompt_length_all_of_ttft_is_taken_as_prefill() -> None:
    measured, _ = tracker()
    for _ in range(10):
        measured.observe("a", ttft=0.2, uncached_chars=5000)
    base, per_char = measured.line()
    assert base == pytest.approx(0.0, abs=1e-9)
    assert per_char == pytest.approx(0.2 / 5000)


def test_a_pod_without_samples_is_typical_and_nothing_fails() -> None:
    measured, _ = tracker()
    assert measured.slowness("new") == 1.0
    assert measured.expected_ttft("new", 100) == pytest.approx(
        DEFAULT_BASE_S + DEFAULT_S_PER_CHAR * 100
    )
    assert measured.duration("new") is None
    for _ in range(5):
        measured.observe("a", ttft=0.05, duration=0.5, uncached_chars=100)
    assert measured.slowness("new") == 1.0
    assert measured.duration("new") == pytest.approx(0.5)  # the fleet's, for now


def test_an_avoided_slow_pod_drifts_back_to_typical_and_is_tried_again() -> None:
    measured, clock = tracker(half_life=10.0)
    for _ in range(5):
        measured.observe("a", ttft=0.04, uncached_chars=1000)
        measured.observe("slow", ttft=0.16, uncached_chars=1000)
    assert measured.slowness("slow") > 2 * measured.slowness("a")
    clock.now += 100.0  # ten half-lives without a sample
    assert measured.slowness("slow") < 1.1 * measured.slowness("a")


def test_newer_samples_outweigh_older_ones() -> None:
    measured, _ = tracker()
    for _ in range(10):
        measured.observe("a", ttft=0.04, tpot=0.01, duration=0.3, uncached_chars=1000)
    for _ in range(10):
        measured.observe("a", ttft=0.04, tpot=0.05, duration=1.5, uncached_chars=1000)
    seen = measured.pod("a")
    assert seen["tpot"] is not None and seen["duration"] is not None
    # Much nearer the recent values than the plain mean of all twenty (0.03, 0.9).
    assert 0.035 < seen["tpot"] < 0.05
    assert 1.1 < seen["duration"] < 1.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_bad_values_are_ignored(bad: float) -> None:
    measured, _ = tracker()
    measured.observe("a", ttft=0.05, tpot=0.01, duration=0.4, uncached_chars=1000)
    before = measured.pod("a")
    measured.observe("a", ttft=bad, tpot=bad, duration=bad, uncached_chars=1000)
    measured.observe("a", ttft=0.05, uncached_chars=bad)
    assert measured.pod("a")["tpot"] == before["tpot"]
    assert measured.pod("a")["duration"] == before["duration"]
    assert math.isfinite(measured.expected_ttft("a", 1000))


def test_ttft_without_the_uncached_length_moves_no_slowness() -> None:
    measured, _ = tracker()
    for _ in range(5):
        measured.observe("a", ttft=0.04, uncached_chars=1000)
    measured.observe("b", ttft=1.0)  # routed by a strategy that left no note
    assert measured.slowness("b") == 1.0
    assert measured.pod("b")["ttft"] == pytest.approx(1.0)


def test_forget_drops_the_pod() -> None:
    measured, _ = tracker()
    measured.observe("slow", ttft=0.5, uncached_chars=100)
    measured.observe("slow", ttft=0.5, uncached_chars=100)
    measured.forget("slow")
    assert measured.pod("slow")["ttft"] is None
    assert measured.slowness("slow") == 1.0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MeasuredLatency(half_life=0)
    with pytest.raises(ValueError):
        MeasuredLatency(pod_keep=1.5)
