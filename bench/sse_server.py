"""A small, fast SSE "pod" for the streaming benchmark (run as its own process).

    python -m bench.sse_server --port 8101 --chunks 200 [--gap-ms 1]

Any POST gets a `text/event-stream` response of `--chunks` chat-completion chunks and
`data: [DONE]`, chunked transfer encoding, keep-alive; GET /metrics answers a vLLM
/metrics page so the processor's scraper sees a healthy engine; GET /health answers 200.
Raw asyncio on uvloop with the chunks pre-encoded, so a stream costs a few writes and
nothing else: it must never be what limits the benchmark. With `--gap-ms 0` the whole
response goes out in one write (chunks back to back); with a gap each chunk is its own
write, paced like tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import uvloop

from bench import payloads

MAX_HEAD = 64 * 1024


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class SSEServer:
    def __init__(self, chunks: int, gap_s: float) -> None:
        self.events = [_chunked(payloads.sse_chunk(i)) for i in range(chunks)]
        self.done = _chunked(payloads.SSE_DONE) + b"0\r\n\r\n"
        self.gap_s = gap_s
        self.head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        metrics = payloads.vllm_metrics_text(payloads.STREAM_MODEL).encode()
        self.metrics = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(metrics), metrics)
        )
        self.ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        # Back to back, the whole response is one write: the cheapest a pod can be.
        self.whole = self.head + b"".join(self.events) + self.done

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > MAX_HEAD:
                    return
                request_line, _, rest = head.partition(b"\r\n")
                length = 0
                for line in rest.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if request_line.startswith(b"POST"):
                    await self._stream(writer)
                elif b" /metrics" in request_line:
                    writer.write(self.metrics)
                else:
                    writer.write(self.ok)
                await writer.drain()
        writer.close()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        gap = self.gap_s
        if gap <= 0:
            writer.write(self.whole)
            return
        writer.write(self.head)
        for event in self.events:
            writer.write(event)
            await writer.drain()
            await asyncio.sleep(gap)
        writer.write(self.done)


async def serve(port: int, chunks: int, gap_s: float) -> None:
    app = SSEServer(chunks, gap_s)
    server = await asyncio.start_server(app.handle, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.chunks, args.gap_ms / 1000))


if __name__ == "__main__":
    main()
