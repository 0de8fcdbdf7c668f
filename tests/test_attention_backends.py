"""Attention backends: packed SDPA against a float64 reference, backend choice, flash-attn plumbing."""

import pytest
import torch

from score.model import ModelConfig, Transformer, attention


def reference(q, k, v, cu_seqlens, scale):
    """Float64 causal attention, one sequence at a time, GQA by repeating K/V heads."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[start:end].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        mask = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def packed_inputs(lengths, hq=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("lengths", [[7], [3, 0, 11, 1, 5], [1, 1, 1]])
def test_packed_sdpa_matches_float64_reference(lengths):
    q, k, v, cu = packed_inputs(lengths)
    got = attention.causal_attention(q, k, v, scale=0.25, cu_seqlens=cu, backend="sdpa")
    torch.testing.assert_close(got.double(), reference(q, k, v, cu, 0.25), rtol=0, atol=2e-6)


def test_dense_sdpa_matches_float64_reference():
    q, k, v, cu = packed_inputs([9, 9], seed=1)
    dense = attention.causal_attention(*(x.view(2, 9, *x.shape[1:]) for x in (q, k, v)), scale=0.3)
    torch.testing.assert_close(dense.reshape(18, *q.shape[1:]).double(), reference(q, k, v, cu, 0.3), rtol=0, atol=2e-6)


def test_backend_choice_and_errors(monkeypatch):
    q = torch.zeros(4, 2, 8)
    assert attention.resolve_backend("auto", q) == "sdpa"  # CPU tensors never go to flash-attn
    with pytest.raises(ValueError, match="one of"):
        attention.check_backend("xformers")
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    with pytest.raises(RuntimeError, match=r"needs flash-attn: pip install 'score-rl\[flash\]'"):
        Transformer(ModelConfig(), attention_backend="flash")
    model = Transformer(ModelConfig())
    with pytest.raises(RuntimeError, match="needs flash-attn"):
        model.set_attention_backend("flash")


def test_flash_backend_gets_the_packed_batch(monkeypatch):
    # flash-attn only runs on CUDA; a stand-in with its signature checks what we hand it.
    calls = []

    def fake_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        calls.append(
            (cu_seqlens_q.tolist(), cu_seqlens_k is cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
        )
        return reference(q, k, v, cu_seqlens_q, softmax_scale).float()

    def fake_dense(q, k, v, *, softmax_scale, causal):
        b, t = q.shape[:2]
        cu = torch.arange(0, b * t + 1, t, dtype=torch.int32)
        flat = [x.reshape(b * t, *x.shape[2:]) for x in (q, k, v)]
        return fake_varlen(
            *flat,
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=t,
            max_seqlen_k=t,
            softmax_scale=softmax_scale,
            causal=causal,
        ).view(q.shape)

    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake_varlen)
    monkeypatch.setattr(attention, "flash_attn_func", fake_dense)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(num_key_value_heads=2)).eval()
    ids = torch.randint(0, 1024, (13,))
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    with torch.no_grad():
        want = model.hidden_states(ids, cu_seqlens=cu)
        model.set_attention_backend("flash")
        got = model.hidden_states(ids, cu_seqlens=cu)
        dense = model.hidden_states(ids[None, :5])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(dense[0], want[:5], rtol=0, atol=1e-5)
    scale = model.config.head_dim**-0.5
    assert calls[0] == ([0, 5, 13], True, 8, 8, scale, True)
    assert len(calls) == 2 * model.config.num_hidden_layers
