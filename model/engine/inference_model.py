"""The decoder as the engine runs it: a forward of its own, over inference weights of its own.

The training decoder (model/model.py) keeps HF's parameters and one forward for training and
evaluation. A rollout forward has other needs, and the engine keeps weights laid out for them:

- q, k and v stacked into one matrix per layer: one GEMM instead of three. On the plain-ops path
  (the CPU, or `set_kernels("torch")`) the heads come grouped per KV head (`grouped_head_order`): the
  GEMM's output viewed as [N, Hkv, group + 2, D] holds each KV head's query group, k and v side by
  side, rotated in one pass by signed RoPE tables (v's rows at angle 0) and handed to the attention
  as they are (`AttentionContext.attend_kv`). On the kernels' path (CUDA) they stack as q|k|v, the
  layout the fused RoPE-and-KV-store kernel reads.
- the engine's dtype: an engine of another dtype than the policy's weights (bf16 rollouts of fp32
  master weights) holds every weight in its own dtype.
- on the CPU in fp32, each GEMM goes through oneDNN with the op after it fused in (onednn.py): SiLU
  into the gate, the gate's product into up, the residual adds into o_proj and down.

`refresh()`, at every generate call, copies the policy's current weights into the engine's own
tensors in place (their addresses stay, so CUDA graphs captured against them stay valid) and takes
again the policy's tensors the engine reads as they are (same dtype, no restacking: no copy). The
engine drops the whole object at `sleep()`. Norms, RMSNorm-with-residual, SwiGLU and RoPE tables are
the training decoder's own functions, so the two forwards differ only where the layout does.

gate and up stay two matrices: on the CPU each GEMM carries its own oneDNN epilogue, the SwiGLU
kernel reads the two as contiguous tensors, and where the engine's dtype is the policy's, stacking
them would cost a second copy of 42-47 % of the weights (Qwen2.5-0.5B, Llama-3-8B).

A policy sharded by FSDP2 is read inside `unsharded(model)` (rl/parallel), where its weights are whole
but their gathered storage moves from one rollout to the next: the engine keeps no copies of them
and projects q, k and v with the three matrices. A module that is not gathered at a refresh (FSDP2
reshards the root after each forward of the model's own) is gathered then, as its forward would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import (
    Transformer,
    add_rmsnorm,
    linear_output_dtype,
    rmsnorm,
    rope_inv_freq,
    rope_tables,
    rotate,
    swiglu_mlp,
)
from . import onednn
from .attention_context import AttentionContext
from .workspace import DecodeWorkspace


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 modules inside `model` (whose weights are whole only while gathered)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed: no FSDP2 either
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp2_sharded(model: torch.nn.Module) -> bool:
    return bool(fsdp2_modules(model))


def grouped_head_order(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The heads of a stacked q|k|v (q heads, then k, then v) in the grouped layout: per KV head h,
    the q heads that share it, then k head h, then v head h ([Hkv, group + 2] row-major)."""
    group = num_heads // num_kv_heads
    order = [
        [*range(h * group, (h + 1) * group), num_heads + h, num_heads + num_kv_heads + h] for h in range(num_kv_heads)
    ]
    return torch.tensor(order).flatten()


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with rotate_half's negation moved into sin, bit for bit: (-a) * b == a * (-b)
    in IEEE arithmetic. x [..., D]; cos, signed_sin broadcasting to it (`signed_sin` = sin with its
    first half negated), built once per forward: two fewer ops per call, in a decode step of many
    small ops. A head whose rows are angle 0 (cos 1, sin 0) comes out unchanged: x * 1 + r * 0 == x."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin  # roll: the halves swapped


