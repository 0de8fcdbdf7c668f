"""Sampling parameters and the sampler: temperature, top-k, top-p, per-request seeds, logprobs.

Reported logprobs are those of the sampling distribution BEFORE top-k/top-p truncation:
`log_softmax(logits / temperature)` of the chosen token, and plain `log_softmax(logits)` for
greedy (temperature 0). This is what an RL trainer recomputes from the same weights, so the two
agree up to numerics (truncation would put log(kept mass) into every ratio).

Randomness is counter-based: every sequence has a 63-bit seed (from seed, prompt key and sample
index, `sample_seed`), and its t-th generated token uses the uniform number SplitMix64 gives for
(seed, t) (`counter_uniforms`: a few int64 tensor ops for the whole batch, no generator objects,
nothing per sequence). The token is where that number falls in the cumulative distribution
(inverse-CDF sampling, cumulative sums in float64 so a 32k-128k vocabulary loses no resolution).
So one pass samples the whole step, and a sequence's samples do not depend on which other
sequences share its batch, nor on preemption. Nothing here reads a tensor back to the host; the
engine does one transfer per step for the whole batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .workspace import DecodeWorkspace, SampleResults


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0 or -1: off
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None  # None: drawn from torch's default generator

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an int >= 1, or 0/-1 for off, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        try:
            stops = tuple(int(t) for t in self.stop_token_ids)
        except (TypeError, ValueError):
            raise ValueError(f"SamplingParams.stop_token_ids must be token ids, got {self.stop_token_ids!r}") from None
        object.__setattr__(self, "stop_token_ids", stops)
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit generator seed for sample j of prompt i, stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# SplitMix64 (Steele, Lea & Flood 2014): output t of state `seed` is mix(seed + t * GAMMA). As int64
# tensors: multiplication and addition wrap modulo 2**64 like the uint64 original, and the logical
# right shifts are arithmetic shifts masked to the bits a logical shift keeps.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(value: int) -> int:
    """The int64 whose two's-complement bits are the uint64 `value`."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def sampler_state(seed: int, counter: int) -> int:
    """The SplitMix64 state whose mix is output number `counter + 1` of `seed`, as the int64 a
    tensor holds it: what `sample` takes per row (the host knows seeds and counters, so a step's
    states are written with its other inputs instead of computed by three more tensor ops)."""
    return _int64((seed + (counter + 1) * _GAMMA) % (1 << 64))


def sampler_states(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """`sampler_state` elementwise for int64 tensors [S] (the additions wrap modulo 2**64)."""
    return seeds + (counters + 1) * _int64(_GAMMA)


def _mix53(states: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output for each state, its top 53 bits as a non-negative int64."""
    z = (states ^ _shift_right(states, 30)) * _int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(_MIX2)
    return _shift_right(z ^ _shift_right(z, 31), 11)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1), 53 random bits each: SplitMix64's output number
    `counters + 1` from state `seeds` (int64 [S] each), elementwise."""
    return _mix53(sampler_states(seeds, counters)).double() * 2.0**-53


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [S, V] with everything outside the top-k and the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (the most likely
    token always stays). Top-k applies first.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    states: torch.Tensor | None,
    workspace: DecodeWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [S] (int64) and their logprobs [S] (fp32) from fp32 logits [S, V]; row i uses the
    uniform number of `states[i]` (int64 [S] or [S, 1] on the logits' device, `sampler_state`;
    None for greedy).

    `workspace` (optional, kept by the caller across calls) holds the [S, V] intermediates and the
    results; the same kernels write into it, so the numbers do not change. The results are then
    its buffers, valid until the next call.
    """
    logits = logits if logits.dtype == torch.float32 else logits.float()
    rows = logits.shape[0]
    results = SampleResults(rows, logits.device) if workspace is None else workspace.sample_results(rows, logits.device)
    tokens, logprobs = results.token_column, results.logprob_column  # [S, 1] each
    if params.greedy:
        torch.argmax(logits, dim=-1, keepdim=True, out=tokens)
        logprobs_all = torch.log_softmax(logits, dim=-1, out=_buffer(workspace, "logprobs", logits))
        torch.gather(logprobs_all, -1, tokens, out=logprobs)
        return results.tokens, results.logprobs
    if states is None or states.shape not in ((rows,), (rows, 1)) or states.dtype != torch.int64:
        raise ValueError(f"sampling {rows} rows needs int64 sampler states of shape [{rows}]")
    scaled = logits
    if params.temperature != 1.0:  # x / 1 == x exactly
        scaled = torch.div(logits, params.temperature, out=_buffer(workspace, "scaled", logits))
    logprobs_all = torch.log_softmax(scaled, dim=-1, out=_buffer(workspace, "logprobs", logits))
    if 0 < params.top_k < logits.shape[-1] or params.top_p < 1.0:
        weights = torch.softmax(truncate_logits(scaled, params.top_k, params.top_p), dim=-1, dtype=torch.float64)
    else:  # the float64 copy of the logprobs, exponentiated in place: logprobs_all.double().exp()
        weights = _buffer(workspace, "weights", logits, torch.float64).copy_(logprobs_all).exp_()
    cdf = weights.cumsum_(dim=-1)
    # the first index whose cumulative mass exceeds u * total, u = bits * 2**-53: a token of zero
    # mass is never picked. bits * (total * 2**-53) is the same product rounded once (a power of
    # two scales exactly), and the int64 bits promote to float64 inside the multiply.
    bits = _mix53(states if states.dim() == 2 else states[:, None])
    torch.searchsorted(cdf, bits * (cdf[:, -1:] * 2.0**-53), right=True, out=tokens)
    tokens.clamp_(max=logits.shape[-1] - 1)
    torch.gather(logprobs_all, -1, tokens, out=logprobs)
    return results.tokens, results.logprobs


def _buffer(
    workspace: DecodeWorkspace | None, name: str, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An uninitialised tensor of `like`'s shape (and `dtype`, default like's), from `workspace` if given."""
    dtype = like.dtype if dtype is None else dtype
    if workspace is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return workspace.vocab_buffer("sample_" + name, like.shape, dtype, like.device)
