"""Per-GPU memory of a SCoRe run under FSDP2, before launching: `python -m score.rl.parallel.memory_plan`.

What is counted (P = parameters, W = GPUs, b = bytes of the compute dtype: 2 for bf16 on GPU):
- resident, sharded over W (rl/parallel/distributed.py):
    policy master weights fp32 4P/W, gradients fp32 4P/W, AdamW exp_avg + exp_avg_sq fp32 8P/W,
    reference model (frozen, stored in the compute dtype) bP/W (0 with CPU offload);
- rollout phase: the policy all-gathered for generation, bP (distributed.unsharded), and the
  engine's KV pool: 2 (K and V) x layers x kv_heads x head_dim x b per token, for `rollout_seqs`
  sequences of `max_model_len` tokens (an upper bound: prefix sharing between the k samples of a
  prompt only lowers it); in one process (not under FSDP2) also the engine's stacked copy of the
  q/k/v weights, b per q/k/v parameter (model/engine/inference_model.py). When a share of attempt-1 samples
  comes from the base model, the reference is gathered too and its engine has a pool and a copy of
  its own. The trainer puts the engines to sleep before the backward pass (`Engine.sleep` frees
  the pool and the copy), so none of this is held during training;
- training phase, the larger of the two phases' extras:
    FSDP working set: the root (embedding, final norm, head) stays gathered through forward and
    backward, two layers are gathered at a time (the current one + the prefetched next one), each with
    its unsharded gradient, plus one fp32 reduce-scatter buffer of a layer;
    saved activations of one micro-batch of `micro_batch_tokens` packed tokens (formula in
    `activation_bytes_per_token`: the tensors autograd saves in score.model's decoder layer with
    flash attention); with activation checkpointing only each layer's input (bD per token);
    backward's own peak: the larger of the loss head (final-norm output, the attempt rows, the
    head's gradient bVD, two fp32 logits tiles of score.kernels.fused_linear_logprob) and one layer's
    backward (its recomputed activations under checkpointing + the MLP intermediates' gradients).
- usable memory: `gpu_gib` minus `reserve_gib` (CUDA context, NCCL buffers, allocator fragmentation).

Not counted: the Python/CUDA runtime itself (in the reserve), CPU memory, the tokenizer and data.
On CPU (tests/test_memory_plan.py) the same formulas with b = 4 are checked against measured RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import torch

from score.model import ModelConfig
from score.model.shapes import PUBLISHED

GIB = 1024**3
TILE_ELEMENTS = 1 << 24  # fused_linear_logprob's logits tile (kernels/fused_linear_logprob.py)

MODELS = PUBLISHED  # the shapes the plan is printed for
WORLD_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class TrainingSizes:
    micro_batch_tokens: int = 16384  # packed tokens of one policy forward/backward per GPU
    activation_checkpointing: bool = True
    rollout_seqs: int = 128  # sequences the engine holds at once per GPU (RolloutConfig.max_num_seqs)
    max_model_len: int = 2048  # prompt + attempt 1 + instruction + attempt 2
    compute_bytes: int = 2  # bf16 forward/backward and KV cache (4 on CPU)
    reference_offload: bool = False
    reference_rollouts: bool = False  # base-model attempt-1 mix needs the reference gathered too
    gpu_gib: float = 80.0
    reserve_gib: float = 4.0

    def __post_init__(self):
        for name in ("micro_batch_tokens", "rollout_seqs", "max_model_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainingSizes.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.compute_bytes not in (2, 4):
            raise ValueError(f"compute_bytes must be 2 (bf16/fp16) or 4 (fp32), got {self.compute_bytes}")
        if not 0 <= self.reserve_gib < self.gpu_gib:
            raise ValueError(f"need 0 <= reserve_gib < gpu_gib, got {self.reserve_gib} and {self.gpu_gib}")


@dataclass(frozen=True)
class ParamCounts:
    total: int
    root: int  # embedding, final norm, untied head: FSDP's root unit
    layer: int  # one decoder layer
    qkv: int  # the q, k and v projections of every layer (weights and biases)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact counts from the model itself, built on the meta device (no memory)."""
    from score.model import Transformer

    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"param_counts needs a ModelConfig, got {type(cfg).__name__}")
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.layers[0].parameters())
    qkv = sum(
        p.numel()
        for block in model.layers
        for proj in ("q_proj", "k_proj", "v_proj")
        for p in getattr(block.attn, proj).parameters()
    )
    return ParamCounts(total, total - layer * len(model.layers), layer, qkv)


