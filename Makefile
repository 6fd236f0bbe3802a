# Every target that needs the environment depends on the install stamp, so `make run`
# and `make test` work on a fresh machine from a clean clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-unit test-integration redis-server bench proto lint clean

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
	$(BIN)/python -m bench

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
