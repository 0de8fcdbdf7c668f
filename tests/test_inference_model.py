"""The engine's own forward over its own inference weights (model/engine/inference_model.py) against
the training decoder: hidden states for every family (q/k/v bias, o_proj bias, q/k-norm, MHA) on the
plain ops and the kernels (interpreted on a CPU), greedy tokens and logprobs of whole generations for
Llama, Qwen2 and Qwen3 with and without oneDNN; the weights follow the policy changed in place,
replaced, or switched to the kernels between generate calls, and sleep frees them."""

import pytest
import torch

from score.model import Engine, SamplingParams
from score.model.engine import onednn
from score.model.engine.inference_model import grouped_head_order
from tests.helpers.model_fixtures import engine_forward_hidden, packed_prompts, randomise_biases, tiny_decoder

VOCAB = 89
FAMILIES = {
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM"),
    "llama_no_bias": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False),
    "llama_o_proj_bias_mha": dict(architecture="LlamaForCausalLM", attention_bias=True, num_key_value_heads=4),
    "qwen3_qk_norm": dict(architecture="Qwen3ForCausalLM", head_dim=16),
}
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


@pytest.mark.parametrize(
    "kernels, backend",
    [("torch", "torch"), ("triton", "triton"), ("triton", "torch")],
    ids=["plain", "kernels", "kernels-torch-attention"],
)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_engine_forward_equals_the_training_decoder(family, kernels, backend, monkeypatch):
    """A prefill through the engine's forward (one stacked q|k|v GEMM, grouped heads and signed RoPE
    tables on the plain ops; q|k|v order and RoPE in the KV store or by the RoPE kernel on the kernels'
    path) against the training decoder's packed forward over the same sequences."""
    monkeypatch.setattr(onednn, "AVAILABLE", False)  # plain GEMMs here; tests/test_onednn.py has oneDNN's
    model = randomise_biases(tiny_decoder(seed=2, vocab_size=VOCAB, **FAMILIES[family]))
    if kernels == "triton" and torch.cuda.is_available():  # compiled there; the interpreter on a CPU
        model = model.to("cuda")
    model.set_kernels(kernels)
    ids, cu = packed_prompts(model)
    with torch.no_grad():
        want = model.hidden_states(ids, cu_seqlens=cu)
    torch.testing.assert_close(engine_forward_hidden(model, backend), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("through_onednn", [False, True], ids=["plain-gemms", "onednn"])
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_greedy_generations_are_the_training_decoders(architecture, through_onednn, monkeypatch):
    """Each generated token is the training decoder's argmax after the tokens before it, and its
    logprob that decoder's log-softmax, within fp32 rounding (prefill, then decode steps over kept keys)."""
    if through_onednn and not onednn.AVAILABLE:
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(onednn, "AVAILABLE", through_onednn)
    extra = dict(head_dim=16) if architecture == "Qwen3ForCausalLM" else dict(tie_word_embeddings=False)
    model = randomise_biases(tiny_decoder(seed=5, vocab_size=VOCAB, architecture=architecture, **extra))
    engine = Engine(model, block_size=4, max_model_len=64, max_num_seqs=4)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, (completion,) in zip(PROMPTS, outs, strict=True):
        ids = list(prompt)
        for token, logprob in zip(completion.token_ids, completion.logprobs, strict=True):
            with torch.no_grad():
                exact = model(torch.tensor([ids]))[0, -1].double().log_softmax(-1)
            assert token == int(exact.argmax()) and abs(logprob - float(exact[token])) <= 1e-5
            ids.append(token)


def test_grouped_head_order_puts_each_query_group_before_its_k_and_v():
    # 6 q heads sharing 2 KV heads (groups of 3): q0 q1 q2 k0 v0 | q3 q4 q5 k1 v1
    assert grouped_head_order(6, 2).tolist() == [0, 1, 2, 6, 8, 3, 4, 5, 7, 9]
    assert grouped_head_order(4, 4).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


def greedy(engine, prompts):
    engine.clear_cache()
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    return [o[0].token_ids for o in outs], [o[0].logprobs for o in outs]


def assert_close_outputs(got, want):
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5


def test_engine_follows_weights_changed_in_place_and_replaced():
    model = randomise_biases(tiny_decoder(seed=5, vocab_size=VOCAB))
    engine = Engine(model, max_model_len=64, max_num_seqs=4)
    before = greedy(engine, PROMPTS)
    with torch.no_grad():  # what an optimizer step does: the same tensors, new values
        for layer in model.layers:
            layer.attn.q_proj.weight.mul_(-1.5)
            layer.attn.k_proj.bias.add_(0.7)
            layer.attn.v_proj.weight.mul_(2.0)
            layer.mlp.up_proj.weight.mul_(0.5)
    changed = greedy(engine, PROMPTS)
    assert changed[0] != before[0]  # the change matters to the output
    assert_close_outputs(changed, greedy(Engine(model, max_model_len=64, max_num_seqs=4), PROMPTS))

    other = randomise_biases(tiny_decoder(seed=6, vocab_size=VOCAB))  # new parameter objects
    model.load_state_dict(other.state_dict(), assign=True)
    assert_close_outputs(greedy(engine, PROMPTS), greedy(Engine(other, max_model_len=64, max_num_seqs=4), PROMPTS))


@pytest.mark.interpreter(twin="tests/test_decode_step.py::test_padded_buckets_through_the_triton_kernels")
def test_the_weights_follow_the_policy_to_the_kernels_path():
    """A policy switched to the kernels between two generate calls: the next refresh restacks q|k|v
    in the kernels' order and the forward takes their path, with the same tokens."""
    model = tiny_decoder(seed=9, vocab_size=VOCAB)
    engine = Engine(model, max_model_len=64, max_num_seqs=4)
    plain = greedy(engine, PROMPTS)
    assert engine._inference.grouped
    model.set_kernels("triton")
    assert_close_outputs(greedy(engine, PROMPTS), plain)
    assert not engine._inference.grouped


def test_sleep_frees_the_inference_weights_and_wake_rebuilds_them():
    model = tiny_decoder(seed=7, vocab_size=VOCAB)
    engine = Engine(model, max_model_len=64, max_num_seqs=4)
    before = greedy(engine, PROMPTS)
    engine.sleep()
    assert engine._inference is None
    engine.wake()
    assert engine._inference is not None
    assert_close_outputs(greedy(engine, PROMPTS), before)


def test_an_engine_takes_only_a_score_transformer():
    with pytest.raises(ValueError, match="Engine needs a score.model.Transformer, got Linear"):
        Engine(torch.nn.Linear(2, 2))
