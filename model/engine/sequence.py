"""One generation request inside the engine: its tokens, its cache blocks, its sampling state.

A `Sequence` is sample j of prompt i of one `generate` call. `token_ids` holds the prompt then
every generated token; `num_cached_tokens` counts the leading tokens whose K/V are in the cache
(reused at admission or computed by earlier steps), so the next prefill computes
`token_ids[num_cached_tokens:]`. After a preemption the sequence keeps its generated tokens and
recomputes their K/V on re-admission (prompt and outputs alike), keeping its own RNG, so its
samples do not depend on when it ran.
"""

from __future__ import annotations

import enum
from itertools import count


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _ids = count()

    def __init__(
        self,
        token_ids: list[int],
        *,
        prompt_index: int,
        sample_index: int,
        max_tokens: int,
        seed: int | None,
    ):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.max_tokens = max_tokens  # already capped by the engine's max_model_len
        self.seed = seed  # 63-bit sampling seed (sampling.sample_seed); None for greedy
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.status = SequenceStatus.WAITING
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, prompt={self.prompt_index}, sample={self.sample_index}, "
            f"len={len(self)}, cached={self.num_cached_tokens}, status={self.status.value})"
        )