def activation_bytes_per_token(cfg: ModelConfig, b: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing).

    Each RMSNorm keeps its fp32 input (4D) and its normalised output before the weight (bD) and
    the scaled output that the next linear saves (bD); attention keeps q, k, v after RoPE, its output
    and an fp32 log-sum-exp per head; the MLP keeps gate, silu(gate), up and their product (4bI).
    Per-head q/k norms (Qwen3) keep their inputs and outputs too."""
    d, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    norms = 2 * (4 * d + 2 * b * d)
    attention = b * (q + 2 * kv) + b * q + 4 * cfg.num_attention_heads
    if cfg.qk_norm:  # fp32 input and cast output of each head's norm (RoPE keeps neither)
        attention += (4 + b) * (q + kv)
    mlp = 4 * b * i
    return norms + attention + mlp


@dataclass(frozen=True)
class MemoryPlan:
    name: str
    world_size: int
    params: int
    bytes: dict  # component -> bytes per GPU
    usable: int

    @property
    def resident(self) -> int:
        b = self.bytes
        return b["policy"] + b["grads"] + b["adam"] + b["reference"]

    @property
    def rollout_extra(self) -> int:
        b = self.bytes
        return b["gathered_for_rollout"] + b["kv_cache"] + b["qkv_copies"]

    @property
    def train_extra(self) -> int:
        b = self.bytes
        return b["fsdp_working_set"] + b["activations"] + b["backward_peak"]

    @property
    def peak(self) -> int:
        return self.resident + max(self.rollout_extra, self.train_extra)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    @property
    def kv_tokens_that_fit(self) -> int:
        """KV-cache tokens per engine that the rest of the usable memory holds during the rollout
        phase (0 when the rest does not fit)."""
        b = self.bytes
        rest = self.usable - self.resident - b["gathered_for_rollout"] - b["qkv_copies"]
        return max(0, rest // (b["kv_per_token"] * b["engines"]))


def plan(cfg: ModelConfig, world_size: int, sizes: TrainingSizes = TrainingSizes(), name: str = "model") -> MemoryPlan:
    """Per-GPU bytes of each component for `cfg` trained on `world_size` GPUs."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(sizes, TrainingSizes):
        raise ValueError(f"sizes must be a TrainingSizes, got {type(sizes).__name__}")
    counts = param_counts(cfg)
    p, w, b = counts.total, world_size, sizes.compute_bytes

    def sharded(nbytes_per_param: int) -> int:  # FSDP pads each tensor to a multiple of W rows; negligible
        return -(-p * nbytes_per_param // w)

    d, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    kv_per_token = 2 * layers * cfg.num_key_value_heads * cfg.head_dim * b
    n = sizes.micro_batch_tokens
    per_layer = activation_bytes_per_token(cfg, b)
    # Saved for backward through the whole forward: every layer's activations, or only each
    # layer's input under checkpointing.
    stored = n * layers * (b * d if sizes.activation_checkpointing else per_layer)
    # Backward's own peak on top of that: the loss head (final-norm output, attempt rows, the head's
    # gradient, two logits tiles of at most 2^24 fp32 elements), or one layer's backward (its
    # recomputed activations under checkpointing + the MLP's gate/up/product gradients, 3bI).
    tiles = 2 * 4 * min(TILE_ELEMENTS, n * v)
    loss_head = n * (4 * d + 3 * b * d) + b * v * d + tiles
    layer_backward = n * ((per_layer if sizes.activation_checkpointing else 0) + 3 * b * cfg.intermediate_size)
    gathered_layer = counts.layer * b
    engines = 2 if sizes.reference_rollouts else 1
    parts = {
        "policy": sharded(4),
        "grads": sharded(4),
        "adam": sharded(8),
        "reference": 0 if sizes.reference_offload else sharded(b),
        "engines": engines,
        "kv_cache": engines * sizes.rollout_seqs * sizes.max_model_len * kv_per_token,
        "kv_per_token": kv_per_token,
        "qkv_copies": engines * counts.qkv * b if world_size == 1 else 0,  # FSDP2's engines keep none
        "gathered_for_rollout": p * b * engines,
        # root gathered + its gradient; two layers gathered + gradients; one fp32 reduce-scatter input
        "fsdp_working_set": 2 * counts.root * b + 2 * 2 * gathered_layer + 4 * counts.layer,
        "activations": stored,
        "backward_peak": max(loss_head, layer_backward),
    }
    usable = int((sizes.gpu_gib - sizes.reserve_gib) * GIB)
    return MemoryPlan(name, world_size, p, parts, usable)


def _gib(x: int) -> str:
    return f"{x / GIB:.1f}"


def format_plans(plans: list[MemoryPlan]) -> str:
    """A markdown table: one row per (model, GPUs), GiB per GPU."""
    head = (
        "| model | params | GPUs | weights fp32 | grads fp32 | AdamW | reference | "
        "rollout: +gathered+KV pool+q/k/v copy | train: +FSDP+saved+bwd | peak | fits | KV tokens that fit |"
    )
    lines = [head, "|" + "---|" * 12]
    for m in plans:
        b = m.bytes
        lines.append(
            f"| {m.name} | {m.params / 1e9:.2f}B | {m.world_size} | {_gib(b['policy'])} | {_gib(b['grads'])} | "
            f"{_gib(b['adam'])} | {_gib(b['reference'])} | "
            f"{_gib(b['gathered_for_rollout'])}+{_gib(b['kv_cache'])}+{_gib(b['qkv_copies'])} | "
            f"{_gib(b['fsdp_working_set'])}+{_gib(b['activations'])}+{_gib(b['backward_peak'])} | {_gib(m.peak)} | "
            f"{'yes' if m.fits else 'NO'} | {m.kv_tokens_that_fit:,} |"
        )
    return "\n".join(lines)


def describe(sizes: TrainingSizes) -> str:
    return (
        f"GiB per GPU of {sizes.gpu_gib:g} GiB ({sizes.reserve_gib:g} reserved); micro-batch "
        f"{sizes.micro_batch_tokens} tokens, activation checkpointing "
        f"{'on' if sizes.activation_checkpointing else 'off'}; KV pool {sizes.rollout_seqs} seqs x "
        f"{sizes.max_model_len} tokens; compute dtype {'bf16' if sizes.compute_bytes == 2 else 'fp32'}; "
        f"reference {'CPU-offloaded' if sizes.reference_offload else 'on GPU'}"
    )


def print_plan(
    cfg: ModelConfig, sizes: TrainingSizes = TrainingSizes(), world_sizes=WORLD_SIZES, name: str = "model", file=None
) -> list[MemoryPlan]:
    """Print the plan of one model on each world size; returns the plans."""
    plans = [plan(cfg, w, sizes, name) for w in world_sizes]
    print(describe(sizes), file=file or sys.stdout)
    print(format_plans(plans), file=file or sys.stdout)
    return plans


def _micro_batch_tokens(optim, groups_per_rank: int, group_tokens: int) -> int:
    """The most packed tokens one micro-batch can hold: a token budget is passed only by a single
    group longer than it (rl/micro_batches.py)."""
    if optim.tokens_per_micro_batch:
        return min(max(optim.tokens_per_micro_batch, group_tokens), groups_per_rank * group_tokens)
    return min(optim.prompts_per_micro_batch, groups_per_rank) * group_tokens


def sizes_for_run(cfg, world_size: int, prompt_tokens: int, base: TrainingSizes = TrainingSizes()) -> TrainingSizes:
    """The sizes of a run config (score.rl.config.RunConfig) on `world_size` GPUs. `prompt_tokens`
    is an assumption about the longest rendered prompt plus the correction instruction (the data
    decides it; the config does not)."""
    k, o, r = cfg.rollout.samples_per_prompt, cfg.optim, cfg.rollout
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    seq_len = prompt_tokens + r.max_tokens_attempt1 + r.max_tokens_attempt2
    per_rank = -(-o.prompts_per_step // world_size)  # the trajectories one rank rolls out per step
    return dataclasses.replace(
        base,
        micro_batch_tokens=_micro_batch_tokens(o, per_rank, k * seq_len),
        activation_checkpointing=cfg.model.activation_checkpointing,
        rollout_seqs=min(r.max_num_seqs, per_rank * k),
        max_model_len=seq_len,
        reference_offload=cfg.model.reference_cpu_offload,
        reference_rollouts=cfg.score.base_first_attempt_mix > 0,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m score.rl.parallel.memory_plan",
        description="Per-GPU memory of FSDP2 SCoRe training (see docs/memory_plan.md)",
    )
    parser.add_argument("--model", help="HF model folder (config.json); default: the 0.5B-8B reference table")
    parser.add_argument("--config", help="a `score train` run config (TOML): model, batch, budgets and options from it")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=512,
        help="with --config: longest prompt + correction instruction, in tokens",
    )
    parser.add_argument("--nproc", type=int, nargs="+", default=list(WORLD_SIZES), help="GPU counts to show")
    defaults = TrainingSizes()
    parser.add_argument("--micro-batch-tokens", type=int, default=defaults.micro_batch_tokens)
    parser.add_argument("--rollout-seqs", type=int, default=defaults.rollout_seqs)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    parser.add_argument("--reference-offload", action="store_true")
    parser.add_argument("--gpu-gib", type=float, default=defaults.gpu_gib)
    ns = parser.parse_args(argv)
    try:
        sizes = TrainingSizes(
            micro_batch_tokens=ns.micro_batch_tokens,
            rollout_seqs=ns.rollout_seqs,
            max_model_len=ns.max_model_len,
            activation_checkpointing=not ns.no_activation_checkpointing,
            reference_offload=ns.reference_offload,
            gpu_gib=ns.gpu_gib,
        )
        run = None
        if ns.config:
            from ..config import load_config

            run = load_config(ns.config, [])
            if not ns.model and not run.model.path:
                raise ValueError(f"{ns.config}: model.path is empty and --model was not given")
        path = ns.model or (run.model.path if run else None)
        models = {path: ModelConfig.from_hf(path)} if path else MODELS
        by_world = {w: sizes_for_run(run, w, ns.prompt_tokens, sizes) if run else sizes for w in ns.nproc}
        plans = [plan(cfg, w, by_world[w], name) for name, cfg in models.items() for w in ns.nproc]
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    for w in ns.nproc if run else ns.nproc[:1]:
        print(("" if not run else f"{w} GPU(s): ") + describe(by_world[w]))
    print(format_plans(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
