"""The rollout engine against a dense, cache-free forward of the same model.

The model is tiny and random with a large init scale, so next-token distributions are peaked
and a greedy argmax is not decided by rounding. The reference is the plain loop: full forward of
the whole sequence, take the last position, append.
"""

import copy
import math

import pytest
import torch

from score.model import Completion, Engine, SamplingParams
from score.model.engine.sampling import sample, sampler_states, truncate_logits
from score.model.engine.workspace import DecodeWorkspace
from tests.helpers.model_fixtures import tiny_decoder

VOCAB = 131
PROMPT_LENGTHS = [1, 2, 7, 15, 16, 17, 33, 64, 99, 100]


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=0, vocab_size=VOCAB, hidden_size=48, intermediate_size=96, max_position_embeddings=256)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB - 1, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def dense_logprobs(model, tokens):
    """log_softmax of the next-token logits after `tokens`, float64, from a full forward."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1].double().log_softmax(-1)


def dense_greedy(model, prompt, max_tokens, stop=()):
    ids, logprobs = list(prompt), []
    for _ in range(max_tokens):
        lp = dense_logprobs(model, ids)
        token = int(lp.argmax())
        ids.append(token)
        logprobs.append(float(lp[token]))
        if token in stop:
            break
    return ids[len(prompt) :], logprobs


@pytest.fixture(scope="module")
def greedy_reference(model, prompts):
    return [dense_greedy(model, p, 6, stop=(VOCAB - 1,)) for p in prompts]


def assert_matches(outs, reference):
    for out, (ids, logprobs) in zip(outs, reference, strict=True):
        (c,) = out
        assert c.token_ids == ids
        assert max(abs(a - b) for a, b in zip(c.logprobs, logprobs, strict=True)) < 1e-4
        assert c.finish_reason == ("stop" if ids[-1] == VOCAB - 1 else "length")


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("max_num_seqs", [1, 3, 256])
def test_greedy_equals_dense_forward(model, prompts, greedy_reference, block_size, max_num_seqs):
    engine = Engine(
        model, block_size=block_size, num_blocks=4096 // block_size, max_model_len=128, max_num_seqs=max_num_seqs
    )
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert_matches(outs, greedy_reference)
    assert engine.block_manager.num_free_blocks == engine.num_blocks  # everything released


def test_pool_too_small_for_all_sequences_preempts_and_stays_exact(model, prompts, greedy_reference):
    engine = Engine(model, block_size=4, num_blocks=34, max_model_len=128)  # one 128-token sequence + 1
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert_matches(outs, greedy_reference)
    assert engine.stats.preemptions > 0


@pytest.mark.parametrize("block_size", [1, 16])
def test_second_turn_reuses_the_first_and_matches_dense(model, prompts, greedy_reference, block_size):
    engine = Engine(model, block_size=block_size, num_blocks=4096 // block_size, max_model_len=160)
    first = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    instruction = [5, 6, 7, 8, 9]
    second_prompts = [p + out[0].token_ids + instruction for p, out in zip(prompts, first, strict=True)]
    before, reused_before = engine.stats.prefilled_tokens, engine.stats.reused_tokens
    second = engine.generate(second_prompts, SamplingParams(temperature=0, max_tokens=6))
    reference = [dense_greedy(model, p, 6, stop=(VOCAB - 1,)) for p in second_prompts]
    assert_matches(second, reference)
    # only the instruction and the first turn's last token (sampled, never fed back) are computed
    assert engine.stats.prefilled_tokens - before == len(prompts) * (len(instruction) + 1)
    reused = engine.stats.reused_tokens - reused_before
    assert reused == sum(len(p) for p in second_prompts) - len(prompts) * (len(instruction) + 1)


def test_samples_share_the_prompt_and_are_seeded(model, prompts):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=123, ignore_eos=True)
    engine = Engine(model, block_size=4, num_blocks=512, max_model_len=128)
    outs = engine.generate(prompts[5:8], params)
    for out in outs:
        assert len(out) == 4 and all(isinstance(c, Completion) and len(c.token_ids) == 8 for c in out)
        assert len({tuple(c.token_ids) for c in out}) > 1  # the n samples differ at temperature 1
    # every sample after the first of a prompt computes exactly one prompt token
    assert engine.stats.prefilled_tokens == sum(len(p) + 3 for p in prompts[5:8])
    # same seed -> same samples, whatever the batch layout, cache state or preemptions
    again = engine.generate(prompts[5:8], params)
    narrow = Engine(model, block_size=16, num_blocks=9, max_model_len=128, max_num_seqs=2).generate(
        prompts[5:8], params
    )
    assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in outs]
    assert [[c.token_ids for c in o] for o in narrow] == [[c.token_ids for c in o] for o in outs]
    other = engine.generate(prompts[5:8], SamplingParams(**{**params.__dict__, "seed": 124}))
    assert [[c.token_ids for c in o] for o in other] != [[c.token_ids for c in o] for o in outs]
    # a batch split over two calls (data-parallel ranks) samples the same when each call passes
    # its prompts' whole-batch positions as seed keys
    head = engine.generate(prompts[5:6], params)
    tail = engine.generate(prompts[6:8], params, seed_keys=[1, 2])
    assert [[c.token_ids for c in o] for o in head + tail] == [[c.token_ids for c in o] for o in outs]
    with pytest.raises(ValueError, match="seed_keys"):
        engine.generate(prompts[6:8], params, seed_keys=[1])


def test_sampled_logprobs_are_untruncated_and_tokens_stay_in_the_kept_set(model, prompts):
    temperature, top_k, top_p = 0.7, 5, 0.8
    engine = Engine(model, block_size=4, num_blocks=512, max_model_len=128)
    params = SamplingParams(
        n=3, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=6, seed=5, ignore_eos=True
    )
    outs = engine.generate(prompts[:4], params)
    for prompt, out in zip(prompts[:4], outs, strict=True):
        for c in out:
            ids = list(prompt)
            for token, logprob in zip(c.token_ids, c.logprobs, strict=True):
                with torch.no_grad():
                    logits = model(torch.tensor([ids]))[0, -1].double() / temperature
                kept = torch.isfinite(truncate_logits(logits[None], top_k, top_p)[0])
                assert kept[token] and kept.sum() <= top_k
                assert abs(float(logits.log_softmax(-1)[token]) - logprob) < 1e-4
                ids.append(token)


def test_sampler_respects_top_k_top_p_and_samples_the_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3
    seeds = torch.arange(4)
    for top_k, top_p in ((3, 1.0), (0, 0.5), (10, 0.9)):
        kept = torch.isfinite(truncate_logits(logits, top_k, top_p))
        assert (kept.sum(-1) <= (top_k or 50)).all()
        probs = torch.softmax(truncate_logits(logits, top_k, 1.0), -1)  # top-p acts after top-k
        for row in range(4):  # the nucleus is the smallest top set reaching top_p
            p_sorted = probs[row][kept[row]].sort(descending=True).values
            if top_p < 1:
                assert p_sorted.sum() >= top_p - 1e-6 and p_sorted[:-1].sum() < top_p
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
        for t in range(50):
            tokens, _ = sample(logits, params, sampler_states(seeds, torch.full((4,), t)))
            assert kept[torch.arange(4), tokens].all()
    # unrestricted sampling follows the softmax: frequencies within 4 sigma
    probs = torch.softmax(logits[0], -1)
    counts = torch.zeros(50)
    params = SamplingParams(temperature=1.0)
    for t in range(4000):
        counts[sample(logits[:1], params, sampler_states(torch.tensor([9]), torch.tensor([t])))[0]] += 1
    sigma = (4000 * probs * (1 - probs)).sqrt()
    assert ((counts - 4000 * probs).abs() <= 4 * sigma + 1).all()


def test_sampler_workspace_and_engine_rope_are_bit_identical():
    """The CPU decode shortcuts change no number: the sampler writing into kept buffers, and the
    engine's RoPE with rotate_half's negation folded into a signed sin."""
    from score.model.engine.inference_model import apply_rope_signed
    from score.model.model import apply_rope

    gen = torch.Generator().manual_seed(3)
    workspace = DecodeWorkspace()
    for rows, vocab in ((1, 7), (5, 131), (16, 1000), (3, 32001), (16, 1000)):  # buffers regrow and shrink
        logits = torch.randn(rows, vocab, generator=gen) * 4
        for params in (
            SamplingParams(temperature=0),
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=0.6),
            SamplingParams(temperature=1.3, top_k=5, top_p=0.9),
        ):
            seeds = torch.randint(0, 2**62, (rows,), generator=gen)
            counters = torch.randint(0, 100, (rows,), generator=gen)
            states = sampler_states(seeds, counters)
            plain, kept = sample(logits, params, states), sample(logits, params, states, workspace)
            assert torch.equal(plain[0], kept[0]) and torch.equal(plain[1], kept[1])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for heads, dim in ((8, 64), (2, 24), (3, 128)):
            x = torch.randn(37, heads, dim, generator=gen).to(dtype)
            angles = torch.randint(0, 4096, (37, 1), generator=gen) * torch.rand(dim // 2, generator=gen)
            emb = torch.cat((angles, angles), -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            signed = torch.cat((-sin[:, : dim // 2], sin[:, dim // 2 :]), -1)
            assert torch.equal(apply_rope(x, cos, sin), apply_rope_signed(x, cos[:, None], signed[:, None]))


def test_stop_tokens_and_eos(model, prompts):
    engine = Engine(model, block_size=4, num_blocks=512, max_model_len=128)
    ((ref_ids, _),) = [dense_greedy(model, prompts[3], 6)]
    stop = ref_ids[2]
    ((out,),) = engine.generate(
        [prompts[3]], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop], ignore_eos=True)
    )
    first = ref_ids.index(stop)
    assert out.token_ids == ref_ids[: first + 1] and out.finish_reason == "stop"
    # a prompt whose max_model_len leaves 3 tokens stops by length there
    long_prompt = (prompts[-1] * 2)[:125]
    ((out,),) = engine.generate([long_prompt], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_clear_cache_drops_reuse(model, prompts):
    engine = Engine(model, block_size=4, num_blocks=512, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=2)
    engine.generate([prompts[7]], params)
    engine.generate([prompts[7]], params)
    assert engine.stats.reused_tokens == len(prompts[7]) - 1
    engine.clear_cache()
    engine.generate([prompts[7]], params)
    assert engine.stats.reused_tokens == len(prompts[7]) - 1
    assert engine.stats.prefilled_tokens == 2 * len(prompts[7]) + 1


@pytest.mark.interpreter(twin="tests/test_decode_step.py::test_padded_buckets_through_the_triton_kernels")
def test_triton_backend_matches_under_the_interpreter(model, prompts, greedy_reference):
    engine = Engine(model, block_size=16, num_blocks=64, max_model_len=128, attention_backend="triton")
    outs = engine.generate(prompts[2:4], SamplingParams(temperature=0, max_tokens=6))
    assert_matches(outs, greedy_reference[2:4])


def test_bad_input_is_a_clear_error(model, prompts):
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model, block_size=16, num_blocks=4, max_model_len=128)
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(model, max_model_len=10**6)
    engine = Engine(model, block_size=16, num_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompts\[1\] has 64 tokens; max_model_len=64"):
        engine.generate([[1, 2], [3] * 64], SamplingParams(temperature=0))
    with pytest.raises(ValueError, match=r"prompts\[0\] holds 131"):
        engine.generate([[1, VOCAB]], SamplingParams(temperature=0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=0)
    # the engine is still usable after a rejected call
    ((out,),) = engine.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=2))
    assert len(out.token_ids) == 2 and math.isfinite(out.logprobs[0])


def test_an_uninitialised_pool_gives_the_same_results_as_a_zeroed_one(model, prompts):
    """The pool is allocated empty and each block zeroed when first handed out: garbage (here NaN)
    in never-used memory never reaches attention."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=5)
    clean = Engine(model, block_size=4, num_blocks=2000, max_num_seqs=4)
    poisoned = Engine(model, block_size=4, num_blocks=2000, max_num_seqs=4)
    with torch.inference_mode():
        clean.kv_cache.zero_()
        poisoned.kv_cache.fill_(float("nan"))
    for engine in (clean, poisoned):
        assert engine.block_manager.high_water == 0
    a, b = clean.generate(prompts, params), poisoned.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        assert [c.token_ids for c in x] == [c.token_ids for c in y]
        assert [c.logprobs for c in x] == [c.logprobs for c in y]
    used = poisoned.block_manager.high_water
    assert 0 < used < 2000 and not torch.isnan(poisoned.kv_cache[:, :, :used]).any()
    assert torch.isnan(poisoned.kv_cache[:, :, used:]).all()  # untouched memory stays untouched


