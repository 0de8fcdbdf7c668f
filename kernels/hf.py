"""Our kernels inside Hugging Face transformers models of the Llama, Qwen2 and Qwen3 families.

    from score.kernels import hf

    hf.patch(model)        # RMSNorm, the SwiGLU MLP and RoPE of this model run through score.kernels
    logp = hf.token_logprobs(model, input_ids, targets, attention_mask=mask)   # [B, T], no logits
    hf.unpatch(model)      # the model's own forwards again

`patch` works on one loaded model, in place. Each RMSNorm and MLP module gets an instance `forward`
that calls `rms_norm` / `swiglu`; each attention module's forward runs inside a context in which the
modeling file's `apply_rotary_pos_emb` (replaced by a dispatcher while any model of that family is
patched) calls `apply_rope`. Outside that context the dispatcher calls the original function, so
other models of the same family, patched or not, are untouched. `unpatch` removes the instance
forwards (restoring any the model had before, such as accelerate's hooks) and, once no attention
module of the family is patched, the dispatcher. The residual add before each norm stays in the
decoder layer's own code: fusing it would mean replacing the layer's forward.

`token_logprobs` runs the model's decoder (not its head) and hands the final hidden states of the
tokens that have a target, with the head's weight, to `fused_linear_logprob`: per-token log-probs
(and entropy) of `targets` without ever forming [tokens, vocab] logits, differentiable in every
parameter. With an attention mask, positions count real tokens only (as `generate` does), so a
left-padded row gets the log-probs of its unpadded sequence.

`impl` is every op's "auto" | "triton" | "torch" (Triton on CUDA tensors, the torch references
elsewhere; "triton" on CPU tensors needs TRITON_INTERPRET=1). transformers is imported inside
these functions only: score.kernels imports nothing beyond torch and triton at module level.
"""

from __future__ import annotations

import contextvars
import importlib
import types
import weakref

import torch

from .dispatch import IMPLS
from .fused_linear_logprob import IGNORE_INDEX, fused_linear_logprob
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # config.model_type -> class prefix
_SWIGLU_ACTS = ("silu", "swish")
_IMPL_ATTR = "_score_kernels_impl"  # on a patched module: the impl its kernels run with
_PREVIOUS_ATTR = "_score_kernels_previous"  # the instance `forward` it had before (None: the class's)
_ORIGINAL_ATTR = "_score_kernels_forward"  # the forward a patched attention module wraps
_MODELING_ATTR = "_score_kernels_modeling"  # the modeling module whose RoPE a patched attention module uses

_ROPE_IMPL: contextvars.ContextVar[str | None] = contextvars.ContextVar("score_kernels_rope_impl", default=None)
_ROPE_ORIGINAL: dict[str, object] = {}  # modeling module name -> its own apply_rotary_pos_emb
_ROPE_USERS: dict[str, weakref.WeakSet] = {}  # modeling module name -> patched attention modules


