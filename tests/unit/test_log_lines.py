"""The processor's log lines: written in batches (telemetry.BatchedLineWriter), none
lost when the processor stops, none split, a line from outside the event loop not held;
each stamped with the time in UTC."""

from __future__ import annotations

import datetime
import logging
import sys
import time
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
            # Some lines longer in bytes than in characters.
            request_id = "é" * 36 if number % 3 else "x" * 36
            log.info("request_finished", number=number, pod="pod-0", request_id=request_id)

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


def test_each_line_says_when_it_was_logged_in_utc_to_the_microsecond(stderr):
    log = structlog.get_logger("test")
    before = time.time()
    log.info("request_finished")
    after = time.time()
    stamp = str(stderr.lines()[0]["timestamp"])
    assert len(stamp) == len("2026-12-08T02:13:44.326570Z") and stamp.endswith("Z")
    when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert when.tzinfo == datetime.UTC
    assert before - 1e-6 <= when.timestamp() <= after + 1e-6
