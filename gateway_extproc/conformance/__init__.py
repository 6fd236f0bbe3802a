"""Recorded-frame conformance: capture ext_proc streams and replay them against a server."""
