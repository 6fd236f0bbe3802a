"""The OpenAI wire format: request parsing, error bodies, usage and SSE parsing."""
