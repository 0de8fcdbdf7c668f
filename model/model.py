"""The decoder: Llama / Qwen2 / Qwen3 families in one readable file, numerically matching HF.

- Pre-norm blocks: RMSNorm -> attention (GQA, optional q/k/v bias, optional q/k RMSNorm per head)
  -> residual -> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; tied or untied output head.
- Rotate-half RoPE exactly as HF computes it (inverse frequencies on the CPU in fp32, cos/sin from
  fp32 positions, cast to the activation dtype), so HF checkpoints load without permuting q/k.
  Plain RoPE and the `llama3` frequency scaling.
- Three input layouts for `hidden_states`:
    dense   input_ids [B, T] (all sequences start at position 0 unless `positions` says otherwise);
    packed  input_ids [N] + cu_seqlens [S+1]: several sequences back to back, no padding, attention
            never crosses a boundary (training);
    hooked  input_ids [N] + positions [N] + attn(layer_idx, q, k, v): the caller runs attention
            itself (over a KV cache of its own, say); the model knows nothing about caches.
- Per-layer activation checkpointing for training.

Not here: the rollout engine's forward, over its own copy of the weights (engine/inference_model.py,
from the functions below), loading (loading.py), attention kernels (attention.py). Dropout, sliding
windows and other RoPE types are not supported (config.py refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from score.kernels import rms_norm, swiglu
from score.kernels.dispatch import IMPLS, use_triton
from score.kernels.rms_norm import DTYPE_COMBOS as RMS_NORM_DTYPES
from score.kernels.rope import apply_rope as rope_kernel

from .attention import causal_attention, check_backend
from .config import ModelConfig

# attn(layer_idx, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]) -> [N, Hq, D], q and k after RoPE
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fused(kernels: str, x: torch.Tensor) -> bool:
    """Whether this forward runs the Triton kernels of score.kernels (`Transformer.set_kernels`)."""
    return kernels != "torch" and use_triton(kernels, x, "Transformer")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str = "torch") -> torch.Tensor:
    """RMSNorm of `x` with `weight` (`RMSNorm`; the engine's forward too, with its own weights)."""
    if fused(kernels, x) and (x.dtype, weight.dtype) in RMS_NORM_DTYPES:
        return rms_norm(x, weight, eps, impl="triton")[0]
    if x.dtype == weight.dtype == torch.float32:
        # one op instead of five (many per decode step); torch composes it from the same
        # ops in the same order, so forward and backward are HF's bit for bit
        return F.rms_norm(x, weight.shape, weight, eps)
    # Normalise in fp32 and multiply by the weight after casting back, the order HF uses:
    # bf16 results then agree with HF checkpoints' reference outputs bit for bit.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rmsnorm(
    update: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + update), residual + update): one kernel when fused (same dtypes)."""
    if fused(kernels, update) and update.dtype == residual.dtype:
        if (update.dtype, weight.dtype) in RMS_NORM_DTYPES:
            return rms_norm(update, weight, eps, residual, impl="triton")
    h = residual + update
    return rmsnorm(h, weight, eps, kernels), h


def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, kernels: str) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with the three weight matrices (`MLP`; the engine's forward too)."""
    if fused(kernels, x):
        return F.linear(swiglu(F.linear(x, gate), F.linear(x, up), impl="triton"), down)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps, kernels)


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


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., D] of `positions` [...] as HF computes them: fp32 angles, cast to `dtype`."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., Hq, D] and k [..., Hkv, D] after RoPE with the tables [..., D] of their positions."""
    if not fused(kernels, q):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cos, sin = cos.flatten(0, -2), sin.flatten(0, -2)  # the kernel takes tokens flat: [N, H, D], [N, D]
    q_rot, k_rot = rope_kernel(q.flatten(0, -3), k.flatten(0, -3), cos, sin, impl="triton")
    return q_rot.view(q.shape), k_rot.view(k.shape)


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

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        lead, hq, hkv, d = x.shape[:-1], self.n_heads, self.n_kv_heads, self.head_dim  # lead: [B, T] or [N]
        q = self.q_proj(x).view(*lead, hq, d)
        k = self.k_proj(x).view(*lead, hkv, d)
        v = self.v_proj(x).view(*lead, hkv, d)
        if self.q_norm is not None:
            # an fp32 norm weight (master weights under autocast) would promote q and k to fp32 while v
            # leaves its linear in the compute dtype: attention takes one dtype
            q, k = self.q_norm(q, inputs.kernels).to(v.dtype), self.k_norm(k, inputs.kernels).to(v.dtype)
        q, k = rotate(q, k, inputs.cos, inputs.sin, inputs.kernels)
        if inputs.attn is not None:
            out = inputs.attn(self.layer_idx, q, k, v)
        else:
            out = causal_attention(
                q,
                k,
                v,
                scale=d**-0.5,
                cu_seqlens=inputs.cu_seqlens,
                max_seqlen=inputs.max_seqlen,
                backend=inputs.backend,
                kernels=inputs.kernels,
            )
        return self.o_proj(out.reshape(*lead, hq * d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
        return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, kernels)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        kernels, norm = inputs.kernels, self.mlp_norm
        y, x = add_rmsnorm(self.attn(self.attn_norm(x, kernels), inputs), x, norm.weight, norm.eps, kernels)
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
        head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head = head
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
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
        training attention run: "auto" (Triton kernels on CUDA tensors, the torch ops elsewhere: CPU
        results are those of the plain ops, bit for bit), "torch" (the plain ops everywhere) or
        "triton" (the kernels; on CPU only under TRITON_INTERPRET=1, which tests use to run the CUDA
        path). The engine's forward follows the setting of the model it generates from."""
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
    ) -> torch.Tensor:
        """Final-norm hidden states: [B, T, D] for dense input, [N, D] for packed or hooked input.

        `max_seqlen` (packed only, optional) is the longest sequence; giving it skips a host sync.
        """
        positions, max_seqlen = self._check_inputs(input_ids, positions, cu_seqlens, attn, max_seqlen)
        x = self.embed_tokens(input_ids)
        if positions.device not in self._inv_freq:
            self._inv_freq[positions.device] = rope_inv_freq(self.config).to(positions.device)
        # the rotary tables in q's dtype: the linears' output dtype (autocast's, when it is on)
        cos, sin = rope_tables(positions, self._inv_freq[positions.device], linear_output_dtype(x))
        inputs = AttentionInputs(cos, sin, cu_seqlens, max_seqlen, attn, self.attention_backend, self.kernels)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and attn is None
        for layer in self.layers:
            x = checkpoint(layer, x, inputs, use_reentrant=False) if recompute else layer(x, inputs)
        return self.norm(x, self.kernels)

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
                raise ValueError("give either cu_seqlens (packed) or attn (an attention hook), not both")
            if positions is None or positions.shape != (n,):
                got = None if positions is None else tuple(positions.shape)
                raise ValueError(f"attn=... needs positions of shape [{n}], got {got}")
            return positions, None
        if cu_seqlens is None:
            raise ValueError("1-D input_ids are a packed batch: pass cu_seqlens (or positions and attn)")
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
