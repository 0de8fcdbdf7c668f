"""The published shapes (HF config.json values) of the models users train with score-rl: what the
memory plan is printed for and what the GPU benchmarks build random-weight models of."""

from __future__ import annotations

from .config import ModelConfig

PUBLISHED: dict[str, ModelConfig] = {
    "Qwen2.5-0.5B": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        architecture="Qwen2ForCausalLM",
    ),
    "Qwen2.5-1.5B": ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        architecture="Qwen2ForCausalLM",
    ),
    "Qwen2.5-3B": ModelConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        architecture="Qwen2ForCausalLM",
    ),
    "Qwen2.5-7B": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        architecture="Qwen2ForCausalLM",
    ),
    "Llama-3.1-8B": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        architecture="LlamaForCausalLM",
    ),
}
