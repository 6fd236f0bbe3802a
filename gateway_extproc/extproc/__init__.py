"""The Envoy-facing protocol: the ext_proc servicer, the per-stream session, responses."""