@dataclass
class LayerWeights:
    """One decoder layer's weights as the engine's forward reads them."""

    attn_norm: torch.Tensor
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]]  # (weight, bias): stacked, or q, k, v apart (FSDP2)
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    o_grouped: torch.Tensor  # o viewed as [d, Hkv, group, D], the layout of a decode step's attention output
    mlp_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class InferenceModel:
    def __init__(self, policy: Transformer, dtype: torch.dtype, workspace: DecodeWorkspace):
        """The engine's forward over `policy`'s weights in `dtype`; `workspace` holds the CPU's kept
        [S, V] logits buffer."""
        cfg = policy.config
        self.policy, self.config, self.dtype, self.workspace = policy, cfg, dtype, workspace
        self.device, self.eps = policy.lm_head_weight.device, cfg.rms_norm_eps
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self._fsdp2_modules = fsdp2_modules(policy)
        self.sharded = bool(self._fsdp2_modules)  # gathered in the engine's dtype: never cast
        self.casts = not self.sharded and dtype != policy.lm_head_weight.dtype  # every weight a copy in `dtype`
        self.kernels = self.grouped = None  # the policy's kernels setting and its layout, at refresh
        self._order = grouped_head_order(cfg.num_attention_heads, cfg.num_key_value_heads).to(self.device)
        self._inv_freq = rope_inv_freq(cfg).to(self.device)
        self._signed_tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # `_signed_rope`
        self._owned: dict[str, torch.Tensor] = {}  # name -> the engine's own tensor
        self._lm_head_t = None  # CPU without oneDNN: the LM head transposed, during one generate call
        self.refresh()

    # ------------------------------------------------------------------ weights
    def refresh(self) -> None:
        """Copy the policy's current weights into the engine's tensors in place, and take again the
        ones it reads as they are (an optimizer step changes them; loading may replace them)."""
        policy = self.policy
        grouped = policy.kernels == "torch" or (policy.kernels == "auto" and self.device.type != "cuda")
        if grouped != self.grouped:  # the path (and the q|k|v layout) follows the policy's setting
            self._owned.clear()
        self.kernels, self.grouped = policy.kernels, grouped
        with torch.inference_mode(False):
            for module in self._fsdp2_modules:  # a no-op where gathered already
                module.unshard()
        with torch.no_grad():
            self.embed = self._take("embed", policy.embed_tokens.weight)
            self.norm = self._take("norm", policy.norm.weight)
            self.lm_head = self.embed if policy.lm_head is None else self._take("lm_head", policy.lm_head.weight)
            self.layers = [self._layer(i, block) for i, block in enumerate(policy.layers)]

    def _layer(self, i: int, block: torch.nn.Module) -> LayerWeights:
        attn, mlp = block.attn, block.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if self.sharded:
            qkv = [(p.weight, p.bias) for p in projections]
        else:
            bias = None if attn.q_proj.bias is None else self._own(f"{i}.qkv_bias", self._stack(projections, "bias"))
            qkv = [(self._own(f"{i}.qkv", self._stack(projections, "weight")), bias)]
        o = self._take(f"{i}.o", attn.o_proj.weight)
        with torch.inference_mode(False):  # a view the optimizer's updates of `o` may flow through
            o_grouped = o.detach().view(-1, self.heads[1], self.heads[0] // self.heads[1], self.heads[2])
        return LayerWeights(
            attn_norm=self._take(f"{i}.attn_norm", block.attn_norm.weight),
            qkv=qkv,
            q_norm=None if attn.q_norm is None else self._take(f"{i}.q_norm", attn.q_norm.weight),
            k_norm=None if attn.k_norm is None else self._take(f"{i}.k_norm", attn.k_norm.weight),
            o=o,
            o_bias=None if attn.o_proj.bias is None else self._take(f"{i}.o_bias", attn.o_proj.bias),
            o_grouped=o_grouped,
            mlp_norm=self._take(f"{i}.mlp_norm", block.mlp_norm.weight),
            gate=self._take(f"{i}.gate", mlp.gate_proj.weight),
            up=self._take(f"{i}.up", mlp.up_proj.weight),
            down=self._take(f"{i}.down", mlp.down_proj.weight),
        )

    def _stack(self, projections, name: str) -> torch.Tensor:
        """The q, k and v projections' `name` ("weight" or "bias") stacked in this path's head order."""
        stacked = torch.cat([getattr(p, name) for p in projections])
        if not self.grouped:
            return stacked
        return stacked.unflatten(0, (-1, self.heads[2])).index_select(0, self._order).flatten(0, 1)

    def _take(self, name: str, source: torch.Tensor) -> torch.Tensor:
        """`source` itself, or its copy in the engine's dtype when the engine casts."""
        return self._own(name, source) if self.casts else source

    def _own(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The engine's tensor `name`, holding `value` rounded to its dtype (allocated on first use;
        outside inference mode, so that later refreshes may write it)."""
        mine = self._owned.get(name)
        if mine is None or mine.shape != value.shape:
            with torch.inference_mode(False):
                mine = self._owned[name] = torch.empty(value.shape, dtype=self.dtype, device=self.device)
        return mine.copy_(value)

    def weight_addresses(self) -> tuple[int, ...]:
        """Where every weight the forward reads lives (a CUDA graph reads the addresses it was captured with)."""
        tensors = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            for value in vars(layer).values():
                tensors.extend([t for pair in value for t in pair] if isinstance(value, list) else [value])
        return tuple(t.data_ptr() for t in tensors if t is not None)

    def drop_call_buffers(self) -> None:
        """Release what one generate call keeps (the transposed LM head: V x D floats)."""
        self._lm_head_t = None

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Final-norm hidden states [N, D] of the new tokens `input_ids` [N] at `positions` [N]; `ctx`
        stores their K/V in the cache and runs each sequence's attention over its blocks."""
        x = F.embedding(input_ids, self.embed)
        qk_dtype = linear_output_dtype(x)  # the rotary tables in q's dtype (autocast's, when it is on)
        if self.grouped:
            cos, sin = self._signed_rope(positions, qk_dtype)
        else:
            cos, sin = rope_tables(positions, self._inv_freq, qk_dtype)
        through_onednn = self.grouped and onednn.usable(x)
        for i, layer in enumerate(self.layers):
            x = self._layer_forward(i, layer, x, cos, sin, ctx, through_onednn)
        return rmsnorm(x, self.norm, self.eps, self.kernels)

    def _layer_forward(self, i, w: LayerWeights, x, cos, sin, ctx, through_onednn: bool) -> torch.Tensor:
        h = rmsnorm(x, w.attn_norm, self.eps, self.kernels)
        if self.grouped:
            out = self._grouped_attention(i, w, h, cos, sin, ctx, onednn.linear if through_onednn else F.linear)
        else:
            out = self._stacked_attention(i, w, h, cos, sin, ctx)
        q_size = self.heads[0] * self.heads[2]
        if through_onednn:  # each residual add rides on the GEMM before it
            h = onednn.linear_add(out.reshape(-1, q_size), w.o, x, w.o_bias)
            y = rmsnorm(h, w.mlp_norm, self.eps, self.kernels)
            gate = onednn.linear_silu(y, w.gate)
            return onednn.linear_add(onednn.linear_mul(y, w.up, gate), w.down, h)
        if out.dim() == 4 and w.o_bias is None:
            # a decode step's [S, Hkv, group, D] contracted with the weight viewed the same way:
            # tensordot flattens both into the GEMM the reshape and o_proj would run, in one
            # dispatched op instead of two
            out = torch.tensordot(out, w.o_grouped, dims=([1, 2, 3], [1, 2, 3]))
        else:
            out = F.linear(out.reshape(-1, q_size), w.o, w.o_bias)
        y, x = add_rmsnorm(out, x, w.mlp_norm, self.eps, self.kernels)
        return x + swiglu_mlp(y, w.gate, w.up, w.down, self.kernels)

    def _grouped_attention(self, i, w: LayerWeights, x, cos, sin, ctx: AttentionContext, linear):
        """Plain ops: q, k and v as one [N, Hkv, group + 2, D] tensor (per KV head its query group,
        k and v), rotated in one pass, attended as they are: [N, Hq, D], or [S, Hkv, group, D] after a
        decode step over kept keys."""
        hq, hkv, d = self.heads
        group = hq // hkv
        if len(w.qkv) == 1:
            qkv = linear(x, *w.qkv[0]).view(-1, hkv, group + 2, d)
        else:
            q, k, v = (linear(x, weight, bias) for weight, bias in w.qkv)
            qkv = torch.cat((q.view(-1, hkv, group, d), k.view(-1, hkv, 1, d), v.view(-1, hkv, 1, d)), dim=2)
        if w.q_norm is not None:
            q, k, v = qkv.split((group, 1, 1), dim=2)
            q, k = self._qk_norm(q, k, v, w)
            qkv = torch.cat((q, k, v), dim=2)
        q, kv = apply_rope_signed(qkv, cos, sin).split((group, 2), dim=2)
        return ctx.attend_kv(i, q, kv)

    def _stacked_attention(self, i, w: LayerWeights, x, cos, sin, ctx: AttentionContext):
        """The kernels' path: q [N, Hq, D], k and v [N, Hkv, D] as slices of one q|k|v GEMM, RoPE
        inside the KV store where the attention backend does it: [N, Hq, D]."""
        hq, hkv, d = self.heads
        if len(w.qkv) == 1:
            q, k, v = F.linear(x, *w.qkv[0]).view(-1, hq + 2 * hkv, d).split((hq, hkv, hkv), dim=-2)
        else:
            q, k, v = (F.linear(x, wb[0], wb[1]).view(-1, n, d) for wb, n in zip(w.qkv, (hq, hkv, hkv), strict=True))
        if w.q_norm is not None:
            q, k = self._qk_norm(q, k, v, w)
        if ctx.applies_rope:
            return ctx(i, q, k, v, rope=(cos, sin))
        q, k = rotate(q, k, cos, sin, self.kernels)
        return ctx(i, q, k, v)

    def _qk_norm(self, q, k, v, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        # an fp32 norm weight under autocast would promote q and k to fp32 while v leaves its linear in
        # the compute dtype: attention takes one dtype
        kernels = self.kernels
        return rmsnorm(q, w.q_norm, self.eps, kernels).to(v.dtype), rmsnorm(k, w.k_norm, self.eps, kernels).to(v.dtype)

    def _signed_rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain-ops path's rotary tables [N, 1, group + 2, D], used by every layer as they are
        (broadcast over the KV heads), in `apply_rope_signed`'s form (sin's first half negated:
        (-a) == a * -1 exactly), one row per head of a KV head's group in the grouped q|k|v, v's at
        angle 0: cos 1 and sin 0 leave v as it is. The same fp32 products of position and frequency
        as `rope_tables`, so q's and k's rows equal its tables."""
        if dtype not in self._signed_tables:
            hq, hkv, d = self.heads
            group, half = hq // hkv, d // 2
            # one KV head's rows, broadcast over the others: [1, group + 2, D], not [Hkv, group + 2, D]
            freqs = self._inv_freq.new_zeros(1, group + 2, 2 * half)
            freqs[:, : group + 1] = torch.cat((self._inv_freq, self._inv_freq))
            sign = torch.ones(2 * half, dtype=dtype, device=self.device)
            sign[:half] = -1.0
            self._signed_tables[dtype] = freqs, sign
        freqs, sign = self._signed_tables[dtype]
        angles = positions.view(-1, 1, 1, 1) * freqs  # int64 positions promote to fp32, as .float() makes them
        cos, sin = angles.cos(), angles.sin()
        if dtype != torch.float32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin * sign

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [S, V] of final hidden states [S, D]."""
        if self.device.type != "cpu":
            return F.linear(hidden, self.lm_head).float()
        if onednn.usable(hidden):
            return onednn.linear(hidden, self.lm_head)
        # CPU BLAS multiplies [M, D] x [D, V] faster than against the [V, D] weight for decode-sized M,
        # so the LM head gets a transposed copy, taken once per generate call (the trainer updates
        # weights between calls). The logits and the sampler's [S, V] intermediates go into buffers
        # kept across steps: fresh multi-MB tensors cost page faults on every step (same kernels,
        # same numbers).
        if self._lm_head_t is None:
            self._lm_head_t = self.lm_head.t().contiguous()
        shape = (hidden.shape[0], self._lm_head_t.shape[1])
        out = self.workspace.vocab_buffer("logits", shape, self.dtype, self.device)
        logits = torch.mm(hidden, self._lm_head_t, out=out)
        return logits if logits.dtype == torch.float32 else logits.float()
