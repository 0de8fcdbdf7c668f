"""The engine's copies of every layer's q, k and v projections, stacked into one matrix per layer
(and views of its o_proj weights in the grouped layout of a decode step's attention output).

With them a rollout forward runs one [(Hq + 2 Hkv) D, d] GEMM per layer where the model's own
forward runs three, and (engine mode, plain ops) rotates q and k in one pass, since they sit side
by side in its output. The model keeps its three HF-named parameters: checkpoints, FSDP2, the
optimizer and the training forward and backward are untouched.

The copies cost the q/k/v weights once more in memory (their share of a model is small: 5 % of
Qwen2.5-0.5B's parameters, 10 % of Llama-3-8B's). `refresh()` copies the model's current
weights into them in place: the engine calls it at the start of every generate call (the trainer
updates the weights between calls), and the tensors keep their addresses, so CUDA graphs captured
against them stay valid. gate|up is not stacked: those two matrices are 42 % of Qwen2.5-0.5B and 47 % of
Llama-3-8B, so a second copy would cost far more memory than one GEMM fewer per layer saves.

The rows come in one of two head orders, for the path the model's forward takes: q|k|v as they
stack for the kernels (their RoPE-and-store reads q, k, v as strided slices), grouped per KV head
for the plain ops (`grouped_head_order`). A forward of the other path reorders the heads first.

A model sharded by FSDP2 gets no copies (`FusedQKV.of` returns None): its weights are whole only
inside its own forward.
"""

from __future__ import annotations

import torch

from .decode_step import fsdp2_sharded


def grouped_head_order(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The heads of a stacked q|k|v (q heads, then k, then v) in the grouped layout: per KV head h,
    the q heads that share it, then k head h, then v head h ([Hkv, group + 2] row-major)."""
    group = num_heads // num_kv_heads
    order = [
        [*range(h * group, (h + 1) * group), num_heads + h, num_heads + num_kv_heads + h] for h in range(num_kv_heads)
    ]
    return torch.tensor(order).flatten()


class FusedQKV:
    def __init__(self, model: torch.nn.Module, grouped: bool):
        """`grouped`: rows in `grouped_head_order` (the plain-ops engine path views one GEMM's output
        as [N, Hkv, group + 2, D]: per KV head its query group, k and v, no op in between), else
        q|k|v as the three matrices stack (what the kernels' RoPE-and-store takes)."""
        cfg = model.config
        self.grouped = grouped
        self.head_dim = cfg.head_dim
        order = grouped_head_order(cfg.num_attention_heads, cfg.num_key_value_heads)
        device = model.embed_tokens.weight.device
        # heads.index_select(this) puts heads of this layout in the other one (a forward of the path
        # the copies were not made for)
        self.to_other_layout = (torch.argsort(order) if grouped else order).to(device)
        self._order = order.to(device) if grouped else None
        self._sources = [(layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj) for layer in model.layers]
        self._o_projs = [layer.attn.o_proj for layer in model.layers]
        self._o_shape = (cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim)
        with torch.no_grad():
            self.weights = [self._stack([p.weight for p in projs]) for projs in self._sources]
            self.biases = [
                None if projs[0].bias is None else self._stack([p.bias for p in projs]) for projs in self._sources
            ]
        self.grouped_o_weights = self._grouped_o_weights()

    @classmethod
    def of(cls, model: torch.nn.Module) -> FusedQKV | None:
        """The copies for `model` in the layout of the path its forward takes (the kernels' on CUDA
        unless `set_kernels("torch")`, the plain ops' elsewhere), or None when it is sharded by FSDP2."""
        if fsdp2_sharded(model):
            return None
        kernels, device = model.kernels, model.embed_tokens.weight.device
        return cls(model, grouped=kernels == "torch" or (kernels == "auto" and device.type != "cuda"))

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [(Hq + 2 Hkv) D, d], bias or None) of layer `layer_idx`."""
        return self.weights[layer_idx], self.biases[layer_idx]

    def refresh(self) -> None:
        """Copy the model's current q/k/v weights (and biases) into the stacked tensors, in place."""
        with torch.no_grad():
            for projs, weight, bias in zip(self._sources, self.weights, self.biases, strict=True):
                self._stack([p.weight for p in projs], out=weight)
                if bias is not None:
                    self._stack([p.bias for p in projs], out=bias)
        self.grouped_o_weights = self._grouped_o_weights()

    def _grouped_o_weights(self) -> list[torch.Tensor]:
        """Per layer, o_proj's weight viewed as [d, Hkv, group, D], the layout of a decode step's
        attention output (views, not copies: taken again at every refresh, since the model may
        have replaced a weight; outside inference mode, so that the optimizer may update it)."""
        with torch.inference_mode(False):
            return [proj.weight.detach().view(-1, *self._o_shape) for proj in self._o_projs]

    def _stack(self, parts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        if self._order is None:
            return torch.cat(parts) if out is None else torch.cat(parts, out=out)
        heads = torch.cat(parts).unflatten(0, (-1, self.head_dim))  # [heads, D, ...]
        grouped = heads.index_select(0, self._order)
        return grouped.flatten(0, 1) if out is None else out.copy_(grouped.flatten(0, 1))
