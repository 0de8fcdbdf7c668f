"""Convert a GGUF checkpoint (llama.cpp, Ollama) into an HF folder: safetensors, config, tokenizer.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/", dtype=torch.float32)

The result loads in `score.model.from_pretrained` and in `transformers.AutoModelForCausalLM`.
Every tensor is dequantised to float32 with the `gguf` package's reference decoders (llama.cpp's
own Python, an optional extra), renamed from llama.cpp's names to HF's, and, for the `llama`
architecture, the rows of q/k projections are put back in HF's rotate-half order: llama.cpp's
converter interleaves them for its rotary kernel. The config comes from the `{arch}.*` metadata,
the tokenizer from the `tokenizer.*` metadata (gguf_vocab.py), the chat template verbatim.

The folder is written whole: files go into a temporary beside it, which then replaces it. Supported:
architectures in `ARCHITECTURES`; tensor types in `TENSOR_TYPES`. Refused with a named error before
anything is written: a file that is not readable GGUF (cut, garbled), other architectures, other
tensor types, partial rotary embeddings, RoPE scaling (its `rope_freqs` factors have no HF config to
go back to), tensors the architecture does not have.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from .config import ModelConfig
from .files import atomic_folder, remove_stale_temporaries_of, save_safetensors, write_json
from .gguf_vocab import tokenizer_from_gguf
from .loading import SINGLE_FILE
from .tokenizer import Tokenizer

# GGUF general.architecture -> (HF architecture, q/k rows interleaved by llama.cpp's converter).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor name -> HF name; {} stands for the layer index.
HF_NAME_OF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ValueError("converting GGUF files needs the gguf package: pip install 'score-rl[gguf]'") from err
    return gguf


def hf_name(name: str) -> str | None:
    match = _BLOCK.match(name)
    if match is None:
        return HF_NAME_OF.get(name)
    template = HF_NAME_OF.get("blk.{}." + name[match.end() :])
    return None if template is None else template.format(match.group(1))


def read_fields(reader) -> dict:
    """{key: value} of a GGUF file's metadata (strings decoded, arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def unpermute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, it interleaves the two rotate-half halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def model_config(fields: dict, tensor_names: set[str], source: str) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: general.architecture = {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )

    def field(key, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{source}: metadata key {arch}.{key} is missing")
        return value

    heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    head_dim = int(field("attention.key_length", hidden // heads))
    rotary = int(field("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(
            f"{source}: partial rotary embeddings ({arch}.rope.dimension_count = {rotary}, head_dim {head_dim})"
        )
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{source}: RoPE scaling ({arch}.rope.scaling.type = {scaling!r} / rope_freqs) is not supported"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    return ModelConfig(
        architecture=ARCHITECTURES[arch][0],
        vocab_size=int(fields.get(f"{arch}.vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(field("feed_forward_length")),
        num_hidden_layers=int(field("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field("attention.head_count_kv", heads)),
        head_dim=head_dim,
        # Stored as float32; its shortest decimal is what the HF config said (1e-05, not 9.99e-06).
        rms_norm_eps=float(str(np.float32(field("attention.layer_norm_rms_epsilon")))),
        rope_theta=float(str(np.float32(field("rope.freq_base", 10000.0)))),
        max_position_embeddings=int(field("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
    )


def check_new_folder(out) -> None:
    """`out` must not exist, or be an empty folder (dot names aside: the lock of the process that
    converts into it, a killed conversion's leftovers)."""
    out = os.fspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or any(not n.startswith(".") for n in os.listdir(out))):
        raise FileExistsError(f"{out} already exists; converting writes a new folder")


def convert_gguf(src, out, dtype: torch.dtype = torch.float32, *, claim=None) -> str:
    """Write the HF folder for GGUF file `src` into `out` (which must not exist yet); returns `out`.

    `claim(out)`, when given, is called once everything is read and checked, just before the first
    write: the CLI takes the folder's lock there, and a killed conversion's temporaries beside `out`
    are then cleared."""
    src, out = os.fspath(src), os.fspath(out)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such GGUF file")
    check_new_folder(out)
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(src)
        fields = read_fields(reader)
    except Exception as err:  # any reader's error on a cut or garbled file: IndexError, ValueError, ...
        raise ValueError(f"{src}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    names = {t.name for t in reader.tensors}
    config = model_config(fields, names, src)
    backend, special = tokenizer_from_gguf(fields, src)
    tokenizer = Tokenizer(backend, **special, chat_template=fields.get("tokenizer.chat_template"))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{src}: the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary {config.vocab_size}"
        )

    problems = []
    for t in reader.tensors:
        if t.tensor_type.name not in TENSOR_TYPES:
            problems.append(f"{t.name} has tensor type {t.tensor_type.name} (supported: {', '.join(TENSOR_TYPES)})")
        elif hf_name(t.name) is None:
            problems.append(f"{t.name} is not a tensor of {fields['general.architecture']} models")
    if problems:
        raise ValueError(f"{src}: " + "; ".join(problems))

    interleaved = ARCHITECTURES[fields["general.architecture"]][1]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = {}
    for t in reader.tensors:
        weight = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        kind = t.name.split(".")[-2]
        if interleaved and kind in heads:
            weight = unpermute_rotary_rows(weight, heads[kind])
        tensors[hf_name(t.name)] = weight.to(dtype).contiguous()

    hf_config = config.to_hf_dict()
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    if claim is not None:
        claim(out)
        check_new_folder(out)  # again, now that no other process can write it
        remove_stale_temporaries_of(out)
    with atomic_folder(out) as tmp:
        save_safetensors(tensors, os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), hf_config, sort_keys=True)
        tokenizer.save_pretrained(tmp)
        write_json(
            os.path.join(tmp, "gguf_source.json"),
            {
                "file": os.path.abspath(src),
                "name": fields.get("general.name"),
                "architecture": fields["general.architecture"],
                "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
                "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
            },
        )
    return out
