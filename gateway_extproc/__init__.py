"""gateway-extproc: an Envoy ext_proc processor that routes LLM inference requests."""

__version__ = "0.1.0"
