"""Tiny random-weight HF checkpoints and tokenizers built on the fly (no downloads).

Shared by the model tests and anyone else who needs a real checkpoint folder: transformers itself
writes the files, so loading them exercises the exact layout HF checkpoints have.
"""
from __future__ import annotations

import json
import os

import torch

# One tiny config per family/option the decoder supports. Values are HF config.json fields.
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128)

VARIANTS = {
    "llama": dict(architecture="LlamaForCausalLM", num_key_value_heads=4),
    "llama_gqa_tied": dict(architecture="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "llama_bias_head_dim": dict(architecture="LlamaForCausalLM", num_key_value_heads=2, attention_bias=True, head_dim=24),
    "llama3_rope": dict(
        architecture="LlamaForCausalLM", num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "qwen2_gqa_bias_tied": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_untied": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=1, rope_theta=1000000.0),
    "qwen3_qknorm_head_dim": dict(architecture="Qwen3ForCausalLM", num_key_value_heads=2, head_dim=32),
    "qwen3_tied": dict(architecture="Qwen3ForCausalLM", num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
}


def hf_config(variant: str, **overrides):
    """A transformers config object for one of VARIANTS."""
    import transformers

    spec = {**TINY, **VARIANTS[variant], **overrides}
    arch = spec.pop("architecture")
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
                  "Qwen3ForCausalLM": transformers.Qwen3Config}[arch]
    rope_theta = spec.pop("rope_theta", 10000.0)
    rope = spec.pop("rope_scaling", None) or {"rope_type": "default"}
    spec["rope_parameters"] = {**rope, "rope_theta": rope_theta}
    config = config_cls(**spec)
    config.architectures = [arch]
    return config


def make_hf_checkpoint(path, variant: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Save a random-weight transformers model of `variant` to `path`; returns the HF model (fp32, eval).

    Norm weights and biases are randomised too (HF initialises them to 1/0), so a parity test
    also checks that they are read and applied to the right tensors.
    """
    import transformers

    torch.manual_seed(seed)
    config = hf_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(std=0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def rewrite_config_old_style(path) -> None:
    """Rewrite a saved config.json with pre-transformers-5 RoPE keys (`rope_theta` + `rope_scaling`)."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    with open(file, "w") as f:
        json.dump(raw, f, indent=2)


def load_hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
