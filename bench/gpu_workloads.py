"""The GPU benchmarks' workloads in one place, checked on any machine before a GPU is at hand.

    python bench/gpu_workloads.py --check     # what `bash bench/gpu_checks.sh --dry-run` runs

bench_engine.py, bench_training_kernels.py, bench_fsdp_train.py, profile_gpu_steps.py and
sweep_fused_logprob_tiles.py take their GPU sizes from here: model shapes from score.model.shapes
(the published configs), sequence lengths, batch sizes and engine settings. `--check` builds every
workload's model at a reduced width (its heads, positions and vocabulary kind kept) on the CPU,
with the workload's engine settings, and runs its longest sequence through it: a workload that
cannot start on the GPU (a sequence longer than the engine admits, a pool that cannot hold it, a
head dim no kernel takes) fails here, not in a borrowed GPU's ten minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import torch

from score.model import Engine, ModelConfig, SamplingParams, Transformer
from score.model.shapes import PUBLISHED


@dataclass(frozen=True)
class EngineWorkload:
    """Generation: `prompts` prompts of `prompt_len` tokens (min, max), `new_tokens` (min, max) sampled
    each; with an instruction, a second attempt = prompt + attempt 1 + instruction, sampling as many."""

    model: str  # a key of score.model.shapes.PUBLISHED
    prompts: int
    prompt_len: tuple[int, int]
    new_tokens: tuple[int, int]
    instruction_len: int = 0  # > 0: two attempts
    block_size: int = 16

    @property
    def longest(self) -> int:
        """Tokens of the longest sequence the engine holds (what sizes its block tables)."""
        one = self.prompt_len[1] + self.new_tokens[1]
        return one + self.instruction_len + self.new_tokens[1] if self.instruction_len else one

    def engine(self, model: Transformer, **kw) -> Engine:
        return Engine(model, block_size=self.block_size, max_model_len=self.longest, max_num_seqs=self.prompts, **kw)


@dataclass(frozen=True)
class TrainingWorkload:
    """One training micro-batch: `seqs` packed sequences of `seq_len` tokens."""

    model: str
    seqs: int
    seq_len: int


# issue 4's rollout workload: a Qwen2.5-0.5B-shaped random model, bf16, two attempts
TWO_ATTEMPT = EngineWorkload(
    "Qwen2.5-0.5B", prompts=256, prompt_len=(256, 256), new_tokens=(128, 128), instruction_len=16
)
# nano-vllm's bench.py: 256 sequences, prompt and output lengths uniform in 100..1024
NANO_VLLM = EngineWorkload("Qwen2.5-0.5B", prompts=256, prompt_len=(100, 1024), new_tokens=(100, 1024))
# profile_gpu_steps.py's decode profile: 256 prompts of 256 tokens, 32 decode steps
DECODE_PROFILE = EngineWorkload("Qwen2.5-0.5B", prompts=256, prompt_len=(256, 256), new_tokens=(33, 33))
# bench_fsdp_train.py and profile_gpu_steps.py: a Qwen2.5-1.5B micro-batch of 16k packed tokens
TRAINING = TrainingWorkload("Qwen2.5-1.5B", seqs=16, seq_len=1024)
# bench_training_kernels.py: one op per model shape, 16 x 1,024 packed tokens
KERNEL_SHAPES = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Llama-3.1-8B")
KERNEL_TOKENS = 16 * 1024
# sweep_fused_logprob_tiles.py: the LM heads (hidden, vocab) at 8,192 tokens
HEADS = {name: (PUBLISHED[name].hidden_size, PUBLISHED[name].vocab_size) for name in KERNEL_SHAPES}
HEAD_TOKENS = 8192

ENGINE_WORKLOADS = {"two_attempt": TWO_ATTEMPT, "nano_vllm": NANO_VLLM, "decode_profile": DECODE_PROFILE}


def reduced(name: str, **changes) -> ModelConfig:
    """The published config of `name` at a CPU-sized width: its heads, KV heads, positions, RoPE and
    family kept, head dim 8, one layer, a 1,000-token vocabulary."""
    cfg = PUBLISHED[name]
    width = cfg.num_attention_heads * 8
    return dataclasses.replace(
        cfg, hidden_size=width, intermediate_size=2 * width, head_dim=8, num_hidden_layers=1, vocab_size=1000, **changes
    )


def check_engine_workload(name: str, w: EngineWorkload) -> str:
    cfg = PUBLISHED[w.model]
    if w.longest > cfg.max_position_embeddings:
        raise ValueError(f"{name}: sequences of {w.longest} tokens exceed {w.model}'s {cfg.max_position_embeddings}")
    torch.manual_seed(0)
    model = Transformer(reduced(w.model)).eval()
    engine = w.engine(model)
    prompt = torch.randint(0, 1000, (w.prompt_len[1],)).tolist()
    params = SamplingParams(temperature=1.0, max_tokens=w.new_tokens[1], ignore_eos=True, seed=0)
    (first,) = engine.generate([prompt], params)
    length = len(prompt) + len(first[0].token_ids)
    if w.instruction_len:
        second_prompt = prompt + first[0].token_ids + [1] * w.instruction_len
        (second,) = engine.generate([second_prompt], params)
        length = len(second_prompt) + len(second[0].token_ids)
    if length != w.longest:
        raise ValueError(f"{name}: the longest sequence ran {length} tokens, the workload says {w.longest}")
    return f"{name}: {w.prompts} sequences up to {w.longest} tokens on {w.model} (engine of {engine.num_blocks} blocks)"


def check_training_workload(w: TrainingWorkload) -> str:
    cfg = PUBLISHED[w.model]
    if w.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"training: sequences of {w.seq_len} tokens exceed {w.model}'s {cfg.max_position_embeddings}")
    model = Transformer(reduced(w.model))
    model.set_activation_checkpointing(True)
    ids = torch.randint(0, 1000, (w.seqs * w.seq_len,))
    cu = torch.arange(0, w.seqs * w.seq_len + 1, w.seq_len, dtype=torch.int32)
    model.hidden_states(ids, cu_seqlens=cu, max_seqlen=w.seq_len).float().mean().backward()
    return f"training: {w.seqs} x {w.seq_len} packed tokens on {w.model}"


def check_all() -> list[str]:
    lines = [check_engine_workload(name, w) for name, w in ENGINE_WORKLOADS.items()]
    lines.append(check_training_workload(TRAINING))
    for name in KERNEL_SHAPES:
        cfg = PUBLISHED[name]
        if cfg.head_dim > 128:  # varlen attention's largest head dim (kernels/varlen_attention.py)
            raise ValueError(f"kernels: {name}'s head dim {cfg.head_dim} exceeds the attention kernel's 128")
    lines.append(f"kernels: {', '.join(KERNEL_SHAPES)} at {KERNEL_TOKENS} tokens; heads {HEADS} at {HEAD_TOKENS}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check every workload on this machine (CPU is fine)")
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 2
    try:
        for line in check_all():
            print(f"ok  {line}", flush=True)
    except ValueError as e:
        print(f"gpu_workloads: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
