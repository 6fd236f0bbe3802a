"""Real processes for the integration tests: simulated engines, the processor, Envoy.

Everything listens on ephemeral 127.0.0.1 ports and every Envoy gets its own --base-id,
so these tests never collide with a running `make run` or with each other. The engines
and the processor start once per session (in parallel); each test module gets its own
Envoy, and `any_gateway` a second one with the full-duplex bootstrap.

The processor reads a models file of its own in a temporary directory, which tests may
edit through `models_file` (the original is put back afterwards) to watch the processor
follow the change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ManagedProcess, ProcessGroup
from tests.integration.stack import (
    LOCALHOST,
    PROCESSOR_ARGS,
    SIMULATED_PODS,
    SIMULATOR_ARGS,
    Gateway,
    ModelsFile,
    Pod,
    Processor,
    add_processor,
    dictionary,
    dictionary_seen,
    poll,
    running_gateway,
)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    return localstack.environment_without_gateway_settings()


@pytest.fixture(scope="session")
def stack(
    log_dir: Path, child_env: dict[str, str]
) -> Iterator[tuple[dict[str, Pod], Processor, Path]]:
    """Simulated pods and the processor, started in parallel, stopped at the end."""
    pods = {name: Pod(name, f"{LOCALHOST}:{localstack.free_port()}") for name in SIMULATED_PODS}
    models_path = log_dir / "models.yaml"
    models_path.write_text(yaml.safe_dump(dictionary(pods), sort_keys=False))
    with ProcessGroup() as group:
        for name, pod in pods.items():
            group.add(
                localstack.start_simulator(
                    pod.port,
                    SIMULATED_PODS[name],
                    log_dir,
                    extra_args=SIMULATOR_ARGS,
                    env=child_env,
                    name=f"simulator-{name}",
                )
            )
        processor = add_processor(
            group, models_path, log_dir, extra_args=PROCESSOR_ARGS, env=child_env
        )
        localstack.wait_ready(group, timeout=30.0)
        yield pods, processor, models_path


@pytest.fixture(scope="session")
def pods(stack: tuple[dict[str, Pod], Processor, Path]) -> dict[str, Pod]:
    return stack[0]


@pytest.fixture(scope="session")
def processor(stack: tuple[dict[str, Pod], Processor, Path]) -> Processor:
    return stack[1]


@pytest.fixture
def models_file(
    stack: tuple[dict[str, Pod], Processor, Path], processor: Processor
) -> Iterator[ModelsFile]:
    """The models file; whatever a test changes is put back, and the processor has
    taken the original up again before the next test starts."""
    models = ModelsFile(stack[2])
    before = dictionary_seen(processor)
    yield models
    models.restore()
    # Only the dictionary is compared: in-flight counts of requests whose responses
    # are still finishing (the observer stream lags the client by a little) move on
    # their own and must not fail the test that happened to snapshot them.
    poll(
        "the processor is back on the original models file",
        lambda: dictionary_seen(processor),
        lambda seen: seen == before,
    )


@pytest.fixture(scope="module")
def gateway(
    request: pytest.FixtureRequest, processor: Processor, log_dir: Path
) -> Iterator[Gateway]:
    """Envoy with the default bootstrap, envoy/envoy.yaml (request body BUFFERED)."""
    name = f"envoy-{request.module.__name__}"
    with running_gateway(localstack.ENVOY_CONFIG, processor.grpc_port, log_dir, name) as gateway:
        yield gateway


@pytest.fixture(scope="module", params=["envoy.yaml", "envoy-full-duplex.yaml"])
def any_gateway(
    request: pytest.FixtureRequest, processor: Processor, log_dir: Path
) -> Iterator[Gateway]:
    """Envoy with each shipped bootstrap in turn: the main flows must work with both."""
    if request.param == localstack.ENVOY_CONFIG.name:
        yield request.getfixturevalue("gateway")
        return
    name = f"envoy-full-duplex-{request.module.__name__}"
    config = localstack.ENVOY_FULL_DUPLEX_CONFIG
    with running_gateway(config, processor.grpc_port, log_dir, name) as gateway:
        yield gateway


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failure, attach the tails of the logs of the processes the test used."""
    report = yield
    if report.failed and call.when in ("setup", "call"):
        funcargs = getattr(item, "funcargs", {})
        for value in funcargs.values():
            process = getattr(value, "process", None)
            if isinstance(process, ManagedProcess):
                report.sections.append((f"{process.name} log", process.log_tail()))
        if "processor" not in funcargs and "stack" in funcargs:
            report.sections.append(("processor log", funcargs["stack"][1].process.log_tail()))
    return report
