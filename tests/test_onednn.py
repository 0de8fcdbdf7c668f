"""The engine's CPU GEMMs through oneDNN (model/engine/onednn.py): each fused GEMM against float64 on odd
shapes, the conditions under which the engine takes them, the engine's forward through them
against the plain ops for every family (biases, q/k-norm, o_proj bias), and a decode step that
really dispatches them."""

import pytest
import torch
import torch.nn.functional as F

from score.model import Engine, SamplingParams
from score.model.engine import onednn
from tests.helpers.model_fixtures import engine_forward_hidden, randomise_biases, tiny_decoder
from tests.helpers.op_count import top_level_ops

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this torch build has no oneDNN")

VOCAB = 89
FAMILIES = {
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM", attention_bias=True),
    "llama_o_proj_bias": dict(architecture="LlamaForCausalLM", attention_bias=True, tie_word_embeddings=False),
    "qwen3_qk_norm": dict(architecture="Qwen3ForCausalLM", head_dim=16),
}


def fp32_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An fp32 dot product's worst rounding: K * eps * sum |x_k w_k| per output."""
    return x.shape[-1] * torch.finfo(torch.float32).eps * (x.double().abs() @ weight.double().abs().T)


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_each_gemm_and_epilogue_is_its_float64_reference(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 33, generator=gen), torch.randn(7, 33, generator=gen)
    b = torch.randn(7, generator=gen) if bias else None
    other = torch.randn(rows, 7, generator=gen)
    product = x.double() @ weight.double().T + (0 if b is None else b.double())
    bound = fp32_bound(x, weight) + 1e-6
    with torch.inference_mode():
        got = {
            "linear": (onednn.linear(x, weight, b), product),
            "linear_add": (onednn.linear_add(x, weight, other, b), product + other.double()),
        }
        if b is None:
            got["linear_silu"] = (onednn.linear_silu(x, weight), F.silu(product))
            got["linear_mul"] = (onednn.linear_mul(x, weight, other), product * other.double())
    for name, (out, ref) in got.items():
        assert out.dtype == torch.float32 and out.shape == (rows, 7), name
        scale = other.double().abs() if name == "linear_mul" else 1.0  # the product's error, multiplied
        assert ((out.double() - ref).abs() <= bound * scale * 1.01 + 1e-6).all(), name


def test_only_fp32_cpu_tensors_without_autograd_are_taken():
    x = torch.randn(2, 4)
    assert not onednn.usable(x)  # autograd on: the op has no backward
    with torch.no_grad():
        assert onednn.usable(x)
        assert not onednn.usable(x.double()) and not onednn.usable(x.bfloat16())
    with torch.inference_mode():
        assert onednn.usable(x)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_engine_forward_through_onednn_equals_the_plain_ops(family, monkeypatch):
    # random biases and norm weights check each GEMM's bias and epilogue order
    model = randomise_biases(tiny_decoder(seed=2, vocab_size=VOCAB, **FAMILIES[family]))
    hidden = {}
    for use_onednn in (False, True):
        monkeypatch.setattr(onednn, "AVAILABLE", use_onednn)
        hidden[use_onednn] = engine_forward_hidden(model)
    plain, through = hidden[False], hidden[True]
    torch.testing.assert_close(through, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(through, plain)  # the GEMMs really changed: oneDNN sums in its own order


def test_a_decode_step_runs_its_gemms_through_onednn_and_keeps_the_tokens(monkeypatch):
    model = tiny_decoder(seed=3, num_hidden_layers=3)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=5)
    outputs = []  # plain ops, then oneDNN
    for use_onednn in (False, True):
        monkeypatch.setattr(onednn, "AVAILABLE", use_onednn)
        engine = Engine(model, block_size=4, max_model_len=64, max_num_seqs=4)
        with torch.inference_mode():
            names = top_level_ops(lambda engine=engine: outputs.append(engine.generate(ids, params)))
        # six forwards (the prefill and five decode steps), each with the head and, per layer,
        # q|k|v, o_proj + residual, gate, up * gate and down + residual
        assert names.count("mkldnn::_linear_pointwise") == (6 * (1 + 3 * 5) if use_onednn else 0)
    for plain, through in zip(*outputs, strict=True):
        assert through[0].token_ids == plain[0].token_ids
        assert through[0].logprobs == pytest.approx(plain[0].logprobs, abs=1e-5)
