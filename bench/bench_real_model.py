"""The real model (SmolLM2-135M-Instruct from its GGUF): two-attempt rollouts and a training step,
ours against transformers on the same weights in the same run.

    pytest bench/bench_real_model.py --benchmark-only -q -s -m real

Rollouts: 16 chat prompts of the built-in arithmetic task (the config's system prompt and
instruction; 90-110 tokens each), attempt 1 and attempt 2 sample 64 tokens each at temperature 1
with EOS ignored, so both sides generate 2,048 tokens. transformers gets each attempt as one
batched `generate` call over left-padded prompts (what public SCoRe reproductions do); our engine
gets the same two calls, attempt 2 reusing attempt 1's cached KV. Rounds alternate which side goes
first; reported: generated tokens/s per side (best and median round) and the median ratio.
Training step: bench/train_step_worker.py (rollout, reward, reference and policy log-probs,
backward, AdamW) on the real weights, 4 prompts x k=4, prompt 96 tokens, attempts 48 + 48,
instruction 48, each side in a fresh interpreter. Results: bench/RESULTS.md.
"""

import statistics
import time

import pytest
import torch

from bench.bench_train_step import report, run_worker
from score.model import Engine, SamplingParams, from_pretrained, load_tokenizer
from score.rl import arithmetic_task
from score.rl.prompts import INTEGER_CORRECTION_INSTRUCTION, INTEGER_SYSTEM_PROMPT, PromptBuilder
from tests.helpers.real_model import real_model_folder

pytestmark = pytest.mark.real
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

PROMPTS, NEW_TOKENS, ROUNDS = 16, 64, 2
GENERATED = 2 * PROMPTS * NEW_TOKENS
TRAIN_SHAPE = dict(prompts=4, k=4, prompt_len=96, t1=48, t2=48, instr_len=48)


@pytest.fixture(scope="module")
def setup():
    folder = real_model_folder()
    tokenizer = load_tokenizer(folder)
    builder = PromptBuilder(
        tokenizer, chat=True, system_prompt=INTEGER_SYSTEM_PROMPT, correction_instruction=INTEGER_CORRECTION_INSTRUCTION
    )
    prompts = [builder.first_attempt_ids(p.question) for p in arithmetic_task.problems(PROMPTS, "eval")]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return from_pretrained(folder), hf, builder, prompts


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def transformers_rollout(hf, builder, prompts, seed):
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS)
    kwargs |= dict(min_new_tokens=NEW_TOKENS, pad_token_id=0)
    ids, mask = left_padded(prompts, 0)
    first = hf.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :].tolist()
    contexts = [builder.second_attempt_ids(p, a, "length")[0] for p, a in zip(prompts, first, strict=True)]
    ids, mask = left_padded(contexts, 0)
    second = hf.generate(ids, attention_mask=mask, **kwargs)
    assert second.shape[1] - ids.shape[1] == NEW_TOKENS


def engine_rollout(ours, builder, prompts, seed):
    engine = Engine(ours, max_num_seqs=PROMPTS, max_model_len=1024, num_blocks=1024)
    params = SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, seed=seed)
    first = engine.generate(prompts, params)
    contexts = [builder.second_attempt_ids(p, o[0].token_ids, "length")[0] for p, o in zip(prompts, first, strict=True)]
    second = engine.generate(contexts, params)
    assert all(len(o[0].token_ids) == NEW_TOKENS for o in first + second)
    return engine.stats


def test_real_two_attempt_rollout_vs_transformers(benchmark, setup):
    ours, hf, builder, prompts = setup
    times = {"ours": [], "transformers": []}
    facts = {}

    def pair():
        order = [
            ("ours", lambda: facts.update(stats=engine_rollout(ours, builder, prompts, len(times["ours"])))),
            ("transformers", lambda: transformers_rollout(hf, builder, prompts, len(times["transformers"]))),
        ]
        if len(times["ours"]) % 2:
            order.reverse()
        for label, fn in order:
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            times[label].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    ratios = [h / o for o, h in zip(times["ours"], times["transformers"], strict=True)]
    info = {
        "ours_tokens_per_s_best": GENERATED / min(times["ours"]),
        "transformers_tokens_per_s_best": GENERATED / min(times["transformers"]),
        "ours_tokens_per_s_median": GENERATED / statistics.median(times["ours"]),
        "transformers_tokens_per_s_median": GENERATED / statistics.median(times["transformers"]),
        "median_ratio_ours_over_transformers": statistics.median(ratios),
        "cache_hit_rate": facts["stats"].hit_rate,
        "threads": torch.get_num_threads(),
    }
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in info.items()))


@pytest.mark.benchmark(group="train_step")
def test_real_train_step_vs_naive(benchmark):
    folder = real_model_folder()

    def compare():
        ours = run_worker("ours", folder, TRAIN_SHAPE)
        naive = run_worker("naive", folder, TRAIN_SHAPE)
        return {"ours": ours, "naive": naive, "speedup": naive["seconds"]["total"] / ours["seconds"]["total"]}

    result = benchmark.pedantic(compare, rounds=1, iterations=1)
    result["memory_ratio"] = result["ours"]["peak_rss_above_start"] / result["naive"]["peak_rss_above_start"]
    benchmark.extra_info.update(result)
    print("\n" + report(result))
