"""`gateway-extproc demo` as a user runs it: the banner counts its simulated pods in
proper English, and the log directory it makes for itself is gone once it stops (and
kept, named, when it failed). Real processes: the demo starts a simulated engine, the
processor and Envoy, on free ports, with TMPDIR pointed at a directory of the test's."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml

from gateway_extproc.devtools import localstack

GUIDE_END = "Ctrl-C stops everything."
START_TIMEOUT = 90.0  # the demo itself gives its processes 30 s; a loaded machine is slow
STOP_TIMEOUT = 60.0


class Demo:
    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.tmpdir = tmp_path / "tmp"  # the demo's TMPDIR: only its own files land here
        self.tmpdir.mkdir()
        models = tmp_path / "models.yaml"
        pod = f"{localstack.LOCALHOST}:{localstack.free_port()}"
        doc = {"models": [{"name": "solo", "pods": [{"name": "solo-0", "address": pod}]}]}
        models.write_text(yaml.safe_dump(doc))
        ports = [str(localstack.free_port()) for _ in range(4)]
        argv = localstack.gateway_command(
            "demo",
            "--models-file", str(models),
            "--port", ports[0],
            "--envoy-admin-port", ports[1],
            "--grpc-port", ports[2],
            "--admin-port", ports[3],
            *extra,
        )  # fmt: skip
        env = {**localstack.environment_without_gateway_settings(), "TMPDIR": str(self.tmpdir)}
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr)),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for_guide(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while GUIDE_END not in self.stdout:
            assert self.process.poll() is None, "\n".join(self.stdout + self.stderr)
            assert time.monotonic() < deadline, f"no guide after {START_TIMEOUT}s: {self.stdout}"
            time.sleep(0.05)

    def wait(self, stop: bool = False) -> int:
        """The demo's exit status, once it has exited (asked to with SIGTERM, as Ctrl-C
        does, when `stop`); SIGKILL only as a last resort, which would leave its
        children behind."""
        try:
            if stop and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            return self.process.wait(STOP_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for reader in self._readers:
                reader.join(STOP_TIMEOUT)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.tmpdir.iterdir())


def test_the_banner_counts_one_pod_and_the_logs_go_on_exit(tmp_path: Path) -> None:
    demo = Demo(tmp_path)
    try:
        demo.wait_for_guide()
        (log_dir,) = demo.leftovers()  # the demo's own, while it runs
    finally:
        status = demo.wait(stop=True)

    out = "\n".join(demo.stdout)
    assert "starting 1 simulated pod, the processor and Envoy" in out, out
    assert "removed on exit" in out
    assert status == 0, "\n".join(demo.stderr)
    assert log_dir.startswith("gateway-extproc-demo-")
    assert demo.leftovers() == []


def test_a_failed_demo_keeps_its_logs_and_says_where(tmp_path: Path) -> None:
    # A bootstrap Envoy refuses (an unknown field): the demo stops with an error.
    doc = yaml.safe_load(localstack.ENVOY_CONFIG.read_text(encoding="utf-8"))
    doc["static_resources"]["clusters"][0]["no_such_field"] = 1
    broken = tmp_path / "broken-envoy.yaml"
    broken.write_text(yaml.safe_dump(doc))

    demo = Demo(tmp_path, "--envoy-config", str(broken))
    status = demo.wait()

    assert status == 1
    (log_dir,) = demo.leftovers()
    assert f"logs kept in {demo.tmpdir / log_dir}" in "\n".join(demo.stderr)
    assert (demo.tmpdir / log_dir / "envoy.log").is_file()
    assert not any("Traceback" in line for line in demo.stderr)