def _family(model) -> str:
    """config.model_type of a supported transformers model, else a ValueError naming what is supported."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if not isinstance(model, torch.nn.Module) or kind not in FAMILIES:
        got = f"model_type {kind!r}" if kind is not None else type(model).__name__
        raise ValueError(f"score.kernels.hf supports transformers models of types {sorted(FAMILIES)}; got {got}")
    return kind


def _modeling(kind: str):
    return importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")


# ---------------------------------------------------------------------------------------------------
# The forwards a patched module runs
# ---------------------------------------------------------------------------------------------------
def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, impl=getattr(self, _IMPL_ATTR))[0]


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), impl=getattr(self, _IMPL_ATTR)))


def _attention_forward(self, *args, **kwargs):
    token = _ROPE_IMPL.set(getattr(self, _IMPL_ATTR))
    try:
        return getattr(self, _ORIGINAL_ATTR)(*args, **kwargs)
    finally:
        _ROPE_IMPL.reset(token)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, impl: str):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)` through `apply_rope`: q, k
    [B, H, T, D] (unsqueeze_dim 1) or [B, T, H, D] (2), cos/sin [B or 1, T, D] cast to q's dtype."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        raise ValueError(
            f"score.kernels.hf: RoPE takes 4-D q/k and 3-D cos/sin with unsqueeze_dim 1 or 2; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, unsqueeze_dim {unsqueeze_dim}"
        )
    heads_first = unsqueeze_dim == 1
    q_bthd, k_bthd = (q.transpose(1, 2), k.transpose(1, 2)) if heads_first else (q, k)
    b, t, _, d = q_bthd.shape
    tables = [x.to(q.dtype).expand(b, t, d).reshape(b * t, d) for x in (cos, sin)]
    q_rot, k_rot = apply_rope(q_bthd.reshape(b * t, -1, d), k_bthd.reshape(b * t, -1, d), *tables, impl=impl)
    q_rot, k_rot = q_rot.view(q_bthd.shape), k_rot.view(k_bthd.shape)
    return (q_rot.transpose(1, 2), k_rot.transpose(1, 2)) if heads_first else (q_rot, k_rot)


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        impl = _ROPE_IMPL.get()
        if impl is None:  # called from a model this module did not patch
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        return _rope(q, k, cos, sin, unsqueeze_dim, impl)

    apply_rotary_pos_emb.score_kernels_original = original
    return apply_rotary_pos_emb


def _hold_rope(modeling, attention: torch.nn.Module) -> None:
    name = modeling.__name__
    if name not in _ROPE_ORIGINAL:
        _ROPE_ORIGINAL[name] = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = _rope_dispatcher(_ROPE_ORIGINAL[name])
    _ROPE_USERS.setdefault(name, weakref.WeakSet()).add(attention)
    attention.__dict__[_MODELING_ATTR] = name


def _release_rope(attention: torch.nn.Module) -> None:
    name = attention.__dict__.pop(_MODELING_ATTR)
    modeling = importlib.import_module(name)
    users = _ROPE_USERS.get(name)
    if users is not None:
        users.discard(attention)
    if name in _ROPE_ORIGINAL and not users:
        modeling.apply_rotary_pos_emb = _ROPE_ORIGINAL.pop(name)
        _ROPE_USERS.pop(name, None)


def _set_forward(module: torch.nn.Module, forward, impl: str) -> None:
    module.__dict__[_PREVIOUS_ATTR] = module.__dict__.get("forward")
    if forward is _attention_forward:
        module.__dict__[_ORIGINAL_ATTR] = module.forward
    module.__dict__[_IMPL_ATTR] = impl
    module.__dict__["forward"] = types.MethodType(forward, module)


def _restore_forward(module: torch.nn.Module) -> None:
    previous = module.__dict__.pop(_PREVIOUS_ATTR)
    module.__dict__.pop(_ORIGINAL_ATTR, None)
    module.__dict__.pop(_IMPL_ATTR)
    if previous is None:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = previous


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------
def patch(model: torch.nn.Module, *, impl: str = "auto") -> torch.nn.Module:
    """Run `model`'s RMSNorms, SwiGLU MLPs and RoPE through score.kernels, in place; returns `model`.

    `model`: a loaded transformers Llama / Qwen2 / Qwen3 model (a causal LM or its bare decoder).
    Patching a patched model re-patches it (with the new `impl`). Weights, buffers, state dicts
    and the model's class are unchanged; `unpatch` restores the forwards."""
    kind = _family(model)
    if impl not in IMPLS:
        raise ValueError(f"score.kernels.hf.patch: impl must be one of {IMPLS}, got {impl!r}")
    act = getattr(model.config, "hidden_act", None)
    if act not in _SWIGLU_ACTS:
        raise ValueError(f"score.kernels.hf.patch: the MLP kernel is SwiGLU (hidden_act 'silu'); got {act!r}")
    unpatch(model)
    modeling = _modeling(kind)
    prefix = FAMILIES[kind]
    forwards = (
        (getattr(modeling, f"{prefix}RMSNorm"), _rms_norm_forward),
        (getattr(modeling, f"{prefix}MLP"), _mlp_forward),
        (getattr(modeling, f"{prefix}Attention"), _attention_forward),
    )
    found = dict.fromkeys(cls.__name__ for cls, _ in forwards)
    for module in model.modules():
        for cls, forward in forwards:
            if isinstance(module, cls):
                _set_forward(module, forward, impl)
                found[cls.__name__] = True
                if forward is _attention_forward:
                    _hold_rope(modeling, module)
    missing = [name for name, hit in found.items() if not hit]
    if missing:
        unpatch(model)
        raise ValueError(f"score.kernels.hf.patch: the {kind} model has no {', '.join(missing)} modules")
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch` on every module of `model` (a no-op where nothing is patched); returns `model`."""
    for module in model.modules():
        if _IMPL_ATTR not in module.__dict__:
            continue
        if _MODELING_ATTR in module.__dict__:
            _release_rope(module)
        _restore_forward(module)
    return model


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    entropy: bool = False,
    temperature: float = 1.0,
    impl: str = "auto",
):
    """Per-token log-probabilities of `targets` under a transformers causal LM, without logits.

    input_ids, targets [B, T]: `logp[b, t] = log p(targets[b, t] | input_ids[b, :t + 1])`, so for
    the tokens of the sequence itself pass `targets = input_ids` shifted left by one, with
    -100 (ignored) in the last column and wherever no log-prob is wanted (e.g. the prompt).
    attention_mask [B, T] (1 = token, 0 = padding; either side): padded positions are ignored and
    positions count real tokens only. Returns logp [B, T] fp32 (0 where ignored), or (logp,
    entropy) with `entropy=True`; both differentiable in the model's parameters. `temperature`
    divides the logits (sampling's temperature, for PPO/GRPO ratios against the sampler)."""
    _family(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(
            f"token_logprobs needs a causal LM with a bias-free linear head (e.g. LlamaForCausalLM); got "
            f"{type(model).__name__}"
        )
    for name, t in (("input_ids", input_ids), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_logprobs: {name} must be a [B, T] integer tensor, got {_describe(t)}")
    if targets.shape != input_ids.shape:
        raise ValueError(
            f"token_logprobs: targets {tuple(targets.shape)} must have input_ids' shape {tuple(input_ids.shape)}"
        )
    valid = targets != IGNORE_INDEX
    position_ids = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"token_logprobs: attention_mask must be [B, T] like input_ids {tuple(input_ids.shape)}, got "
                f"{_describe(attention_mask)}"
            )
        real = attention_mask.bool()
        valid = valid & real
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state
    rows = valid.flatten().nonzero().squeeze(1)
    weight = head.weight
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).to(weight.dtype)
    chosen = targets.flatten().index_select(0, rows)
    result = fused_linear_logprob(picked, weight, chosen, temperature=temperature, return_entropy=entropy, impl=impl)

    def scatter(values):
        return values.new_zeros(valid.numel()).index_copy(0, rows, values).view(valid.shape)

    return (scatter(result[0]), scatter(result[1])) if entropy else scatter(result)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {t.dtype}"
    return type(t).__name__
