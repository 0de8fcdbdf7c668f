"""score.kernels.hf on random-weight transformers models of the three families: `patch` runs the
Triton kernels (under the interpreter on CPU) and keeps logits and parameter gradients within the
kernels' tolerances of the unpatched model; `unpatch` restores it bit for bit and other models are
never touched; `token_logprobs` equals log_softmax of the full logits, gradients included, without
calling the head."""

import gc
import importlib

import pytest
import torch

from score.kernels import hf
from tests.helpers.model_fixtures import random_hf_model

pytest.importorskip("transformers")

VARIANTS = ["llama_bias_head_dim", "qwen2_gqa_bias_tied", "qwen3_qknorm_head_dim"]
LOGITS_TOL = dict(atol=2e-5, rtol=2e-5)  # tests/test_decoder_kernels.py's
GRAD_TOL = dict(atol=5e-5, rtol=5e-4)
LOGP_TOL = dict(atol=2e-5, rtol=0)  # tests/test_fused_linear_logprob.py's fp32 values
KERNEL_FUNCTIONS = {
    "rms_norm": ("rms_norm", "_RMSNorm"),
    "swiglu": ("swiglu", "_SwiGLU"),
    "rope": ("rope", "_RoPE"),
    "logprob": ("fused_linear_logprob", "_FusedLinearLogprob"),
}


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often each Triton kernel's autograd Function ran (the torch references bypass them)."""
    calls = dict.fromkeys(KERNEL_FUNCTIONS, 0)
    for name, (module, cls_name) in KERNEL_FUNCTIONS.items():
        cls = getattr(importlib.import_module(f"score.kernels.{module}"), cls_name)

        def counting(*args, _name=name, _apply=cls.apply):
            calls[_name] += 1
            return _apply(*args)

        monkeypatch.setattr(cls, "apply", counting)
    return calls


def batch(model, seed=1, shape=(2, 9)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, shape, generator=gen)


def logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * upstream).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def shifted_targets(ids, mask=None):
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    if mask is not None:
        targets[:, :-1][mask[:, 1:] == 0] = -100
    return targets


def reference_logprobs(model, ids, targets, mask=None, temperature=1.0):
    """log_softmax of the full logits in float64 (what a trainer without the kernel computes)."""
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    keep = targets != -100 if mask is None else (targets != -100) & (mask == 1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_model_matches_the_unpatched_one(variant, kernel_calls):
    model = random_hf_model(variant)
    ids = batch(model)
    want, want_grads = logits_and_grads(model, ids)
    assert sum(kernel_calls.values()) == 0
    hf.patch(model, impl="triton")
    got, got_grads = logits_and_grads(model, ids)
    torch.testing.assert_close(got, want, **LOGITS_TOL)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **GRAD_TOL, msg=name)
    layers = model.config.num_hidden_layers
    norms_per_layer = 4 if model.config.model_type == "qwen3" else 2  # + q and k norms
    assert kernel_calls == {"rms_norm": layers * norms_per_layer + 1, "swiglu": layers, "rope": layers, "logprob": 0}
    hf.unpatch(model)


def test_unpatch_restores_the_model_bit_for_bit(kernel_calls):
    gc.collect()  # patched models of earlier tests (a patched module refers to itself) hold the dispatcher
    model = random_hf_model("qwen3_qknorm_head_dim")
    modeling = importlib.import_module("transformers.models.qwen3.modeling_qwen3")
    original_rope = getattr(modeling.apply_rotary_pos_emb, "score_kernels_original", modeling.apply_rotary_pos_emb)
    ids = batch(model)
    want, want_grads = logits_and_grads(model, ids)
    hf.patch(model, impl="triton")
    assert modeling.apply_rotary_pos_emb is not original_rope
    hf.patch(model, impl="triton")  # patching again replaces, never stacks
    hf.unpatch(model)
    assert modeling.apply_rotary_pos_emb is original_rope
    assert not any("forward" in m.__dict__ or "_score_kernels_impl" in m.__dict__ for m in model.modules())
    calls_before = dict(kernel_calls)
    got, got_grads = logits_and_grads(model, ids)
    assert kernel_calls == calls_before
    assert torch.equal(got, want) and all(torch.equal(got_grads[n], g) for n, g in want_grads.items())
    hf.unpatch(model)  # nothing patched: a no-op


