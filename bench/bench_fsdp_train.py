"""Training-phase throughput of the FSDP2 policy (rl/parallel/distributed.py) vs the same step un-sharded.

    pytest bench/bench_fsdp_train.py --benchmark-only -q -s

One training phase = packed forward of whole groups, fused attempt-token log-probs, summed loss
over the global token count, backward, global-norm clip, AdamW step: what the trainer does after a
rollout, under the precision contract (rl/precision.py: fp32 master weights, bf16 autocast on GPU).
Ours: the model under `shard_policy` on a world of 1 rank (gloo on CPU, NCCL on GPU; its gathered
weights in bf16, fp32 gradient reduction on GPU), with and without activation checkpointing. Peer:
the same model un-sharded in torch eager (fp32 weights, bf16 autocast on GPU), the single-GPU
trainer's path. A third run, the same FSDP2 model with `set_kernels("torch")`, is the step before
the training kernels (the decoder's plain norm, SwiGLU, RoPE and padded-SDPA ops): on GPU it
measures what the kernels bring; on CPU both use the plain ops. All run in this process on the same
batch, rounds interleaved. Reported: tokens/s of each, the ratios, and on GPU:

- MFU, model FLOPs per second over the card's dense bf16 peak. Model FLOPs count what the step
  must compute: 6 x matmul parameters per token (forward 2, backward 4; the LM head included) plus
  causal attention, 12 x layers x heads x head_dim x (mean causal context) per token. They do not
  count what activation checkpointing recomputes;
- HFU (hardware FLOPs utilisation) of the checkpointed runs, which does count it: one more forward,
  8 x matmul parameters and 16 x the attention term per token.

A run without checkpointing that does not fit the card is reported as out of memory.

Model: Qwen2.5-1.5B's shape with random weights on CUDA (bench/gpu_workloads.py; issue 7's target:
MFU >= 40% on one H100), a 2-layer toy on CPU (there it only proves the benchmark runs; the ratio
measures FSDP's overhead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import statistics
import time

import pytest
import torch

from bench.gpu_workloads import TRAINING
from score.kernels import fused_linear_logprob
from score.model import ModelConfig, Transformer
from score.model.model import linear_output_dtype
from score.model.shapes import PUBLISHED

CUDA = torch.cuda.is_available()
if CUDA:
    CONFIG = dataclasses.asdict(PUBLISHED[TRAINING.model])
    SEQS, SEQ_LEN, ROUNDS = TRAINING.seqs, TRAINING.seq_len, 5  # 16k packed tokens per micro-batch
else:
    CONFIG = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        architecture="Qwen2ForCausalLM",
    )
    SEQS, SEQ_LEN, ROUNDS = 4, 128, 5
# Dense bf16 tensor-core peaks (datasheets, no sparsity), FLOP/s.
PEAKS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12}


def card_peak() -> float | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAKS.items():
        if all(part in name for part in key.split()):
            return peak
    if "H100" in name:
        return PEAKS["H100 SXM"]
    return None


def step_flops(cfg: ModelConfig, matmul_params: int, seqs: int, seq_len: int, recomputed: bool = False) -> float:
    """Model FLOPs of a training phase (see the module docstring); `recomputed`: hardware FLOPs of a
    checkpointed one, the forward counted twice."""
    tokens = seqs * seq_len
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (seq_len + 1) / 2
    scale = 4 / 3 if recomputed else 1.0  # (2 + 2 + 4) / (2 + 4)
    return tokens * (6 * matmul_params + attention) * scale


def make_batch(device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (SEQS * SEQ_LEN,), generator=gen).to(device)
    cu = torch.arange(0, SEQS * SEQ_LEN + 1, SEQ_LEN, dtype=torch.int32).to(device)
    rows = torch.cat([torch.arange(s * SEQ_LEN, (s + 1) * SEQ_LEN - 1) for s in range(SEQS)]).to(device)
    return ids, cu, rows


def training_phase(model, optimizer, batch, autocast, kernels="auto", checkpointing=CUDA) -> None:
    ids, cu, rows = batch
    model.set_kernels(kernels)
    model.set_activation_checkpointing(checkpointing)
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        hidden = model.hidden_states(ids, cu_seqlens=cu, max_seqlen=SEQ_LEN)
        head_dtype = linear_output_dtype(hidden)
    hidden = hidden.index_select(0, rows).to(head_dtype)
    weight = model.lm_head_weight
    if weight.dtype not in (hidden.dtype, torch.float32):
        weight = weight.to(hidden.dtype)
    logp = fused_linear_logprob(hidden, weight, ids[rows + 1])
    (-logp.sum() / rows.numel()).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    optimizer.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setups():
    from score.rl.parallel import distributed as D

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT=str(_free_port()))
    env = D.init_distributed()
    device = env.device
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIG)
    with torch.device(device):
        plain = Transformer(cfg)
        sharded = Transformer(cfg)
    sharded.load_state_dict(plain.state_dict())
    D.shard_policy(sharded, env)
    # the precision contract's forward context, in both seams
    bf16 = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if CUDA else contextlib.nullcontext
    sharded_adam = torch.optim.AdamW(sharded.parameters(), lr=1e-5)
    plain.set_kernels("torch")
    runs = {  # name: (model, optimizer, autocast, the model's kernels, activation checkpointing)
        "fsdp2": (sharded, sharded_adam, bf16, "auto", CUDA),
        "fsdp2_no_checkpointing": (sharded, sharded_adam, bf16, "auto", False),
        "fsdp2_plain_ops": (sharded, sharded_adam, bf16, "torch", CUDA),  # before the kernels
        "eager": (plain, torch.optim.AdamW(plain.parameters(), lr=1e-5), bf16, "torch", CUDA),
    }
    matmul_params = sum(p.numel() for name, p in plain.named_parameters() if p.dim() == 2 and "embed" not in name)
    matmul_params += plain.lm_head_weight.numel()  # the head's matmul (tied: the embedding)
    flops = {
        "model": step_flops(cfg, matmul_params, SEQS, SEQ_LEN),
        "recomputed": step_flops(cfg, matmul_params, SEQS, SEQ_LEN, recomputed=True),
    }
    yield runs, make_batch(device), flops
    D.shutdown()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _out_of_memory(error: BaseException) -> bool:
    return CUDA and isinstance(error, torch.cuda.OutOfMemoryError)


def test_training_phase_throughput(benchmark, setups):
    runs, batch, flops = setups
    info = {}
    for name, run in list(runs.items()):  # warm-up: allocations, kernel compilation
        try:
            training_phase(*run[:2], batch, *run[2:])
        except Exception as e:
            if not _out_of_memory(e):
                raise
            info[f"{name}"] = "out of memory"
            del runs[name]
            torch.cuda.empty_cache()
    times = {name: [] for name in runs}
    order = list(runs)
    for r in range(ROUNDS):
        for name in order if r % 2 == 0 else order[::-1]:
            model, optimizer, *rest = runs[name]
            _sync()
            t0 = time.perf_counter()
            training_phase(model, optimizer, batch, *rest)
            _sync()
            times[name].append(time.perf_counter() - t0)
    model, optimizer, *rest = runs["fsdp2"]
    benchmark.pedantic(training_phase, args=(model, optimizer, batch, *rest), rounds=1, iterations=1)
    tokens = SEQS * SEQ_LEN
    peak = card_peak()
    for name, ts in times.items():
        best = min(ts)
        info[f"{name}_tokens_per_s"] = tokens / best
        if peak:
            info[f"{name}_mfu"] = flops["model"] / best / peak
            if runs[name][-1]:  # checkpointed: the hardware also recomputed each layer's forward
                info[f"{name}_hfu"] = flops["recomputed"] / best / peak
    info["mfu_counts"] = "model FLOPs: 6 x matmul params + causal attention per token, recomputation excluded"
    for before in ("eager", "fsdp2_plain_ops"):
        info[f"fsdp2_over_{before}_speed"] = statistics.median(
            tb / tf for tf, tb in zip(times["fsdp2"], times[before], strict=True)
        )
    if CUDA:
        info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        info["card"] = torch.cuda.get_device_name()
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    assert all(v > 0 for k, v in info.items() if k.endswith("tokens_per_s"))
