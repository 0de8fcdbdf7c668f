"""The decoder: Llama / Qwen2 / Qwen3 families in one readable file, numerically matching HF.

Notable features
- Pre-norm blocks: RMSNorm -> attention (GQA, optional q/k/v bias, optional q/k RMSNorm per head)
  -> residual -> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; tied or untied output head.
- Rotate-half RoPE exactly as HF computes it (inverse frequencies on the CPU in fp32, cos/sin from
  fp32 positions, cast to the activation dtype), so HF checkpoints load without permuting q/k.
  Plain RoPE and the `llama3` frequency scaling.
- Three input layouts for `hidden_states`:
    dense   input_ids [B, T] (all sequences start at position 0 unless `positions` says otherwise);
    packed  input_ids [N] + cu_seqlens [S+1]: several sequences back to back, no padding, attention
            never crosses a boundary (training);
    engine  input_ids [N] + positions [N] + attn(layer_idx, q, k, v): the caller owns the KV cache
            and runs attention itself; the model knows nothing about caches (rollouts). The engine
            may also pass stacked copies of the q/k/v weights (`fused_qkv`): one GEMM per layer.
            On fp32 CPU tensors without autograd its GEMMs go through oneDNN, each with the op
            after it fused in (onednn.py).
- Per-layer activation checkpointing for training.

Not done here: KV caches, sampling (the engine), loading (loading.py), attention kernels
(attention.py). Dropout, sliding windows and other RoPE types are not supported (config.py refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from score.kernels import rms_norm, swiglu
from score.kernels.dispatch import IMPLS, use_triton
from score.kernels.rms_norm import DTYPE_COMBOS as RMS_NORM_DTYPES
from score.kernels.rope import apply_rope as rope_kernel

from . import onednn
from .attention import causal_attention, check_backend
from .config import ModelConfig

if TYPE_CHECKING:
    from .engine.fused_qkv import FusedQKV

# attn(layer_idx, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]) -> [N, Hq, D], q and k after RoPE. An
# attn with `applies_rope` true takes them before RoPE, with rope=(cos, sin) [N, D], and rotates
# them inside its KV store (the engine's kernel path: model/attention_context.py)
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fused(kernels: str, x: torch.Tensor) -> bool:
    """Whether this forward runs the Triton kernels of score.kernels (`Transformer.set_kernels`)."""
    return kernels != "torch" and use_triton(kernels, x, "Transformer")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
        if fused(kernels, x) and (x.dtype, self.weight.dtype) in RMS_NORM_DTYPES:
            return rms_norm(x, self.weight, self.eps, impl="triton")[0]
        if x.dtype == self.weight.dtype == torch.float32:
            # one op instead of five (many per decode step); torch composes it from the same
            # ops in the same order, so forward and backward are HF's bit for bit
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 and multiply by the weight after casting back, the order HF uses:
        # bf16 results then agree with HF checkpoints' reference outputs bit for bit.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_and_norm(
        self, update: torch.Tensor, residual: torch.Tensor, kernels: str = "torch"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + update), residual + update): one kernel when fused (same dtypes)."""
        if fused(kernels, update) and update.dtype == residual.dtype:
            if (update.dtype, self.weight.dtype) in RMS_NORM_DTYPES:
                return rms_norm(update, self.weight, self.eps, residual, impl="triton")
        h = residual + update
        return self(h, kernels), h


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies [head_dim/2], fp32, computed on the CPU as HF does."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def linear_output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer returns for input `x`: autocast's when it is on for x's device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [..., H, D]; cos/sin [..., D] shared by every head
    return x * cos.unsqueeze(-2) + rotate_half(x) * sin.unsqueeze(-2)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with rotate_half's negation moved into sin, bit for bit: (-a) * b == a * (-b)
    in IEEE arithmetic. x [..., D]; cos, signed_sin broadcasting to it (`signed_sin` = sin
    with its first half negated), built once per forward: two fewer ops per call, for the engine's
    decode where a step is many small ops. Engine mode only (no autograd; training keeps HF's form).
    A head whose rows are angle 0 (cos 1, sin 0) comes out unchanged: x * 1 + r * 0 == x."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin  # roll: the halves swapped


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides its own activations (one per forward)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    attn: AttentionFn | None = None
    backend: str = "auto"
    kernels: str = "auto"  # Transformer.set_kernels
    # engine mode without the kernels: cos/sin [N, 1, group + 2, D] in `apply_rope_signed`'s form,
    # one row per head of the grouped q|k|v, v's at angle 0 (`Transformer._engine_rope`)
    signed_sin: bool = False
    fused_qkv: FusedQKV | None = None  # the engine's stacked q|k|v weights (model/fused_qkv.py)
    rope_in_attn: bool = False  # `attn` rotates q and k itself (see AttentionFn)
    # engine mode on the CPU: the GEMMs through oneDNN, each with the op after it (model/onednn.py)
    onednn: bool = False


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The attention's output projection, plus `residual` when given (oneDNN engine mode only)."""
        lead = x.shape[:-1]  # [B, T] dense or [N] packed/engine
        if inputs.signed_sin:
            out = self._engine_attention(x, inputs)
            if inputs.onednn:
                out = out.reshape(-1, self.n_heads * self.head_dim)
                return onednn.linear_add(out, self.o_proj.weight, residual, self.o_proj.bias)
            if out.dim() == 4 and inputs.fused_qkv is not None and self.o_proj.bias is None:
                # a decode step's [S, Hkv, group, D] contracted with the weight viewed the same way:
                # tensordot flattens both into the GEMM the reshape and o_proj would run, in one
                # dispatched op instead of two
                weight = inputs.fused_qkv.grouped_o_weights[self.layer_idx]
                return torch.tensordot(out, weight, dims=([1, 2, 3], [1, 2, 3]))
            return self.o_proj(out.reshape(*lead, self.n_heads * self.head_dim))
        q, k, v = self._qkv(x, inputs)
        if inputs.rope_in_attn:
            out = inputs.attn(self.layer_idx, q, k, v, rope=(inputs.cos, inputs.sin))
        elif inputs.attn is not None:
            out = inputs.attn(self.layer_idx, q, k, v)
        else:
            out = causal_attention(
                q,
                k,
                v,
                scale=self.head_dim**-0.5,
                cu_seqlens=inputs.cu_seqlens,
                max_seqlen=inputs.max_seqlen,
                backend=inputs.backend,
                kernels=inputs.kernels,
            )
        return self.o_proj(out.reshape(*lead, self.n_heads * self.head_dim))

    def _engine_attention(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Engine mode on plain ops: q, k and v as one [N, Hkv, group + 2, D] tensor (per KV head its
        query group, k and v: `grouped_head_order`), rotated in one pass (v's rows of the tables are
        angle 0), handed to an attention that takes q [N, Hkv, group, D] and k|v [N, Hkv, 2, D] as
        they are (`attend_kv`), else as q [N, Hq, D], k and v [N, Hkv, D]."""
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        group, fused_qkv = hq // hkv, inputs.fused_qkv
        linear = onednn.linear if inputs.onednn else F.linear
        if fused_qkv is None:
            q, k, v = (linear(x, p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj))
            qkv = torch.cat((q.view(-1, hkv, group, d), k.view(-1, hkv, 1, d), v.view(-1, hkv, 1, d)), dim=2)
        else:
            qkv = linear(x, *fused_qkv[self.layer_idx])
            if not fused_qkv.grouped:  # copies made for the kernels' path
                qkv = qkv.view(-1, hq + 2 * hkv, d).index_select(1, fused_qkv.to_other_layout)
            qkv = qkv.view(-1, hkv, group + 2, d)
        if self.q_norm is not None:
            q, k, v = qkv.split((group, 1, 1), dim=2)
            q, k = self.q_norm(q, inputs.kernels).to(v.dtype), self.k_norm(k, inputs.kernels).to(v.dtype)
            qkv = torch.cat((q, k, v), dim=2)
        q, kv = apply_rope_signed(qkv, inputs.cos, inputs.sin).split((group, 2), dim=2)
        attend_kv = getattr(inputs.attn, "attend_kv", None)
        if attend_kv is not None:
            return attend_kv(self.layer_idx, q, kv)
        return inputs.attn(self.layer_idx, q.reshape(-1, hq, d), *kv.unbind(2))

    def _qkv(self, x: torch.Tensor, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., Hq, D] and k [..., Hkv, D] after q/k-norm and RoPE (unless the attention applies
        it), and v [..., Hkv, D]."""
        lead, hq, hkv, d = x.shape[:-1], self.n_heads, self.n_kv_heads, self.head_dim
        if inputs.fused_qkv is None:
            q = self.q_proj(x).view(*lead, hq, d)
            k = self.k_proj(x).view(*lead, hkv, d)
            v = self.v_proj(x).view(*lead, hkv, d)
        else:
            qkv = F.linear(x, *inputs.fused_qkv[self.layer_idx]).view(*lead, hq + 2 * hkv, d)
            if inputs.fused_qkv.grouped:  # copies made for the plain-ops path
                qkv = qkv.index_select(-2, inputs.fused_qkv.to_other_layout)
            q, k, v = qkv.split((hq, hkv, hkv), dim=-2)
        if self.q_norm is not None:
            # an fp32 norm weight (master weights under autocast) would promote q and k to fp32 while v
            # leaves its linear in the compute dtype: attention takes one dtype
            q, k = self.q_norm(q, inputs.kernels).to(v.dtype), self.k_norm(k, inputs.kernels).to(v.dtype)
        if not inputs.rope_in_attn:
            q, k = self._rope(q, k, inputs)
        return q, k, v

    @staticmethod
    def _rope(q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if not fused(inputs.kernels, q):
            return apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)
        d = q.shape[-1]  # the kernel takes tokens flat: [N, H, D] with cos/sin [N, D]
        q_rot, k_rot = rope_kernel(
            q.reshape(-1, *q.shape[-2:]),
            k.reshape(-1, *k.shape[-2:]),
            inputs.cos.reshape(-1, d),
            inputs.sin.reshape(-1, d),
            impl="triton",
        )
        return q_rot.view(q.shape), k_rot.view(k.shape)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
        if fused(kernels, x):
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), impl="triton"))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def onednn_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + down(silu(gate(x)) * up(x)) in three oneDNN GEMMs, each with its epilogue."""
        gate = onednn.linear_silu(x, self.gate_proj.weight)
        return onednn.linear_add(onednn.linear_mul(x, self.up_proj.weight, gate), self.down_proj.weight, residual)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        kernels = inputs.kernels
        if inputs.onednn:  # each residual add rides on the GEMM before it
            h = self.attn(self.attn_norm(x, kernels), inputs, residual=x)
            return self.mlp.onednn_forward(self.mlp_norm(h, kernels), residual=h)
        y, x = self.mlp_norm.add_and_norm(self.attn(self.attn_norm(x, kernels), inputs), x, kernels)
        return x + self.mlp(y, kernels)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, *, attention_backend: str = "auto"):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"Transformer needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.attention_backend = check_backend(attention_backend)
        self.kernels = "auto"
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied: no separate head parameter at all, so state_dict, optimizers and FSDP see one matrix.
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._engine_freqs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # `_engine_rope`
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init as HF does it: N(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D] output projection (the embedding matrix itself when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer in backward instead of storing its activations (training only)."""
        self.activation_checkpointing = bool(enabled)

    def set_attention_backend(self, backend: str) -> None:
        """ "auto" (on CUDA flash-attn when installed, else our Triton varlen kernel when the kernels
        are on, else SDPA), "sdpa", "flash" or "triton"."""
        self.attention_backend = check_backend(backend)

    def set_kernels(self, impl: str) -> None:
        """Which implementation the norms, SwiGLU, RoPE and (backend "auto", no flash-attn) the
        training attention run: "auto" (Triton kernels on CUDA
        tensors, the torch ops elsewhere: CPU results are those of the plain ops, bit for bit),
        "torch" (the plain ops everywhere) or "triton" (the kernels; on CPU only under
        TRITON_INTERPRET=1, which tests use to run the CUDA path)."""
        if impl not in IMPLS:
            raise ValueError(f"kernels must be one of {IMPLS}, got {impl!r}")
        self.kernels = impl

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits [..., V] in the model's dtype; same keyword arguments as `hidden_states`."""
        return F.linear(self.hidden_states(input_ids, **kwargs), self.lm_head_weight)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attn: AttentionFn | None = None,
        max_seqlen: int | None = None,
        fused_qkv: FusedQKV | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states: [B, T, D] for dense input, [N, D] for packed or engine input.

        `max_seqlen` (packed only, optional) is the longest sequence; giving it skips a host sync.
        `fused_qkv` (engine mode without autograd): stacked copies of the q/k/v weights to project
        with instead of the three parameters (model/fused_qkv.py).
        """
        positions, max_seqlen = self._check_inputs(input_ids, positions, cu_seqlens, attn, max_seqlen)
        if fused_qkv is not None and (attn is None or torch.is_grad_enabled()):
            raise ValueError("fused_qkv is for engine mode (attn=...) without autograd: it holds copies of the weights")
        x = self.embed_tokens(input_ids)
        signed = attn is not None and not fused(self.kernels, x)
        rope_in_attn = attn is not None and not signed and getattr(attn, "applies_rope", False)
        # the rotary tables in q's dtype: the linears' output dtype (autocast's, when it is on)
        qk_dtype = linear_output_dtype(x)
        if signed:
            cos, sin = self._engine_rope(positions, qk_dtype)
        else:
            cos, sin = self._rope(positions, qk_dtype)
        inputs = AttentionInputs(
            cos,
            sin,
            cu_seqlens,
            max_seqlen,
            attn,
            self.attention_backend,
            self.kernels,
            signed_sin=signed,
            fused_qkv=fused_qkv,
            rope_in_attn=rope_in_attn,
            onednn=signed and onednn.usable(x),
        )
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and attn is None
        for layer in self.layers:
            x = checkpoint(layer, x, inputs, use_reentrant=False) if recompute else layer(x, inputs)
        return self.norm(x, self.kernels)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config).to(device)
        freqs = positions[..., None].float() * self._inv_freq[device]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))

    def _engine_rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Engine mode on plain ops: the rotary tables [N, 1, group + 2, D] every layer uses as they
        are (broadcast over the KV heads), in `apply_rope_signed`'s form (sin's first half negated:
        (-a) == a * -1 exactly), one row per head of a KV head's group in the grouped q|k|v
        (`Attention._engine_attention`), v's at angle 0: cos 1 and sin 0 leave v as it is. The same
        fp32 products of position and frequency as `_rope`, so q's and k's rows equal its tables."""
        key = (positions.device, dtype)
        if key not in self._engine_freqs:
            cfg, half = self.config, self.config.head_dim // 2
            inv_freq = rope_inv_freq(cfg).to(positions.device)
            group = cfg.num_attention_heads // cfg.num_key_value_heads
            # one KV head's rows, broadcast over the others: [1, group + 2, D], not [Hkv, group + 2, D]
            freqs = inv_freq.new_zeros(1, group + 2, 2 * half)
            freqs[:, : group + 1] = torch.cat((inv_freq, inv_freq))
            sign = torch.ones(2 * half, dtype=dtype, device=positions.device)
            sign[:half] = -1.0
            self._engine_freqs[key] = freqs, sign
        freqs, sign = self._engine_freqs[key]
        angles = positions.view(-1, 1, 1, 1) * freqs  # int64 positions promote to fp32, as .float() makes them
        cos, sin = angles.cos(), angles.sin()
        if dtype != torch.float32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin * sign

    def _check_inputs(self, input_ids, positions, cu_seqlens, attn, max_seqlen):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = getattr(input_ids, "dtype", type(input_ids))
            raise ValueError(f"input_ids must be an int64/int32 tensor, got {got}")
        device = input_ids.device
        if input_ids.dim() == 2:
            if cu_seqlens is not None or attn is not None:
                raise ValueError(f"cu_seqlens and attn take 1-D (packed) input_ids, got shape {tuple(input_ids.shape)}")
            batch, length = input_ids.shape
            if positions is None:
                positions = torch.arange(length, device=device).expand(batch, length)
            elif positions.shape not in ((batch, length), (length,)):
                raise ValueError(f"positions must be [B, T] = {[batch, length]} or [T], got {tuple(positions.shape)}")
            return positions, None
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be [B, T] or packed [N], got shape {tuple(input_ids.shape)}")
        n = input_ids.shape[0]
        if attn is not None:
            if cu_seqlens is not None:
                raise ValueError("give either cu_seqlens (packed training) or attn (engine), not both")
            if positions is None or positions.shape != (n,):
                raise ValueError(
                    f"engine mode (attn=...) needs positions of shape [{n}], got "
                    f"{None if positions is None else tuple(positions.shape)}"
                )
            return positions, None
        if cu_seqlens is None:
            raise ValueError("1-D input_ids are a packed batch: pass cu_seqlens (or attn for engine mode)")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be int32 [S+1] with S >= 1, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, input_ids on {device}")
        if max_seqlen is None:  # one host sync: check the offsets while we have them
            offsets = cu_seqlens.tolist()
            lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            if offsets[0] != 0 or offsets[-1] != n or min(lengths) < 0:
                shown = f"{offsets[:8]}{'...' if len(offsets) > 8 else ''}"
                raise ValueError(f"cu_seqlens must rise from 0 to N={n}, got {shown}")
            max_seqlen = max(lengths)
        if positions is None:
            cu = cu_seqlens.long()
            starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=n)
            positions = torch.arange(n, device=device) - starts
        elif positions.shape != (n,):
            raise ValueError(f"positions must have shape [{n}] like input_ids, got {tuple(positions.shape)}")
        return positions, max_seqlen
