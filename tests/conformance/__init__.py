"""Recorded-frame conformance: real Envoy traffic recorded once, replayed on every run."""
