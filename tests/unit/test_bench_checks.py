"""`python -m bench chaos` (`make chaos`) is a pass/fail gate: a section whose checks
failed is still written to the report, and the command exits 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench.common import RunMode, Section


def _section(failed: list[str]) -> Section:
    return Section("chaos", "Faults", body="the fault table", failed_checks=failed)


@pytest.mark.parametrize(("failed", "exit_code"), [(["models-empty: shrank"], 1), ([], 0)])
def test_failed_checks_make_the_bench_exit_1_after_writing_the_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failed: list[str], exit_code: int
) -> None:
    def fake_run(_mode: RunMode) -> Section:
        return _section(failed)

    monkeypatch.setitem(bench_main.BENCHMARKS, "chaos", fake_run)
    # The bench quiets the product's logging for the whole process: not for the tests
    # that run after this one and read the log.
    monkeypatch.setattr(bench_main.telemetry, "configure_logging", lambda *_args: None)
    output = tmp_path / "BENCHMARKS.md"
    code = bench_main.main(["chaos", "--output", str(output), "--work-dir", str(tmp_path / "w")])
    assert code == exit_code
    assert "the fault table" in output.read_text(encoding="utf-8")


def test_the_soak_and_the_fault_script_run_only_when_named() -> None:
    assert {"soak", "chaos"} <= set(bench_main.BENCHMARKS)
    assert "soak" not in bench_main.DEFAULT_RUN
    assert "chaos" not in bench_main.DEFAULT_RUN
