"""Incremental Server-Sent Events parsing for OpenAI-style streams.

Chunks arrive as Envoy forwards them: an event may be split anywhere (even between the
CR and LF of one line end), several events may share a chunk. Only `data` fields matter
here; other fields (event, id, retry) and comments are skipped.
"""

from __future__ import annotations

DONE = b"[DONE]"


class SSEParser:
    __slots__ = ("_data", "_partial", "_skip_lf")

    def __init__(self) -> None:
        self._partial = b""  # an unfinished line carried to the next chunk
        self._data: list[bytes] = []  # data lines of the event being read
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event completed by `chunk` (data lines joined by LF)."""
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = chunk.endswith(b"\r")
        text = self._partial + chunk
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        self._partial = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events

    def close(self) -> list[bytes]:
        """Events left unterminated when the stream ended (a missing final blank line)."""
        if self._partial.startswith(b"data:"):
            value = self._partial[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        self._partial = b""
        events = [b"\n".join(self._data)] if self._data else []
        self._data = []
        return events
