"""The parts the capture tool relies on, checked on every run so that it still works
the next time someone captures: the derived subset-hint bootstrap is one Envoy accepts,
the scenarios and the shipped recordings match, and the simulator's stream-shaping
headers produce the chunkings the SSE recordings are about."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import yaml

from gateway_extproc.devtools.simulator import SimulatorConfig, running_simulator
from gateway_extproc.devtools.simulator.app import STREAM_PAUSE_HEADER, STREAM_PIECES_HEADER
from tests.conformance import capture, stack


def test_the_subset_hint_bootstrap_is_valid_for_envoy(tmp_path: Path) -> None:
    doc = capture.subset_bootstrap()
    (chain,) = doc["static_resources"]["listeners"][0]["filter_chains"]
    filters = chain["filters"][0]["typed_config"]["http_filters"]
    names = [f["name"] for f in filters]
    assert names.index("envoy.filters.http.header_to_metadata") + 1 == names.index(
        capture.EXT_PROC_FILTER
    )
    options = filters[names.index(capture.EXT_PROC_FILTER)]["typed_config"]["metadata_options"]
    assert options["forwarding_namespaces"] == {"untyped": ["envoy.lb.subset_hint"]}
    assert options["receiving_namespaces"] == {"untyped": ["envoy.lb"]}  # kept from envoy.yaml
    path = tmp_path / "envoy-subset-hint.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    capture.validate_bootstrap(path)  # raises with Envoy's message when refused


def test_every_scenario_has_its_recording() -> None:
    # Recordings of other origin may sit next to them (they are replayed too); the
    # capture leaves those alone.
    names = [scenario.name for scenario in capture.scenarios()]
    assert len(set(names)) == len(names)
    missing = set(names) - {p.stem for p in stack.RECORDINGS.glob("*.json")}
    assert not missing, f"run python -m tests.conformance.capture --only {' '.join(missing)}"


async def _stream(port: int, headers: dict[str, str]) -> tuple[list[bytes], float]:
    """The HTTP chunks of a streamed completion (one per engine write) and its duration."""
    body = orjson.dumps(
        {
            "model": "m",
            "prompt": "Say hello.",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    chunks = []
    while True:
        size = int((await reader.readline()).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        chunks.append(data[:-2])
    writer.close()
    return chunks, time.monotonic() - started


async def test_the_simulator_writes_a_stream_in_the_pieces_asked_for() -> None:
    config = SimulatorConfig(models=("m",), port=0, ttft_ms=0, itl_ms=0)
    async with running_simulator(config) as port:
        plain, _ = await _stream(port, {})
        pieces, _ = await _stream(port, {STREAM_PIECES_HEADER: "40"})
        paused, took = await _stream(port, {STREAM_PAUSE_HEADER: "30"})
    # Without the knobs: one event per write, usage and [DONE] written together.
    assert all(chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") for chunk in plain)
    assert b'"usage"' in plain[-1] and plain[-1].endswith(b"data: [DONE]\n\n")
    # Pieces: the same bytes cut every 40 bytes, wherever that falls.
    assert [len(c) for c in pieces[:-1]] == [40] * (len(pieces) - 1)
    assert 0 < len(pieces[-1]) <= 40
    assert len(b"".join(pieces)) == len(b"".join(plain))
    # Pause: the same writes, each followed by 30 ms.
    assert len(paused) == len(plain) and took >= 0.03 * len(paused)


async def test_the_simulator_refuses_a_bad_shaping_header() -> None:
    config = SimulatorConfig(models=("m",), port=0, ttft_ms=0, itl_ms=0)
    async with running_simulator(config) as port:
        for header, value in ((STREAM_PIECES_HEADER, "0"), (STREAM_PAUSE_HEADER, "soon")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b'{"model": "m", "prompt": "x", "stream": true}'
            writer.write(
                f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n{header}: {value}\r\n\r\n".encode()
                + body
            )
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
            assert header.encode() in answer
