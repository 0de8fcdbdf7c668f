"""Read and write HF-layout checkpoints: config.json + safetensors (one file or sharded).

`from_pretrained` builds the model on the meta device (no memory, no random init), reads every
tensor once from safetensors straight onto the target device and dtype, checks the whole set
against the model (missing, unexpected and mis-shaped tensors are reported together, by key and
shape) and assigns them with `load_state_dict(assign=True)`, so weights are never held twice.

`save_pretrained` writes `model.safetensors` + `config.json` under HF names that
`transformers.AutoModelForCausalLM.from_pretrained` loads with identical logits. Each file is written
atomically (files.py), so a crash never leaves a half-written checkpoint.

Not done: pickle `.bin` checkpoints (refused: safetensors only), sharded writing, quantised weights.
"""

from __future__ import annotations

import os
import re

import torch
from safetensors import safe_open

from .config import ModelConfig
from .files import atomic_path, read_json_object, save_safetensors, write_json
from .model import Transformer

# HF name -> our name; {} stands for the layer index.
HF_KEY_MAP = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.o_proj.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_OURS_FROM_HF = HF_KEY_MAP
_HF_FROM_OURS = {ours: hf for hf, ours in HF_KEY_MAP.items()}
# Old Llama checkpoints store a RoPE buffer we recompute from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _translate(key: str, table: dict[str, str]) -> str | None:
    match = _LAYER_INDEX.search(key)
    if match is None:
        return table.get(key)
    template = table.get(key[: match.start()] + ".{}." + key[match.end() :])
    return None if template is None else template.format(match.group(1))


def hf_to_ours(key: str) -> str | None:
    return _translate(key, _OURS_FROM_HF)


def ours_to_hf(key: str) -> str:
    hf = _translate(key, _HF_FROM_OURS)
    if hf is None:
        raise KeyError(f"parameter {key!r} has no HF name in HF_KEY_MAP")
    return hf


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be a torch dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def checkpoint_files(path: str) -> dict[str, list[str]]:
    """{safetensors file: [HF tensor names]} for a checkpoint folder, single-file or sharded."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(key)
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            details = "; ".join(
                f"{os.path.basename(f)} (holds {len(files[f])} tensors, e.g. {files[f][0]})" for f in absent
            )
            raise FileNotFoundError(f"{index} names shard files that do not exist: {details}")
        return files
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return {single: list(f.keys())}
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if any(name.endswith(".bin") for name in present):
        raise ValueError(f"{path} holds only pickle .bin weights; safetensors checkpoints only")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (found: {present})")


def _open_safetensors(file: str, device: str = "cpu"):
    """safe_open, with a truncated, empty or garbled file reported as one line naming it."""
    try:
        return safe_open(file, framework="pt", device=device)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def from_pretrained(path, dtype=None, device="cpu", *, attention_backend: str = "auto") -> Transformer:
    """Load a Llama/Qwen2/Qwen3 HF checkpoint folder. `dtype=None` keeps the stored dtype."""
    path = os.fspath(path)
    dtype = _parse_dtype(dtype)
    config = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Transformer(config, attention_backend=attention_backend)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}

    state, unexpected, shapes, mismatched = {}, [], [], set()
    for file, keys in checkpoint_files(path).items():
        with _open_safetensors(file, device=str(device)) as f:
            stored = set(f.keys())
            for hf_key in keys:
                if hf_key.endswith(_IGNORED_SUFFIXES):
                    continue
                if hf_key not in stored:
                    raise ValueError(f"{file}: the index lists {hf_key} here but the file does not hold it")
                ours = hf_to_ours(hf_key)
                if ours == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some tied checkpoints store the head anyway; it is the embedding
                if ours not in expected:
                    unexpected.append(f"{hf_key} {list(f.get_slice(hf_key).get_shape())}")
                    continue
                tensor = f.get_tensor(hf_key)
                if tuple(tensor.shape) != expected[ours]:
                    shapes.append(f"{hf_key}: checkpoint {list(tensor.shape)}, model {list(expected[ours])}")
                    mismatched.add(ours)
                    continue
                state[ours] = tensor if dtype is None else tensor.to(dtype)
    missing = [
        f"{ours_to_hf(k)} {list(shape)}" for k, shape in expected.items() if k not in state and k not in mismatched
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"checkpoint {path} does not match {config.architecture} config: " + " | ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(path) -> torch.dtype:
    """The dtype a checkpoint folder stores its weights in (read from the safetensors headers alone);
    float32 when they mix dtypes."""
    found = set()
    for file, keys in checkpoint_files(os.fspath(path)).items():
        with _open_safetensors(file) as f:
            found.update(f.get_slice(key).get_dtype() for key in keys if not key.endswith(_IGNORED_SUFFIXES))
    dtypes = {_SAFETENSORS_DTYPES.get(name, torch.float32) for name in found}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def save_pretrained(model: Transformer, path, dtype: torch.dtype | None = None) -> None:
    """Write `model.safetensors` + `config.json` in HF layout (atomic per file), in `dtype` (None: as held)."""
    if not isinstance(model, Transformer):
        raise ValueError(f"save_pretrained needs a score.model.Transformer, got {type(model).__name__}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {ours_to_hf(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    dtypes = {t.dtype for t in tensors.values()}
    config = model.config.to_hf_dict()
    config["dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    with atomic_path(os.path.join(path, SINGLE_FILE)) as tmp:
        save_safetensors(tensors, tmp, metadata={"format": "pt"})
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):  # a stale index would make loaders look for old shards
        os.remove(index)
    write_json(os.path.join(path, "config.json"), config, sort_keys=True)
