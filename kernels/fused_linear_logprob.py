"""Per-token log-probabilities (and entropy) of the LM head without materialising `[N, V]` logits.

    z      = (hidden @ weight.T) / temperature              fp32, one tile at a time
    lse    = logsumexp_v z                                   online max / sum-exp over vocab tiles
    logp   = z[target] - lse
    entropy= lse - sum_v p_v z_v = log s - t / s             s = sum e^(z-m), t = sum e^(z-m)(z-m)

Backward recomputes each logits tile from the saved per-token `lse` and `entropy`, with each
token's own upstream gradients g (for logp) and h (for entropy):

    d z_v  = g (onehot_v - p_v) - h p_v (log p_v + entropy),   d(hidden@weight.T) = d z / temperature

Computing gradients in the forward pass would be wrong here: every token carries its own upstream
gradient, and `grad_weight = sum_i g_i (...)` cannot be rescaled after the sum.
Cost: four GEMMs (8·N·D·V flops) for forward + backward.

Tokens whose target equals `ignore_index` (-100) get logp = 0 and entropy = 0 and no gradient.

Two implementations of the same chunked algorithm:
* torch (CPU path and oracle): loops vocab chunks x token chunks of at most `TILE_ELEMENTS`
  logits, so memory is flat in N; fp32 GEMMs (low-precision inputs are upcast per chunk).
* Triton: the forward kernel fuses the GEMM (tl.dot over D) with the online softmax, one program
  per (token block, vocab split), and writes per-split partials that a tiny torch epilogue merges.
  The backward kernel recomputes a logits tile and writes d z for one chunk; cuBLAS then does
  `grad_hidden += dz @ W_chunk` and `grad_weight[chunk] = dz.T @ hidden` (fp32 accumulation).
  The Triton forward always computes entropy (a few flops per tile on top of the GEMM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import Launch, launch, triton_type
from .dispatch import use_triton

IGNORE_INDEX = -100
# Largest logits tile (elements) either path holds at once: 64 MB in fp32.
TILE_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    dim,
    stride_h,
    stride_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """hidden[rows] @ weight[cols].T as an fp32 [BLOCK_M, BLOCK_N] tile. An fp32 weight with bf16/fp16
    hidden states (master weights under autocast) is rounded to their dtype tile by tile, as autocast's
    linear rounds it: the dot runs on the tensor cores of the hidden states' dtype."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_cols = weight_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(a.dtype)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _logprob_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    targets_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_ent_ptr,
    part_tgt_ptr,
    n_tokens,
    vocab,
    dim,
    stride_h,
    stride_w,
    inv_temperature,
    vocab_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    # Finite start so that (old_max - new_max) * 0 stays 0 (with -inf it would be NaN).
    run_max = tl.full([BLOCK_M], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    run_ent = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        z = (
            _logits_tile(
                hidden_ptr,
                weight_ptr,
                rows,
                row_ok,
                cols,
                col_ok,
                dim,
                stride_h,
                stride_w,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                IEEE_FP32,
            )
            * inv_temperature
        )
        z = tl.where(col_ok[None, :], z, -1e30)
        hit = (cols[None, :] == targets[:, None]) & col_ok[None, :]
        target_logit += tl.sum(tl.where(hit, z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shift = run_max - new_max
        alpha = tl.exp(shift)
        zs = z - new_max[:, None]
        e = tl.where(col_ok[None, :], tl.exp(zs), 0.0)
        run_ent = alpha * (run_ent + shift * run_sum) + tl.sum(e * tl.where(col_ok[None, :], zs, 0.0), axis=1)
        run_sum = alpha * run_sum + tl.sum(e, axis=1)
        run_max = new_max
    out = pid_s.to(tl.int64) * n_tokens + rows
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    tl.store(part_ent_ptr + out, run_ent, mask=row_ok)
    tl.store(part_tgt_ptr + out, target_logit, mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(
    hidden_ptr,
    weight_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    n_tokens,
    vocab_start,
    vocab_count,
    dim,
    stride_h,
    stride_w,
    stride_g,
    inv_temperature,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """d(hidden @ weight.T) for tokens [0, n_tokens) x vocab [vocab_start, +vocab_count)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = local_cols < vocab_count
    cols = vocab_start + local_cols
    z = (
        _logits_tile(
            hidden_ptr,
            weight_ptr,
            rows,
            row_ok,
            cols,
            col_ok,
            dim,
            stride_h,
            stride_w,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            IEEE_FP32,
        )
        * inv_temperature
    )
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = -p * (g_logp[:, None] + g_ent[:, None] * (logp + entropy[:, None]))
    dz = tl.where(cols[None, :] == targets[:, None], dz + g_logp[:, None], dz) * inv_temperature
    out = grad_logits_ptr + rows.to(tl.int64)[:, None] * stride_g + local_cols[None, :]
    tl.store(out, dz.to(grad_logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Block shapes per (hidden dtype, weight dtype). fp32 uses exact ("ieee") dots, like torch's default
# fp32 matmul. An fp32 weight beside bf16/fp16 hidden states is what autocast over fp32 master weights
# hands the LM head: its tiles are loaded in fp32 and rounded in registers.
_BLOCKS = {
    (torch.float32, torch.float32): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    (torch.bfloat16, torch.bfloat16): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    (torch.float16, torch.float16): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    (torch.bfloat16, torch.float32): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    (torch.float16, torch.float32): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
}
DTYPE_COMBOS = tuple(_BLOCKS)  # (hidden dtype, weight dtype) pairs the op takes


def _launch_table(kernel, pointer_types, scalar_types, blocks_of: dict = _BLOCKS) -> list[Launch]:
    """One launch of `kernel` per (hidden dtype, weight dtype) of `blocks_of` (-> block shape, warps and
    stages). Pointers of kind "x" take the hidden states' dtype, "w" the weight's."""
    table = []
    for (dtype, w_dtype), blocks in blocks_of.items():
        types = {"x": "*" + triton_type(dtype), "w": "*" + triton_type(w_dtype)}
        sig = {}
        for name, kind in pointer_types:
            sig[name] = types.get(kind, "*" + kind)
        sig.update(scalar_types)
        sig.update(BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr", IEEE_FP32="constexpr")
        consts = dict(
            BLOCK_M=blocks["BLOCK_M"],
            BLOCK_N=blocks["BLOCK_N"],
            BLOCK_K=blocks["BLOCK_K"],
            IEEE_FP32=dtype == torch.float32,
        )
        table.append(Launch(kernel, sig, consts, blocks["num_warps"], blocks["num_stages"]))
    return table


_FWD_ARGS = (
    _logprob_fwd_kernel,
    [
        ("hidden_ptr", "x"),
        ("weight_ptr", "w"),
        ("targets_ptr", "i64"),
        ("part_max_ptr", "fp32"),
        ("part_sum_ptr", "fp32"),
        ("part_ent_ptr", "fp32"),
        ("part_tgt_ptr", "fp32"),
    ],
    dict(
        n_tokens="i32",
        vocab="i32",
        dim="i32",
        stride_h="i32",
        stride_w="i32",
        inv_temperature="fp32",
        vocab_per_split="i32",
    ),
)
_BWD_ARGS = (
    _logprob_bwd_kernel,
    [
        ("hidden_ptr", "x"),
        ("weight_ptr", "w"),
        ("targets_ptr", "i64"),
        ("lse_ptr", "fp32"),
        ("entropy_ptr", "fp32"),
        ("grad_logp_ptr", "fp32"),
        ("grad_entropy_ptr", "fp32"),
        ("grad_logits_ptr", "x"),
    ],
    dict(
        n_tokens="i32",
        vocab_start="i32",
        vocab_count="i32",
        dim="i32",
        stride_h="i32",
        stride_w="i32",
        stride_g="i32",
        inv_temperature="fp32",
    ),
)
_FWD_TABLE = _launch_table(*_FWD_ARGS)
_BWD_TABLE = _launch_table(*_BWD_ARGS)


def launches_with_blocks(dtype: torch.dtype, blocks: dict, weight_dtype: torch.dtype | None = None):
    """(forward, backward) launches of hidden states in `dtype` (and a weight in `weight_dtype`, by
    default the same) with other block shapes than the table's: what
    bench/sweep_fused_logprob_tiles.py times to choose the table's entries."""
    table = {(dtype, weight_dtype or dtype): blocks}
    return _launch_table(*_FWD_ARGS, blocks_of=table)[0], _launch_table(*_BWD_ARGS, blocks_of=table)[0]


def aot_launches() -> list[Launch]:
    """Every launch configuration `fused_linear_logprob` can use (see kernels/aot.py)."""
    return _FWD_TABLE + _BWD_TABLE


def _cfg(table, dtype, weight_dtype) -> Launch:
    """The table entry for hidden states of `dtype` and a weight of `weight_dtype`."""
    want = ("*" + triton_type(dtype), "*" + triton_type(weight_dtype))
    (cfg,) = [c for c in table if (c.signature["hidden_ptr"], c.signature["weight_ptr"]) == want]
    return cfg


def _num_programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: still splits the vocab so the merge is exercised


def _forward_triton(hidden, weight, targets, inv_temperature, cfg: Launch | None = None):
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = cfg or _cfg(_FWD_TABLE, hidden.dtype, weight.dtype)
    bm, bn = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]
    token_blocks = triton.cdiv(n, bm)
    vocab_tiles = triton.cdiv(vocab, bn)
    splits = max(1, min(vocab_tiles, triton.cdiv(_num_programs_wanted(hidden.device), token_blocks)))
    vocab_per_split = triton.cdiv(vocab_tiles, splits) * bn
    splits = triton.cdiv(vocab, vocab_per_split)
    parts = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    launch(
        cfg,
        (token_blocks, splits),
        hidden,
        weight,
        targets,
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        n,
        vocab,
        dim,
        hidden.stride(0),
        weight.stride(0),
        inv_temperature,
        vocab_per_split,
    )
    part_max, part_sum, part_ent, part_tgt = parts
    run_max = part_max.amax(0)
    shift = part_max - run_max
    scale = torch.exp(shift)
    total = (part_sum * scale).sum(0)
    ent_sum = (scale * (part_ent + shift * part_sum)).sum(0)
    lse = run_max + torch.log(total)
    entropy = torch.log(total) - ent_sum / total
    logp = part_tgt.sum(0) - lse
    return logp, entropy, lse


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result, whatever the input precision."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return a.float() @ b.float()


def _chunks(n: int, vocab: int, granule: int = 256) -> tuple[int, int]:
    """(token chunk, vocab chunk) whose product stays within TILE_ELEMENTS."""
    tok = min(max(n, 1), 4096)
    voc = max(granule, (TILE_ELEMENTS // tok) // granule * granule)
    return tok, min(voc, triton.cdiv(vocab, granule) * granule)


def _backward_triton(
    hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temperature, need_hidden, need_weight, cfg=None
):
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = cfg or _cfg(_BWD_TABLE, hidden.dtype, weight.dtype)
    bm, bn = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]
    tok, voc = _chunks(n, vocab, granule=bn)
    grad_hidden = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    dz_buf = torch.empty(tok, voc, dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, vocab, voc):
        vc = min(voc, vocab - v0)
        w_chunk = weight[v0 : v0 + vc].to(hidden.dtype)  # an fp32 master weight at the forward's precision
        gw = torch.zeros(vc, dim, dtype=torch.float32, device=hidden.device) if need_weight else None
        for n0 in range(0, n, tok):
            nc = min(tok, n - n0)
            dz = dz_buf[:nc, :vc]
            h = hidden[n0 : n0 + nc]
            launch(
                cfg,
                (triton.cdiv(nc, bm), triton.cdiv(vc, bn)),
                h,
                weight,
                targets[n0 : n0 + nc],
                lse[n0 : n0 + nc],
                entropy[n0 : n0 + nc],
                g_logp[n0 : n0 + nc],
                g_ent[n0 : n0 + nc],
                dz,
                nc,
                v0,
                vc,
                dim,
                hidden.stride(0),
                weight.stride(0),
                dz.stride(0),
                inv_temperature,
            )
            if need_hidden:
                grad_hidden[n0 : n0 + nc] += _mm_fp32(dz, w_chunk)
            if need_weight:
                gw += _mm_fp32(dz.t(), h)
        if need_weight:
            grad_weight[v0 : v0 + vc] = gw
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------------
# torch reference (same chunked algorithm; the CPU path)
# ----------------------------------------------------------------------------------------------
def _at_hidden_precision(weight_chunk: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A weight chunk in fp32 after rounding to the hidden states' dtype (what the kernel's tiles
    hold; a no-op rounding when the dtypes match)."""
    return weight_chunk.to(hidden.dtype).float()


def _target_hits(targets_chunk: torch.Tensor, v0: int, vc: int):
    local = targets_chunk - v0
    hit = (local >= 0) & (local < vc)
    return hit, local.clamp(0, vc - 1)


def _forward_torch(hidden, weight, targets, inv_temperature, with_entropy):
    n, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    tok, voc = _chunks(n, vocab)
    run_max = torch.full((n,), -1e30, dtype=torch.float32, device=dev)
    run_sum = torch.zeros(n, dtype=torch.float32, device=dev)
    run_ent = torch.zeros(n, dtype=torch.float32, device=dev) if with_entropy else None
    target_logit = torch.zeros(n, dtype=torch.float32, device=dev)
    z_buf = torch.empty(tok * voc, dtype=torch.float32, device=dev)
    e_buf = torch.empty(tok * voc, dtype=torch.float32, device=dev)
    # 1/T is folded into the (small) hidden rows rather than applied to every logits tile.
    h32 = hidden.float() * inv_temperature if inv_temperature != 1.0 else hidden.float()
    for v0 in range(0, vocab, voc):
        vc = min(voc, vocab - v0)
        w_t = _at_hidden_precision(weight[v0 : v0 + vc], hidden).t()
        for n0 in range(0, n, tok):
            nc = min(tok, n - n0)
            rows = slice(n0, n0 + nc)
            z = torch.mm(h32[rows], w_t, out=z_buf[: nc * vc].view(nc, vc))
            hit, local = _target_hits(targets[rows], v0, vc)
            picked = z.gather(1, local[:, None]).squeeze(1)
            target_logit[rows] = torch.where(hit, picked, target_logit[rows])
            old_max = run_max[rows]
            new_max = torch.maximum(old_max, z.amax(1))
            shift = old_max - new_max
            alpha = shift.exp()
            z.sub_(new_max[:, None])
            e = torch.exp(z, out=e_buf[: nc * vc].view(nc, vc))
            tile_sum = e.sum(1)
            if with_entropy:
                tile_ent = z.mul_(e).sum(1)
                run_ent[rows] = alpha * (run_ent[rows] + shift * run_sum[rows]) + tile_ent
            run_sum[rows] = alpha * run_sum[rows] + tile_sum
            run_max[rows] = new_max
    log_sum = run_sum.log()
    lse = run_max + log_sum
    logp = target_logit - lse
    entropy = log_sum - run_ent / run_sum if with_entropy else None
    return logp, entropy, lse


def _backward_torch(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temperature, need_hidden, need_weight):
    n, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if n == 0:
        return (
            hidden.new_zeros(0, dim, dtype=torch.float32) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
        )
    tok, voc = _chunks(n, vocab)
    grad_hidden = torch.zeros(n, dim, dtype=torch.float32, device=dev) if need_hidden else None
    fp32_weight = weight.dtype == torch.float32
    grad_weight = torch.empty_like(weight) if need_weight else None
    z_buf = torch.empty(tok * voc, dtype=torch.float32, device=dev)
    p_buf = torch.empty(tok * voc, dtype=torch.float32, device=dev)
    h32 = hidden.float()
    # 1/T enters twice: in the logits (folded into the hidden rows used for recompute) and in
    # d logits = d z / T (folded into the per-token gradients, since d z is linear in them).
    h_scaled = h32 * inv_temperature if inv_temperature != 1.0 else h32
    g_logp = g_logp * inv_temperature
    g_ent = g_ent * inv_temperature if g_ent is not None else None
    for v0 in range(0, vocab, voc):
        vc = min(voc, vocab - v0)
        w32 = _at_hidden_precision(weight[v0 : v0 + vc], hidden)
        single_pass = n <= tok and fp32_weight
        gw = None
        if need_weight:
            gw = grad_weight[v0 : v0 + vc] if single_pass else torch.zeros(vc, dim, dtype=torch.float32, device=dev)
        for n0 in range(0, n, tok):
            nc = min(tok, n - n0)
            rows = slice(n0, n0 + nc)
            h = h32[rows]
            z = torch.mm(h_scaled[rows], w32.t(), out=z_buf[: nc * vc].view(nc, vc))
            z.sub_(lse[rows, None])  # z is now log p
            p = torch.exp(z, out=p_buf[: nc * vc].view(nc, vc))
            if g_ent is None:
                dz = p.mul_(-g_logp[rows, None])
            else:
                # -p (g + h (log p + H))
                dz = z.add_(entropy[rows, None]).mul_(g_ent[rows, None]).add_(g_logp[rows, None]).mul_(p).neg_()
            hit, local = _target_hits(targets[rows], v0, vc)
            hit_rows = hit.nonzero().squeeze(1)
            dz.index_put_((hit_rows, local[hit_rows]), g_logp[rows][hit_rows], accumulate=True)
            if need_hidden:
                grad_hidden[rows].addmm_(dz, w32)
            if need_weight:
                if single_pass:
                    torch.mm(dz.t(), h, out=gw)
                else:
                    gw.addmm_(dz.t(), h)
        if need_weight and not single_pass:
            grad_weight[v0 : v0 + vc] = gw
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------------
# autograd + public function
# ----------------------------------------------------------------------------------------------
class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, use_triton):
        inv_t = 1.0 / temperature
        valid = targets != IGNORE_INDEX
        if use_triton:
            logp, entropy, lse = _forward_triton(hidden, weight, targets, inv_t)
        else:
            logp, entropy, lse = _forward_torch(hidden, weight, targets, inv_t, with_entropy)
        logp = torch.where(valid, logp, 0.0)
        if with_entropy:
            entropy = torch.where(valid, entropy, 0.0)
        ctx.set_materialize_grads(False)
        ctx.inv_t = inv_t
        ctx.use_triton = use_triton
        saved_entropy = entropy if entropy is not None else lse  # placeholder never read without entropy grads
        ctx.save_for_backward(hidden, weight, targets, lse, saved_entropy, valid)
        ctx.with_entropy = with_entropy
        if not with_entropy:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy, valid = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None
        zeros = torch.zeros_like(lse)
        g_logp = zeros if grad_logp is None else torch.where(valid, grad_logp.float(), 0.0)
        g_ent = None
        if ctx.with_entropy and grad_entropy is not None:
            g_ent = torch.where(valid, grad_entropy.float(), 0.0)
        if ctx.use_triton:
            g_h, g_w = _backward_triton(
                hidden,
                weight,
                targets,
                lse,
                entropy,
                g_logp.contiguous(),
                zeros if g_ent is None else g_ent.contiguous(),
                ctx.inv_t,
                need_hidden,
                need_weight,
            )
        else:
            g_h, g_w = _backward_torch(
                hidden, weight, targets, lse, entropy, g_logp, g_ent, ctx.inv_t, need_hidden, need_weight
            )
        if g_h is not None:
            g_h = g_h.to(hidden.dtype)
        return g_h, g_w, None, None, None, None


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
):
    """log softmax(hidden @ weight.T / temperature)[targets] per token, never forming [N, V].

    hidden [N, D] and weight [V, D] on one device, unit stride in the last dimension: both fp32, bf16
    or fp16, or bf16/fp16 hidden states with an fp32 weight (master weights under autocast: the weight
    is rounded to the hidden states' dtype tile by tile, as autocast's linear would, and its gradient
    is fp32); targets [N] int64/int32 in [0, V) or `ignore_index` (-100).
    Returns logp [N] fp32, or (logp, entropy) with `return_entropy=True`; both differentiable
    w.r.t. hidden and weight. impl: "auto" (Triton for CUDA tensors, torch otherwise), "triton"
    (CUDA, or CPU under TRITON_INTERPRET=1), "torch".
    """
    for name, t, ndim in (("hidden", hidden, 2), ("weight", weight, 2), ("targets", targets, 1)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if (hidden.dtype, weight.dtype) not in DTYPE_COMBOS:
        raise ValueError(
            f"(hidden, weight) dtypes {hidden.dtype}, {weight.dtype} not supported: both fp32, bf16 or fp16, "
            "or bf16/fp16 hidden states with an fp32 weight"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight is [V, {weight.shape[1]}] but hidden is [N, {hidden.shape[1]}]: hidden sizes differ")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries, hidden has {hidden.shape[0]} rows")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"devices differ: hidden {hidden.device}, weight {weight.device}, targets {targets.device}")
    if hidden.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("hidden needs unit stride in its last dimension and weight must be contiguous")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    vocab = weight.shape[0]
    targets = targets.long()
    if targets.numel():
        bad = ((targets < 0) | (targets >= vocab)) & (targets != IGNORE_INDEX)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets[{first}] = {int(targets[first])} is outside [0, {vocab}) and is not "
                f"ignore_index ({IGNORE_INDEX})"
            )
    # An empty batch has nothing to launch; the torch path returns empty outputs and zero grads.
    with_triton = use_triton(impl, hidden, "fused_linear_logprob") and hidden.shape[0] > 0
    # autocast off inside: the torch path's GEMMs are fp32 by design, not autocast's to lower
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy = _FusedLinearLogprob.apply(
            hidden, weight, targets.contiguous(), float(temperature), bool(return_entropy), with_triton
        )
    return (logp, entropy) if return_entropy else logp
