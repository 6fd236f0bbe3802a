"""A minimal blocking HTTP/1.1 keep-alive client for latency measurements.

One pre-encoded request, one persistent connection, no parsing beyond what framing
needs: its own cost per request is a few tens of microseconds, the same on every route,
so a difference between two routes measured with it is the routes' difference.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from gateway_extproc.devtools.localstack import LOCALHOST


def encode_request(
    path: str, body: bytes, headers: dict[str, str], *, host: str = LOCALHOST
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(frozen=True, slots=True)
class StreamTiming:
    status: int
    first_event_s: float  # from sending the request to the first `data:` bytes
    total_s: float  # from sending the request to the end of the body
    events: int


class KeepAliveClient:
    def __init__(self, port: int, request: bytes, timeout: float = 10.0) -> None:
        self._request = request
        self._sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        data = self._sock.recv(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self._buf += data

    def _head(self) -> tuple[int, dict[bytes, bytes]]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers

    def request(self) -> tuple[int, int]:
        """Send the request, read the whole response: (status, body bytes)."""
        self._sock.sendall(self._request)
        status, headers = self._head()
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            while len(self._buf) < length:
                self._fill()
            del self._buf[:length]
            return status, length
        size = 0
        for chunk in self._chunks():
            size += len(chunk)
        return status, size

    def stream(self) -> StreamTiming:
        """Send the request and time an SSE response: first event and end of body."""
        started = time.perf_counter()
        self._sock.sendall(self._request)
        status, headers = self._head()
        first = 0.0
        events = 0
        if b"content-length" in headers:
            raise ValueError("expected a chunked SSE response")
        for chunk in self._chunks():
            found = chunk.count(b"data: ")
            if found and not first:
                first = time.perf_counter() - started
            events += found
        return StreamTiming(status, first, time.perf_counter() - started, events)

    def _chunks(self) -> Iterator[bytes]:
        """Yield the chunks of a chunked body as they arrive."""
        while True:
            while (eol := self._buf.find(b"\r\n")) < 0:
                self._fill()
            size = int(bytes(self._buf[:eol]).split(b";")[0], 16)
            del self._buf[: eol + 2]
            while len(self._buf) < size + 2:
                self._fill()
            chunk = bytes(self._buf[:size])
            del self._buf[: size + 2]
            if size == 0:
                return
            yield chunk
