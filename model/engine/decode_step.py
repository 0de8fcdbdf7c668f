"""The engine's decode step as one function of preallocated buffers; on CUDA, CUDA graphs of it.

A decode step feeds every running sequence's last token through the model and samples the next.
Its inputs go into buffers allocated once, the batch padded up to a bucket size: token ids,
positions, sampler states and KV slots as cache rows in one int64 buffer; KV slots, context
lengths and block tables in one int32 buffer (what the kernels read). A step is then two
host-to-device copies, one call of `_compute` (which reads only those buffers) and one
device-to-host copy of the sampled ids and logprobs.

`launch` starts a step and `collect` reads its tokens, so that the engine can schedule and start
step N+1 while step N runs (`Engine(async_scheduling=...)`). A step launched `after` another takes
its input ids from that step's sampled ids on the device (one gather), before the host has seen
them; its sequences' last tokens are then the pending ones, one past `len(seq)`. On CUDA the host
staging buffers come in two sets used in turn, so that filling step N+1's inputs never overwrites
step N's before their copy to the device has run, nor its sampled ids before they are read.

On CUDA `_compute` is captured as a CUDA graph per (bucket, sampling settings) and replayed: one
launch per step instead of hundreds, no Python inside. The buckets are nano-vllm's (1, 2, 4, 8,
then every 16 up to `max_num_seqs`). The engine asks for every bucket a generate call can use before
the call's first step (`capture_graphs`): they are captured together, largest first, into one shared
memory pool (a smaller graph's activations fit in a larger one's freed blocks), from inputs that
store nothing. The graphs live as long as the pool and the buffers they read: until `sleep()`,
so an engine captures each bucket once per wake. On the CPU a step runs eagerly on the unpadded
batch: without graphs padding buys nothing.

Padding rows repeat row 0 with KV slot -1 (never stored): they compute finite numbers that are
dropped. A graph bakes in what the host decided at capture: the addresses of the KV pool and of
the weights (the graphs are dropped when either moves), the block-table width and the
attention's context bound (the longest sequence the engine admits), the sampling settings.
Models under FSDP2 are never captured: their gathered weights move from one rollout to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_context import AttentionContext
from .inference_model import InferenceModel, fsdp2_sharded
from .sampling import SamplingParams, sample, sampler_state
from .sequence import Sequence
from .workspace import DecodeWorkspace

_LONG_ROWS = ("input_ids", "positions", "sampler_states", "store_rows", "source_rows")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """nano-vllm's CUDA graph batch sizes, 1, 2, 4, 8, 16, 32, 48, ..., capped at `max_num_seqs`."""
    sizes = [1, 2, 4, 8, *range(16, max_num_seqs + 16, 16)]
    return sorted({min(s, max_num_seqs) for s in sizes})


def check_batch_sizes(sizes, max_num_seqs: int) -> list[int]:
    """`sizes` as a sorted list, or a ValueError naming what is wrong with it."""
    if (
        not isinstance(sizes, (list, tuple))
        or not sizes
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
    ):
        raise ValueError(f"decode_batch_sizes must be a non-empty list of ints >= 1, got {sizes!r:.80}")
    sizes = sorted(set(sizes))
    if sizes[-1] < max_num_seqs:
        raise ValueError(
            f"decode_batch_sizes must reach max_num_seqs={max_num_seqs} (a decode step pads up to one of "
            f"them), the largest is {sizes[-1]}"
        )
    return sizes


class _Staging:
    """One set of host buffers a step's inputs are written into (on the CPU: the device buffers
    themselves), with what its block-table rows hold, and (CUDA) pinned room for its results."""

    def __init__(self, longs: torch.Tensor, ints: torch.Tensor, table_start: int, rows: int, pinned: bool):
        self.longs, self.ints = longs, ints
        # numpy views: a step's inputs are written from Python lists without a torch op (a
        # decode step on the CPU is hundreds of small ops; these need none)
        self.longs_np, self.ints_np = longs.numpy(), ints.numpy()
        self.tables_np = self.ints_np[table_start:]
        # per row: the block-table list last written there and how many of its entries (a list
        # object is a sequence's table from its admission to its release: the engine only appends)
        self.tables: list[list[int] | None] = [None] * rows
        self.table_lengths = [0] * rows
        self.tokens = self.logprobs = None
        if pinned:
            self.tokens = torch.zeros(rows, dtype=torch.long, pin_memory=True)
            self.logprobs = torch.zeros(rows, dtype=torch.float32, pin_memory=True)


