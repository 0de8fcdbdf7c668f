"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers.Tokenizer`.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, each token's type
and the special-token ids as metadata, and names the text splitting it was trained with
(`tokenizer.ggml.pre`). `tokenizer_from_gguf(fields)` turns that into a byte-level BPE tokenizer
with the same splitting llama.cpp applies for that name, control tokens as special added tokens
and user-defined ones as plain added tokens, so whole `<|im_start|>`-style markers are never cut.

Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE: GPT-2, SmolLM, StarCoder, Llama-3,
Qwen2/3 files) with the pre-tokenizer names in `PRE_TOKENIZERS`. Refused with a named error:
sentencepiece (`llama`), unigram (`t5`) and other vocabularies, and unknown pre-tokenizer names.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

# llama.cpp's token types (llama_token_type): which ids are markers rather than text.
CONTROL, USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (split regexes applied in order, ignore_merges). The names and regexes are
# llama.cpp's (llama-vocab.cpp); the SmolLM/StarCoder family first isolates every digit, which is
# what its HF tokenizer.json does with a `Digits(individual_digits=True)` pre-tokenizer.
PRE_TOKENIZERS = {
    "default": ((_GPT2_SPLIT,), False),
    "gpt-2": ((_GPT2_SPLIT,), False),
    "gpt2": ((_GPT2_SPLIT,), False),
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),
    "starcoder": ((r"\p{N}", _GPT2_SPLIT), False),
    "refact": ((r"\p{N}", _GPT2_SPLIT), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "llama3": ((_LLAMA3_SPLIT,), True),
    "smaug-bpe": ((_LLAMA3_SPLIT,), True),
    "qwen2": ((_QWEN2_SPLIT,), False),
    "deepseek-r1-qwen": ((_QWEN2_SPLIT,), False),
}


def tokenizer_from_gguf(fields: dict, source: str) -> tuple[RustTokenizer, dict]:
    """(backend tokenizer, special tokens {'bos_token': str, ...}) from GGUF metadata `fields`."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model = {kind!r} is not supported; only byte-level BPE ('gpt2') "
            "vocabularies convert (sentencepiece 'llama' and unigram 't5' files do not)"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre = {pre!r} is not a known text splitting; supported: "
            + ", ".join(sorted(PRE_TOKENIZERS))
        )
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    vocab = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise ValueError(f"{source}: token {token!r} appears twice in the vocabulary (ids {vocab[token]}, {index})")
        vocab[token] = index
    merges = []
    for line, merge in enumerate(fields.get("tokenizer.ggml.merges") or []):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{source}: tokenizer.ggml.merges[{line}] = {merge!r} is not two tokens")
        merges.append((pair[0], pair[1]))

    splits, ignore_merges = PRE_TOKENIZERS[pre]
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == USER_DEFINED
        ]
    )

    special = {}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        index = fields.get(f"tokenizer.ggml.{key}")
        if index is None:
            continue
        if not 0 <= int(index) < len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.{key} = {index} is outside the vocabulary [0, {len(tokens)})")
        special[name] = tokens[int(index)]
    return backend, special
