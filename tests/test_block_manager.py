"""Block manager on tiny pools: exact block ids, hit lengths, eviction order, sharing."""

from __future__ import annotations

import pytest

from services.engine.block_hash import HASH_SCHEME_VERSION, hash_block, hash_blocks
from services.engine.block_manager import BlockManager
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Request, Sequence


def make_seq(tokens: list[int], seq_id: int = 0, salt: str | None = None) -> Sequence:
    request = Request(f"r{seq_id}", list(tokens), SamplingParams(cache_salt=salt))
    seq = Sequence(seq_id, 0, request, list(tokens))
    request.seqs = [seq]
    return seq


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed every token of `seq` (as the scheduler's update does)."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Admit with prefix-cache hits, allocate the rest; returns the number of hit tokens."""
    hits = bm.get_cached_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - len(hits) * bm.block_size, hits) is not None
    seq.num_computed_tokens = len(hits) * bm.block_size
    return seq.num_computed_tokens


def test_allocates_lowest_free_block_ids_first():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.allocate_slots(seq, 10) == []
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5


def test_allocation_that_does_not_fit_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(9)))
    assert bm.allocate_slots(seq, 9) is None
    assert seq.block_table == []
    assert bm.num_free_blocks == 2
    bm.assert_all_free()


def test_growing_by_one_token_allocates_only_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq([1, 2, 3])
    bm.allocate_slots(seq, 3)
    seq.num_computed_tokens = 3
    seq.token_ids.append(4)
    bm.allocate_slots(seq, 1)
    assert seq.block_table == [0]
    seq.num_computed_tokens = 4
    seq.token_ids.append(5)
    bm.allocate_slots(seq, 1)
    assert seq.block_table == [0, 1]


def test_full_computed_blocks_are_hit_by_a_later_request_with_the_same_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(list(range(10)), seq_id=0)
    admit(bm, first)
    compute(bm, first)
    bm.free(first)

    second = make_seq(list(range(8)) + [99, 98, 97], seq_id=1)
    assert bm.get_cached_prefix(second) == [0, 1]
    assert admit(bm, second) == 8
    assert second.block_table[:2] == [0, 1]
    bm.free(second)
    bm.assert_all_free()


def test_the_last_prompt_token_is_never_a_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(list(range(8)))
    admit(bm, first)
    compute(bm, first)
    bm.free(first)
    # Same 8 tokens: both blocks are cached, but the last token must be computed for logits.
    again = make_seq(list(range(8)), seq_id=1)
    assert bm.get_cached_prefix(again) == [0]


def test_hit_stops_at_the_first_missing_block():
    bm = BlockManager(num_blocks=8, block_size=2)
    first = make_seq([1, 2, 3, 4, 5, 6, 7])
    admit(bm, first)
    compute(bm, first)
    bm.free(first)
    other = make_seq([1, 2, 9, 9, 5, 6, 7], seq_id=1)  # block 1 differs, so block 2 cannot hit
    assert bm.get_cached_prefix(other) == [0]


def test_evicts_least_recently_freed_block_first_and_tail_blocks_before_their_prefix():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)  # blocks 0, 1, 2
    compute(bm, a)  # blocks 0 and 1 are full: cached
    bm.free(a)
    # Free queue: never-cached block 2 and untouched 3 first, then 1 (tail) before 0 (prefix).
    b = make_seq([7, 7, 7, 7, 7], seq_id=1)
    admit(bm, b)
    assert b.block_table == [2, 3, 1]
    assert bm.num_evictions == 1
    again = make_seq([1, 2, 3, 4, 5], seq_id=2)
    assert bm.get_cached_prefix(again) == [0]  # block 1's entry was evicted, block 0 survives


def test_freed_uncached_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=3, block_size=2)
    cached = make_seq([1, 2, 3])
    admit(bm, cached)  # blocks 0, 1; block 0 is full
    compute(bm, cached)
    bm.free(cached)
    # Free queue: freed uncached block 1 first, then never-used 2, then cached block 0.
    fresh = make_seq([5], seq_id=1)
    admit(bm, fresh)
    assert fresh.block_table == [1]
    other = make_seq([6], seq_id=2)
    admit(bm, other)
    assert other.block_table == [2]
    assert bm.num_evictions == 0
    last = make_seq([7], seq_id=3)
    admit(bm, last)
    assert last.block_table == [0]
    assert bm.num_evictions == 1


def test_hit_on_a_free_cached_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3])
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq([1, 2, 9], seq_id=1)
    assert admit(bm, b) == 2
    assert b.block_table == [0, 1]
    assert bm.num_free_blocks == 2
    assert bm.blocks[0].ref_count == 1


def test_shared_hit_blocks_count_references():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3])
    admit(bm, a)
    compute(bm, a)
    b = make_seq([1, 2, 4], seq_id=1)
    assert admit(bm, b) == 2
    assert bm.blocks[0].ref_count == 2
    bm.free(a)
    assert bm.blocks[0].ref_count == 1
    bm.free(b)
    bm.assert_all_free()


def test_allocation_counts_revived_hit_blocks_against_the_free_pool():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = make_seq([1, 2, 3])
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    # Needs hit block 0 (leaving the free pool) plus 2 fresh blocks: 3 > 2 free, so it fails.
    b = make_seq([1, 2, 3, 4, 5], seq_id=1)
    hits = bm.get_cached_prefix(b)
    assert hits == [0]
    assert bm.allocate_slots(b, 3, hits) is None
    assert b.block_table == [] and bm.blocks[0].ref_count == 0
    bm.assert_all_free()


