"""The engine's stacked q|k|v weights (model/fused_qkv.py): an engine-mode forward through them
equals the model's own three projections for every family (bias, q/k-norm, plain ops and the
interpreted kernels), the engine picks up weights changed in place or replaced between generate
calls, sleep frees the copies, and misuse is a clear error."""

import pytest
import torch

from score.model import Engine, SamplingParams
from score.model.engine.fused_qkv import FusedQKV
from tests.helpers.model_fixtures import engine_mode_hidden, randomise_biases, tiny_decoder

VOCAB = 89
FAMILIES = {
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM"),
    "llama_no_bias": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False),
    "qwen3_qk_norm": dict(architecture="Qwen3ForCausalLM", head_dim=16),
}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_stacked_projections_equal_the_three(family, kernels):
    model = randomise_biases(tiny_decoder(seed=2, vocab_size=VOCAB, **FAMILIES[family]))
    if kernels == "triton" and torch.cuda.is_available():  # compiled there; the interpreter on a CPU
        model = model.to("cuda")
    model.set_kernels(kernels)
    fused = FusedQKV.of(model)
    cfg = model.config
    assert fused is not None and (fused.biases[0] is None) == (not cfg.attention_bias)
    assert fused[0][0].shape == ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim, 32)
    torch.testing.assert_close(engine_mode_hidden(model, fused), engine_mode_hidden(model, None), rtol=1e-6, atol=1e-6)
    assert fused.grouped == (kernels == "torch")  # the head order of the path this forward takes
    other = FusedQKV(model, grouped=not fused.grouped)  # the other order: its heads are reordered first
    torch.testing.assert_close(engine_mode_hidden(model, other), engine_mode_hidden(model, fused), rtol=1e-6, atol=1e-6)


def test_grouped_head_order_puts_each_query_group_before_its_k_and_v():
    from score.model.engine.fused_qkv import grouped_head_order

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


PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


def test_engine_follows_weights_changed_in_place_and_replaced():
    model = randomise_biases(tiny_decoder(seed=5, vocab_size=VOCAB))
    engine = Engine(model, max_model_len=64, max_num_seqs=4)
    before = greedy(engine, PROMPTS)
    with torch.no_grad():  # what an optimizer step does: the same tensors, new values
        for layer in model.layers:
            layer.attn.q_proj.weight.mul_(-1.5)
            layer.attn.k_proj.bias.add_(0.7)
            layer.attn.v_proj.weight.mul_(2.0)
    changed = greedy(engine, PROMPTS)
    assert changed[0] != before[0]  # the change matters to the output
    assert_close_outputs(changed, greedy(Engine(model, max_model_len=64, max_num_seqs=4), PROMPTS))

    other = randomise_biases(tiny_decoder(seed=6, vocab_size=VOCAB))  # new parameter objects
    model.load_state_dict(other.state_dict(), assign=True)
    assert_close_outputs(greedy(engine, PROMPTS), greedy(Engine(other, max_model_len=64, max_num_seqs=4), PROMPTS))


def test_sleep_frees_the_stacked_weights_and_wake_rebuilds_them():
    model = tiny_decoder(seed=7, vocab_size=VOCAB)
    engine = Engine(model, max_model_len=64, max_num_seqs=4)
    before = greedy(engine, PROMPTS)
    engine.sleep()
    assert engine._fused_qkv is None
    engine.wake()
    assert engine._fused_qkv is not None
    assert_close_outputs(greedy(engine, PROMPTS), before)


def test_fused_qkv_outside_engine_mode_is_an_error():
    model = tiny_decoder(seed=8, vocab_size=VOCAB)
    fused = FusedQKV.of(model)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="engine mode"):
        model.hidden_states(ids[None], fused_qkv=fused)
    attn = lambda i, q, k, v: q  # noqa: E731
    with pytest.raises(ValueError, match="without autograd"):
        model.hidden_states(ids, positions=torch.arange(3), attn=attn, fused_qkv=fused)
