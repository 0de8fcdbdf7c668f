"""Tiny GGUF checkpoints written in the test with the `gguf` package's writer, as llama.cpp would.

`write_tiny_gguf(path, tensor_type)` stores a random 2-layer Llama (hidden 256, so every row holds
whole K-quant blocks of 256) with a byte-level BPE vocabulary trained on the fly, the ChatML
template, and llama.cpp's conventions: its tensor names, q/k rows interleaved per head, config
under `llama.*` keys. Float and simple block types are quantised from the random weights (which
are returned, so a test can check the round trip); K-quant types (the gguf package cannot
quantise them) get random blocks with finite scales.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from tests.helpers.model_fixtures import CORPUS, QWEN_STYLE_TEMPLATE, make_backend_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 256, 2, 4, 2, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte offsets and counts of the fp16 scale fields in one block of each K-quant type (ggml-common.h).
_K_SCALES = {
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}


def gguf_name(hf: str) -> str:
    """HF name -> llama.cpp name (the inverse of score.model.gguf.HF_NAME_OF)."""
    from score.model.gguf import HF_NAME_OF

    inverse = {v: k for k, v in HF_NAME_OF.items()}
    parts = hf.split(".")
    if len(parts) > 2 and parts[2].isdigit():
        return inverse[".".join(parts[:2] + ["{}"] + parts[3:])].format(parts[2])
    return inverse[hf]


def interleave_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (per head: halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab():
    """Tokens, merges and token types of a byte-level BPE trained like SmolLM2's: digits isolated
    first, so no merge joins two digits (what llama.cpp's `smollm` splitting assumes)."""
    from tokenizers import pre_tokenizers, trainers

    tok = make_backend_tokenizer(SPECIALS, vocab_size=400)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def _random_k_blocks(rows: int, cols: int, type_name: str, rng: np.random.Generator) -> np.ndarray:
    block_bytes, scale_offsets = _K_SCALES[type_name]
    data = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(1e-3, 1e-2, size=(rows, cols // 256)).astype(np.float16)
        data[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(rows, cols // 256, 2)
    return data.reshape(rows, -1)


def write_tiny_gguf(
    path,
    tensor_type: str = "F32",
    *,
    tied: bool = True,
    architecture: str = "llama",
    tokenizer_model: str = "gpt2",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the GGUF file; returns the HF-named float32 weights it was made from."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_vocab()
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    weights = {
        name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.05 * rng.standard_normal(shape)).astype(
            np.float32
        )
        for name, shape in shapes.items()
    }

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(QWEN_STYLE_TEMPLATE)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for name, w in weights.items():
        stored = w
        if name.endswith(("q_proj.weight", "k_proj.weight")) and architecture == "llama":
            stored = interleave_rotary_rows(w, HEADS if "q_proj" in name else KV_HEADS)
        if w.ndim == 1:
            writer.add_tensor(gguf_name(name), stored)
        elif tensor_type in _K_SCALES:
            writer.add_tensor(gguf_name(name), _random_k_blocks(*w.shape, tensor_type, rng), raw_dtype=qtype)
        elif tensor_type == "F32":
            writer.add_tensor(gguf_name(name), stored)
        elif tensor_type == "F16":
            writer.add_tensor(gguf_name(name), stored.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def state_dict_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()}
