"""The simulator's HTTP layer and command: routes, handlers, start-up and shutdown.

Each response names the pod that served it (`x-simulator-pod: host:port` and a reply
starting `sim-<port>:`), taken from the socket the request arrived on, so it is right
for ephemeral ports and for any address the gateway used to reach the pod.

Two request headers shape how a streamed (SSE) response is written, so that tests can
make a proxy in front see particular chunkings (vLLM has nothing like them; without
them the stream is written one event per write, as vLLM does):

- `x-simulator-stream-pieces: N` writes the stream in pieces of exactly N bytes (the
  last may be shorter), cut wherever N falls, so events are split mid-event;
- `x-simulator-stream-pause-ms: MS` pauses MS milliseconds after every write, so each
  write reaches the client as a read of its own instead of merged with the next. The
  usage chunk and `data: [DONE]` are always one write, so with a pause they arrive
  together in one chunk of their own.

With `--tokenizer DIR` prompts are rendered (chat template) and tokenized with that
Hugging Face tokenizer, as vLLM does; with `--kv-events-port P` the prefix cache publishes
vLLM's KV-cache events there (and serves replays on `--kv-events-replay-port`), and
`POST /reset_prefix_cache` empties it (AllBlocksCleared) as vLLM's endpoint does.

Besides OpenAI's chat completions, completions and embeddings it serves OpenAI's
Responses API (`/v1/responses`) and Anthropic's Messages API (`/v1/messages`, errors in
Anthropic's shape), JSON and streamed, with the event sequences of apis.py. A request's
`traceparent` header is echoed back as `x-simulator-traceparent`, so that tests can see
the trace context the engine received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import structlog
import zmq
from aiohttp import web

from gateway_extproc.devtools.simulator import apis, protocol, text
from gateway_extproc.devtools.simulator.config import SimulatorConfig
from gateway_extproc.devtools.simulator.engine import Engine, EngineRequest
from gateway_extproc.devtools.simulator.faults import Faults
from gateway_extproc.devtools.simulator.kv_events import EventPublisher
from gateway_extproc.devtools.simulator.metrics import CONTENT_TYPE
from gateway_extproc.devtools.simulator.protocol import ApiError
from gateway_extproc.tokenize.tokenizer import ModelTokenizer, PromptError

__all__ = [
    "SimulatorConfig",
    "add_arguments",
    "config_from_args",
    "create_app",
    "run",
    "running_simulator",
    "start_simulator",
]

log = structlog.get_logger(__name__)

POD_HEADER = "x-simulator-pod"
TRACEPARENT_ECHO_HEADER = "x-simulator-traceparent"
# Long prompts are the point of prefix-cache tests; aiohttp's default cap is 1 MiB.
MAX_BODY_BYTES = 64 * 1024 * 1024
# On shutdown, requests in flight get this long to finish before they are cancelled.
SHUTDOWN_GRACE_S = 1.0
MAX_REQUEST_ID = 128
GARBAGE_METRICS = b"<html><body><h1>502 Bad Gateway</h1>{{ not prometheus }}</body></html>\n"
JSON = "application/json"
# Request headers that shape a streamed response's writes (see the module docstring).
STREAM_PIECES_HEADER = "x-simulator-stream-pieces"
STREAM_PAUSE_HEADER = "x-simulator-stream-pause-ms"
MAX_STREAM_PAUSE_MS = 10_000.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulator:
    """The state one app serves from."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.faults = Faults(config.seed)
        self.publisher = (
            EventPublisher(config.host, config.kv_events_port, config.kv_events_replay_port)
            if config.kv_events_port is not None
            else None
        )
        self.engine = Engine(
            config, self.faults, self.publisher.publish if self.publisher else None
        )
        # Loaded once at start-up (blocking is fine then); a bad directory stops the start.
        self.tokenizer = ModelTokenizer.load(config.tokenizer) if config.tokenizer else None
        if self.tokenizer is not None:
            tokenizer = self.tokenizer
            self.engine.reply_ids = lambda tokens: tokenizer.encode(
                "".join(tokens), add_special_tokens=False
            )
        self.created = int(time.time())
        self.stopping = asyncio.Event()  # releases hung /metrics scrapes at shutdown

    def prompt_ids(self, doc: dict[str, Any], params: protocol.GenerationRequest) -> list[int]:
        prompt = params.prompt
        if self.tokenizer is None or not isinstance(prompt, str):
            return text.encode(prompt) if isinstance(prompt, str) else list(prompt)
        path = "/v1/completions" if params.prompt_param == "prompt" else "/v1/chat/completions"
        try:
            ids = self.tokenizer.prompt_ids(path, doc)
        except PromptError as exc:
            raise protocol.invalid(str(exc), params.prompt_param) from None
        if ids is None:
            raise protocol.invalid("the prompt cannot be tokenized", params.prompt_param)
        return ids

    def adapter_for(self, model: str) -> str | None:
        """The LoRA adapter `model` names (None for a base model name); 404 if unknown."""
        if model in self.config.models:
            return None
        if model in self.config.loras:
            return model
        raise protocol.model_not_found(model)


