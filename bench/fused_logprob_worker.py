"""Run ONE log-prob variant once in this process and print its time and peak memory as JSON.

Used by bench_fused_logprob.py, which starts a fresh interpreter per variant so that one
variant's allocator state cannot hide or inflate another's peak (peak RSS on CPU is a
per-process high-water mark). Usage:

    python bench/fused_logprob_worker.py VARIANT N D V DTYPE DEVICE [REPEATS]

VARIANT: naive | fused_torch | fused_triton | liger. Timing covers forward + backward of logp
with a random per-token upstream gradient (no entropy: the naive peer has none). Inputs are
built in place so that building them leaves no temporary in the RSS high-water mark.
"""

import json
import sys
import time

import torch


def naive(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def fused(impl):
    from score.kernels import fused_linear_logprob

    return lambda h, w, t: fused_linear_logprob(h, w, t, impl=impl)


def liger(hidden, weight, targets):
    # Liger's fused linear cross-entropy with reduction="none" returns per-token NLL (= -logp).
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "none")
    return -(loss[0] if isinstance(loss, tuple) else loss)


def high_water_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    fork + exec, so a worker started from a big parent would report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main():
    variant, n, d, v, dtype, device = sys.argv[1:7]
    repeats = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    n, d, v = int(n), int(d), int(v)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    fn = {"naive": naive, "fused_torch": fused("torch"), "fused_triton": fused("triton"), "liger": liger}[variant]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).mul_(0.02).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    upstream = torch.randn(n, generator=gen).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        fn(hidden, weight, targets).backward(upstream)  # warm-up: compile kernels, init cuBLAS
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = high_water_rss_bytes()
    times, cpu_times = [], []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(hidden, weight, targets).backward(upstream)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {
        "variant": variant,
        "n": n,
        "d": d,
        "v": v,
        "dtype": str(dtype),
        "device": device,
        "seconds": min(times),
        "all_seconds": times,
        "cpu_seconds": min(cpu_times),
        "peak_rss_bytes": high_water_rss_bytes(),
        "rss_before_bytes": base_rss,
    }
    if cuda:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
