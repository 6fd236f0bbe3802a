"""Building blocks for the flow-control end-to-end tests (test_flow_control_e2e.py).

A small fleet whose capacity is easy to exceed: two simulated engines that each run two
requests at once (`--max-num-seqs 2`) behind processors that allow two requests in flight
per pod, so four requests fill the fleet and the rest wait in the processor. Two
processors share the engines: one trusts the priority header (the default), one ignores
it (`--header-policy priority=ignored`); each has its own Envoy on envoy/envoy.yaml, and
the trusting one a second Envoy on the full-duplex bootstrap. A third engine serves a
model whose only pod starts not ready, for the scale-from-zero test.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ManagedProcess, ProcessGroup
from tests.integration.stack import (
    LOCALHOST,
    Gateway,
    ModelsFile,
    Pod,
    Processor,
    add_processor,
    http_request,
    running_gateway,
)
from tests.integration.strategy_stack import samples_of

FLOW_MODEL = "flow-model"  # engines a and b
ZERO_MODEL = "zero-model"  # engine z, listed not ready at start
MAX_NUM_SEQS = 2  # each engine runs this many requests at once, the rest wait in it
MAX_INFLIGHT = 2  # the processors' --max-inflight-per-pod: engines never need to queue
SLOTS = 2 * MAX_INFLIGHT  # requests the fleet takes at once
QUEUE_TIMEOUT = 6.0  # longer than Envoy's 5 s message_timeout, on purpose
WAIT_FOR_PODS = 8.0
SIMULATOR_ARGS = [
    "--ttft-ms", "20",
    "--itl-ms", "5",
    "--max-num-seqs", str(MAX_NUM_SEQS),
    "--kv-blocks", "16384",
]  # fmt: skip
FLOW_CONFIG = {
    "objectives": {"critical": 100, "batch": -1},
    "limits": {"tenants": {"metered": {"requests": 3}}},
}
PROCESSOR_ARGS = [
    "--max-inflight-per-pod", str(MAX_INFLIGHT),
    "--queue-timeout", str(QUEUE_TIMEOUT),
    "--wait-for-pods", str(WAIT_FOR_PODS),
    "--metrics-interval", "0.1",
    "--models-reload-interval", "0.1",
    "--flow-metadata",
    "--log-level", "info",
]  # fmt: skip
TRUSTING, IGNORING, FULL_DUPLEX = "trusting", "ignoring", "full-duplex"


def models_doc(engines: Mapping[str, Pod], zero_state: str = "not-ready") -> dict[str, Any]:
    return {
        "models": [
            {
                "name": FLOW_MODEL,
                "pods": [
                    {"name": f"{FLOW_MODEL}-{e}", "address": engines[e].address} for e in "ab"
                ],
            },
            {
                "name": ZERO_MODEL,
                "pods": [
                    {
                        "name": f"{ZERO_MODEL}-z",
                        "address": engines["z"].address,
                        "state": zero_state,
                    }
                ],
            },
        ]
    }


@dataclass
class FlowFleet:
    engines: dict[str, Pod]
    processors: dict[str, Processor]  # TRUSTING, IGNORING
    gateways: dict[str, Gateway]  # TRUSTING, IGNORING, FULL_DUPLEX
    models: ModelsFile

    @property
    def process(self) -> ManagedProcess:
        # conftest's failure hook attaches the log of any test argument with a `process`.
        return self.processors[TRUSTING].process


@contextlib.contextmanager
def running_flow_fleet(log_dir: Path, env: Mapping[str, str]) -> Iterator[FlowFleet]:
    engines = {e: Pod(e, f"{LOCALHOST}:{localstack.free_port()}") for e in "abz"}
    models_path = log_dir / "flow-models.yaml"
    models_path.write_text(yaml.safe_dump(models_doc(engines), sort_keys=False))
    config_path = log_dir / "flow-config.yaml"
    config_path.write_text(yaml.safe_dump(FLOW_CONFIG))
    args = [*PROCESSOR_ARGS, "--flow-config", str(config_path)]
    with ProcessGroup() as group:
        for name, pod in engines.items():
            group.add(
                localstack.start_simulator(
                    pod.port,
                    [ZERO_MODEL if name == "z" else FLOW_MODEL],
                    log_dir,
                    extra_args=SIMULATOR_ARGS,
                    env=env,
                    name=f"simulator-flow-{name}",
                )
            )
        processors = {
            TRUSTING: add_processor(
                group, models_path, log_dir, extra_args=args, env=env, name="processor-flow"
            ),
            IGNORING: add_processor(
                group,
                models_path,
                log_dir,
                extra_args=[*args, "--header-policy", "priority=ignored"],
                env=env,
                name="processor-flow-ignoring",
            ),
        }
        localstack.wait_ready(group, timeout=30.0)
        with contextlib.ExitStack() as stack:
            gateways = {
                name: stack.enter_context(
                    running_gateway(config, processors[owner].grpc_port, log_dir, f"envoy-{name}")
                )
                for name, owner, config in (
                    (TRUSTING, TRUSTING, localstack.ENVOY_CONFIG),
                    (IGNORING, IGNORING, localstack.ENVOY_CONFIG),
                    (FULL_DUPLEX, TRUSTING, localstack.ENVOY_FULL_DUPLEX_CONFIG),
                )
            }
            yield FlowFleet(engines, processors, gateways, ModelsFile(models_path))


# -- what the processor and the engines report ----------------------------------------


def metric_total(processor: Processor, metric: str, **labels: str) -> float:
    """The sum of `metric`'s samples whose labels include `labels`."""
    return sum(
        value
        for found, value in samples_of(processor, metric).items()
        if set(labels.items()) <= set(found)
    )


def queue_length(processor: Processor, model: str) -> int:
    return int(metric_total(processor, "gateway_flow_queue_length", model=model))


def engine_waiting(pod: Pod) -> int:
    """The engine's own waiting queue (`vllm:num_requests_waiting`), from its /metrics."""
    text = http_request(pod.port, "GET", "/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_waiting":
                return int(sample.value)
    raise AssertionError("the engine exposes no vllm:num_requests_waiting")


class EngineQueueWatch:
    """Samples the engines' waiting queues in the background; `peak` is the largest."""

    def __init__(self, pods: list[Pod], every: float = 0.02) -> None:
        self.peak = 0
        self.samples = 0
        self._pods = pods
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EngineQueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pod in self._pods:
                self.peak = max(self.peak, engine_waiting(pod))
            self.samples += 1
            time.sleep(self._every)
