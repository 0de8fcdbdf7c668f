"""Model configuration for the Llama / Qwen2 / Qwen3 decoder families.

`ModelConfig` carries HF field names so a `config.json` maps onto it one to one. It can be built
directly with keyword arguments (the defaults describe a tiny test model) or read from a
checkpoint with `ModelConfig.from_hf(path)`, which accepts both ways of writing rotary settings:
the pre-5.0 `rope_theta` + `rope_scaling` keys and the transformers-5 `rope_parameters` dict.

Supported: the three families above with GQA, q/k/v bias (Qwen2), q/k RMSNorm (Qwen3), explicit
`head_dim`, tied or untied output head, default and `llama3` RoPE. Refused with an error that
lists what is supported: other architectures, sliding-window attention, other RoPE scaling
types, activations other than SiLU, MLP bias, partial rotary embeddings.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .files import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPE_OF = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None (plain RoPE) or {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # None: the family's rule (Qwen2 always has q/k/v bias)
    qk_norm: bool | None = None  # None: the family's rule (Qwen3 always normalises q and k)
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a positive multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (rotary pairs), got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps}, {self.rope_theta}")

        is_qwen2, is_qwen3 = self.architecture == "Qwen2ForCausalLM", self.architecture == "Qwen3ForCausalLM"
        if self.attention_bias is None:
            self.attention_bias = is_qwen2
        if self.qk_norm is None:
            self.qk_norm = is_qwen3
        # Each family's HF class hard-codes these; a config that disagrees could not be saved
        # as a checkpoint transformers would read back with the same weights.
        if is_qwen2 and not self.attention_bias:
            raise ValueError("Qwen2ForCausalLM always has q/k/v bias; attention_bias=False is not that family")
        if self.qk_norm != is_qwen3:
            raise ValueError(
                f"qk_norm={self.qk_norm} does not match {self.architecture}: only Qwen3ForCausalLM has q/k RMSNorm"
            )
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def model_type(self) -> str:
        return MODEL_TYPE_OF[self.architecture]

    @property
    def o_proj_bias(self) -> bool:
        # Llama and Qwen3 put `attention_bias` on the output projection too; Qwen2 never does.
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a HF `config.json` (a checkpoint folder or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {file}")
        raw = read_json_object(file)
        try:
            return cls.from_hf_dict(raw)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None

    @classmethod
    def from_hf_dict(cls, raw: dict) -> ModelConfig:
        _check_hf_fields(raw)
        architecture = _architecture_of(raw)
        _refuse_unsupported_features(raw)
        rope_theta, rope_scaling = _rope_settings(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys we do not model (use_cache, dtype, ...) are dropped; the refused ones were checked above.
        kwargs = {k: raw[k] for k in known & raw.keys() if k not in ("rope_theta", "rope_scaling", "architecture")}
        if architecture == "Qwen3ForCausalLM" and raw.get("head_dim") is None:
            kwargs["head_dim"] = 128  # Qwen3Config's default, not hidden_size // heads
        if architecture == "Qwen2ForCausalLM":
            kwargs["attention_bias"] = True  # not written in Qwen2 configs: the family always has it
        else:
            kwargs["attention_bias"] = bool(raw.get("attention_bias", False))
        kwargs.pop("qk_norm", None)  # decided by the family
        return cls(architecture=architecture, rope_theta=rope_theta, rope_scaling=rope_scaling, **kwargs)

    def to_hf_dict(self) -> dict:
        """The `config.json` transformers reads back as the same model (both RoPE spellings written)."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        out = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.architecture == "Qwen2ForCausalLM":
            out["use_sliding_window"] = False
        else:
            out["attention_bias"] = self.attention_bias
        if self.architecture == "Qwen3ForCausalLM":
            out["use_sliding_window"] = False
        return out


# Keys a config.json must hold: without them the model's shape is a guess (HF's class defaults
# describe some 7B model, not this checkpoint).
REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
_INT_KEYS = (*REQUIRED_HF_KEYS, "num_key_value_heads", "head_dim")
_TOKEN_ID_KEYS = ("bos_token_id", "pad_token_id")


def _check_hf_fields(raw: dict) -> None:
    """Required keys present and every key we read of the right JSON type (one message naming the key)."""
    missing = [k for k in REQUIRED_HF_KEYS if k not in raw]
    if missing:
        raise ValueError(f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _INT_KEYS:
        if raw.get(key) is not None and not is_int(raw[key]):
            raise ValueError(f"{key} must be an integer, got {raw[key]!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} must be a number, got {value!r}")
    for key in ("tie_word_embeddings", "attention_bias"):
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            raise ValueError(f"{key} must be true or false, got {raw[key]!r}")
    for key in _TOKEN_ID_KEYS:
        if raw.get(key) is not None and not is_int(raw[key]):
            raise ValueError(f"{key} must be an integer token id or null, got {raw[key]!r}")
    eos = raw.get("eos_token_id")
    if eos is not None and not (is_int(eos) or (isinstance(eos, list) and eos and all(is_int(e) for e in eos))):
        raise ValueError(f"eos_token_id must be an integer token id or a list of them, got {eos!r}")
    vocab = raw["vocab_size"]
    for key in (*_TOKEN_ID_KEYS, "eos_token_id"):
        ids = raw.get(key)
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and not 0 <= token < vocab:
                raise ValueError(f"{key} {token} is outside the vocabulary (vocab_size={vocab})")


def _architecture_of(raw: dict) -> str:
    archs = raw.get("architectures") or []
    by_type = {v: k for k, v in MODEL_TYPE_OF.items()}
    if archs:
        arch = archs[0]
    elif raw.get("model_type") in by_type:
        arch = by_type[raw["model_type"]]
    else:
        arch = f"model_type={raw.get('model_type')!r}"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _refuse_unsupported_features(raw: dict) -> None:
    if raw.get("use_sliding_window"):
        raise ValueError(
            f"sliding-window attention (use_sliding_window=true, sliding_window={raw.get('sliding_window')}) "
            "is not supported; supported: full causal attention in every layer"
        )
    layer_types = raw.get("layer_types") or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise ValueError(f"layer_types {odd} are not supported; supported: 'full_attention' only")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; supported: 'silu' (SwiGLU MLP)")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; supported: MLP projections without bias")
    prf = raw.get("partial_rotary_factor", (raw.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={prf} is not supported; supported: 1.0 (rotary on the whole head)")


def _rope_settings(raw: dict) -> tuple[float, dict | None]:
    # transformers lets an old-style `rope_scaling` win over `rope_parameters`; so do we.
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = raw.get("rope_theta", 10000.0)
    return float(theta), params or None


def _normalise_rope_scaling(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return None
    scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"llama3 RoPE scaling is missing {missing}; it needs {list(LLAMA3_ROPE_KEYS)}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(
            f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {scaling['high_freq_factor']} "
            f"and {scaling['low_freq_factor']}"
        )
    return {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_ROPE_KEYS}}
