"""The Triton kernels as the GPU compiles them, at realistic sizes, against float64 references.

Skipped without CUDA: on the CPU the same kernels run under TRITON_INTERPRET=1 with small shapes in
the other kernel test modules. Here they run as real sm_80/sm_90 code in fp32 and bf16 (run them on a
GPU machine with `pytest tests/test_kernels_cuda.py`).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from score.kernels import fused_linear_logprob, kl_penalty, score_loss
from score.kernels.kl_penalty import kl_value_and_grad_torch
from score.kernels.kv_store import store_kv
from score.kernels.paged_attention import paged_attention
from score.rl.loss import attempt_coefficients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU: the interpreter tests)")
CUDA = "cuda"
# relative to the reference's largest magnitude: fp32 accumulation only, or bf16 inputs/outputs
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    # bf16 hidden states with an fp32 weight: the LM head under autocast over fp32 master weights
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_fused_linear_logprob_forward_and_backward(dtype, weight_dtype):
    gen = torch.Generator(device=CUDA).manual_seed(0)
    n, d, v, temperature = 777, 512, 50_021, 0.7  # odd sizes: partial tiles on every edge
    hidden = torch.randn(n, d, generator=gen, device=CUDA).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, device=CUDA) * 0.1).to(weight_dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=CUDA)
    logp, entropy = fused_linear_logprob(
        hidden, weight, targets, temperature=temperature, return_entropy=True, impl="triton"
    )
    g_logp, g_ent = torch.randn(n, generator=gen, device=CUDA), torch.randn(n, generator=gen, device=CUDA)
    (logp * g_logp + entropy * g_ent).sum().backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().to(dtype).double().requires_grad_()  # the weight at the hidden states' precision
    log_probs = (h64 @ w64.T / temperature).log_softmax(-1)
    ref_logp = log_probs.gather(1, targets[:, None]).squeeze(1)
    ref_ent = -(log_probs.exp() * log_probs).sum(-1)
    (ref_logp * g_logp.double() + ref_ent * g_ent.double()).sum().backward()
    tol = TOL[dtype]
    assert rel_err(logp, ref_logp) <= tol and rel_err(entropy, ref_ent) <= tol
    assert rel_err(hidden.grad, h64.grad) <= tol and rel_err(weight.grad, w64.grad) <= tol
    assert weight.grad.dtype == weight_dtype


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "k3+"])
def test_kl_penalty(kind):
    gen = torch.Generator(device=CUDA).manual_seed(1)
    n = 1_000_003
    logp = (-torch.rand(n, generator=gen, device=CUDA) * 5).requires_grad_()
    ref = logp.detach() + torch.randn(n, generator=gen, device=CUDA) * 2
    value = kl_penalty(logp, ref, kind, impl="triton")
    value.sum().backward()
    ref_value, ref_grad = kl_value_and_grad_torch(logp.detach().double(), ref.double(), kind)
    assert rel_err(value, ref_value) <= 1e-5 and rel_err(logp.grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("attempts", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("placement", ["kl_in_reward", "kl_loss"])
def test_score_loss_triton_equals_torch(attempts, stage, placement):
    gen = torch.Generator().manual_seed(2)
    groups_n, k = 64, 4
    lengths = torch.randint(20, 400, (groups_n * k,), generator=gen)
    cu = torch.zeros(groups_n * k + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    n = int(cu[-1])
    logp = -torch.rand(n, generator=gen) * 3
    batch = dict(
        ref_logp=logp + torch.randn(n, generator=gen) * 0.3,
        attempt=torch.randint(0, attempts + 1, (n,), generator=gen),
        cu_seqlens=cu,
        group_ids=torch.arange(groups_n).repeat_interleave(k),
        rewards=torch.randint(0, 2, (groups_n * k, attempts), generator=gen).float(),
    )
    batch = {name: t.to(CUDA) for name, t in batch.items()}
    coefficients = attempt_coefficients(stage, attempts - 1 if stage == 1 else 1, attempts, 10.0, 0.01, 0.1)
    results = {}
    for impl in ("torch", "triton"):
        lp = logp.to(CUDA).requires_grad_()
        out = score_loss(
            lp,
            **batch,
            **coefficients.kernel_arguments(),
            kl_kind="k3",
            kl_placement=placement,
            impl=impl,
        )
        out.loss.backward()
        results[impl] = (out, lp.grad)
    (a, ga), (b, gb) = results["torch"], results["triton"]
    assert abs(float(a.loss) - float(b.loss)) <= 1e-5 * max(1.0, abs(float(a.loss)))
    for name in ("returns", "advantages", "kl"):
        assert rel_err(getattr(b, name), getattr(a, name)) <= 1e-5, name
    assert rel_err(gb, ga) <= 1e-5


def dense_attention(q, keys, values, q_lens, ctx_lens, scale):
    outs, row = [], 0
    for k, v, q_len, ctx in zip(keys, values, q_lens, ctx_lens, strict=True):
        group = q.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, 1)
        v = v.double().repeat_interleave(group, 1)
        qq = q[row : row + q_len].double()
        row += q_len
        scores = torch.einsum("qhd,khd->hqk", qq, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(ctx, device=q.device)[None, :] > q_pos, -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("q_lens_of", ["decode", "prefill_over_prefix"])
def test_paged_attention_and_store(dtype, block_size, q_lens_of):
    """Qwen2.5-0.5B's heads (14 query, 2 KV, dim 64): K/V stored through the store kernel into
    shuffled blocks of a random-filled pool, then decode or cached-prefix prefill against float64."""
    gen = torch.Generator(device=CUDA).manual_seed(3)
    hq, hkv, d = 14, 2, 64
    ctx_lens = [1, 17, 300, 1000, 257, 64]
    q_lens = [1] * len(ctx_lens) if q_lens_of == "decode" else [1, 17, 45, 128, 1, 64]
    needed = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(needed) + 7
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen, device=CUDA).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen, device=CUDA).to(dtype)
    free = torch.randperm(num_blocks, generator=gen, device=CUDA).tolist()
    width = max(needed) + 1
    tables, keys, values = [], [], []
    for ctx, nb in zip(ctx_lens, needed, strict=True):
        blocks = [free.pop() for _ in range(nb)]
        tables.append(blocks + [free[0]] * (width - nb))  # padding points at a foreign block
        k = torch.randn(ctx, hkv, d, generator=gen, device=CUDA).to(dtype)
        v = torch.randn(ctx, hkv, d, generator=gen, device=CUDA).to(dtype)
        slots = torch.tensor(
            [blocks[i // block_size] * block_size + i % block_size for i in range(ctx)], dtype=torch.int32, device=CUDA
        )
        store_kv(k, v, k_cache, v_cache, slots, impl="triton")
        keys.append(k)
        values.append(v)
    for k, table in zip(keys, tables, strict=True):  # the store kernel wrote every row where the table says
        rows = torch.cat([k_cache[b] for b in table])[: len(k)]
        assert torch.equal(rows, k)
    q = torch.randn(sum(q_lens), hq, d, generator=gen, device=CUDA).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=CUDA)
    scale = d**-0.5
    out = paged_attention(
        q,
        k_cache,
        v_cache,
        torch.tensor(tables, dtype=torch.int32, device=CUDA),
        torch.tensor(ctx_lens, dtype=torch.int32, device=CUDA),
        cu,
        max_q_len=max(q_lens),
        max_context_len=max(ctx_lens),
        scale=scale,
        impl="triton",
    )
    ref = dense_attention(q, keys, values, q_lens, ctx_lens, scale)
    assert rel_err(out, ref) <= (2e-5 if dtype == torch.float32 else 2e-2)


def grads_against_float64(fn, fn64, inputs, gen):
    """Outputs and input gradients of `fn` (CUDA, inputs' dtype) and `fn64` (float64 copies), with
    one random upstream gradient per output: (pairs of (got, want))."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ups = [torch.randn(o.shape, generator=gen, device=CUDA).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    outs64 = fn64(*leaves64)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    grads64 = torch.autograd.grad(outs64, leaves64, [u.double() for u in ups])
    return list(zip(outs + grads, outs64 + grads64, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_residual_and_swiglu(dtype):
    from score.kernels import rms_norm, swiglu

    gen = torch.Generator(device=CUDA).manual_seed(6)
    x, res = (torch.randn(4096, 1536, generator=gen, device=CUDA).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(1536, generator=gen, device=CUDA)).to(dtype)

    def norm64(x, w, res):
        h = x + res
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w, h

    pairs = grads_against_float64(lambda x, w, r: rms_norm(x, w, 1e-6, r, impl="triton"), norm64, (x, w, res), gen)
    gate, up = (torch.randn(4096, 8960, generator=gen, device=CUDA).to(dtype) for _ in range(2))
    pairs += grads_against_float64(
        lambda g, u: swiglu(g, u, impl="triton"), lambda g, u: F.silu(g) * u, (gate, up), gen
    )
    for got, want in pairs:
        assert rel_err(got, want) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope(dtype):
    from score.kernels import apply_rope

    gen = torch.Generator(device=CUDA).manual_seed(7)
    n, hq, hkv, d = 4096, 12, 2, 128
    q = torch.randn(n, hq, d, generator=gen, device=CUDA).to(dtype)
    k = torch.randn(n, hkv, d, generator=gen, device=CUDA).to(dtype)
    freqs = torch.arange(n, device=CUDA)[:, None].float() / 10000 ** (torch.arange(0, d, 2, device=CUDA) / d)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def rope64(q, k):
        def rot(x):
            x1, x2 = x.chunk(2, -1)
            return x * cos.double()[:, None] + torch.cat((-x2, x1), -1) * sin.double()[:, None]

        return rot(q), rot(k)

    for got, want in grads_against_float64(lambda q, k: apply_rope(q, k, cos, sin, impl="triton"), rope64, (q, k), gen):
        assert rel_err(got, want) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_store_kv_equals_rope_then_store(dtype, head_dim):
    """The fused launch is bit for bit `apply_rope` then `store_kv` (Qwen2.5-0.5B's heads, a slice
    of a fused projection, 256 decode tokens into shuffled slots of a 16-token-block cache)."""
    from score.kernels import apply_rope
    from score.kernels.rope_kv_store import rope_store_kv

    gen = torch.Generator(device=CUDA).manual_seed(head_dim)
    n, hq, hkv, block_size, num_blocks = 256, 14, 2, 16, 64
    qkv = torch.randn(n, hq + 2 * hkv, head_dim, generator=gen, device=CUDA).to(dtype)
    q, k, v = qkv.split((hq, hkv, hkv), dim=1)
    positions = torch.randint(0, 4096, (n,), generator=gen, device=CUDA).float()
    freqs = positions[:, None] / 10000 ** (torch.arange(0, head_dim, 2, device=CUDA).float() / head_dim)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=CUDA)[:n].to(torch.int32)
    k_cache = torch.randn(num_blocks, block_size, hkv, head_dim, generator=gen, device=CUDA).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, head_dim, generator=gen, device=CUDA).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q, k_rot = apply_rope(q, k, cos, sin, impl="triton")
    store_kv(k_rot, v, want_k, want_v, slots, impl="triton")
    got_q = rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, impl="triton")
    assert torch.equal(got_q, want_q) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention(dtype, head_dim):
    from score.kernels import varlen_attention

    gen = torch.Generator(device=CUDA).manual_seed(head_dim)
    lengths, hq, hkv = [700, 1, 129, 1024, 63], 8, 2
    n = sum(lengths)
    q = torch.randn(n, hq, head_dim, generator=gen, device=CUDA).to(dtype)
    k, v = (torch.randn(n, hkv, head_dim, generator=gen, device=CUDA).to(dtype) for _ in range(2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=CUDA)

    def attention64(q, k, v):
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            ks, vs = ks.repeat_interleave(hq // hkv, 0), vs.repeat_interleave(hq // hkv, 0)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
        return torch.cat(outs)

    fn = lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), impl="triton")  # noqa: E731
    for got, want in grads_against_float64(fn, attention64, (q, k, v), gen):
        assert rel_err(got, want) <= (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_decoder_under_bf16_autocast_on_fp32_masters(architecture):
    """The training forward of the default config on a GPU: fp32 master weights under bf16 autocast
    through the compiled kernels, against the plain ops under the same autocast and against fp32."""
    from score.model import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        architecture=architecture,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to(CUDA)
    ids = torch.randint(0, 1000, (3000,), device=CUDA)
    cu = torch.tensor([0, 1000, 1900, 3000], dtype=torch.int32, device=CUDA)

    def forward(kernels, autocast):
        model.set_kernels(kernels)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, cu_seqlens=cu, max_seqlen=1100)
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    exact, exact_grads = forward("torch", False)
    plain, plain_grads = forward("torch", True)
    ours, our_grads = forward("triton", True)
    assert ours.dtype == torch.bfloat16 and rel_err(ours, exact) <= 3e-2 and rel_err(ours, plain) <= 3e-2
    for name, grad in exact_grads.items():
        assert our_grads[name].dtype == torch.float32
        assert rel_err(our_grads[name], grad) <= 2 * rel_err(plain_grads[name], grad) + 1e-2, name
