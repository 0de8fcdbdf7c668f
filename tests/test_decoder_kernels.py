"""The decoder's CUDA path on CPU: `set_kernels("triton")` runs the norms, the residual-fused norm,
SwiGLU, RoPE and packed attention through the Triton kernels under the interpreter; forward and
backward agree with the plain ops, and "auto" on CPU is the plain ops bit for bit."""

import importlib

import pytest
import torch

from score.model import ModelConfig, Transformer


def small(architecture="Qwen3ForCausalLM", **kw):
    cfg = ModelConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        architecture=architecture,
        tie_word_embeddings=False,
        initializer_range=0.2,
        **kw,
    )
    torch.manual_seed(0)
    return Transformer(cfg)


def packed_batch():
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 9]
    ids = torch.randint(0, 61, (sum(lengths),), generator=gen)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    return ids, cu, max(lengths)


def logits_and_grads(model, kernels, autocast=False):
    model.set_kernels(kernels)
    model.zero_grad()
    ids, cu, longest = packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, cu_seqlens=cu, max_seqlen=longest)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * upstream).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen2ForCausalLM"])
def test_triton_path_matches_the_plain_ops(architecture):
    model = small(architecture)
    want, want_grads = logits_and_grads(model, "torch")
    got, got_grads = logits_and_grads(model, "triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=5e-5, rtol=5e-4, msg=name)


def relative_error(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


# the training forward under autocast over fp32 master weights (model.autocast = "bf16")
AUTOCAST_FAMILIES = {
    "llama": dict(architecture="LlamaForCausalLM"),
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM"),
    "qwen3_qk_norm_gqa": dict(architecture="Qwen3ForCausalLM"),
}


@pytest.mark.parametrize("family", list(AUTOCAST_FAMILIES))
def test_triton_path_under_bf16_autocast_matches_the_plain_ops_under_it(family):
    """The dtype mix autocast hands the kernels (fp32 embeddings and norm weights, bf16 linears, an
    fp32 q/k-norm weight on bf16 q and k) runs, and computes what the plain ops under autocast do."""
    model = small(**AUTOCAST_FAMILIES[family])
    want, want_grads = logits_and_grads(model, "torch", autocast=True)
    got, got_grads = logits_and_grads(model, "triton", autocast=True)
    exact, exact_grads = logits_and_grads(model, "torch")  # fp32 throughout
    assert got.dtype == want.dtype == torch.bfloat16
    assert relative_error(got, want) < 2e-2 and relative_error(got, exact) < 2e-2
    for name, grad in exact_grads.items():
        assert got_grads[name].dtype == torch.float32  # the masters' gradients stay fp32
        # no further from fp32 than bf16 itself takes the plain ops (a small bias's gradient sums
        # cancelling terms: its bf16 error is several percent either way)
        bf16_noise = relative_error(want_grads[name], grad)
        assert relative_error(got_grads[name], grad) < 2 * bf16_noise + 1e-2, name


def test_auto_on_cpu_is_the_plain_ops_bit_for_bit():
    model = small()
    auto, auto_grads = logits_and_grads(model, "auto")
    plain, plain_grads = logits_and_grads(model, "torch")
    assert torch.equal(auto, plain)
    assert all(torch.equal(auto_grads[n], plain_grads[n]) for n in plain_grads)


def test_set_kernels_names_bad_input():
    with pytest.raises(ValueError, match="kernels must be one of"):
        small().set_kernels("cuda")


def test_triton_path_runs_every_kernel(monkeypatch):
    """Each fused op is reached (once per layer or norm), so the comparison above is not vacuous."""
    # by sys.modules: `score.kernels.rope` as an attribute is the exported function, not the module
    rms_norm_module, rope_module, swiglu_module, varlen_module = (
        importlib.import_module(f"score.kernels.{name}") for name in ("rms_norm", "rope", "swiglu", "varlen_attention")
    )
    calls = {}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapped

    for name, cls in (
        ("rope", rope_module._RoPE),
        ("varlen", varlen_module._VarlenAttention),
        ("swiglu", swiglu_module._SwiGLU),
        ("rms_norm", rms_norm_module._RMSNorm),
    ):
        monkeypatch.setattr(cls, "apply", counting(name, cls.apply))
    logits_and_grads(small(), "triton")
    # per layer: the attention norm, q and k norms, the residual-fused MLP norm; then the final norm
    assert calls == {"rope": 2, "varlen": 2, "swiglu": 2, "rms_norm": 2 * 4 + 1}


def test_dense_batch_through_the_triton_attention():
    """A dense [B, T] batch runs the varlen kernel as B packed sequences: same logits as SDPA."""
    model = small()
    ids = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(4))
    model.set_kernels("torch")
    want = model(ids)
    model.set_kernels("triton")
    torch.testing.assert_close(model(ids), want, atol=2e-5, rtol=2e-5)