@dataclass
class LaunchedStep:
    """A decode step started by `DecodeStep.launch`; `DecodeStep.collect` gives its results."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [bucket] sampled ids on the device (a later step's input ids)
    results: tuple[list[int], list[float]] | None  # the CPU's (synchronous) tokens and logprobs
    staging: _Staging
    done: torch.cuda.Event | None  # CUDA: recorded after the copy of the results to the host


def captures_graphs(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether decode steps of `model` can be CUDA graphs: CUDA, and no FSDP2 module inside."""
    return device.type == "cuda" and not fsdp2_sharded(model)


class DecodeStep:
    def __init__(
        self,
        model: InferenceModel,
        *,
        kv_cache: torch.Tensor,
        layer_caches: list,
        backend: str,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        batch_sizes: list[int] | None,
        use_graphs: bool,
        workspace: DecodeWorkspace,
    ):
        """`model`: the engine's forward over its inference weights. `batch_sizes`: the buckets, the
        largest >= max_num_seqs (None: no padding; graphs need buckets)."""
        if use_graphs and batch_sizes is None:
            raise ValueError("CUDA graphs of the decode step need batch sizes to pad to")
        self.model, self.kv_cache, self.layer_caches = model, kv_cache, layer_caches
        self.backend, self.block_size, self.max_model_len = backend, block_size, max_model_len
        self.batch_sizes, self.use_graphs = batch_sizes, use_graphs
        self.workspace = workspace
        device = kv_cache.device
        self.width = -(-max_model_len // block_size)  # block-table columns of the longest sequence
        rows = max_num_seqs if batch_sizes is None else batch_sizes[-1]
        self._longs = torch.zeros(len(_LONG_ROWS) * rows, dtype=torch.long, device=device)
        self._ints = torch.zeros(rows * (2 + self.width), dtype=torch.int32, device=device)
        self._cu_seqlens = torch.arange(rows + 1, dtype=torch.int32, device=device)  # one query per row
        self._table_start = 2 * rows  # slots and context lengths first, then the block-table rows
        if device.type == "cuda":  # pinned staging, for asynchronous copies both ways, in turn
            self._stagings = [
                _Staging(
                    torch.zeros(self._longs.shape, dtype=torch.long, pin_memory=True),
                    torch.zeros(self._ints.shape, dtype=torch.int32, pin_memory=True),
                    self._table_start,
                    rows,
                    pinned=True,
                )
                for _ in range(2)
            ]
        else:
            self._stagings = [_Staging(self._longs, self._ints, self._table_start, rows, pinned=False)]
        self._turn = 0
        self._views_of: dict[int, dict[str, torch.Tensor]] = {}
        self._checked_sizes: set[int] = set()  # batch sizes whose attention arguments were checked
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._graph_pool = None
        self._weights_key = self._weight_addresses()
        self.num_captures = 0

    def bucket(self, num_seqs: int) -> int:
        """The batch size a step of `num_seqs` sequences runs at: the smallest bucket that fits
        (no buckets: `num_seqs` itself)."""
        if self.batch_sizes is None:
            return num_seqs
        return next(b for b in self.batch_sizes if b >= num_seqs)

    def capture_graphs(self, params: SamplingParams, num_seqs: int) -> None:
        """CUDA graphs of every bucket a batch of up to `num_seqs` sequences can use with these
        sampling settings, those not captured yet, largest first."""
        if not self.use_graphs:
            return
        wanted = [b for b in self.batch_sizes if b <= self.bucket(num_seqs)]
        for b in sorted(wanted, reverse=True):
            key = self._graph_key(b, params)
            if key not in self._graphs:
                self._write_inert_inputs(b)
                self._graphs[key] = self._capture(b, params)

    def _write_inert_inputs(self, b: int) -> None:
        """Inputs of a `b`-row step that store nothing (KV slot -1 on every row) and read one key of
        block 0: what a graph is captured from before any real step has filled the buffers (the
        graph keeps the buffers' addresses, not their values)."""
        v = self._views(b)
        for name in _LONG_ROWS:
            v[name].zero_()
        v["slots"].fill_(-1)
        v["context_lens"].fill_(1)
        v["block_tables"].zero_()

    @staticmethod
    def _graph_key(b: int, params: SamplingParams) -> tuple:
        return (b, params.temperature, params.top_k, params.top_p)

    def forget_graphs_if_weights_moved(self) -> None:
        """Drop the graphs when a weight's storage has moved since they were captured (a graph
        reads the addresses it was captured with)."""
        key = self._weight_addresses()
        if key != self._weights_key:
            self._graphs.clear()
            self._weights_key = key

    def _weight_addresses(self) -> tuple[int, ...]:
        return self.model.weight_addresses()

    def launch(
        self, seqs: list[Sequence], params: SamplingParams, continues: bool, after: LaunchedStep | None = None
    ) -> LaunchedStep:
        """Start the step of `seqs`, each decoding its last token (on CUDA it runs while the host
        goes on). `continues`: these are the previous step's sequences, in its order, each one
        token further. `after`: the step before, not collected yet, whose sampled ids are these
        sequences' pending last tokens (every one of `seqs` must be in it)."""
        n = len(seqs)
        b = self.bucket(n)
        staging = self._stagings[self._turn]
        self._turn = (self._turn + 1) % len(self._stagings)
        longest = self._fill(staging, seqs, b, after, continues)
        if after is not None:  # the pending tokens, gathered on the device from the step before
            v = self._views(b)
            torch.index_select(after.tokens, 0, v["source_rows"], out=v["input_ids"])
        if self.use_graphs:
            key = self._graph_key(b, params)
            if key not in self._graphs:  # a caller that did not `capture_graphs` first: from this step's inputs
                self._graphs[key] = self._capture(b, params)
            graph, tokens, logprobs = self._graphs[key]
            graph.replay()
        else:
            tokens, logprobs = self._compute(b, params, longest, continues)
        if tokens.device.type == "cpu":
            return LaunchedStep(seqs, tokens, self.workspace.to_lists(tokens, logprobs, n), staging, None)
        staging.tokens[:n].copy_(tokens[:n], non_blocking=True)
        staging.logprobs[:n].copy_(logprobs[:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(seqs, tokens, None, staging, done)

    def collect(self, step: LaunchedStep) -> tuple[list[int], list[float]]:
        """(tokens, logprobs) of a launched step, one per sequence; on CUDA the wait for it."""
        if step.results is not None:
            return step.results
        step.done.synchronize()  # this step only: a step launched after it may still be running
        n = len(step.seqs)
        return step.staging.tokens[:n].tolist(), step.staging.logprobs[:n].tolist()

    def _fill(
        self, staging: _Staging, seqs: list[Sequence], b: int, after: LaunchedStep | None, continues: bool
    ) -> int:
        """Write the step's inputs for `b` rows (padding rows repeat row 0 with slot -1) into
        `staging` and copy them to the device buffers, one copy per buffer; the longest context
        length. `after`: the step whose sampled ids are the pending last tokens (their rows in it
        go into `source_rows`; with `continues`, `after` is the previous step, row for row).

        Block tables sit at fixed rows of `self.width` columns. A row that holds the same table as
        when this staging was last written gets only the entries it gained (a block every
        `block_size` tokens) instead of the whole table: at hundreds of sequences the tables are
        most of a step's host work. Columns past a sequence's blocks and the padding rows' tables hold
        stale but valid block ids, never read for their own sequence (its context length bounds
        what attention reads)."""
        bs, n, pending = self.block_size, len(seqs), int(after is not None)
        lengths = [len(seq) + pending for seq in seqs]
        positions = [length - 1 for length in lengths]
        if after is None:
            ids, sources = [seq.token_ids[-1] for seq in seqs], [0] * n
        elif continues:
            ids, sources = [0] * n, list(range(n))
        else:
            row_of = {id(seq): row for row, seq in enumerate(after.seqs)}
            ids, sources = [0] * n, [row_of[id(seq)] for seq in seqs]
        states = [
            sampler_state(0 if seq.seed is None else seq.seed, length - seq.num_prompt_tokens)
            for seq, length in zip(seqs, lengths, strict=True)
        ]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions, strict=True)]
        pad = b - n
        for column in (ids, positions, states, lengths, sources):
            column.extend([column[0]] * pad)
        slots.extend([-1] * pad)
        staging.longs_np[: len(_LONG_ROWS) * b] = [*ids, *positions, *states, *slots, *sources]
        staging.ints_np[: 2 * b] = [*slots, *lengths]
        tables, held, written, width = staging.tables_np, staging.tables, staging.table_lengths, self.width
        for row, seq in enumerate(seqs):
            table = seq.block_table
            if held[row] is table:
                have = written[row]
            else:
                held[row], have = table, 0
            if len(table) != have:
                tables[row * width + have : row * width + len(table)] = table[have:]
                written[row] = len(table)
        if self._longs.device.type == "cuda":
            self._longs[: len(_LONG_ROWS) * b].copy_(staging.longs[: len(_LONG_ROWS) * b], non_blocking=True)
            used = self._table_start + b * width
            self._ints[:used].copy_(staging.ints[:used], non_blocking=True)
        return max(lengths[:n])

    def _views(self, b: int) -> dict[str, torch.Tensor]:
        """The step's inputs as views of the buffers, made once per row count."""
        views = self._views_of.get(b)
        if views is None:
            longs = self._longs[: len(_LONG_ROWS) * b].view(len(_LONG_ROWS), b)
            views = self._views_of[b] = dict(zip(_LONG_ROWS, longs, strict=True))
            views["slots"] = self._ints[:b]
            views["context_lens"] = self._ints[b : 2 * b]
            start = self._table_start
            views["block_tables"] = self._ints[start : start + b * self.width].view(b, self.width)
            views["cu_seqlens_q"] = self._cu_seqlens[: b + 1]
            views["new_key_positions"] = views["positions"].view(b, 1)
            views["sampler_states"] = views["sampler_states"].view(b, 1)  # the [S, 1] the sampler uses
        return views

    def _compute(
        self, b: int, params: SamplingParams, max_context_len: int, continues: bool | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [b], logprobs [b]) from the buffers alone: what a CUDA graph captures."""
        v = self._views(b)
        ctx = AttentionContext(
            self.kv_cache,
            backend=self.backend,
            slot_mapping=v["slots"],
            block_tables=v["block_tables"],
            context_lens=v["context_lens"],
            cu_seqlens_q=v["cu_seqlens_q"],
            max_q_len=1,
            max_context_len=max_context_len,
            copy_src=None,  # decode steps copy no blocks (copy-on-write happens at admission)
            copy_dst=None,
            workspace=self.workspace,
            continues_decode=continues,
            layer_caches=self.layer_caches,
            # no padding rows (slot -1) without buckets: every store row is a real one
            store_rows=v["store_rows"] if self.batch_sizes is None else None,
            decode_positions=v["new_key_positions"],
            checked=b in self._checked_sizes,  # the same buffers, pool and model as that first step's
        )
        self._checked_sizes.add(b)
        hidden = self.model.hidden_states(v["input_ids"], v["positions"], ctx)
        states = None if params.greedy else v["sampler_states"]
        workspace = self.workspace if hidden.device.type == "cpu" else None
        return sample(self.model.logits(hidden), params, states, workspace)

    def _capture(self, b: int, params: SamplingParams):
        """A CUDA graph of `_compute` at batch size `b`, after one eager run on a side stream (Triton
        compiles, cuBLAS picks its workspace: nothing may allocate for the first time in capture).
        Both runs compute from the current step's buffers, so the KV rows they store are the same."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._compute(b, params, self.max_model_len, None)
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            tokens, logprobs = self._compute(b, params, self.max_model_len, None)
        self.num_captures += 1
        return graph, tokens, logprobs
