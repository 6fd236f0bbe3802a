"""A token limit shared by two processors through one real Redis holds within 10%.

Two processors (two replicas of the gateway), each behind its own Envoy, count one
tenant's tokens in the same redis-server (`--redis-url`); one client per gateway sends
requests as fast as they are answered. The window is 5 s here instead of a minute
(`limits.window_seconds` in the flow config), so two whole windows fit in a test: in
each, the tokens of the responses served must come within 10% of the limit. Counted per
replica instead, the two would serve about twice the limit.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ProcessGroup
from tests.integration.stack import LOCALHOST, Gateway, Pod, add_processor, running_gateway
from tests.integration.strategy_stack import chat_doc, post_json
from tests.redis_server import running_redis

MODEL = "metered-model"
TENANT = "shared-tenant"
WINDOW = 5.0  # seconds; the production default is 60 (tokens per minute)
REPLY_TOKENS = 27  # with the 13 prompt tokens of chat_doc's message: 40 per request
# Per window: 60 requests, so the two in flight when it is reached are ~3% of it, and
# about half of what two clients ask for in a window on a busy 2-core machine.
TOKEN_LIMIT = 2400
WINDOWS = 2
BACKOFF_S = 0.02  # after a 429, so refused clients do not spin


@dataclass
class Replicas:
    gateways: list[Gateway]


@pytest.fixture(scope="module")
def replicas(log_dir: Path, child_env: dict[str, str]) -> Iterator[Replicas]:
    engine = Pod("metered", f"{LOCALHOST}:{localstack.free_port()}")
    models = log_dir / "metered-models.yaml"
    models.write_text(
        yaml.safe_dump(
            {"models": [{"name": MODEL, "pods": [{"name": "m-0", "address": engine.address}]}]}
        )
    )
    config = log_dir / "metered-flow.yaml"
    config.write_text(
        yaml.safe_dump(
            {"limits": {"window_seconds": WINDOW, "tenants": {TENANT: {"tokens": TOKEN_LIMIT}}}}
        )
    )
    with running_redis(log_dir) as redis_url, ProcessGroup() as group:
        group.add(
            localstack.start_simulator(
                engine.port,
                [MODEL],
                log_dir,
                extra_args=["--ttft-ms", "2", "--itl-ms", "1"],
                env=child_env,
                name="simulator-metered",
            )
        )
        args = ["--flow-config", str(config), "--redis-url", redis_url, "--log-level", "warning"]
        processors = [
            add_processor(
                group,
                models,
                log_dir,
                extra_args=args,
                env=child_env,
                name=f"processor-metered-{i}",
            )
            for i in range(2)
        ]
        localstack.wait_ready(group, timeout=30.0)
        with contextlib.ExitStack() as stack:
            gateways = [
                stack.enter_context(
                    running_gateway(
                        localstack.ENVOY_CONFIG, p.grpc_port, log_dir, f"envoy-metered-{i}"
                    )
                )
                for i, p in enumerate(processors)
            ]
            yield Replicas(gateways)


def test_a_token_limit_holds_within_ten_percent_across_two_replicas(replicas):
    doc = chat_doc(MODEL, max_tokens=REPLY_TOKENS)
    headers = {"x-gateway-inference-fairness-id": TENANT}
    served: Counter[int] = Counter()  # window index -> tokens in 200 responses
    refused: Counter[int] = Counter()
    lock = threading.Lock()
    # Windows are aligned to the wall clock: start with the next one.
    first = int(time.time() // WINDOW) + 1
    time.sleep(first * WINDOW - time.time())
    end = (first + WINDOWS) * WINDOW

    def client(gateway: Gateway) -> None:
        while time.time() < end:
            response = post_json(gateway.port, "/v1/chat/completions", doc, headers)
            window = int(time.time() // WINDOW)
            if response.status == 200:
                with lock:
                    served[window] += response.json()["usage"]["total_tokens"]
            else:
                assert response.status == 429, (response.status, response.body)
                assert response.error_code() == "rate_limit_exceeded"
                with lock:
                    refused[window] += 1
                time.sleep(BACKOFF_S)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(client, g) for g in replicas.gateways]:
            future.result()
    windows = {k - first: served[k] for k in range(first, first + WINDOWS)}
    for index, tokens in windows.items():
        assert 0.9 * TOKEN_LIMIT <= tokens <= 1.1 * TOKEN_LIMIT, (
            f"window {index}: {tokens} tokens served against a limit of {TOKEN_LIMIT} "
            f"(all windows: {windows}; refused: {dict(refused)})"
        )
        assert refused[first + index], f"window {index} never reached the limit: {windows}"
