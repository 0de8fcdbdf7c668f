"""Continuous batching: which sequences run in the next engine step.

A step is either a prefill step (newly admitted sequences, each computing the tokens its cached
prefix does not cover — at least one) or a decode step (one token for every running sequence).
Prefill goes first: waiting sequences are admitted in order while the batch has seats
(`max_num_seqs`), the token budget (`max_num_batched_tokens`) holds and the block pool can hold
their tokens. Otherwise every running sequence decodes; when the pool cannot take the next token
of one, the newest running sequence is preempted — its blocks are released (they stay cached)
and it goes back to the front of the queue to be recomputed — until the older ones fit.

Not done: chunked prefill (a prompt is prefilled in one step; the engine caps prompt length at
max_model_len, which is at most the token budget) and priorities beyond arrival order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockCopy, BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    is_prefill: bool
    copies: list[BlockCopy] = field(default_factory=list)
    num_reused_tokens: int = 0  # prefill: tokens whose K/V came from the cache instead of compute


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = self._schedule_prefill()
        if step.seqs:
            return step
        if self.waiting and not self.running:
            # unreachable when the pool holds one max_model_len sequence (the Engine checks that)
            raise RuntimeError(f"the KV block pool cannot hold waiting sequence {self.waiting[0]}")
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledStep:
        bm = self.block_manager
        step = ScheduledStep([], True)
        num_tokens = 0
        while self.waiting and len(self.running) + len(step.seqs) < self.max_num_seqs:
            seq = self.waiting[0]
            plan = bm.plan(seq.token_ids)
            new_tokens = len(seq) - plan.num_cached_tokens
            if step.seqs and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not bm.can_allocate(plan):
                break
            copy = bm.allocate(seq, plan)
            if copy is not None:
                step.copies.append(copy)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            step.seqs.append(seq)
            step.num_reused_tokens += plan.num_cached_tokens
            num_tokens += new_tokens
        self.running.extend(step.seqs)
        return step

    def _schedule_decode(self) -> ScheduledStep:
        bm = self.block_manager
        # A sequence needs a fresh block when its last token starts one. When the free list holds
        # one for each, nobody is preempted: every running sequence decodes, in order (the loop
        # below would do the same, with checks per sequence that cost host time at large batches).
        bs = bm.block_size
        if sum((len(seq) - 1) % bs == 0 for seq in self.running) <= bm.num_free_blocks:
            for seq in self.running:
                bm.append_slot(seq)
            return ScheduledStep(list(self.running), False)
        scheduled = []
        while self.running:
            seq = self.running.popleft()
            while not bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                bm.append_slot(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return ScheduledStep(scheduled, False)

    def schedule_ahead(self, seqs: list[Sequence]) -> list[Sequence] | None:
        """The decode step to launch after the step of `seqs` while that one runs, before its tokens
        are known: those of `seqs` still running whose coming token cannot end them by length,
        each given room for that token. None when the step must wait for the tokens instead: a
        waiting sequence could be admitted (prefill goes first), or the pool lacks a block for
        one of them (the plain schedule may preempt). A sequence that the coming token stops runs
        one step more than it needs; its token is dropped."""
        bm = self.block_manager
        if self.waiting and len(self.running) < self.max_num_seqs:
            if bm.can_allocate(bm.plan(self.waiting[0].token_ids)):
                return None
        ahead = [s for s in seqs if s.status is SequenceStatus.RUNNING and s.num_output_tokens + 1 < s.max_tokens]
        starting = [s for s in ahead if bm.opens_block(s, len(s) + 1)]  # the pending token opens a block
        if not ahead or len(starting) > bm.num_free_blocks:
            return None
        for seq in starting:
            bm.reserve_pending_slot(seq)
        return ahead

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
