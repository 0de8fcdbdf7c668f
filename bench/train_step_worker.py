"""Run ONE SCoRe training step (ours or the naive peer) in this process; print phase times + peak RSS as JSON.

    python bench/train_step_worker.py VARIANT MODEL_DIR PROMPTS K PROMPT_LEN T1 T2 INSTR_LEN [THREADS]

VARIANT `ours`: the trainer's own pieces, in train_step's order: engine rollouts (paged KV, prefix
reuse of the prompt and of attempt 1), rewards, packed reference forward + fused log-probs of the
attempt tokens (no logits), packed policy forward + fused log-probs + score_loss + backward, AdamW.

VARIANT `naive`: the same step as public SCoRe reproductions write it: HF transformers
`generate()` for both attempts (attempt 2 regenerated from the whole context), then for reference
and policy `model(ids).logits` ([S, L, V] materialised) -> `log_softmax` -> `gather`, the same
score_loss, backward, AdamW. Same weights (the same HF folder), same prompts, same token budgets
(no EOS in the model, so every attempt is exactly T1/T2 tokens in both variants).

Peak memory: the RSS high-water mark of the first step above the RSS after loading; time: the
second step (the first warms up allocator and thread pools).
"""

import json
import resource
import sys
import time

import torch

RUSAGE_KB = 1024


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RUSAGE_KB


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def make_batch(prompts, prompt_len, instr_len, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randint(3, vocab, (prompts, prompt_len), generator=gen).tolist()
    instruction = torch.randint(3, vocab, (instr_len,), generator=gen).tolist()
    return xs, instruction


def parity_rewards(sequences):
    # A cheap deterministic checker so both variants see the same reward cost and varied rewards.
    return [float(sum(s) % 2) for s in sequences]


def loss_of(logp, ref_logp, attempt, cu, groups, r1, r2):
    from score.kernels import score_loss
    from score.rl.loss import attempt_coefficients

    coefficients = attempt_coefficients(2, 1, 2, alpha=10.0, beta1=0.01, beta2=0.1).kernel_arguments()
    return score_loss(logp, ref_logp, attempt, cu, groups, torch.stack([r1, r2], 1), **coefficients).loss


def step_ours(model, reference, optimizer, engine, xs, instruction, k, t1, t2, timings):
    from score.model import SamplingParams

    t = time.perf_counter()
    outs1 = engine.generate(xs, SamplingParams(n=k, temperature=1.0, max_tokens=t1, ignore_eos=True, seed=1))
    contexts, a1 = [], []
    for i, x in enumerate(xs):
        for c in outs1[i]:
            contexts.append(x + c.token_ids + instruction)
            a1.append(c.token_ids)
    outs2 = engine.generate(contexts, SamplingParams(n=1, temperature=1.0, max_tokens=t2, ignore_eos=True, seed=2))
    a2 = [o[0].token_ids for o in outs2]
    timings["rollout"] = time.perf_counter() - t

    t = time.perf_counter()
    r1 = torch.tensor(parity_rewards(a1))
    r2 = torch.tensor(parity_rewards(a2))
    timings["reward"] = time.perf_counter() - t

    from score.kernels import fused_linear_logprob

    ids, rows, targets, attempt, cu, cu_active = [], [], [], [], [0], [0]
    for ctx, y2 in zip(contexts, a2, strict=True):
        seq = ctx + y2
        n_x = len(ctx) - len(instruction) - t1
        labels = [0] * n_x + [1] * t1 + [0] * len(instruction) + [2] * len(y2)
        for pos in range(1, len(seq)):
            if labels[pos]:
                rows.append(cu[-1] + pos - 1)
                targets.append(seq[pos])
                attempt.append(labels[pos])
        ids += seq
        cu.append(len(ids))
        cu_active.append(len(rows))
    ids, rows, targets = torch.tensor(ids), torch.tensor(rows), torch.tensor(targets)
    attempt = torch.tensor(attempt, dtype=torch.int32)
    cu, cu_active = torch.tensor(cu, dtype=torch.int32), torch.tensor(cu_active, dtype=torch.int32)
    groups = torch.arange(len(xs)).repeat_interleave(k)

    t = time.perf_counter()
    with torch.no_grad():
        h = reference.hidden_states(ids, cu_seqlens=cu).index_select(0, rows)
        ref_logp = fused_linear_logprob(h, reference.lm_head_weight, targets)
    timings["reference_forward"] = time.perf_counter() - t

    t = time.perf_counter()
    h = model.hidden_states(ids, cu_seqlens=cu).index_select(0, rows)
    logp = fused_linear_logprob(h, model.lm_head_weight, targets)
    loss_of(logp, ref_logp, attempt, cu_active, groups, r1, r2).backward()
    timings["policy_forward_backward"] = time.perf_counter() - t

    t = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    engine.clear_cache()
    timings["optimizer"] = time.perf_counter() - t


def step_naive(model, reference, optimizer, xs, instruction, k, t1, t2, timings):
    t = time.perf_counter()
    prompts = torch.tensor(xs)
    torch.manual_seed(1)
    with torch.no_grad():
        out1 = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=t1,
            min_new_tokens=t1,
            num_return_sequences=k,
            pad_token_id=0,
        )
        instr = torch.tensor(instruction).expand(out1.shape[0], -1)
        contexts = torch.cat([out1, instr], dim=1)
        out2 = model.generate(
            contexts,
            attention_mask=torch.ones_like(contexts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=t2,
            min_new_tokens=t2,
            pad_token_id=0,
        )
    timings["rollout"] = time.perf_counter() - t

    t = time.perf_counter()
    a1 = out1[:, prompts.shape[1] :]
    a2 = out2[:, contexts.shape[1] :]
    r1 = torch.tensor(parity_rewards(a1.tolist()))
    r2 = torch.tensor(parity_rewards(a2.tolist()))
    timings["reward"] = time.perf_counter() - t

    seqs = out2
    S, L = seqs.shape
    n_x = prompts.shape[1]
    labels = torch.tensor([0] * n_x + [1] * t1 + [0] * len(instruction) + [2] * t2)[1:]
    mask = labels > 0
    groups = torch.arange(len(xs)).repeat_interleave(k)
    per_seq = int(mask.sum())
    cu = torch.arange(0, S * per_seq + 1, per_seq, dtype=torch.int32)
    attempt = labels[mask].repeat(S).to(torch.int32)

    def logprobs(m):
        logits = m(seqs).logits[:, :-1]  # [S, L-1, V], materialised
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, seqs[:, 1:, None])[..., 0][:, mask].reshape(-1)

    t = time.perf_counter()
    with torch.no_grad():
        ref_logp = logprobs(reference)
    timings["reference_forward"] = time.perf_counter() - t

    t = time.perf_counter()
    logp = logprobs(model)
    loss_of(logp, ref_logp, attempt, cu, groups, r1, r2).backward()
    timings["policy_forward_backward"] = time.perf_counter() - t

    t = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timings["optimizer"] = time.perf_counter() - t


