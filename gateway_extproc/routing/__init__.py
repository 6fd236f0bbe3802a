"""Routing: profiles that rank a model's routable pods, and the router that picks.

Read in this order: `base` (what a strategy sees and promises), `plugins` (the
filter / scorer / picker contracts), `registry` (every plugin and built-in profile by
name), `profile` (filters, then a picker bound to weighted scorers), `catalog` (names,
weighted combinations, the routing config's profiles), `router`. The built-in plugins
are in `filters`, `scorers`, `prefix` and `pickers`; `fastpath` holds the capabilities
a scorer may declare and the max-score shortcuts they allow; `signals` the per-pod
state every plugin shares.
"""
