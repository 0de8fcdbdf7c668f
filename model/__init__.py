"""Llama/Qwen-family decoder, HF checkpoint and tokenizer loading, paged KV cache and engine."""
