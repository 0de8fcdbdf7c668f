"""Accounting for the paged KV pool: free list, reference counts, prefix reuse keyed on token ids.

The pool holds `num_blocks` blocks of `block_size` token rows. A sequence owns a list of block
ids (its block table); a block's `token_ids` are the tokens whose K/V it holds, counting those
being computed in the current step (the engine stores every new token's K/V in a layer before any
attention of that layer reads the cache, so blocks filled this step are readable this step).

Prefix reuse:
- A FULL block is registered under the key (parent chain id, its tokens). The chain id is a
  unique integer given to every block when it is allocated, so a key names the whole prefix
  exactly: a dict lookup hashes the key and then compares it for equality, tokens included — a
  hash collision can never hand out the wrong block. A new request walks its full blocks from the
  root and shares every registered block it finds (reference count + 1).
- After the last shared block, the request may reuse the first rows of any block that continues
  the same chain (a partial tail, e.g. the end of a finished first attempt, or a full block whose
  tail differs): it gets a fresh block and the engine copies those rows (copy on write). The
  source is pinned until the step ends so nothing overwrites it before the copy, and a block that
  receives copied rows in this step is not a source in the same step (all copies of a step run
  as one batched gather, so it would hand out rows it has not received yet).
- Every prefill computes at least one token: the reusable prefix stops at len(tokens) - 1.
Released blocks keep their content and sit in an LRU free list; a sequence's blocks are released
tail first, so its prefix outlives its tail. Allocation takes the least recently used block and
forgets what it held. Blocks that hold nothing are put at the front of the list.

Not done: swapping blocks to host memory (preempted sequences are recomputed instead).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

from .sequence import Sequence

ROOT = -1  # parent chain id of a sequence's first block


class Block:
    __slots__ = ("block_id", "ref_count", "token_ids", "parent", "chain_id", "key")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.token_ids: list[int] = []
        self.parent = ROOT
        self.chain_id = ROOT
        self.key: tuple | None = None  # set while registered as a full block


@dataclass
class AllocationPlan:
    shared: list[int]  # full blocks reused as they are
    copy_source: int | None  # block whose first `copy_rows` rows start the next block
    copy_rows: int
    num_cached_tokens: int  # shared blocks' tokens + copied rows: K/V this request does not compute
    num_new_blocks: int
    num_from_free: int  # free-list blocks this plan consumes (new + revived + pinned)


@dataclass
class BlockCopy:
    """Rows [0, rows) of block `src` go to block `dst` (all layers), after this step's K/V stores."""

    src: int
    dst: int
    rows: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.high_water = 0  # blocks [0, high_water) have been handed out at least once
        self.full_blocks: dict[tuple, int] = {}  # (parent chain id, tokens) -> block id
        self.children: dict[int, set[int]] = {}  # parent chain id -> blocks continuing that chain
        self._chain_ids = count()
        self._pinned: list[int] = []  # copy sources held until `end_step`
        self._copy_targets: set[int] = set()  # blocks receiving copied rows in this step

    # ---------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def plan(self, token_ids: list[int]) -> AllocationPlan:
        """What admitting `token_ids` would reuse and take from the free list (changes nothing)."""
        bs = self.block_size
        n = len(token_ids)
        shared, parent = [], ROOT
        # only blocks that end before the last token: that token is always computed
        for start in range(0, n - bs, bs):
            block_id = self.full_blocks.get((parent, tuple(token_ids[start : start + bs])))
            if block_id is None:
                break
            shared.append(block_id)
            parent = self.blocks[block_id].chain_id
        cached = len(shared) * bs
        limit = min(bs, n - 1 - cached)
        copy_source, copy_rows = None, 0
        if limit > 0:
            want = token_ids[cached : cached + limit]
            for block_id in self.children.get(parent, ()):
                if block_id in self._copy_targets:
                    continue  # its rows arrive in the same batched copy: read its own source instead
                rows = _common_prefix(self.blocks[block_id].token_ids, want)
                if rows > copy_rows:
                    copy_source, copy_rows = block_id, rows
        num_new = self.blocks_for(n) - len(shared)
        revived = sum(1 for b in shared if self.blocks[b].ref_count == 0)
        pinned = int(copy_source is not None and self.blocks[copy_source].ref_count == 0)
        return AllocationPlan(shared, copy_source, copy_rows, cached + copy_rows, num_new, num_new + revived + pinned)

    def can_allocate(self, plan: AllocationPlan) -> bool:
        return plan.num_from_free <= len(self.free)

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the sequence's last token (the next decode step's input)?"""
        return (len(seq) - 1) % self.block_size != 0 or len(self.free) > 0

    # ---------------------------------------------------------------- changes
    def allocate(self, seq: Sequence, plan: AllocationPlan) -> BlockCopy | None:
        """Give `seq` its blocks per `plan` (made just before, with nothing changed in between)."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        if not self.can_allocate(plan):
            raise RuntimeError(f"{seq} needs {plan.num_from_free} free blocks, {len(self.free)} left")
        bs = self.block_size
        for block_id in plan.shared:
            self._acquire(block_id)
        copy = None
        if plan.copy_source is not None:
            self._acquire(plan.copy_source)
            self._pinned.append(plan.copy_source)
        table = list(plan.shared)
        parent = self.blocks[table[-1]].chain_id if table else ROOT
        tokens = seq.token_ids
        for start in range(len(table) * bs, len(tokens), bs):
            block = self._take_free(parent)
            self._add_tokens(block, tokens[start : start + bs])
            if copy is None and plan.copy_source is not None:
                copy = BlockCopy(plan.copy_source, block.block_id, plan.copy_rows)
                self._copy_targets.add(block.block_id)
            table.append(block.block_id)
            parent = block.chain_id
        seq.block_table = table
        seq.num_cached_tokens = plan.num_cached_tokens
        return copy

    def opens_block(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether holding `num_tokens` tokens takes the sequence one block more than it has."""
        return num_tokens > len(seq.block_table) * self.block_size

    def append_slot(self, seq: Sequence) -> None:
        """Record the sequence's last token (input of the coming decode step) in its blocks."""
        self._make_room(seq, len(seq))
        self._add_tokens(self.blocks[seq.block_table[-1]], [seq.token_ids[-1]])

    def reserve_pending_slot(self, seq: Sequence) -> None:
        """Room for the K/V of a token one past the sequence's last, not known yet: the input of a
        decode step launched before the host reads the step that samples it. `append_slot`
        records the token once it is known (and then takes no new block)."""
        self._make_room(seq, len(seq) + 1)

    def _make_room(self, seq: Sequence, num_tokens: int) -> None:
        if self.opens_block(seq, num_tokens):
            parent = self.blocks[seq.block_table[-1]].chain_id if seq.block_table else ROOT
            seq.block_table.append(self._take_free(parent).block_id)

    def free_sequence(self, seq: Sequence) -> None:
        """Release the sequence's blocks tail first; their content stays reusable until evicted."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def end_step(self) -> None:
        """Unpin this step's copy sources (the copies have run)."""
        for block_id in self._pinned:
            self._release(block_id)
        self._pinned = []
        self._copy_targets.clear()

    def clear_cache(self) -> None:
        """Forget every reusable block (e.g. the weights changed); only valid with no block in use."""
        in_use = [b.block_id for b in self.blocks if b.ref_count]
        if in_use:
            raise RuntimeError(f"clear_cache with {len(in_use)} blocks still in use")
        for block in self.blocks:
            self._forget(block)
        self.free = OrderedDict((i, None) for i in range(self.num_blocks))

    # ---------------------------------------------------------------- internals
    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than acquired")
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
            if not block.token_ids:
                self.free.move_to_end(block_id, last=False)

    def _take_free(self, parent: int) -> Block:
        block_id, _ = self.free.popitem(last=False)
        # Never-used blocks sit in the free list in id order behind every used one, so the blocks
        # ever handed out are exactly [0, high_water): the engine zeroes that range lazily.
        self.high_water = max(self.high_water, block_id + 1)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        block.parent = parent
        block.chain_id = next(self._chain_ids)
        self.children.setdefault(parent, set()).add(block_id)
        return block

    def _forget(self, block: Block) -> None:
        if block.key is not None and self.full_blocks.get(block.key) == block.block_id:
            del self.full_blocks[block.key]
        siblings = self.children.get(block.parent)
        if siblings is not None:
            siblings.discard(block.block_id)
            if not siblings:
                del self.children[block.parent]
        block.key = None
        block.token_ids = []
        block.parent = block.chain_id = ROOT

    def _add_tokens(self, block: Block, tokens: list[int]) -> None:
        block.token_ids.extend(tokens)
        if len(block.token_ids) > self.block_size:
            raise RuntimeError(f"block {block.block_id} overfilled")
        if len(block.token_ids) == self.block_size:
            key = (block.parent, tuple(block.token_ids))
            if key not in self.full_blocks:  # an equal block already registered keeps serving
                self.full_blocks[key] = block.block_id
                block.key = key

    def check_invariants(self, live: list[Sequence]) -> None:
        """Reference counts equal the holders; free list = unreferenced blocks (for tests)."""
        holders = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                holders[block_id] += 1
        for block_id in self._pinned:
            holders[block_id] += 1
        for block in self.blocks:
            if block.ref_count != holders[block.block_id]:
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count}, held {holders[block.block_id]} times"
                )
            if (block.ref_count == 0) != (block.block_id in self.free):
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count}, in free list {block.block_id in self.free}"
                )
        for key, block_id in self.full_blocks.items():
            if self.blocks[block_id].key != key:
                raise AssertionError(f"registry entry for block {block_id} does not match its key")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