def test_patch_leaves_other_models_of_the_family_alone(kernel_calls):
    patched, other = random_hf_model("llama_bias_head_dim", seed=0), random_hf_model("llama_bias_head_dim", seed=1)
    ids = batch(other)
    with torch.no_grad():
        want = other(input_ids=ids).logits
        hf.patch(patched, impl="triton")
        patched(input_ids=ids)
        ropes = kernel_calls["rope"]
        assert ropes == patched.config.num_hidden_layers
        assert torch.equal(other(input_ids=ids).logits, want)
    assert kernel_calls["rope"] == ropes
    hf.unpatch(patched)


def test_an_instance_forward_the_model_had_is_kept_and_restored():
    """accelerate's hooks, for one, live in an instance `forward`; patch wraps attention around it."""
    model = random_hf_model("qwen2_gqa_bias_tied")
    attention = model.model.layers[0].self_attn
    seen = []

    def hooked(*args, **kwargs):
        seen.append(1)
        return type(attention).forward(attention, *args, **kwargs)

    attention.forward = hooked
    hf.patch(model)
    model(input_ids=batch(model))
    assert seen == [1]
    hf.unpatch(model)
    assert attention.forward is hooked


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_logprobs_equal_log_softmax_of_the_full_logits(variant, kernel_calls):
    model = random_hf_model(variant)
    ids = batch(model, shape=(3, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    targets = shifted_targets(ids, mask)
    targets[0, :3] = -100  # a prompt without log-probs
    up_logp, up_ent = (torch.randn(ids.shape, generator=torch.Generator().manual_seed(s)) for s in (3, 4))

    want_logp, want_ent = reference_logprobs(model, ids, targets, mask, temperature=0.7)
    model.zero_grad()
    (want_logp * up_logp + want_ent * up_ent).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    hf.patch(model, impl="triton")
    model.zero_grad()
    logp, ent = hf.token_logprobs(
        model, ids, targets, attention_mask=mask, entropy=True, temperature=0.7, impl="triton"
    )
    assert logp.shape == ids.shape and logp.dtype == torch.float32 and kernel_calls["logprob"] == 1
    torch.testing.assert_close(logp.double(), want_logp, **LOGP_TOL)
    torch.testing.assert_close(ent.double(), want_ent, **LOGP_TOL)
    assert bool((logp[targets == -100] == 0).all()) and bool((logp[mask == 0] == 0).all())
    (logp * up_logp + ent * up_ent).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.double(), want_grads[name].double(), **GRAD_TOL, msg=name)
    hf.unpatch(model)


def test_token_logprobs_of_a_left_padded_row_are_those_of_the_unpadded_sequence():
    model = random_hf_model("qwen2_gqa_bias_tied")
    ids = batch(model, shape=(1, 6))
    alone = hf.token_logprobs(model, ids, shifted_targets(ids))
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), torch.ones_like(ids)], dim=1)
    logp = hf.token_logprobs(model, padded, shifted_targets(padded, mask), attention_mask=mask)
    torch.testing.assert_close(logp[:, 3:], alone, atol=1e-6, rtol=1e-5)
    assert bool((logp[:, :3] == 0).all())
    logp.sum().backward()
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)


def test_token_logprobs_never_call_the_head():
    model = random_hf_model("llama_bias_head_dim")

    def refuse(*args, **kwargs):
        raise AssertionError("the LM head was called: [tokens, vocab] logits were formed")

    model.lm_head.forward = refuse
    ids = batch(model)
    logp = hf.token_logprobs(model, ids, shifted_targets(ids))
    assert logp.shape == ids.shape and bool((logp[:, :-1] < 0).all())


def test_bad_input_is_a_named_error():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        hf.patch(gpt2)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        hf.token_logprobs(gpt2, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    gelu = random_hf_model("llama", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'silu'"):
        hf.patch(gelu)
    model = random_hf_model("llama")
    with pytest.raises(ValueError, match="impl must be one of"):
        hf.patch(model, impl="cuda")
    ids = batch(model)
    with pytest.raises(ValueError, match="must have input_ids' shape"):
        hf.token_logprobs(model, ids, ids[:, 1:])
    with pytest.raises(ValueError, match="attention_mask must be"):
        hf.token_logprobs(model, ids, ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="bias-free linear head"):
        hf.token_logprobs(model.model, ids, ids)
    with pytest.raises(ValueError, match="outside"):
        hf.token_logprobs(model, ids, ids + model.config.vocab_size)
