# gateway-extproc: the ext_proc processor only. Envoy runs elsewhere (Envoy Gateway's
# proxies, or your own Envoy), so no Envoy is installed here.
#
#   docker build -t gateway-extproc:0.1.0 .
#   docker run --rm -p 127.0.0.1:9002:9002 -p 127.0.0.1:9090:9090 gateway-extproc:0.1.0 serve --models-file ...

# --- build: install the package and its dependencies into a self-contained venv -------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what `pip install .` needs, so edits to tests or docs do not bust the layer cache.
COPY pyproject.toml README.md ./
COPY gateway_extproc ./gateway_extproc
# pip byte-compiles what it installs: the runtime's root file system is read-only, so
# Python could not write the caches there later.
# xds-protos ships an older copy of OpenTelemetry's protos in opentelemetry-proto's files:
# lay opentelemetry-proto's down again, last (the OTLP exporter needs them).
RUN pip install --upgrade pip && pip install . && \
    pip install --force-reinstall --no-deps "opentelemetry-proto==$(python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"

# --- runtime: the venv on a clean base, run as an unprivileged numeric user ------------
# (Debian-based, so the chart's preStop hook finds `sleep`.)
FROM python:3.11-slim

# Numeric, so Kubernetes' runAsNonRoot can verify it; the chart's podSecurityContext
# uses the same ids.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" gateway \
    && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=build /opt/venv /opt/venv
# Every address of the container: outside Kubernetes the processor would listen on
# loopback only, which nothing outside the container reaches. Which ports leave the
# container is `docker run -p`'s choice (publish them on 127.0.0.1 unless Envoy is
# elsewhere: the ext_proc port has no authentication).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_LISTEN_HOST=0.0.0.0

USER ${UID}:${GID}
# ext_proc gRPC, admin HTTP (/metrics /healthz /readyz /debug/models).
EXPOSE 9002 9090

ENTRYPOINT ["gateway-extproc"]
CMD ["serve"]