SIMULATOR = web.AppKey("simulator", Simulator)


# --- command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on (0: any)")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="NAME",
        help="served model name (repeatable; the first is the base model)",
    )
    parser.add_argument(
        "--lora",
        dest="loras",
        action="append",
        default=[],
        metavar="NAME",
        help="LoRA adapter name served on the base model (repeatable)",
    )
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="base time to first token")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="inter-token latency")
    parser.add_argument(
        "--max-num-seqs", type=int, default=256, help="requests running at once; others queue"
    )
    parser.add_argument(
        "--prefill-us-per-token",
        type=float,
        default=50.0,
        help="prefill time per prompt token missing from the prefix cache (microseconds)",
    )
    parser.add_argument(
        "--serial-prefill",
        action="store_true",
        help="prefill one request at a time (a long prompt delays the next first tokens)",
    )
    parser.add_argument("--kv-blocks", type=int, default=2048, help="KV cache size in blocks")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument(
        "--max-tokens-default", type=int, default=16, help="reply length when max_tokens is unset"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for replies and faults")
    parser.add_argument(
        "--tokenizer",
        default="",
        metavar="DIR",
        help="Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json)",
    )
    parser.add_argument(
        "--kv-events-port",
        type=int,
        default=None,
        metavar="PORT",
        help="publish KV-cache events (ZMQ PUB) on this port, as vLLM does (0: any)",
    )
    parser.add_argument(
        "--kv-events-replay-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve replays of recent event batches (ZMQ ROUTER) on this port",
    )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        models=tuple(args.models),
        loras=tuple(args.loras or ()),
        host=args.host,
        port=args.port,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        max_num_seqs=args.max_num_seqs,
        prefill_us_per_token=args.prefill_us_per_token,
        serial_prefill=args.serial_prefill,
        kv_blocks=args.kv_blocks,
        block_size=args.block_size,
        max_tokens_default=args.max_tokens_default,
        seed=args.seed,
        tokenizer=args.tokenizer,
        kv_events_port=args.kv_events_port,
        kv_events_replay_port=args.kv_events_replay_port,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 on a clean stop, 2 for bad flags, 1 if it cannot bind."""
    try:
        config = config_from_args(args)
        if config.tokenizer:
            ModelTokenizer.load(config.tokenizer)  # a bad directory is a start-up error
    except ValueError as exc:
        print(f"gateway-extproc simulate: error: {exc}", file=sys.stderr)
        return 2
    from gateway_extproc import telemetry

    telemetry.configure_logging("info", "console")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(config))
    except KeyboardInterrupt:  # a signal that arrived before our handlers were installed
        pass
    except OSError as exc:
        where = _host_port(config.host, config.port)
        print(f"gateway-extproc simulate: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:
        ports = f"{config.kv_events_port} / replay {config.kv_events_replay_port}"
        print(
            f"gateway-extproc simulate: cannot publish KV events ({ports}): {exc}", file=sys.stderr
        )
        return 1
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


async def _serve(config: SimulatorConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, port = await start_simulator(config)
        log.info(
            "simulator_started",
            url=f"http://{_host_port(config.host, port)}",
            models=list(config.models),
            loras=list(config.loras),
        )
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        log.info("simulator_stopped", port=port)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


# --- app -------------------------------------------------------------------------------


def create_app(config: SimulatorConfig) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[SIMULATOR] = Simulator(config)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post(apis.RESPONSES_PATH, _responses)
    app.router.add_post(apis.MESSAGES_PATH, _messages)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/faults", _get_faults)
    app.router.add_post("/admin/faults", _update_faults)
    app.router.add_post("/admin/faults/reset", _reset_faults)
    app.router.add_post("/reset_prefix_cache", _reset_prefix_cache)
    app.on_response_prepare.append(_name_pod)
    app.on_startup.append(_start_publisher)
    app.on_shutdown.append(_release_hung)
    app.on_cleanup.append(_stop_publisher)
    return app


async def start_simulator(config: SimulatorConfig) -> tuple[web.AppRunner, int]:
    """Start serving `config` on this loop; returns the runner (call `cleanup()` to
    stop) and the bound port, which is the ephemeral one when `config.port` is 0."""
    runner = web.AppRunner(
        create_app(config),
        access_log=None,  # a line per request would dominate benchmark CPU time
        handler_cancellation=True,  # a client that hangs up frees its engine slot
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    return runner, port


@contextlib.asynccontextmanager
async def running_simulator(config: SimulatorConfig) -> AsyncIterator[int]:
    """`async with running_simulator(config) as port:` serves for the block's duration."""
    runner, port = await start_simulator(config)
    try:
        yield port
    finally:
        await runner.cleanup()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OpenAI-style JSON error; no traceback reaches a client."""
    anthropic = request.path == apis.MESSAGES_PATH  # Anthropic's error shape there
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc, anthropic)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return _error_response(ApiError(exc.status, exc.reason, code=code), anthropic)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("simulator_request_failed", path=request.path)
        return _error_response(
            ApiError(500, "internal simulator error", code="internal_error", type="server_error"),
            anthropic,
        )


def _error_response(exc: ApiError, anthropic: bool = False) -> web.Response:
    body = apis.anthropic_error_body(exc) if anthropic else exc.body()
    return web.Response(status=exc.status, body=body, content_type=JSON)


async def _name_pod(request: web.Request, response: web.StreamResponse) -> None:
    host, port = _pod(request)
    response.headers[POD_HEADER] = _host_port(host, port)
    traceparent = request.headers.get("traceparent")
    if traceparent is not None:
        response.headers[TRACEPARENT_ECHO_HEADER] = traceparent


async def _release_hung(app: web.Application) -> None:
    app[SIMULATOR].stopping.set()


async def _start_publisher(app: web.Application) -> None:
    publisher = app[SIMULATOR].publisher
    if publisher is not None:
        port, replay = await publisher.start()
        log.info("simulator_kv_events_publishing", port=port, replay_port=replay)


async def _stop_publisher(app: web.Application) -> None:
    publisher = app[SIMULATOR].publisher
    if publisher is not None:
        await publisher.close()


def _pod(request: web.Request) -> tuple[str, int]:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    config = request.app[SIMULATOR].config
    return config.host, config.port


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _request_id(request: web.Request) -> str:
    # vLLM reuses the caller's X-Request-Id, which lets tests and logs line up.
    given = request.headers.get("x-request-id", "")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable():
        return given
    return uuid.uuid4().hex


# --- inference -------------------------------------------------------------------------


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    doc = protocol.load_object(await request.read())
    params = protocol.parse_chat(doc) if chat else protocol.parse_completion(doc)
    engine_request = _engine_request(request, sim, params, doc)
    request_id = ("chatcmpl-" if chat else "cmpl-") + _request_id(request)
    created = int(time.time())
    if params.stream:
        return await _stream(request, sim, engine_request, params, request_id, created, chat)

    tokens = await _run(sim, engine_request)
    body = protocol.choice_response(
        request_id,
        created,
        params.model,
        "".join(tokens),
        "length",
        protocol.usage(len(engine_request.prompt_ids), len(tokens)),
        chat,
    )
    return web.Response(body=body, content_type=JSON)


def _engine_request(
    request: web.Request,
    sim: Simulator,
    params: protocol.GenerationRequest,
    chat_doc: dict[str, Any],
) -> EngineRequest:
    """What the engine generates for `params` (rendered as `chat_doc` with --tokenizer);
    ApiError for an unknown model, a simulated failure or a context too long."""
    config = sim.config
    adapter = sim.adapter_for(params.model)
    if sim.faults.should_fail():
        raise protocol.simulated_failure()
    prompt_ids = sim.prompt_ids(chat_doc, params)
    room = sim.engine.max_new_tokens(len(prompt_ids))
    if params.max_tokens is None:
        max_tokens = min(config.max_tokens_default, room)
    else:
        max_tokens = params.max_tokens
    if not 1 <= max_tokens <= room:
        raise protocol.context_too_long(
            config.max_model_len,
            len(prompt_ids),
            params.max_tokens or config.max_tokens_default,
            params.prompt_param,
        )
    _, port = _pod(request)
    output = text.reply_tokens(f"sim-{port}:", prompt_ids, max_tokens, config.seed)
    return EngineRequest(adapter=adapter, prompt_ids=prompt_ids, output=output)


async def _run(sim: Simulator, engine_request: EngineRequest) -> list[str]:
    """Generate the whole reply (a non-streamed request)."""
    tokens: list[str] = []
    async with contextlib.aclosing(sim.engine.generate(engine_request)) as generated:
        async for token in generated:
            tokens.append(token)
    return tokens


async def _responses(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    doc = protocol.load_object(await request.read())
    params, chat_doc = apis.parse_responses(doc)
    engine_request = _engine_request(request, sim, params, chat_doc)
    prompt_tokens = len(engine_request.prompt_ids)
    response_id = "resp_" + _request_id(request)
    writer = apis.ResponsesWriter(response_id, int(time.time()), doc, params, prompt_tokens)
    return await _answer_events(request, sim, engine_request, params.stream, writer)


async def _messages(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    doc = protocol.load_object(await request.read())
    params, chat_doc = apis.parse_messages(doc)
    engine_request = _engine_request(request, sim, params, chat_doc)
    prompt_tokens = len(engine_request.prompt_ids)
    writer = apis.MessagesWriter("msg_" + _request_id(request), params.model, prompt_tokens)
    return await _answer_events(request, sim, engine_request, params.stream, writer)


async def _answer_events(
    request: web.Request,
    sim: Simulator,
    engine_request: EngineRequest,
    stream: bool,
    writer: apis.EventWriter,
) -> web.StreamResponse:
    """The whole body, or a stream of named events: the writer's opening, one event per
    token, then its closing."""
    if not stream:
        tokens = await _run(sim, engine_request)
        return web.Response(body=writer.body("".join(tokens), len(tokens)), content_type=JSON)
    shaper = _StreamShaper.from_headers(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    sent = 0
    try:
        await shaper.write(response, writer.opening())
        async with contextlib.aclosing(sim.engine.generate(engine_request)) as generated:
            async for piece in generated:
                await shaper.write(response, writer.token(piece))
                sent += 1
        await shaper.write(response, writer.closing(sent))
        await shaper.flush(response)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client hung up; leaving the generator already freed the engine slot
    except Exception:
        log.exception("simulator_stream_failed", path=request.path)
    return response


async def _stream(
    request: web.Request,
    sim: Simulator,
    engine_request: EngineRequest,
    params: protocol.GenerationRequest,
    request_id: str,
    created: int,
    chat: bool,
) -> web.StreamResponse:
    # Checked before the headers go out, so a bad knob is still a 400.
    shaper = _StreamShaper.from_headers(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    chunks = protocol.ChunkWriter(request_id, created, params.model, chat)
    last = len(engine_request.output) - 1
    sent = 0
    try:
        async with contextlib.aclosing(sim.engine.generate(engine_request)) as generated:
            async for token in generated:
                event = chunks.token(token, "length" if sent == last else None)
                if sent == 0 and chat:
                    event = chunks.role() + event
                await shaper.write(response, event)
                sent += 1
        tail = protocol.SSE_DONE
        if params.include_usage:
            use = protocol.usage(len(engine_request.prompt_ids), sent)
            tail = chunks.usage(use) + tail
        await shaper.write(response, tail)
        await shaper.flush(response)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client hung up; leaving the generator already freed the engine slot
    except Exception:
        # Headers are gone, so the status cannot change: log and cut the stream short.
        log.exception("simulator_stream_failed", path=request.path)
    return response


class _StreamShaper:
    """Writes a streamed body as the `x-simulator-stream-*` request headers ask."""

    __slots__ = ("_pause_s", "_pending", "_piece")

    def __init__(self, piece: int, pause_ms: float) -> None:
        self._piece = piece  # 0: every write goes out as it is
        self._pause_s = pause_ms / 1000.0
        self._pending = b""

    @classmethod
    def from_headers(cls, request: web.Request) -> _StreamShaper:
        raw_piece = request.headers.get(STREAM_PIECES_HEADER, "").strip()
        raw_pause = request.headers.get(STREAM_PAUSE_HEADER, "").strip()
        piece = 0
        if raw_piece:
            if not raw_piece.isdigit() or not 1 <= int(raw_piece) <= MAX_BODY_BYTES:
                raise protocol.invalid(f"{STREAM_PIECES_HEADER} must be a positive byte count")
            piece = int(raw_piece)
        pause_ms = 0.0
        if raw_pause:
            try:
                pause_ms = float(raw_pause)
            except ValueError:
                pause_ms = -1.0
            if not 0.0 <= pause_ms <= MAX_STREAM_PAUSE_MS:
                raise protocol.invalid(
                    f"{STREAM_PAUSE_HEADER} must be milliseconds from 0 to {MAX_STREAM_PAUSE_MS:g}"
                )
        return cls(piece, pause_ms)

    async def write(self, response: web.StreamResponse, data: bytes) -> None:
        if not self._piece:
            await self._send(response, data)
            return
        self._pending += data
        while len(self._pending) >= self._piece:
            piece, self._pending = self._pending[: self._piece], self._pending[self._piece :]
            await self._send(response, piece)

    async def flush(self, response: web.StreamResponse) -> None:
        """Send what is left of the last piece."""
        if self._pending:
            piece, self._pending = self._pending, b""
            await self._send(response, piece)

    async def _send(self, response: web.StreamResponse, data: bytes) -> None:
        await response.write(data)
        if self._pause_s:
            await asyncio.sleep(self._pause_s)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    config = sim.config
    params = protocol.parse_embedding(protocol.load_object(await request.read()))
    adapter = sim.adapter_for(params.model)
    if sim.faults.should_fail():
        raise protocol.simulated_failure()
    inputs = [text.encode(item) if isinstance(item, str) else list(item) for item in params.inputs]
    for prompt_ids in inputs:
        if sim.engine.max_new_tokens(len(prompt_ids)) < 0:
            raise protocol.context_too_long(config.max_model_len, len(prompt_ids), 0, "input")

    async def embed(prompt_ids: list[int]) -> list[float]:
        # Pooling runs a prefill and nothing else; it still takes a slot and KV blocks.
        pooling = EngineRequest(adapter=adapter, prompt_ids=prompt_ids, output=(), cacheable=False)
        async with contextlib.aclosing(sim.engine.generate(pooling)) as generated:
            async for _ in generated:
                pass
        return text.embedding(prompt_ids, params.dimensions, config.seed)

    vectors = await asyncio.gather(*(embed(prompt_ids) for prompt_ids in inputs))
    body = protocol.embedding_response(
        "embd-" + _request_id(request),
        int(time.time()),
        params.model,
        vectors,
        params.base64,
        sum(len(prompt_ids) for prompt_ids in inputs),
    )
    return web.Response(body=body, content_type=JSON)


# --- models, health, metrics, faults ---------------------------------------------------


async def _models(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    config = sim.config
    body = protocol.models_response(config.models, config.loras, sim.created, config.max_model_len)
    return web.Response(body=body, content_type=JSON)


async def _health(request: web.Request) -> web.StreamResponse:
    return web.Response()


async def _metrics(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    mode = sim.faults.settings.metrics
    if mode == "error":
        return web.Response(status=500, text="simulated metrics failure\n")
    if mode == "garbage":
        return web.Response(body=GARBAGE_METRICS, headers={"Content-Type": CONTENT_TYPE})
    if mode == "hang":
        # Never answer while the fault holds; only shutdown lets the handler go.
        await sim.stopping.wait()
        return web.Response(status=503)
    return web.Response(body=sim.engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _get_faults(request: web.Request) -> web.StreamResponse:
    return _faults_response(request.app[SIMULATOR].faults.settings.to_json())


async def _update_faults(request: web.Request) -> web.StreamResponse:
    faults = request.app[SIMULATOR].faults
    doc = protocol.load_object(await request.read())
    try:
        settings = faults.update(doc)
    except ValueError as exc:
        raise protocol.invalid(str(exc)) from None
    return _faults_response(settings.to_json())


async def _reset_prefix_cache(request: web.Request) -> web.StreamResponse:
    if not request.app[SIMULATOR].engine.kv.reset():
        raise ApiError(409, "requests are running; the prefix cache cannot be reset", code="busy")
    return web.Response()


async def _reset_faults(request: web.Request) -> web.StreamResponse:
    return _faults_response(request.app[SIMULATOR].faults.reset().to_json())


def _faults_response(settings: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(settings), content_type=JSON)
