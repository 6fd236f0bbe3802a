"""`gateway-extproc demo`: the whole gateway on one machine, for trying it by hand.

Starts, from this Python environment, one simulated engine per local pod address in the
models file (by default `examples/models.yaml`: three pods on 127.0.0.1:8001-8003
serving two models), the processor reading that file, and Envoy with `envoy/envoy.yaml`
in front; prints what to try with curl; stops everything on Ctrl-C or SIGTERM.

The processes' logs go to `--log-dir`, kept; without it, to a temporary directory that
is removed when the demo stops, unless the demo failed (then it says where they are).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from gateway_extproc.config import Settings
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ProcessGroup, StartupError
from gateway_extproc.models.static import ModelFileError, parse_models_file

STARTUP_TIMEOUT = 30.0  # a cold first start imports a lot on a small machine


class _Stop(Exception):
    """Raised from the signal handler to leave whatever the demo is doing."""


class _Signals:
    """SIGINT/SIGTERM raise _Stop, except while a child is being started and recorded:
    then the stop waits until the child is in the group, so none is left running."""

    def __init__(self) -> None:
        self._deferring = False
        self._pending = ""

    def handle(self, signum: int, _: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._deferring:
            self._pending = name
            return
        raise _Stop(name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            raise _Stop(self._pending)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-file",
        type=Path,
        default=localstack.EXAMPLE_MODELS,
        help="model dictionary; a simulator is started for each 127.0.0.1 pod in it "
        "(default: examples/models.yaml)",
    )
    parser.add_argument(
        "--envoy-config",
        type=Path,
        default=None,
        help="Envoy bootstrap (default: envoy/envoy.yaml)",
    )
    parser.add_argument(
        "--full-duplex",
        action="store_true",
        help="use envoy/envoy-full-duplex.yaml (FULL_DUPLEX_STREAMED bodies)",
    )
    parser.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    parser.add_argument("--envoy-admin-port", type=int, default=9901, help="Envoy admin port")
    parser.add_argument("--grpc-port", type=int, default=9002, help="processor gRPC port")
    parser.add_argument("--admin-port", type=int, default=9090, help="processor admin port")
    parser.add_argument(
        "--default-strategy",
        default=Settings().default_strategy,
        help="processor routing strategy (default: the processor's, predicted-latency)",
    )
    parser.add_argument(
        "--ttft-ms",
        type=float,
        default=150.0,
        help="simulated time to first token (slow enough to watch a stream)",
    )
    parser.add_argument("--itl-ms", type=float, default=40.0, help="simulated inter-token latency")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where the processes' logs go, kept after the demo stops (default: a new "
        "temporary directory, removed on exit unless the demo failed)",
    )


def local_pods(models_file: Path) -> tuple[dict[int, list[str]], list[str]]:
    """Ports of the 127.0.0.1 pods in `models_file` with the models each serves, and the
    addresses that are not local (no simulator can stand in for those)."""
    try:
        pods = parse_models_file(models_file.read_text(encoding="utf-8"))
    except (OSError, ModelFileError) as exc:
        raise StartupError(f"cannot use models file {models_file}: {exc}") from None
    by_port: dict[int, list[str]] = defaultdict(list)
    remote = []
    for pod in pods:
        host, _, port = pod.address.rpartition(":")
        if host != LOCALHOST:
            remote.append(pod.address)
            continue
        for model in pod.models:
            if model not in by_port[int(port)]:
                by_port[int(port)].append(model)
    return dict(sorted(by_port.items())), remote


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def run(args: argparse.Namespace) -> int:
    signals = _Signals()
    previous = {sig: signal.signal(sig, signals.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    group = ProcessGroup()
    temporary = args.log_dir is None
    log_dir = Path(tempfile.mkdtemp(prefix="gateway-extproc-demo-")) if temporary else args.log_dir
    status = 1  # also when something unexpected ends the demo: its logs are then kept
    try:
        _start(args, group, signals, log_dir, temporary)
        status = _watch(group)
    except _Stop:
        status = 0
    except (StartupError, FileNotFoundError, ValueError) as exc:
        # ValueError: an --envoy-config that is not an Envoy bootstrap this can start.
        print(f"gateway-extproc demo: {exc}", file=sys.stderr)
    finally:
        # A second Ctrl-C must not interrupt the clean-up and leave children behind.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if group.processes:
            print("\nstopping ...", file=sys.stderr)
        group.stop()  # the children have closed their logs after this
        if temporary:
            _tidy(log_dir, keep=status != 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _tidy(log_dir: Path, *, keep: bool) -> None:
    """Remove the demo's own temporary log directory; after a failure, keep the logs
    (they say why) and say where they are."""
    if keep and any(log_dir.glob("*.log")):
        print(f"gateway-extproc demo: logs kept in {log_dir}", file=sys.stderr)
        return
    shutil.rmtree(log_dir, ignore_errors=True)


def _start(
    args: argparse.Namespace,
    group: ProcessGroup,
    signals: _Signals,
    log_dir: Path,
    temporary: bool,
) -> None:
    if args.envoy_config is not None:
        envoy_config = args.envoy_config
    elif args.full_duplex:
        envoy_config = localstack.repo_file(localstack.ENVOY_FULL_DUPLEX_CONFIG)
    else:
        envoy_config = localstack.repo_file(localstack.ENVOY_CONFIG)
    models_file = args.models_file.resolve()
    if args.models_file == localstack.EXAMPLE_MODELS:
        localstack.repo_file(models_file)
    pods, remote = local_pods(models_file)

    ports = [
        ("Envoy listener", args.port),
        ("Envoy admin", args.envoy_admin_port),
        ("processor gRPC", args.grpc_port),
        ("processor admin", args.admin_port),
        *((f"simulated pod serving {', '.join(m)}", p) for p, m in pods.items()),
    ]
    localstack.ensure_ports_free(ports)

    where = f"{log_dir}, removed on exit" if temporary else str(log_dir)
    engines = plural(len(pods), "simulated pod")
    print(f"starting {engines}, the processor and Envoy (logs in {where}) ...")
    timing = ["--ttft-ms", str(args.ttft_ms), "--itl-ms", str(args.itl_ms)]
    with signals.deferred():
        for port, models in pods.items():
            group.add(localstack.start_simulator(port, models, log_dir, extra_args=timing))
        group.add(
            localstack.start_processor(
                models_file,
                log_dir,
                grpc_port=args.grpc_port,
                admin_port=args.admin_port,
                extra_args=["--default-strategy", args.default_strategy],
            )
        )
        group.add(
            localstack.start_envoy(
                envoy_config,
                log_dir,
                listen_port=args.port,
                admin_port=args.envoy_admin_port,
                extproc_port=args.grpc_port,
            )
        )
    localstack.wait_ready(group, timeout=STARTUP_TIMEOUT)
    _print_guide(args, models_file, pods, remote, envoy_config, log_dir, temporary)


def _watch(group: ProcessGroup) -> int:
    """Run until a signal arrives (0) or one of the processes dies (1)."""
    while True:
        dead = group.dead()
        if dead:
            process = dead[0]
            print(
                f"gateway-extproc demo: {process.name} exited with status "
                f"{process.popen.returncode}\n--- last lines of {process.log_path} ---\n"
                f"{process.log_tail()}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)


def _print_guide(
    args: argparse.Namespace,
    models_file: Path,
    pods: dict[int, list[str]],
    remote: list[str],
    envoy_config: Path,
    log_dir: Path,
    temporary: bool,
) -> None:
    gateway = f"http://{LOCALHOST}:{args.port}"
    admin = f"http://{LOCALHOST}:{args.admin_port}"
    models = [m for served in pods.values() for m in served]
    model = models[0] if models else "my-model"
    chat = f"{gateway}/v1/chat/completions"
    json_header = "-H 'content-type: application/json'"

    def body(extra: str = "") -> str:
        return shlex.quote(
            f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]{extra}}}'
        )

    streamed = body(', "stream": true')
    lines = [
        "",
        f"gateway-extproc demo is running   (Envoy config {envoy_config.name})",
        f"  gateway (Envoy)     {gateway}",
        f"  Envoy admin         http://{LOCALHOST}:{args.envoy_admin_port}",
        f"  processor           gRPC {LOCALHOST}:{args.grpc_port}, admin {admin}",
    ]
    for port, served in pods.items():
        lines.append(f"  simulated pod       {LOCALHOST}:{port} serving {', '.join(served)}")
    for address in remote:
        lines.append(f"  not started         {address} (not a 127.0.0.1 address)")
    lines += [
        f"  models file         {models_file}",
        f"  logs                {log_dir}/*.log"
        + ("  (removed on exit; --log-dir DIR keeps them)" if temporary else ""),
        "",
        "Try:",
        "  # a chat completion; the x-simulator-pod header names the pod that answered",
        f"  curl -si {chat} {json_header} -d {body()}",
        "  # the same, streamed (server-sent events ending in data: [DONE])",
        f"  curl -sN {chat} {json_header} -d {streamed}",
        "  # round-robin for this request instead of the default strategy",
        f"  curl -si {chat} {json_header} -H 'routing-strategy: round-robin' -d {body()}",
        "  # an unknown model: 404 model_not_found",
        f'  curl -si {chat} {json_header} -d \'{{"model": "no-such-model"}}\'',
        "  # a body that is not JSON: 400 invalid_request_body",
        f"  curl -si {chat} {json_header} -d '{{not json'",
        "  # the models that have a ready pod, answered by the processor",
        f"  curl -s {gateway}/v1/models",
        "  # the processor's view of the model dictionary, and its metrics",
        f"  curl -s {admin}/debug/models",
        f"  curl -s {admin}/metrics | grep '^gateway_'",
        "",
        f"Edit {models_file} while this runs: mark a pod `state: terminating` (all of a",
        "model's pods terminating: 503 model_terminating) or `state: not-ready` (503",
        "no_ready_pods), or delete a model (404). The processor reloads it within a second.",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)
