"""Per-tenant rate limits: counted per window, refused with OpenAI's 429 and headers, and
shared through a real Redis between two limiters as between two replicas."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway_extproc.errors import GatewayError
from gateway_extproc.flowcontrol.config import parse_flow_config
from gateway_extproc.flowcontrol.limits import RateLimiter, duration_text
from gateway_extproc.flowcontrol.redis_limits import RedisWindows
from tests.redis_server import running_redis

CONFIG = parse_flow_config(
    """
limits:
  window_seconds: 60
  default: {requests: 3}
  tenants:
    tokens-only: {requests: 0, tokens: 100}
    vip: {requests: 5}
"""
)


class Clock:
    def __init__(self, now: float = 6000.0) -> None:  # a window boundary (60 x 100)
        self.now = now

    def __call__(self) -> float:
        return self.now


def refusal(limiter: RateLimiter, tenant: str) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        limiter.check(tenant)
    return caught.value


def test_requests_over_the_limit_are_429_with_openai_headers():
    clock = Clock(6000.0 + 15.5)
    limiter = RateLimiter(CONFIG, clock=clock)
    for _ in range(3):
        limiter.check("alice")
    error = refusal(limiter, "alice")
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert error.retry_after == 45
    assert dict(error.headers) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "45s",
    }
    assert "alice" in error.message


def test_each_tenant_has_its_own_count_and_overrides_apply():
    limiter = RateLimiter(CONFIG, clock=Clock())
    for _ in range(3):
        limiter.check("alice")
    limiter.check("bob")  # alice's count is hers alone
    for _ in range(5):
        limiter.check("vip")
    assert refusal(limiter, "vip").headers[0] == ("x-ratelimit-limit-requests", "5")


def test_a_new_window_starts_from_zero():
    clock = Clock()
    limiter = RateLimiter(CONFIG, clock=clock)
    for _ in range(3):
        limiter.check("alice")
    refusal(limiter, "alice")
    clock.now += 60
    limiter.check("alice")


async def test_tokens_used_count_against_the_token_limit():
    limiter = RateLimiter(CONFIG, clock=Clock())
    limiter.check("tokens-only")
    limiter.record_tokens("tokens-only", 60)
    limiter.check("tokens-only")  # 60 of 100 used: still room
    limiter.record_tokens("tokens-only", 45)
    error = refusal(limiter, "tokens-only")
    assert error.type == "tokens"
    headers = dict(error.headers)
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-limit-requests" not in headers  # no request limit for this tenant


def test_no_limits_configured_means_nothing_is_counted():
    limiter = RateLimiter(parse_flow_config(""))
    assert not limiter.enabled
    for _ in range(1000):
        limiter.check("anyone")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.25, "250ms"), (0.0001, "1ms"), (12.2, "13s"), (360, "6m0s")]
)
def test_reset_times_read_like_openais(seconds, text):
    assert duration_text(seconds) == text


# -- shared through Redis -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


async def test_two_replicas_sharing_redis_share_one_count(redis_url):
    clock = Clock()
    config = parse_flow_config("limits: {window_seconds: 60, default: {requests: 4, tokens: 100}}")
    first = RateLimiter(config, RedisWindows(redis_url, prefix="t1"), clock=clock)
    second = RateLimiter(config, RedisWindows(redis_url, prefix="t1"), clock=clock)
    try:
        assert first.shared
        await first.check_shared("carol")
        await second.check_shared("carol")
        await first.check_shared("carol")
        await second.check_shared("carol")
        with pytest.raises(GatewayError) as caught:
            await first.check_shared("carol")  # the fifth, whichever replica gets it
        assert caught.value.type == "requests"
        await first.check_shared("dave")
        first.record_tokens("dave", 70)
        second.record_tokens("dave", 40)
        await first.close()  # waits for the token writes
        with pytest.raises(GatewayError) as caught:
            await second.check_shared("dave")
        assert caught.value.type == "tokens"
        assert dict(caught.value.headers)["x-ratelimit-remaining-tokens"] == "0"
    finally:
        await second.close()


async def test_an_unreachable_redis_lets_requests_through():
    config = parse_flow_config("limits: {default: {requests: 1}}")
    limiter = RateLimiter(config, RedisWindows("redis://127.0.0.1:1/0"))
    try:
        for _ in range(3):
            await limiter.check_shared("erin")
    finally:
        await limiter.close()