def test_sleep_frees_the_pool_and_wake_restores_an_empty_one(model, prompts):
    engine = Engine(model, block_size=4, num_blocks=96, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    first = engine.generate(prompts, params)
    engine.sleep()
    assert engine.sleeping and engine.kv_cache is None
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts, params)
    engine.wake()
    reused_before = engine.stats.reused_tokens
    with torch.inference_mode():
        engine.kv_cache.fill_(float("nan"))  # the new pool is as uninitialised as a fresh one
    again = engine.generate(prompts, params)
    assert [o[0].token_ids for o in again] == [o[0].token_ids for o in first]
    fresh = Engine(model, block_size=4, num_blocks=96, max_num_seqs=4)
    fresh_out = fresh.generate(prompts, params)
    assert [[c.logprobs for c in o] for o in again] == [[c.logprobs for c in o] for o in fresh_out]
    # no prefix survived the sleep: this call reuses only what a fresh engine's would
    assert engine.stats.reused_tokens - reused_before == fresh.stats.reused_tokens


def test_max_tokens_per_prompt(model, prompts):
    engine = Engine(model, block_size=4, num_blocks=256, max_model_len=128, max_num_seqs=8)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=50, ignore_eos=True, seed=0)
    outs = engine.generate(prompts[:3], params, max_tokens=[1, 5, 9])
    assert [[len(c.token_ids) for c in o] for o in outs] == [[1, 1], [5, 5], [9, 9]]
    assert all(c.finish_reason == "length" for o in outs for c in o)
    # the same samples as a call that gives every prompt the same budget, cut short
    full = engine.generate(prompts[:3], params)
    assert all(
        c.token_ids == f.token_ids[: len(c.token_ids)]
        for o, fo in zip(outs, full, strict=True)
        for c, f in zip(o, fo, strict=True)
    )
    with pytest.raises(ValueError, match="max_tokens must be 3 ints >= 1"):
        engine.generate(prompts[:3], params, max_tokens=[1, 0, 2])