def main():
    variant, model_dir = sys.argv[1], sys.argv[2]
    prompts, k, prompt_len, t1, t2, instr_len = (int(v) for v in sys.argv[3:9])
    threads = int(sys.argv[9]) if len(sys.argv) > 9 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if variant == "ours":
        from score.model import Engine, from_pretrained

        model = from_pretrained(model_dir)
        reference = from_pretrained(model_dir).requires_grad_(False)
        engine = Engine(model, max_num_seqs=prompts * k, max_model_len=prompt_len + t1 + instr_len + t2)
        vocab = model.config.vocab_size

        def step(timings):
            return step_ours(model, reference, optimizer, engine, xs, instruction, k, t1, t2, timings)
    elif variant == "naive":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
        model.generation_config.eos_token_id = None
        vocab = model.config.vocab_size

        def step(timings):
            return step_naive(model, reference, optimizer, xs, instruction, k, t1, t2, timings)
    else:
        raise SystemExit(f"unknown variant {variant!r}; expected ours or naive")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    xs, instruction = make_batch(prompts, prompt_len, instr_len, vocab)
    before = current_rss()
    step({})  # warm-up (allocator, thread pools); its high-water mark is the step's peak memory
    peak = rss_peak() - before
    timings = {}
    start = time.perf_counter()
    step(timings)
    timings["total"] = time.perf_counter() - start
    print(json.dumps({"variant": variant, "seconds": timings, "peak_rss_above_start": peak, "rss_before": before}))


if __name__ == "__main__":
    main()
