"""Async scheduling (model/engine/engine.py): the engine launches decode step N+1 before it reads step N's
tokens. On the CPU every step has finished when `launch` returns, so the overlap itself is
invisible here, but the bookkeeping is the same as on CUDA: the next step's input ids gathered on
the device from the step before, slots reserved for tokens not known yet, tokens of sequences
that stopped meanwhile dropped, a fall back to the plain schedule for prefill and preemption.
Completions, stats and the block pool must come out as with the plain schedule."""

import pytest
import torch

from score.model import Engine, SamplingParams
from score.model.engine.decode_step import DecodeStep
from tests.helpers.model_fixtures import tiny_decoder

VOCAB = 97
STOP = [5, 17, 60]  # random weights: each step stops a sequence with a few percent chance


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=8, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(9)
    lengths = [3, 17, 1, 9, 30, 5, 12, 2, 21, 7, 16]
    return [torch.randint(0, VOCAB - 1, (n,), generator=gen).tolist() for n in lengths]


def generate_both(model, prompts, params, max_tokens=None, **engine_kw):
    """(plain, async) completions and engines of the same call."""
    runs = []
    for async_scheduling in (False, True):
        engine = Engine(model, max_model_len=96, async_scheduling=async_scheduling, **engine_kw)
        runs.append((engine.generate(prompts, params, max_tokens=max_tokens), engine))
    return runs


def assert_same(got, want):
    for got_out, want_out in zip(got, want, strict=True):
        for g, w in zip(got_out, want_out, strict=True):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True)) <= 1e-5


def assert_pool_released(engine):
    bm = engine.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("buckets", [None, [1, 2, 4, 8, 16, 32]], ids=["unpadded", "buckets"])
def test_same_completions_as_the_plain_schedule(model, prompts, block_size, buckets):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=40, seed=3, stop_token_ids=STOP)
    max_tokens = [40 - 3 * i for i in range(len(prompts))]  # length finishes at different steps too
    kw = dict(block_size=block_size, num_blocks=4096 // block_size, max_num_seqs=32, decode_batch_sizes=buckets)
    (want, plain), (got, ahead) = generate_both(model, prompts, params, max_tokens, **kw)
    assert_same(got, want)
    reasons = {c.finish_reason for out in got for c in out}
    assert reasons == {"stop", "length"}
    # every stop mid-batch cost the async engine one dropped token, nothing else
    assert ahead.stats.discarded_tokens > 0 and plain.stats.discarded_tokens == 0
    assert ahead.stats.generated_tokens == plain.stats.generated_tokens
    assert ahead.stats.prefilled_tokens == plain.stats.prefilled_tokens
    for engine in (plain, ahead):
        assert_pool_released(engine)


def test_each_step_is_launched_before_the_previous_one_is_read(model, prompts):
    events = []  # (what, step, the step it was launched after); holding the steps keeps them distinct
    launch, collect = DecodeStep.launch, DecodeStep.collect

    def launching(self, seqs, params, continues, after=None):
        step = launch(self, seqs, params, continues, after)
        events.append(("launch", step, after))
        return step

    def collecting(self, step):
        events.append(("collect", step, None))
        return collect(self, step)

    DecodeStep.launch, DecodeStep.collect = launching, collecting
    try:
        engine = Engine(model, max_model_len=96, block_size=4, num_blocks=1024, async_scheduling=True)
        engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        DecodeStep.launch, DecodeStep.collect = launch, collect

    def when(what, step):
        return next(i for i, e in enumerate(events) if e[0] == what and e[1] is step)

    chained = [(step, after) for what, step, after in events if what == "launch" and after is not None]
    # one prefill, then 7 decode steps: the first from the plain schedule, six launched ahead
    assert sum(e[0] == "launch" for e in events) == 7 and len(chained) == 6
    for step, after in chained:
        assert when("launch", step) < when("collect", after)
    assert engine.stats.discarded_tokens == 0  # only length finishes, which the host foresees


def test_preemption_and_a_waiting_queue_fall_back_to_the_plain_schedule(model, prompts):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=30, seed=5, stop_token_ids=STOP)
    # seats for 6 of the 33 sequences and a pool for about two long ones: admissions and preemptions
    kw = dict(block_size=4, num_blocks=(96 + 40) // 4, max_num_seqs=6)
    (want, plain), (got, ahead) = generate_both(model, prompts, params, **kw)
    assert_same(got, want)
    assert ahead.stats.preemptions > 0
    for engine in (plain, ahead):
        assert_pool_released(engine)


def test_second_attempts_reuse_the_same_cached_prefixes(model, prompts):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=20, seed=7, stop_token_ids=STOP)
    fix = [1, 2, 3, 4, 5, 6]
    results = []
    for async_scheduling in (False, True):
        engine = Engine(model, max_model_len=96, block_size=4, num_blocks=2048, async_scheduling=async_scheduling)
        first = engine.generate(prompts, params)
        again = [p + c.token_ids + fix for p, out in zip(prompts, first, strict=True) for c in out]
        second = engine.generate(again, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=STOP))
        results.append((first, second, engine.stats.reused_tokens))
        assert_pool_released(engine)
    (first_a, second_a, reused_a), (first_b, second_b, reused_b) = results
    assert_same(first_b, first_a)
    assert_same(second_b, second_a)
    assert reused_b == reused_a > 0


def test_bad_value_is_a_clear_error(model):
    with pytest.raises(ValueError, match="async_scheduling must be"):
        Engine(model, max_model_len=96, num_blocks=64, async_scheduling="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_steps_launched_ahead_equal_the_plain_schedule(model, prompts):
    """On CUDA the overlap is real: step N+1's graph is queued behind step N's while the host reads
    N's tokens from the other pinned staging buffer. The default there."""
    from score.model import Transformer

    cuda_model = Transformer(model.config).to("cuda").eval()
    cuda_model.load_state_dict(model.state_dict())
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=40, seed=5, stop_token_ids=STOP)
    (want, plain), (got, ahead) = generate_both(cuda_model, prompts, params, block_size=16, num_blocks=512)
    assert_same(got, want)
    assert ahead.stats.discarded_tokens > 0 and ahead._decode.num_captures > 0
    assert Engine(cuda_model, max_model_len=96, num_blocks=64)._async_scheduling
    for engine in (plain, ahead):
        assert_pool_released(engine)
