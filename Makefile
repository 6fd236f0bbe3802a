# Every target that needs the environment depends on the install stamp, so `make run`
# and `make test` work on a fresh machine from a clean clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-unit test-integration redis-server bench soak chaos proto lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "gateway-extproc needs Python 3.11 or newer"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# xds-protos ships an older copy of OpenTelemetry's protos in the same files as
	# opentelemetry-proto; whichever pip lays down last wins, and the OTLP exporter needs
	# opentelemetry-proto's own. Lay them down again, last.
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $(STAMP)

run: install
	$(BIN)/gateway-extproc demo

test: install redis-server
	$(BIN)/python -m pytest -q

test-unit: install redis-server
	$(BIN)/python -m pytest -q tests/unit

test-integration: install redis-server
	$(BIN)/python -m pytest -q tests/integration

# The rate-limit tests start a real redis-server (Debian's package); install it only when
# missing, without questions.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# wrk is a Debian package; install it only when missing (bench is never part of test).
bench: install
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	@# py-spy samples the processor for the profile section; bench-only, so not in [dev].
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet py-spy
	$(BIN)/python -m bench

# The memory soak and the memory a burst of stalled streams leaves (docs/BENCHMARKS.md
# sections 9 and 11): SOAK_REQUESTS per allocator variant (default 500000, about an hour
# per variant on a busy 2-core machine; 20000 for a quick look), SOAK_VARIANTS a
# comma-separated subset of glibc,arena2,trim,jemalloc,random,baseline (baseline: the
# code of the checkout in BENCH_SOAK_BASELINE=/path, to compare before/after a change).
# jemalloc is Debian's libjemalloc2, installed when missing like wrk.
SOAK_REQUESTS ?= 500000
SOAK_VARIANTS ?=
soak: install
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	@test -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2; } || true
	BENCH_SOAK_REQUESTS=$(SOAK_REQUESTS) BENCH_SOAK_VARIANTS=$(SOAK_VARIANTS) \
	  $(BIN)/python -m bench soak memory-burst

# The fault script (docs/BENCHMARKS.md section 10): a few minutes against real Envoy,
# processor and engines; exits non-zero when a check fails. CHAOS_FAULTS picks some
# faults (e.g. engine-500,models-empty); CHAOS_ARGS=--quick scales the connection counts
# down.
CHAOS_FAULTS ?=
CHAOS_ARGS ?=
chaos: install
	BENCH_CHAOS_FAULTS=$(CHAOS_FAULTS) $(BIN)/python -m bench chaos $(CHAOS_ARGS)

proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=gateway_extproc/proto_gen \
	  --pyi_out=gateway_extproc/proto_gen proto/*.proto

lint: install
	$(BIN)/ruff check gateway_extproc tests bench
	$(BIN)/ruff format --check gateway_extproc tests bench
	$(BIN)/mypy gateway_extproc

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