def test_fork_shares_blocks_and_the_first_write_to_a_shared_partial_block_copies_it():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4, 5, 6])
    admit(bm, parent)
    compute(bm, parent)
    child = Sequence(1, 1, parent.request, list(parent.token_ids), num_computed_tokens=6)
    bm.fork(parent, child)
    assert child.block_table == [0, 1]
    assert [bm.blocks[b].ref_count for b in (0, 1)] == [2, 2]

    child.token_ids.append(7)
    assert bm.allocate_slots(child, 1) == [(1, 2)]  # copy partial block 1 into fresh block 2
    assert child.block_table == [0, 2]
    parent.token_ids.append(8)
    assert bm.allocate_slots(parent, 1) == []  # block 1 is now parent's alone: written in place
    assert parent.block_table == [0, 1]
    assert [bm.blocks[b].ref_count for b in (0, 1, 2)] == [2, 1, 1]
    bm.free(parent)
    bm.free(child)
    bm.assert_all_free()


def test_a_block_computed_twice_is_cached_once():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 3], seq_id=1)
    admit(bm, a)
    admit(bm, b)  # admitted before `a` computed anything: no hit, its own blocks
    compute(bm, a)
    compute(bm, b)
    assert bm.blocks[a.block_table[0]].block_hash is not None
    assert bm.blocks[b.block_table[0]].block_hash is None
    bm.free(a)
    bm.free(b)
    bm.assert_all_free()


def test_reset_prefix_cache_forgets_unheld_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3])
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert bm.reset_prefix_cache() == 1
    assert bm.get_cached_prefix(make_seq([1, 2, 3], seq_id=1)) == []


def test_cache_salt_separates_identical_prompts():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3], salt="tenant-a")
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert bm.get_cached_prefix(make_seq([1, 2, 3], seq_id=1, salt="tenant-b")) == []
    assert bm.get_cached_prefix(make_seq([1, 2, 3], seq_id=2, salt="tenant-a")) == [0]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3])
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert bm.get_cached_prefix(make_seq([1, 2, 3], seq_id=1)) == []


def test_block_hash_is_pinned_across_processes_and_versions():
    # Every process and pod must agree. If this value changes, bump HASH_SCHEME_VERSION.
    assert HASH_SCHEME_VERSION == 1
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == [0x24C31F1F881B0759, 0xAA135ED2018EA223]


def test_block_hash_chains_on_the_parent():
    same_tokens = [5, 6, 7, 8]
    assert hash_block(None, same_tokens) != hash_block(hash_block(None, [1, 2, 3, 4]), same_tokens)
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])
    assert hash_block(None, [1], ("salt",)) != hash_block(None, [1])


@pytest.mark.parametrize("num_tokens, expected", [(0, 0), (3, 0), (4, 1), (9, 2)])
def test_only_full_blocks_are_hashed(num_tokens, expected):
    assert len(hash_blocks(list(range(num_tokens)), 4)) == expected


# ---- cache events (what workers publish to the fleet-wide prefix index) -------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def stored(self, block_hash: int) -> None:
        self.events.append(("stored", block_hash))

    def evicted(self, block_hash: int) -> None:
        self.events.append(("evicted", block_hash))


def test_listener_hears_stored_hashes_in_chain_order_and_evictions_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    listener = Recorder()
    bm.set_listener(listener)
    first = make_seq(list(range(9)), seq_id=0)  # 2 full blocks + 1 partial
    admit(bm, first)
    compute(bm, first)
    h0, h1 = hash_blocks(list(range(8)), 4)
    assert listener.events == [("stored", h0), ("stored", h1)]
    bm.free(first)
    listener.events.clear()

    # 16 fresh tokens take the whole pool: never-cached blocks 2 and 3 first, then the cached
    # blocks 1 (h1) and 0 (h0), which were freed tail first, so h1 goes before h0.
    other = make_seq(list(range(100, 116)), seq_id=1)
    assert bm.allocate_slots(other, 16) == []
    assert other.block_table == [2, 3, 1, 0]
    assert listener.events == [("evicted", h1), ("evicted", h0)]
    bm.free(other)
    bm.assert_all_free()


def test_a_hash_cached_twice_is_reported_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    listener = Recorder()
    bm.set_listener(listener)
    a, b = make_seq(list(range(5)), seq_id=0), make_seq(list(range(5)), seq_id=1)
    for seq in (a, b):  # both allocate before either is computed: two copies of block 0
        assert bm.allocate_slots(seq, 5) == []
    compute(bm, a)
    compute(bm, b)
    assert listener.events == [("stored", hash_block(None, [0, 1, 2, 3]))]
    bm.free(a)
    bm.free(b)
    bm.assert_all_free()


def test_reset_reports_every_dropped_hash_and_a_late_listener_hears_what_is_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(8)))
    admit(bm, seq)
    compute(bm, seq)
    bm.free(seq)
    late = Recorder()
    bm.set_listener(late)
    h0, h1 = hash_blocks(list(range(8)), 4)
    assert late.events == [("stored", h0), ("stored", h1)]
    assert bm.reset_prefix_cache() == 2
    assert sorted(late.events[2:]) == sorted([("evicted", h0), ("evicted", h1)])
