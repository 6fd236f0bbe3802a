"""Envoy's vocabulary, in one place: the header names, dynamic-metadata namespaces and
keys, attribute names and gRPC metadata the processor and envoy/*.yaml agree on, and the
readers that pull those values out of a ProcessingRequest frame.

Changing a name here changes the contract with the Envoy configuration (envoy/*.yaml,
the Helm chart's EnvoyPatchPolicy, the Gateway API Inference Extension protocol);
tests/unit/test_envoy_config.py checks the shipped bootstraps against these names.
"""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

# -- request headers the processor reads ----------------------------------------------

# In body modes where the processor never sees the whole body before the request leaves
# (NONE, STREAMED), the model must come from a header; this is the name the Gateway API
# Inference Extension's body-based routing uses.
MODEL_HEADER = "x-gateway-model-name"
ROUTING_STRATEGY_HEADER = "routing-strategy"
SESSION_ID_HEADER = "x-session-id"
USER_HEADER = "user"
REQUEST_ID_HEADER = "x-request-id"
# W3C trace context: read from the client, set upstream to the gateway's span (tracing.py).
TRACEPARENT_HEADER = "traceparent"

# -- the routing answer ---------------------------------------------------------------

# The picked endpoint, as a request header and as `envoy.lb` dynamic metadata (the
# Gateway API Inference Extension protocol: Envoy's ORIGINAL_DST cluster reads either).
DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_METADATA_NAMESPACE = "envoy.lb"

# The key that ties the routing stream to the observer stream (extproc/handoff.py):
# written under this namespace by the routing answer, forwarded by Envoy to the observer.
HANDOFF_NAMESPACE = "gateway_extproc"
HANDOFF_KEY_FIELD = "session"
# Beside the key, what an observer stream that reaches another process (a replica or a
# worker that did not route the request) needs to account for the response.
HANDOFF_CONTEXT_FIELDS = (
    "model",
    "pod",
    "strategy",
    "request_id",
    "started_at",
    # The API the request spoke (`Api.name`): where its response reports usage and how
    # its stream ends.
    "api",
    # The flow-control key, so the response's tokens count against the right tenant.
    "flow_fairness_id",
    "flow_priority",
)

# -- what Envoy tells the processor ---------------------------------------------------

# Which of the two ext_proc filters opened a stream, in the gRPC initial metadata; a
# stream without it is the single-filter shape (Envoy Gateway, envoy-full-duplex.yaml).
ROLE_METADATA = "x-gateway-extproc-role"
ROUTE_ROLE = "route"
OBSERVE_ROLE = "observe"

# Where Envoy puts the values of `response_attributes`, keyed by the expression as
# configured; envoy/envoy.yaml asks for the status when it skips the response headers.
# (Envoy 1.40 cannot evaluate `response.headers[...]` on a body frame, so the content
# type is not asked for.)
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
STATUS_ATTRIBUTE = "response.code"
# Whether the engine answered (`via_upstream`) or Envoy did, and why (passive health).
DETAILS_ATTRIBUTE = "response.code_details"

# The endpoint that actually served (Envoy may retry on another), and the subset of
# endpoints Envoy asks the pick to stay inside.
SERVED_NAMESPACE = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"

# The Gateway API Inference Extension's conformance tests steer the picker with this
# request header (endpoints or bare pod IPs, comma-separated; it wins over the subset
# hint) and read the endpoint that served back from the response header
# (--conformance-mode only).
CONFORMANCE_SELECTION_HEADER = "test-epp-endpoint-selection"
CONFORMANCE_SERVED_HEADER = "x-conformance-test-served-endpoint"


# -- frame readers --------------------------------------------------------------------


def header_dict(message: ext.HttpHeaders) -> dict[str, str]:
    """The headers of a headers frame, names lower-cased (raw_value preferred)."""
    out: dict[str, str] = {}
    for header in message.headers.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        out[header.key.lower()] = value
    return out


def response_status(frame: ext.ProcessingRequest) -> int:
    """The response status from the frame's attributes; 0 when not sent."""
    if ATTRIBUTES_KEY not in frame.attributes:
        return 0
    fields = frame.attributes[ATTRIBUTES_KEY].fields
    status = fields[STATUS_ATTRIBUTE].number_value if STATUS_ATTRIBUTE in fields else 0.0
    return int(status) if 0 < status < 1000 else 0


def response_details(frame: ext.ProcessingRequest) -> str | None:
    """Envoy's response code details from the frame's attributes; None when not sent."""
    if ATTRIBUTES_KEY not in frame.attributes:
        return None
    fields = frame.attributes[ATTRIBUTES_KEY].fields
    if DETAILS_ATTRIBUTE not in fields:
        return None
    return fields[DETAILS_ATTRIBUTE].string_value


def subset_hint(frame: ext.ProcessingRequest) -> frozenset[str] | None:
    """The endpoint subset Envoy asks us to pick inside, if it sent one."""
    namespaces = frame.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in namespaces:
        return None
    fields = namespaces[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        # An entry may itself be a comma-separated list, as some control planes write it.
        items = [part for v in value.list_value.values for part in v.string_value.split(",")]
    elif kind == "string_value":
        items = value.string_value.split(",")
    else:
        items = []
    return _endpoint_set(items)


def conformance_selection(headers: dict[str, str]) -> frozenset[str] | None:
    """The endpoints the conformance header names; None when it is absent or empty."""
    return _endpoint_set(headers.get(CONFORMANCE_SELECTION_HEADER, "").split(",")) or None


def _endpoint_set(items: list[str]) -> frozenset[str]:
    """Endpoints (ip:port, [ip6]:port) and bare IPs, without blanks; a bracketed bare IPv6
    address loses its brackets so it compares with the host part of an endpoint."""
    out = set()
    for item in (i.strip() for i in items):
        if item.startswith("[") and item.endswith("]"):
            item = item[1:-1]
        if item:
            out.add(item)
    return frozenset(out)


def served_endpoint(frame: ext.ProcessingRequest) -> str:
    """`envoy.lb/x-gateway-destination-endpoint-served`, when Envoy forwards it."""
    namespaces = frame.metadata_context.filter_metadata
    if SERVED_NAMESPACE not in namespaces:
        return ""
    value = namespaces[SERVED_NAMESPACE].fields.get(SERVED_KEY)
    return value.string_value.strip() if value is not None else ""


def handoff_context(frame: ext.ProcessingRequest) -> dict[str, str] | None:
    """The routing answer's context fields as Envoy forwards them (strings), or None
    when the frame carries no model."""
    namespaces = frame.metadata_context.filter_metadata
    if HANDOFF_NAMESPACE not in namespaces:
        return None
    fields = namespaces[HANDOFF_NAMESPACE].fields
    context = {name: fields[name].string_value for name in HANDOFF_CONTEXT_FIELDS if name in fields}
    return context if context.get("model") else None


def handoff_key(frame: ext.ProcessingRequest) -> str:
    """The key the routing answer wrote, as Envoy forwards it to the observer."""
    namespaces = frame.metadata_context.filter_metadata
    if HANDOFF_NAMESPACE not in namespaces:
        return ""
    value = namespaces[HANDOFF_NAMESPACE].fields.get(HANDOFF_KEY_FIELD)
    return value.string_value if value is not None else ""
