"""Rollout engine: paged KV cache with automatic prefix reuse and continuous batching.

    engine = Engine(model, block_size=16, num_blocks=None, max_model_len=None, max_num_seqs=256)
    outs = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=512, seed=7))
    outs[i][j]  # Completion(token_ids, logprobs, finish_reason) of sample j of prompt i

Every prompt (and every sample of it) looks up the longest cached prefix of its token ids, so the
n samples of a prompt compute the prompt once, and a second attempt `prompt + attempt1 +
instruction` computes only the instruction (the first attempt's blocks stay cached after it
finishes, until their memory is needed). `engine.clear_cache()` must be called when the weights
change: cached K/V belong to the weights that computed them. `engine.stats` counts prefilled
(computed) and reused prompt tokens.

A step runs either a prefill batch (all admitted sequences' uncached tokens packed into one
forward, eager) or a decode batch (one token per running sequence: decode_step.py, from
preallocated buffers, a CUDA graph per batch bucket on CUDA), then samples one token per sequence
in one batched pass (one device->host transfer per step). With async scheduling (on CUDA by
default) the host launches decode step N+1 before it reads step N's tokens: N+1 takes them as
input on the device, and the host's stop checks, bookkeeping and the next step's inputs run while
the device computes. A sequence that step N stops has then run one step too many; that token is
dropped (`stats.discarded_tokens`). Prefill, preemption and admission wait for the tokens.
The engine runs a forward of its own over inference weights of its own (inference_model.py: q|k|v
stacked into one matrix per layer, grouped per KV head on the CPU, in the engine's dtype), refreshed
in place from the model at every generate call and freed by `sleep()` with the KV pool. An engine
of another `dtype` than the model's weights (bf16 rollouts of fp32 master weights) holds every
weight in that dtype, and a KV pool of that dtype.
Completions include the stop token that ended them (EOS or a `stop_token_ids` member;
finish_reason "stop"); otherwise they end at max_tokens or max_model_len (finish_reason "length").

Not done: chunked prefill, speculative decoding, streaming, per-request SamplingParams within one
call.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from score.kernels.dispatch import interpreting

from ..model import Transformer
from .attention_context import BACKENDS, AttentionContext, flash_varlen_with_block_table, layer_views
from .block_manager import BlockManager
from .decode_step import DecodeStep, LaunchedStep, captures_graphs, check_batch_sizes, graph_batch_sizes
from .inference_model import InferenceModel, fsdp2_sharded
from .sampling import SamplingParams, sample, sample_seed, sampler_state
from .scheduler import ScheduledStep, Scheduler
from .sequence import Sequence, SequenceStatus
from .workspace import DecodeWorkspace


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


@dataclass
class EngineStats:
    """Cumulative since construction (or `reset`)."""

    prefilled_tokens: int = 0  # prompt tokens computed (recomputation after preemption included)
    reused_tokens: int = 0  # prompt tokens whose K/V came from the cache
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0
    discarded_tokens: int = 0  # sampled for sequences already stopped (async scheduling runs ahead)

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens served from the cache."""
        total = self.prefilled_tokens + self.reused_tokens
        return self.reused_tokens / total if total else 0.0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


