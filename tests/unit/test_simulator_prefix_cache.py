"""The simulator's KV block pool: chained hashes, sharing, LRU eviction, usage."""

from __future__ import annotations

from gateway_extproc.devtools.simulator.prefix_cache import KVCache, block_hashes


def test_block_hash_covers_everything_before_it():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = block_hashes([9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3  # the partial tail block has no hash
    assert a[1:] != b[1:]  # same tokens, different prefix: different blocks
    assert block_hashes([1, 2, 3, 4], 2) == a[:2]
    assert block_hashes([1, 2, 3, 4], 2, salt=7) != a[:2]


def test_blocks_in_use_are_never_evicted_and_idle_ones_go_oldest_first():
    cache = KVCache(num_blocks=4, block_size=2)
    first = block_hashes([1, 1, 2, 2], 2)
    second = block_hashes([3, 3, 4, 4], 2)

    a = cache.admit(first, 2)
    assert a is not None and a.hit_blocks == 0
    cache.ensure(a, 4)
    cache.commit(a, first)
    assert cache.usage == 0.5
    # Two more blocks fit; a third request would not while `a` runs.
    b = cache.admit(second, 2)
    assert b is not None
    cache.ensure(b, 4)
    cache.commit(b, second)
    assert cache.usage == 1.0
    assert cache.admit(block_hashes([5, 5], 2), 1) is None

    cache.release(a)
    assert cache.usage == 0.5
    assert cache.admit(first, 2) is not None  # cached: both blocks are hits
    cache.release(b)
    assert cache.usage == 0.5  # `first` is referenced again, `second` is idle

    # A new request needing 2 blocks evicts the idle `second` blocks, not `first`.
    c = cache.admit(block_hashes([6, 6, 7, 7], 2), 2)
    assert c is not None
    cache.ensure(c, 4)
    assert cache.usage == 1.0
    assert cache.cached_blocks == 2


def test_reservation_counts_against_admission_but_not_usage():
    cache = KVCache(num_blocks=4, block_size=4)
    a = cache.admit([], 3)  # prompt of one block, room for two more of reply
    assert a is not None
    cache.ensure(a, 4)
    assert cache.usage == 0.25
    assert cache.admit([], 2) is None  # only one block left unpromised
    cache.ensure(a, 12)
    assert cache.usage == 0.75
    cache.ensure(a, 40)  # never beyond the reservation
    assert cache.usage == 0.75
    cache.release(a)
    assert cache.usage == 0.0
    assert cache.admit([], 4) is not None
