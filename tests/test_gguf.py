"""`score convert gguf`: tiny GGUF files of every supported tensor type, written in the test with the
gguf package's writer, converted and checked against the weights they were made from and against
transformers' own GGUF loader (its own dequantisers, name mapping and q/k permutation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from score.model import from_pretrained, load_tokenizer  # noqa: E402
from score.model.gguf import TENSOR_TYPES, convert_gguf  # noqa: E402
from score.rl.cli import main  # noqa: E402
from tests.helpers.gguf_files import state_dict_of, write_tiny_gguf  # noqa: E402

# Worst |dequantised - original| / max|original| a type's rounding allows (4-bit blocks: 1/15 of a range).
ROUND_TRIP = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q5_0": 0.05, "Q5_1": 0.05, "Q4_0": 0.1, "Q4_1": 0.1}
K_TYPES = [t for t in TENSOR_TYPES if t.endswith("_K")]


def _transformers_from_gguf(folder, name):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


@pytest.mark.parametrize("tensor_type", TENSOR_TYPES)
def test_every_tensor_type_converts_like_transformers_loads_it(tmp_path, tensor_type):
    weights = write_tiny_gguf(tmp_path / "m.gguf", tensor_type, tied=tensor_type != "Q8_0")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    ours = from_pretrained(out)
    reference = _transformers_from_gguf(tmp_path, "m.gguf")
    transformers = pytest.importorskip("transformers")
    from_folder = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)

    theirs, converted = state_dict_of(reference), state_dict_of(from_folder)
    assert converted.keys() == theirs.keys()
    for name, tensor in converted.items():
        assert torch.equal(tensor, theirs[name]), f"{tensor_type} {name}"
    if tensor_type in ROUND_TRIP:  # the q/k order is HF's again: close to the weights written
        for name, original in weights.items():
            error = np.abs(converted[name].numpy() - original).max() / np.abs(original).max()
            assert error <= ROUND_TRIP[tensor_type] + 1e-7, f"{tensor_type} {name}: {error}"

    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])
    with torch.no_grad():
        assert torch.equal(ours(ids), from_folder(ids).logits)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is (tensor_type != "Q8_0")
    assert config["rms_norm_eps"] == 1e-5


def test_bfloat16_output_is_the_float32_conversion_rounded(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "Q4_K")
    full = from_pretrained(convert_gguf(tmp_path / "m.gguf", tmp_path / "fp32"))
    half = from_pretrained(convert_gguf(tmp_path / "m.gguf", tmp_path / "bf16", dtype=torch.bfloat16))
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_tokenizer_and_chat_template_match_transformers_gguf_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tiny_gguf(tmp_path / "m.gguf")
    ours = load_tokenizer(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    texts = ["Hello world 123456", "def add(a, b):\n    return a + b", "  spaces\tand\ttabs  ", "x² ½ naïve café 3.14"]
    for text in texts + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "Check it again."},
    ]
    expected = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == list(expected)
    assert ours.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    # Digits are isolated before BPE (llama.cpp's `smollm` splitting), as SmolLM2's tokenizer.json does.
    assert len(ours.encode("123456")) == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "gpt2"}, "general.architecture = 'gpt2' is not supported"),
        ({"tokenizer_model": "llama"}, "tokenizer.ggml.model = 'llama' is not supported"),
    ],
)
def test_unsupported_files_are_refused_by_name_before_writing(tmp_path, kwargs, message):
    write_tiny_gguf(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(ValueError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unsupported_tensor_type_is_named(tmp_path):
    import gguf

    write_tiny_gguf(tmp_path / "m.gguf")
    # Re-tag one tensor as a type we do not decode (TQ2_0): in its tensor info (name, dimension
    # count, dimensions, type) the type is the uint32 after the dimensions.
    reader = gguf.GGUFReader(tmp_path / "m.gguf", "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    info = reader.data[: tensor.data_offset]
    name = b"blk.0.ffn_up.weight"
    at = bytes(info).index(name) + len(name)
    n_dims = int(np.frombuffer(bytes(info[at : at + 4]), dtype=np.uint32)[0])
    type_at = at + 4 + 8 * n_dims
    reader.data[type_at : type_at + 4] = np.frombuffer(
        np.uint32(gguf.GGMLQuantizationType.TQ2_0).tobytes(), dtype=np.uint8
    )
    reader.data.flush()
    with pytest.raises(ValueError, match="blk.0.ffn_up.weight has tensor type TQ2_0"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")


def test_cli_converts_and_names_bad_input_in_one_line(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "m.gguf", "Q8_0")
    assert main(["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["convert", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all")
    assert main(["convert", "gguf", str(tmp_path / "garbage.gguf"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "not a readable GGUF file" in err and err.count("\n") == 1
