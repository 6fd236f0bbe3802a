"""The gateway's own block keys: a chained hash over token ids, seeded by the LoRA adapter.

The index and the request side key blocks the same way, from token ids alone, so no
engine hash seed (PYTHONHASHSEED, the hash algorithm) has to match: key i stands for the
whole prefix of blocks 0..i, as the engine's chained hashes do. Tuple hashes of ints are
the same in every process; the root mixes in the adapter name (salted per process for
strings), which is fine because keys never leave the process.
"""

from __future__ import annotations

from collections.abc import Sequence

Adapter = str | int | None


def root_key(adapter: Adapter) -> int:
    """The parent of a prompt's first block: one per adapter (None: the base model)."""
    return hash(("gateway-extproc-kv-root", adapter))


def chain_keys(parent: int, token_ids: Sequence[int], block_size: int) -> list[int]:
    """Keys of the full blocks of `token_ids` continuing the chain at `parent`; a partial
    tail block has none (engines cache full blocks only)."""
    keys: list[int] = []
    key = parent
    end = len(token_ids) - block_size + 1
    for start in range(0, end, block_size):
        key = hash((key, *token_ids[start : start + block_size]))
        keys.append(key)
    return keys
