"""Block accounting of the paged KV pool: reuse, copy on write, LRU eviction, no leaks.

The simulations keep a fake cache whose "K/V" of a position is the token id itself, written the
way the engine writes it (new tokens stored, then copies), so any wrongly shared or evicted
block shows up as a sequence reading back tokens that are not its own.
"""

import random

import pytest

from score.model.engine.block_manager import BlockManager
from score.model.engine.sequence import Sequence


def make_seq(tokens):
    return Sequence(tokens, prompt_index=0, sample_index=0, max_tokens=10**9, seed=None)


class FakeCache:
    def __init__(self, bm):
        self.bm = bm
        self.rows = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def store(self, seq, start):
        bs = self.bm.block_size
        for pos in range(start, len(seq)):
            self.rows[seq.block_table[pos // bs]][pos % bs] = seq.token_ids[pos]

    def copy_all(self, copies):
        """A step's copies as the engine runs them: one gather of every source, then the writes."""
        copies = [c for c in copies if c is not None]
        gathered = [list(self.rows[c.src][: c.rows]) for c in copies]
        for c, rows in zip(copies, gathered, strict=True):
            self.rows[c.dst][: c.rows] = rows

    def check(self, seq):
        bs = self.bm.block_size
        assert len(seq.block_table) == self.bm.blocks_for(len(seq))
        got = [self.rows[seq.block_table[p // bs]][p % bs] for p in range(len(seq))]
        assert got == seq.token_ids, f"{seq} reads back foreign tokens"


def admit(bm, cache, batch):
    """One prefill step: allocate all, store every new token, then run the copies (engine order)."""
    copies = []
    for seq in batch:
        plan = bm.plan(seq.token_ids)
        assert bm.can_allocate(plan)
        copies.append(bm.allocate(seq, plan))
        assert seq.num_cached_tokens == plan.num_cached_tokens <= len(seq) - 1
    for seq in batch:
        cache.store(seq, seq.num_cached_tokens)
    cache.copy_all(copies)
    bm.end_step()
    for seq in batch:
        cache.check(seq)
    return copies


def test_samples_of_one_prompt_share_it_and_copy_the_tail():
    bm = BlockManager(num_blocks=32, block_size=4)
    cache = FakeCache(bm)
    prompt = list(range(100, 110))  # 2 full blocks + 2-token tail
    samples = [make_seq(prompt) for _ in range(3)]
    copies = admit(bm, cache, samples)  # all in the same step
    assert samples[0].num_cached_tokens == 0
    for seq, copy in zip(samples[1:], copies[1:], strict=True):
        assert seq.block_table[:2] == samples[0].block_table[:2]
        assert seq.num_cached_tokens == 9  # 8 shared + 1 copied row; the last token is computed
        assert copy.src == samples[0].block_table[2] and copy.rows == 1
    assert [bm.blocks[b].ref_count for b in samples[0].block_table[:2]] == [3, 3]
    bm.check_invariants(samples)


def test_second_attempt_reuses_the_whole_first_attempt():
    bm = BlockManager(num_blocks=64, block_size=16)
    cache = FakeCache(bm)
    first = make_seq(list(range(256)))
    admit(bm, cache, [first])
    for token in range(1000, 1134):  # 134 generated tokens: ends 6 tokens into a block
        first.token_ids.append(token)
        assert bm.can_append(first)
        bm.append_slot(first)
        cache.store(first, len(first) - 1)
    cache.check(first)
    bm.free_sequence(first)
    second = make_seq(first.token_ids + list(range(2000, 2016)))
    (copy,) = admit(bm, cache, [second])
    assert second.num_cached_tokens == 390  # 24 shared blocks + 6 copied rows: only the 16 new computed
    assert copy.rows == 6
    bm.free_sequence(second)
    bm.check_invariants([])


def test_identical_block_aligned_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    cache = FakeCache(bm)
    a = make_seq(list(range(8)))
    admit(bm, cache, [a])
    b = make_seq(list(range(8)))
    (copy,) = admit(bm, cache, [b])
    assert b.num_cached_tokens == 7 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1] and copy.rows == 3


def test_lru_evicts_the_tail_of_a_finished_sequence_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    cache = FakeCache(bm)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])  # all four blocks
    admit(bm, cache, [a])
    head, tail = a.block_table[0], a.block_table[-1]
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4
    b = make_seq([9, 9, 9])  # two fresh blocks: the two last blocks of `a` go first
    admit(bm, cache, [b])
    assert tail in b.block_table and head not in b.block_table
    bm.free_sequence(b)
    c = make_seq([1, 2, 3, 4, 50])  # a's first two blocks survived
    admit(bm, cache, [c])
    assert c.num_cached_tokens == 4 and c.block_table[0] == head


def test_clear_cache_forgets_everything_and_refuses_while_in_use():
    bm = BlockManager(num_blocks=8, block_size=2)
    cache = FakeCache(bm)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, cache, [a])
    with pytest.raises(RuntimeError, match="in use"):
        bm.clear_cache()
    bm.free_sequence(a)
    bm.clear_cache()
    assert bm.plan([1, 2, 3, 4, 5]).num_cached_tokens == 0
    assert not bm.full_blocks and not bm.children


def test_thousand_random_requests_leak_nothing():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=96, block_size=4)
    cache = FakeCache(bm)
    live, history, admitted, reused, copies = [], [], 0, 0, 0
    while admitted < 1000:
        # a prefill step: up to 3 requests (fresh, a repeat, or an extension of an earlier one)
        batch, step_copies = [], []
        for _ in range(rng.randint(0, 3)):
            kind = rng.random()
            if history and kind < 0.35:
                base = rng.choice(history)
                tokens = base[: rng.randint(1, len(base))] + [rng.randrange(50) for _ in range(rng.randint(0, 12))]
            elif history and kind < 0.5:
                tokens = list(rng.choice(history))
            else:
                tokens = [rng.randrange(50) for _ in range(rng.randint(1, 40))]
            plan = bm.plan(tokens)
            if not bm.can_allocate(plan):
                break
            seq = make_seq(tokens)
            step_copies.append(bm.allocate(seq, plan))
            copies += plan.copy_source is not None
            batch.append(seq)
        for seq in batch:
            cache.store(seq, seq.num_cached_tokens)
        cache.copy_all(step_copies)
        bm.end_step()
        for seq in batch:
            cache.check(seq)
            reused += seq.num_cached_tokens
        live.extend(batch)
        admitted += len(batch)
        # a decode step for some live sequences, finishing others
        for seq in list(live):
            if rng.random() < 0.2 or len(seq) > 60:
                bm.free_sequence(seq)
                live.remove(seq)
                history.append(seq.token_ids)
                continue
            seq.token_ids.append(rng.randrange(50))
            if not bm.can_append(seq):  # pool full: preempt (free) this one
                bm.free_sequence(seq)
                live.remove(seq)
                continue
            bm.append_slot(seq)
            cache.store(seq, len(seq) - 1)
            cache.check(seq)
        history = history[-200:]
        bm.check_invariants(live)
    for seq in live:
        bm.free_sequence(seq)
    bm.check_invariants([])
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.num_free_blocks == bm.num_blocks
    assert reused > 1000 and copies > 50  # the workload did exercise sharing and copy on write
