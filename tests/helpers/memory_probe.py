"""Measures the memory the plan predicts, in a fresh process (run by tests/test_memory_plan.py).

Prints one JSON object of growth in anonymous resident memory (RSS less file-backed pages), in
bytes: `policy` (building the fp32 model), `grads` (first backward, gradients kept), `adam` (first
AdamW step: exp_avg, exp_avg_sq), `reference` (a frozen copy), `activations` (the rise of its
peak during one forward+backward of `tokens` tokens with every buffer above already allocated),
for ModelConfig(**json.loads(argv[1])) and argv[2] tokens.
"""

import gc
import json
import resource
import sys

import psutil
import torch

from score.kernels import fused_linear_logprob
from score.model import ModelConfig, Transformer


def _status() -> dict[str, int]:
    """Linux's /proc/self/status memory lines in bytes ({} elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            lines = [line.split() for line in f if line.startswith(("VmHWM", "RssAnon", "RssFile", "RssShmem"))]
    except OSError:
        return {}
    return {parts[0].rstrip(":"): int(parts[1]) * 1024 for parts in lines}


def rss() -> int:
    """Anonymous resident memory, where the tensors live. Not file-backed pages: the kernel may
    drop the libraries' cold pages at any time and fault them back in when code runs again, and
    those swings (hundreds of MiB of libtorch) are no tensor's."""
    gc.collect()
    status = _status()
    return status["RssAnon"] if "RssAnon" in status else psutil.Process().memory_info().rss


def peak_rss() -> int:
    """A lower bound of the anonymous memory at the peak of RSS: the peak minus the file-backed
    pages resident now (during a step those only come back in, so at the peak there were no more)."""
    status = _status()
    if {"VmHWM", "RssFile"} <= status.keys():
        return status["VmHWM"] - status["RssFile"] - status.get("RssShmem", 0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Set the peak RSS to the current RSS (Linux: "5" into clear_refs resets the high-water mark).
    Without it an earlier, higher peak (building the models, the warm-up) masks part of the rise
    that is measured next, by however much the allocator happened to hold then."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def step(model, tokens: int, checkpointing: bool) -> None:
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(tokens))
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    model.set_activation_checkpointing(checkpointing)
    # one packed sequence: the CPU attention path pads nothing
    hidden = model.hidden_states(ids[None])[0]
    logp = fused_linear_logprob(hidden[:-1], model.lm_head_weight, ids[1:])
    (-logp.mean()).backward()
    del cu


def main() -> None:
    torch.set_num_threads(1)
    cfg, tokens, checkpointing = ModelConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    warm = Transformer(cfg)  # one-time allocations (autograd, kernels, thread pools) happen here
    step(warm, 8, checkpointing)
    torch.optim.AdamW(warm.parameters(), foreach=False).step()
    del warm
    out = {}
    base = rss()
    model = Transformer(cfg)
    out["policy"] = rss() - base
    base = rss()
    step(model, 8, checkpointing)  # tiny batch: allocates the gradients, keeps the peak low
    out["grads"] = rss() - base
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    base = rss()
    optimizer.step()
    out["adam"] = rss() - base
    base = rss()
    reference = Transformer(cfg).requires_grad_(False)
    out["reference"] = rss() - base
    optimizer.zero_grad(set_to_none=False)
    base = rss()
    if not reset_peak_rss():  # then only the rise above the earlier peak can be seen
        base = max(base, peak_rss())
    step(model, tokens, checkpointing)
    out["activations"] = peak_rss() - base
    print(json.dumps(out))
    del reference


if __name__ == "__main__":
    main()
