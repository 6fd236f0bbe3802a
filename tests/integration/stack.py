"""What the integration tests share: the simulated pods and model dictionary they run
with, a small HTTP client (stdlib, so the tests see exactly what went over the wire),
polling with a deadline, and handles on the running processes."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ManagedProcess

# Simulated engines (processes): name -> the models each serves.
#   chat-model       on a and b: routing spreads across them
#   solo-model       on c only
#   lifecycle-model  on a and c, for the tests that edit the models file
#   unready-model    a pod that exists but is not ready (and nothing listens there)
# In the models file each model lists its own pod entries (`<model>-<engine>`), so a
# test can mark the lifecycle model's pods terminating without touching chat-model,
# which shares engine a (a pod's state is one value across every model it serves).
SIMULATED_PODS = {
    "a": ("chat-model", "lifecycle-model"),
    "b": ("chat-model",),
    "c": ("solo-model", "lifecycle-model"),
}
CHAT_MODEL = "chat-model"
SOLO_MODEL = "solo-model"
LIFECYCLE_MODEL = "lifecycle-model"
UNREADY_MODEL = "unready-model"

# Fast engines keep the suite quick; enough inter-token delay that a stream really is
# a sequence of separate writes. The KV cache is large enough for a ~3 MiB prompt.
SIMULATOR_ARGS = ["--ttft-ms", "5", "--itl-ms", "2", "--kv-blocks", "16384"]
# A short reload interval so that edits to the models file show quickly.
PROCESSOR_ARGS = ["--models-reload-interval", "0.1", "--log-level", "info"]

DEADLINE = 10.0  # seconds any polled condition gets before the test fails

T = TypeVar("T")


# -- HTTP -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str | None:
        """`error.code` of an OpenAI error body, None when the body is not one."""
        try:
            return self.json()["error"]["code"]  # type: ignore[no-any-return]
        except (ValueError, KeyError, TypeError):
            return None


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One HTTP/1.1 request on a fresh connection; an iterable body is sent chunked.

    The body is written from a second thread while this one reads the response, as
    curl and httpcore do: Envoy may answer (413, say) and close the connection before
    the upload is done, and a client that only reads after writing everything would
    see a connection reset instead of the answer.
    """
    lines = [f"{method} {path} HTTP/1.1", f"host: {LOCALHOST}:{port}", "connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if isinstance(body, bytes):
        lines.append(f"content-length: {len(body)}")
    elif body is not None:
        lines.append("transfer-encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()

    def send(sock: socket.socket) -> None:
        try:
            sock.sendall(head)
            if isinstance(body, bytes):
                sock.sendall(body)
            elif body is not None:
                for piece in body:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered early and closed; the reader gets the answer

    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
            return Response(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            response.close()
            sender.join(timeout)


def post_json(port: int, path: str, doc: Any, headers: dict[str, str] | None = None) -> Response:
    return http_request(
        port,
        "POST",
        path,
        json.dumps(doc).encode(),
        {"content-type": "application/json", **(headers or {})},
    )


def chat(port: int, model: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    doc = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], **extra}
    return post_json(port, "/v1/chat/completions", doc, headers)


def poll(what: str, probe: Callable[[], T], done: Callable[[T], bool]) -> T:
    """Call `probe` until `done(result)`; fail naming `what` and the last result."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not so after {DEADLINE}s; last seen {result!r}")
        time.sleep(0.05)


# -- the processes --------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    name: str
    address: str  # ip:port, as in the models file and the x-simulator-pod header

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass
class Processor:
    process: ManagedProcess
    grpc_port: int
    admin_port: int

    def get(self, path: str) -> Response:
        return http_request(self.admin_port, "GET", path)

    def metrics(self) -> str:
        response = self.get("/metrics")
        assert response.status == 200
        return response.body.decode()


def add_processor(
    group: localstack.ProcessGroup,
    models_path: Path,
    log_dir: Path,
    *,
    extra_args: Iterable[str],
    env: dict[str, str],
    name: str = "processor",
) -> Processor:
    """Start `gateway-extproc serve` on free ports as part of `group` (not yet ready)."""
    grpc_port, admin_port = localstack.free_port(), localstack.free_port()
    process = group.add(
        localstack.start_processor(
            models_path,
            log_dir,
            grpc_port=grpc_port,
            admin_port=admin_port,
            extra_args=list(extra_args),
            env=env,
            name=name,
        )
    )
    return Processor(process, grpc_port, admin_port)


@dataclass
class Gateway:
    """An Envoy in front of the shared processor."""

    config: str  # file name of the shipped bootstrap it runs
    process: ManagedProcess
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"


@contextlib.contextmanager
def running_gateway(config: Path, extproc_port: int, log_dir: Path, name: str) -> Iterator[Gateway]:
    """Envoy with the shipped bootstrap `config` on ephemeral ports, talking to the
    processor at `extproc_port`."""
    port, admin_port = localstack.free_port(), localstack.free_port()
    process = localstack.start_envoy(
        config,
        log_dir,
        listen_port=port,
        admin_port=admin_port,
        extproc_port=extproc_port,
        concurrency=1,  # two cores are shared with the engines and the processor
        name=name,
    )
    try:
        localstack.wait_ready([process])
        yield Gateway(config.name, process, port, admin_port)
    finally:
        process.stop()


def dictionary(pods: dict[str, Pod]) -> dict[str, Any]:
    """The models file the processor starts with."""
    models: dict[str, list[dict[str, str]]] = {}
    for name, served in SIMULATED_PODS.items():
        for model in served:
            entry = {"name": f"{model}-{name}", "address": pods[name].address}
            models.setdefault(model, []).append(entry)
    models[UNREADY_MODEL] = [
        {
            "name": f"{UNREADY_MODEL}-0",
            "address": f"{LOCALHOST}:{localstack.free_port()}",
            "state": "not-ready",
        }
    ]
    return {"models": [{"name": m, "pods": p} for m, p in models.items()]}


def model_addresses(pods: dict[str, Pod], model: str) -> set[str]:
    return {pods[name].address for name, served in SIMULATED_PODS.items() if model in served}


# Per-pod fields of /debug/models that move with traffic (requests finishing, pods
# failing), not with the models file: left out when a test compares dictionaries.
LIVE_POD_FIELDS = frozenset({"in_flight", "health"})


def dictionary_seen(processor: Processor) -> dict[str, Any]:
    """The processor's dictionary from /debug/models without the live per-pod fields:
    what a models file edit changes, and nothing that moves while responses finish."""
    models = processor.get("/debug/models").json()["models"]
    return {
        name: {
            **view,
            "pods": [
                {k: v for k, v in pod.items() if k not in LIVE_POD_FIELDS} for pod in view["pods"]
            ],
        }
        for name, view in models.items()
    }


class ModelsFile:
    """The processor's models file, for tests that change the dictionary at run time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.original = path.read_text()

    def load(self) -> dict[str, Any]:
        return yaml.safe_load(self.path.read_text())  # type: ignore[no-any-return]

    def write(self, doc: dict[str, Any]) -> None:
        # Replace the file in one step so the processor never reads half of it.
        staging = self.path.with_suffix(".tmp")
        staging.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(staging, self.path)

    def restore(self) -> None:
        staging = self.path.with_suffix(".tmp")
        staging.write_text(self.original)
        os.replace(staging, self.path)
