"""Where the GPU time of a decode step and of a training micro-batch goes (profiling aid, not a benchmark).

    python bench/profile_gpu_steps.py        # needs CUDA; prints tables, writes nothing

1. Engine decode on a Qwen2.5-0.5B-shaped random model (bf16, 256 sequences of 256 prompt tokens,
   32 decode steps): wall time per step, Python's own hot spots (cProfile, by own time) and torch's
   op table (torch.profiler: CPU self time and CUDA time).
2. One training micro-batch of a Qwen2.5-1.5B-shaped model (bf16, 16 x 1024 packed tokens): packed
   forward, fused attempt-token log-probs, backward; torch's op table by CUDA time.
"""

import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_workloads import DECODE_PROFILE, TRAINING
from score.kernels import fused_linear_logprob
from score.model import SamplingParams, Transformer
from score.model.shapes import PUBLISHED


def model_of(name: str) -> Transformer:
    """A random-weight model of a published shape, bf16, on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(PUBLISHED[name])
    return model.to(torch.bfloat16)


def table(prof, key: str, rows: int = 22) -> str:
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def decode_profile() -> None:
    w = DECODE_PROFILE
    model = model_of(w.model).eval()
    engine = w.engine(model)
    prompts = torch.randint(0, model.config.vocab_size, (w.prompts, w.prompt_len[0])).tolist()
    steps = w.new_tokens[0] - 1
    params = SamplingParams(temperature=1.0, max_tokens=1 + steps, ignore_eos=True, seed=0)
    prefill_only = SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True, seed=0)
    engine.generate(prompts, params)  # warm: Triton compile, allocator, cuBLAS handles
    timings = {}
    for name, p in (("prefill", prefill_only), ("prefill+decode", params)):
        engine.clear_cache()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts, p)
        torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
    step_ms = (timings["prefill+decode"] - timings["prefill"]) / steps * 1e3
    print(f"decode step, 256 sequences: {step_ms:.2f} ms (prefill of 65,536 tokens {timings['prefill'] * 1e3:.0f} ms)")

    engine.clear_cache()
    profiler = cProfile.Profile()
    profiler.enable()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue()[-6000:])

    engine.clear_cache()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, params)
        torch.cuda.synchronize()
    print(table(prof, "self_cpu_time_total"))
    print(table(prof, "device_time_total", 15))


def train_profile() -> None:
    model = model_of(TRAINING.model)
    seqs, length = TRAINING.seqs, TRAINING.seq_len
    ids = torch.randint(0, model.config.vocab_size, (seqs * length,), device="cuda")
    cu = torch.arange(0, seqs * length + 1, length, dtype=torch.int32, device="cuda")
    rows = torch.arange(seqs * length - 1, device="cuda")

    def micro_batch():
        hidden = model.hidden_states(ids, cu_seqlens=cu, max_seqlen=length)
        logp = fused_linear_logprob(hidden.index_select(0, rows), model.lm_head_weight, ids[rows + 1])
        (-logp.float().sum() / rows.numel()).backward()

    for _ in range(2):
        micro_batch()
    torch.cuda.synchronize()
    start = time.perf_counter()
    micro_batch()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * seqs * length
    print(
        f"training micro-batch 16x1024: {seconds * 1e3:.0f} ms, {seqs * length / seconds:.3g} tokens/s, "
        f"{flops / seconds / 1e12:.0f} TFLOP/s (6 x params x tokens; attention not counted)"
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        micro_batch()
        torch.cuda.synchronize()
    print(table(prof, "device_time_total", 25))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu_steps.py needs a CUDA device")
    print(torch.cuda.get_device_name())
    decode_profile()
    train_profile()
