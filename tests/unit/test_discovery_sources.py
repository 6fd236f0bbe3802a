"""A discovery source added from outside the package drives a real gateway: it is
chosen by name, started, fills the registry requests are routed from, and is stopped,
with no change to server code."""

from __future__ import annotations

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc import cli, config
from gateway_extproc.config import Settings
from gateway_extproc.devtools.localstack import LOCALHOST, free_port
from gateway_extproc.models import source
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.server import start_gateway, stop_gateway
from tests import frames


class ToySource:
    """Serves one fixed pod; records its lifecycle so the test can see the calls."""

    def __init__(self, registry: ModelRegistry, address: str) -> None:
        self._registry = registry
        self._address = address
        self.calls: list[str] = []

    @property
    def synced(self) -> bool:
        return "start" in self.calls

    async def start(self) -> None:
        self.calls.append("start")
        self._registry.replace_all([Pod("toy-0", self._address, ("toy-model",))])

    async def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> list[ToySource]:
    made: list[ToySource] = []
    # Loopback at a closed port: the gateway scrapes the pods it knows about.
    address = f"{LOCALHOST}:{free_port()}"

    def factory(settings: Settings, registry: ModelRegistry) -> ToySource:
        made.append(ToySource(registry, address))
        return made[-1]

    monkeypatch.setitem(source.SOURCES, "toy", factory)
    return made


async def test_a_registered_source_is_chosen_started_routed_from_and_stopped(toy):
    argv = ["serve", "--discovery", "toy", "--listen-host", LOCALHOST]
    args = cli.build_parser().parse_args([*argv, "--grpc-port", "0", "--admin-port", "0"])
    gateway = await start_gateway(config.settings_from_args(args))
    try:
        [made] = toy
        assert gateway.source is made and made.calls == ["start"]
        assert gateway.ready()
        async with grpc.aio.insecure_channel(f"{LOCALHOST}:{gateway.grpc_port}") as channel:
            stub = ext_grpc.ExternalProcessorStub(channel)
            sent = [
                frames.request_headers(),
                frames.request_body(orjson.dumps({"model": "toy-model"})),
            ]
            answers = [a async for a in stub.Process(iter(sent))]
        routed = answers[-1].request_body.response.header_mutation.set_headers
        headers = {h.header.key: h.header.raw_value.decode() for h in routed}
        assert headers["x-gateway-destination-endpoint"] == made._address
    finally:
        await stop_gateway(gateway)
    assert made.calls == ["start", "stop"]


def test_an_unregistered_source_name_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["serve", "--discovery", "toy"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'toy'" in capsys.readouterr().err
