"""Routing: strategies that rank a model's routable pods, and the router that picks."""
