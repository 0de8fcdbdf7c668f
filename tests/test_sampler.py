"""The batched counter-based sampler: SplitMix64 bit for bit, seeded reproducibility, independence
of batch layout, greedy = argmax, frequencies that follow softmax(logits / T) with and without
top-k / top-p (chi-square at a fixed seed), logprobs of the untruncated distribution."""

import math
import random

import pytest
import torch

from score.model import Engine, SamplingParams
from score.model.engine.sampling import counter_uniforms, sample, sampler_state, sampler_states, truncate_logits
from tests.helpers.model_fixtures import tiny_decoder

MASK = (1 << 64) - 1


def splitmix64(seed: int, t: int) -> int:
    """Output t + 1 of SplitMix64 from state `seed`, in Python's unbounded ints."""
    z = (seed + (t + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_counter_uniforms_are_splitmix64_bit_for_bit():
    rng = random.Random(0)
    seeds = [0, 1, (1 << 63) - 1] + [rng.randrange(1 << 63) for _ in range(500)]
    counters = [0, 5, (1 << 31) - 1] + [rng.randrange(1 << 40) for _ in range(500)]
    got = counter_uniforms(torch.tensor(seeds), torch.tensor(counters))
    want = torch.tensor(
        [(splitmix64(s, t) >> 11) * 2.0**-53 for s, t in zip(seeds, counters, strict=True)], dtype=torch.float64
    )
    assert torch.equal(got, want)
    assert splitmix64(0, 0) == 0xE220A8397B1DCDAF  # the reference implementation's first output
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


def test_sampler_states_from_the_host_equal_the_tensor_ones_and_pick_by_the_uniforms():
    """The host-side state (what the engine writes per row) is the tensor one; the sampler picks
    the first token whose cumulative mass exceeds counter_uniforms(seed, counter) times the total."""
    rng = random.Random(1)
    seeds = [0, (1 << 63) - 1] + [rng.randrange(1 << 63) for _ in range(200)]
    counters = [0, (1 << 31) - 1] + [rng.randrange(1 << 20) for _ in range(200)]
    host = torch.tensor([sampler_state(s, t) for s, t in zip(seeds, counters, strict=True)])
    assert torch.equal(host, sampler_states(torch.tensor(seeds), torch.tensor(counters)))
    logits = torch.randn(len(seeds), 300, generator=torch.Generator().manual_seed(4)) * 3
    tokens, _ = sample(logits, SamplingParams(temperature=1.0), host[:, None])
    cdf = logits.log_softmax(-1).double().exp().cumsum(-1)
    target = counter_uniforms(torch.tensor(seeds), torch.tensor(counters))[:, None] * cdf[:, -1:]
    assert torch.equal(tokens, torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=299))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over categories expected >= 5 times (rarer ones pooled), and its dof."""
    n = float(counts.sum())
    expected = n * probs.double()
    common = expected >= 5
    obs = torch.cat([counts[common].double(), counts[~common].double().sum()[None]])
    exp = torch.cat([expected[common], expected[~common].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 8, 1.0), (1.0, 0, 0.8), (0.9, 12, 0.9)]
)
def test_frequencies_follow_the_truncated_softmax(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 40, generator=gen) * 2
    draws = 20_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    # one row per draw: the same logits under 20k counters of one seed, sampled in one pass
    states = sampler_states(torch.full((draws,), 1234), torch.arange(draws))
    tokens, logprobs = sample(logits.expand(draws, -1), params, states)
    probs = torch.softmax(truncate_logits(logits.double() / temperature, top_k, top_p)[0], -1)
    counts = torch.bincount(tokens, minlength=40)
    assert (counts[probs == 0] == 0).all()  # nothing outside the top-k / nucleus
    stat, dof = chi_square(counts, probs)
    # chi-square critical value at p = 1e-3 (Wilson-Hilferty); the seed is fixed, so this never flakes
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert stat < critical, (stat, dof, critical)
    expected_lp = torch.log_softmax(logits[0].double() / temperature, -1)[tokens]
    torch.testing.assert_close(logprobs.double(), expected_lp, atol=1e-5, rtol=0)


def test_greedy_is_argmax_with_plain_logprobs():
    logits = torch.randn(9, 77, generator=torch.Generator().manual_seed(2)) * 3
    tokens, logprobs = sample(logits, SamplingParams(temperature=0), None)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0], atol=1e-6, rtol=0)


def test_sampling_without_seeds_is_refused():
    with pytest.raises(ValueError, match="needs int64 sampler states of shape \\[3\\]"):
        sample(torch.zeros(3, 5), SamplingParams(temperature=1.0), None)
    with pytest.raises(ValueError, match="needs int64 sampler states of shape \\[3\\]"):
        sample(torch.zeros(3, 5), SamplingParams(temperature=1.0), torch.zeros(3, 2, dtype=torch.long))


@pytest.fixture(scope="module")
def engine():
    model = tiny_decoder(seed=0, initializer_range=0.1)
    return Engine(model, block_size=4, num_blocks=512, max_model_len=64, max_num_seqs=64)


def test_a_sequence_samples_the_same_alone_or_in_a_batch_of_64(engine):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (int(n),), generator=gen).tolist() for n in torch.randint(1, 20, (64,))]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=11, ignore_eos=True)
    batch = engine.generate(prompts, params)
    for i in (0, 17, 63):
        (alone,) = engine.generate([prompts[i]], params, seed_keys=[i])
        assert alone[0].token_ids == batch[i][0].token_ids
        assert alone[0].logprobs == pytest.approx(batch[i][0].logprobs, abs=1e-5)
    again = engine.generate(prompts, params)  # seeded: reproducible
    assert [c[0].token_ids for c in again] == [c[0].token_ids for c in batch]
    other = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=12))
    assert [c[0].token_ids for c in other] != [c[0].token_ids for c in batch]
