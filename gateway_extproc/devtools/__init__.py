"""Developer tooling: the simulated engine, the local process stack and the demo.

Nothing here runs in production; serving modules never import this package (the
architecture test in tests/unit/test_architecture.py checks it). Only `cli.py` reaches in,
lazily, for the `simulate` and `demo` sub-commands.
"""
