"""The soak's and the fault script's processes: simulated engines, processors started
through bench.memory_probe, and front Envoys on the shipped envoy/envoy.yaml (only its
ports changed by localstack), all real processes.

    client -> front Envoy (envoy/envoy.yaml) -> processor (memory probe) -> engine 0..N-1
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.memory_probe import PROBE_PORT_ENV, ask
from bench.stack import write_models_file
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ManagedProcess, ProcessGroup

MODEL = "chaos-model"
# Fast engines: the processor, not the simulated model, should set the pace.
ENGINE_ARGS = ("--ttft-ms", "2", "--itl-ms", "1", "--max-tokens-default", "8")


@dataclass
class Processor:
    process: ManagedProcess
    grpc_port: int
    admin_port: int
    probe_port: int
    front: ManagedProcess | None = None
    front_port: int = 0
    front_admin: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def probe(self) -> dict[str, Any]:
        return ask(self.probe_port, "probe")

    def trim(self) -> dict[str, Any]:
        return ask(self.probe_port, "trim")

    def debug_models(self) -> dict[str, Any]:
        url = f"http://{LOCALHOST}:{self.admin_port}/debug/models"
        with urllib.request.urlopen(url, timeout=10) as response:
            loaded: dict[str, Any] = json.loads(response.read())
        return loaded

    def readyz(self) -> tuple[int, str]:
        url = f"http://{LOCALHOST}:{self.admin_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()
        except OSError as exc:
            return 0, str(exc)

    def routable_pods(self, model: str = MODEL) -> int:
        """How many pods of `model` the dictionary holds (0 if the model is gone)."""
        try:
            view = self.debug_models()
        except OSError:
            return 0
        return len(view.get("models", {}).get(model, {}).get("pods", []))


@dataclass
class Fleet:
    group: ProcessGroup
    log_dir: Path
    models_file: Path
    engines: list[ManagedProcess]
    engine_ports: list[int]
    processors: dict[str, Processor] = field(default_factory=dict)

    def stop(self) -> None:
        self.group.stop()

    def good_models(self) -> dict[str, list[tuple[str, str]]]:
        return {
            MODEL: [
                (f"engine-{i}", f"{LOCALHOST}:{port}") for i, port in enumerate(self.engine_ports)
            ]
        }

    def write_good_models(self) -> None:
        write_models_file(self.models_file, self.good_models())


def start_fleet(
    log_dir: Path,
    variants: Mapping[str, Mapping[str, str]],
    *,
    engines: int = 3,
    processor_args: Sequence[str] = (),
) -> Fleet:
    """`engines` simulators, then per variant (name -> extra environment) a processor
    and its own front Envoy. Everything is stopped if any part fails to start."""
    group = ProcessGroup()
    env = localstack.environment_without_gateway_settings()
    try:
        ports = [localstack.free_port() for _ in range(engines)]
        started = [
            group.add(
                localstack.start_simulator(
                    port,
                    [MODEL],
                    log_dir,
                    extra_args=[*ENGINE_ARGS, "--seed", str(i)],
                    env=env,
                    name=f"engine-{i}",
                )
            )
            for i, port in enumerate(ports)
        ]
        localstack.wait_ready(started, timeout=60)
        fleet = Fleet(group, log_dir, log_dir / "models.yaml", started, ports)
        fleet.write_good_models()
        for name, extra_env in variants.items():
            fleet.processors[name] = start_processor(
                fleet, name, {**env, **extra_env}, processor_args
            )
        localstack.wait_ready([p.process for p in fleet.processors.values()], timeout=60)
        for name, processor in fleet.processors.items():
            start_front(fleet, name, processor)
        localstack.wait_ready([p.front for p in fleet.processors.values() if p.front], timeout=60)
        for processor in fleet.processors.values():
            wait_for_scrapes(processor.admin_port, engines)
    except BaseException:
        group.stop()
        raise
    return fleet


def start_processor(
    fleet: Fleet, name: str, env: Mapping[str, str], extra_args: Sequence[str]
) -> Processor:
    grpc_port, admin_port, probe_port = (localstack.free_port() for _ in range(3))
    argv = [
        sys.executable,
        "-m",
        "bench.memory_probe",
        "serve",
        *("--listen-host", LOCALHOST, "--grpc-port", str(grpc_port)),
        *("--admin-port", str(admin_port), "--models-file", str(fleet.models_file)),
        # Production defaults: JSON logs at info, access log on.
        *("--log-format", "json", "--log-level", "info"),
        *extra_args,
    ]
    process = fleet.group.add(
        localstack.spawn(
            f"processor-{name}",
            argv,
            fleet.log_dir,
            ready_url=f"http://{LOCALHOST}:{admin_port}/readyz",
            env={**env, PROBE_PORT_ENV: str(probe_port)},
        )
    )
    return Processor(process, grpc_port, admin_port, probe_port)


def start_front(fleet: Fleet, name: str, processor: Processor) -> None:
    """The shipped envoy/envoy.yaml with its three ports moved, nothing else changed."""
    port, admin = localstack.free_port(), localstack.free_port()
    processor.front = fleet.group.add(
        localstack.start_envoy(
            localstack.repo_file(localstack.ENVOY_CONFIG),
            fleet.log_dir,
            listen_port=port,
            admin_port=admin,
            extproc_port=processor.grpc_port,
            concurrency=1,
            name=f"envoy-{name}",
        )
    )
    processor.front_port, processor.front_admin = port, admin


def wait_for_scrapes(admin_port: int, pods: int, timeout: float = 30.0) -> None:
    """Until the processor has scraped every engine once."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"^pod_coldstart_duration_seconds_count (\S+)$", re.MULTILINE)
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{admin_port}/metrics", timeout=5) as r:
            match = pattern.search(r.read().decode())
        if match and float(match.group(1)) >= pods:
            return
        time.sleep(0.1)
    raise RuntimeError("the processor did not scrape every engine in time")


def set_engine_faults(port: int, faults: Mapping[str, Any]) -> None:
    path = "/admin/faults/reset" if not faults else "/admin/faults"
    request = urllib.request.Request(
        f"http://{LOCALHOST}:{port}{path}",
        data=json.dumps(dict(faults)).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def chat_body(stream: bool = False, max_tokens: int = 8, text: str = "hello") -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()
