"""Log lines are written in batches (telemetry.BatchedLineWriter): none is lost when the
processor stops, none is split, and a line from outside the event loop is not held."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import orjson
import pytest
import structlog

from gateway_extproc import server, telemetry
from tests.waiting import eventually


class RecordingFile:
    """Stands for stderr: keeps each write() separately."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in "".join(self.writes).splitlines()]


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingFile]:
    file = RecordingFile()
    saved = structlog.get_config()
    root_handlers = logging.getLogger().handlers[:]
    monkeypatch.setattr(sys, "stderr", file)
    telemetry.configure_logging("info", "json")
    yield file
    structlog.configure(**saved)
    logging.getLogger().handlers[:] = root_handlers


def test_every_line_logged_on_the_loop_is_written_when_the_loop_ends(stderr):
    log = structlog.get_logger("test")

    async def serve_briefly() -> None:
        for number in range(300):  # ends long before the first batch is due
            log.info("request_finished", number=number, pod="pod-0", request_id="x" * 36)

    server.run_loop(serve_briefly())

    assert [line["number"] for line in stderr.lines()] == list(range(300))
    # Batched, and no write longer than a pipe writes in one piece: the lines of
    # `serve --workers N`, which share one stderr, never interleave mid-line.
    assert len(stderr.writes) < 300
    for text in stderr.writes:
        assert text.endswith("\n")
        assert len(text.encode()) <= telemetry.MAX_WRITE_BYTES


def test_a_line_logged_on_a_running_loop_is_written_soon_without_a_shutdown(stderr):
    log = structlog.get_logger("test")

    async def serve() -> None:
        log.info("request_finished", number=1)
        await eventually(lambda: stderr.writes, what="the line written")

    server.run_loop(serve())
    assert [line["number"] for line in stderr.lines()] == [1]


def test_a_line_logged_with_no_loop_running_is_written_at_once(stderr):
    structlog.get_logger("test").error("gateway_failed_to_start", problem="port taken")
    assert [line["event"] for line in stderr.lines()] == ["gateway_failed_to_start"]