class Engine:
    def __init__(
        self,
        model: Transformer,
        *,
        dtype: torch.dtype | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        kv_cache_memory_fraction: float = 0.5,
        attention_backend: str = "auto",
        decode_batch_sizes: list[int] | None = None,
        enforce_eager: bool = False,
        async_scheduling: bool | None = None,
    ):
        """`dtype`: what the engine computes in and caches K/V in (None: the model's weights' dtype);
        another dtype than the weights' makes the engine's inference weights copies in that dtype.
        `num_blocks=None` sizes the pool to `max_num_seqs` full-length sequences, capped at
        `kv_cache_memory_fraction` of the free device memory (host RAM on CPU).

        Decode steps run from preallocated buffers, padded up to one of `decode_batch_sizes`
        (decode_step.py); on CUDA each size is a CUDA graph, captured at first use, unless
        `enforce_eager`. Default sizes: 1, 2, 4, 8, then every 16 up to `max_num_seqs` where graphs
        run; elsewhere no padding. `async_scheduling` (default: on CUDA, where the device runs
        behind the host) launches each decode step before reading the previous one's tokens."""
        if not isinstance(model, Transformer):
            raise ValueError(f"Engine needs a score.model.Transformer, got {type(model).__name__}")
        cfg = model.config
        weight = model.lm_head_weight
        self.config, self.model, self.device = cfg, model, weight.device
        self.dtype = weight.dtype if dtype is None else dtype
        if self.dtype != weight.dtype and fsdp2_sharded(model):
            raise ValueError(
                f"an FSDP2 model's gathered weights are its compute dtype ({weight.dtype}); an engine over it "
                f"generates in that dtype, not {self.dtype}"
            )
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
        if max_model_len is None:
            max_model_len = cfg.max_position_embeddings
        if not isinstance(max_model_len, int) or not 2 <= max_model_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be an int in [2, max_position_embeddings="
                f"{cfg.max_position_embeddings}], got {max_model_len!r}"
            )
        self.max_model_len = max_model_len
        self.block_size = block_size
        num_layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        block_bytes = 2 * num_layers * block_size * kv_heads * head_dim * self.dtype.itemsize
        blocks_per_seq = -(-max_model_len // block_size)
        self._workspace = DecodeWorkspace()  # CPU buffers kept across steps (and, for attention, calls)
        self._inference = InferenceModel(model, self.dtype, self._workspace)  # before the pool is sized
        needed = blocks_per_seq + 1  # + one spare: a copy-on-write source stays pinned for a step
        if num_blocks is None:
            budget = int(_free_memory(self.device) * kv_cache_memory_fraction) // block_bytes
            num_blocks = min(budget, max_num_seqs * blocks_per_seq + 1)
        if not isinstance(num_blocks, int) or num_blocks < needed:
            raise ValueError(
                f"a KV pool of {num_blocks} blocks x {block_size} tokens cannot hold one sequence of "
                f"max_model_len={max_model_len} tokens: it needs at least {needed} blocks ({blocks_per_seq} "
                f"+ 1 spare for copy-on-write); raise num_blocks or lower max_model_len"
            )
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(max_model_len, 8192)
        if max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
                f"({max_model_len}): a prompt is prefilled in one step"
            )
        self.backend = self._pick_backend(attention_backend)
        self._use_graphs = not enforce_eager and captures_graphs(self.model, self.device)
        if async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be None, True or False, got {async_scheduling!r}")
        self._async_scheduling = self.device.type == "cuda" if async_scheduling is None else async_scheduling
        if decode_batch_sizes is not None:
            self._decode_batch_sizes = check_batch_sizes(decode_batch_sizes, max_num_seqs)
        elif self._use_graphs:
            self._decode_batch_sizes = graph_batch_sizes(max_num_seqs)
        else:
            self._decode_batch_sizes = None
        self._pool_shape = (2, num_layers, num_blocks, block_size, kv_heads, head_dim)
        self._allocate_pool()
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        eos = cfg.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.stats = EngineStats()
        self._last_decode: list | None = None  # the sequences of the previous step when it decoded
        self._decode: DecodeStep | None = None  # built at the first decode step after (re)allocation
        self._captures_before = 0  # CUDA graphs captured by the decode steps of earlier wakes
        self._in_flight: LaunchedStep | None = None  # a decode step launched, its tokens not read yet

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    def _allocate_pool(self) -> None:
        """The KV pool, uninitialised: blocks are zeroed when first handed out (`_zero_new_blocks`),
        so building an engine costs no pass over memory the cache may never use."""
        with torch.inference_mode():
            self.kv_cache = torch.empty(self._pool_shape, dtype=self.dtype, device=self.device)
            self._layer_caches = layer_views(self.kv_cache)
        self._zeroed_blocks = 0

    def _zero_new_blocks(self) -> None:
        """Zero the blocks handed out for the first time since the pool was allocated (attention
        reads whole blocks, masking the unwritten tail: it must hold numbers, not garbage)."""
        upto = self.block_manager.high_water
        if upto > self._zeroed_blocks:
            with torch.inference_mode():
                self.kv_cache[:, :, self._zeroed_blocks : upto].zero_()
            self._zeroed_blocks = upto

    @property
    def graph_captures(self) -> int:
        """CUDA graphs captured since construction: every bucket a run needs, once per wake."""
        return self._captures_before + (0 if self._decode is None else self._decode.num_captures)

    @property
    def sleeping(self) -> bool:
        return self.kv_cache is None

    def sleep(self) -> None:
        """Free the KV pool and the engine's inference weights (e.g. while the trainer runs its
        backward pass); cached prefixes are forgotten. `wake()` allocates them again; `generate`
        while asleep is an error."""
        if self.sleeping:
            return
        self.block_manager.clear_cache()
        self.block_manager.high_water = 0
        self.kv_cache, self._layer_caches, self._inference = None, [], None
        self._workspace = DecodeWorkspace()
        self._captures_before = self.graph_captures
        self._decode = None  # its buffers and graphs, which point into the freed pool
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Allocate the KV pool (empty: no prefix is cached) and the inference weights again after `sleep()`."""
        if self.sleeping:
            self._inference = InferenceModel(self.model, self.dtype, self._workspace)
            self._allocate_pool()

    def _pick_backend(self, backend: str) -> str:
        if backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {backend!r}")
        flash_ok = (
            self.device.type == "cuda"
            and self.dtype in (torch.float16, torch.bfloat16)
            and self.block_size % 256 == 0
            and flash_varlen_with_block_table() is not None
        )
        if backend == "auto":
            return "flash" if flash_ok else "triton" if self.device.type == "cuda" else "torch"
        if backend == "flash" and not flash_ok:
            raise ValueError(
                "attention_backend='flash' needs flash-attn installed, a CUDA fp16/bf16 model "
                f"and block_size % 256 == 0 (got {self.device}, {self.dtype}, {self.block_size})"
            )
        if backend == "triton" and self.device.type != "cuda" and not interpreting():
            raise ValueError("attention_backend='triton' needs a CUDA model (or TRITON_INTERPRET=1)")
        return backend

    def clear_cache(self) -> None:
        """Drop every cached prefix (call after the weights change)."""
        if self.scheduler.has_work():
            raise RuntimeError("clear_cache during generation")
        self.block_manager.clear_cache()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        use_tqdm: bool = False,
        *,
        seed_keys: list[int] | None = None,
        max_tokens: list[int] | None = None,
    ) -> list[list[Completion]]:
        """Outer list per prompt, inner list of `params.n` completions (sample order).

        Sample j of prompt i draws from the seed of (params.seed, seed_keys[i], j);
        `seed_keys` defaults to the prompt positions. A caller that splits one batch over several
        calls (data-parallel ranks, base/policy engines) passes each prompt's global position, so
        the samples do not depend on the split. `max_tokens` (one per prompt) replaces
        `params.max_tokens` prompt by prompt."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if self.sleeping:
            raise RuntimeError("the engine is asleep (its KV pool is freed): call wake() before generate")
        prompts = self._check_prompts(prompts)
        if seed_keys is None:
            seed_keys = list(range(len(prompts)))
        elif len(seed_keys) != len(prompts) or not all(isinstance(k, int) and k >= 0 for k in seed_keys):
            raise ValueError(f"seed_keys must be {len(prompts)} ints >= 0 (one per prompt), got {seed_keys!r:.80}")
        if max_tokens is None:
            max_tokens = [params.max_tokens] * len(prompts)
        elif len(max_tokens) != len(prompts) or not all(isinstance(m, int) and m >= 1 for m in max_tokens):
            raise ValueError(f"max_tokens must be {len(prompts)} ints >= 1 (one per prompt), got {max_tokens!r:.80}")
        base_seed = params.seed
        if base_seed is None and not params.greedy:
            base_seed = int(torch.randint(0, 2**62, (1,)))  # follows torch.manual_seed
        seqs = []
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                seed = None if params.greedy else sample_seed(base_seed, seed_keys[i], j)
                budget = min(max_tokens[i], self.max_model_len - len(prompt))
                seqs.append(Sequence(prompt, prompt_index=i, sample_index=j, max_tokens=budget, seed=seed))
        self._last_decode = None
        self._inference.refresh()  # the trainer updates the weights between calls
        if self._use_graphs:
            self._decode_step().forget_graphs_if_weights_moved()
            self._decode_step().capture_graphs(params, min(len(seqs), self.scheduler.max_num_seqs))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        bar = None
        if use_tqdm and sys.stderr.isatty():  # a bar redrawn into a log file is thousands of lines
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="seq")
        for seq in seqs:
            self.scheduler.add(seq)
        # Flush subnormal floats to zero for the duration of the call (CPU only; the flag is
        # process-wide, so the caller's setting is restored afterwards). Small-weight models
        # produce subnormal activations, which x86 handles in slow microcode; they lie below
        # fp32's normal range (~1.2e-38), so only values that small change.
        flush = self.device.type == "cpu" and not _flushing_denormals()
        if flush:
            flush = torch.set_flush_denormal(True)  # False where the CPU lacks the mode
        try:
            with torch.inference_mode():
                while self.scheduler.has_work() or self._in_flight is not None:
                    finished = self._step(params, stop_ids)
                    if bar is not None:
                        bar.update(finished)
        except BaseException:
            self._abort()
            raise
        finally:
            if flush:
                torch.set_flush_denormal(False)
            self._inference.drop_call_buffers()  # V x D floats: not kept between calls
            self._workspace.drop_vocab_buffers()  # S x V buffers, likewise
            if bar is not None:
                bar.close()
        out = [[None] * params.n for _ in prompts]
        for seq in seqs:
            out[seq.prompt_index][seq.sample_index] = Completion(seq.output_ids, seq.logprobs, seq.finish_reason)
        return out

    def _check_prompts(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token id lists")
        vocab = self.config.vocab_size
        checked = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.tolist()
            if not isinstance(prompt, (list, tuple)) or not prompt:
                raise ValueError(f"prompts[{i}] must be a non-empty list of token ids, got {prompt!r:.80}")
            if len(prompt) >= self.max_model_len:
                raise ValueError(
                    f"prompts[{i}] has {len(prompt)} tokens; max_model_len={self.max_model_len} "
                    "leaves no room for a generated token"
                )
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab))
                raise ValueError(f"prompts[{i}] holds {bad!r}, not a token id in [0, {vocab})")
            checked.append(list(prompt))
        return checked

    def _abort(self) -> None:
        """Drop every queued and running sequence (after an error) so the engine stays usable."""
        sched = self.scheduler
        for seq in list(sched.running):
            self.block_manager.free_sequence(seq)
        sched.running.clear()
        sched.waiting.clear()
        self.block_manager.end_step()
        self._last_decode = None
        self._in_flight = None

    def _step(self, params: SamplingParams, stop_ids: frozenset) -> int:
        """One engine step; how many sequences it finished."""
        if self._in_flight is not None:  # launch the next decode step, then read the one running
            running = self._in_flight
            ahead = self.scheduler.schedule_ahead(running.seqs)
            self._in_flight = None if ahead is None else self._launch_decode(ahead, params, after=running)
            return self._collect_decode(running, stop_ids)
        step = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        if not step.seqs:  # every running sequence was preempted; the next step re-admits them
            return 0
        if not step.is_prefill:
            launched = self._launch_decode(step.seqs, params)
            if self._async_scheduling:
                self._in_flight = launched
                return 0
            return self._collect_decode(launched, stop_ids)
        self._zero_new_blocks()
        self._last_decode = None
        tokens, logprobs = self._prefill(step, params)
        self.block_manager.end_step()
        stats = self.stats
        stats.prefill_steps += 1
        stats.prefilled_tokens += sum(len(seq) - seq.num_cached_tokens for seq in step.seqs)
        stats.reused_tokens += step.num_reused_tokens
        return self._record(step.seqs, tokens, logprobs, stop_ids)

    def _launch_decode(self, seqs: list[Sequence], params: SamplingParams, after: LaunchedStep | None = None):
        self._zero_new_blocks()
        last, self._last_decode = self._last_decode, list(seqs)
        # the torch attention path keeps each layer's gathered K/V between steps of one batch
        continues = last is not None and len(last) == len(seqs)
        continues = continues and all(a is b for a, b in zip(last, seqs, strict=True))
        launched = self._decode_step().launch(seqs, params, continues, after)
        self.block_manager.end_step()
        self.stats.decode_steps += 1
        return launched

    def _collect_decode(self, launched: LaunchedStep, stop_ids: frozenset) -> int:
        tokens, logprobs = self._decode.collect(launched)
        finished = self._record(launched.seqs, tokens, logprobs, stop_ids)
        if self._in_flight is not None:  # its input is these tokens: they go into its blocks now
            for seq in self._in_flight.seqs:
                if seq.status is SequenceStatus.RUNNING:
                    self.block_manager.append_slot(seq)
        return finished

    def _record(self, seqs, tokens, logprobs, stop_ids: frozenset) -> int:
        """Append each sequence's sampled token and finish those it ends; how many finished."""
        stats, finished = self.stats, 0
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            if seq.status is SequenceStatus.FINISHED:  # stopped by the step before this one
                stats.discarded_tokens += 1
                continue
            stats.generated_tokens += 1
            seq.num_cached_tokens = len(seq)
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            if token in stop_ids:
                self.scheduler.finish(seq, "stop")
            elif seq.num_output_tokens >= seq.max_tokens:
                self.scheduler.finish(seq, "length")
            else:
                continue
            finished += 1
        return finished

    def _prefill(self, step: ScheduledStep, params: SamplingParams) -> tuple[list[int], list[float]]:
        """Run a prefill step eagerly (packed prompts of any lengths) and sample each one's first
        token: (tokens, logprobs), one host transfer each."""
        bs = self.block_size
        input_ids, positions, slots, q_lens = [], [], [], []
        for seq in step.seqs:
            start, table = seq.num_cached_tokens, seq.block_table
            input_ids.extend(seq.token_ids[start:])
            positions.extend(range(start, len(seq)))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, len(seq)))
            q_lens.append(len(seq) - start)
        context_lens = [len(seq) for seq in step.seqs]
        width = max(len(seq.block_table) for seq in step.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in step.seqs]
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        copy_src = copy_dst = None
        if step.copies:
            src_rows, dst_rows = [], []
            for c in step.copies:
                src_rows.extend(range(c.src * bs, c.src * bs + c.rows))
                dst_rows.extend(range(c.dst * bs, c.dst * bs + c.rows))
            copy_src, copy_dst = self._ints(src_rows, torch.long), self._ints(dst_rows, torch.long)
        ctx = AttentionContext(
            self.kv_cache,
            backend=self.backend,
            slot_mapping=self._ints(slots, torch.int32),
            block_tables=self._ints(tables, torch.int32),
            context_lens=self._ints(context_lens, torch.int32),
            cu_seqlens_q=self._ints(cu, torch.int32),
            max_q_len=max(q_lens),
            max_context_len=max(context_lens),
            copy_src=copy_src,
            copy_dst=copy_dst,
            workspace=self._workspace,
            continues_decode=False,
            layer_caches=self._layer_caches,
        )
        ids, pos = self._ints(input_ids, torch.long), self._ints(positions, torch.long)
        hidden = self._inference.hidden_states(ids, pos, ctx)
        if max(q_lens) > 1:
            hidden = hidden[self._ints(cu[1:], torch.long) - 1]
        states = None
        if not params.greedy:  # the sampler's keys: each sequence's seed and its next token's number
            states = self._ints([sampler_state(seq.seed, seq.num_output_tokens) for seq in step.seqs], torch.long)
        workspace = self._workspace if self.device.type == "cpu" else None
        tokens, logprobs = sample(self._inference.logits(hidden), params, states, workspace)
        return self._workspace.to_lists(tokens, logprobs, len(step.seqs))

    def _decode_step(self) -> DecodeStep:
        if self._decode is None:
            self._decode = DecodeStep(
                self._inference,
                kv_cache=self.kv_cache,
                layer_caches=self._layer_caches,
                backend=self.backend,
                block_size=self.block_size,
                max_model_len=self.max_model_len,
                max_num_seqs=self.scheduler.max_num_seqs,
                batch_sizes=self._decode_batch_sizes,
                use_graphs=self._use_graphs,
                workspace=self._workspace,
            )
        return self._decode

    def _ints(self, values, dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t


def _flushing_denormals() -> bool:
    """Whether subnormal results are flushed to zero right now (torch has no getter for it)."""
    product = torch.tensor([1e-30], dtype=torch.float32) * torch.tensor([1e-10], dtype=torch.float32)
    return bool(product[0] == 0)  # 1e-40 is subnormal in fp32


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # a platform without sysconf: assume 4 GiB
