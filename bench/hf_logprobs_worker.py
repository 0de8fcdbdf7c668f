"""Run ONE way of taking per-token log-probs from a transformers model (forward + backward) in this
process; print its time and peak memory as JSON. Used by bench_hf_logprobs.py, one fresh process
per variant, so that one variant's allocations cannot hide or inflate the other's peak.

    python bench/hf_logprobs_worker.py VARIANT VOCAB HIDDEN LAYERS BATCH SEQ DEVICE DTYPE

VARIANT `token_logprobs`: score.kernels.hf.token_logprobs (the decoder's hidden states and the head's
weight through fused_linear_logprob; no [tokens, vocab] logits). VARIANT `log_softmax`: what a
trainer without the kernel writes, `log_softmax(model(ids).logits.float(), -1).gather(targets)`.
Both: a random-weight Qwen2-architecture model with a tied head, the loss sum(logp * upstream) with
a random per-token upstream gradient, backward into every parameter.

Memory: the rise of the peak above the memory held once the model, its inputs and (after a first,
untimed step) its gradients exist, so what one step adds: peak RSS (VmHWM, reset through
/proc/self/clear_refs after the warm-up step) on CPU, `max_memory_allocated` on GPU. Time: the
second step.
"""

import json
import sys
import time

import torch


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the RSS high-water mark becomes the current RSS


def make_model(vocab: int, hidden: int, layers: int, dtype, device):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).train()


def logprobs_fn(variant: str):
    if variant == "token_logprobs":
        from score.kernels import hf

        return lambda model, ids, targets: hf.token_logprobs(model, ids, targets)
    if variant == "log_softmax":

        def full_logits(model, ids, targets):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            return torch.where(targets != -100, logp, 0.0)

        return full_logits
    raise SystemExit(f"unknown variant {variant!r} (token_logprobs | log_softmax)")


def main():
    variant, vocab, hidden, layers, batch, seq, device, dtype = sys.argv[1:9]
    vocab, hidden, layers, batch, seq = (int(x) for x in (vocab, hidden, layers, batch, seq))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cuda = device.startswith("cuda")
    model = make_model(vocab, hidden, layers, dtype, device)
    fn = logprobs_fn(variant)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    upstream = torch.randn(batch, seq, generator=gen).to(device)

    def step():
        (fn(model, ids, targets) * upstream).sum().backward()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: gradients allocated, kernels compiled, library pages faulted in
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        held = _status_bytes("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    print(
        json.dumps(
            {
                "variant": variant,
                "tokens": batch * seq,
                "vocab": vocab,
                "hidden": hidden,
                "layers": layers,
                "device": device,
                "dtype": str(dtype),
                "seconds": seconds,
                "held_bytes": held,
                "peak_bytes": peak,
                "step_peak_bytes": peak - held,
                "memory_kind": "max_memory_allocated" if cuda else "peak RSS",
            }
        )
    )


if __name__ == "__main__":
    main()