def test_an_engine_of_another_dtype_generates_from_its_own_refreshed_copy(model, prompts):
    """bf16 rollouts of fp32 master weights: a bf16 copy of the weights and a bf16 KV pool, refreshed
    in place from the model at every generate call, freed by sleep; the model itself is untouched."""
    policy = tiny_decoder(seed=5, vocab_size=VOCAB, hidden_size=48, intermediate_size=96, max_position_embeddings=256)
    engine = Engine(policy, dtype=torch.bfloat16, block_size=4, num_blocks=96, max_num_seqs=4)
    weights = engine._inference
    assert engine.kv_cache.dtype == torch.bfloat16 and engine.model is policy
    own = [weights.embed, weights.norm, *(t for layer in weights.layers for t in (layer.o, layer.gate, layer.down))]
    assert {t.dtype for t in own} == {torch.bfloat16} and weights.layers[0].qkv[0][0].dtype == torch.bfloat16
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    params = SamplingParams(temperature=0.0, max_tokens=6)

    def from_a_bf16_model():
        cast = copy.deepcopy(policy).to(torch.bfloat16)
        return Engine(cast, block_size=4, num_blocks=96, max_num_seqs=4).generate(prompts, params)

    def same(a, b):
        assert [[c.token_ids for c in o] for o in a] == [[c.token_ids for c in o] for o in b]
        assert [[c.logprobs for c in o] for o in a] == [[c.logprobs for c in o] for o in b]

    same(engine.generate(prompts, params), from_a_bf16_model())
    addresses = weights.weight_addresses()
    with torch.no_grad():  # what an optimizer step does between two rollouts
        for p in policy.parameters():
            p.mul_(1.5)
    engine.clear_cache()
    same(engine.generate(prompts, params), from_a_bf16_model())
    assert engine._inference is weights and weights.weight_addresses() == addresses  # refreshed in place
    engine.sleep()
    assert engine._inference is None and engine.kv_cache is None
    engine.wake()
    same(engine.generate(prompts, params), from_a_bf16_model())


def test_block_tables_are_as_wide_as_the_longest_sequence(model, prompts):
    engine = Engine(model, block_size=4, num_blocks=96, max_model_len=40, max_num_seqs=4)
    engine.generate(prompts[:3], SamplingParams(temperature=0.0, max_tokens=4))
    assert engine._decode.width == 10  # ceil(40 / 4), not max_position_embeddings / 4
